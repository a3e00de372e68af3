"""Redis full (maxmemory, noeviction) or failing: calls are refused cleanly and nothing is lost
(issue 13, item 4).

A real gateway and echo worker over a real redis-server started with a tiny ``maxmemory``.
Once Redis refuses writes, new INVITEs get 503 with Retry-After (never 500), ``/readyz`` and
OPTIONS say 503 so that dispatchers route away, and a call in progress goes on; its end is
written to its record, and its lease released, once Redis takes writes again.
"""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.exceptions import OutOfMemoryError

from service.pool import CallRecords, connect
from service.tools.call import place_call
from sip.errors import CallFailed
from tests.support.pool import eventually
from tests.support.services import start_gateway, start_worker
from tests.test_e2e_echo import sip_options
from tests.test_pool_e2e import call_settings, silent_run_ms, wait_pool
from tests.test_pool_restart import metric_sum

JUNK = 64 * 1024


async def fill(url: str) -> int:
    """Write junk until Redis refuses writes, then lower maxmemory under what it holds, so that
    it stays full whatever the clients' buffers do (a full Redis, as after a flood)."""
    client = aioredis.Redis.from_url(url)
    try:
        count = 0
        with pytest.raises(OutOfMemoryError):
            while True:
                await client.set(f"junk:{count}", b"x" * JUNK)
                count += 1
        used = int((await client.info("memory"))["used_memory"])
        await client.config_set("maxmemory", used - 4 * JUNK)
        with pytest.raises(OutOfMemoryError):
            await client.set("junk:probe", b"1")
        return count
    finally:
        await client.aclose()


async def empty(url: str, count: int, maxmemory: str = "8mb") -> None:
    client = aioredis.Redis.from_url(url)
    try:
        await client.delete(*[f"junk:{i}" for i in range(count)])
        await client.config_set("maxmemory", maxmemory)
        await client.set("junk:probe", b"1")
    finally:
        await client.aclose()


@pytest.fixture
def cluster():
    started = []

    def add(process):
        started.append(process)
        return process

    yield add
    for process in reversed(started):
        process.proc.stop()


async def test_a_full_redis_refuses_new_calls_with_503_and_loses_no_call_end(small_redis_server, tmp_path, cluster):
    url = small_redis_server.url
    worker = cluster(start_worker(tmp_path, url, "w0", "echo", 2))
    gateway = cluster(start_gateway(tmp_path, url, "--queue-seconds", "1", "--retry-after-seconds", "11"))
    worker.wait_ready()
    gateway.wait_ready()
    await wait_pool(url, lambda s: "w0" in s, 10, "worker up")
    assert sip_options(gateway.sip_port).startswith("SIP/2.0 200")

    live = asyncio.create_task(place_call(call_settings(gateway, tmp_path, "live", 6.0)))
    await wait_pool(url, lambda s: s["w0"]["leases"] == 1, 15, "the live call placed")
    junk = await fill(url)

    # dispatchers are told to route away...
    await eventually(lambda: not gateway.ready(), timeout=5, what="/readyz 503 while Redis is full")
    assert (await asyncio.to_thread(sip_options, gateway.sip_port)).startswith("SIP/2.0 503")
    # ...and a new INVITE that still arrives gets 503 with Retry-After, not 500
    for name in ("refused1", "refused2"):
        with pytest.raises(CallFailed) as refused:
            await place_call(call_settings(gateway, tmp_path, name, 1.0))
        assert refused.value.status == 503, refused.value
        assert refused.value.response.headers.get("Retry-After") == "11"

    summary = await live  # the call in progress went on, and ended while Redis was full
    assert summary["ended_by"] == "local-bye"
    assert silent_run_ms(summary["recording"]) < 500
    await asyncio.sleep(1.0)  # its record's end and its lease release failed, and are being retried
    status, text = gateway.get("/metrics", token=None)
    assert metric_sum(text, "moshimoshi_redis_write_retries_total", operation="record-end") >= 1, text[-2000:]

    await empty(url, junk)
    await eventually(gateway.ready, timeout=10, what="ready again once Redis takes writes")
    async with connect(url) as client:

        async def ended() -> bool:
            record = await CallRecords(client).get(summary["gateway_call_id"])
            return record is not None and record.state == "ended"

        await eventually(ended, timeout=15, what="the call's end written to its record")
    await wait_pool(url, lambda s: s["w0"]["leases"] == 0 and s["w0"]["free"] == 2, 15, "its lease released")
    after = await place_call(call_settings(gateway, tmp_path, "after", 1.0))
    assert after["received_rms"] > 1000
    # the calls refused as unready stored nothing, not even a transcript's end (they did before)
    async with connect(url) as client:

        async def transcripts_ended() -> bool:
            keys = {k async for k in client.redis.scan_iter("mm:transcript:*")}
            return keys == {f"mm:transcript:{summary['gateway_call_id']}", f"mm:transcript:{after['gateway_call_id']}"}

        await eventually(transcripts_ended, timeout=10, what="only the answered calls' transcripts in Redis")
        assert {k async for k in client.redis.scan_iter("mm:call:*")} == {
            f"mm:call:{summary['gateway_call_id']}",
            f"mm:call:{after['gateway_call_id']}",
        }
    status, text = gateway.get("/metrics", token=None)
    assert metric_sum(text, "moshimoshi_redis_writes_abandoned_total") == 0
    assert metric_sum(text, "moshimoshi_calls_total", outcome="error") == 0
