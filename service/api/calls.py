"""``/v1/calls``: list calls, place one, one call with its quality, hang up, transfer."""

from __future__ import annotations

import typing as tp

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from service.api.auth import require_admin, require_read
from service.api.control import CallControl, ControlError
from service.api.models import CallInfo, CallList, HangupResult, PlacedCall, Problem, TransferOutcome

MAX_LIMIT = 1000
MAX_EPOCH_SECONDS = 1e11  # a time parameter beyond this (the year 5138) is no time: 422
AUTH_RESPONSES: dict[int | str, dict[str, tp.Any]] = {
    401: {"model": Problem, "description": "no token, or an unknown one"},
    403: {"model": Problem, "description": "the token's scope does not allow this"},
}
NOT_FOUND: dict[int | str, dict[str, tp.Any]] = {404: {"model": Problem, "description": "no such call"}}
UNAVAILABLE: dict[int | str, dict[str, tp.Any]] = {
    503: {"model": Problem, "description": "Redis is unreachable and this gateway does not know the call"}
}

router = APIRouter(prefix="/v1/calls", tags=["calls"], responses=AUTH_RESPONSES)


def control_of(request: Request) -> CallControl:
    return tp.cast(CallControl, request.app.state.control)


def failed(exc: ControlError) -> HTTPException:
    """A ControlError as the HTTP answer."""
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    return HTTPException(exc.status, exc.detail, headers=headers)


class TransferRequest(BaseModel):
    target: str = Field(
        max_length=256,
        description="where the call goes: a SIP URI (sip:queue@pbx.example) or a number (tel:+81312345678)",
    )
    mode: tp.Literal["auto", "refer", "bridge"] = Field(
        "auto",
        description="refer: ask the caller's side to take the call there (REFER); bridge: the gateway "
        "calls the target and relays the audio; auto: refer, and bridge when the caller's side will not take a "
        "REFER",
    )


class PlaceCallRequest(BaseModel):
    model_config = {"populate_by_name": True}

    to: str = Field(
        max_length=512,
        description="whom to call: a sip: or sips: URI, or a number (+81312345678, "
        "tel:+81..., 03-1234-5678) through the outbound trunk (MOSHIMOSHI_OUTBOUND_TRUNK)",
    )
    caller_id: str | None = Field(
        None, alias="from", max_length=256, description="the caller ID: a number or a sip: URI (our From)"
    )
    route: str | None = Field(
        None,
        max_length=64,
        description="the route to run the call on (its model, limits, "
        "maximum length...); default: the route the caller ID matches, else the unmatched "
        "route",
    )


@router.post(
    "",
    summary="Place a call from the AI",
    status_code=202,
    response_model=PlacedCall,
    responses={
        404: {"model": Problem, "description": "no route of that name"},
        422: {"model": Problem, "description": "a target or caller ID that cannot be used"},
        503: {"model": Problem, "description": "no slot free (Retry-After), or not taking calls"},
    },
    dependencies=[Depends(require_admin)],
)
async def place_call(request: Request, body: PlaceCallRequest) -> PlacedCall:
    """The AI calls someone (admin scope): a worker slot is claimed first (503 with
    Retry-After when none is free, and no call is placed), then the INVITE goes out and
    this answers with the call's id. Follow the call with ``GET /v1/calls/{id}``: a callee
    that is busy, does not answer or refuses ends it with ``end_reason`` outbound-busy,
    outbound-no-answer or outbound-failed (the SIP status in ``end_detail``)."""
    try:
        return await control_of(request).place_call(body.to, body.caller_id, body.route)
    except ControlError as exc:
        raise failed(exc) from None


@router.get("", summary="List active and recent calls", response_model=CallList, dependencies=[Depends(require_read)])
async def list_calls(
    request: Request,
    state: tp.Literal["active", "ended"] | None = Query(
        None, description="active: in progress (ringing, queued or active); ended: over"
    ),
    since: float | None = Query(
        None,
        ge=0,
        le=MAX_EPOCH_SECONDS,
        allow_inf_nan=False,
        description="only calls started at or after this time (epoch seconds)",
    ),
    worker: str | None = Query(None, description="only calls on this worker id"),
    limit: int = Query(100, ge=1, le=MAX_LIMIT, description="at most this many, newest first"),
) -> CallList:
    """Calls of every gateway, newest first: this gateway's live calls with live quality,
    other replicas' active calls (those holding a worker slot) and ended calls from Redis
    within the retention. ``partial`` is true when Redis could not be read."""
    return await control_of(request).list_calls(state=state, since=since, worker_id=worker, limit=limit)


@router.get(
    "/{call_id}",
    summary="One call with its quality",
    response_model=CallInfo,
    responses={**NOT_FOUND, **UNAVAILABLE},
    dependencies=[Depends(require_read)],
)
async def get_call(request: Request, call_id: str) -> CallInfo:
    """The call record plus its quality: codec, jitter, loss, round trip, concealed frames,
    underruns and gateway-added latency (live when the call runs on this gateway)."""
    try:
        return await control_of(request).get_call(call_id)
    except ControlError as exc:
        raise failed(exc) from None


@router.post(
    "/{call_id}/hangup",
    summary="Hang up a call",
    status_code=202,
    response_model=HangupResult,
    responses={**NOT_FOUND, **UNAVAILABLE, 409: {"model": Problem, "description": "the call has ended"}},
    dependencies=[Depends(require_admin)],
)
async def hangup(request: Request, call_id: str) -> HangupResult:
    """End the call with a BYE (admin scope). A call on another gateway replica is hung up
    by that replica: the request goes to it over Redis pub/sub."""
    try:
        return await control_of(request).hang_up(call_id)
    except ControlError as exc:
        raise failed(exc) from None


@router.post(
    "/{call_id}/transfer",
    summary="Transfer a call to a human",
    response_model=TransferOutcome,
    responses={
        **NOT_FOUND,
        **UNAVAILABLE,
        409: {
            "model": Problem,
            "description": "the call is not answered, has ended, is with a person already or being transferred",
        },
        422: {"model": Problem, "description": "the target is no sip:, sips: or tel: URI"},
        502: {
            "model": TransferOutcome,
            "description": "the transfer was tried and failed: the caller stays with the AI",
        },
    },
    dependencies=[Depends(require_admin)],
)
async def transfer(request: Request, call_id: str, body: TransferRequest) -> tp.Any:
    """Hand the call to a person (admin scope) and answer once it is done: 200 when the
    caller is with the person, 502 (with the same document and the reason) when the
    transfer failed and the caller stays with the AI. By REFER the caller's side takes the
    call elsewhere and the gateway hangs up; bridged, the gateway calls the target and
    relays the audio until either side hangs up. The model's slot is released at the
    hand-over. A call on another gateway replica is transferred by that replica (the
    request goes to it over Redis)."""
    try:
        outcome = await control_of(request).transfer(call_id, body.target, body.mode)
    except ControlError as exc:
        raise failed(exc) from None
    if outcome.outcome != "transferred":
        return JSONResponse(outcome.model_dump(), status_code=502)
    return outcome
