"""FastAPI application of the gateway: probes, metrics, the /v1 API and the dashboard.

Each part lives in its own router module; this file only puts them together.
"""

from __future__ import annotations

import typing as tp

from fastapi import Depends, FastAPI, Response
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from service import __version__
from service.api import calls, dashboard, http_metrics, pool, recordings, refusals, transcripts
from service.api.auth import ApiTokens, Scope, require_read
from service.api.control import CallControl
from service.api.models import Readiness, TokenInfo
from service.api.webrtc import webrtc_router

DESCRIPTION = """The moshimoshi gateway's control plane.

`/v1` needs a bearer token (`Authorization: Bearer <token>`; tokens and their scopes come
from `MOSHIMOSHI_API_TOKENS`, `token:read`, `token:call`, `token:recordings` or `token:admin`).
Read scope lists calls, refusals, pool and transcripts; call scope places WebRTC calls (the
softphone) and ends its own, and reads nothing; recordings scope reads as read does and
downloads calls' recordings; admin scope may all of it, and hangs up any call, pauses
recordings and drains workers. The live transcript
WebSocket takes the token as `?token=` since browsers cannot set headers on WebSockets.
Probes, `/metrics` and the dashboard page itself need no token.

**Live transcript** (WebSocket, not listed below): `GET /v1/calls/{call_id}/transcript/live?token=…`
replays the pieces so far, then sends each new one as
`{"type": "piece", "seq", "t", "kind", "text"}`; at the end `{"type": "end", "reason"}` and
close 1000. Refusals close with 4401, 4403, 4404 (unknown call) or 4503 (Redis unreachable).
"""

TAGS = [
    {"name": "calls", "description": "Active and recent calls of every gateway replica, with their quality."},
    {"name": "transcripts", "description": "Both sides' words, the caller's DTMF and notes, stored and live."},
    {"name": "recordings", "description": "Calls' stereo recordings (recordings scope), pause and resume (admin)."},
    {"name": "pool", "description": "Workers, their slots and leases; draining a worker."},
    {"name": "probes", "description": "Kubernetes probes and Prometheus metrics."},
    {"name": "dashboard", "description": "The operator dashboard page."},
    {"name": "token", "description": "What the presented token may do."},
]


class Health(BaseModel):
    status: str


def create_app(control: CallControl, api_tokens: ApiTokens) -> FastAPI:
    """The control plane's app, serving ``control`` to holders of ``api_tokens``."""
    # /docs serves Swagger UI from the fastapi-offline package (no CDN): the API reference
    # works in an air-gapped call center. No /redoc: ReDoc's page still asks its CDN for a logo.
    app = FastAPIOffline(
        title="moshimoshi gateway",
        version=__version__,
        description=DESCRIPTION,
        openapi_tags=TAGS,
        static_url="/docs/assets",
        redoc_url=None,
    )
    app.state.control = control
    app.state.api_tokens = api_tokens
    http_metrics.install(app)

    @app.get("/healthz", tags=["probes"], summary="Liveness", response_model=Health)
    async def healthz() -> dict[str, str]:
        """Alive: the process answers."""
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["probes"],
        summary="Readiness",
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "not ready"}},
    )
    async def readyz() -> JSONResponse:
        """Ready to take calls: Redis reachable, a worker ready, not draining (503 otherwise)."""
        state = control.readiness()
        return JSONResponse(state.model_dump(), status_code=200 if state.ready else 503)

    @app.get(
        "/metrics",
        tags=["probes"],
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}}},
    )
    async def prometheus_metrics() -> Response:
        """The gateway's metrics in the Prometheus text format (workers serve their own)."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get(
        "/v1/token",
        tags=["token"],
        summary="The presented token's scope",
        response_model=TokenInfo,
        responses={401: {"description": "no token, or an unknown one"}},
    )
    async def token_scope(scope: tp.Annotated[Scope, Depends(require_read)]) -> TokenInfo:
        """What the presented token may do (the dashboard shows admin actions to admin tokens only)."""
        return TokenInfo(scope=scope.name.lower())

    app.include_router(calls.router)
    app.include_router(refusals.router)
    app.include_router(transcripts.router)
    app.include_router(recordings.router)
    app.include_router(pool.router)
    app.include_router(dashboard.router)
    app.include_router(webrtc_router(control))
    return app
