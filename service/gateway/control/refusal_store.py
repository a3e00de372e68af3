"""Refused calls in Redis: one capped stream shared by every gateway, and counts per minute.

What a flood of refused INVITEs can make Redis hold is bounded whatever its size:

* ``<prefix>refusals``: a stream of the latest refused calls (``RefusedCall.to_fields``),
  XADD with an approximate MAXLEN (``max_len``), entries older than the window trimmed
  (XTRIM MINID), the key expiring ``window`` after its last write;
* ``<prefix>refusals:count:<minute>``: a hash per minute, reason → count (HINCRBY), each
  expiring once its minute has left the window: at most ``window / 60 + 2`` small keys.
  These keep the counts exact when the stream holds only the latest ``max_len``.

Writes are behind, batched, like the transcripts' (``write_behind.py``): ``append``
returns at once; while Redis refuses writes (down, or full) entries wait in memory, at most
``max_pending`` of them, the oldest dropped and counted beyond that.
"""

from __future__ import annotations

import collections
import contextlib
import time
import typing as tp

from redis.typing import EncodableT, FieldT

from service.gateway import metrics
from service.gateway.calls.refusals import RefusedCall
from service.gateway.control.write_behind import WriteBehind
from service.pool import PoolClient, StreamEntries

STREAM_MAX_LEN = 1000
MAX_PENDING = 1000
BATCH = 200
MINUTE = 60


class RefusalStore:
    """Write-behind appends of refused calls to Redis, and reads of them (any replica)."""

    def __init__(
        self,
        client: PoolClient,
        *,
        window: float,
        max_len: int = STREAM_MAX_LEN,
        max_pending: int = MAX_PENDING,
        batch: int = BATCH,
    ) -> None:
        if window <= 0:
            raise ValueError("window must be positive")
        self.client = client
        self.window = window
        self.max_len = max_len
        self.key = f"{client.keys.prefix}refusals"
        self.stored = 0
        self.dropped = 0
        self._queue = WriteBehind(
            self._write,
            what="refused calls",
            metric="refusal-log",
            max_pending=max_pending,
            batch=batch,
            on_dropped=self._drop,
            on_stored=self._stored,
        )

    def count_key(self, minute: int) -> str:
        return f"{self.key}:count:{minute}"

    # -- writing (never blocks) --------------------------------------------------------

    def append(self, refused: RefusedCall) -> None:
        self._queue.put(refused)

    def _drop(self, refused: RefusedCall, reason: str) -> None:
        self.dropped += 1
        metrics.REFUSALS_NOT_STORED.labels(reason).inc()

    def _stored(self, batch: list[RefusedCall]) -> None:
        self.stored += len(batch)

    def start(self) -> None:
        self._queue.start("refusal-writer")

    async def _write(self, batch: list[RefusedCall]) -> None:
        window_ms = round(self.window * 1000)
        counts: dict[int, collections.Counter[str]] = {}
        for refused in batch:
            counts.setdefault(int(refused.ended_at // MINUTE), collections.Counter())[refused.reason] += 1
        oldest_ms = round((time.time() - self.window) * 1000)
        async with self.client.guard("store refused calls"):
            async with self.client.redis.pipeline(transaction=False) as pipe:
                for refused in batch:
                    # redis-py asks for a dict of its own key and value types (a Mapping would do)
                    pipe.xadd(
                        self.key,
                        tp.cast(dict[FieldT, EncodableT], refused.to_fields()),
                        maxlen=self.max_len,
                        approximate=True,
                    )
                pipe.xtrim(self.key, minid=f"{max(0, oldest_ms)}-0", approximate=True)
                pipe.pexpire(self.key, window_ms)
                for minute, by_reason in counts.items():
                    key = self.count_key(minute)
                    for reason, count in by_reason.items():
                        pipe.hincrby(key, reason, count)
                    pipe.pexpireat(key, round(((minute + 1) * MINUTE + self.window) * 1000))
                await pipe.execute()

    async def flush(self, timeout: float) -> bool:
        """Wait until every queued entry is stored; False if that took longer than ``timeout``."""
        return await self._queue.flush(timeout)

    async def close(self, timeout: float = 2.0) -> None:
        """Store what is queued (for up to ``timeout``), then stop; the rest is counted dropped."""
        await self._queue.close(timeout)

    # -- reading (any replica) ---------------------------------------------------------

    async def latest(self, *, since: float, limit: int) -> list[RefusedCall]:
        """Refused calls of every gateway that ended at or after ``since``, newest first.
        Raises PoolError."""
        low = f"{max(0, round(since * 1000))}-0"
        async with self.client.guard("read refused calls"):
            entries = tp.cast(StreamEntries, await self.client.redis.xrevrange(self.key, "+", low, count=limit))
        found = []
        for _, fields in entries:
            refused = RefusedCall.from_fields(fields)
            if refused is not None and refused.ended_at >= since:
                found.append(refused)
        return found

    async def find(self, call_id: str) -> RefusedCall | None:
        """One refused call by its id, among those the stream still holds. Raises PoolError."""
        async with self.client.guard("read refused calls"):
            entries = tp.cast(
                StreamEntries, await self.client.redis.xrevrange(self.key, "+", "-", count=self.max_len * 2)
            )
        for _, fields in entries:
            if fields.get("call_id") == call_id:
                return RefusedCall.from_fields(fields)
        return None

    async def counts(self, *, since: float, now: float | None = None) -> dict[str, int]:
        """Refused calls of every gateway by reason, in the minutes from ``since``'s to now's.
        Raises PoolError."""
        now = time.time() if now is None else now
        minutes = range(int(since // MINUTE), int(now // MINUTE) + 1)
        async with self.client.guard("read refused calls"):
            async with self.client.redis.pipeline(transaction=False) as pipe:
                for minute in minutes:
                    pipe.hgetall(self.count_key(minute))
                replies = await pipe.execute()
        total: collections.Counter[str] = collections.Counter()
        for reply in replies:
            for reason, count in reply.items():
                with contextlib.suppress(ValueError):
                    total[reason] += int(count)
        return dict(total)
