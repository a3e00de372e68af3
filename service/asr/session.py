"""One call's session over ``/v1/asr``: the ASR worker's side of PROTOCOL.md, version 2.

The receive loop validates every message and hands the caller's audio to the worker's VAD
batcher (``vad_batcher.py``), which cuts it into utterances; each utterance becomes a task
that waits for its ASR batch and sends the caller event. ``settled`` messages tell the
gateway how far back it must keep audio to resend to another worker. Whatever ends the
session (``end``, a dropped socket, a violation, shutdown, cancellation), the ``finally``
clause cancels its pending utterances and gives its place back. A violation closes only
this socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import typing as tp

import numpy as np
from starlette.websockets import WebSocket, WebSocketDisconnect

from service.asr.batcher import Overloaded
from service.asr.runtime import NotAccepting
from service.asr.segmenter import Utterance

if tp.TYPE_CHECKING:
    from service.asr.runtime import AsrRuntime

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 2
SAMPLE_RATE = 16000
HEADER_BYTES = 8  # an audio message's call time: float64, little-endian
MAX_CHUNK_SECONDS = 2.0
MAX_AUDIO_BYTES = HEADER_BYTES + int(MAX_CHUNK_SECONDS * SAMPLE_RATE) * 2
SETTLED_STEP_SECONDS = 1.0  # a settled message when the settled time moved on this much
MAX_TEXT_MESSAGE = 4096
START_TIMEOUT_SECONDS = 10.0
END_SECONDS = 30.0  # after ``end``, the VAD's last turn comes within this
MAX_PENDING_PER_SESSION = 16  # utterances of one call waiting for text; more fail as overloaded
MAX_CALL_SECONDS = 7 * 24 * 3600.0  # times beyond this are nonsense, not a long call

CLOSE_NORMAL = 1000
CLOSE_INTERNAL = 1011
CLOSE_VIOLATION = 4000
CLOSE_VERSION = 4001
CLOSE_NOT_ACCEPTING = 4029


class ProtocolViolation(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason[:120]


def _close_reason(text: str) -> str:
    data = text.encode("utf-8")
    return text if len(data) <= 123 else data[:120].decode("utf-8", errors="ignore") + "..."


def _parse_json(text: str) -> dict:
    if len(text) > MAX_TEXT_MESSAGE:
        raise ProtocolViolation(CLOSE_VIOLATION, f"text message of {len(text)} characters is too long")
    try:
        message = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProtocolViolation(CLOSE_VIOLATION, f"bad JSON: {exc.msg} at position {exc.pos}") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolViolation(CLOSE_VIOLATION, "a text message must be a JSON object with a string 'type'")
    return message


def _time(message: dict, key: str) -> float:
    value = message.get(key)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 <= value <= MAX_CALL_SECONDS
    ):
        raise ProtocolViolation(CLOSE_VIOLATION, f"'{key}' must be a number of seconds >= 0, got {value!r}")
    return float(value)


def parse_audio(data: bytes) -> tuple[float, np.ndarray]:
    """An audio message: (call time of its first sample, 16 kHz float32 samples)."""
    if len(data) < HEADER_BYTES + 2 or (len(data) - HEADER_BYTES) % 2 or len(data) > MAX_AUDIO_BYTES:
        raise ProtocolViolation(
            CLOSE_VIOLATION,
            f"audio message of {len(data)} bytes; it is an 8-byte time, then "
            f"PCM16 at 16 kHz: {HEADER_BYTES + 2} to {MAX_AUDIO_BYTES} bytes "
            "with an even count of audio bytes",
        )
    t = float(np.frombuffer(data, dtype="<f8", count=1)[0])
    if not math.isfinite(t) or not 0 <= t <= MAX_CALL_SECONDS:
        raise ProtocolViolation(CLOSE_VIOLATION, f"an audio message's time must be seconds >= 0, got {t!r}")
    samples = np.frombuffer(data, dtype="<i2", offset=HEADER_BYTES).astype(np.float32) / 32768.0
    return t, samples


class AsrSession:
    """The worker side of one ``/v1/asr`` WebSocket."""

    def __init__(self, ws: WebSocket, runtime: AsrRuntime) -> None:
        self.ws = ws
        self.runtime = runtime
        self.metrics = runtime.metrics
        self.call_id = ""
        self.outcome = "disconnected"
        self.utterances = 0
        self._pending: set[asyncio.Task] = set()
        self._in_flight: dict[int, Utterance] = {}  # utterance id → utterance waiting for its text
        self._next_id = 0
        self._settled = 0.0
        self._vad_done = asyncio.Event()
        self._vad_open = False
        self._send_lock = asyncio.Lock()
        self._shutdown = asyncio.Event()
        self._admitted = False

    def shutdown(self) -> None:
        """The worker stops: close this session (1000, ``shutdown``) without waiting."""
        self._shutdown.set()

    async def run(self) -> None:
        await self.ws.accept()
        try:
            try:
                await self._handshake()
                self.runtime.admit(self)
                self._admitted = True
            except ProtocolViolation as exc:
                await self._refuse(exc.code, exc.reason, "protocol_error")
                return
            except NotAccepting as exc:
                await self._refuse(CLOSE_NOT_ACCEPTING, str(exc), "rejected")
                return
            except WebSocketDisconnect:
                return
            await self._serve()
        except WebSocketDisconnect:
            self.outcome = "disconnected"
        except Exception:
            log.exception("ASR session %s failed", self.call_id or "?")
            self.outcome = "error"
            await self._close(CLOSE_INTERNAL, "ASR worker internal error")
        finally:
            for task in self._pending:
                task.cancel()
            if self._pending:
                await asyncio.gather(*self._pending, return_exceptions=True)
            if self._vad_open and self.runtime.vad is not None:
                self.runtime.vad.close(self)
            if self._admitted:
                self.runtime.leave(self)
            self.metrics.sessions_total.labels(self.outcome).inc()
            if self.call_id:
                log.info("ASR session %s ended: %s after %d utterances", self.call_id, self.outcome, self.utterances)

    async def _handshake(self) -> None:
        try:
            async with asyncio.timeout(START_TIMEOUT_SECONDS):
                message = await self.ws.receive()
        except TimeoutError:
            raise ProtocolViolation(CLOSE_VIOLATION, f"no start message within {START_TIMEOUT_SECONDS:g} s") from None
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        if message.get("bytes") is not None:
            raise ProtocolViolation(CLOSE_VIOLATION, "audio before start")
        start = _parse_json(message.get("text") or "")
        if start["type"] != "start":
            raise ProtocolViolation(CLOSE_VIOLATION, f"expected a start message, got {start['type']!r}")
        version = start.get("version")
        if version != PROTOCOL_VERSION or isinstance(version, bool):  # 1 sent utterances: gateways cut them
            raise ProtocolViolation(
                CLOSE_VERSION, f"unsupported protocol version {version!r}; this worker speaks {PROTOCOL_VERSION}"
            )
        call_id = start.get("call_id")
        if not isinstance(call_id, str) or not call_id or len(call_id) > 200 or not call_id.isprintable():
            raise ProtocolViolation(CLOSE_VIOLATION, "'call_id' must be a printable string of 1-200 characters")
        self.call_id = call_id

    async def _refuse(self, code: int, reason: str, outcome: str) -> None:
        self.outcome = outcome
        self.metrics.protocol_errors.labels(str(code)).inc()
        log.info("ASR session %s refused: %d %s", self.call_id or "?", code, reason)
        await self._send({"type": "error", "code": code, "message": reason})
        await self._close(code, reason)

    async def _serve(self) -> None:
        runtime = self.runtime
        backend = runtime.backend
        assert backend is not None
        vad = runtime.vad
        assert vad is not None
        config = vad.config
        await self._send(
            {
                "type": "started",
                "version": PROTOCOL_VERSION,
                "model": backend.name,
                "backend": runtime.settings.backend,
                "language": runtime.settings.language,
                "sample_rate": SAMPLE_RATE,
                "max_utterance_seconds": config.max_utterance_s,
                "min_silence_ms": config.min_silence_ms,
                "pad_ms": config.pad_ms,
                "random_weights": backend.random_weights,
            }
        )
        vad.open(self)
        self._vad_open = True
        receiver = asyncio.create_task(self._receive_loop(), name=f"asr-recv-{self.call_id}")
        shutdown = asyncio.create_task(self._shutdown.wait())
        try:
            await asyncio.wait({receiver, shutdown}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            receiver.cancel()
            shutdown.cancel()
            await asyncio.gather(receiver, shutdown, return_exceptions=True)
        if self._shutdown.is_set():
            self.outcome = "shutdown"
            await self._close(CLOSE_NORMAL, "shutdown")
            return
        error = receiver.exception() if not receiver.cancelled() else None
        if isinstance(error, ProtocolViolation):
            self.outcome = "protocol_error"
            self.metrics.protocol_errors.labels(str(error.code)).inc()
            log.info("ASR session %s: protocol violation %d %s", self.call_id, error.code, error.reason)
            await self._send({"type": "error", "code": error.code, "message": error.reason})
            await self._close(error.code, error.reason)
        elif error is not None:
            raise error
        elif self.outcome == "completed":
            # ``end``: the VAD ends the utterance in progress; every utterance gets its
            # answer; then close.
            vad.finish(self)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(END_SECONDS):
                    await self._vad_done.wait()
            while self._pending:
                await asyncio.gather(*list(self._pending), return_exceptions=True)
            await self._close(CLOSE_NORMAL, "done")

    async def _receive_loop(self) -> None:
        vad = self.runtime.vad
        assert vad is not None
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                self.outcome = "disconnected"
                raise WebSocketDisconnect(message.get("code", 1000))
            data = message.get("bytes")
            if data is not None:
                t, samples = parse_audio(data)
                vad.feed(self, samples, t)
                continue
            request = _parse_json(message.get("text") or "")
            kind = request["type"]
            if kind == "end":
                self.outcome = "completed"
                return
            if kind == "start":
                raise ProtocolViolation(CLOSE_VIOLATION, "duplicate start message")
            raise ProtocolViolation(CLOSE_VIOLATION, f"unknown message type {kind!r}")

    # -- utterances from the VAD ---------------------------------------------------------

    def on_vad(self, utterances: list[Utterance], *, final: bool) -> None:
        """The VAD batcher's turn took this call's audio: transcribe what ended."""
        for utterance in utterances:
            self._transcribe(utterance)
        self._maybe_settle()
        if final:
            self._vad_done.set()

    def _transcribe(self, utterance: Utterance) -> None:
        self.utterances += 1
        utterance_id = self._next_id
        self._next_id += 1
        if len(self._pending) >= MAX_PENDING_PER_SESSION:
            self.metrics.utterances.labels("overloaded").inc()
            task = asyncio.create_task(self._failed(utterance_id, utterance, "overloaded"))
        else:
            self._in_flight[utterance_id] = utterance
            audio = np.frombuffer(utterance.pcm, dtype="<i2").astype(np.float32) / 32768.0
            task = asyncio.create_task(self._one(utterance_id, utterance, audio))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def settled(self) -> float:
        """The call time before which nothing more will come from this session: every
        utterance that began before it has been answered, and no speech is in progress."""
        vad = self.runtime.vad
        needed = vad.segmenter(self).needed_from if vad is not None and self._vad_open else None
        times = [u.audio_start for u in self._in_flight.values()]
        if needed is not None:
            times.append(needed)
        return min(times) if times else self._settled

    def _maybe_settle(self) -> None:
        settled = self.settled()
        if settled - self._settled >= SETTLED_STEP_SECONDS:
            self._settled = settled
            task = asyncio.create_task(self._send({"type": "settled", "t": round(settled, 3)}))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _one(self, utterance_id: int, utterance: Utterance, audio: np.ndarray) -> None:
        batcher = self.runtime.batcher
        assert batcher is not None
        try:
            try:
                result = await batcher.submit(audio)
            except Overloaded:
                await self._failed(utterance_id, utterance, "overloaded")
                return
            if result.error is not None:
                await self._failed(utterance_id, utterance, result.error)
                return
            await self._send(
                {
                    "type": "caller",
                    "id": utterance_id,
                    "start": round(utterance.start, 3),
                    "end": round(utterance.end, 3),
                    "text": result.text,
                }
            )
        finally:
            self._in_flight.pop(utterance_id, None)
            self._maybe_settle()

    async def _failed(self, utterance_id: int, utterance: Utterance, reason: str) -> None:
        await self._send(
            {
                "type": "failed",
                "id": utterance_id,
                "start": round(utterance.start, 3),
                "end": round(utterance.end, 3),
                "reason": reason,
            }
        )

    async def _send(self, message: dict) -> None:
        async with self._send_lock:
            try:
                await self.ws.send_text(json.dumps(message, ensure_ascii=False))
            except Exception:  # the peer is gone: the receive loop sees the disconnect
                pass

    async def _close(self, code: int, reason: str) -> None:
        try:
            await self.ws.close(code, _close_reason(reason))
        except Exception:
            pass
