"""Is a call's worker hung? Judged from the frame stream, not from the socket.

A worker answers every 80 ms frame it is sent with one of its own (the echo worker at
once, a model worker at its next batched step). So the session *owes* a frame from the
moment the gateway sends one after the worker's last; a worker that owes one for longer
than the threshold (``--worker-stall-ms``, 240 ms: three frame periods) is stalled. A
hung process (SIGSTOP, a deadlock, a GPU that stopped) keeps its socket open and silent,
so waiting for the socket to close would leave the caller in silence for seconds.

Not owing is not stalling: while the gateway sends nothing (before the media starts, or
its own event loop was held up) no worker is blamed. A session's first frame may take
longer (``first_frame`` seconds: the worker resets its slot). A worker that is slow rather
than hung (a loaded machine, an overloaded step) shows it in its gaps: the largest gap
between its frames in the last ``SLOW_MEMORY_SECONDS`` raises its threshold to twice that
gap, up to ``cap``, so it is not abandoned for the hiccups it already had.
"""

from __future__ import annotations

import collections

from service.wire import FRAME_SECONDS

DEFAULT_STALL_SECONDS = 3 * FRAME_SECONDS
FIRST_FRAME_SECONDS = 1.0
SLOW_MEMORY_SECONDS = 10.0


class FrameWatch:
    """Frames sent to a worker session and frames back: whether it owes one for too long.
    Times are ``time.monotonic()`` seconds, passed in (so that it can be tested in virtual time)."""

    def __init__(
        self,
        threshold: float = DEFAULT_STALL_SECONDS,
        *,
        cap: float | None = None,
        first_frame: float = FIRST_FRAME_SECONDS,
    ) -> None:
        self.base = threshold
        self.cap = cap if cap is not None else 3 * threshold
        self.first_frame = first_frame
        self.last_frame_at = 0.0
        self.owed_since: float | None = None
        self.frames = 0
        self._slow: collections.deque[tuple[float, float]] = collections.deque()  # (when, gap) of slow gaps

    def reset(self, now: float) -> None:
        """A new session: nothing owed, nothing received yet."""
        self.last_frame_at = now
        self.owed_since = None
        self.frames = 0
        self._slow.clear()

    def sent(self, now: float) -> None:
        if self.owed_since is None:
            self.owed_since = now

    def received(self, now: float) -> None:
        if self.frames:
            gap = now - self.last_frame_at
            if gap > self.base / 2:
                self._slow.append((now, gap))
        self.frames += 1
        self.last_frame_at = now
        self.owed_since = None

    def threshold(self, now: float) -> float:
        """How long a frame may be owed before the session counts as stalled, now."""
        slow = self._slow
        while slow and slow[0][0] < now - SLOW_MEMORY_SECONDS:
            slow.popleft()
        worst = max((gap for _, gap in slow), default=0.0)
        limit = min(self.cap, max(self.base, 2 * worst))
        return limit if self.frames else max(limit, self.first_frame)

    def stalled(self, now: float) -> float | None:
        """Seconds since the worker last sent a frame, when it has owed one past the
        threshold; None while it is not stalled."""
        owed = self.owed_since
        if owed is None or now - owed <= self.threshold(now):
            return None
        return now - self.last_frame_at
