"""One call session over ``/v1/session``: the worker side of PROTOCOL.md, version 1.

The session owns its slot from ``bind`` to the end: whatever ends it (stop, a dropped
socket, a violation, max duration, shutdown, cancellation), the ``finally`` clause
detaches it from the clock and frees the slot. A violation closes only this socket.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import typing as tp

from starlette.websockets import WebSocket, WebSocketDisconnect

from service.wire import (
    FRAME_BYTES,
    FRAME_MS,
    FRAME_SAMPLES,
    FRAME_SECONDS,
    PROTOCOL_VERSION,
    SAMPLE_RATE,
    CloseCode,
)
from service.worker.slots import AdmissionError
from service.worker.text import TextStream

if tp.TYPE_CHECKING:
    from service.worker.runtime import WorkerRuntime

log = logging.getLogger(__name__)

START_TIMEOUT_SECONDS = 10.0
OUTBOX_MESSAGES = 64  # ~5 s of output frames may wait for a slow gateway; older ones are dropped
MAX_TEXT_MESSAGE = 4096


class ProtocolViolation(Exception):
    """The gateway broke the protocol; ``code`` is the close code."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class _End:
    """Outbox marker: the worker ends the session, with an ``end`` event and close 1000, or
    with an ``error`` event and close ``code``."""

    def __init__(self, reason: str, code: int = 1000) -> None:
        self.reason = reason
        self.code = code


class Outbox:
    """Messages for the gateway, in order; when full, the oldest audio frame is dropped."""

    def __init__(self, limit: int, on_drop: tp.Callable[[], None]) -> None:
        self._items: collections.deque[bytes | str | _End] = collections.deque()
        self._limit = limit
        self._on_drop = on_drop
        self._ready = asyncio.Event()

    def put(self, item: bytes | str | _End) -> None:
        if len(self._items) >= self._limit:
            for i, queued in enumerate(self._items):
                if isinstance(queued, bytes):
                    del self._items[i]
                    self._on_drop()
                    break
        self._items.append(item)
        self._ready.set()

    async def get(self) -> bytes | str | _End:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()


def _close_reason(text: str) -> str:
    """A close reason fits in 123 bytes of UTF-8 (RFC 6455 §5.5)."""
    data = text.encode("utf-8")
    if len(data) <= 123:
        return text
    return data[:120].decode("utf-8", errors="ignore") + "..."


def _parse_json(text: str) -> dict:
    if len(text) > MAX_TEXT_MESSAGE:
        raise ProtocolViolation(CloseCode.VIOLATION, f"text message of {len(text)} characters is too long")
    try:
        message = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProtocolViolation(CloseCode.VIOLATION, f"bad JSON: {exc.msg} at position {exc.pos}") from None
    if not isinstance(message, dict):
        raise ProtocolViolation(CloseCode.VIOLATION, "a text message must be a JSON object")
    if not isinstance(message.get("type"), str):
        raise ProtocolViolation(CloseCode.VIOLATION, "a text message needs a string 'type'")
    return message


SAMPLING_LIMITS: dict[str, tuple[type, float, float]] = {
    "temp": (float, 0.0, 10.0),
    "temp_text": (float, 0.0, 10.0),
    "top_k": (int, 1, 4096),
    "top_k_text": (int, 1, 4096),
}


def _sampling_overrides(value: tp.Any) -> dict[str, tp.Any] | None:
    """The ``sampling`` of a start message (PROTOCOL.md): known keys with values in range."""
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > len(SAMPLING_LIMITS) + 1:
        raise ProtocolViolation(
            CloseCode.VIOLATION, "'sampling' must be an object of temp, temp_text, top_k, top_k_text, greedy"
        )
    out: dict[str, tp.Any] = {}
    for key, item in value.items():
        if key == "greedy" and isinstance(item, bool):
            out[key] = item
            continue
        kind, low, high = SAMPLING_LIMITS.get(key, (None, 0, 0))
        ok = (
            kind is not None
            and not isinstance(item, bool)
            and isinstance(item, (int, float))
            and (kind is float or isinstance(item, int))
            and low <= item <= high
        )
        if not ok:
            raise ProtocolViolation(CloseCode.VIOLATION, f"'sampling': bad {str(key)[:20]!r}: {str(item)[:20]!r}")
        out[key] = kind(item) if kind is not None else item
    return out


def _optional_int(message: dict, key: str) -> int | None:
    value = message.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolViolation(CloseCode.VIOLATION, f"'{key}' must be an integer or null, got {value!r}"[:120])
    return value


class Session:
    """The worker side of one ``/v1/session`` WebSocket."""

    def __init__(self, ws: WebSocket, runtime: WorkerRuntime) -> None:
        self.ws = ws
        self.runtime = runtime
        self.metrics = runtime.metrics
        self.call_id = ""
        self.sampling: dict[str, tp.Any] | None = None  # the call's overrides (start message)
        self.slot: int | None = None
        self.outcome = "disconnected"
        self.steps = 0
        self._outbox = Outbox(OUTBOX_MESSAGES, self.metrics.output_dropped.inc)
        self._ending = False
        self._text: TextStream | None = None
        self._max_steps = max(1, round(runtime.settings.max_call_seconds / FRAME_SECONDS))

    # --- entry point --------------------------------------------------------------------
    async def run(self) -> None:
        await self.ws.accept()
        try:
            try:
                start = await self._handshake()
                self.slot = await self.runtime.bind(start.get("slot"), start.get("token"), self.call_id, self)
            except ProtocolViolation as exc:
                await self._refuse(exc.code, exc.reason, "protocol_error")
                return
            except AdmissionError as exc:
                await self._refuse(exc.code, exc.reason, "rejected")
                return
            except WebSocketDisconnect:
                self.outcome = "disconnected"
                return
            await self._serve()
        except WebSocketDisconnect:  # the gateway went away while we were sending
            self.outcome = "disconnected"
        except Exception:
            log.exception("session %s (slot %s) failed", self.call_id or "?", self.slot)
            self.outcome = "error"
            await self._close(CloseCode.INTERNAL, "worker internal error")
        finally:
            self._release()
            self.metrics.sessions.labels(self.outcome).inc()
            if self.slot is not None:
                log.info(
                    "session %s slot %d ended: %s after %d steps", self.call_id, self.slot, self.outcome, self.steps
                )

    def end(self, reason: str) -> None:
        """Have the worker end the session: an ``end`` event, then close 1000."""
        if not self._ending:
            self._ending = True
            self._outbox.put(_End(reason))

    def fence_out(self) -> None:
        """A newer lease took this session's slot (its gateway lost the lease): close 4003."""
        if not self._ending:
            self._ending = True
            self._outbox.put(_End("fenced", code=CloseCode.FENCED))

    # --- handshake ----------------------------------------------------------------------
    async def _handshake(self) -> dict:
        try:
            async with asyncio.timeout(START_TIMEOUT_SECONDS):
                message = await self.ws.receive()
        except TimeoutError:
            raise ProtocolViolation(
                CloseCode.VIOLATION, f"no start message within {START_TIMEOUT_SECONDS:g} s"
            ) from None
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        if message.get("bytes") is not None:
            raise ProtocolViolation(CloseCode.VIOLATION, "media before start")
        start = _parse_json(message.get("text") or "")
        if start["type"] != "start":
            raise ProtocolViolation(CloseCode.VIOLATION, f"expected a start message, got {start['type']!r}"[:120])
        version = start.get("version")
        if version != PROTOCOL_VERSION or isinstance(version, bool):
            raise ProtocolViolation(
                CloseCode.VERSION,
                f"unsupported protocol version {version!r}; this worker speaks {PROTOCOL_VERSION}"[:120],
            )
        call_id = start.get("call_id")
        if not isinstance(call_id, str) or not call_id or len(call_id) > 200:
            raise ProtocolViolation(
                CloseCode.VIOLATION, "'call_id' must be a non-empty string (at most 200 characters)"
            )
        self.call_id = call_id
        _optional_int(start, "slot")
        _optional_int(start, "token")
        self.sampling = _sampling_overrides(start.get("sampling"))
        model = start.get("model")
        if model is not None:
            if not isinstance(model, str):
                raise ProtocolViolation(CloseCode.VIOLATION, "'model' must be a string")
            if not self.runtime.serves_model(model):
                raise ProtocolViolation(
                    CloseCode.MODEL, f"this worker serves {self.runtime.info.model}, not {model}"[:120]
                )
        return start

    async def _refuse(self, code: int, reason: str, outcome: str) -> None:
        self.outcome = outcome
        self.metrics.protocol_errors.labels(str(code)).inc()
        log.info("session %s refused: %d %s", self.call_id or "?", code, reason)
        await self._send_error(code, reason)
        await self._close(code, reason)

    # --- the call -----------------------------------------------------------------------
    async def _serve(self) -> None:
        assert self.slot is not None
        engine = self.runtime.engine
        if engine is not None and engine.tokenizer is not None:
            self._text = TextStream(engine.tokenizer, self.runtime.skip_text_ids)
        sampling = self.runtime.slot_sampling(self.slot, self.sampling)  # before its first step
        self.runtime.attach(self.slot, self._on_output, self)
        info = self.runtime.info
        await self.ws.send_text(
            json.dumps(
                {
                    "type": "started",
                    "version": PROTOCOL_VERSION,
                    "slot": self.slot,
                    "sample_rate": SAMPLE_RATE,
                    "frame_samples": FRAME_SAMPLES,
                    "frame_ms": FRAME_MS,
                    "model": info.model,
                    "license": info.license,
                    "research_only": info.research_only,
                    "max_call_seconds": self.runtime.settings.max_call_seconds,
                    "context_seconds": info.context_seconds,
                    "sampling": sampling,
                }
            )
        )
        receiver = asyncio.create_task(self._receive_loop(), name=f"recv-{self.call_id}")
        sender = asyncio.create_task(self._send_loop(), name=f"send-{self.call_id}")
        try:
            done, _ = await asyncio.wait({receiver, sender}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (receiver, sender):
                task.cancel()
            await asyncio.gather(receiver, sender, return_exceptions=True)
        finished = done.pop()
        if finished.cancelled():
            return
        error = finished.exception()
        if isinstance(error, ProtocolViolation):
            self.outcome = "protocol_error"
            self.metrics.protocol_errors.labels(str(error.code)).inc()
            log.info("session %s slot %d: protocol violation %d %s", self.call_id, self.slot, error.code, error.reason)
            self._release()
            await self._send_error(error.code, error.reason)
            await self._close(error.code, error.reason)
        elif isinstance(error, WebSocketDisconnect):
            pass  # outcome stays as set (disconnected, or what ended it)
        elif error is not None:
            raise error
        elif finished is receiver and self.outcome == "completed":
            self._release()  # free the slot before the close reaches the gateway
            await self._close(CloseCode.NORMAL, "stop")

    async def _receive_loop(self) -> None:
        assert self.slot is not None
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                if not self._ending:
                    self.outcome = "disconnected"
                raise WebSocketDisconnect(message.get("code", 1000))
            data = message.get("bytes")
            if data is not None:
                if len(data) != FRAME_BYTES:
                    raise ProtocolViolation(
                        CloseCode.VIOLATION,
                        f"binary frame of {len(data)} bytes; media frames are exactly "
                        f"{FRAME_BYTES} bytes (80 ms of PCM16 at 24 kHz)",
                    )
                if not self._ending:
                    self.runtime.push(self.slot, data)
                continue
            request = _parse_json(message.get("text") or "")
            if request["type"] == "stop":
                self.outcome = "completed"
                return
            if request["type"] == "start":
                raise ProtocolViolation(CloseCode.VIOLATION, "duplicate start message")
            raise ProtocolViolation(CloseCode.VIOLATION, f"unknown message type {request['type']!r}"[:120])

    async def _send_loop(self) -> None:
        while True:
            item = await self._outbox.get()
            if isinstance(item, _End):
                self.outcome = item.reason
                self._release()
                if item.code == CloseCode.NORMAL:
                    await self.ws.send_text(json.dumps({"type": "end", "reason": item.reason}))
                    await self._close(CloseCode.NORMAL, item.reason)
                else:
                    reason = "fenced out: another session holds a newer lease on this slot"
                    await self._send_error(item.code, reason)
                    await self._close(item.code, reason)
                return
            if isinstance(item, bytes):
                await self.ws.send_bytes(item)
            else:
                await self.ws.send_text(item)

    def _on_output(self, step: int, pcm: bytes, token: int) -> None:
        """The clock's output for this slot (runs on the event loop)."""
        if self._ending:
            return
        self.steps = step + 1
        self._outbox.put(pcm)
        if self._text is not None:
            dropped = self._text.dropped_bytes
            piece = self._text.push(token, step)
            if self._text.dropped_bytes != dropped:
                self.metrics.text_bytes_dropped.inc(self._text.dropped_bytes - dropped)
            if piece is not None:
                self.metrics.text_pieces.inc()
                self._outbox.put(json.dumps({"type": "text", "text": piece.text, "t": piece.t}, ensure_ascii=False))
        if self.steps >= self._max_steps:
            self.end("max_duration")

    # --- helpers ------------------------------------------------------------------------
    def _release(self) -> None:
        """Detach from the clock and free the slot (idempotent)."""
        if self.slot is not None:
            self.runtime.unbind(self.slot, self)

    async def _send_error(self, code: int, reason: str) -> None:
        try:
            await self.ws.send_text(json.dumps({"type": "error", "code": code, "message": reason}, ensure_ascii=False))
        except Exception:  # the peer may be gone already
            pass

    async def _close(self, code: int, reason: str) -> None:
        try:
            await self.ws.close(code, _close_reason(reason))
        except Exception:  # already closed by the peer, or by us
            pass
