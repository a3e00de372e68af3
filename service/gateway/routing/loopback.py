"""The in-gateway echo: a diagnostic loopback that needs no worker and no Redis.

``moshimoshi gateway --worker-url echo:`` answers calls and plays the caller's audio back
after ``delay_ms``, through the same media path as a model (jitter buffer, resampling,
80 ms framing, pacing): it checks a line end to end even when no worker is up, and it is
what the edge capacity benchmark loads, so that the gateway is measured on its own.
"""

from __future__ import annotations

import asyncio
import collections
import typing as tp

from service.wire import FRAME_MS, Started

LOOPBACK_URL = "echo:"


class LoopbackLink:
    """Looks like a WorkerLink to a Call; returns each frame after ``delay_ms``."""

    def __init__(self, call_id: str, on_frame: tp.Callable[[bytes], None], delay_ms: int = 0) -> None:
        self.call_id = call_id
        self.on_frame = on_frame
        self.slot: int | None = 0
        self.info = Started(slot=0, model="echo", license="n/a (loopback)", max_call_seconds=0.0)
        self.closed: asyncio.Future[tuple[int | None, str]] = asyncio.get_running_loop().create_future()
        self._delay_frames = max(0, round(delay_ms / FRAME_MS))
        self._held: collections.deque[bytes] = collections.deque()

    def send_frame(self, frame: bytes) -> None:
        if self.closed.done():
            return
        self._held.append(frame)
        if len(self._held) > self._delay_frames:
            self.on_frame(self._held.popleft())

    async def close(self) -> None:
        if not self.closed.done():
            self.closed.set_result((1000, "call ended"))
