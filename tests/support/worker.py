"""Helpers for worker tests: an in-process worker on a free port, a session client, HF caches."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import typing as tp
from pathlib import Path

import numpy as np

from service.settings import WorkerSettings

FRAME_BYTES = 3840


def worker_settings(**overrides: tp.Any) -> WorkerSettings:
    values: dict[str, tp.Any] = {"host": "127.0.0.1", "port": 0, "device": "cpu", "log_level": "warning"}
    values.update(overrides)
    return WorkerSettings(**values)


class RunningWorker:
    """A worker (runtime + uvicorn) serving on 127.0.0.1:<free port> in this event loop."""

    def __init__(self, runtime: tp.Any, port: int) -> None:
        self.runtime = runtime
        self.port = port

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/session"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def get(self, path: str) -> tuple[int, str]:
        import httpx

        async with httpx.AsyncClient() as client:
            response = await client.get(self.http + path, timeout=10)
        return response.status_code, response.text

    async def info(self) -> dict:
        status, text = await self.get("/v1/info")
        assert status == 200, text
        return json.loads(text)

    async def metric(self, name: str, **labels: str) -> float:
        """The value of one sample in /metrics (0 when absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        _, text = await self.get("/metrics")
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0

    async def wait_free(self, slots: int, within: float = 10.0) -> None:
        """Wait until ``slots`` slots are free (sessions end asynchronously)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            info = await self.info()
            if info["free"] == slots:
                return
            if loop.time() > deadline:
                raise AssertionError(f"expected {slots} free slots, /v1/info says {info}")
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running_worker(
    settings: WorkerSettings,
    engine_factory: tp.Callable[[], tp.Any] | None = None,
    *,
    validator: tp.Any = None,
    wait_ready: bool = True,
) -> tp.AsyncIterator[RunningWorker]:
    """Serve a worker in this event loop; stop it (and its inference thread) at exit."""
    import uvicorn

    from service.worker.main import UvicornServer, build_engine, listen_socket
    from service.worker.runtime import WorkerRuntime
    from service.worker.server import create_app

    runtime = WorkerRuntime(settings, engine_factory or (lambda: build_engine(settings)), validator=validator)
    sock = listen_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    membership = None
    if settings.redis_url and validator is None:  # in the pool, as serve_worker does it
        from service.worker.membership import PoolMembership

        membership = PoolMembership(settings, runtime, port)
        runtime.validator = membership.validate
    server = UvicornServer(
        uvicorn.Config(create_app(runtime), log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
    )
    await runtime.start()
    if membership is not None:
        membership.start()
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        if wait_ready:
            await asyncio.wait_for(runtime.wait_ready(), 120)
        yield RunningWorker(runtime, port)
    finally:
        server.should_exit = True
        await asyncio.gather(serving, return_exceptions=True)
        if membership is not None:
            await membership.stop()
        await runtime.close()
        sock.close()


def start_message(**fields: tp.Any) -> str:
    message = {"type": "start", "version": 1, "call_id": "test-call", "slot": None, "token": None}
    message.update(fields)
    return json.dumps(message)


class SessionResult(tp.NamedTuple):
    started: dict | None
    frames: list[bytes]
    events: list[dict]
    close_code: int | None
    close_reason: str


async def collect(ws: tp.Any, *, started: dict | None = None) -> SessionResult:
    """Read a session until the worker closes it."""
    from websockets.exceptions import ConnectionClosed

    frames: list[bytes] = []
    events: list[dict] = []
    try:
        async for message in ws:
            if isinstance(message, bytes):
                frames.append(message)
            else:
                event = json.loads(message)
                if event.get("type") == "started" and started is None:
                    started = event
                else:
                    events.append(event)
    except ConnectionClosed:
        pass
    return SessionResult(started, frames, events, ws.close_code, ws.close_reason or "")


def pcm_frames(seed: int, count: int, amplitude: float = 0.1) -> list[bytes]:
    """``count`` frames of reproducible noise as PCM16 bytes."""
    rng = np.random.default_rng(seed)
    samples = np.clip(rng.standard_normal((count, 1920)) * amplitude, -1, 1)
    return [(frame * 32767).astype("<i2").tobytes() for frame in samples]


def lay_out_hf_cache(
    cache: Path,
    repo_id: str,
    files: tp.Iterable[Path],
    revision: str = "main",
    commit: str = "0123456789abcdef0123456789abcdef01234567",
) -> Path:
    """Put ``files`` in a Hugging Face hub cache as a snapshot of ``repo_id`` at ``revision``."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / revision).write_text(commit)
    for path in files:
        shutil.copyfile(path, snapshot / path.name)
    return snapshot


def delayed_engine(delay_ms: tp.Callable[[int], float]) -> tp.Callable[..., tp.Any]:
    """A ``make_engine`` for ``build_engine``: the real MoshiEngine, each step followed by an
    artificial delay of ``delay_ms(B)`` (a slower device, as it would look to the worker).
    The engine's ``extra_ms`` adds to it while serving."""
    import time

    from service.worker.engine import MoshiEngine

    class DelayedEngine(MoshiEngine):
        extra_ms = 0.0

        def step(self, inputs, active, fresh):  # type: ignore[override]
            output = super().step(inputs, active, fresh)
            time.sleep((delay_ms(self.batch_size) + self.extra_ms) / 1000)
            return output

    return DelayedEngine
