"""Counting HTTP requests by method, route template and status code.

The route is the template the request matched (``/v1/calls/{call_id}``), never the raw
path, so that the number of series stays bounded whatever clients send; a request that
matches no route counts as ``unmatched``. WebSocket upgrades are not counted here.
"""

from __future__ import annotations

import typing as tp

from prometheus_client import Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HTTP_REQUESTS = Counter(
    "moshimoshi_http_requests_total", "API requests by route and status code.", ["method", "route", "code"]
)
UNMATCHED = "unmatched"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED


class HttpMetricsMiddleware:
    """ASGI middleware: ``moshimoshi_http_requests_total{method, route, code}``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: dict[str, int] = {}

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            method = scope.get("method", "GET")
            code = status.get("code", 500)
            HTTP_REQUESTS.labels(method if method in METHODS else "other", route_template(scope), str(code)).inc()


def install(app: tp.Any) -> None:
    app.add_middleware(HttpMetricsMiddleware)
