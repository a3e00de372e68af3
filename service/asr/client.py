"""The gateway's side of the callers' transcript: segment a call's audio, transcribe it on
an ASR worker (PROTOCOL.md in this folder), deliver the text.

``CallerTranscriber`` is one call's: ``feed(chunk, t)`` from the media path (it only runs
the VAD and queues; it never waits on the network), ``close()`` when the call ends. A task
of its own owns the WebSocket to an ASR worker that ``AsrWorkerFinder`` picks from the pool
(role ``asr``, ready, the most free sessions). Events reach ``on_event``:

- ``CallerEvent("caller", start, end, text)``: what the caller said, times on the call clock;
- ``CallerEvent("caller-note", t, t, text)``: the caller's side became unavailable (no ASR
  worker, or it died or failed an utterance), or is back. The call is never affected.

When the worker dies mid-call, the utterances it had not answered are sent once more to the
next worker the finder gives; later utterances go there too. With no worker, utterances are
counted lost (``moshimoshi_gateway_caller_utterances_total{outcome="lost"}``) and one note
says so until a worker answers again.
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

from service.asr.segmenter import SegmenterConfig, Utterance, UtteranceSegmenter
from service.asr.vad import SileroVad
from service.wire import authorization

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
SESSION_PATH = "/v1/asr"
HANDSHAKE_SECONDS = 5.0
FINDER_CACHE_SECONDS = 1.0
MAX_QUEUED_UTTERANCES = 32  # per call; beyond that the oldest are lost (counted)
FAILED_WORKER_SECONDS = 5.0  # a worker that failed this call is not picked again for this long
UNAVAILABLE = "caller transcript unavailable"
RESUMED = "caller transcript resumed"

UTTERANCES = Counter("moshimoshi_gateway_caller_utterances_total",
                     "Callers' utterances by outcome: transcribed, failed (the ASR worker could not), "
                     "lost (no ASR worker, or the queue overflowed)", ["outcome"])
TEXT_DELAY = Histogram("moshimoshi_gateway_caller_text_delay_seconds",
                       "From the end of a caller's utterance (as the VAD saw it end) to its text",
                       buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0))
ASR_SESSIONS = Counter("moshimoshi_gateway_asr_sessions_total",
                       "Sessions opened to ASR workers, by outcome (opened, refused, unreachable, lost)",
                       ["outcome"])


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

    def __init__(self, registry: tp.Any | None = None, *, url: str | None = None,
                 secret: str | None = None) -> None:
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
            self._cache = sorted((-(w.reported_free or 0), w.worker_id, w.url) for w in workers
                                 if w.alive and w.role == ASR_ROLE and w.state == READY and w.url)
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
class _Pending:
    id: int
    utterance: Utterance
    retried: bool = False
    queued_at: float = 0.0  # monotonic time the segmenter gave the utterance


class _Lost(Exception):
    """The session to the ASR worker is gone."""


class CallerTranscriber:
    """One call's caller transcript: VAD segmentation here, ASR on a worker."""

    def __init__(self, call_id: str, finder: WorkerPicker, on_event: tp.Callable[[CallerEvent], None], *,
                 rate: int, config: SegmenterConfig | None = None, vad: SileroVad | None = None) -> None:
        self.call_id = call_id
        self.finder = finder
        self.on_event = on_event
        self.segmenter = UtteranceSegmenter(rate, config, vad)
        self.worker_id: str | None = None
        self.transcribed = 0
        self.failed = 0
        self.lost = 0
        self.sessions = 0
        self.text_delays: collections.deque[float] = collections.deque(maxlen=1000)
        self._queue: collections.deque[_Pending] = collections.deque()
        self._wake = asyncio.Event()
        self._in_flight: dict[int, _Pending] = {}
        self._ids = 0
        self._closing = False
        self._available: bool | None = None  # None until the first utterance
        self._failed_workers: dict[str, float] = {}  # worker id -> when it failed this call
        self._task = asyncio.create_task(self._run(), name=f"caller-asr-{call_id}")

    # -- media side (never blocks) -----------------------------------------------------

    def feed(self, chunk: bytes | np.ndarray, t: float) -> None:
        """Caller audio whose first sample is at call time ``t`` (seconds since answer)."""
        if self._closing:
            return
        for utterance in self.segmenter.feed(chunk, t):
            self._enqueue(utterance)

    def _enqueue(self, utterance: Utterance) -> None:
        self._ids += 1
        self._queue.append(_Pending(self._ids, utterance, queued_at=time.monotonic()))
        while len(self._queue) > MAX_QUEUED_UTTERANCES:
            self._lose(self._queue.popleft(), "the ASR queue overflowed")
        self._wake.set()

    async def close(self, timeout: float = 10.0) -> None:
        """The call ended: transcribe what is left (for up to ``timeout``), then stop."""
        if self._closing:
            return
        for utterance in self.segmenter.flush():
            self._enqueue(utterance)
        self._closing = True
        self._wake.set()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._task)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for pending in [*self._in_flight.values(), *self._queue]:
            self._lose(pending, "the call ended before its text came")
        self._in_flight.clear()
        self._queue.clear()

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

    def _lose(self, pending: _Pending, why: str) -> None:
        self.lost += 1
        UTTERANCES.labels("lost").inc()
        self._set_available(False, pending.utterance.start, why)

    # -- the session -------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            while not self._queue and not self._closing:
                self._wake.clear()
                await self._wake.wait()
            if not self._queue and not self._in_flight:
                return  # closing, nothing left
            now = time.monotonic()
            self._failed_workers = {w: at for w, at in self._failed_workers.items()
                                    if now - at < FAILED_WORKER_SECONDS}
            target = await self.finder.pick(self._failed_workers)
            if target is None:
                while self._queue:
                    self._lose(self._queue.popleft(), "no ASR worker")
                if self._closing:
                    return
                continue
            try:
                await self._session(*target)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not stop this call's transcript for good
                log.exception("call %s: ASR session with %s failed", self.call_id, target[0])
                self._failed_workers[target[0]] = time.monotonic()
                self._requeue_in_flight()

    async def _session(self, worker_id: str, url: str) -> None:
        """One WebSocket to one worker, until the call's utterances are done or it is lost."""
        ws_url = url.rstrip("/") + SESSION_PATH if not url.endswith(SESSION_PATH) else url
        try:
            ws = await self._open(ws_url)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # unreachable, not a WebSocket, refused, or a reply that is not ours
            ASR_SESSIONS.labels("refused" if isinstance(exc, _Lost) else "unreachable").inc()
            log.warning("call %s: ASR worker %s unusable: %s", self.call_id, worker_id, exc)
            self._failed_workers[worker_id] = time.monotonic()
            self._forget()
            return
        ASR_SESSIONS.labels("opened").inc()
        self.sessions += 1
        self.worker_id = worker_id
        reader = asyncio.create_task(self._read(ws))
        try:
            ended = await self._write(ws, reader)
            if ended:
                await reader  # the worker answers what is in flight, then closes
        except _Lost as exc:
            ASR_SESSIONS.labels("lost").inc()
            log.warning("call %s: lost ASR worker %s: %s", self.call_id, worker_id, exc)
            self._failed_workers[worker_id] = time.monotonic()
            self._forget()
            self._requeue_in_flight()
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
            ws = await connect(url, max_size=2**16, compression=None, open_timeout=HANDSHAKE_SECONDS,
                               ping_interval=5, ping_timeout=5,
                               additional_headers=getattr(self.finder, "headers", None))
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
        """Send queued utterances until closing (then ``end``: True) or the socket is lost."""
        while True:
            while self._queue:
                pending = self._queue.popleft()
                self._in_flight[pending.id] = pending
                utterance = pending.utterance
                try:
                    await ws.send(json.dumps({"type": "utterance", "id": pending.id, "start": utterance.start,
                                              "end": utterance.end}))
                    await ws.send(utterance.pcm)
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
            if not (self._closing and not self._in_flight and exc.rcvd is not None and exc.rcvd.code == 1000):
                raise _Lost(f"closed: {exc}") from None
            return
        if self._in_flight or not self._closing:
            raise _Lost(f"closed with {len(self._in_flight)} utterances unanswered")

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
        if kind not in ("caller", "failed"):
            return
        pending = self._in_flight.pop(message.get("id"), None)
        if pending is None:
            return
        utterance = pending.utterance
        if kind == "failed":
            self.failed += 1
            UTTERANCES.labels("failed").inc()
            self._set_available(False, utterance.start, str(message.get("reason", "failed"))[:100])
            return
        self.transcribed += 1
        UTTERANCES.labels("transcribed").inc()
        delay = time.monotonic() - pending.queued_at
        TEXT_DELAY.observe(delay)
        self.text_delays.append(delay)
        self._set_available(True, utterance.start)
        text_value = message.get("text")
        if isinstance(text_value, str) and text_value:
            self._emit(CallerEvent("caller", utterance.start, utterance.end, text_value))

    def _requeue_in_flight(self) -> None:
        """Utterances the lost worker never answered go once more to the next one."""
        retry = []
        for pending in sorted(self._in_flight.values(), key=lambda p: p.id):
            if pending.retried:
                self._lose(pending, "its ASR worker was lost twice")
            else:
                pending.retried = True
                retry.append(pending)
        self._in_flight.clear()
        self._queue.extendleft(reversed(retry))
