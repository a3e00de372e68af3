"""Reading transcripts for the API: a call on this gateway from memory (and its live feed),
any other from its Redis stream (XREAD to follow it live)."""

from __future__ import annotations

import typing as tp

from service.api.control import ControlError, TranscriptEnd
from service.api.models import Transcript, TranscriptPiece
from service.gateway.calls.table import CallTable
from service.gateway.calls.transcript import TranscriptEvent, TranscriptFeed
from service.gateway.control.directory import redis_failed
from service.gateway.control.transcript_store import StoredTranscript, TranscriptStore
from service.pool import ENDED, CallRecords, PoolError

UNKNOWN = "unknown call, or past its retention"
UNREACHABLE = "transcripts unavailable (Redis unreachable)"


def piece(seq: int, event: TranscriptEvent) -> TranscriptPiece:
    return TranscriptPiece(
        seq=seq,
        t=round(event.t, 3),
        kind=event.kind,
        text=event.text,
        duration_ms=None if event.duration_ms is None else round(event.duration_ms, 1),
        start=None if event.end is None else round(event.t, 3),
        end=None if event.end is None else round(event.end, 3),
    )


def build(
    call_id: str, pieces: tp.Iterable[tuple[int, TranscriptEvent]], *, complete: bool, end_reason: str = ""
) -> Transcript:
    events = [piece(seq, event) for seq, event in pieces]
    text = "".join(e.text for e in events if e.kind == "agent")
    caller_text = "\n".join(e.text for e in sorted((e for e in events if e.kind == "caller"), key=lambda e: e.t))
    return Transcript(
        call_id=call_id, complete=complete, end_reason=end_reason, events=events, text=text, caller_text=caller_text
    )


class TranscriptReader:
    """Transcripts of any call, whole or followed live (see the module docstring)."""

    def __init__(
        self, table: CallTable, feed: TranscriptFeed, store: TranscriptStore | None, records: CallRecords | None
    ) -> None:
        self.table = table
        self.feed = feed
        self.store = store
        self.records = records

    async def load(self, call_id: str) -> Transcript:
        """The transcript from the best source; ControlError 404 when unknown, 503 when
        only Redis could have it and Redis is down."""
        call = self.table.get(call_id)
        if call is not None:
            return build(call_id, enumerate(list(call.transcript)), complete=False)
        ended = self.table.ended(call_id)
        if ended is not None:
            return build(call_id, enumerate(ended.transcript), complete=True, end_reason=ended.record.end_reason)
        if self.store is not None:
            try:
                stored = await self.store.read(call_id)
            except ValueError:  # not a valid call id
                stored = None
            except PoolError:
                redis_failed()
                raise ControlError(503, UNREACHABLE) from None
            if stored is not None:
                return build(call_id, stored.pieces, complete=stored.ended, end_reason=stored.end_reason)
        raise ControlError(404, f"no transcript for call {call_id!r} (unknown, or past its retention)")

    async def follow(self, call_id: str) -> tp.AsyncIterator[TranscriptPiece | TranscriptEnd]:
        """The pieces so far, new ones as they come, then the end (ControlError 404, 503)."""
        call = self.table.get(call_id)
        if call is not None:
            # Snapshot and subscribe with no await in between: no piece is missed or repeated.
            replay = list(call.transcript)
            queue = self.feed.subscribe(call_id)
            try:
                for seq, past in enumerate(replay):
                    yield piece(seq, past)
                seq = len(replay)
                while (event := await queue.get()) is not None:
                    yield piece(seq, event)
                    seq += 1
            finally:
                self.feed.unsubscribe(call_id, queue)
            yield TranscriptEnd(call.end_reason or "ended")
            return
        ended = self.table.ended(call_id)
        if ended is not None:
            for seq, event in enumerate(ended.transcript):
                yield piece(seq, event)
            yield TranscriptEnd(ended.record.end_reason or "ended")
            return
        try:
            async for item in self._follow_stored(call_id):
                yield item
        except PoolError:
            redis_failed()
            raise ControlError(503, UNREACHABLE) from None

    async def _follow_stored(self, call_id: str) -> tp.AsyncIterator[TranscriptPiece | TranscriptEnd]:
        """A call's Redis stream, replayed and followed. A call of another replica that has
        said nothing yet has no stream: it is waited for while the call's record says it
        goes on."""
        store, records = self.store, self.records
        if store is None or records is None:
            raise ControlError(404, UNKNOWN)
        try:
            stored = await store.read(call_id)
        except ValueError:
            raise ControlError(404, UNKNOWN) from None
        still_on: tp.Callable[[], tp.Awaitable[bool]] | None = None
        if stored is None:
            record = await records.get(call_id)
            if record is None or record.state == ENDED:
                raise ControlError(404, UNKNOWN)

            async def still_on() -> bool:
                current = await records.get(call_id)
                return current is not None and current.state != ENDED

            stored = StoredTranscript(call_id)
        seen = {seq for seq, _ in stored.pieces}
        for seq, event in stored.pieces:
            yield piece(seq, event)
        if stored.ended:
            yield TranscriptEnd(stored.end_reason)
            return
        async for entry in store.follow(call_id, stored.last_id, still_on=still_on):
            if entry.end_reason is not None:
                yield TranscriptEnd(entry.end_reason)
                return
            if entry.event is not None and entry.seq not in seen:
                seen.add(entry.seq)
                yield piece(entry.seq, entry.event)
        yield TranscriptEnd("gone")  # expired, or its gateway went away without ending it
