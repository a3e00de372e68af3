"""``moshimoshi asr``: load an ASR backend, register in the pool as an ASR worker, serve.

The HTTP server starts first (``/healthz`` answers while a model loads or downloads;
``/readyz`` says 503 until it is loaded). Once ready the worker registers in the pool with
role ``asr`` (gateways find it there; model routing never claims it) and heartbeats.
SIGTERM or SIGINT drains: no new sessions, open ones go on until they end or
``drain_grace_seconds`` pass; a second signal ends them at once. A backend that fails to
load exits 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import typing as tp

import uvicorn

from service import logs, realtime
from service.asr.backends import Backend
from service.asr.runtime import AsrRuntime
from service.config import ConfigError
from service.settings import DEFAULT_ASR_MODEL, AsrSettings

if tp.TYPE_CHECKING:
    from service.pool import WorkerRegistration

log = logging.getLogger("service.asr")

WS_MAX_BYTES = 2**16 + 4096  # an audio message is at most 2 s of PCM16 at 16 kHz (64 008 bytes)


def cuda_available() -> bool:
    try:
        import ctranslate2
    except ImportError:
        return False
    devices: int = ctranslate2.get_cuda_device_count()
    return devices > 0


def resolve_device(settings: AsrSettings) -> str:
    return settings.device or ("cuda" if cuda_available() else "cpu")


def resolve_model(settings: AsrSettings) -> str:
    if settings.model:
        return settings.model
    return DEFAULT_ASR_MODEL if resolve_device(settings) == "cuda" else "demo"


def build_backend(settings: AsrSettings) -> Backend:
    """The backend the settings ask for (blocking: loading may download a model)."""
    if settings.backend == "openai":
        from service.asr.backends import OpenAIBackend

        assert settings.openai_base_url and settings.model  # AsrSettings.validate
        return OpenAIBackend(
            settings.openai_base_url,
            settings.model,
            api_key=settings.openai_api_key,
            language=settings.language,
            timeout=settings.openai_timeout_seconds,
            concurrency=settings.openai_concurrency,
        )
    from service.asr.backends import FasterWhisperBackend

    device = resolve_device(settings)
    threads = settings.cpu_threads or max(1, (_cpu_count() or 2) // 2)
    return FasterWhisperBackend(
        resolve_model(settings),
        device=device,
        compute_type=settings.compute_type,
        cpu_threads=threads,
        language=settings.language,
        beam_size=settings.beam_size,
        revision=settings.hf_revision,
    )


def _cpu_count() -> int | None:
    import os

    return os.cpu_count()


class AsrMembership:
    """Registers the ready ASR worker in the pool (role ``asr``) and reports its free sessions."""

    def __init__(self, settings: AsrSettings, runtime: AsrRuntime, port: int) -> None:
        from service.pool import connect
        from service.worker.membership import default_advertise_url

        assert settings.redis_url
        self.settings = settings
        self.runtime = runtime
        self.url = settings.advertise_url or default_advertise_url(settings.host, port)
        self.worker_id = settings.worker_id or f"asr-{socket.gethostname()}-{port}"
        self.client = connect(settings.redis_url)
        self.registration: WorkerRegistration | None = None
        self._created = asyncio.Event()  # the registration exists (the backend is loaded)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self.runtime.on_sessions_changed = self._report
        self._task = asyncio.create_task(self._register_when_ready(), name="asr-membership")

    def _report(self, free: int) -> None:
        if self.registration is not None:
            self.registration.report_free(free)

    async def _register_when_ready(self) -> None:
        from service.pool import ASR_ROLE, WorkerInfo, WorkerRegistration

        await self.runtime.ready_event.wait()
        if self.runtime.error is not None:
            return
        info = WorkerInfo(
            worker_id=self.worker_id,
            url=self.url,
            model=self.runtime.model,
            capacity=self.settings.max_sessions,
            license="",
            started_at=time.time(),
            role=ASR_ROLE,
        )
        self.registration = WorkerRegistration(self.client, info, interval=self.settings.heartbeat_seconds)
        self.registration.report_free(self.settings.max_sessions - len(self.runtime.sessions))
        if self.runtime.state == "draining":
            self.registration.state = "draining"
        self._created.set()
        if await self.registration.start():
            log.info("in the pool as ASR worker %s at %s", self.worker_id, self.url)
        else:
            log.error(
                "not in the pool: Redis at %s does not answer; ASR worker %s registers as soon as it does",
                self.client.location,
                self.worker_id,
            )

    async def wait_registered(self) -> None:
        """Returns once this ASR worker is in the pool (a heartbeat reached Redis)."""
        await self._created.wait()
        assert self.registration is not None
        await self.registration.joined.wait()

    async def drain(self) -> None:
        if self.registration is not None:
            await self.registration.drain()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.registration is not None:
            await self.registration.stop()
        with contextlib.suppress(Exception):
            await self.client.close()


async def serve_asr(
    settings: AsrSettings,
    *,
    backend_factory: tp.Callable[[], Backend] | None = None,
    on_listening: tp.Callable[[int], None] | None = None,
) -> int:
    """Run an ASR worker on the current event loop until it has drained; the exit status."""
    from service.asr.server import create_app
    from service.startup import asr_listener, listen, wait_for_redis
    from service.worker.auth import check_exposure
    from service.worker.main import UvicornServer
    from service.worker.serving import serve_until_drained

    try:
        check_exposure(settings.host, settings.worker_secret, settings.insecure_no_worker_secret)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    if settings.redis_url:
        await wait_for_redis(settings.redis_url, settings.redis_connect_seconds)
    sock = listen(asr_listener(settings))
    port = sock.getsockname()[1]
    runtime = AsrRuntime(settings, backend_factory or (lambda: build_backend(settings)))
    membership = AsrMembership(settings, runtime, port) if settings.redis_url else None
    config = uvicorn.Config(
        create_app(runtime),
        log_level=settings.log_level,
        lifespan="off",
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=5,
        ws_max_size=WS_MAX_BYTES,
    )
    server = UvicornServer(config)

    def end_sessions() -> None:
        for session in list(runtime.sessions):
            session.shutdown()

    def report_failure(error: BaseException, announce: asyncio.Task[bool]) -> None:
        log.error("ASR worker failed: %s: %s", type(error).__name__, error)

    return await serve_until_drained(
        runtime,
        membership,
        server,
        sock,
        log=log,
        what="ASR worker",
        host=settings.host,
        grace=settings.drain_grace_seconds,
        begin_drain=None,
        end_sessions=end_sessions,
        sessions_word="sessions",
        report_failure=report_failure,
        on_listening=on_listening,
    )


def run_asr(settings: AsrSettings) -> int:
    """Entry point of the ``asr`` role: serve until drained; the process exit status."""
    logs.setup(settings.log_level)
    try:
        return realtime.run(serve_asr(settings))
    except KeyboardInterrupt:
        return 130
