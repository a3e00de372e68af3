"""Calls' records into Redis, behind the media path: best effort, in order, the end retried.

Media never waits for Redis: each write runs in the background, after the call's previous
write (an update or the end reaching Redis before the create would be lost, the record
staying "active"). A write Redis refuses is counted and logged; the end of a call is
retried for up to ``RECORD_END_RETRY_SECONDS``. Without a pool nothing is written.
"""

from __future__ import annotations

import asyncio
import logging
import typing as tp

from service.call_record import CallQuality
from service.gateway import metrics
from service.pool import CallRecords, PoolError, Retries

if tp.TYPE_CHECKING:
    from service.gateway.calls.call import Call

log = logging.getLogger(__name__)

RECORD_END_RETRY_SECONDS = 300.0  # a call's end is retried this long if Redis refuses it


class CallRecorder:
    """Creates, updates and ends calls' records (see the module docstring)."""

    def __init__(self, records: CallRecords | None, retries: Retries | None = None) -> None:
        self.records = records
        self.retries = retries
        self.tasks: set[asyncio.Task[None]] = set()
        self._latest: dict[str, asyncio.Task[None]] = {}  # call id → its latest write

    @property
    def writing(self) -> int:
        """Calls with a write not done yet."""
        return len(self._latest)

    def create(self, call: Call) -> None:
        if self.records is not None:
            self._write(call.id, "record-create", self.records.create(call.record.copy()))

    def update(self, call: Call, *names: str) -> None:
        """Store these fields of the call's record, as they are now."""
        if self.records is None:
            return
        values = {name: getattr(call.record, name) for name in names}
        self._write(call.id, "record-update", self.records.update(call.id, **values))

    def answered(self, call: Call) -> None:
        """An answered call's state, worker, slot, model, codec, encryption, sampling and
        recording."""
        self.update(
            call,
            "state",
            "answered_at",
            "worker_id",
            "slot",
            "model",
            "license",
            "codec",
            "media_encryption",
            "sampling",
            "recording",
        )

    def quality(self, call: Call, quality: CallQuality) -> None:
        """Merge a live call's quality into its record."""
        if self.records is not None:
            self._write(call.id, "record-update", self.records.update(call.id, quality=quality))

    def end(self, call: Call) -> None:
        records = self.records
        if records is None:
            return
        record = call.record
        reason, ended_at, detail, quality = (
            record.end_reason or "unknown",
            record.ended_at,
            record.end_detail,
            record.quality,
        )
        phases = {"phases": list(record.phases)} if record.phases else {}

        async def end() -> bool:
            return await records.end(call.id, reason, ended_at=ended_at, quality=quality, detail=detail, **phases)

        write = (
            end()
            if self.retries is None
            else self.retries.run("record-end", end, give_up_after=RECORD_END_RETRY_SECONDS)
        )
        self._write(call.id, "record-end", write)

    def _write(self, call_id: str, what: str, write: tp.Coroutine[tp.Any, tp.Any, tp.Any]) -> None:
        previous = self._latest.get(call_id)

        async def in_order() -> None:
            if previous is not None:
                await asyncio.wait([previous])
            try:
                await write
            except PoolError as exc:
                metrics.REDIS_ERRORS.labels(what).inc()
                log.warning("%s failed: %s", what, exc)

        task = asyncio.create_task(in_order())
        self.tasks.add(task)
        self._latest[call_id] = task

        def done(finished: asyncio.Task[None]) -> None:
            self.tasks.discard(finished)
            if self._latest.get(call_id) is finished:
                del self._latest[call_id]

        task.add_done_callback(done)

    async def settle(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the writes under way."""
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=timeout)
