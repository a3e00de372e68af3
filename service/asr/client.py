"""The gateway's side of the callers' transcript: stream a call's audio to an ASR worker
(PROTOCOL.md in this folder), which cuts it into utterances and transcribes them; deliver
the text.

``CallerTranscriber`` is one call's: ``feed(chunk, t)`` from the media path (it resamples
to 16 kHz and queues; it never waits on the network), ``close()`` when the call ends. A
task of its own owns the WebSocket to an ASR worker that ``AsrWorkerFinder`` picks from the
pool (role ``asr``, ready, the most free sessions). Events reach ``on_event``:

- ``CallerEvent("caller", start, end, text)``: what the caller said, times on the call clock;
- ``CallerEvent("caller-note", t, t, text)``: the caller's side became unavailable (no ASR
  worker, or it died or failed an utterance), or is back. The call is never affected.

The audio sent is kept until the worker says it is settled (answered, or silence), at most
``RETAIN_SECONDS``: when the worker dies mid-call, the next worker the finder gives gets
that audio again, so an utterance in progress is not lost (a repeat of one already
delivered is dropped), and later audio goes there too. With no worker, audio older than
``RETAIN_SECONDS`` is dropped and counted
(``moshimoshi_gateway_caller_audio_lost_seconds_total``), and one note says so until a
worker takes the call again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
import typing as tp
from dataclasses import dataclass

import numpy as np
import websockets
from prometheus_client import Counter, Histogram
from websockets.asyncio.client import ClientConnection, connect

from service.asr.segmenter import to_float
from service.wire import authorization

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 2
SESSION_PATH = "/v1/asr"
SAMPLE_RATE = 16000
HANDSHAKE_SECONDS = 5.0
FINDER_CACHE_SECONDS = 1.0
RETAIN_SECONDS = 30.0  # audio kept for a resend to another worker (an utterance is at most 20 s)
MESSAGE_SECONDS = 0.1  # audio is sent in messages of this much (the last one of a call shorter)
GAP_SECONDS = 0.1  # a chunk later than the audio before it by more than this starts after a gap
RETRY_SECONDS = 1.0  # with no ASR worker, look again this often
FAILED_WORKER_SECONDS = 5.0  # a worker that failed this call is not picked again for this long
UNAVAILABLE = "caller transcript unavailable"
RESUMED = "caller transcript resumed"

UTTERANCES = Counter(
    "moshimoshi_gateway_caller_utterances_total",
    "Callers' utterances by outcome: transcribed, failed (the ASR worker could not)",
    ["outcome"],
)
AUDIO_LOST = Counter(
    "moshimoshi_gateway_caller_audio_lost_seconds_total",
    "Callers' audio no ASR worker heard (none up, or lost before it settled)",
)
TEXT_DELAY = Histogram(
    "moshimoshi_gateway_caller_text_delay_seconds",
    "From the end of a caller's speech to its text at the gateway (includes the VAD's silence that ends an utterance)",
    buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0),
)
ASR_SESSIONS = Counter(
    "moshimoshi_gateway_asr_sessions_total",
    "Sessions opened to ASR workers, by outcome (opened, refused, unreachable, lost)",
    ["outcome"],
)


@dataclass
class CallerEvent:
    """A line of the caller's side of the transcript."""

    kind: str  # "caller" or "caller-note"
    start: float  # seconds since the call was answered
    end: float
    text: str

    def to_dict(self) -> dict[str, tp.Any]:
        return {"kind": self.kind, "start": round(self.start, 3), "end": round(self.end, 3), "text": self.text}


class WorkerPicker(tp.Protocol):
    async def pick(self, exclude: tp.Collection[str] = ()) -> tuple[str, str] | None: ...


class AsrWorkerFinder:
    """Picks an ASR worker: from the pool registry, or one fixed URL (no pool).

    The registry is read at most once a second per finder (shared by a gateway's calls)."""

    def __init__(self, registry: tp.Any | None = None, *, url: str | None = None, secret: str | None = None) -> None:
        if (registry is None) == (url is None):
            raise ValueError("give a registry or a url")
        self.registry = registry
        self.url = url
        self.headers = authorization(secret)  # the workers' shared secret (PROTOCOL.md)
        self._cache: list[tuple[int, str, str]] = []
        self._read_at = -FINDER_CACHE_SECONDS
        self._lock = asyncio.Lock()

    async def _candidates(self) -> list[tuple[int, str, str]]:
        from service.pool import ASR_ROLE, READY, PoolError

        async with self._lock:
            if time.monotonic() - self._read_at < FINDER_CACHE_SECONDS:
                return self._cache
            assert self.registry is not None  # asked only without a fixed URL
            try:
                workers = await self.registry.workers()
            except PoolError as exc:
                log.warning("cannot list ASR workers: %s", exc)
                workers = []
            self._cache = sorted(
                (-(w.reported_free or 0), w.worker_id, w.url)
                for w in workers
                if w.alive and w.role == ASR_ROLE and w.state == READY and w.url
            )
            self._read_at = time.monotonic()
            return self._cache

    async def pick(self, exclude: tp.Collection[str] = ()) -> tuple[str, str] | None:
        """(worker id, ws URL) of the ASR worker with the most free sessions, or None."""
        if self.url is not None:
            return None if self.url in exclude else (self.url, self.url)
        for _, worker_id, url in await self._candidates():
            if worker_id not in exclude:
                return worker_id, url
        return None

    def forget(self) -> None:
        """Read the registry again on the next pick (a worker just failed)."""
        self._read_at = -FINDER_CACHE_SECONDS


@dataclass
class _Chunk:
    t: float  # call time of the first sample
    pcm: bytes  # PCM16 at 16 kHz

    @property
    def end(self) -> float:
        return self.t + len(self.pcm) / 2 / SAMPLE_RATE


class _Lost(Exception):
    """The session to the ASR worker is gone."""


class CallerTranscriber:
    """One call's caller transcript, on an ASR worker (see the module docstring)."""

    def __init__(
        self,
        call_id: str,
        finder: WorkerPicker,
        on_event: tp.Callable[[CallerEvent], None],
        *,
        rate: int = SAMPLE_RATE,
        clock: tp.Callable[[], float] | None = None,
    ) -> None:
        if rate < 8000 or rate > 192000:
            raise ValueError(f"unsupported sample rate {rate}")
        self.call_id = call_id
        self.finder = finder
        self.on_event = on_event
        self.rate = rate
        self.clock = clock  # the call clock now (seconds since answer), for the text delay
        self._resampler: tp.Any = None
        if rate != SAMPLE_RATE:
            import soxr

            self._resampler = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        self.worker_id: str | None = None
        self.transcribed = 0
        self.failed = 0
        self.lost_seconds = 0.0
        self.sessions = 0
        self.text_delays: collections.deque[float] = collections.deque(maxlen=1000)
        self._in_t: float | None = None  # call time the next input sample is expected at
        self._out_t = 0.0  # call time of the first sample in ``_building``
        self._building: list[np.ndarray] = []  # 16 kHz float audio not yet in a message
        self._building_samples = 0
        self._audio: collections.deque[_Chunk] = collections.deque()  # unsettled audio, oldest first
        self._sent = 0  # chunks at the head of ``_audio`` sent in this session
        self._wake = asyncio.Event()
        self._closing = False
        self._available: bool | None = None  # None until a worker was first looked for
        self._delivered_end = -1.0  # end of the last caller event delivered
        self._failed_workers: dict[str, float] = {}  # worker id -> when it failed this call
        self._task = asyncio.create_task(self._run(), name=f"caller-asr-{call_id}")

    # -- media side (never blocks) -----------------------------------------------------

    def feed(self, chunk: bytes | np.ndarray, t: float) -> None:
        """Caller audio (PCM16 or float at ``rate``) whose first sample is at call time ``t``
        (seconds since answer)."""
        if self._closing:
            return
        samples = to_float(chunk)
        if not len(samples):
            return
        expected = self._in_t
        if expected is None or t - expected > GAP_SECONDS:
            self._cut()  # a new stretch (the first, or after a gap): its own clock
            self._out_t = t
        self._in_t = (t if expected is None or t - expected > GAP_SECONDS else expected) + len(samples) / self.rate
        out = samples if self._resampler is None else self._resampler.resample_chunk(samples)
        if len(out):
            self._building.append(out)
            self._building_samples += len(out)
        if self._building_samples >= MESSAGE_SECONDS * SAMPLE_RATE:
            self._cut()

    def _cut(self) -> None:
        """The audio gathered so far becomes one message."""
        if not self._building_samples:
            return
        audio = np.concatenate(self._building) if len(self._building) > 1 else self._building[0]
        pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
        self._audio.append(_Chunk(self._out_t, pcm))
        self._out_t += len(audio) / SAMPLE_RATE
        self._building, self._building_samples = [], 0
        self._trim()
        self._wake.set()

    def _trim(self) -> None:
        """Keep at most ``RETAIN_SECONDS`` of unsettled audio; what falls off unsent is lost."""
        audio = self._audio
        while audio and audio[-1].end - audio[0].t > RETAIN_SECONDS:
            chunk = audio.popleft()
            if self._sent:
                self._sent -= 1
            else:
                self._lose(len(chunk.pcm) / 2 / SAMPLE_RATE)

    def _lose(self, seconds: float) -> None:
        self.lost_seconds += seconds
        AUDIO_LOST.inc(seconds)

    async def close(self, timeout: float = 10.0) -> None:
        """The call ended: transcribe what is left (for up to ``timeout``), then stop."""
        if self._closing:
            return
        self._cut()
        self._closing = True
        self._wake.set()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._task)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        unsent = sum(len(c.pcm) for c in list(self._audio)[self._sent :]) / 2 / SAMPLE_RATE
        if unsent:
            self._lose(unsent)
        self._audio.clear()
        self._sent = 0

    # -- events ------------------------------------------------------------------------

    def _emit(self, event: CallerEvent) -> None:
        try:
            self.on_event(event)
        except Exception:
            log.exception("call %s: caller transcript callback failed", self.call_id)

    def _set_available(self, available: bool, t: float, why: str = "") -> None:
        if self._available is available or (self._available is None and available):
            self._available = available
            return
        self._available = available
        self._emit(CallerEvent("caller-note", t, t, RESUMED if available else f"{UNAVAILABLE} ({why})"))

    def _now(self) -> float:
        """The latest call time this transcriber has audio for."""
        return self._in_t if self._in_t is not None else 0.0

    def _first_unsent(self) -> float:
        return self._audio[self._sent].t if self._sent < len(self._audio) else self._now()

    # -- the session -------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            while self._sent >= len(self._audio) and not self._closing:
                self._wake.clear()
                await self._wake.wait()
            if self._closing and not self._audio:
                return  # closing, nothing left
            now = time.monotonic()
            self._failed_workers = {w: at for w, at in self._failed_workers.items() if now - at < FAILED_WORKER_SECONDS}
            target = await self.finder.pick(self._failed_workers)
            if target is None:
                self._set_available(False, self._first_unsent(), "no ASR worker")
                if self._closing:
                    return
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RETRY_SECONDS):
                        while not self._closing:
                            self._wake.clear()
                            await self._wake.wait()
                continue
            try:
                await self._session(*target)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not stop this call's transcript for good
                log.exception("call %s: ASR session with %s failed", self.call_id, target[0])
                self._failed_workers[target[0]] = time.monotonic()
                self._sent = 0

    async def _session(self, worker_id: str, url: str) -> None:
        """One WebSocket to one worker, until the call's audio is done or it is lost."""
        ws_url = url.rstrip("/") + SESSION_PATH if not url.endswith(SESSION_PATH) else url
        try:
            ws = await self._open(ws_url)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # unreachable, not a WebSocket, refused, or a reply that is not ours
            ASR_SESSIONS.labels("refused" if isinstance(exc, _Lost) else "unreachable").inc()
            log.warning("call %s: ASR worker %s unusable: %s", self.call_id, worker_id, exc)
            self._failed_workers[worker_id] = time.monotonic()
            self._set_available(False, self._first_unsent(), "ASR worker unusable")
            self._forget()
            return
        ASR_SESSIONS.labels("opened").inc()
        self.sessions += 1
        self.worker_id = worker_id
        self._sent = 0  # a new worker hears every unsettled chunk
        self._set_available(True, self._first_unsent())
        reader = asyncio.create_task(self._read(ws))
        try:
            if await self._write(ws, reader):
                await reader  # the worker answers what it has, then closes
                self._audio.clear()
                self._sent = 0
        except _Lost as exc:
            ASR_SESSIONS.labels("lost").inc()
            log.warning("call %s: lost ASR worker %s: %s", self.call_id, worker_id, exc)
            self._failed_workers[worker_id] = time.monotonic()
            self._set_available(False, self._now(), "ASR worker lost")
            self._forget()
            self._sent = 0
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, _Lost):
                await reader
            with contextlib.suppress(Exception):
                await ws.close()
            self.worker_id = None

    def _forget(self) -> None:
        forget = getattr(self.finder, "forget", None)
        if forget is not None:
            forget()

    async def _open(self, url: str) -> ClientConnection:
        async with asyncio.timeout(HANDSHAKE_SECONDS):
            ws = await connect(
                url,
                max_size=2**16,
                compression=None,
                open_timeout=HANDSHAKE_SECONDS,
                ping_interval=5,
                ping_timeout=5,
                additional_headers=getattr(self.finder, "headers", None),
            )
            try:
                await ws.send(json.dumps({"type": "start", "version": PROTOCOL_VERSION, "call_id": self.call_id}))
                answer = await ws.recv()
                try:
                    reply = json.loads(answer)
                except ValueError:
                    raise _Lost(f"not an ASR worker: it answered {str(answer)[:60]!r}") from None
            except BaseException:
                await ws.close()
                raise
        if not isinstance(reply, dict) or reply.get("type") != "started":
            await ws.close()
            raise _Lost(f"refused: {str(reply)[:120]}")
        return ws

    async def _write(self, ws: ClientConnection, reader: asyncio.Task) -> bool:
        """Send the audio not sent yet until closing (then ``end``: True) or the socket is lost."""
        while True:
            while self._sent < len(self._audio):
                chunk = self._audio[self._sent]
                self._sent += 1
                try:
                    await ws.send(np.float64(chunk.t).astype("<f8").tobytes() + chunk.pcm)
                except websockets.ConnectionClosed as exc:
                    raise _Lost(f"closed while sending: {exc}") from None
            if self._closing:
                try:
                    await ws.send(json.dumps({"type": "end"}))
                except websockets.ConnectionClosed as exc:
                    raise _Lost(f"closed while ending: {exc}") from None
                return True
            self._wake.clear()
            wake = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({wake, reader}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                wake.cancel()
            if reader.done():
                reader.result()  # raises _Lost
                raise _Lost("the ASR worker closed the session")

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for message in ws:
                if isinstance(message, str):
                    self._on_message(message)
        except websockets.ConnectionClosed as exc:
            if not (self._closing and exc.rcvd is not None and exc.rcvd.code == 1000):
                raise _Lost(f"closed: {exc}") from None
            return
        if not self._closing:
            raise _Lost("closed before the call ended")

    def _on_message(self, text: str) -> None:
        try:
            message = json.loads(text)
            kind = message["type"]
        except (ValueError, KeyError, TypeError):
            log.warning("call %s: unreadable message from the ASR worker", self.call_id)
            return
        if kind == "error":
            log.warning("call %s: ASR worker error %s", self.call_id, str(message.get("message", ""))[:200])
            return
        if kind == "settled":
            self._settle(message.get("t"))
            return
        if kind not in ("caller", "failed"):
            return
        start, end = message.get("start"), message.get("end")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v) for v in (start, end)):
            log.warning("call %s: an ASR event without valid times", self.call_id)
            return
        if start < self._delivered_end:
            return  # a repeat, from audio resent after a worker was lost
        if kind == "failed":
            self.failed += 1
            UTTERANCES.labels("failed").inc()
            self._set_available(False, start, str(message.get("reason", "failed"))[:100])
            return
        self.transcribed += 1
        UTTERANCES.labels("transcribed").inc()
        self._delivered_end = end
        if self.clock is not None:
            delay = self.clock() - end
            TEXT_DELAY.observe(max(0.0, delay))
            self.text_delays.append(delay)
        self._set_available(True, start)
        text_value = message.get("text")
        if isinstance(text_value, str) and text_value:
            self._emit(CallerEvent("caller", float(start), float(end), text_value))

    def _settle(self, t: tp.Any) -> None:
        """The worker needs no audio before ``t`` any more (sent chunks only are dropped)."""
        if not isinstance(t, int | float) or isinstance(t, bool):
            return
        while self._sent and self._audio and self._audio[0].end <= t:
            self._audio.popleft()
            self._sent -= 1
