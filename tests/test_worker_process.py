"""The worker as a process: ``--model demo`` builds, warms up, serves, and drains on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import sys

import httpx
import pytest
from websockets.asyncio.client import connect

from service.worker.tinymodel import TINY_VERSION
from tests.support.procs import free_port, python_env, worker_headers
from tests.support.worker import collect, pcm_frames, start_message

pytestmark = pytest.mark.system


async def wait_ready(port: int, proc: asyncio.subprocess.Process, within: float = 180.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    async with httpx.AsyncClient() as client:
        while loop.time() < deadline:
            if proc.returncode is not None:
                raise AssertionError(f"worker exited with {proc.returncode}")
            try:
                if (await client.get(f"http://127.0.0.1:{port}/readyz", timeout=2)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise AssertionError("the worker did not become ready")


async def start_demo_worker(tmp_path, port: int, log) -> asyncio.subprocess.Process:
    """``--model demo`` with 2 slots and a 60 s drain grace, its log in ``log``."""
    with log.open("w") as stderr:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "service.worker",
            "--model",
            "demo",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--slots",
            "2",
            "--drain-grace-seconds",
            "60",
            env=python_env(XDG_CACHE_HOME=str(tmp_path / "cache"), MOSHIMOSHI_LOG_LEVEL="info"),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
        )


async def sigterm_and_wait_draining(proc: asyncio.subprocess.Process, port: int) -> None:
    proc.send_signal(signal.SIGTERM)
    async with httpx.AsyncClient() as client:
        for _ in range(100):
            if (await client.get(f"http://127.0.0.1:{port}/readyz")).status_code == 503:
                return
            await asyncio.sleep(0.05)
    raise AssertionError("/readyz still 200 after SIGTERM")


async def test_demo_worker_serves_and_drains_on_sigterm(tmp_path):
    port = free_port()
    log = tmp_path / "worker.log"
    proc = await start_demo_worker(tmp_path, port, log)
    try:
        await wait_ready(port, proc)
        assert (tmp_path / "cache" / "moshimoshi" / f"demo-v{TINY_VERSION}" / "config.json").exists()
        url = f"ws://127.0.0.1:{port}/v1/session"
        async with connect(url, additional_headers=worker_headers()) as ws:
            await ws.send(start_message(call_id="before-sigterm"))
            started = json.loads(await ws.recv())
            assert (started["model"], started["context_seconds"]) == ("demo", 240.0)
            for frame in pcm_frames(1, 3):
                await ws.send(frame)
            assert isinstance(await ws.recv(), bytes)

            await sigterm_and_wait_draining(proc, port)
            async with connect(url, additional_headers=worker_headers()) as late:  # no new calls while draining
                await late.send(start_message(call_id="after-sigterm"))
                refused = await collect(late)
            assert refused.close_code == 4029
            # The call in progress goes on until it ends.
            for frame in pcm_frames(2, 3):
                await ws.send(frame)
            assert isinstance(await ws.recv(), bytes)
            await ws.send(json.dumps({"type": "stop"}))
            await collect(ws)
        # Idle now: the worker exits without waiting for the 60 s grace period.
        status = await asyncio.wait_for(proc.wait(), 30)
        stderr = log.read_text()
        assert status == 0, stderr
        assert "RANDOM-WEIGHT" in stderr
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_second_sigterm_ends_the_calls_at_once(tmp_path):
    port = free_port()
    log = tmp_path / "worker.log"
    proc = await start_demo_worker(tmp_path, port, log)
    try:
        await wait_ready(port, proc)
        async with connect(f"ws://127.0.0.1:{port}/v1/session", additional_headers=worker_headers()) as ws:
            await ws.send(start_message(call_id="a-long-call"))
            assert json.loads(await ws.recv())["type"] == "started"
            await sigterm_and_wait_draining(proc, port)
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(collect(ws), 15)  # ended by the worker, well within the 60 s grace
        status = await asyncio.wait_for(proc.wait(), 30)
        stderr = log.read_text()
        assert status == 0, stderr
        assert "SIGTERM again: ending calls now" in stderr, stderr
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def run_to_exit(*args: str, within: float = 120.0) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service.worker",
        *args,
        env=python_env(),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(proc.communicate(), within)
    return proc.returncode, stderr.decode()


async def test_a_checkpoint_that_cannot_load_exits_2_naming_the_file(tmp_path):
    (tmp_path / "ckpt").mkdir()
    status, stderr = await run_to_exit(
        "--model", str(tmp_path / "ckpt"), "--host", "127.0.0.1", "--port", str(free_port())
    )
    assert status == 2
    assert f"checkpoint {tmp_path / 'ckpt'}: missing model.safetensors" in stderr


async def test_a_bad_setting_exits_2_naming_it():
    status, stderr = await run_to_exit("--slots", "0")
    assert status == 2
    assert "--slots=0: must be at least 1" in stderr
