"""The operator dashboard: one static page (HTML, JS, CSS; no build step, no CDN).

The page itself holds no data: it asks for an API token, then reads ``/v1/calls``,
``/v1/pool`` and the live transcript WebSocket with it.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter, HTTPException
from fastapi.responses import RedirectResponse, Response

ASSETS = {
    "dashboard.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
# The page loads only its own script and style and talks only to this gateway.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(tags=["dashboard"])


@cache
def asset(name: str) -> bytes:
    return resources.files("service.api").joinpath("static", name).read_bytes()


def _serve(name: str) -> Response:
    return Response(asset(name), media_type=ASSETS[name], headers=SECURITY_HEADERS)


@router.get("/", include_in_schema=False)
async def root() -> RedirectResponse:
    return RedirectResponse("/dashboard", status_code=307)


@router.get(
    "/dashboard",
    summary="The operator dashboard (HTML)",
    response_class=Response,
    responses={200: {"content": {"text/html": {}}}},
)
async def dashboard() -> Response:
    """Live calls, the live transcript of a selected call, and pool capacity."""
    return _serve("dashboard.html")


@router.get("/dashboard/{name}", include_in_schema=False)
async def dashboard_asset(name: str) -> Response:
    if name not in ASSETS or name == "dashboard.html":
        raise HTTPException(404, "no such file")
    return _serve(name)
