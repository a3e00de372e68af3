"""While serving: is the step p99 over the last minute still under the budget?

A worker sized at warm-up can become slower later (another process on the GPU, thermal
throttling, a noisy neighbour on a shared host). When the p99 of the steps in the last
``window`` seconds exceeds the budget, the worker stops taking new calls (its calls go
on) until the p99 is back under it; with no steps (no calls) the window empties and the
worker takes calls again.
"""

from __future__ import annotations

import collections

import numpy as np

MIN_SLOW_STEPS = 3  # a p99 over the budget counts once this many steps were over it: one stall is not a trend
CHECK_EVERY_SECONDS = 1.0


class StepWatch:
    """Step durations in a sliding time window and the verdict on them (one thread only)."""

    def __init__(
        self,
        budget_ms: float,
        window_seconds: float = 60.0,
        *,
        min_slow: int = MIN_SLOW_STEPS,
        check_every: float = CHECK_EVERY_SECONDS,
    ) -> None:
        if budget_ms <= 0 or window_seconds <= 0:
            raise ValueError("budget_ms and window_seconds must be positive")
        self.budget_ms = budget_ms
        self.window = window_seconds
        self.min_slow = min_slow
        self.check_every = check_every
        self.overloaded = False
        self.p99_ms: float | None = None
        self._steps: collections.deque[tuple[float, float]] = collections.deque()
        self._next_check = float("-inf")

    def observe(self, now: float, seconds: float) -> None:
        self._steps.append((now, seconds * 1000))

    def check(self, now: float) -> bool | None:
        """Re-evaluate (at most every ``check_every`` s); the new verdict when it changed, else None."""
        if now < self._next_check:
            return None
        self._next_check = now + self.check_every
        steps = self._steps
        while steps and steps[0][0] < now - self.window:
            steps.popleft()
        if steps:
            durations = np.fromiter((ms for _, ms in steps), dtype=np.float64, count=len(steps))
            self.p99_ms = float(np.percentile(durations, 99))
            slow = int(np.count_nonzero(durations > self.budget_ms))
            verdict = self.p99_ms > self.budget_ms and slow >= self.min_slow
        else:
            self.p99_ms = None
            verdict = False
        if verdict == self.overloaded:
            return None
        self.overloaded = verdict
        return verdict
