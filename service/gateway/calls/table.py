"""The gateway's calls: those in progress, and those that ended within the retention.

Ended calls stay in memory (with their transcript, personal data) until the retention
says they go, as their Redis copies do; the API serves them from here first.
"""

from __future__ import annotations

import asyncio
import time
import typing as tp
from dataclasses import dataclass

from service.call_record import CallRecord
from service.gateway.calls.transcript import TranscriptEvent

if tp.TYPE_CHECKING:
    from service.gateway.calls.call import Call

RECENT_CALLS = 200  # ended calls kept in memory at most


@dataclass
class EndedCall:
    """A call that ended on this gateway: its final record and its whole transcript."""

    record: CallRecord
    transcript: list[TranscriptEvent]


class CallTable:
    """Live calls by id, recently ended ones newest first, and an event set while none is live."""

    def __init__(self, retention_seconds: float) -> None:
        self.retention_seconds = retention_seconds
        self.live: dict[str, Call] = {}
        self.recent: list[EndedCall] = []
        self.idle = asyncio.Event()
        self.idle.set()

    def __len__(self) -> int:
        return len(self.live)

    def get(self, call_id: str) -> Call | None:
        return self.live.get(call_id)

    def add(self, call: Call) -> None:
        self.live[call.id] = call
        self.idle.clear()

    def remove(self, call: Call, *, keep: bool = True) -> bool:
        """Move an ended call to the recent ones (just drop it unless ``keep``: a call never
        answered is kept in the record of refusals instead); False if it was not live."""
        if self.live.pop(call.id, None) is None:
            return False
        if not self.live:
            self.idle.set()
        if not keep:
            return True
        self.recent.insert(0, EndedCall(call.record.copy(), list(call.transcript)))
        del self.recent[RECENT_CALLS:]
        return True

    def refresh(self, call: Call) -> None:
        """An ended call's record changed after its end (its recording was stored)."""
        for ended in self.recent:
            if ended.record.call_id == call.id:
                ended.record = call.record.copy()
                return

    def recent_calls(self, now: float | None = None) -> tp.Iterator[EndedCall]:
        """Ended calls within the retention, newest first."""
        cutoff = (time.time() if now is None else now) - self.retention_seconds
        for ended in self.recent:
            if (ended.record.ended_at or 0.0) >= cutoff:
                yield ended

    def ended(self, call_id: str) -> EndedCall | None:
        return next((e for e in self.recent_calls() if e.record.call_id == call_id), None)

    def forget_expired(self, now: float | None = None) -> int:
        """Drop ended calls older than the retention from memory; returns how many."""
        kept = list(self.recent_calls(now))
        dropped = len(self.recent) - len(kept)
        if dropped:
            self.recent[:] = kept
        return dropped
