"""A call's transcript: its pieces, and who hears them as they come.

Pieces are the agent's words (from the worker's text events), the caller's words (the
``caller`` tap through an ASR worker: ``calls/caller_asr.py``), the caller's DTMF digits
(the ``dtmf`` tap; masked unless the call's policy says clear) and notes (the caller's side
unavailable, the recording paused, the consent announcement played). Each piece goes to
the call's live listeners (the API's live WebSocket, a WebRTC peer's data channel) and to
the Redis stream behind them (``control/transcript_store.py``). Caller pieces come a little
after the speech they hold (the ASR needs the utterance's end), so pieces in arrival
order are not in time order: ``t`` says when each one was said.
"""

from __future__ import annotations

import asyncio
import typing as tp
from dataclasses import dataclass

AGENT = "agent"
CALLER = "caller"
DTMF = "dtmf"
NOTE = "note"
DTMF_MASK = "*"


@dataclass
class TranscriptEvent:
    """One line of a call's transcript: the agent's words, the caller's words (``t`` where
    the speech began, ``end`` where it ended), a DTMF digit, or a note."""

    t: float  # seconds since the call was answered
    kind: str  # agent, caller, dtmf or note
    text: str
    duration_ms: float | None = None  # dtmf: how long the key was held
    end: float | None = None  # caller: where the utterance ended

    def to_dict(self) -> dict[str, tp.Any]:
        out: dict[str, tp.Any] = {"t": round(self.t, 3), "kind": self.kind, "text": self.text}
        if self.duration_ms is not None:
            out["duration_ms"] = round(self.duration_ms, 1)
        if self.end is not None:
            out["start"] = round(self.t, 3)
            out["end"] = round(self.end, 3)
        return out


class TranscriptSink(tp.Protocol):
    """Where pieces are kept beyond the call (``control/transcript_store.py``: Redis Streams)."""

    def append(self, call_id: str, seq: int, event: TranscriptEvent) -> None: ...
    def end(self, call_id: str, reason: str) -> None: ...


class TranscriptFeed:
    """Hands each call's pieces to its live listeners and to the store (if any)."""

    def __init__(self, store: TranscriptSink | None = None) -> None:
        self._store = store
        self.listeners: dict[str, set[asyncio.Queue[TranscriptEvent | None]]] = {}

    def publish(self, call_id: str, seq: int, event: TranscriptEvent, *, store: bool = True) -> None:
        """A new piece to the call's listeners, and to the store unless ``store`` is false
        (a call not answered yet: see ``store``)."""
        for queue in self.listeners.get(call_id, ()):
            queue.put_nowait(event)
        if store:
            self.store(call_id, seq, event)

    def store(self, call_id: str, seq: int, event: TranscriptEvent) -> None:
        """A piece to the store only (a piece that came before the call's answer)."""
        if self._store is not None:
            self._store.append(call_id, seq, event)

    def subscribe(self, call_id: str) -> asyncio.Queue[TranscriptEvent | None]:
        """A queue of the call's pieces from now on (None once it ended). Snapshot the
        pieces so far and subscribe with no await in between, and none is missed."""
        queue: asyncio.Queue[TranscriptEvent | None] = asyncio.Queue()
        self.listeners.setdefault(call_id, set()).add(queue)
        return queue

    def unsubscribe(self, call_id: str, queue: asyncio.Queue[TranscriptEvent | None]) -> None:
        listeners = self.listeners.get(call_id)
        if listeners is not None:
            listeners.discard(queue)
            if not listeners:
                del self.listeners[call_id]

    def end(self, call_id: str, reason: str, *, store: bool = True) -> None:
        """The call is over: listeners get None, the store its end entry (unless ``store``
        is false: a call never answered has nothing stored)."""
        for queue in self.listeners.pop(call_id, set()):
            queue.put_nowait(None)
        if store and self._store is not None:
            self._store.end(call_id, reason)
