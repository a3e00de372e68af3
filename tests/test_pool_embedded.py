"""The embedded redis-server: starts, serves, stops cleanly; its absence is a clear error."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from service.pool import EmbeddedRedis, EmbeddedRedisError, SlotLeases, WorkerRegistration, connect
from service.pool.embedded import find_redis_server
from tests.support.pool import eventually, worker
from tests.support.procs import python_env

pytestmark = pytest.mark.system


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0): look at its state
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.parametrize("unix_socket", [False, True])
async def test_starts_serves_and_stops(unix_socket):
    embedded = EmbeddedRedis(unix_socket=unix_socket)
    url = await embedded.start()
    assert url.startswith("unix://" if unix_socket else "redis://127.0.0.1:")
    pid = embedded.proc.pid
    directory = embedded._dir
    async with connect(url) as client:
        assert await client.ping() < 1.0
        assert await client.redis.config_get("save") == {"save": ""}
        assert await client.redis.config_get("appendonly") == {"appendonly": "no"}
        await WorkerRegistration(client, worker("w1", capacity=2), interval=30).heartbeat()
        assert await SlotLeases(client).claim() is not None
    await embedded.stop()
    assert embedded.proc is None and embedded.url is None
    assert not alive(pid)
    assert not directory.exists()
    await embedded.stop()  # twice is harmless


async def test_context_manager_stops_on_error():
    embedded = EmbeddedRedis()
    with pytest.raises(RuntimeError, match="boom"):
        async with embedded as url:
            assert url
            pid = embedded.proc.pid
            raise RuntimeError("boom")
    assert not alive(pid)


def test_missing_redis_server_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EmbeddedRedisError, match="redis-server is not installed") as info:
        find_redis_server()
    assert "apt-get install redis-server" in str(info.value)
    assert "REDIS_URL" in str(info.value)


async def test_missing_explicit_executable_is_a_clear_error(tmp_path):
    with pytest.raises(EmbeddedRedisError, match="not found at"):
        await EmbeddedRedis(executable=str(tmp_path / "redis-server")).start()


async def test_a_server_that_dies_at_once_is_reported(tmp_path):
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\necho 'FATAL: cannot start' >&2\nexit 3\n")
    fake.chmod(0o755)
    embedded = EmbeddedRedis(executable=str(fake))
    with pytest.raises(EmbeddedRedisError, match="exited with 3"):
        await embedded.start(attempts=2)
    assert embedded.proc is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux only")
async def test_server_dies_with_its_parent():
    script = textwrap.dedent("""
        import asyncio
        from service.pool import EmbeddedRedis

        async def main():
            embedded = EmbeddedRedis()
            await embedded.start()
            print(embedded.proc.pid, flush=True)
            await asyncio.sleep(3600)

        asyncio.run(main())
    """)
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=subprocess.PIPE, env=python_env()
    )
    try:
        line = await asyncio.wait_for(parent.stdout.readline(), 30)
        pid = int(line)
        assert alive(pid)
    finally:
        parent.kill()  # SIGKILL: no cleanup code runs in the parent
        await parent.wait()
    try:
        await eventually(lambda: not alive(pid), what="redis-server exit after its parent died")
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
