"""The shared secret between gateways and workers: who may use a worker's /v1 API.

A worker's sessions (``/v1/session``; an ASR worker's ``/v1/asr``), ``/v1/drain`` and
``/v1/info`` require ``Authorization: Bearer <secret>``, the secret every gateway and worker
of a deployment gets from the same place (``MOSHIMOSHI_WORKER_SECRET``, or a file with
``MOSHIMOSHI_WORKER_SECRET_FILE``: a mounted Kubernetes Secret). ``/healthz``, ``/readyz``
and ``/metrics`` stay open for probes and Prometheus. The comparison takes constant time;
a refused request gets HTTP 401 (a WebSocket is refused before the upgrade: 401 where the
server can send an HTTP answer, else 403) and is counted.

Without a secret a worker serves /v1 to anyone who can reach it, so it starts only when
bound to a loopback address, or when told ``--insecure-no-worker-secret``.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import time
import typing as tp
from pathlib import Path

from service.config import ConfigError
from service.wire import AUTH_PREFIX, authorization

__all__ = ["WorkerAuth", "authorization", "check_exposure", "is_loopback", "resolve_secret"]

log = logging.getLogger(__name__)

PROTECTED_PREFIX = AUTH_PREFIX
MIN_SECRET_LENGTH = 16
MAX_SECRET_LENGTH = 4096
SECRET_ENV = "MOSHIMOSHI_WORKER_SECRET"
SECRET_FILE_ENV = "MOSHIMOSHI_WORKER_SECRET_FILE"
INSECURE_ENV = "MOSHIMOSHI_INSECURE_NO_WORKER_SECRET"
CHALLENGE = 'Bearer realm="moshimoshi-worker"'
LOG_EVERY_SECONDS = 10.0  # refusals are all counted, but logged at most this often


def resolve_secret(secret: str | None, secret_file: str | None) -> str | None:
    """The secret from the setting or the file it names (one of them, not both), checked:
    at least 16 characters, printable, no whitespace. Raises ConfigError naming the setting."""
    if secret and secret_file:
        raise ConfigError(f"set {SECRET_ENV} or {SECRET_FILE_ENV}, not both")
    label = SECRET_ENV
    if secret_file:
        label = f"{SECRET_FILE_ENV}={secret_file}"
        try:
            secret = Path(secret_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{label}: cannot read the worker secret: {exc}") from None
        if not secret:
            raise ConfigError(f"{label}: the file is empty")
    if secret is None or secret == "":
        return None
    if len(secret) < MIN_SECRET_LENGTH:
        raise ConfigError(
            f"{label}: the worker secret must have at least {MIN_SECRET_LENGTH} characters "
            "(e.g. `openssl rand -hex 32`)"
        )
    if len(secret) > MAX_SECRET_LENGTH or any(ch.isspace() or not ch.isprintable() for ch in secret):
        raise ConfigError(
            f"{label}: the worker secret must be printable, without whitespace, and at most "
            f"{MAX_SECRET_LENGTH} characters"
        )
    return secret


def is_loopback(host: str) -> bool:
    """True for a bind address only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, secret: str | None, insecure: bool) -> None:
    """Refuse to serve an open /v1 API beyond this machine (ConfigError)."""
    if secret or insecure or is_loopback(host):
        return
    raise ConfigError(
        f"the worker would serve its sessions and /v1/drain to anyone who can reach {host}: set "
        f"{SECRET_ENV} (or {SECRET_FILE_ENV}, a mounted secret file) to the secret its gateways use, bind "
        "--host 127.0.0.1, or pass --insecure-no-worker-secret on a network where only gateways reach it"
    )


class WorkerAuth:
    """ASGI middleware: ``/v1/*`` (HTTP and WebSocket) only with the secret; the rest open.

    ``secret`` None lets everything through (a loopback or explicitly insecure worker).
    ``on_refused(endpoint)`` counts each refusal.
    """

    def __init__(self, app: tp.Any, secret: str | None, on_refused: tp.Callable[[str], None] | None = None) -> None:
        self.app = app
        self.expected = f"Bearer {secret}".encode() if secret else None
        self.on_refused = on_refused
        self.refused = 0
        self._logged_at = -LOG_EVERY_SECONDS

    def _allowed(self, scope: dict) -> bool:
        if self.expected is None or not scope.get("path", "").startswith(PROTECTED_PREFIX):
            return True
        presented = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                presented = value
                break
        # compare_digest: the time taken does not tell how much of the secret was right
        return hmac.compare_digest(presented, self.expected)

    async def __call__(self, scope: dict, receive: tp.Callable, send: tp.Callable) -> None:
        if scope["type"] not in ("http", "websocket") or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        endpoint = _endpoint(scope.get("path", ""))
        self.refused += 1
        if self.on_refused is not None:
            self.on_refused(endpoint)
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY_SECONDS:
            self._logged_at = now
            log.warning(
                "refused %s %s from %s: missing or wrong worker secret (%d refused so far)",
                scope["type"],
                endpoint,
                (scope.get("client") or ("?",))[0],
                self.refused,
            )
        body = json.dumps(
            {
                "error": "unauthorized",
                "detail": f"missing or wrong worker secret (Authorization: Bearer <{SECRET_ENV}>)",
            }
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"www-authenticate", CHALLENGE.encode()),
            (b"content-length", str(len(body)).encode()),
        ]
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 401, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        message = await receive()  # websocket.connect: nothing is accepted, no state is made
        if message.get("type") != "websocket.connect":
            return
        if "websocket.http.response" in scope.get("extensions", {}):
            await send({"type": "websocket.http.response.start", "status": 401, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": body})
        else:  # a close before the accept: the server answers the upgrade with 403
            await send({"type": "websocket.close", "code": 1008})


def _endpoint(path: str) -> str:
    """A bounded label for metrics: the known endpoints by name, anything else ``other``."""
    return path if path in ("/v1/session", "/v1/asr", "/v1/drain", "/v1/info") else "other"
