"""``/v1/calls``: list calls, one call with its quality, hang up."""

from __future__ import annotations

import logging
import typing as tp

from fastapi import APIRouter, Depends, HTTPException, Query, Request

from service.api.auth import require_admin, require_read
from service.api.directory import CallDirectory, redis_failed
from service.api.models import CallInfo, CallList, HangupResult, Problem
from service.pool import ACTIVE, ENDED, PoolError

if tp.TYPE_CHECKING:
    from service.gateway.main import Gateway

log = logging.getLogger("moshimoshi.api")

MAX_LIMIT = 1000
AUTH_RESPONSES: dict[int | str, dict[str, tp.Any]] = {
    401: {"model": Problem, "description": "no token, or an unknown one"},
    403: {"model": Problem, "description": "the token's scope does not allow this"},
}
NOT_FOUND: dict[int | str, dict[str, tp.Any]] = {404: {"model": Problem, "description": "no such call"}}
UNAVAILABLE: dict[int | str, dict[str, tp.Any]] = {
    503: {"model": Problem, "description": "Redis is unreachable and this gateway does not know the call"}}

router = APIRouter(prefix="/v1/calls", tags=["calls"], responses=AUTH_RESPONSES)


def gateway_of(request: Request) -> Gateway:
    return request.app.state.gateway


def directory(request: Request) -> CallDirectory:
    return request.app.state.directory


@router.get("", summary="List active and recent calls", response_model=CallList,
            dependencies=[Depends(require_read)])
async def list_calls(
    request: Request,
    state: tp.Literal["active", "ended"] | None = Query(
        None, description="active: in progress (ringing, queued or active); ended: over"),
    since: float | None = Query(None, description="only calls started at or after this time (epoch seconds)"),
    worker: str | None = Query(None, description="only calls on this worker id"),
    limit: int = Query(100, ge=1, le=MAX_LIMIT, description="at most this many, newest first"),
) -> CallList:
    """Calls of every gateway, newest first: this gateway's live calls with live quality,
    other replicas' active calls (those holding a worker slot) and ended calls from Redis
    within the retention. ``partial`` is true when Redis could not be read."""
    calls, partial = await directory(request).list(
        state=ACTIVE if state == "active" else ENDED if state == "ended" else None,
        since=since, worker_id=worker, limit=limit)
    return CallList(calls=calls, partial=partial)


async def _find(request: Request, call_id: str) -> CallInfo:
    """A call from any gateway: 404 if unknown (or past its retention), 503 if Redis is down."""
    try:
        found = await directory(request).get(call_id)
    except PoolError:
        redis_failed()
        raise HTTPException(503, "call records unavailable (Redis unreachable)") from None
    if found is None:
        raise HTTPException(404, f"no call {call_id!r} (unknown, or past its retention)")
    return found


@router.get("/{call_id}", summary="One call with its quality", response_model=CallInfo,
            responses={**NOT_FOUND, **UNAVAILABLE}, dependencies=[Depends(require_read)])
async def get_call(request: Request, call_id: str) -> CallInfo:
    """The call record plus its quality: codec, jitter, loss, round trip, concealed frames,
    underruns and gateway-added latency (live when the call runs on this gateway)."""
    return await _find(request, call_id)


@router.post("/{call_id}/hangup", summary="Hang up a call", status_code=202, response_model=HangupResult,
             responses={**NOT_FOUND, **UNAVAILABLE, 409: {"model": Problem, "description": "the call has ended"}},
             dependencies=[Depends(require_admin)])
async def hangup(request: Request, call_id: str) -> HangupResult:
    """End the call with a BYE (admin scope). A call on another gateway replica is hung up
    by that replica: the request goes to it over Redis pub/sub."""
    gateway = gateway_of(request)
    if gateway.hangup(call_id):
        log.info("call %s: hang-up requested through the API", call_id)
        return HangupResult(call_id=call_id, status="hanging-up", on_this_gateway=True)
    found = await _find(request, call_id)
    if found.state == ENDED or gateway.hangups is None:
        raise HTTPException(409, f"call {call_id!r} has ended")
    try:
        await gateway.hangups.publish(call_id)
    except PoolError:
        redis_failed()
        raise HTTPException(503, "cannot reach the call's gateway (Redis unreachable)") from None
    log.info("call %s: hang-up requested through the API, sent to gateway %s", call_id,
             found.gateway_id or "(unknown)")
    return HangupResult(call_id=call_id, status="hanging-up", on_this_gateway=False)
