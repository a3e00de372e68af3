"""Call records: one hash per call with a retention TTL, and a time-ordered index.

A record lives for ``active_ttl`` seconds after its last update while the call is active
(long enough for the longest call: a gateway that dies cannot leave one forever) and for
``retention`` seconds once it has ended. The index (a zset scored by start time) is
trimmed of entries whose record has expired, on every create and every listing.
"""

from __future__ import annotations

import dataclasses
import json
import time
import typing as tp
from dataclasses import dataclass, field

from service.pool.connection import PoolClient
from service.pool.keys import check_id

ACTIVE = "active"
ENDED = "ended"
DEFAULT_RETENTION_SECONDS = 7 * 24 * 3600.0
DEFAULT_ACTIVE_TTL_SECONDS = 6 * 3600.0
QUALITY_PREFIX = "q."
TRIM_BATCH = 100
MAX_SCAN = 20_000  # most index entries one listing looks at

def _json_object(text: str) -> dict[str, tp.Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


# field name → parser of its stored text
_FIELDS: dict[str, tp.Callable[[str], tp.Any]] = {
    "call_id": str, "state": str, "sip_call_id": str, "from_uri": str, "to_uri": str, "codec": str,
    "sip_transport": str, "media_encryption": str,
    "worker_id": str, "slot": int, "started_at": float, "answered_at": float, "ended_at": float,
    "end_reason": str, "end_detail": str, "identity": _json_object,
}
UPDATABLE = frozenset(_FIELDS) - {"call_id", "state", "started_at"}


@dataclass
class CallRecord:
    """One call as stored. ``quality`` holds free-form fields (MOS, loss, jitter...)."""

    call_id: str
    state: str = ACTIVE
    sip_call_id: str = ""
    from_uri: str = ""
    to_uri: str = ""
    codec: str = ""
    sip_transport: str = ""  # UDP, TCP, TLS (SIP calls; empty for WebRTC)
    media_encryption: str = ""  # none, SDES-SRTP, DTLS-SRTP
    worker_id: str = ""
    slot: int | None = None
    started_at: float = field(default_factory=time.time)
    answered_at: float | None = None
    ended_at: float | None = None
    end_reason: str = ""
    end_detail: str = ""
    # SIP identity headers and the dialled number as received (sip.identity.CallerIdentity);
    # the API shows them with the caller's Privacy honoured, the record keeps them whole.
    identity: dict[str, tp.Any] | None = None
    quality: dict[str, tp.Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, tp.Any]:
        return dataclasses.asdict(self)


def _encode(value: tp.Any) -> str:
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    return repr(value) if isinstance(value, float) else str(value)


def _encode_fields(values: dict[str, tp.Any], quality: dict[str, tp.Any] | None) -> list[str]:
    flat: list[str] = []
    for name, value in values.items():
        if value is not None:
            flat += [name, _encode(value)]
    for name, value in (quality or {}).items():
        flat += [QUALITY_PREFIX + name, json.dumps(value, ensure_ascii=False)]
    return flat


def _decode(raw: dict[str, str]) -> CallRecord:
    values: dict[str, tp.Any] = {}
    quality: dict[str, tp.Any] = {}
    for name, text in raw.items():
        if name.startswith(QUALITY_PREFIX):
            try:
                quality[name[len(QUALITY_PREFIX):]] = json.loads(text)
            except ValueError:
                quality[name[len(QUALITY_PREFIX):]] = text
        elif name in _FIELDS:
            try:
                values[name] = _FIELDS[name](text)
            except ValueError:
                continue
    return CallRecord(**values, quality=quality)


class CallRecords:
    """Create, update, end, get and list call records. All methods raise PoolUnavailable."""

    def __init__(self, client: PoolClient, *, retention: float = DEFAULT_RETENTION_SECONDS,
                 active_ttl: float = DEFAULT_ACTIVE_TTL_SECONDS) -> None:
        if retention <= 0 or active_ttl <= 0:
            raise ValueError("retention and active_ttl must be positive")
        self.client = client
        self.keys = client.keys
        self.retention_ms = round(retention * 1000)
        self.active_ttl_ms = round(active_ttl * 1000)

    async def create(self, record: CallRecord) -> bool:
        """Store a new record; False if one with that call id exists already."""
        check_id("call_id", record.call_id)
        values = {name: getattr(record, name) for name in _FIELDS}
        values["state"] = record.state if record.state in (ACTIVE, ENDED) else ACTIVE
        cutoff_ms = round((time.time() * 1000) - self.retention_ms)
        async with self.client.guard("create call record"):
            created = await self.client.script("call_create")(
                keys=[self.keys.call(record.call_id), self.keys.calls],
                args=[self.keys.prefix, record.call_id, round(record.started_at * 1000), self.active_ttl_ms,
                      self.retention_ms, cutoff_ms, TRIM_BATCH, *_encode_fields(values, record.quality)])
        return bool(created)

    async def update(self, call_id: str, *, quality: dict[str, tp.Any] | None = None,
                     **fields: tp.Any) -> bool:
        """Set some fields (``answered_at=...``, ``worker_id=...``) and merge ``quality``;
        False if the record does not exist (never created, or expired)."""
        unknown = set(fields) - UPDATABLE
        if unknown:
            raise ValueError(f"not updatable call record fields: {', '.join(sorted(unknown))}")
        return await self._update(call_id, fields, quality)

    async def end(self, call_id: str, reason: str, *, ended_at: float | None = None,
                  quality: dict[str, tp.Any] | None = None, detail: str = "") -> bool:
        """Mark the call ended (its record then lives ``retention`` seconds); ``detail``
        says why in words when the reason alone does not."""
        fields: dict[str, tp.Any] = {"state": ENDED, "end_reason": reason,
                                     "ended_at": time.time() if ended_at is None else ended_at}
        if detail:
            fields["end_detail"] = detail
        return await self._update(call_id, fields, quality)

    async def _update(self, call_id: str, fields: dict[str, tp.Any], quality: dict[str, tp.Any] | None) -> bool:
        check_id("call_id", call_id)
        flat = _encode_fields(fields, quality)
        if not flat:
            return await self.get(call_id) is not None
        async with self.client.guard("update call record"):
            updated = await self.client.script("call_update")(
                keys=[self.keys.call(call_id)], args=[self.active_ttl_ms, self.retention_ms, *flat])
        return bool(updated)

    async def get(self, call_id: str) -> CallRecord | None:
        check_id("call_id", call_id)
        async with self.client.guard("get call record"):
            raw = await self.client.redis.hgetall(self.keys.call(call_id))
        return _decode(raw) if raw else None

    async def list(self, *, state: str | None = None, since: float | None = None,
                   worker_id: str | None = None, limit: int = 100) -> list[CallRecord]:
        """Records newest first (by start time), optionally only ``state`` (active/ended),
        started at or after ``since`` (epoch seconds), or on ``worker_id``."""
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
                ids = await redis.zrevrangebyscore(self.keys.calls, "+inf", low, start=offset, num=batch)
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
                    record = _decode(raw)
                    if state is not None and record.state != state:
                        continue
                    if worker_id is not None and record.worker_id != worker_id:
                        continue
                    found.append(record)
                    if len(found) == limit:
                        break
            if gone:
                await redis.zrem(self.keys.calls, *gone)
        return found
