"""Calls' recordings: ``GET /v1/calls/{id}/recording`` (recordings scope) streams the stored
file; ``POST /v1/calls/{id}/recording/pause`` and ``…/resume`` (admin scope) write silence
over a span of a live call (PCI DSS: a card number read out must not be recorded).

A recording is personal data: it is served only to a token of the ``recordings`` or
``admin`` scope (never ``read``), and never logged.
"""

from __future__ import annotations

import typing as tp

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from service.api.auth import require_admin, require_recordings
from service.api.calls import AUTH_RESPONSES, NOT_FOUND, UNAVAILABLE, control_of, failed
from service.api.control import ControlError
from service.api.models import Problem, RecordingControl

CONTENT_TYPES = {"wav": "audio/wav", "ogg": "audio/ogg"}
CONFLICT: dict[int | str, dict[str, tp.Any]] = {
    409: {"model": Problem, "description": "the call is not answered yet, has ended, or is in that state already"}
}

router = APIRouter(prefix="/v1/calls", tags=["recordings"], responses=AUTH_RESPONSES)


@router.get(
    "/{call_id}/recording",
    summary="A call's recording (recordings scope)",
    dependencies=[Depends(require_recordings)],
    response_class=StreamingResponse,
    responses={
        **NOT_FOUND,
        **UNAVAILABLE,
        200: {
            "content": {"audio/ogg": {}, "audio/wav": {}},
            "description": "the recording: stereo, the caller left, the agent right",
        },
        409: {"model": Problem, "description": "the call goes on: its recording is stored once it ended"},
    },
)
async def get_recording(request: Request, call_id: str) -> StreamingResponse:
    """The stored recording of an ended call (within the retention), from whichever
    replica's storage keeps it: Opus in Ogg or WAV, 16 kHz stereo, sample-aligned on the
    call's clock (left: the caller as the model heard it; right: the agent as sent to the
    caller). Paused spans are silence. Needs the ``recordings`` (or ``admin``) scope."""
    try:
        stream = await control_of(request).recording(call_id)
    except ControlError as exc:
        raise failed(exc) from None
    ext = stream.info.format
    return StreamingResponse(
        stream.chunks,
        media_type=CONTENT_TYPES.get(ext, "application/octet-stream"),
        headers={
            "Content-Length": str(stream.size),
            "Content-Disposition": f'attachment; filename="{call_id}.{ext}"',
            "Cache-Control": "no-store",
        },
    )


@router.post(
    "/{call_id}/recording/pause",
    summary="Pause a call's recording (admin scope)",
    status_code=202,
    response_model=RecordingControl,
    dependencies=[Depends(require_admin)],
    responses={**NOT_FOUND, **UNAVAILABLE, **CONFLICT},
)
async def pause(request: Request, call_id: str) -> RecordingControl:
    """From now on nothing of the call is stored, until resumed: its recording is silence
    (both sides; it keeps its length, what follows stays on the call's clock), the caller's
    words are not transcribed, the agent's are left out of the transcript, DTMF digits are
    masked. The span is in the recording's ``pauses`` and marked in the transcript. Works
    on calls that are not recorded too (their transcript)."""
    try:
        return await control_of(request).pause_recording(call_id)
    except ControlError as exc:
        raise failed(exc) from None


@router.post(
    "/{call_id}/recording/resume",
    summary="Resume a call's recording (admin scope)",
    status_code=202,
    response_model=RecordingControl,
    dependencies=[Depends(require_admin)],
    responses={**NOT_FOUND, **UNAVAILABLE, **CONFLICT},
)
async def resume(request: Request, call_id: str) -> RecordingControl:
    """Record again from now."""
    try:
        return await control_of(request).resume_recording(call_id)
    except ControlError as exc:
        raise failed(exc) from None
