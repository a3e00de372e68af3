"""Finding calls for the API: this gateway's own calls merged with every gateway's records.

Sources, most authoritative first:

1. this gateway's live calls (with live quality);
2. this gateway's recently ended calls (in memory, within the retention);
3. Redis: call records of every gateway (active and ended, with the quality their gateway
   last stored), and the slot leases, whose owners are exactly the calls holding a worker
   slot anywhere; that is how active calls of other replicas are listed cheaply;
4. the record of refusals (``calls/refusals.py``): calls that ended before their answer
   within the last hour, every gateway's, listed as ended calls with what is kept of them
   (no record of theirs is stored). Calls still ringing or queued on another replica are
   not listed (they hold no slot and have no record yet); their own gateway lists them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import typing as tp

from service.api.models import CallerId, CallInfo
from service.gateway import metrics
from service.gateway.calls.refusals import RefusalLog, RefusedCall
from service.gateway.calls.table import CallTable
from service.pool import ACTIVE, ENDED, CallRecords, PoolError, RegistryReader


def refused_fields(refused: RefusedCall) -> dict[str, tp.Any]:
    """A refused call's fields as ``RefusedCallInfo`` takes them (but its id)."""
    return {k: v for k, v in dataclasses.asdict(refused).items() if k != "call_id"}


def refused_info(refused: RefusedCall, *, on_this_gateway: bool = False) -> CallInfo:
    """A refused call as ``/v1/calls`` lists it: ended, never answered, the caller masked."""
    return CallInfo(
        id=refused.call_id,
        state=ENDED,
        ingress=refused.ingress,
        dialled=refused.dialled,
        caller=CallerId(number=refused.caller or None) if refused.caller else None,
        caller_masked=refused.caller or "unknown",
        sip_transport=refused.sip_transport,
        gateway_id=refused.gateway_id,
        started_at=refused.started_at,
        ended_at=refused.ended_at,
        end_reason=refused.reason,
        end_detail=refused.detail,
        on_this_gateway=on_this_gateway,
    )


def redis_failed() -> None:
    """Count a Redis operation of the API that failed (the answer then says so: 503 or partial)."""
    metrics.REDIS_ERRORS.labels("api").inc()


class CallDirectory:
    """Looks calls up for the API (see the module docstring)."""

    def __init__(
        self,
        table: CallTable,
        records: CallRecords | None,
        registry: RegistryReader | None,
        refusals: RefusalLog | None = None,
    ) -> None:
        self.table = table
        self.records = records
        self.registry = registry
        self.refusals = refusals if refusals is not None else RefusalLog()

    def local(self, call_id: str) -> CallInfo | None:
        call = self.table.get(call_id)
        if call is not None:
            return CallInfo.of(call.snapshot(), on_this_gateway=True)
        ended = self.table.ended(call_id)
        return CallInfo.of(ended.record, on_this_gateway=True) if ended is not None else None

    async def get(self, call_id: str) -> CallInfo | None:
        """The call, or None when no source knows it. Raises PoolError when only Redis could
        know it and Redis is down."""
        found = self.local(call_id)
        if found is not None:
            return found
        refused = next((r for r in self.refusals.local() if r.call_id == call_id), None)
        if refused is not None:
            return refused_info(refused, on_this_gateway=True)
        if self.records is None:
            return None
        try:
            record = await self.records.get(call_id)
        except ValueError:  # not a valid call id: no such call
            return None
        if record is not None:
            return CallInfo.of(record)
        refused = await self.refusals.get(call_id)
        return refused_info(refused) if refused is not None else None

    async def list(
        self, *, state: str | None = None, since: float | None = None, worker_id: str | None = None, limit: int = 100
    ) -> tuple[list[CallInfo], bool]:
        """Calls newest first, and whether the list is partial (Redis could not be read)."""
        merged: dict[str, CallInfo] = {}
        partial = False
        if self.records is not None:
            try:
                if state in (None, ENDED):
                    for record in await self.records.list(state=state, since=since, worker_id=worker_id, limit=limit):
                        merged[record.call_id] = CallInfo.of(record)
                if state in (None, ACTIVE):
                    merged.update(await self._remote_active(exclude=set(merged) | set(self.table.live)))
            except PoolError:
                redis_failed()
                partial = True
        if state in (None, ENDED):
            refused, refusals_partial = await self.refusals.latest(since=since, limit=limit)
            partial = partial or refusals_partial
            mine = {r.call_id for r in self.refusals.local()}
            for entry in refused:
                merged[entry.call_id] = refused_info(entry, on_this_gateway=entry.call_id in mine)
        for ended in self.table.recent_calls():
            merged[ended.record.call_id] = CallInfo.of(ended.record, on_this_gateway=True)
        for call in list(self.table.live.values()):
            merged[call.id] = CallInfo.of(call.snapshot(), on_this_gateway=True)
        calls = [
            c
            for c in merged.values()
            if (state is None or (state == ACTIVE) == c.active)
            and (since is None or c.started_at >= since)
            and (worker_id is None or c.worker_id == worker_id)
        ]
        calls.sort(key=lambda c: c.started_at, reverse=True)
        return calls[:limit], partial

    async def _remote_active(self, exclude: set[str]) -> dict[str, CallInfo]:
        """Calls holding a worker slot anywhere (the leases' owners), from their records."""
        assert self.registry is not None and self.records is not None
        holders: dict[str, tuple[str, int]] = {}
        for worker in await self.registry.workers():
            for lease in worker.leases:
                if lease.owner and lease.owner not in exclude:
                    holders[lease.owner] = (worker.worker_id, lease.slot)
        ids = list(holders)
        records = await asyncio.gather(*(self.records.get(i) for i in ids))
        found: dict[str, CallInfo] = {}
        for call_id, record in zip(ids, records, strict=True):
            if record is not None:
                info = CallInfo.of(record)
            else:  # a lease without a record (its record expired or was never written)
                worker_id, slot = holders[call_id]
                info = CallInfo(id=call_id, state=ACTIVE, worker_id=worker_id, slot=slot, started_at=0.0)
            if info.active:
                found[call_id] = info
        return found
