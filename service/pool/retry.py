"""Pool writes that must happen eventually: retried with backoff until they succeed.

The end of a call record and the release of a lease must not be lost to a Redis that is
briefly down, failing over or full (maxmemory): each is tried, and on ``PoolError`` tried
again after 0.2 s, 0.4 s, 0.8 s... (at most ``max_delay`` apart) until it succeeds or its
bound passes (a lease release is moot once the lease has expired by itself). Every retry,
every write that got through after retries and every write given up is counted per
operation, for the owner's metrics.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import typing as tp
from dataclasses import dataclass

log = logging.getLogger(__name__)

T = tp.TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """Delays between attempts: ``first``, then times ``factor``, at most ``most`` seconds."""

    first: float = 0.2
    factor: float = 2.0
    most: float = 5.0

    def delays(self) -> tp.Iterator[float]:
        delay = self.first
        while True:
            yield delay
            delay = min(self.most, delay * self.factor)


class Retries:
    """Runs must-happen writes, retrying them; counts per operation name.

    ``run`` retries in the caller's task; ``submit`` in a background task this object owns
    (``close`` waits for them, then cancels what is left).
    """

    def __init__(self, retry_on: tuple[type[BaseException], ...], backoff: Backoff | None = None) -> None:
        self.retry_on = retry_on  # the errors that mean "try again later" (PoolError for the pool)
        self.backoff = backoff or Backoff()
        self.retried: collections.Counter[str] = collections.Counter()  # attempts after a failure
        self.recovered: collections.Counter[str] = collections.Counter()  # succeeded after retrying
        self.abandoned: collections.Counter[str] = collections.Counter()  # given up at their bound
        # told (operation, "retried" | "recovered" | "abandoned") as it happens, e.g. for metrics
        self.listeners: list[tp.Callable[[str, str], None]] = []
        self._tasks: set[asyncio.Task] = set()

    @property
    def pending(self) -> int:
        return len(self._tasks)

    async def run(self, what: str, operation: tp.Callable[[], tp.Awaitable[T]], *, give_up_after: float) -> T:
        """``await operation()`` until it does not raise one of ``retry_on``, for at most
        ``give_up_after`` seconds; then the last error is raised (and counted as abandoned)."""
        deadline = time.monotonic() + give_up_after
        delays = self.backoff.delays()
        failures = 0
        while True:
            try:
                result = await operation()
            except self.retry_on as exc:
                failures += 1
                delay = next(delays)
                if time.monotonic() + delay > deadline:
                    self._count(self.abandoned, what, "abandoned")
                    log.error("%s given up after %d attempts: %s", what, failures, exc)
                    raise
                if failures == 1:
                    log.warning("%s failed, retrying for up to %.0f s: %s", what, give_up_after, exc)
                await asyncio.sleep(delay)
                self._count(self.retried, what, "retried")
                continue
            if failures:
                self._count(self.recovered, what, "recovered")
                log.info("%s done after %d retries", what, failures)
            return result

    def _count(self, counter: collections.Counter[str], what: str, event: str) -> None:
        counter[what] += 1
        for listener in self.listeners:
            try:
                listener(what, event)
            except Exception:
                log.exception("retry listener failed")

    def submit(self, what: str, operation: tp.Callable[[], tp.Awaitable[tp.Any]], *, give_up_after: float) -> None:
        """Retry ``operation`` in the background (its first attempt included)."""

        async def attempt() -> None:
            try:
                await self.run(what, operation, give_up_after=give_up_after)
            except self.retry_on:
                pass  # counted and logged by run

        task = asyncio.create_task(attempt(), name=f"retry-{what}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self, timeout: float = 2.0) -> None:
        """Give the background retries ``timeout`` seconds, then cancel the rest."""
        if not self._tasks:
            return
        tasks = list(self._tasks)
        _, left = await asyncio.wait(tasks, timeout=timeout)
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(left)
