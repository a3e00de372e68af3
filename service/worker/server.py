"""The worker's HTTP/WebSocket surface (FastAPI): sessions, health, readiness, metrics, info."""

from __future__ import annotations

from fastapi import FastAPI, WebSocket
from fastapi.responses import JSONResponse, Response

from service.worker.auth import WorkerAuth
from service.worker.metrics import PROMETHEUS_CONTENT_TYPE
from service.worker.runtime import WorkerRuntime
from service.worker.session import Session


def create_app(runtime: WorkerRuntime) -> FastAPI:
    """The worker's ASGI app; ``runtime`` must be started by the caller. ``/v1/*`` requires
    the worker secret when one is set (service.worker.auth); probes and metrics stay open."""
    app = FastAPI(title="moshimoshi worker", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runtime = runtime
    app.add_middleware(
        WorkerAuth,
        secret=runtime.settings.worker_secret,
        on_refused=lambda endpoint: runtime.metrics.auth_refused.labels(endpoint).inc(),
    )

    @app.websocket("/v1/session")
    async def session(ws: WebSocket) -> None:
        await Session(ws, runtime).run()

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        """Alive: the process answers (also while loading or draining)."""
        status = 503 if runtime.state == "failed" else 200
        return JSONResponse(
            {"status": "failed" if status == 503 else "alive", "state": runtime.state}, status_code=status
        )

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Ready: model loaded and warm, not draining."""
        ready = runtime.state == "ready"
        return JSONResponse({"ready": ready, "state": runtime.state}, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        if runtime.table is not None:
            runtime.metrics.slots_busy.set(runtime.table.busy)
        return Response(runtime.metrics.render(), media_type=PROMETHEUS_CONTENT_TYPE)

    @app.post("/v1/drain", status_code=202)
    async def drain() -> JSONResponse:
        """Start draining (as SIGTERM does): no new sessions; calls finish within the grace."""
        if runtime.request_drain is not None and runtime.state in ("loading", "ready"):
            runtime.request_drain("POST /v1/drain")
        return JSONResponse({"state": runtime.state, "sessions": len(runtime.sessions)}, status_code=202)

    @app.get("/v1/info")
    async def info() -> JSONResponse:
        return JSONResponse(runtime.describe())

    return app
