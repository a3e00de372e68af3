"""One call's session over ``/v1/asr``: the ASR worker's side of PROTOCOL.md, version 1.

The receive loop validates every message; each utterance becomes a task that waits for
its batch and sends the caller event. Whatever ends the session (``end``, a dropped
socket, a violation, shutdown, cancellation), the ``finally`` clause cancels its pending
utterances and gives its place back. A violation closes only this socket.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import typing as tp

import numpy as np
from starlette.websockets import WebSocket, WebSocketDisconnect

from service.asr.batcher import Overloaded
from service.asr.runtime import NotAccepting

if tp.TYPE_CHECKING:
    from service.asr.runtime import AsrRuntime

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
SAMPLE_RATE = 16000
MAX_UTTERANCE_SECONDS = 30.0
MAX_AUDIO_BYTES = int(MAX_UTTERANCE_SECONDS * SAMPLE_RATE) * 2
MAX_TEXT_MESSAGE = 4096
START_TIMEOUT_SECONDS = 10.0
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
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not 0 <= value <= MAX_CALL_SECONDS:
        raise ProtocolViolation(CLOSE_VIOLATION, f"'{key}' must be a number of seconds >= 0, got {value!r}")
    return float(value)


class _Header(tp.NamedTuple):
    id: int
    start: float
    end: float


def parse_utterance(message: dict) -> _Header:
    """An ``utterance`` message's fields, checked."""
    utterance_id = message.get("id")
    if isinstance(utterance_id, bool) or not isinstance(utterance_id, int) or not 0 <= utterance_id < 2**53:
        raise ProtocolViolation(CLOSE_VIOLATION, f"'id' must be a non-negative integer, got {utterance_id!r}")
    start, end = _time(message, "start"), _time(message, "end")
    if end < start or end - start > MAX_UTTERANCE_SECONDS:
        raise ProtocolViolation(CLOSE_VIOLATION, f"an utterance spans 0 to {MAX_UTTERANCE_SECONDS:g} s "
                                                 f"(start {start}, end {end})")
    return _Header(utterance_id, start, end)


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
            if self._admitted:
                self.runtime.leave(self)
            self.metrics.sessions_total.labels(self.outcome).inc()
            if self.call_id:
                log.info("ASR session %s ended: %s after %d utterances", self.call_id, self.outcome,
                         self.utterances)

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
        if version != PROTOCOL_VERSION or isinstance(version, bool):
            raise ProtocolViolation(CLOSE_VERSION, f"unsupported protocol version {version!r}; "
                                                   f"this worker speaks {PROTOCOL_VERSION}")
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
        await self._send({
            "type": "started", "version": PROTOCOL_VERSION, "model": backend.name,
            "backend": runtime.settings.backend, "language": runtime.settings.language,
            "sample_rate": SAMPLE_RATE, "max_utterance_seconds": MAX_UTTERANCE_SECONDS,
            "random_weights": backend.random_weights})
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
            # ``end``: answer every utterance still in flight, then close.
            if self._pending:
                await asyncio.gather(*list(self._pending), return_exceptions=True)
            await self._close(CLOSE_NORMAL, "done")

    async def _receive_loop(self) -> None:
        header: _Header | None = None
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                self.outcome = "disconnected"
                raise WebSocketDisconnect(message.get("code", 1000))
            data = message.get("bytes")
            if data is not None:
                if header is None:
                    raise ProtocolViolation(CLOSE_VIOLATION, "audio without an utterance message before it")
                if not data or len(data) % 2 or len(data) > MAX_AUDIO_BYTES:
                    raise ProtocolViolation(CLOSE_VIOLATION, f"utterance audio of {len(data)} bytes; it is PCM16 "
                                                             f"at 16 kHz, 2 to {MAX_AUDIO_BYTES} bytes")
                self._transcribe(header, data)
                header = None
                continue
            request = _parse_json(message.get("text") or "")
            if header is not None:
                raise ProtocolViolation(CLOSE_VIOLATION, f"expected the utterance's audio, got {request['type']!r}")
            kind = request["type"]
            if kind == "utterance":
                header = parse_utterance(request)
            elif kind == "end":
                self.outcome = "completed"
                return
            elif kind == "start":
                raise ProtocolViolation(CLOSE_VIOLATION, "duplicate start message")
            else:
                raise ProtocolViolation(CLOSE_VIOLATION, f"unknown message type {kind!r}")

    def _transcribe(self, header: _Header, pcm: bytes) -> None:
        self.utterances += 1
        if len(self._pending) >= MAX_PENDING_PER_SESSION:
            self.metrics.utterances.labels("overloaded").inc()
            task = asyncio.create_task(self._failed(header, "overloaded"))
        else:
            audio = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
            task = asyncio.create_task(self._one(header, audio))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _one(self, header: _Header, audio: np.ndarray) -> None:
        batcher = self.runtime.batcher
        assert batcher is not None
        try:
            result = await batcher.submit(audio)
        except Overloaded:
            await self._failed(header, "overloaded")
            return
        if result.error is not None:
            await self._failed(header, result.error)
            return
        await self._send({"type": "caller", "id": header.id, "start": header.start, "end": header.end,
                          "text": result.text})

    async def _failed(self, header: _Header, reason: str) -> None:
        await self._send({"type": "failed", "id": header.id, "start": header.start, "end": header.end,
                          "reason": reason})

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
