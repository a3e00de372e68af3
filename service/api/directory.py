"""Finding calls for the API: this gateway's own calls merged with every gateway's records.

Sources, most authoritative first:

1. this gateway's live calls (with live quality);
2. this gateway's recently ended calls (in memory, within the retention);
3. Redis: call records of every gateway (active and ended, with the quality their gateway
   last stored), and the slot leases, whose owners are exactly the calls holding a worker
   slot anywhere; that is how active calls of other replicas are listed cheaply.
"""

from __future__ import annotations

import asyncio
import time
import typing as tp

from service.api.models import CallerId, CallInfo, CallQuality, Redirect
from service.gateway import metrics
from service.pool import ACTIVE, ENDED, CallRecord, PoolError
from sip.identity import ANONYMOUS_URI, CallerIdentity

if tp.TYPE_CHECKING:
    from service.gateway.calls.call import Call
    from service.gateway.main import Gateway

RECORD_ONLY_QUALITY = ("ingress", "gateway", "sampling")


def _duration(answered_at: float | None, ended_at: float | None) -> float:
    if not answered_at:
        return 0.0
    return round(max(0.0, (ended_at or time.time()) - answered_at), 3)


def _sampling(value: tp.Any) -> dict[str, tp.Any] | None:
    return value if isinstance(value, dict) else None


def shown_identity(identity: CallerIdentity | dict[str, tp.Any] | None, from_uri: str) -> dict[str, tp.Any]:
    """The identity fields of a CallInfo, the caller's privacy honoured: a withheld caller
    shows no number, name or URI (and an anonymous ``from_uri``), for every token scope."""
    if identity is None:
        return {"from_uri": from_uri}
    if isinstance(identity, dict):
        identity = CallerIdentity.from_dict(identity)
    withheld = identity.withheld
    party = identity.caller
    caller = CallerId(
        number=None if withheld else party.number or None,
        name=None if identity.name_withheld else party.name or None,
        uri=None if withheld else party.uri or None, source=identity.caller_source, withheld=withheld,
        privacy=list(identity.privacy))
    redirects: list[Redirect] = []
    if not identity.redirects_withheld:
        for header, parties in (("diversion", identity.diversion), ("history-info", identity.history_info)):
            for entry in parties:
                redirects.append(Redirect(header=header, number=entry.number or None, uri=entry.uri or None,
                                          reason=entry.params.get("reason")))
    return {"from_uri": ANONYMOUS_URI if withheld else from_uri, "dialled": identity.dialled, "caller": caller,
            "redirects": redirects}


def from_call(call: Call, gateway_id: str) -> CallInfo:
    """A live call of this gateway, with live quality."""
    record = call.record()
    quality = dict(call.media.quality()) if call.media is not None else {}
    quality["failovers"] = call.failovers
    return CallInfo(
        id=call.id, state=call.state, ingress=call.ingress, to_uri=call.to_uri,
        codec=call.codec, sip_transport=call.sip_transport, media_encryption=call.media_encryption,
        worker_id=call.worker_id, slot=call.slot, model=call.model, license=call.license,
        sampling=call.sampling, gateway_id=gateway_id, started_at=call.started_at, answered_at=call.answered_at,
        ended_at=call.ended_at, end_reason=call.end_reason, end_detail=call.end_detail,
        duration_s=record["duration_s"], on_this_gateway=True, quality=CallQuality(**quality) if quality else None,
        **shown_identity(call.identity, call.from_uri))


def from_summary(summary: dict[str, tp.Any], gateway_id: str) -> CallInfo:
    """An ended call of this gateway (``Gateway.recent``)."""
    quality = summary.get("quality")
    return CallInfo(
        id=summary["id"], state="ended", ingress=summary.get("ingress", ""),
        to_uri=summary.get("to", ""), codec=summary.get("codec", ""), worker_id=summary.get("worker_id", ""),
        sip_transport=summary.get("sip_transport", ""), media_encryption=summary.get("media_encryption", ""),
        slot=summary.get("slot"), model=summary.get("model", ""), license=summary.get("license", ""),
        sampling=_sampling(summary.get("sampling")), gateway_id=gateway_id,
        started_at=summary.get("started_at", 0.0), answered_at=summary.get("answered_at"),
        ended_at=summary.get("ended_at"), end_reason=summary.get("end_reason", ""),
        end_detail=summary.get("end_detail", ""), duration_s=summary.get("duration_s", 0.0), on_this_gateway=True,
        quality=CallQuality(**quality, failovers=summary.get("failovers")) if quality else None,
        **shown_identity(summary.get("identity"), summary.get("from", "")))


def from_record(record: CallRecord) -> CallInfo:
    """A call of any gateway as stored in Redis."""
    quality = {k: v for k, v in record.quality.items() if k not in RECORD_ONLY_QUALITY}
    return CallInfo(
        id=record.call_id, state=record.state, ingress=str(record.quality.get("ingress", "")),
        to_uri=record.to_uri, codec=record.codec, worker_id=record.worker_id,
        sip_transport=record.sip_transport, media_encryption=record.media_encryption,
        slot=record.slot, gateway_id=str(record.quality.get("gateway", "")),
        sampling=_sampling(record.quality.get("sampling")), started_at=record.started_at,
        answered_at=record.answered_at, ended_at=record.ended_at, end_reason=record.end_reason,
        end_detail=record.end_detail,
        duration_s=_duration(record.answered_at, record.ended_at if record.state == ENDED else None),
        quality=CallQuality(**quality) if quality else None, **shown_identity(record.identity, record.from_uri))


def redis_failed() -> None:
    """Count a Redis operation of the API that failed (the answer then says so: 503 or partial)."""
    metrics.REDIS_ERRORS.labels("api").inc()


def is_active(info: CallInfo) -> bool:
    return info.state != "ended"


class CallDirectory:
    """Looks calls up for the API (see the module docstring for the sources)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def _recent(self) -> tp.Iterator[dict[str, tp.Any]]:
        cutoff = time.time() - self.gateway.settings.call_retention_seconds
        for summary in self.gateway.recent:
            if (summary.get("ended_at") or 0.0) >= cutoff:
                yield summary

    def local(self, call_id: str) -> CallInfo | None:
        gateway = self.gateway
        call = gateway.calls.get(call_id)
        if call is not None:
            return from_call(call, gateway.gateway_id)
        for summary in self._recent():
            if summary["id"] == call_id:
                return from_summary(summary, gateway.gateway_id)
        return None

    def recent_summary(self, call_id: str) -> dict[str, tp.Any] | None:
        """An ended call of this gateway within the retention (with its transcript)."""
        return next((s for s in self._recent() if s["id"] == call_id), None)

    async def get(self, call_id: str) -> CallInfo | None:
        """The call, or None when no source knows it. Raises PoolError when only Redis could
        know it and Redis is down."""
        found = self.local(call_id)
        if found is not None or self.gateway.records is None:
            return found
        try:
            record = await self.gateway.records.get(call_id)
        except ValueError:  # not a valid call id: no such call
            return None
        return from_record(record) if record is not None else None

    async def list(self, *, state: str | None = None, since: float | None = None,
                   worker_id: str | None = None, limit: int = 100) -> tuple[list[CallInfo], bool]:
        """Calls newest first, and whether the list is partial (Redis could not be read)."""
        gateway = self.gateway
        merged: dict[str, CallInfo] = {}
        partial = False
        if gateway.records is not None:
            try:
                if state in (None, ENDED):
                    for record in await gateway.records.list(state=state, since=since, worker_id=worker_id,
                                                             limit=limit):
                        merged[record.call_id] = from_record(record)
                if state in (None, ACTIVE):
                    merged.update(await self._remote_active(exclude=set(merged) | set(gateway.calls)))
            except PoolError:
                redis_failed()
                partial = True
        for summary in self._recent():
            merged[summary["id"]] = from_summary(summary, gateway.gateway_id)
        for call in list(gateway.calls.values()):
            merged[call.id] = from_call(call, gateway.gateway_id)
        calls = [c for c in merged.values()
                 if (state is None or (state == ACTIVE) == is_active(c))
                 and (since is None or c.started_at >= since)
                 and (worker_id is None or c.worker_id == worker_id)]
        calls.sort(key=lambda c: c.started_at, reverse=True)
        return calls[:limit], partial

    async def _remote_active(self, exclude: set[str]) -> dict[str, CallInfo]:
        """Calls holding a worker slot anywhere (the leases' owners), from their records."""
        gateway = self.gateway
        assert gateway.registry is not None and gateway.records is not None
        holders: dict[str, tuple[str, int]] = {}
        for worker in await gateway.registry.workers():
            for lease in worker.leases:
                if lease.owner and lease.owner not in exclude:
                    holders[lease.owner] = (worker.worker_id, lease.slot)
        ids = list(holders)
        records = await asyncio.gather(*(gateway.records.get(i) for i in ids))
        found: dict[str, CallInfo] = {}
        for call_id, record in zip(ids, records, strict=True):
            if record is not None:
                info = from_record(record)
            else:  # a lease without a record (its record expired or was never written)
                worker, slot = holders[call_id]
                info = CallInfo(id=call_id, state=ACTIVE, worker_id=worker, slot=slot, started_at=0.0)
            if info.state != ENDED:
                found[call_id] = info
        return found
