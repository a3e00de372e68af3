"""Shared fixtures (real servers on free ports), the test markers, and the event loops the
async tests run on.

Every test is one of ``unit`` (no process, no real time: the default), ``system`` (real
processes: redis-server, sipp, baresip, moshimoshi, Chromium) or ``realtime`` (a system test
with timing budgets, ``tests/support/realtime.py``). ``pytest -m unit`` runs the fast set in
seconds. A test left ``unit`` that starts a process fails and says to mark it.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from service.realtime import EVENT_LOOPS, event_loop_name, loop_factory
from tests.support.procs import free_port, wait_for_tcp
from tests.support.realtime import Timing
from tests.support.services import Gateway, start_serve
from tests.support.sipp import Sipp

# In-process tests of the SIP and RTP stacks run on every event loop the service supports;
# every other async test runs on the production loop (uvloop unless MOSHIMOSHI_EVENT_LOOP
# says otherwise). Tests of real moshimoshi processes choose the process's loop themselves
# (tests/test_e2e_echo.py runs its gateway on each).
ALL_LOOP_MODULES = ("test_sip_", "test_rtpsession", "test_gateway_media", "test_webrtc_media")


def pytest_asyncio_loop_factories(config, item) -> dict[str, Callable]:
    module = item.module.__name__.rsplit(".", 1)[-1] if item.module is not None else ""
    if module.startswith(ALL_LOOP_MODULES):
        return {name: loop_factory(name) for name in EVENT_LOOPS}
    name = event_loop_name()
    return {name: loop_factory(name)}


_running_unit_test = False
_popen_init = subprocess.Popen.__init__


def _guarded_popen_init(self, *args, **kwargs) -> None:
    if _running_unit_test:
        raise RuntimeError(
            "a unit test started a process: mark the test or its module `pytest.mark.system` (see tests/conftest.py)"
        )
    _popen_init(self, *args, **kwargs)


def pytest_configure(config) -> None:
    subprocess.Popen.__init__ = _guarded_popen_init  # type: ignore[method-assign]


def pytest_unconfigure(config) -> None:
    subprocess.Popen.__init__ = _popen_init  # type: ignore[method-assign]


# fixtures that start real processes: a test that uses one (even through another) is a system test
SYSTEM_FIXTURES = frozenset({"redis_server", "small_redis_server", "demo_gateway"})


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if item.get_closest_marker("system") is None and (
            item.get_closest_marker("realtime") is not None
            or SYSTEM_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        ):
            item.add_marker(pytest.mark.system)
        if item.get_closest_marker("system") is None:
            item.add_marker(pytest.mark.unit)


def pytest_runtest_setup(item) -> None:
    global _running_unit_test
    _running_unit_test = item.get_closest_marker("unit") is not None


def pytest_runtest_teardown(item) -> None:
    global _running_unit_test
    _running_unit_test = False


STALL_LOG = "stalled: no frame for"  # service/gateway/calls/call.py STALL_LOG (not imported: a unit test's import cost)


@pytest.fixture(autouse=True)
def no_needless_worker_stall(request, tmp_path_factory) -> Iterator[None]:
    """A system test fails when a gateway it ran judged a worker stalled (and moved or ended
    a call for it), unless the test stops a worker on purpose (``stall_expected``): a worker
    that is merely slow on a loaded machine must not be abandoned (issue 13, item 9). The
    logs under the session's temporary directory are read from where they were before the test."""
    if request.node.get_closest_marker("system") is None:
        yield
        return
    base = tmp_path_factory.getbasetemp()
    before = {path: path.stat().st_size for path in base.rglob("*.log")}
    yield
    if request.node.get_closest_marker("stall_expected") is not None:
        return
    stalls = []
    for path in base.rglob("*.log"):
        start = before.get(path, 0)
        try:
            if path.stat().st_size <= start:
                continue
            with path.open("rb") as log:
                log.seek(start)
                added = log.read().decode(errors="replace")
        except OSError:
            continue
        stalls += [f"{path.name}: {line.strip()}" for line in added.splitlines() if STALL_LOG in line]
    if stalls:
        pytest.fail(
            "a gateway judged a worker stalled in a test that stops none (a needless failover):\n"
            + "\n".join(stalls[:10]),
            pytrace=False,
        )


@pytest.fixture
def timing() -> Timing:
    """Timing budgets of a ``@realtime_test`` (``timing.expect(ok, what)``)."""
    return Timing()


class RedisServer:
    """A real redis-server on a free loopback port, stopped at teardown."""

    def __init__(self, tmp_path, *extra_args: str) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed: run the tests through `make test`")
        self.port = free_port()
        self.dir = tmp_path
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_tcp("127.0.0.1", self.port, proc=self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: a crash (nothing is saved either way: no persistence)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def sipps() -> AsyncIterator[list[Sipp]]:
    """The sipp processes a test starts (it appends them), killed at teardown."""
    started: list[Sipp] = []
    yield started
    for sipp in started:
        await sipp.stop()


@pytest.fixture
def small_redis_server(tmp_path) -> Iterator[RedisServer]:
    """A real redis-server with a tiny ``maxmemory`` and ``noeviction``: it refuses writes once full."""
    server = RedisServer(tmp_path, "--maxmemory", "8mb", "--maxmemory-policy", "noeviction")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def demo_gateway(tmp_path_factory) -> Iterator[Gateway]:
    """``moshimoshi serve --model demo --greedy``: the tiny random Moshi through the real
    loader, shared by the tests that only call it (SIP and the browser softphone)."""
    gateway = start_serve(tmp_path_factory.mktemp("demo-serve"), "demo", "--greedy")
    try:
        gateway.wait_ready(timeout=240)  # the first start builds the demo checkpoint
        yield gateway
    finally:
        code = gateway.proc.stop()
        assert code in (0, -2, 130), f"serve exited {code}:\n{gateway.proc.log()[-3000:]}"
