"""Concurrent calls over the last hour, for the dashboard's sparkline.

The pool's check (``routing/pool_watch.py``, every second) reports the calls holding a
worker slot across the whole pool and the capacity of the ready workers; this keeps the
busiest moment of each ``BUCKET_SECONDS`` for ``SPAN_SECONDS``: 360 small samples at most,
whatever the traffic. Every gateway sees the same pool, so any replica draws the same line
(one that started recently draws a shorter one).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass

BUCKET_SECONDS = 10.0
SPAN_SECONDS = 3600.0


@dataclass
class Sample:
    t: float  # the bucket's start, epoch seconds
    calls: int  # the most calls seen in the bucket
    capacity: int  # the capacity then (slots of ready workers)


class ConcurrencyHistory:
    """The busiest moment of each bucket over the span (see the module docstring)."""

    def __init__(self, *, bucket_seconds: float = BUCKET_SECONDS, span_seconds: float = SPAN_SECONDS) -> None:
        self.bucket_seconds = bucket_seconds
        self.span_seconds = span_seconds
        self._samples: collections.deque[Sample] = collections.deque(maxlen=int(span_seconds / bucket_seconds))

    def add(self, calls: int, capacity: int, now: float | None = None) -> None:
        now = time.time() if now is None else now
        start = now - now % self.bucket_seconds
        last = self._samples[-1] if self._samples else None
        if last is not None and last.t == start:
            last.calls = max(last.calls, calls)
            last.capacity = max(last.capacity, capacity)
        else:
            self._samples.append(Sample(start, calls, capacity))

    def samples(self, now: float | None = None) -> list[Sample]:
        """The samples of the span, oldest first."""
        cutoff = (time.time() if now is None else now) - self.span_seconds
        return [Sample(s.t, s.calls, s.capacity) for s in self._samples if s.t >= cutoff]
