"""``run_worker``: load the model, warm it up, serve sessions, drain on SIGTERM.

The HTTP server starts first (``/healthz`` answers while a 7B checkpoint loads; ``/readyz``
says 503 until the model is warm). SIGTERM or SIGINT starts draining: no new sessions,
calls go on until they end or ``drain_grace_seconds`` pass, then the process exits 0.
A second signal ends the remaining calls at once. A model that fails to load exits 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import typing as tp

import uvicorn

from service import logs, realtime
from service.config import ConfigError
from service.notify import tell_failure
from service.settings import DEFAULT_MODEL, WorkerSettings
from service.startup import Listener, listen, setting_of, wait_for_redis, worker_listener
from service.worker.capacity import FRAME_RATE, ContextError
from service.worker.checkpoint import CheckpointError, MoshiVersionError
from service.worker.engine_api import Engine
from service.worker.runtime import WorkerRuntime
from service.worker.serving import announced_ready, serve_until_drained
from service.worker.slots import TokenValidator

log = logging.getLogger("service.worker")

CPU_DEFAULT_SLOTS = 4  # echo; and on CPU the measured B starts here (--max-slots raises it)
DEMO_BANNER = (
    "model 'demo': a TINY RANDOM-WEIGHT Moshi built locally for trying the pipeline; "
    "it babbles, it does not converse. Use --model llm-jp/llm-jp-moshi-v1 for the real one."
)


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def resolve_device(settings: WorkerSettings) -> str:
    if settings.device:
        return settings.device
    return "cuda" if cuda_available() else "cpu"


def resolve_model(settings: WorkerSettings) -> str:
    if settings.model:
        return settings.model
    return DEFAULT_MODEL if cuda_available() else "demo"


def default_cpu_threads() -> int:
    """Half the cores: OpenMP steps stall badly when their threads lose their cores."""
    return max(1, (os.cpu_count() or 2) // 2)


def build_engine(settings: WorkerSettings, make_engine: tp.Callable[..., Engine] | None = None) -> Engine:
    """The engine ``settings`` ask for (runs in the inference thread: it may take minutes).

    A model engine is sized here: B from memory and the measured step time
    (:mod:`service.worker.sizing`); ``make_engine(loaded, batch_size, **sampling)`` builds
    one at a given B (default :class:`MoshiEngine`).
    """
    model = resolve_model(settings)
    if model == "echo":
        from service.worker.echo import EchoEngine

        return EchoEngine(settings.slots or CPU_DEFAULT_SLOTS, settings.echo_delay_ms)

    from service.worker.capacity import memory_slots, set_context
    from service.worker.checkpoint import load_checkpoint
    from service.worker.engine import MoshiEngine
    from service.worker.sizing import LIMIT, MEMORY, size_batch

    device = resolve_device(settings)
    if device == "cpu":
        import torch

        threads = settings.cpu_threads or default_cpu_threads()
        torch.set_num_threads(threads)
        log.info("CPU inference on %d torch thread(s)", threads)
    if model == "demo":
        from service.worker.tinymodel import demo_checkpoint

        log.warning(DEMO_BANNER)
        loaded = load_checkpoint(
            str(demo_checkpoint()),
            device=device,
            dtype=settings.dtype,
            model_id="demo",
            source_kind="demo",
            license="n/a (random weights generated locally)",
        )
    else:
        loaded = load_checkpoint(model, revision=settings.hf_revision, device=device, dtype=settings.dtype)
    banner = loaded.info.banner()
    if loaded.info.research_only:
        log.warning(banner)
    else:
        log.info(banner)
    context = set_context(loaded.lm, settings.context_seconds)
    loaded.info = dataclasses.replace(loaded.info, context_steps=context)
    bound = memory_slots(loaded.lm, device)
    log.info("context %.0f s (%d steps); %s", context / FRAME_RATE, context, bound.describe())
    upper, upper_reason = bound.slots, MEMORY
    limit = settings.max_slots or (CPU_DEFAULT_SLOTS if device == "cpu" else None)
    if limit is not None and limit < upper:
        upper, upper_reason = limit, LIMIT
    make = make_engine or MoshiEngine

    def build(batch_size: int) -> Engine:
        return make(
            loaded,
            batch_size,
            greedy=settings.greedy,
            temp=settings.temp,
            temp_text=settings.temp_text,
            top_k=settings.top_k,
            top_k_text=settings.top_k_text,
            seed=settings.seed,
            cuda_graphs=settings.cuda_graphs,
            filled_kv=settings.filled_kv,
        )

    if settings.slots is not None and settings.slots > bound.slots:
        log.warning(
            "--slots %d: only %d fit in memory by the estimate; the KV rings may not fit", settings.slots, bound.slots
        )
    engine, sizing = size_batch(
        build,
        budget_ms=settings.step_budget_ms,
        upper=upper,
        upper_reason=upper_reason,
        memory_slots=bound.slots,
        forced=settings.slots,
    )
    log.info("slots: %s", sizing.describe())
    _reseed(settings.seed)  # the timing steps drew from the RNG, as many as they took
    engine.sizing = sizing  # read by the runtime for /v1/info and the pool
    return engine


def _reseed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def configure_logging(level: str) -> None:
    logs.setup(level)


def listen_socket(host: str, port: int) -> socket.socket:
    """The worker's listening socket; StartupError (one line: who holds the port) when taken."""
    return listen(Listener("worker", host, port, ("tcp",), setting_of("--port")))


async def serve_worker(
    settings: WorkerSettings,
    *,
    validator: TokenValidator | None = None,
    engine_factory: tp.Callable[[], Engine] | None = None,
    on_listening: tp.Callable[[int], None] | None = None,
) -> int:
    """Run a worker on the current event loop until it has drained; return the exit status."""
    from service.worker.auth import check_exposure, is_loopback
    from service.worker.server import create_app

    try:
        check_exposure(settings.host, settings.worker_secret, settings.insecure_no_worker_secret)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    if not settings.worker_secret:
        log.warning(
            "no worker secret: /v1 (sessions, drain, info) is open to %s",
            "every local process" if is_loopback(settings.host) else f"anyone who can reach {settings.host}",
        )
    if settings.redis_url and validator is None:
        await wait_for_redis(settings.redis_url, settings.redis_connect_seconds)
    sock = listen(worker_listener(settings))
    port = sock.getsockname()[1]
    runtime = WorkerRuntime(settings, engine_factory or (lambda: build_engine(settings)), validator=validator)
    membership = None
    if settings.redis_url and validator is None:
        from service.worker.membership import PoolMembership

        membership = PoolMembership(settings, runtime, port)
        runtime.validator = membership.validate  # read when the slot table is built
    app = create_app(runtime)
    config = uvicorn.Config(
        app,
        log_level=settings.log_level,
        lifespan="off",
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=5,
    )
    server = UvicornServer(config)

    def end_sessions() -> None:
        for session in list(runtime.sessions.values()):
            session.end("shutdown")

    def report_failure(error: BaseException, announce: asyncio.Task[bool]) -> None:
        why = _describe_error(error)
        if not tell_failure(why) or announced_ready(announce):  # else serve's last line says it
            log.error("worker failed: %s", why)

    return await serve_until_drained(
        runtime,
        membership,
        server,
        sock,
        log=log,
        what="worker",
        host=settings.host,
        grace=settings.drain_grace_seconds,
        # at once: the answer to POST /v1/drain says so
        begin_drain=lambda: runtime.begin_drain(settings.drain_grace_seconds),
        end_sessions=end_sessions,
        sessions_word="calls",
        report_failure=report_failure,
        on_listening=on_listening,
    )


def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, (CheckpointError, MoshiVersionError, ContextError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class UvicornServer(uvicorn.Server):
    """uvicorn's server without its own signal handling: the worker drains first."""

    @contextlib.contextmanager
    def capture_signals(self) -> tp.Iterator[None]:
        yield


def run_worker(settings: WorkerSettings) -> int:
    """Entry point of the worker role: serve until drained; return the process exit status."""
    configure_logging(settings.log_level)
    try:
        return realtime.run(serve_worker(settings))
    except KeyboardInterrupt:
        return 130
