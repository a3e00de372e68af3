"""One SIP call's media: RTP in through the jitter buffer to model frames, model frames out
through the pacer to RTP.

Inbound, a playout tick every ptime pops the jitter buffer (never waiting: a missing packet
is concealed on time), decodes the codec (G.711, G.722 or Opus, at its own rate), and hands
the audio to the bridge, which resamples it to 24 kHz and emits an 80 ms model frame every
fourth tick. Outbound, each model frame is resampled to the codec's rate and cut into
packets that the pacer sends on its own clock, phased to when model frames arrive. G.711
is encoded a frame at a time as it arrives; codecs that keep state between packets (G.722,
Opus) are encoded packet by packet as they are sent, silence included, so the far end's
decoder sees exactly the sequence our encoder produced. The two ticks are
separate entries on purpose: sharing one would tie the egress phase to the ingress phase,
and an answer that comes back within the tick (an echo, a fast worker) would wait a whole
ptime for the next one. Both run on the loop's shared media clock (one loop timer for all
calls), where egress ticks go before playout work that falls due at the same time.
Telephone-events go to the DTMF receiver. The caller's audio and DTMF digits are offered
on the call's taps (media/pipeline.py).

Relay mode (a bridged transfer between two SIP legs with the same audio rate and packet
time, ``start_relay``): the playout ticks every ptime, one slot each, and hands each slot's
audio to the other leg's ``relay``, which encodes it and paces it out a packet at a time
(its pacer learns the relayed stream's timing as it comes, like a model's frames); the 80 ms frames are still made (for the taps) but no longer carry the
audio across, so the relay adds a jitter buffer and a pacer, not a model frame and two
resamplers. Until the other leg's first packet, what the model said before the hand-over
plays out; that packet starts the pacer over on the relayed stream.
"""

from __future__ import annotations

import asyncio
import time
import typing as tp

import numpy as np

from service.call_record import CallQuality
from service.gateway import metrics
from service.gateway.media.bridge import MODEL_FRAME_MS, MediaBridge
from service.gateway.media.latency import LatencyMeter
from service.gateway.media.mediaclock import MediaClock, media_clock
from service.gateway.media.pacer import EgressPacer
from service.gateway.media.pipeline import CallerAudio, MediaTaps
from sip import codecs, g711
from sip.dtmf import DtmfReceiver
from sip.jitterbuffer import CONCEAL, JitterBuffer
from sip.plc import PacketLossConcealer
from sip.rtpsession import RtpSession
from sip.sdp import NegotiatedMedia

MAX_RELAY_CATCH_UP = 8  # slots a late relay tick plays at once; beyond, the stall is skipped
MAX_PLAYOUT_CATCH_UP = 4  # model frames a late playout tick adds; beyond, the stall is skipped


class CallMedia:
    """Runs a call's audio both ways between an RtpSession and a model session."""

    def __init__(
        self,
        rtp: RtpSession,
        negotiated: NegotiatedMedia,
        *,
        to_model: tp.Callable[[bytes], None],
        taps: MediaTaps | None = None,
        jitter_min_ms: float = 20.0,
        jitter_max_ms: float = 200.0,
        resampler: str = "fir",
    ) -> None:
        self.rtp = rtp
        self.negotiated = negotiated
        spec = self.spec = codecs.spec(negotiated.codec)
        self.codec = spec.name
        self.ptime_ms = negotiated.ptime
        self.packet_samples = spec.samples(self.ptime_ms)  # PCM samples at the codec's rate
        self.timestamp_step = spec.timestamp_step(self.ptime_ms)  # RTP clock ticks per packet
        self._to_model = to_model
        self.taps = taps or MediaTaps()
        self._caller_tap = self.taps.caller
        self._encoder = codecs.encoder(spec, self.ptime_ms, negotiated.fmtp)
        self._decoder = codecs.decoder(spec)
        # G.711: one decode for a whole frame of packets, silence a constant payload
        self._g711 = not spec.stateful and spec.sample_rate == 8000
        self._silence = g711.silence(self.codec, self.packet_samples) if self._g711 else None
        self._silence_pcm = np.zeros(self.packet_samples, dtype=np.int16)
        self.jitter = JitterBuffer(
            clock_rate=spec.clock_rate,
            ptime_ms=self.ptime_ms,
            min_delay_ms=jitter_min_ms,
            max_delay_ms=jitter_max_ms,
            is_silent=codecs.quiet_detector(spec),
        )
        self.plc = PacketLossConcealer(spec.sample_rate)
        self.bridge = MediaBridge(resampler, packet_samples=self.packet_samples, rate=spec.sample_rate)
        # G.711 payloads are encoded a frame at a time, other codecs' packets as sent (PCM queued)
        self.pacer: EgressPacer[bytes | np.ndarray] = EgressPacer(
            self._send_packet,
            packet_ms=self.ptime_ms,
            on_lateness=metrics.PACER_LATENESS.observe,
            on_frame_sent=self._on_frame_sent,
        )
        self.dtmf = DtmfReceiver(negotiated.dtmf_clock_rate, on_digit=self.taps.dtmf.emit)
        rtp.set_format(negotiated.payload_type, negotiated.clock_rate, self.ptime_ms)
        rtp.set_srtp(negotiated.srtp)
        rtp.attach_jitter_buffer(self.jitter, negotiated.payload_type)
        rtp.route_payload(negotiated.payload_type, self._on_audio)
        if negotiated.dtmf_payload_type is not None:
            rtp.route(negotiated.dtmf_payload_type, self.dtmf.receive)
        self.sending = negotiated.sends
        self.latency = LatencyMeter()
        self.frames_from_model = 0
        self.egress_underruns = 0
        self.decode_errors = 0
        self._model_talking = False
        self._playout_timer: list | None = None  # our entry on the loop's shared media clock
        self._media_clock: MediaClock | None = None
        # slots per model frame, played together (1 when the ptime does not divide 80 ms)
        self._playout_slots = MODEL_FRAME_MS // self.ptime_ms if MODEL_FRAME_MS % self.ptime_ms == 0 else 1
        self._next_playout = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.last_rtp_at = time.monotonic()  # the event loop's clock (monotonic) once started
        self._last_received = 0
        # relay mode (see the module docstring): where each slot's audio goes, and our own
        self.relay_out: tp.Callable[[np.ndarray, bool], None] | None = None
        self._relaying = False
        self._relay_restart = False
        self.packets_relayed = 0

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._media_clock = media_clock(self._loop)
        period = self._playout_slots * self.ptime_ms / 1000
        # the first tick a period from now or a little later, on the phase fewest calls use
        self._next_playout = self._media_clock.quiet_phase(self._loop.time() + period, period)
        tick = self._relay_tick if self._relaying else self._playout_tick
        self._playout_timer = self._media_clock.call_at(self._next_playout, tick)
        self.pacer.start()

    @property
    def queued_packets(self) -> int:
        return self.pacer.queued_packets

    def new_source(self) -> None:
        """The caller's audio comes from someone else from now on (a transfer): the pacer
        drops what it queued and follows the new stream's timing."""
        self.pacer.restart()

    def silent_seconds(self) -> float | None:
        """Seconds since the caller's last RTP packet; None while none is expected (on hold)."""
        if not self.negotiated.receives:
            return None
        return (self._loop.time() if self._loop is not None else time.monotonic()) - self.last_rtp_at

    def stop(self) -> None:
        if self._playout_timer is not None:
            MediaClock.cancel(self._playout_timer)
            self._playout_timer = None
        self.pacer.stop()
        self._loop = None
        self._media_clock = None

    def update(self, negotiated: NegotiatedMedia) -> None:
        """A re-INVITE changed the peer's address or direction (hold/unhold)."""
        previous = self.negotiated
        self.negotiated = negotiated
        self.sending = negotiated.sends
        if negotiated.srtp != previous.srtp:
            self.rtp.set_srtp(negotiated.srtp)  # a rekey (sip.sdp.reanswer keeps SRTP calls SRTP)
        moved = (negotiated.remote_address, negotiated.remote_port) != (previous.remote_address, previous.remote_port)
        if negotiated.remote_address is not None and moved:
            self.rtp.update_remote(negotiated.remote_address, negotiated.remote_port, negotiated.remote_rtcp_port)
        self.last_rtp_at = self._loop.time() if self._loop is not None else time.monotonic()

    # -- inbound -----------------------------------------------------------------------

    def _on_audio(self, ssrc: int, timestamp: int, payload: bytes, arrival: float) -> None:
        """An audio packet to the jitter buffer; then any egress packet that fell due while
        the loop was busy with inbound packets goes out before the next one is read."""
        self.jitter.put_payload(ssrc, timestamp, payload, arrival)
        if self._media_clock is not None:
            self._media_clock.run_due()

    def _playout_tick(self) -> None:
        """Plays out the slots of one model frame at once, when its last slot is due.

        The model can use a frame only once all of it is in, so popping its slots one by
        one as they fall due would add nothing but timer wake-ups; each slot is popped at
        its own nominal time, so the jitter buffer's timing is exactly per slot."""
        loop = self._loop
        if loop is None or self._media_clock is None:
            return
        now = loop.time()
        period = self._playout_slots * self.ptime_ms / 1000
        self._next_playout += period
        missed = 0
        if self._next_playout <= now:
            # the loop was held up past whole frames: play them too (a frame the model never
            # gets would shift every later one for the pacer), up to a limit; keep the cadence
            behind = int((now - self._next_playout) // period) + 1
            missed = min(behind, MAX_PLAYOUT_CATCH_UP)
            self._next_playout += behind * period
        # ordinary work on the shared media clock: egress ticks that fall due go first
        self._playout_timer = self._media_clock.call_at(self._next_playout, self._playout_tick)
        for frame in range(missed, -1, -1):
            self._play_frame(now - frame * period)

    def _play_frame(self, end: float) -> None:
        """The slots of one model frame, the last of them due at ``end``, to the model."""
        step = self.ptime_ms / 1000
        pop = self.jitter.pop
        popped = []
        for slot in range(self._playout_slots - 1, -1, -1):
            at = end - slot * step
            popped.append(pop(at))
            self._after_slot(at)
        size = self.packet_samples
        if (
            self._g711
            and len(popped) > 1
            and not self.plc.in_loss
            and all(type(p) is bytes and len(p) == size for p in popped)
        ):
            # the common case, every slot's packet is here: one decode for the whole frame
            # (the concealer only remembers what was played, which is the same either way)
            self._to_bridge(self.plc.good(self._decoder.decode(b"".join(tp.cast(list[bytes], popped)))))
        else:
            for p in popped:
                self._to_bridge(self._slot_pcm(p))

    def _relay_tick(self) -> None:
        """Relay mode's playout: every slot at its own time, handed on at once (a late tick
        plays the slots that fell due meanwhile, each at its nominal time)."""
        loop = self._loop
        if loop is None or self._media_clock is None:
            return
        now = loop.time()
        step = self.ptime_ms / 1000
        due = self._next_playout
        times = [due]
        due += step
        while due <= now and len(times) < MAX_RELAY_CATCH_UP:
            times.append(due)
            due += step
        if due <= now:  # a long stall: keep the cadence, skip what was missed
            due = now + step - (now - due) % step
        self._next_playout = due
        self._playout_timer = self._media_clock.call_at(due, self._relay_tick)
        out = self.relay_out
        for at in times:
            popped = self.jitter.pop(at)
            self._after_slot(at)
            pcm = self._slot_pcm(popped)
            if out is not None:
                out(pcm, popped is not None)
            self._to_bridge(pcm)

    def start_relay(self, out: tp.Callable[[np.ndarray, bool], None]) -> None:
        """Bridge this leg to another one packet by packet (see the module docstring):
        ``out(pcm, streaming)`` gets each slot's audio (int16 at this codec's rate) as it is
        played out, and whether the stream has begun (False: idle, nothing received yet);
        :meth:`relay` takes the other leg's, and ``from_model`` is ignored from now on."""
        self.relay_out = out
        self._relaying = True
        self._relay_restart = True
        if self._playout_timer is not None and self._media_clock is not None and self._loop is not None:
            MediaClock.cancel(self._playout_timer)
            # the pending tick would have played the slots up to _next_playout: from the
            # first of them on, one slot per tick. Those already due are played here, not
            # relayed: a burst would start the other leg's pacer on a grid its next packets
            # contradict (at most the ptimes of a model frame, at the moment of hand-over)
            step = self.ptime_ms / 1000
            due = self._next_playout - (self._playout_slots - 1) * step
            now = self._loop.time()
            while due <= now:
                popped = self.jitter.pop(due)
                self._after_slot(due)
                self._to_bridge(self._slot_pcm(popped))
                due += step
            self._next_playout = due
            self._playout_timer = self._media_clock.call_at(due, self._relay_tick)
        self._playout_slots = 1

    def relay(self, pcm: np.ndarray, streaming: bool = True) -> None:
        """One packet of the other leg's audio (at our rate, our packet size), played out
        there now: encoded and paced out here, on the other leg's cadence. Before the other
        leg's stream begins, nothing is queued (the model's last words play out)."""
        if not self._relaying:
            return
        if self._relay_restart:
            if not streaming:
                return
            self._relay_restart = False  # the first relayed packet: the pacer follows the new stream
            self.pacer.restart(frame_ms=self.ptime_ms)
        self.packets_relayed += 1
        self._model_talking = True
        packet: np.ndarray | bytes = self._encoder.encode(pcm) if self._g711 else pcm
        self.pacer.push([packet])

    def _slot_pcm(self, popped: bytes | object | None) -> np.ndarray:
        if isinstance(popped, bytes):
            try:
                pcm = self._decoder.decode(popped)
            except ValueError:  # a payload the codec rejects (Opus): lost, as far as we can tell
                pcm = None
            if pcm is None or not len(pcm):  # nothing decodable: counted and concealed
                self.decode_errors += 1
                return self.plc.conceal(self.packet_samples)
            return self.plc.good(pcm)
        if popped is CONCEAL:
            return self.plc.conceal(self.packet_samples)
        return self._silence_pcm

    def _to_bridge(self, pcm: np.ndarray) -> None:
        if self._caller_tap.subscribers:
            self._caller_tap.emit(CallerAudio(pcm, self.spec.sample_rate))
        frame = self.bridge.caller_audio(pcm)
        if frame is not None:
            self._to_model(frame)

    def _after_slot(self, now: float) -> None:
        if self.dtmf.active:
            self.dtmf.poll(now)
        if self.rtp.packets_received != self._last_received:
            self._last_received = self.rtp.packets_received
            self.last_rtp_at = now

    # -- outbound ----------------------------------------------------------------------

    def from_model(self, frame: bytes) -> None:
        """One 80 ms frame of the model's voice arrived from the worker."""
        if self._relaying:
            return  # the relay carries the audio (start_relay)
        self.frames_from_model += 1
        self._model_talking = True
        self._to_caller(frame)

    def play_prompt(self, frame: bytes) -> None:
        """One 80 ms frame of a prompt (the gateway's own audio, not counted as the model's)."""
        self._to_caller(frame)

    def _to_caller(self, frame: bytes) -> None:
        pcm = self.bridge.model_audio_pcm(frame)
        size = self.packet_samples
        if self._g711:  # encoded here, once per frame: the pacer's ticks only send
            encoded = self._encoder.encode(pcm)
            self.pacer.push([encoded[i : i + size] for i in range(0, len(encoded), size)])
        else:  # encoded as sent, in order (see the module docstring)
            self.pacer.push([pcm[i : i + size] for i in range(0, len(pcm), size)])

    def _send_packet(self, packet: bytes | np.ndarray | None, ticks: int) -> None:
        if packet is None and self._model_talking and self.frames_from_model:
            self.egress_underruns += 1
        step = ticks * self.timestamp_step
        if not self.sending:
            self.rtp.timestamp = (self.rtp.timestamp + step) & 0xFFFFFFFF
            return
        if isinstance(packet, bytes):  # G.711, encoded with its frame
            payload = packet
        elif packet is None and self._silence is not None:  # G.711 silence: a constant payload
            payload = self._silence
        else:
            payload = self._encoder.encode(self._silence_pcm if packet is None else packet)
        self.rtp.send_media(payload, step)

    def _on_frame_sent(self, waited: float) -> None:
        self.latency.frame_sent(self.jitter.delay, waited, self.bridge.held_back_ms)

    # -- reporting ---------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """Integer counters for the scrape-time metrics collector."""
        stats = self.rtp.stats()
        jb = self.jitter
        return {
            "packets_received": stats.packets_received,
            "packets_sent": stats.packets_sent,
            "packets_lost": max(0, stats.packets_lost),
            "packets_late": jb.packets_late,
            "packets_stray": stats.packets_stray,
            "packets_withheld": stats.packets_withheld,
            "packets_malformed": stats.packets_malformed + self.decode_errors,
            "packets_duplicate": jb.packets_duplicate,
            "packets_srtp_replayed": stats.packets_srtp_replayed,
            "packets_srtp_auth_failed": stats.packets_srtp_auth_failed,
            "frames_concealed": jb.frames_concealed,
            "model_frames_dropped": self.pacer.stats.late_dropped,
            "egress_underruns": self.egress_underruns,
        }

    def quality(self) -> CallQuality:
        """The call's audio quality, as the API shows it."""
        stats = self.rtp.stats()
        jb = self.jitter.stats()
        return CallQuality(
            codec=self.codec,
            sample_rate_hz=self.spec.sample_rate,
            ptime_ms=self.ptime_ms,
            jitter_ms=round(stats.jitter_ms, 2),
            loss_fraction=round(stats.fraction_lost, 4),
            packets_lost=max(0, stats.packets_lost),
            rtt_ms=None if stats.rtt_ms is None else round(stats.rtt_ms, 2),
            remote_loss_fraction=stats.remote_fraction_lost,
            remote_jitter_ms=stats.remote_jitter_ms,
            packets_received=stats.packets_received,
            packets_sent=stats.packets_sent,
            packets_stray=stats.packets_stray,
            packets_malformed=stats.packets_malformed,
            decode_errors=self.decode_errors,
            packets_late=jb.packets_late,
            srtp_suite=self.negotiated.srtp.suite if self.negotiated.srtp is not None else None,
            packets_srtp_replayed=stats.packets_srtp_replayed,
            packets_srtp_auth_failed=stats.packets_srtp_auth_failed,
            concealed_frames=jb.frames_concealed,
            jitter_buffer_ms=round(jb.delay_ms, 1),
            jitter_buffer_target_ms=round(jb.target_delay_ms, 1),
            egress_cushion_ms=round(self.pacer.cushion * 1000, 1),
            egress_underruns=self.egress_underruns,
            gateway_latency_ms=self.latency.summary(self.jitter.delay, self.bridge.held_back_ms, self.pacer.cushion),
            model_frames=self.frames_from_model,
            model_packets=self.pacer.stats.model_packets,
            model_packets_late=self.pacer.stats.late_dropped,
            pacer_max_lateness_ms=round(self.pacer.stats.max_lateness_s * 1000, 2),
            resampler=self.bridge.resampler,
        )
