"""Shared fixtures: real servers on free ports."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator

import pytest

from tests.support.procs import free_port, wait_for_tcp
from tests.support.services import Gateway, start_serve


class RedisServer:
    """A real redis-server on a free loopback port, stopped at teardown."""

    def __init__(self, tmp_path) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed: run the tests through `make test`")
        self.port = free_port()
        self.dir = tmp_path
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_tcp("127.0.0.1", self.port, proc=self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
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
