"""``moshimoshi serve``: a whole system on one machine.

Starts an embedded redis-server (unless REDIS_URL is set), one worker and one ASR worker
(``--asr off``: none) as child processes, and the gateway in this process; they find each
other through Redis exactly as separate deployments do. SIGTERM drains (no new calls; calls in progress may finish within the
grace period), SIGINT stops at once; either way the worker and Redis go down with it.
``serve`` supervises its workers as Kubernetes would (service/supervisor.py): one drained
through the API, or crashed while serving, is replaced by a fresh one; one that fails
before it is ready (a bad ``--model``) stops ``serve`` with its error.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import signal
import sys

from service import realtime
from service.config import ENV_PREFIX, env_name
from service.gateway.main import Gateway
from service.pool import EmbeddedRedis, EmbeddedRedisError
from service.realtime import quiet_gc
from service.settings import ASR_ENV, GatewaySettings, ServeSettings, WorkerSettings
from service.startup import (
    Listener,
    StartupError,
    check_free,
    gateway_listeners,
    wait_for_redis,
    worker_listener,
)
from service.supervisor import Supervised
from service.worker.auth import SECRET_ENV, SECRET_FILE_ENV

log = logging.getLogger("moshimoshi.serve")


def worker_environment(settings: WorkerSettings, redis_url: str) -> dict[str, str]:
    """The child worker's environment: every worker setting as its MOSHIMOSHI_* variable."""
    env = dict(os.environ)
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        name = env_name(field)
        if value is None:
            env.pop(name, None)
        elif isinstance(value, list):
            env[name] = ",".join(value)
        else:
            env[name] = str(value).lower() if isinstance(value, bool) else str(value)
    env["REDIS_URL"] = redis_url
    if settings.advertise_url is None and settings.port and settings.host in ("0.0.0.0", "::", "127.0.0.1"):
        env[ENV_PREFIX + "ADVERTISE_URL"] = f"ws://127.0.0.1:{settings.port}"  # same machine
    env["PYTHONUNBUFFERED"] = "1"
    return env


def asr_environment(settings: ServeSettings, redis_url: str, worker_secret: str | None = None) -> dict[str, str]:
    """The child ASR worker's environment: on this machine, on a free port, unless the
    MOSHIMOSHI_ASR_* variables say otherwise; the workers' secret."""
    env = dict(os.environ)
    env["REDIS_URL"] = redis_url
    env.pop(SECRET_FILE_ENV, None)
    if worker_secret:
        env[SECRET_ENV] = worker_secret
    env.setdefault(ASR_ENV + "HOST", "127.0.0.1")
    env.setdefault(ASR_ENV + "PORT", "0")
    if settings.asr_model:
        env[ASR_ENV + "MODEL"] = settings.asr_model
    env["PYTHONUNBUFFERED"] = "1"
    return env


def with_api_token(settings: GatewaySettings) -> GatewaySettings:
    """``serve`` is the one-machine setup: without configured API tokens it makes one admin
    token for this run and prints it once, on stdout (never in the log). The ``gateway``
    command never does this: without tokens its /v1 API refuses everything."""
    if settings.api_tokens:
        return settings
    token = secrets.token_urlsafe(24)
    print(f"moshimoshi: no MOSHIMOSHI_API_TOKENS set; API token for this run (admin scope): {token}", flush=True)
    return dataclasses.replace(settings, api_tokens=[f"{token}:admin"])


def with_worker_secret(
    gateway_settings: GatewaySettings, worker_settings: WorkerSettings
) -> tuple[GatewaySettings, WorkerSettings]:
    """One secret for the gateway and the workers ``serve`` starts: the configured one, or
    without one a random secret for this run (never printed: only these processes need it)."""
    secret = gateway_settings.worker_secret or worker_settings.worker_secret or secrets.token_urlsafe(32)
    return (
        dataclasses.replace(gateway_settings, worker_secret=secret),
        dataclasses.replace(worker_settings, worker_secret=secret),
    )


def run_serve(
    gateway_settings: GatewaySettings, worker_settings: WorkerSettings, serve_settings: ServeSettings | None = None
) -> int:
    quiet_gc()
    serve_settings = serve_settings or ServeSettings()
    check_free(listeners(gateway_settings, worker_settings, serve_settings))  # before anything starts
    gateway_settings, worker_settings = with_worker_secret(with_api_token(gateway_settings), worker_settings)
    return realtime.run(_serve(gateway_settings, worker_settings, serve_settings))


def listeners(
    gateway_settings: GatewaySettings, worker_settings: WorkerSettings, serve_settings: ServeSettings
) -> list[Listener]:
    """Every port ``serve`` and its children listen on: checked before anything starts."""
    found = [*gateway_listeners(gateway_settings), worker_listener(worker_settings)]
    if serve_settings.asr == "on":
        try:
            port = int(os.environ.get(ASR_ENV + "PORT", "0"))
        except ValueError:
            port = 0  # the ASR worker names its bad setting itself
        found.append(
            Listener("ASR worker", os.environ.get(ASR_ENV + "HOST", "127.0.0.1"), port, ("tcp",), ASR_ENV + "PORT")
        )
    return found


async def _serve(
    gateway_settings: GatewaySettings, worker_settings: WorkerSettings, serve_settings: ServeSettings
) -> int:
    embedded: EmbeddedRedis | None = None
    redis_url = gateway_settings.redis_url or worker_settings.redis_url
    if redis_url:
        await wait_for_redis(redis_url, gateway_settings.redis_connect_seconds)
    else:
        embedded = EmbeddedRedis()
        try:
            redis_url = await embedded.start()
        except EmbeddedRedisError as exc:
            raise StartupError(str(exc)) from None
        log.info("embedded redis-server at %s", redis_url)
    children: list[Supervised] = []
    failure: list[str] = []
    try:
        # --asr off with the embedded Redis: no ASR worker can ever join, so the calls'
        # transcripts hold the agent's side alone (no note, no audio kept for one)
        transcription = gateway_settings.transcription and (
            serve_settings.asr == "on" or embedded is None or gateway_settings.asr_url is not None
        )
        gateway = Gateway(
            dataclasses.replace(gateway_settings, redis_url=redis_url, transcription=transcription),
            model=gateway_settings.model,
        )

        def failed(why: str) -> None:
            failure.append(why)
            gateway.exit_code = 1
            gateway.stop()

        children.append(
            Supervised(
                "worker",
                [sys.executable, "-m", "service", "worker"],
                worker_environment(worker_settings, redis_url),
                required=True,
                on_failed=failed,
            )
        )
        if serve_settings.asr == "on":
            children.append(
                Supervised(
                    "ASR worker",
                    [sys.executable, "-m", "service", "asr"],
                    asr_environment(serve_settings, redis_url, worker_settings.worker_secret),
                    required=False,
                    on_failed=failed,
                )
            )
        for child in children:
            await child.start()
        loop = asyncio.get_running_loop()

        def drain() -> None:
            log.info("SIGTERM: draining")
            gateway.drain()
            for child in children:
                child.drain()

        loop.add_signal_handler(signal.SIGTERM, drain)
        loop.add_signal_handler(signal.SIGINT, gateway.stop)
        loop.add_signal_handler(signal.SIGHUP, gateway.reload_routes)
        status = await gateway.run()
    finally:
        await asyncio.gather(*(child.stop() for child in children))
        if embedded is not None:
            with contextlib.suppress(Exception):
                await embedded.stop()
    if failure:
        raise StartupError(failure[0])
    return status
