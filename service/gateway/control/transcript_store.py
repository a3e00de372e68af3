"""Transcripts in Redis Streams: one stream per call, written behind the media path.

The gateway appends each piece (the agent's words, or a caller's DTMF digit) as it
arrives; ``append`` only queues it in memory, and one writer task (``write_behind.py``)
sends the queue to Redis in batches (XADD with an approximate MAXLEN, then PEXPIRE: the stream lives
``retention`` seconds after its last entry). So media never waits on Redis, and a Redis
outage loses no call: pieces wait in memory (up to ``max_pending``, the oldest dropped and
counted beyond that) and go out when Redis answers again. When the call ends an ``end``
entry closes the stream, so a reader on any gateway replica knows the transcript is whole.

Each entry carries the piece's ``seq`` (its index in the call's transcript). A batch that
is retried after a lost reply may store a piece twice; readers drop repeated seqs.

Entry fields: ``seq``, ``t`` (seconds since answer), ``kind`` (``agent``, ``caller``,
``dtmf``, ``note``), ``text`` and optionally ``duration_ms`` (dtmf) and ``end`` (caller);
the end entry is ``kind=end``, ``text=<reason>``.
Transcript text is personal data: nothing here logs it.
"""

from __future__ import annotations

import asyncio
import typing as tp
from dataclasses import dataclass, field

from redis.typing import EncodableT, FieldT

from service.gateway import metrics
from service.gateway.calls.transcript import TranscriptEvent
from service.gateway.control.write_behind import WriteBehind
from service.pool import PoolClient, StreamEntries

END_KIND = "end"
MAX_PIECES_PER_CALL = 30_000  # a 40-minute call at one piece per 80 ms step
MAX_PENDING = 50_000
BATCH = 256
FOLLOW_BLOCK_MS = 500  # below the pool's 1 s socket timeout


def transcript_key(client: PoolClient, call_id: str) -> str:
    return f"{client.keys.prefix}transcript:{call_id}"


def event_fields(seq: int, event: TranscriptEvent) -> dict[str, str]:
    fields = {"seq": str(seq), "t": repr(round(event.t, 3)), "kind": event.kind, "text": event.text}
    if event.duration_ms is not None:
        fields["duration_ms"] = repr(round(event.duration_ms, 1))
    if event.end is not None:
        fields["end"] = repr(round(event.end, 3))
    return fields


@dataclass
class StreamEntry:
    """One parsed stream entry: a piece (``event``) or the end of the call (``end_reason``)."""

    entry_id: str
    seq: int = -1
    event: TranscriptEvent | None = None
    end_reason: str | None = None


def parse_entry(entry_id: str, fields: dict[str, str]) -> StreamEntry | None:
    """A stream entry, or None when it is malformed (skipped by readers)."""
    kind = fields.get("kind", "")
    if kind == END_KIND:
        return StreamEntry(entry_id, end_reason=fields.get("text", ""))
    try:
        seq = int(fields["seq"])
        t = float(fields["t"])
        duration = float(fields["duration_ms"]) if "duration_ms" in fields else None
        end = float(fields["end"]) if "end" in fields else None
    except (KeyError, ValueError):
        return None
    return StreamEntry(
        entry_id, seq, TranscriptEvent(t=t, kind=kind, text=fields.get("text", ""), duration_ms=duration, end=end)
    )


@dataclass
class StoredTranscript:
    """A call's transcript as read back from its stream."""

    call_id: str
    pieces: list[tuple[int, TranscriptEvent]] = field(default_factory=list)
    ended: bool = False
    end_reason: str = ""
    last_id: str = "0-0"  # follow from here


class TranscriptStore:
    """Write-behind appends to per-call Redis Streams, and reads of them (any replica)."""

    def __init__(
        self,
        client: PoolClient,
        *,
        retention: float,
        max_len: int = MAX_PIECES_PER_CALL,
        max_pending: int = MAX_PENDING,
        batch: int = BATCH,
    ) -> None:
        if retention <= 0:
            raise ValueError("retention must be positive")
        self.client = client
        self.retention_ms = max(1, round(retention * 1000))
        self.max_len = max_len
        self.batch = batch
        self.stored = 0
        self.dropped = 0
        self._queue: WriteBehind[tuple[str, dict[str, str]]] = WriteBehind(
            self._write,
            what="transcript pieces",
            metric="transcript-append",
            max_pending=max_pending,
            batch=batch,
            on_dropped=self._count_dropped,
            on_stored=self._count_stored,
        )

    # -- writing (never blocks) --------------------------------------------------------

    @property
    def pending(self) -> int:
        """Entries not stored yet (queued, or being written now)."""
        return self._queue.pending

    @property
    def write_failures(self) -> int:
        """Batches Redis refused (each retried)."""
        return self._queue.write_failures

    def append(self, call_id: str, seq: int, event: TranscriptEvent) -> None:
        """Queue one piece for the call's stream (returns at once)."""
        self._queue.put((call_id, event_fields(seq, event)))

    def end(self, call_id: str, reason: str) -> None:
        """Queue the end entry: the call is over and its transcript complete."""
        self._queue.put((call_id, {"kind": END_KIND, "text": reason}))

    def _count_dropped(self, entry: tuple[str, dict[str, str]], reason: str) -> None:
        if entry[1].get("kind") != END_KIND:
            self.dropped += 1
            metrics.TRANSCRIPT_PIECES_DROPPED.labels(reason).inc()

    def _count_stored(self, batch: list[tuple[str, dict[str, str]]]) -> None:
        pieces = sum(1 for _, fields in batch if fields.get("kind") != END_KIND)
        self.stored += pieces
        metrics.TRANSCRIPT_PIECES.inc(pieces)

    def start(self) -> None:
        self._queue.start("transcript-writer")

    async def _write(self, batch: list[tuple[str, dict[str, str]]]) -> None:
        keys = []
        async with self.client.guard("append transcript"):
            async with self.client.redis.pipeline(transaction=True) as pipe:
                for call_id, fields in batch:
                    key = transcript_key(self.client, call_id)
                    # redis-py asks for a dict of its own key and value types (a Mapping would do)
                    pipe.xadd(key, tp.cast(dict[FieldT, EncodableT], fields), maxlen=self.max_len, approximate=True)
                    if key not in keys:
                        keys.append(key)
                for key in keys:
                    pipe.pexpire(key, self.retention_ms)
                await pipe.execute()

    async def flush(self, timeout: float) -> bool:
        """Wait until every queued piece is stored; False if that took longer than ``timeout``."""
        return await self._queue.flush(timeout)

    async def close(self, timeout: float = 2.0) -> None:
        """Store what is queued (for up to ``timeout``), then stop; the rest is counted dropped."""
        await self._queue.close(timeout)

    # -- reading (any replica) ---------------------------------------------------------

    async def read(self, call_id: str) -> StoredTranscript | None:
        """The call's stored transcript, or None when there is none (never stored, or expired).
        Raises PoolError."""
        key = transcript_key(self.client, call_id)
        async with self.client.guard("read transcript"):
            entries = tp.cast(StreamEntries, await self.client.redis.xrange(key))
        if not entries:
            return None
        transcript = StoredTranscript(call_id)
        seen: set[int] = set()
        for entry_id, fields in entries:
            self._add(transcript, parse_entry(entry_id, fields), seen)
        return transcript

    @staticmethod
    def _add(transcript: StoredTranscript, entry: StreamEntry | None, seen: set[int]) -> None:
        if entry is None:
            return
        transcript.last_id = entry.entry_id
        if entry.end_reason is not None:
            transcript.ended = True
            transcript.end_reason = entry.end_reason
        elif entry.event is not None and entry.seq not in seen:
            seen.add(entry.seq)
            transcript.pieces.append((entry.seq, entry.event))

    async def follow(
        self,
        call_id: str,
        after_id: str = "0-0",
        *,
        block_ms: int = FOLLOW_BLOCK_MS,
        still_on: tp.Callable[[], tp.Awaitable[bool]] | None = None,
        check_every: float = 5.0,
    ) -> tp.AsyncIterator[StreamEntry]:
        """Entries added after ``after_id``, as they come, until the end entry (yielded last).

        Without ``still_on`` it also stops when the stream disappears (expired). With it,
        a stream that does not exist yet is waited for, and every ``check_every`` seconds of
        silence ``still_on()`` is asked whether the call goes on (its gateway may have died
        without writing the end). Raises PoolError."""
        key = transcript_key(self.client, call_id)
        last = after_id
        redis = self.client.redis
        loop = asyncio.get_running_loop()
        quiet_since = loop.time()
        while True:
            async with self.client.guard("follow transcript"):
                reply = tp.cast(
                    list[tuple[str, StreamEntries]], await redis.xread({key: last}, count=self.batch, block=block_ms)
                )
                if not reply and still_on is None:
                    exists = await redis.exists(key)
            if not reply:
                if still_on is None:
                    if not exists:
                        return
                elif loop.time() - quiet_since >= check_every:
                    if not await still_on():
                        return
                    quiet_since = loop.time()
                continue
            quiet_since = loop.time()
            for _, entries in reply:
                for entry_id, fields in entries:
                    last = entry_id
                    entry = parse_entry(entry_id, fields)
                    if entry is None:
                        continue
                    yield entry
                    if entry.end_reason is not None:
                        return

    async def exists(self, call_id: str) -> bool:
        async with self.client.guard("read transcript"):
            return bool(await self.client.redis.exists(transcript_key(self.client, call_id)))
