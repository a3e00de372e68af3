"""``moshimoshi call URI``: place a test call, play a WAV, record what comes back.

Engineers use it to try a line end to end. The recording is stereo at the codec's audio
rate (8 kHz for G.711, 16 kHz for G.722, 48 kHz for Opus), the caller (what we sent) on
the left and the far end (the model) on the right, sample-aligned on the call's own clock, so the model's timing against the caller can be read off it.
The transcript comes from the gateway's API once the call ends (the gateway names its call
id in the X-Moshimoshi-Call-Id header of its 200 OK); the transcript file is written either
way, with one line saying why when the API could not give it (unreachable, no token, the
token refused). A callee that sends no SIP response at all within ``--response-seconds``
fails the call at once instead of after Timer B's 32 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
import typing as tp
import wave
from pathlib import Path

import numpy as np

from service import realtime
from service.api.control import CALL_ID_HEADER
from service.realtime import quiet_gc
from service.settings import CallSettings
from sip import codecs
from sip.dialog import Dialog
from sip.dtmf import DtmfDigit, DtmfReceiver, DtmfSender
from sip.errors import CallFailed, SipError, SipParseError
from sip.jitterbuffer import CONCEAL, JitterBuffer
from sip.message import Response
from sip.plc import PacketLossConcealer
from sip.rtp import RtpPacket
from sip.rtpsession import PortAllocator, RtpSession
from sip.sdp import (
    MediaPreferences,
    NegotiatedMedia,
    SdpError,
    SessionDescription,
    build_offer,
    negotiated_from_answer,
)
from sip.tls import client_context
from sip.transport import is_ip
from sip.ua import UserAgent
from sip.uri import SipUri, format_host

log = logging.getLogger("moshimoshi.call")

TELEPHONE_RATE = 8000
DTMF_AT_SECONDS = 1.0


def read_wav(path: str | Path, rate: int = TELEPHONE_RATE) -> np.ndarray:
    """A WAV file (PCM 8/16/32-bit, any rate, mono or stereo) as mono int16 at ``rate``."""
    with wave.open(str(path), "rb") as wav:
        channels, width, source_rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
        raw = wav.readframes(wav.getnframes())
    if width == 1:
        samples = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif width == 2:
        samples = np.frombuffer(raw, "<i2").astype(np.float32) / 32768
    elif width == 4:
        samples = np.frombuffer(raw, "<i4").astype(np.float32) / 2**31
    else:
        raise ValueError(f"{path}: {8 * width}-bit WAV is not supported (use 8, 16 or 32-bit PCM)")
    samples = samples.reshape(-1, channels).mean(axis=1)
    if source_rate != rate:
        import soxr

        samples = soxr.resample(samples, source_rate, rate, quality="HQ")
    pcm: np.ndarray = np.clip(np.rint(samples * 32767), -32768, 32767).astype(np.int16)
    return pcm


def write_stereo_wav(path: str | Path, left: np.ndarray, right: np.ndarray, rate: int = TELEPHONE_RATE) -> None:
    length = max(len(left), len(right))
    frames = np.zeros((length, 2), dtype="<i2")
    frames[: len(left), 0] = left
    frames[: len(right), 1] = right
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(2)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(frames.tobytes())


class TestCall:
    """One outgoing call's media: send the WAV on the ptime clock, record both directions,
    at the negotiated codec's audio rate."""

    def __init__(self, rtp: RtpSession, media: NegotiatedMedia, audio: np.ndarray) -> None:
        spec = codecs.spec(media.codec)
        self.rtp = rtp
        self.rate = spec.sample_rate
        self.samples = spec.samples(media.ptime)
        self.period = media.ptime / 1000
        self.audio = audio
        self.encoder = codecs.encoder(spec, media.ptime, media.fmtp)
        self.decoder = codecs.decoder(spec)
        self.jitter = JitterBuffer(
            clock_rate=spec.clock_rate, ptime_ms=media.ptime, is_silent=codecs.quiet_detector(spec)
        )  # adapt in pauses, not in speech
        self.plc = PacketLossConcealer(spec.sample_rate)
        self.digits: list[DtmfDigit] = []
        self.dtmf = DtmfReceiver(media.dtmf_clock_rate, on_digit=self.digits.append)
        rtp.attach_jitter_buffer(self.jitter, media.payload_type)
        rtp.route(media.payload_type, self._on_audio_packet)
        self.arrivals: list[float] = []
        self.sequences: list[int] = []
        if media.dtmf_payload_type is not None:
            rtp.route(media.dtmf_payload_type, self.dtmf.receive)
        self.sent: list[np.ndarray] = []
        self.received: list[np.ndarray] = []
        self.early: list[np.ndarray] = []  # what came before the answer (early media)
        self.ticks = 0
        self.started_at: float | None = None  # wall clock of the recording's first sample

    def _on_audio_packet(self, packet: RtpPacket, arrival: float) -> None:
        self.arrivals.append(arrival)
        self.sequences.append(packet.sequence)
        self.jitter.put(packet, arrival)

    def arrival_stats(self) -> dict[str, float | int]:
        """How steadily the far end's packets came: rate, spacing, sequence gaps."""
        if len(self.arrivals) < 2:
            return {"packets": len(self.arrivals)}
        times = np.asarray(self.arrivals)
        gaps = np.diff(times) * 1000
        seqs = np.asarray(self.sequences, dtype=np.int64)
        steps = (np.diff(seqs) + 65536) % 65536
        span = times[-1] - times[0]
        return {
            "packets": len(times),
            "packets_per_second": round((len(times) - 1) / span, 2) if span else 0.0,
            "spacing_p50_ms": round(float(np.percentile(gaps, 50)), 2),
            "spacing_p99_ms": round(float(np.percentile(gaps, 99)), 2),
            "spacing_max_ms": round(float(gaps.max()), 2),
            "sequence_gaps": int(np.sum(steps != 1)),
        }

    async def receive_early(self, answered: asyncio.Event) -> None:
        """Before the answer: play out what the callee sends (a queue announcement, a
        ringback tone) on the ptime clock, sending nothing."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        tick = 0
        while not answered.is_set():
            tick += 1
            await asyncio.sleep(max(0.0, start + tick * self.period - loop.time()))
            popped = self.jitter.pop(loop.time())
            if isinstance(popped, bytes):
                with contextlib.suppress(ValueError):
                    self.early.append(self.plc.good(self.decoder.decode(popped)))
                    continue
            self.early.append(np.zeros(self.samples, np.int16))

    async def run(self, seconds: float, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        self.started_at = time.time()
        silence = np.zeros(self.samples, np.int16)
        total = int(round(seconds / self.period))
        for tick in range(total):
            if stop.is_set():
                break
            delay = start + tick * self.period - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            offset = tick * self.samples
            chunk = self.audio[offset : offset + self.samples]
            if len(chunk) < self.samples:
                chunk = np.concatenate((chunk, silence[: self.samples - len(chunk)]))
            self.rtp.send(self.encoder.encode(chunk))
            self.sent.append(chunk)
            popped = self.jitter.pop(loop.time())
            if isinstance(popped, bytes):
                try:
                    self.received.append(self.plc.good(self.decoder.decode(popped)))
                except ValueError:  # a payload the codec rejects: concealed like a lost one
                    self.received.append(self.plc.conceal(self.samples))
            elif popped is CONCEAL:
                self.received.append(self.plc.conceal(self.samples))
            else:
                self.received.append(silence)
            self.dtmf.poll(loop.time())
            self.ticks += 1


class Unanswered(Exception):
    """Nothing answered the INVITE: no SIP response at all within ``--response-seconds``."""


async def fetch_transcript(
    api: str, token: str | None, call_id: str, *, guessed: bool = False
) -> tuple[dict[str, tp.Any] | None, str]:
    """The call's transcript from the gateway's API, or None and why not (one line)."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = f"{api.rstrip('/')}/v1/calls/{call_id}/transcript"
    status = 0
    async with httpx.AsyncClient(timeout=5) as client:
        for _ in range(20):
            try:
                response = await client.get(url, headers=headers)
            except httpx.HTTPError as exc:
                hint = " (pass --api: the gateway's API base URL)" if guessed else ""
                return None, f"the gateway's API at {api} is unreachable: {exc or type(exc).__name__}{hint}"
            status = response.status_code
            if status == 200:
                return response.json(), ""
            if status == 401 and token:
                return None, f"the API at {api} refused the token: invalid token"
            if status == 401:
                return None, (
                    f"the API at {api} needs a token: pass --api-token (or MOSHIMOSHI_API_TOKEN; "
                    "moshimoshi serve prints one at start)"
                )
            if status == 403:
                return None, f"the API at {api} refused the token: it may not read transcripts"
            await asyncio.sleep(0.25)  # 404: the gateway may not have written the call yet
    return None, f"the API at {api} has no transcript of call {call_id} (HTTP {status})"


async def invite_or_give_up(
    ua: UserAgent,
    target: SipUri,
    offer: str,
    settings: CallSettings,
    *,
    on_provisional: tp.Callable[[Response], None] | None = None,
) -> Dialog:
    """The answered call; Unanswered when no SIP response at all came within
    ``--response-seconds`` (nothing listens there: no need to wait out the 32 s of Timer B).
    ``on_provisional`` sees each provisional response (early media)."""
    responded = asyncio.Event()

    def provisional(response: Response) -> None:
        responded.set()
        if on_provisional is not None:
            on_provisional(response)

    invite = asyncio.create_task(
        ua.invite(target, offer, username=settings.username, password=settings.password, on_provisional=provisional)
    )
    heard = asyncio.create_task(responded.wait())
    try:
        await asyncio.wait({invite, heard}, timeout=settings.response_seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        heard.cancel()
    if not invite.done() and not responded.is_set():
        invite.cancel()
        await asyncio.gather(invite, return_exceptions=True)
        transport = target.wire_transport or "UDP"
        raise Unanswered(
            f"nothing answered at {format_host(target.host)}:{target.port_for(transport)} over "
            f"{transport} within {settings.response_seconds:g} s: is a gateway running there?"
        )
    return await invite


def local_host_for_target(local_host: str, target_host: str) -> str:
    """Where to bind: ``local_host``, except that the IPv4 wildcard (the default) becomes
    the dual-stack ``::`` when the target is an IPv6 address, which it could not reach."""
    host = target_host.strip("[]")
    if local_host == "0.0.0.0" and ":" in host and is_ip(host):
        return "::"
    return local_host


async def place_call(settings: CallSettings) -> dict:
    """Run the call; returns its summary (also written next to the recording)."""
    target = SipUri.parse(settings.uri, "URI")
    if settings.transport in ("tcp", "tls") and not target.wire_transport:
        target = target.with_params(transport=settings.transport)
    secure_signalling = target.wire_transport == "TLS"
    if settings.srtp and not secure_signalling:
        print("moshimoshi call: warning: --srtp without TLS: the SRTP keys travel in clear text", file=sys.stderr)
    tls = (
        client_context(
            settings.tls_ca, verify=not settings.tls_insecure, cert_file=settings.tls_cert, key_file=settings.tls_key
        )
        if secure_signalling
        else None
    )
    local_host = local_host_for_target(settings.local_host, target.host)
    ua = UserAgent(
        local_host, settings.local_port, user_agent="moshimoshi-call", tls_client_context=tls, user=settings.caller
    )
    await ua.start()
    rtp: RtpSession | None = None
    try:
        target_ip = await ua.transport.resolve(target.host)
        local_ip = ua.transport.local_host_for(target_ip)
        ports = PortAllocator(settings.rtp_port_min, settings.rtp_port_max)
        rtp = await RtpSession.open(
            ports, host=local_host if local_host not in ("0.0.0.0", "::") else ("::" if ":" in local_ip else "0.0.0.0")
        )
        first = codecs.spec(settings.codec).name
        offered = [first] + [c for c in ("PCMU", "PCMA") if c != first]
        prefs = MediaPreferences(codecs=offered, ptime=settings.ptime, srtp="required" if settings.srtp else "off")
        offer = build_offer(prefs, local_ip, rtp.local_port)
        quiet_gc()  # before the call: a collection pause during it would be a glitch in the recording
        started = time.time()
        early = EarlyMedia(rtp, offer, target_ip)
        try:
            dialog = await invite_or_give_up(ua, target, str(offer), settings, on_provisional=early.on_provisional)
        finally:
            early.answered.set()
        answered = time.time()
        media = dialog.media
        if media is None or media.remote_address is None:
            await dialog.bye()
            raise CallFailed(488, "the answer has no usable audio stream")
        rate = codecs.spec(media.codec).sample_rate
        audio = (await asyncio.to_thread(read_wav, settings.play, rate)) if settings.play else np.zeros(0, np.int16)
        if early.call is not None and early.media == media:
            call = early.call  # the same stream goes on
            await early.stop()
            call.audio = audio
        else:
            await early.stop()
            _start_rtp(rtp, media, target_ip)
            call = TestCall(rtp, media, audio)
        stop = asyncio.Event()
        dialog.terminated.add_done_callback(lambda _f: stop.set())
        tasks = [asyncio.create_task(call.run(settings.seconds, stop))]
        if settings.dtmf and media.dtmf_payload_type is not None:
            tasks.append(
                asyncio.create_task(_send_digits(rtp, settings.dtmf, media.dtmf_payload_type, media.dtmf_clock_rate))
            )
        await tasks[0]
        for task in tasks[1:]:
            task.cancel()
        ended_by = "remote-bye" if dialog.is_terminated else "local-bye"
        if not dialog.is_terminated:
            with contextlib.suppress(SipError, OSError):
                await dialog.bye()
        stats = rtp.stats()
        response = getattr(dialog, "answer_response", None)
        gateway_call_id = response.headers.get(CALL_ID_HEADER) if response is not None else None
        received = np.concatenate(call.received) if call.received else np.zeros(0, np.int16)
        summary = {
            "uri": settings.uri,
            "codec": media.codec,
            "sample_rate": call.rate,
            "ptime_ms": media.ptime,
            "answer_seconds": round(answered - started, 3),
            "call_seconds": round(call.ticks * call.period, 2),
            "recording_started_at": call.started_at,
            "ended_by": ended_by,
            "gateway_call_id": gateway_call_id,
            "local_rtp_port": rtp.local_port,
            "packets_sent": stats.packets_sent,
            "packets_received": stats.packets_received,
            "packets_lost": max(0, stats.packets_lost),
            "jitter_ms": round(stats.jitter_ms, 2),
            "rtt_ms": stats.rtt_ms,
            "frames_concealed": call.jitter.frames_concealed,
            "sip_transport": dialog.flow.transport,
            "media_encryption": "SDES-SRTP" if media.srtp is not None else "none",
            "srtp_suite": media.srtp.suite if media.srtp is not None else None,
            "packets_srtp_replayed": stats.packets_srtp_replayed,
            "packets_srtp_auth_failed": stats.packets_srtp_auth_failed,
            "received_rms": float(np.sqrt(np.mean(received.astype(np.float64) ** 2))) if len(received) else 0.0,
            "dtmf_received": [d.digit for d in call.digits],
            "arrivals": call.arrival_stats(),
            "early_media_seconds": round(len(call.early) * call.period, 2) if early.call is call else 0.0,
            "first_provisional_seconds": (round(early.first_at - started, 3) if early.first_at is not None else None),
        }
        if settings.record:
            sent = np.concatenate(call.sent) if call.sent else np.zeros(0, np.int16)
            await asyncio.to_thread(write_stereo_wav, settings.record, sent, received, call.rate)
            summary["recording"] = settings.record
            if call.early and early.call is call:
                early_path = str(Path(settings.record).with_name(Path(settings.record).stem + "-early.wav"))
                heard = np.concatenate(call.early)
                await asyncio.to_thread(write_stereo_wav, early_path, np.zeros(len(heard), np.int16), heard, call.rate)
                summary["early_media_recording"] = early_path
        transcript_path = settings.transcript or (
            str(Path(settings.record).with_suffix(".txt")) if settings.record else None
        )
        if transcript_path:
            await write_transcript(settings, transcript_path, target, gateway_call_id, summary)
        return summary
    finally:
        if rtp is not None:
            rtp.close()
        await ua.stop()


async def write_transcript(
    settings: CallSettings, path: str, target: SipUri, call_id: str | None, summary: dict[str, tp.Any]
) -> None:
    """The transcript file, written whatever happens: both sides' words and DTMF from the
    gateway's API, or one line saying why there are none (also said on stderr)."""
    if call_id is None:
        transcript, problem = None, "the callee named no call id (X-Moshimoshi-Call-Id): not a moshimoshi gateway"
    else:
        api = settings.api or f"http://{format_host(target.host)}:8080"
        transcript, problem = await fetch_transcript(api, settings.api_token, call_id, guessed=settings.api is None)
    text = format_transcript(transcript) if transcript is not None else f"# no transcript: {problem}\n"
    await asyncio.to_thread(Path(path).write_text, text, encoding="utf-8")
    summary["transcript"] = path
    if transcript is not None:
        summary["transcript_events"] = len(transcript.get("events", []))
    else:
        summary["transcript_problem"] = problem
        print(f"moshimoshi call: no transcript: {problem}", file=sys.stderr)


def _start_rtp(rtp: RtpSession, media: NegotiatedMedia, target_ip: str) -> None:
    rtp.set_format(media.payload_type, media.clock_rate, media.ptime)
    rtp.set_srtp(media.srtp)
    if media.remote_address is not None:
        rtp.update_remote(media.remote_address, media.remote_port, media.remote_rtcp_port)
    rtp.trust_ip(target_ip)


class EarlyMedia:
    """Early media (RFC 3960): a provisional response with an SDP answer (a 183 Session
    Progress) starts receiving what the callee plays before it answers; the 200's answer
    normally repeats it and the same stream goes on."""

    def __init__(self, rtp: RtpSession, offer: SessionDescription, target_ip: str) -> None:
        self.rtp = rtp
        self.offer = offer
        self.target_ip = target_ip
        self.answered = asyncio.Event()
        self.first_at: float | None = None
        self.media: NegotiatedMedia | None = None
        self.call: TestCall | None = None
        self._task: asyncio.Task[None] | None = None

    def on_provisional(self, response: Response) -> None:
        if self.first_at is None and response.status > 100:
            self.first_at = time.time()
        if self.call is not None or not response.body or response.content_type != "application/sdp":
            return
        try:
            media = negotiated_from_answer(self.offer, SessionDescription.parse(response.body))
        except SdpError as exc:
            log.warning("early media: unusable SDP in %d: %s", response.status, exc)
            return
        if media.remote_address is None:
            return
        self.media = media
        _start_rtp(self.rtp, media, self.target_ip)
        self.call = TestCall(self.rtp, media, np.zeros(0, np.int16))
        self._task = asyncio.get_running_loop().create_task(self.call.receive_early(self.answered))

    async def stop(self) -> None:
        self.answered.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)


def format_transcript(transcript: dict[str, tp.Any]) -> str:
    """Both sides' pieces in time order (the caller's words come once their utterance ended,
    so arrival order is not time order)."""
    lines = []
    labels = {"dtmf": "DTMF", "caller": "caller", "note": "note", "transfer": "transfer"}
    for event in sorted(transcript.get("events", []), key=lambda e: (e.get("t", 0), e.get("seq", 0))):
        who = labels.get(event.get("kind"), "agent")
        lines.append(f"[{event.get('t', 0):8.2f}] {who}: {event.get('text', '')}")
    return "\n".join(lines) + ("\n" if lines else "")


async def _send_digits(rtp: RtpSession, digits: str, payload_type: int, clock_rate: int) -> None:
    await asyncio.sleep(DTMF_AT_SECONDS)
    sender = DtmfSender(clock_rate)
    for digit in digits:
        await rtp.send_dtmf(digit, 120.0, payload_type=payload_type, sender=sender)
        await asyncio.sleep(0.1)


def run_call(settings: CallSettings) -> int:
    try:
        summary = realtime.run(place_call(settings))
    except CallFailed as exc:
        print(f"moshimoshi call: {exc.status} {exc.reason}", file=sys.stderr)
        return 1
    except Unanswered as exc:
        print(f"moshimoshi call: {exc}", file=sys.stderr)
        return 1
    except (SipParseError, ValueError, OSError) as exc:
        print(f"moshimoshi call: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, ensure_ascii=False))
    return 0
