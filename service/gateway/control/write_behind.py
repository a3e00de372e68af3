"""Writes to Redis kept off the caller's path: queued in memory, sent in batches by one task.

The transcript and refused-call stores (``transcript_store.py``, ``refusal_store.py``)
write this way: ``put`` returns at once; while Redis refuses writes (down, or full) the
entries wait in memory, at most ``max_pending`` of them, the oldest dropped beyond that,
and a failed batch is retried with a backoff doubling from ``RETRY_FIRST_SECONDS`` to
``RETRY_MAX_SECONDS``. ``close`` stores what it can in its time; the rest is dropped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import typing as tp

from service.gateway import metrics
from service.pool import PoolError

log = logging.getLogger(__name__)

RETRY_FIRST_SECONDS = 0.25
RETRY_MAX_SECONDS = 5.0

T = tp.TypeVar("T")


class WriteBehind(tp.Generic[T]):
    """A queue of entries that one task writes in batches of at most ``batch`` with
    ``write`` (which raises PoolError when Redis refuses). Each entry dropped goes to
    ``on_dropped(entry, reason)`` (reason ``overflow`` or ``shutdown``), each batch
    written to ``on_stored``. A failed write is counted in the gateway's Redis errors under
    ``metric`` and said as ``{what} not stored yet`` at the first failure of an outage and
    at every retry once the backoff is at its longest."""

    def __init__(
        self,
        write: tp.Callable[[list[T]], tp.Awaitable[None]],
        *,
        what: str,
        metric: str,
        max_pending: int,
        batch: int,
        on_dropped: tp.Callable[[T, str], None],
        on_stored: tp.Callable[[list[T]], None],
    ) -> None:
        self.write = write
        self.what = what
        self.metric = metric
        self.max_pending = max_pending
        self.batch = batch
        self.on_dropped = on_dropped
        self.on_stored = on_stored
        self.write_failures = 0
        self._pending: collections.deque[T] = collections.deque()
        self._in_flight = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        """Entries not stored yet (queued, or being written now)."""
        return len(self._pending) + self._in_flight

    def put(self, entry: T) -> None:
        """Queue one entry (returns at once)."""
        self._pending.append(entry)
        self._trim()
        self._idle.clear()
        self._wake.set()

    def _trim(self) -> None:
        while len(self._pending) > self.max_pending:
            self.on_dropped(self._pending.popleft(), "overflow")

    def start(self, name: str) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=name)

    async def _run(self) -> None:
        delay = RETRY_FIRST_SECONDS
        failures = 0  # since the last write that went through
        while True:
            if not self._pending:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = [self._pending.popleft() for _ in range(min(self.batch, len(self._pending)))]
            self._in_flight = len(batch)
            failure: PoolError | None = None
            try:
                await self.write(batch)
            except PoolError as exc:
                failure = exc
            except asyncio.CancelledError:
                self._pending.extendleft(reversed(batch))
                raise
            finally:
                self._in_flight = 0
            if failure is not None:
                self._pending.extendleft(reversed(batch))
                self._trim()
                failures += 1
                self.write_failures += 1
                metrics.REDIS_ERRORS.labels(self.metric).inc()
                if failures == 1 or delay >= RETRY_MAX_SECONDS:
                    log.warning(
                        "%s not stored yet (%d waiting, retry in %.2fs): %s",
                        self.what,
                        len(self._pending),
                        delay,
                        failure,
                    )
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX_SECONDS, delay * 2)
                continue
            delay, failures = RETRY_FIRST_SECONDS, 0
            self.on_stored(batch)

    async def flush(self, timeout: float) -> bool:
        """Wait until every queued entry is stored; False if that took longer than ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
            return True
        except TimeoutError:
            return False

    async def close(self, timeout: float = 2.0) -> None:
        """Store what is queued (for up to ``timeout``), then stop; the rest is dropped."""
        if self._task is not None:
            await self.flush(timeout)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._pending:
            self.on_dropped(self._pending.popleft(), "shutdown")
        self._idle.set()
