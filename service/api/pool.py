"""``/v1/pool`` (workers, slots and their state) and ``/v1/workers/{id}/drain``."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from service.api.auth import require_admin, require_read
from service.api.calls import AUTH_RESPONSES, control_of, failed
from service.api.control import ControlError
from service.api.models import DrainResult, PoolHistory, PoolState, Problem

router = APIRouter(prefix="/v1", tags=["pool"], responses=AUTH_RESPONSES)


@router.get(
    "/pool",
    summary="Workers, slots and their state",
    response_model=PoolState,
    dependencies=[Depends(require_read)],
    responses={503: {"model": Problem, "description": "Redis unreachable"}},
)
async def pool_state(request: Request) -> PoolState:
    """Every worker seen recently (live, or dead and not yet forgotten) with each slot's
    lease: the call holding it, its fencing token and the time left on it."""
    try:
        return await control_of(request).pool()
    except ControlError as exc:
        raise failed(exc) from None


@router.get(
    "/pool/history",
    summary="Concurrent calls over the last hour",
    response_model=PoolHistory,
    dependencies=[Depends(require_read)],
)
async def pool_history(request: Request) -> PoolHistory:
    """Calls holding a worker slot (every gateway's) and the capacity of the ready workers,
    the busiest moment of each interval over the last hour, oldest first: what the
    dashboard's sparkline draws. Kept in the gateway's memory (360 samples at most)."""
    return control_of(request).pool_history()


@router.post(
    "/workers/{worker_id}/drain",
    summary="Drain a worker",
    status_code=202,
    response_model=DrainResult,
    dependencies=[Depends(require_admin)],
    responses={
        404: {"model": Problem, "description": "no such live worker"},
        502: {"model": Problem, "description": "the worker did not answer"},
        503: {"model": Problem, "description": "Redis unreachable"},
    },
)
async def drain_worker(request: Request, worker_id: str) -> DrainResult:
    """Ask a worker to drain (admin scope), as its SIGTERM would: it takes no new calls,
    its calls go on for up to its drain grace, then it exits. Goes to the worker's own
    ``POST /v1/drain``."""
    try:
        return await control_of(request).drain_worker(worker_id)
    except ControlError as exc:
        raise failed(exc) from None
