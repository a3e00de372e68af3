"""Transcripts: ``GET /v1/calls/{id}/transcript`` (JSON or plain text) and the live
WebSocket ``/v1/calls/{id}/transcript/live``.

Any gateway replica serves any call: a call on this gateway is served from memory (its
live fan-out for the WebSocket), any other from its Redis stream (XREAD for the live
one). Transcript text is personal data: it is served only with a token and never logged.

Live WebSocket protocol: authenticate with ``?token=<token>`` (browsers cannot set an
Authorization header on a WebSocket; the header works too). The server first replays the
pieces so far, then sends new ones as they come, each a JSON text message
``{"type": "piece", "seq": 0, "t": 1.28, "kind": "agent", "text": "こんにちは"}`` (DTMF:
``"kind": "dtmf"`` and ``duration_ms``); when the call ends, ``{"type": "end", "reason":
"remote-bye"}`` and a close with 1000. Refusals close with 4401 (no or unknown token), 4403
(scope), 4404 (unknown call) or 4503 (transcripts unreachable), the reason in the close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import typing as tp

from fastapi import APIRouter, Depends, HTTPException, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import PlainTextResponse

from service.api.auth import AuthError, Scope, check_websocket, require_read
from service.api.calls import AUTH_RESPONSES, NOT_FOUND, UNAVAILABLE
from service.api.directory import CallDirectory, redis_failed
from service.api.models import Transcript, TranscriptPiece
from service.gateway import metrics
from service.gateway.calls.call import TranscriptEvent
from service.gateway.control.transcripts import StoredTranscript
from service.pool import ENDED, PoolError

if tp.TYPE_CHECKING:
    from service.gateway.main import Gateway

log = logging.getLogger("moshimoshi.api")

UTTERANCE_GAP_SECONDS = 1.0  # plain text starts a new line after a pause this long

router = APIRouter(prefix="/v1/calls", tags=["transcripts"])


def piece(seq: int, event: TranscriptEvent) -> TranscriptPiece:
    return TranscriptPiece(seq=seq, t=round(event.t, 3), kind=event.kind, text=event.text,
                           duration_ms=event.duration_ms)


def build(call_id: str, pieces: tp.Iterable[tuple[int, TranscriptEvent]], *, complete: bool,
          end_reason: str = "") -> Transcript:
    events = [piece(seq, event) for seq, event in pieces]
    text = "".join(e.text for e in events if e.kind == "agent")
    return Transcript(call_id=call_id, complete=complete, end_reason=end_reason, events=events, text=text)


def _clock(t: float) -> str:
    minutes, seconds = divmod(max(0.0, t), 60)
    return f"{int(minutes):02d}:{seconds:05.2f}"


def plain_text(transcript: Transcript) -> str:
    """One line per utterance (agent pieces run together until a pause) and per DTMF digit."""
    lines: list[str] = []
    current: list[str] = []
    started = last = 0.0

    def flush() -> None:
        words = "".join(current).strip()
        if words:
            lines.append(f"[{_clock(started)}] agent: {words}")
        current.clear()

    for event in transcript.events:
        if event.kind == "agent":
            if current and event.t - last > UTTERANCE_GAP_SECONDS:
                flush()
            if not current:
                started = event.t
            current.append(event.text)
            last = event.t
        else:
            flush()
            held = f" ({event.duration_ms:.0f} ms)" if event.duration_ms is not None else ""
            lines.append(f"[{_clock(event.t)}] {event.kind.upper()}: {event.text}{held}")
    flush()
    header = f"# call {transcript.call_id}" + (f", ended: {transcript.end_reason}" if transcript.complete
                                               else ", in progress")
    return "\n".join([header, *lines]) + "\n"


async def load(gateway: Gateway, directory: CallDirectory, call_id: str) -> Transcript | None:
    """The transcript from the best source; None when unknown. Raises PoolError when only
    Redis could have it and Redis is down."""
    call = gateway.calls.get(call_id)
    if call is not None:
        return build(call_id, enumerate(list(call.transcript)), complete=False)
    summary = directory.recent_summary(call_id)
    if summary is not None and "transcript" in summary:
        events = [TranscriptEvent(**e) for e in summary["transcript"]]
        return build(call_id, enumerate(events), complete=True, end_reason=summary.get("end_reason", ""))
    if gateway.transcripts is None:
        return None
    try:
        stored = await gateway.transcripts.read(call_id)
    except ValueError:
        return None
    if stored is None:
        return None
    return build(call_id, stored.pieces, complete=stored.ended, end_reason=stored.end_reason)


@router.get(
    "/{call_id}/transcript", summary="A call's transcript (JSON or plain text)", response_model=Transcript,
    dependencies=[Depends(require_read)],
    responses={**AUTH_RESPONSES, **NOT_FOUND, **UNAVAILABLE,
               200: {"content": {"application/json": {}, "text/plain": {"example": "[00:01.20] agent: はい"}},
                     "description": "the transcript; text/plain with ?format=text or Accept: text/plain"}})
async def get_transcript(
    request: Request, call_id: str,
    format: tp.Literal["json", "text"] | None = Query(
        None, description="json (default) or text; without it, Accept: text/plain asks for text"),
) -> tp.Any:
    """The agent's words with their timestamps, plus the caller's DTMF digits, of a live or
    ended call (within the retention), from whichever gateway replica handled it."""
    gateway: Gateway = request.app.state.gateway
    try:
        transcript = await load(gateway, request.app.state.directory, call_id)
    except PoolError:
        redis_failed()
        raise HTTPException(503, "transcripts unavailable (Redis unreachable)") from None
    if transcript is None:
        raise HTTPException(404, f"no transcript for call {call_id!r} (unknown, or past its retention)")
    wants_text = format == "text" or (format is None and "text/plain" in request.headers.get("accept", "")
                                      and "application/json" not in request.headers.get("accept", ""))
    if wants_text:
        return PlainTextResponse(plain_text(transcript), media_type="text/plain; charset=utf-8")
    return transcript


# -- live ---------------------------------------------------------------------------------


def _piece_message(seq: int, event: TranscriptEvent) -> dict[str, tp.Any]:
    return {"type": "piece", **piece(seq, event).model_dump(exclude_none=True)}


async def _follow_local(ws: WebSocket, gateway: Gateway, call_id: str) -> str | None:
    """Replay and follow a call of this gateway; returns its end reason (None: not here)."""
    call = gateway.calls.get(call_id)
    if call is None:
        return None
    # Snapshot and subscribe with no await in between: no piece is missed or repeated.
    replay = list(call.transcript)
    queue: asyncio.Queue[TranscriptEvent | None] = asyncio.Queue()
    listeners = gateway.transcript_listeners.setdefault(call_id, set())
    listeners.add(queue)
    try:
        for seq, event in enumerate(replay):
            await ws.send_json(_piece_message(seq, event))
        seq = len(replay)
        while (event := await queue.get()) is not None:
            await ws.send_json(_piece_message(seq, event))
            seq += 1
        return call.end_reason or "ended"
    finally:
        listeners.discard(queue)
        if not listeners and gateway.transcript_listeners.get(call_id) is listeners:
            del gateway.transcript_listeners[call_id]


async def _follow_stored(ws: WebSocket, gateway: Gateway, call_id: str) -> str | None:
    """Replay and follow a call's Redis stream; returns its end reason (None: unknown call).
    A call of another replica that has said nothing yet has no stream: it is waited for
    while the call's record says it goes on."""
    store, records = gateway.transcripts, gateway.records
    if store is None or records is None:
        return None
    stored = await store.read(call_id)
    still_on: tp.Callable[[], tp.Awaitable[bool]] | None = None
    if stored is None:
        record = await records.get(call_id)
        if record is None or record.state == ENDED:
            return None

        async def still_on() -> bool:
            current = await records.get(call_id)
            return current is not None and current.state != ENDED

        stored = StoredTranscript(call_id)
    seen = {seq for seq, _ in stored.pieces}
    for seq, event in stored.pieces:
        await ws.send_json(_piece_message(seq, event))
    if stored.ended:
        return stored.end_reason
    async for entry in store.follow(call_id, stored.last_id, still_on=still_on):
        if entry.end_reason is not None:
            return entry.end_reason
        if entry.event is not None and entry.seq not in seen:
            seen.add(entry.seq)
            await ws.send_json(_piece_message(entry.seq, entry.event))
    return "gone"  # expired, or its gateway went away without ending it


async def _stream(ws: WebSocket, gateway: Gateway, directory: CallDirectory, call_id: str) -> None:
    reason = await _follow_local(ws, gateway, call_id)
    if reason is None:
        summary = directory.recent_summary(call_id)
        if summary is not None and "transcript" in summary:
            for seq, event in enumerate(summary["transcript"]):
                await ws.send_json({"type": "piece", "seq": seq, **event})
            reason = summary.get("end_reason") or "ended"
    if reason is None:
        try:
            reason = await _follow_stored(ws, gateway, call_id)
        except ValueError:
            reason = None
        except PoolError:
            redis_failed()
            await ws.close(4503, "transcripts unavailable (Redis unreachable)")
            return
    if reason is None:
        await ws.close(4404, "unknown call, or past its retention")
        return
    await ws.send_json({"type": "end", "reason": reason})
    await ws.close(1000, "call ended")


async def _until_disconnect(ws: WebSocket) -> None:
    """Read (and ignore) what the client sends until it goes away."""
    while (await ws.receive())["type"] != "websocket.disconnect":
        pass


@router.websocket("/{call_id}/transcript/live")
async def live_transcript(ws: WebSocket, call_id: str) -> None:
    """The transcript as it is spoken: the pieces so far, then new ones (see the module
    docstring for the protocol). Read scope; token in ``?token=``."""
    await ws.accept()
    try:
        check_websocket(ws, Scope.READ)
    except AuthError as exc:
        await ws.close(4000 + exc.status, exc.message[:120])  # 4401 or 4403
        return
    gateway: Gateway = ws.app.state.gateway
    metrics.TRANSCRIPT_VIEWERS.inc()
    sender = asyncio.ensure_future(_stream(ws, gateway, ws.app.state.directory, call_id))
    watcher = asyncio.ensure_future(_until_disconnect(ws))
    try:
        await asyncio.wait({sender, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        metrics.TRANSCRIPT_VIEWERS.dec()
        for task in (sender, watcher):
            task.cancel()
        for task in (sender, watcher):
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, RuntimeError, OSError):
                await task
