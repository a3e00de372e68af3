"""Logging for every moshimoshi process: one format, and the story of calls, not of sockets.

The web servers' lines about each connection (uvicorn's ``"WebSocket /v1/session"
[accepted]``, ``connection open``/``closed``, httpx's ``HTTP Request: …``) come once per
call or request; they are DEBUG here, so that at INFO a call is the lines that tell its
story (the gateway's call start and end, a worker's session).
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# uvicorn's per-connection lines (uvicorn.error at INFO): their format strings
CONNECTION_LINES = (
    '%s - "WebSocket %s" [accepted]',
    '%s - "WebSocket %s" 403',
    '%s - "WebSocket %s" %d',
    "connection open",
    "connection closed",
    "connection rejected (%d %s)",
    "HTTP response sent (%d %s)",
)


class _PerConnectionToDebug(logging.Filter):
    """Turns uvicorn's per-connection INFO lines into DEBUG ones (dropped unless DEBUG is on)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and isinstance(record.msg, str) and record.msg in CONNECTION_LINES:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def setup(level: str) -> None:
    """Configure the root logger (stderr, one format) and quiet the per-connection lines."""
    numeric = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(level=numeric, stream=sys.stderr, format=FORMAT)
    uvicorn_error = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _PerConnectionToDebug) for f in uvicorn_error.filters):
        uvicorn_error.addFilter(_PerConnectionToDebug())
    if numeric > logging.DEBUG:
        for name in ("httpx", "httpcore", "websockets.client", "websockets.server"):
            logging.getLogger(name).setLevel(logging.WARNING)
