"""One WebRTC call's media: Opus RTP in through a jitter buffer to model frames, model frames
out through the pacer to an aiortc track.

Inbound, packets come from the receiver tap (see aiortc_tap) into the project's jitter
buffer (sip.jitterbuffer: playout deadline, adaptive delay, a lost packet concealed on
time). A playout tick every ptime pops it, decodes Opus at 48 kHz, decimates to 24 kHz
(or conceals at 24 kHz) and hands the audio to the framer, which emits an 80 ms model
frame every fourth 20 ms tick. Outbound, each model frame is interpolated to 48 kHz and
cut into 20 ms packets that the egress pacer releases on its monotonic clock into
``ModelAudioTrack``, the track aiortc's sender encodes; a tick with nothing due is silence.
The caller's audio (at 24 kHz, after concealment) is offered on the call's ``caller`` tap
(media/pipeline.py).
"""

from __future__ import annotations

import asyncio
import collections
import fractions
import time
import typing as tp

import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame

from service.call_record import CallQuality
from service.gateway import metrics
from service.gateway.media.bridge import MODEL_FRAME_SAMPLES, to_pcm16
from service.gateway.media.latency import LatencyMeter
from service.gateway.media.pacer import EgressPacer
from service.gateway.media.pipeline import CallerAudio, MediaTaps
from service.gateway.media.resample import MODEL_RATE, Decimator48to24, Interpolator24to48
from sip.jitterbuffer import CONCEAL, JitterBuffer
from sip.opus import OPUS_RATE, OpusMonoDecoder, OpusPacketError, is_quiet_packet, opus_packet_samples
from sip.plc import PacketLossConcealer
from sip.rtp import RtpPacket
from sip.rtpstats import ReceiverStatistics

PACKET_MS = 20
PACKET_SAMPLES_48K = OPUS_RATE * PACKET_MS // 1000  # 960
TRACK_QUEUE_PACKETS = 10  # 200 ms: past this the sender is stuck and the oldest is dropped
TIME_BASE = fractions.Fraction(1, OPUS_RATE)


class ModelAudioTrack(MediaStreamTrack):
    """The outbound audio track: 20 ms frames at 48 kHz, handed over by the pacer on its clock.

    ``recv`` (called by aiortc's sender) returns the next packet the pacer released: model
    audio, or silence for a tick with nothing due. The pacer, not the sender, sets the pace.
    """

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._queue: collections.deque[tuple[np.ndarray | None, int]] = collections.deque()
        self._ready = asyncio.Event()
        self._silence = np.zeros(PACKET_SAMPLES_48K, dtype=np.int16)
        self._pts = 0
        self.frames_sent = 0
        self.dropped = 0

    def put(self, pcm: np.ndarray | None, ticks: int) -> None:
        """The pacer's send callback: one packet (or None for silence) is due now."""
        if self.readyState != "live":
            return
        self._queue.append((pcm, ticks))
        if len(self._queue) > TRACK_QUEUE_PACKETS:
            self._queue.popleft()
            self.dropped += 1
        self._ready.set()

    async def recv(self) -> AudioFrame:
        while not self._queue:
            if self.readyState != "live":
                raise MediaStreamError
            self._ready.clear()
            await self._ready.wait()
        pcm, ticks = self._queue.popleft()
        samples = self._silence if pcm is None else pcm
        frame = AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = OPUS_RATE
        frame.time_base = TIME_BASE
        # skipped ticks (a stalled loop) advance the media clock, as a stalled sender would
        self._pts += (ticks - 1) * PACKET_SAMPLES_48K
        frame.pts = self._pts
        self._pts += len(samples)
        self.frames_sent += 1
        return frame

    def stop(self) -> None:
        super().stop()
        self._ready.set()


class ModelFramer:
    """Cuts a stream of 24 kHz int16 chunks into 80 ms model frames (3840 bytes)."""

    def __init__(self) -> None:
        self._pending: list[np.ndarray] = []
        self._pending_len = 0

    def add(self, pcm24k: np.ndarray) -> list[bytes]:
        self._pending.append(pcm24k)
        self._pending_len += len(pcm24k)
        if self._pending_len < MODEL_FRAME_SAMPLES:
            return []
        joined = np.concatenate(self._pending)
        count = len(joined) // MODEL_FRAME_SAMPLES
        frames = [joined[i * MODEL_FRAME_SAMPLES : (i + 1) * MODEL_FRAME_SAMPLES].tobytes() for i in range(count)]
        rest = joined[count * MODEL_FRAME_SAMPLES :]
        self._pending = [rest] if len(rest) else []
        self._pending_len = len(rest)
        return frames


is_silent_opus = is_quiet_packet


class WebRtcMedia:
    """Runs a WebRTC call's audio both ways between aiortc and a model session."""

    def __init__(
        self,
        *,
        to_model: tp.Callable[[bytes], None],
        taps: MediaTaps | None = None,
        jitter_min_ms: float = 20.0,
        jitter_max_ms: float = 200.0,
        receives: bool = True,
    ) -> None:
        self._to_model = to_model
        self.taps = taps or MediaTaps()
        self._caller_tap = self.taps.caller
        self.jitter_min_ms = jitter_min_ms
        self.jitter_max_ms = jitter_max_ms
        self.track = ModelAudioTrack()
        self.pacer = EgressPacer(
            self._send_packet,
            packet_ms=PACKET_MS,
            on_lateness=metrics.PACER_LATENESS.observe,
            on_frame_sent=self._on_frame_sent,
        )
        self._decoder = OpusMonoDecoder()
        self._down = Decimator48to24()
        self._up = Interpolator24to48()
        self.resampler = self._down.name
        self.held_back_ms = self._down.held_back_ms + self._up.held_back_ms
        self.plc = PacketLossConcealer(MODEL_RATE)
        self.framer = ModelFramer()
        self.rtp_stats = ReceiverStatistics(OPUS_RATE)
        self.jitter: JitterBuffer | None = None  # made for the ptime of the first packet
        self.ptime_ms = float(PACKET_MS)
        self.ptime_changes = 0
        self.packets_malformed = 0
        self.decode_errors = 0
        self.latency = LatencyMeter()
        self.frames_from_model = 0
        self.egress_underruns = 0
        self.rtt_ms: float | None = None  # set by the session from aiortc's RTCP statistics
        self.remote_loss_fraction: float | None = None
        self.remote_jitter_ms: float | None = None
        self.last_rtp_at = time.monotonic()
        self.receives = receives  # the peer offered to send audio
        self._model_talking = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tick_timer: asyncio.TimerHandle | None = None
        self._next_tick = 0.0
        # jitter-buffer counters of buffers replaced after a ptime change
        self._retired: collections.Counter[str] = collections.Counter()

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.last_rtp_at = time.monotonic()
        self._next_tick = self._loop.time() + self.ptime_ms / 1000
        self._tick_timer = self._loop.call_at(self._next_tick, self._tick)
        self.pacer.start()

    def stop(self) -> None:
        if self._tick_timer is not None:
            self._tick_timer.cancel()
            self._tick_timer = None
        self.pacer.stop()
        self.track.stop()
        self._loop = None

    @property
    def running(self) -> bool:
        return self._loop is not None

    @property
    def queued_packets(self) -> int:
        return self.pacer.queued_packets

    def new_source(self) -> None:
        """The caller's audio comes from someone else from now on (a transfer): the pacer
        drops what it queued and follows the new stream's timing."""
        self.pacer.restart()

    def silent_seconds(self) -> float | None:
        """Seconds since the peer's last RTP packet; None when it does not send audio."""
        return time.monotonic() - self.last_rtp_at if self.receives else None

    # -- inbound -----------------------------------------------------------------------

    def on_rtp(self, packet: tp.Any, arrival: float) -> None:
        """One depayloaded RTP packet from the receiver tap (aiortc's RtpPacket); ``arrival`` on
        the event loop's clock."""
        payload = bytes(packet.payload)
        try:
            samples = opus_packet_samples(payload)
        except OpusPacketError:
            self.packets_malformed += 1
            return
        self.last_rtp_at = time.monotonic()
        self.rtp_stats.update(packet.ssrc, packet.sequence_number, packet.timestamp, arrival, len(payload))
        jitter = self.jitter
        if jitter is None or samples != jitter.frame_samples:
            jitter = self._new_jitter_buffer(samples)
        jitter.put(
            RtpPacket(
                payload_type=packet.payload_type,
                sequence=packet.sequence_number,
                timestamp=packet.timestamp,
                ssrc=packet.ssrc,
                payload=payload,
            ),
            arrival,
        )

    def _new_jitter_buffer(self, samples: int) -> JitterBuffer:
        if self.jitter is not None:
            self.ptime_changes += 1
            stats = self.jitter.stats()
            for key in ("packets_late", "packets_duplicate", "frames_concealed"):
                self._retired[key] += getattr(stats, key)
        self.ptime_ms = samples * 1000 / OPUS_RATE
        self.jitter = JitterBuffer(
            clock_rate=OPUS_RATE,
            ptime_ms=self.ptime_ms,
            min_delay_ms=self.jitter_min_ms,
            max_delay_ms=self.jitter_max_ms,
            is_silent=is_silent_opus,
        )
        return self.jitter

    def _tick(self) -> None:
        loop = self._loop
        if loop is None:
            return
        now = loop.time()
        period = self.ptime_ms / 1000
        self._next_tick += period
        if self._next_tick <= now:  # the loop stalled: keep cadence, skip what was missed
            self._next_tick = now + period - (now - self._next_tick) % period
        self._tick_timer = loop.call_at(self._next_tick, self._tick)
        self.play(now)

    def play(self, now: float) -> np.ndarray:
        """One playout slot: the next ptime of caller audio at 24 kHz, passed on to the model."""
        samples_24k = int(round(self.ptime_ms * MODEL_RATE / 1000))
        popped = self.jitter.pop(now) if self.jitter is not None else None
        pcm: np.ndarray | None = None
        if isinstance(popped, bytes):
            try:
                decoded = self._decoder.decode(popped)
            except OpusPacketError:
                self.decode_errors += 1
                popped = CONCEAL
            else:
                pcm = self.plc.good(to_pcm16(self._down.process(decoded.astype(np.float32))))
        if pcm is None:
            if popped is CONCEAL:
                pcm = self.plc.conceal(samples_24k)
            else:
                pcm = np.zeros(samples_24k, dtype=np.int16)
        if self._caller_tap.subscribers:
            self._caller_tap.emit(CallerAudio(pcm, MODEL_RATE))
        for frame in self.framer.add(pcm):
            self._to_model(frame)
        return pcm

    # -- outbound ----------------------------------------------------------------------

    def from_model(self, frame: bytes) -> None:
        """One 80 ms frame of the model's voice arrived from the worker."""
        self.frames_from_model += 1
        self._model_talking = True
        self._to_caller(frame)

    def play_prompt(self, frame: bytes) -> None:
        """One 80 ms frame of a prompt (the gateway's own audio, not counted as the model's)."""
        self._to_caller(frame)

    def _to_caller(self, frame: bytes) -> None:
        pcm48 = to_pcm16(self._up.process(np.frombuffer(frame, dtype="<i2").astype(np.float32)))
        count = len(pcm48) // PACKET_SAMPLES_48K
        self.pacer.push([pcm48[i * PACKET_SAMPLES_48K : (i + 1) * PACKET_SAMPLES_48K] for i in range(count)])

    def _on_frame_sent(self, waited: float) -> None:
        self.latency.frame_sent(self.jitter.delay if self.jitter is not None else 0.0, waited, self.held_back_ms)

    def _send_packet(self, pcm: np.ndarray | None, ticks: int) -> None:
        if pcm is None and self._model_talking:
            self.egress_underruns += 1
        self.track.put(pcm, ticks)

    # -- reporting ---------------------------------------------------------------------

    def _jitter_counts(self) -> dict[str, int]:
        counts = dict(self._retired)
        if self.jitter is not None:
            stats = self.jitter.stats()
            for key in ("packets_late", "packets_duplicate", "frames_concealed"):
                counts[key] = counts.get(key, 0) + getattr(stats, key)
        return counts

    def counters(self) -> dict[str, int]:
        """Integer counters for the scrape-time metrics collector."""
        jb = self._jitter_counts()
        return {
            "packets_received": self.rtp_stats.packets_received,
            "packets_sent": self.track.frames_sent,
            "packets_lost": max(0, self.rtp_stats.packets_lost),
            "packets_late": jb.get("packets_late", 0),
            "packets_stray": 0,
            "packets_malformed": self.packets_malformed + self.decode_errors,
            "packets_duplicate": jb.get("packets_duplicate", 0),
            "frames_concealed": jb.get("frames_concealed", 0),
            "model_frames_dropped": self.pacer.stats.late_dropped + self.track.dropped,
            "egress_underruns": self.egress_underruns,
        }

    def quality(self) -> CallQuality:
        """The call's audio quality, as the API shows it (the SIP call's fields, plus Opus's)."""
        jb = self._jitter_counts()
        jitter = self.jitter
        return CallQuality(
            codec="opus/48000",
            sample_rate_hz=OPUS_RATE,
            ptime_ms=self.ptime_ms,
            jitter_ms=round(self.rtp_stats.jitter_seconds * 1000, 2),
            loss_fraction=round(self.rtp_stats.fraction_lost, 4),
            packets_lost=max(0, self.rtp_stats.packets_lost),
            rtt_ms=None if self.rtt_ms is None else round(self.rtt_ms, 2),
            remote_loss_fraction=self.remote_loss_fraction,
            remote_jitter_ms=self.remote_jitter_ms,
            packets_received=self.rtp_stats.packets_received,
            packets_sent=self.track.frames_sent,
            packets_stray=0,
            packets_malformed=self.packets_malformed,
            decode_errors=self.decode_errors,
            packets_late=jb.get("packets_late", 0),
            concealed_frames=jb.get("frames_concealed", 0),
            jitter_buffer_ms=round(jitter.delay * 1000, 1) if jitter is not None else 0.0,
            jitter_buffer_target_ms=round(jitter.stats().target_delay_ms, 1) if jitter is not None else 0.0,
            egress_cushion_ms=round(self.pacer.cushion * 1000, 1),
            egress_underruns=self.egress_underruns,
            egress_dropped=self.track.dropped,
            gateway_latency_ms=self.latency.summary(
                jitter.delay if jitter is not None else 0.0, self.held_back_ms, self.pacer.cushion
            ),
            model_frames=self.frames_from_model,
            model_packets=self.pacer.stats.model_packets,
            model_packets_late=self.pacer.stats.late_dropped,
            pacer_max_lateness_ms=round(self.pacer.stats.max_lateness_s * 1000, 2),
            resampler=self.resampler,
        )
