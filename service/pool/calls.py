"""Call records: one hash per call with a retention TTL, and a time-ordered index.

The record itself (its fields and their stored form) is ``service.call_record``.

A record lives for ``active_ttl`` seconds after its last update while the call is active
(long enough for the longest call: a gateway that dies cannot leave one forever) and for
``retention`` seconds once it has ended. The index (a zset scored by start time) is
trimmed of entries whose record has expired, on every create and every listing.
"""

from __future__ import annotations

import time
import typing as tp

from service.call_record import ACTIVE, ENDED, CallQuality, CallRecord, quality_fields
from service.pool.connection import PoolClient
from service.pool.keys import check_id

__all__ = ["ACTIVE", "ENDED", "CallRecord", "CallRecords"]

DEFAULT_RETENTION_SECONDS = 7 * 24 * 3600.0
DEFAULT_ACTIVE_TTL_SECONDS = 6 * 3600.0
TRIM_BATCH = 100
MAX_SCAN = 20_000  # most index entries one listing looks at
NOT_UPDATABLE = frozenset({"call_id", "started_at", "quality"})  # quality is merged, through ``quality=``


def _flat(fields: dict[str, str]) -> list[str]:
    return [item for pair in fields.items() for item in pair]


class CallRecords:
    """Create, update, end, get and list call records. All methods raise PoolUnavailable."""

    def __init__(
        self,
        client: PoolClient,
        *,
        retention: float = DEFAULT_RETENTION_SECONDS,
        active_ttl: float = DEFAULT_ACTIVE_TTL_SECONDS,
    ) -> None:
        if retention <= 0 or active_ttl <= 0:
            raise ValueError("retention and active_ttl must be positive")
        self.client = client
        self.keys = client.keys
        self.retention_ms = round(retention * 1000)
        self.active_ttl_ms = round(active_ttl * 1000)

    async def create(self, record: CallRecord) -> bool:
        """Store a new record; False if one with that call id exists already."""
        check_id("call_id", record.call_id)
        cutoff_ms = round((time.time() * 1000) - self.retention_ms)
        async with self.client.guard("create call record"):
            created = await self.client.script("call_create")(
                keys=[self.keys.call(record.call_id), self.keys.calls],
                args=[
                    self.keys.prefix,
                    record.call_id,
                    round(record.started_at * 1000),
                    self.active_ttl_ms,
                    self.retention_ms,
                    cutoff_ms,
                    TRIM_BATCH,
                    *_flat(record.to_fields()),
                ],
            )
        return bool(created)

    async def update(self, call_id: str, *, quality: CallQuality | None = None, **fields: tp.Any) -> bool:
        """Set some fields (``answered_at=...``, ``worker_id=...``; None values are left as
        they are) and merge ``quality``'s measured fields; False if the record does not
        exist (never created, or expired)."""
        unknown = set(fields) - set(CallRecord.__dataclass_fields__) | set(fields) & NOT_UPDATABLE
        if unknown:
            raise ValueError(f"not updatable call record fields: {', '.join(sorted(unknown))}")
        return await self._update(call_id, CallRecord(call_id, **fields).to_fields(only=fields), quality)

    async def end(
        self,
        call_id: str,
        reason: str,
        *,
        ended_at: float | None = None,
        quality: CallQuality | None = None,
        detail: str = "",
        **fields: tp.Any,
    ) -> bool:
        """Mark the call ended (its record then lives ``retention`` seconds); ``detail``
        says why in words when the reason alone does not; ``fields`` are set with it (as
        in ``update``)."""
        unknown = set(fields) - set(CallRecord.__dataclass_fields__) | set(fields) & NOT_UPDATABLE
        if unknown:
            raise ValueError(f"not updatable call record fields: {', '.join(sorted(unknown))}")
        ended = CallRecord(
            call_id,
            state=ENDED,
            end_reason=reason,
            end_detail=detail,
            ended_at=time.time() if ended_at is None else ended_at,
            **fields,
        )
        names = ["state", "end_reason", "ended_at", *fields] + (["end_detail"] if detail else [])
        return await self._update(call_id, ended.to_fields(only=names), quality)

    async def _update(self, call_id: str, fields: dict[str, str], quality: CallQuality | None) -> bool:
        check_id("call_id", call_id)
        flat = _flat({**fields, **quality_fields(quality)})
        if not flat:
            return await self.get(call_id) is not None
        async with self.client.guard("update call record"):
            updated = await self.client.script("call_update")(
                keys=[self.keys.call(call_id)], args=[self.active_ttl_ms, self.retention_ms, *flat]
            )
        return bool(updated)

    async def get(self, call_id: str) -> CallRecord | None:
        check_id("call_id", call_id)
        async with self.client.guard("get call record"):
            raw = await self.client.redis.hgetall(self.keys.call(call_id))
        return CallRecord.from_fields(tp.cast(dict[str, str], raw)) if raw else None  # decoded replies

    async def list(
        self, *, state: str | None = None, since: float | None = None, worker_id: str | None = None, limit: int = 100
    ) -> list[CallRecord]:
        """Records newest first (by start time), optionally only ``state`` (active: in
        progress, in any state but ended; ended), started at or after ``since`` (epoch
        seconds), or on ``worker_id``."""
        if state not in (None, ACTIVE, ENDED):
            raise ValueError(f"state must be {ACTIVE!r} or {ENDED!r}")
        if limit < 1:
            return []
        redis = self.client.redis
        low = "-inf" if since is None else round(since * 1000)
        found: list[CallRecord] = []
        gone: list[str] = []
        offset = 0
        batch = max(limit * 2, 100)
        async with self.client.guard("list call records"):
            while len(found) < limit and offset < MAX_SCAN:
                ids = tp.cast(
                    list[str],
                    await redis.zrevrangebyscore(  # decoded replies
                        self.keys.calls, "+inf", low, start=offset, num=batch
                    ),
                )
                if not ids:
                    break
                offset += len(ids)
                async with redis.pipeline(transaction=False) as pipe:
                    for call_id in ids:
                        pipe.hgetall(self.keys.call(call_id))
                    raws = await pipe.execute()
                for call_id, raw in zip(ids, raws, strict=True):
                    if not raw:
                        gone.append(call_id)
                        continue
                    try:
                        record = CallRecord.from_fields(raw)
                    except ValueError:
                        continue
                    if state is not None and record.ended != (state == ENDED):
                        continue
                    if worker_id is not None and record.worker_id != worker_id:
                        continue
                    found.append(record)
                    if len(found) == limit:
                        break
            if gone:
                await redis.zrem(self.keys.calls, *gone)
        return found
