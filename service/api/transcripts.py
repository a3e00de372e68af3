"""Transcripts: ``GET /v1/calls/{id}/transcript`` (JSON or plain text) and the live
WebSocket ``/v1/calls/{id}/transcript/live``.

Any gateway replica serves any call: a call on this gateway is served from memory (its
live fan-out for the WebSocket), any other from its Redis stream (XREAD for the live
one). Transcript text is personal data: it is served only with a token and never logged.

Live WebSocket protocol: authenticate with ``?token=<token>`` (browsers cannot set an
Authorization header on a WebSocket; the header works too). The server first replays the
pieces so far, then sends new ones as they come, each a JSON text message
``{"type": "piece", "seq": 0, "t": 1.28, "kind": "agent", "text": "こんにちは"}`` (the caller:
``"kind": "caller"`` with ``start`` and ``end``, sent once the utterance ended; DTMF:
``"kind": "dtmf"`` and ``duration_ms``; notes: ``"kind": "note"``); when the call ends, ``{"type": "end", "reason":
"remote-bye"}`` and a close with 1000. Refusals close with 4401 (no or unknown token), 4403
(scope), 4404 (unknown call) or 4503 (transcripts unreachable), the reason in the close.
"""

from __future__ import annotations

import asyncio
import contextlib
import typing as tp

from fastapi import APIRouter, Depends, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import PlainTextResponse
from prometheus_client import Gauge

from service.api.auth import AuthError, Scope, check_websocket, require_read
from service.api.calls import AUTH_RESPONSES, NOT_FOUND, UNAVAILABLE, control_of, failed
from service.api.control import CallControl, ControlError, TranscriptEnd
from service.api.models import Transcript

UTTERANCE_GAP_SECONDS = 1.0  # plain text starts a new line after a pause this long
LIVE_CLOSE_CODES = {404: 4404, 503: 4503}
TRANSCRIPT_VIEWERS = Gauge("moshimoshi_transcript_viewers", "Open live-transcript WebSockets.")

router = APIRouter(prefix="/v1/calls", tags=["transcripts"])


def _clock(t: float) -> str:
    minutes, seconds = divmod(max(0.0, t), 60)
    return f"{int(minutes):02d}:{seconds:05.2f}"


def plain_text(transcript: Transcript) -> str:
    """Both sides in time order: one line per utterance (the agent's pieces run together
    until a pause or the caller's turn), per DTMF digit and per note."""
    lines: list[str] = []
    current: list[str] = []
    started = last = 0.0

    def flush() -> None:
        words = "".join(current).strip()
        if words:
            lines.append(f"[{_clock(started)}] agent: {words}")
        current.clear()

    for event in sorted(transcript.events, key=lambda e: (e.t, e.seq)):
        if event.kind == "agent":
            if current and event.t - last > UTTERANCE_GAP_SECONDS:
                flush()
            if not current:
                started = event.t
            current.append(event.text)
            last = event.t
            continue
        flush()
        if event.kind in ("caller", "note"):
            lines.append(f"[{_clock(event.t)}] {event.kind}: {event.text}")
        else:
            held = f" ({event.duration_ms:.0f} ms)" if event.duration_ms is not None else ""
            lines.append(f"[{_clock(event.t)}] {event.kind.upper()}: {event.text}{held}")
    flush()
    header = f"# call {transcript.call_id}" + (
        f", ended: {transcript.end_reason}" if transcript.complete else ", in progress"
    )
    return "\n".join([header, *lines]) + "\n"


@router.get(
    "/{call_id}/transcript",
    summary="A call's transcript (JSON or plain text)",
    response_model=Transcript,
    dependencies=[Depends(require_read)],
    responses={
        **AUTH_RESPONSES,
        **NOT_FOUND,
        **UNAVAILABLE,
        200: {
            "content": {
                "application/json": {},
                "text/plain": {
                    "example": "[00:01.20] agent: はい、お電話ありがとうございます\n[00:03.48] caller: 予約の確認をお願いします"
                },
            },
            "description": "the transcript; text/plain with ?format=text or Accept: text/plain",
        },
    },
)
async def get_transcript(
    request: Request,
    call_id: str,
    format: tp.Literal["json", "text"] | None = Query(
        None, description="json (default) or text; without it, Accept: text/plain asks for text"
    ),
) -> tp.Any:
    """Both sides' words with their timestamps (the agent's from the model, the caller's
    from ASR), the caller's DTMF digits and notes, of a live or ended call (within the
    retention), from whichever gateway replica handled it. The plain-text form puts them in
    time order."""
    try:
        transcript = await control_of(request).transcript(call_id)
    except ControlError as exc:
        raise failed(exc) from None
    wants_text = format == "text" or (
        format is None
        and "text/plain" in request.headers.get("accept", "")
        and "application/json" not in request.headers.get("accept", "")
    )
    if wants_text:
        return PlainTextResponse(plain_text(transcript), media_type="text/plain; charset=utf-8")
    return transcript


# -- live ---------------------------------------------------------------------------------


async def _stream(ws: WebSocket, control: CallControl, call_id: str) -> None:
    try:
        async for item in control.follow_transcript(call_id):
            if isinstance(item, TranscriptEnd):
                await ws.send_json({"type": "end", "reason": item.reason})
                await ws.close(1000, "call ended")
                return
            await ws.send_json({"type": "piece", **item.model_dump(exclude_none=True)})
    except ControlError as exc:
        await ws.close(LIVE_CLOSE_CODES.get(exc.status, 4500), exc.detail[:120])


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
    TRANSCRIPT_VIEWERS.inc()
    sender = asyncio.ensure_future(_stream(ws, tp.cast(CallControl, ws.app.state.control), call_id))
    watcher = asyncio.ensure_future(_until_disconnect(ws))
    try:
        await asyncio.wait({sender, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        TRANSCRIPT_VIEWERS.dec()
        for task in (sender, watcher):
            task.cancel()
        for task in (sender, watcher):
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, RuntimeError, OSError):
                await task
