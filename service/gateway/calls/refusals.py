"""Calls that ended before their answer: counted, and kept a short while for the dashboard.

A call refused before its answer (488 for its offer, 503 busy, draining or unready, 500)
or left by its caller before it (a CANCEL while it waited for a slot) is not a call the
call center had, and anyone allowed to send an INVITE can make thousands: it gets no call
record and no transcript (those live for the retention). Instead each one is

* counted in ``moshimoshi_calls_total{ingress,outcome}`` (as every call is);
* kept in this gateway's memory, the latest ``MAX_KEPT`` for ``WINDOW_SECONDS``;
* written to a store shared by the gateways, bounded whatever the number of refusals
  (``control/refusal_store.py``: a capped Redis stream and counts per minute), so that any
  replica's API lists and counts the refusals of all.

What is kept of a refused call: when, the status the caller got and the end reason (why),
the ingress and SIP transport, the dialled number, the signalling source's address (SIP:
the trunk) and the caller's number masked but for its last four digits. No name, URI or
SDP. The API serves it as ``GET /v1/refusals`` (the dashboard's "calls refused in the last
hour, and why") and lists refused calls among ended ones in ``GET /v1/calls``.
"""

from __future__ import annotations

import collections
import time
import typing as tp
from dataclasses import dataclass, fields

from service.call_record import CallRecord
from service.pool import PoolError
from service.privacy import mask_number
from sip.identity import CallerIdentity

WINDOW_SECONDS = 3600.0
MAX_KEPT = 1000
DETAIL_CHARS = 160
MINUTE = 60


@dataclass(frozen=True)
class RefusedCall:
    """One call that ended before its answer, as the record of refusals keeps it."""

    call_id: str
    ended_at: float
    started_at: float
    reason: str  # the call's end reason: rejected-busy, rejected-codec, cancelled, error...
    status: int | None = None  # the SIP (or, WebRTC, HTTP) status the caller got; None: none
    detail: str = ""
    ingress: str = ""
    sip_transport: str = ""
    caller: str = ""  # the caller's number masked but for its last four digits; "" when withheld
    dialled: str = ""
    source: str = ""  # SIP: the signalling peer's address (the trunk); not kept for WebRTC
    gateway_id: str = ""

    @classmethod
    def of(cls, record: CallRecord, status: int | None, identity: CallerIdentity | None = None) -> RefusedCall:
        """From a call's record (its end reason set) and the status its caller got."""
        number = "" if identity is None or identity.withheld else identity.caller.number
        source = record.source.rpartition(":")[0].strip("[]") if record.ingress == "sip" else ""
        return cls(
            call_id=record.call_id,
            ended_at=record.ended_at or time.time(),
            started_at=record.started_at,
            reason=record.end_reason or "unknown",
            status=status,
            detail=(record.end_detail or "")[:DETAIL_CHARS],
            ingress=record.ingress,
            sip_transport=record.sip_transport,
            caller=mask_number(number),
            dialled=identity.dialled if identity is not None else "",
            source=source,
            gateway_id=record.gateway_id,
        )

    def to_fields(self) -> dict[str, str]:
        """The stored form: strings, empty fields left out."""
        out = {}
        for name in _FIELDS:
            value = getattr(self, name)
            if value is None or value == "":
                continue
            out[name] = repr(value) if isinstance(value, float) else str(value)
        return out

    @classmethod
    def from_fields(cls, stored: tp.Mapping[str, str]) -> RefusedCall | None:
        """From the stored form; None when it is not one (skipped by readers)."""
        try:
            status = stored.get("status")
            return cls(
                call_id=stored["call_id"],
                ended_at=float(stored["ended_at"]),
                started_at=float(stored["started_at"]),
                reason=stored["reason"],
                status=int(status) if status else None,
                **{name: stored.get(name, "") for name in _TEXT_FIELDS},
            )
        except (KeyError, ValueError):
            return None


_FIELDS = tuple(f.name for f in fields(RefusedCall))
_TEXT_FIELDS = ("detail", "ingress", "sip_transport", "caller", "dialled", "source", "gateway_id")


class RefusalSink(tp.Protocol):
    """Where refused calls are shared beyond this gateway (``control/refusal_store.py``)."""

    def append(self, refused: RefusedCall) -> None: ...
    async def latest(self, *, since: float, limit: int) -> list[RefusedCall]: ...
    async def find(self, call_id: str) -> RefusedCall | None: ...
    async def counts(self, *, since: float, now: float | None = None) -> dict[str, int]: ...


@dataclass
class RefusalSummary:
    """Refused calls within the window: how many by reason, and the latest of them."""

    window_seconds: float
    by_reason: dict[str, int]
    latest: list[RefusedCall]
    partial: bool  # the shared store could not be read: this gateway's own only

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())


class RefusalLog:
    """This gateway's refused calls in memory, and the shared store behind them (if any)."""

    def __init__(
        self, store: RefusalSink | None = None, *, window: float = WINDOW_SECONDS, capacity: int = MAX_KEPT
    ) -> None:
        self.store = store
        self.window = window
        self.recent: collections.deque[RefusedCall] = collections.deque(maxlen=capacity)
        self._by_minute: dict[int, collections.Counter[str]] = {}

    def add(self, refused: RefusedCall) -> None:
        self.recent.appendleft(refused)
        minute = int(refused.ended_at // MINUTE)
        self._by_minute.setdefault(minute, collections.Counter())[refused.reason] += 1
        oldest = int((refused.ended_at - self.window) // MINUTE)
        for old in [m for m in self._by_minute if m < oldest]:
            del self._by_minute[old]
        if self.store is not None:
            self.store.append(refused)

    # -- this gateway's --------------------------------------------------------------------

    def local(self, since: float | None = None, now: float | None = None) -> list[RefusedCall]:
        """This gateway's refused calls within the window (and since ``since``), newest first."""
        cutoff = max((time.time() if now is None else now) - self.window, since or 0.0)
        return [r for r in self.recent if r.ended_at >= cutoff]

    def local_counts(self, since: float) -> dict[str, int]:
        total: collections.Counter[str] = collections.Counter()
        for minute, by_reason in self._by_minute.items():
            if minute >= int(since // MINUTE):
                total.update(by_reason)
        return dict(total)

    # -- every gateway's (the store), this gateway's when it cannot be read -------------------

    async def latest(self, *, since: float | None = None, limit: int = 100) -> tuple[list[RefusedCall], bool]:
        """Refused calls within the window, newest first, and whether the list is partial.
        Raises nothing: a store that cannot be read gives this gateway's own (partial)."""
        now = time.time()
        since = max(now - self.window, since or 0.0)
        mine = self.local(since, now)
        if self.store is None:
            return mine[:limit], False
        try:
            shared = await self.store.latest(since=since, limit=limit)
        except PoolError:
            return mine[:limit], True
        merged = {r.call_id: r for r in shared}
        for refused in mine:  # written behind: the latest may not be in the store yet
            merged.setdefault(refused.call_id, refused)
        return sorted(merged.values(), key=lambda r: r.ended_at, reverse=True)[:limit], False

    async def get(self, call_id: str) -> RefusedCall | None:
        """A refused call of any gateway; raises PoolError when only the store could know it."""
        found = next((r for r in self.local() if r.call_id == call_id), None)
        if found is not None or self.store is None:
            return found
        refused = await self.store.find(call_id)
        return refused if refused is not None and refused.ended_at >= time.time() - self.window else None

    async def summary(self, *, limit: int = 100) -> RefusalSummary:
        now = time.time()
        since = now - self.window
        latest, partial = await self.latest(since=since, limit=limit)
        counts = self.local_counts(since)
        if self.store is not None and not partial:
            try:
                shared = await self.store.counts(since=since, now=now)
            except PoolError:
                partial = True
            else:  # this gateway's latest may not be in the store yet
                counts = {reason: max(shared.get(reason, 0), counts.get(reason, 0)) for reason in {*shared, *counts}}
        return RefusalSummary(window_seconds=self.window, by_reason=counts, latest=latest, partial=partial)
