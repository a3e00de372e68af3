"""``moshimoshi serve`` starts an ASR worker beside the model worker (``--asr off``: none):
it registers in the pool as an ASR worker, takes no calls, serves caller transcripts, and
stops with serve."""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.asyncio.client import connect

from tests.support.procs import worker_headers
from tests.support.services import start_serve, wait_until

pytestmark = pytest.mark.system


def asr_workers(gateway) -> list[dict]:
    status, pool = gateway.get("/v1/pool")
    assert status == 200, pool
    return [w for w in pool["workers"] if w["role"] == "asr" and w["alive"]]


def test_serve_starts_a_demo_asr_worker_that_takes_no_calls(tmp_path):
    gateway = start_serve(tmp_path, "echo", asr=True, env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    try:
        gateway.wait_ready(timeout=120)
        [asr] = wait_until(lambda: asr_workers(gateway), 120, "the ASR worker registered", gateway.proc)
        assert asr["model"] == "demo" and asr["capacity"] == 0 and asr["sessions"] == 512
        assert asr["url"].startswith("ws://127.0.0.1:")
        status, pool = gateway.get("/v1/pool")
        assert pool["workers_ready"] == 1 and pool["slots_total"] == 4  # the echo worker's slots only
        assert (tmp_path / "cache" / "moshimoshi").exists()

        async def session() -> dict:
            async with connect(asr["url"] + "/v1/asr", additional_headers=worker_headers()) as ws:
                await ws.send(json.dumps({"type": "start", "version": 2, "call_id": "c-serve"}))
                return json.loads(await ws.recv())

        started = asyncio.run(session())
        assert started["type"] == "started" and started["random_weights"] is True
    finally:
        code = gateway.proc.stop()
    log = gateway.proc.log_path.read_text()
    assert code in (0, -2, 130), log[-3000:]
    assert "TINY RANDOM-WEIGHT Whisper" in log and "MEANINGLESS" in log


def test_serve_with_asr_off_starts_none(tmp_path):
    gateway = start_serve(tmp_path, "echo")
    try:
        gateway.wait_ready(timeout=120)
        assert asr_workers(gateway) == []
    finally:
        gateway.proc.stop()
    assert "ASR worker" not in gateway.proc.log_path.read_text()
