"""FastAPI application of the gateway (probes and metrics; the calls API grows here)."""

from __future__ import annotations

import typing as tp

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import __version__
from service.api.webrtc import webrtc_router

if tp.TYPE_CHECKING:
    from service.gateway.main import Gateway


def create_app(gateway: Gateway) -> FastAPI:
    app = FastAPI(title="moshimoshi gateway", version=__version__)

    @app.get("/healthz", tags=["probes"])
    async def healthz() -> dict[str, str]:
        """Alive: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["probes"])
    async def readyz() -> JSONResponse:
        """Ready: Redis reachable, a worker ready, not draining."""
        state = gateway.readiness()
        return JSONResponse(state, status_code=200 if state["ready"] else 503)

    @app.get("/metrics", tags=["probes"])
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    app.include_router(webrtc_router(gateway))
    return app
