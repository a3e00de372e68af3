"""The gateway's side of one call session with a worker (service/worker/PROTOCOL.md, v1)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import typing as tp

import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, InvalidStatus

from service.gateway import metrics
from service.wire import FRAME_BYTES, SESSION_PATH, Started, authorization, start_message

SEND_QUEUE_FRAMES = 4

log = logging.getLogger(__name__)


class WorkerRefused(Exception):
    """The worker closed the session during the handshake (code and reason attached)."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"worker refused the session: {code} {reason}")
        self.code = code
        self.reason = reason


class WorkerLink:
    """One WebSocket session: frames out without blocking, frames and text in by callback.

    ``on_frame(pcm_bytes)``, ``on_text(text, t)`` and ``on_end(reason)`` are called from the
    reader task. ``closed`` resolves to ``(code, reason)`` however the session ends.
    """

    def __init__(
        self,
        url: str,
        call_id: str,
        *,
        slot: int | None = None,
        token: int | None = None,
        model: str | None = None,
        secret: str | None = None,
        sampling: tp.Mapping[str, float | int | bool] | None = None,
        on_frame: tp.Callable[[bytes], None] | None = None,
        on_text: tp.Callable[[str, float], None] | None = None,
        on_end: tp.Callable[[str], None] | None = None,
    ) -> None:
        self.url = url if url.endswith(SESSION_PATH) else url.rstrip("/") + SESSION_PATH
        self.call_id = call_id
        self.slot = slot
        self.token = token
        self.model = model
        self.sampling = sampling
        self.headers = authorization(secret)  # the workers' shared secret (PROTOCOL.md)
        self.on_frame = on_frame
        self.on_text = on_text
        self.on_end = on_end
        self.info: Started | None = None
        self.frames_sent = 0
        self.frames_dropped = 0
        self.frames_received = 0
        self._ws: ClientConnection | None = None
        self._outbox: asyncio.Queue[bytes | str] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self.closed: asyncio.Future[tuple[int | None, str]] = asyncio.get_running_loop().create_future()

    async def open(self, timeout: float = 10.0) -> Started:
        """Connect and handshake; raises WorkerRefused or OSError/TimeoutError."""
        try:
            async with asyncio.timeout(timeout):
                self._ws = await connect(
                    self.url,
                    max_size=2**20,
                    compression=None,
                    open_timeout=timeout,
                    ping_interval=5,
                    ping_timeout=5,
                    additional_headers=self.headers,
                )
                await self._ws.send(
                    json.dumps(
                        start_message(
                            self.call_id, slot=self.slot, token=self.token, model=self.model, sampling=self.sampling
                        )
                    )
                )
                reply = await self._ws.recv()
        except websockets.ConnectionClosed as exc:
            await self._abort()
            raise WorkerRefused(
                exc.rcvd.code if exc.rcvd else None, exc.rcvd.reason if exc.rcvd else "connection closed"
            ) from None
        except InvalidStatus as exc:  # refused before the upgrade: 401/403 is a wrong or missing secret
            await self._abort()
            status = exc.response.status_code
            hint = " (the worker secret is missing or wrong: MOSHIMOSHI_WORKER_SECRET)" if status in (401, 403) else ""
            log.error("worker %s refused the session with HTTP %d%s", self.url, status, hint)
            raise WorkerRefused(status, f"HTTP {status}{hint}") from None
        except InvalidHandshake as exc:  # not a WebSocket server at all
            await self._abort()
            raise WorkerRefused(None, f"no WebSocket handshake: {exc}"[:200]) from None
        except BaseException:
            await self._abort()
            raise
        try:
            message = json.loads(reply) if isinstance(reply, str) else {}
            if not isinstance(message, dict) or message.get("type") != "started":
                raise ValueError("not a started message")
            self.info = Started.from_message(message)
        except (KeyError, TypeError, ValueError):
            await self._abort()
            raise WorkerRefused(None, f"unexpected handshake reply {str(reply)[:80]!r}") from None
        self.slot = self.info.slot
        self._tasks = [
            asyncio.create_task(self._reader(), name=f"worker-read-{self.call_id}"),
            asyncio.create_task(self._writer(), name=f"worker-write-{self.call_id}"),
        ]
        return self.info

    def send_frame(self, frame: bytes) -> None:
        """Queue one 80 ms frame; if the socket is backed up, the oldest frame is dropped."""
        if len(frame) != FRAME_BYTES:
            raise ValueError(f"a model frame is {FRAME_BYTES} bytes, got {len(frame)}")
        if self.closed.done():
            return
        while self._outbox.qsize() >= SEND_QUEUE_FRAMES:
            self._outbox.get_nowait()
            self.frames_dropped += 1
            metrics.WORKER_LINK_DROPPED.inc()
        self._outbox.put_nowait(frame)

    async def close(self) -> None:
        """Say stop, close the socket and end the tasks (idempotent)."""
        if self._ws is not None and not self.closed.done():
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self._ws.send(json.dumps({"type": "stop"}))
                    await self._ws.close(1000, "call ended")
        await self._abort()

    async def _abort(self) -> None:
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        for task in self._tasks:
            if task is not current:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
            self._resolve(self._ws.close_code, self._ws.close_reason or "closed")
        else:
            self._resolve(None, "not connected")

    def _resolve(self, code: int | None, reason: str) -> None:
        if not self.closed.done():
            self.closed.set_result((code, reason))

    async def _writer(self) -> None:
        assert self._ws is not None
        try:
            while True:
                item = await self._outbox.get()
                await self._ws.send(item)
                self.frames_sent += 1
        except websockets.ConnectionClosed:
            pass

    async def _reader(self) -> None:
        assert self._ws is not None
        ws = self._ws
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    self.frames_received += 1
                    if self.on_frame is not None:
                        self.on_frame(message)
                    continue
                try:
                    event = json.loads(message)
                except ValueError:
                    log.warning("call %s: worker sent bad JSON", self.call_id)
                    continue
                kind = event.get("type")
                if kind == "text" and self.on_text is not None:
                    self.on_text(str(event.get("text", "")), float(event.get("t", 0.0)))
                elif kind == "end" and self.on_end is not None:
                    self.on_end(str(event.get("reason", "")))
                elif kind == "error":
                    log.warning("call %s: worker error %s", self.call_id, event)
        except websockets.ConnectionClosed:
            pass
        finally:
            self._resolve(ws.close_code, ws.close_reason or "connection lost")
            for task in self._tasks:
                if task is not asyncio.current_task():
                    task.cancel()
