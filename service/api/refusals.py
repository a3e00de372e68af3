"""``/v1/refusals``: calls refused in the last hour, by reason, and the latest of them."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request

from service.api.auth import require_read
from service.api.calls import AUTH_RESPONSES, control_of
from service.api.models import RefusalList

MAX_LIMIT = 1000

router = APIRouter(prefix="/v1", tags=["calls"], responses=AUTH_RESPONSES)


@router.get(
    "/refusals",
    summary="Calls refused in the last hour, and why",
    response_model=RefusalList,
    dependencies=[Depends(require_read)],
)
async def refusals(
    request: Request,
    limit: int = Query(100, ge=0, le=MAX_LIMIT, description="at most this many of the latest, newest first"),
) -> RefusalList:
    """Calls of every gateway that ended before their answer within the last hour: refused
    (488 for the offer, 503 busy, draining or unready, 500) or left by their caller while
    they waited (cancelled). Such calls get no call record and no transcript: this short-lived,
    capped record (the caller's number masked) is all that is kept of them. ``by_reason`` is
    exact; ``refusals`` holds the latest ``limit`` (1000 at most are kept)."""
    return await control_of(request).refusals(limit=limit)
