"""The ASR worker's HTTP/WebSocket surface: sessions, health, readiness, metrics, info, drain."""

from __future__ import annotations

from fastapi import FastAPI, WebSocket
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.asr.runtime import AsrRuntime
from service.asr.session import AsrSession
from service.worker.auth import WorkerAuth

SESSION_PATH = "/v1/asr"


def create_app(runtime: AsrRuntime) -> FastAPI:
    """The ASR worker's ASGI app; ``runtime`` is started by the caller."""
    app = FastAPI(title="moshimoshi ASR worker", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runtime = runtime
    app.add_middleware(
        WorkerAuth,
        secret=runtime.settings.worker_secret,  # /v1/* only with the secret
        on_refused=lambda endpoint: runtime.metrics.auth_refused.labels(endpoint).inc(),
    )

    @app.websocket(SESSION_PATH)
    async def session(ws: WebSocket) -> None:
        await AsrSession(ws, runtime).run()

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        failed = runtime.state == "failed"
        return JSONResponse(
            {"status": "failed" if failed else "alive", "state": runtime.state}, status_code=503 if failed else 200
        )

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ready = runtime.state == "ready"
        return JSONResponse({"ready": ready, "state": runtime.state}, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(runtime.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/drain", status_code=202)
    async def drain() -> JSONResponse:
        """Start draining (as SIGTERM does): no new sessions; open ones go on within the grace."""
        if runtime.request_drain is not None and runtime.state in ("loading", "ready"):
            runtime.request_drain("POST /v1/drain")
        return JSONResponse({"state": runtime.state, "sessions": len(runtime.sessions)}, status_code=202)

    @app.get("/v1/info")
    async def info() -> JSONResponse:
        return JSONResponse(runtime.describe())

    return app
