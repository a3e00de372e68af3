"""A worker in the pool admits a session only with the slot's current lease token, and a
newer lease fences out an older session on the same slot (its gateway lost the lease)."""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets

from service.pool import SlotLeases, connect
from tests.support.polling import eventually
from tests.support.procs import worker_headers
from tests.support.services import start_worker

FRAME = bytes(3840)


async def open_session(port: int, slot: int, token: int | None, call_id: str):
    ws = await websockets.connect(
        f"ws://127.0.0.1:{port}/v1/session", max_size=2**20, additional_headers=worker_headers()
    )
    await ws.send(json.dumps({"type": "start", "version": 1, "call_id": call_id, "slot": slot, "token": token}))
    return ws


async def close_code(ws) -> tuple[int | None, str]:
    try:
        while True:
            await asyncio.wait_for(ws.recv(), 10)
    except websockets.ConnectionClosed as exc:
        return (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (None, "")


@pytest.fixture
async def pool(redis_server):
    client = connect(redis_server.url)
    try:
        yield client
    finally:
        await client.close()


async def wait_registered(pool_client, worker_id: str) -> None:
    await eventually(
        lambda: pool_client.redis.exists(pool_client.keys.worker(worker_id)),
        10,
        f"{worker_id} registered",
        interval=0.1,
    )


async def test_only_the_current_lease_is_admitted_and_a_newer_one_fences_out_the_old(redis_server, pool, tmp_path):
    worker = start_worker(tmp_path, redis_server.url, "fw", slots=1)
    try:
        await asyncio.to_thread(worker.wait_ready)
        await wait_registered(pool, "fw")
        leases = SlotLeases(pool)
        first = await leases.claim(owner="call-1", ttl_ms=60_000)
        assert first is not None and first.slot == 0

        # no token, and a token nobody issued: refused with 4003
        for token in (None, first.token + 100):
            ws = await open_session(worker.port, 0, token, "intruder")
            assert (await close_code(ws))[0] == 4003

        ws1 = await open_session(worker.port, 0, first.token, "call-1")
        started = json.loads(await ws1.recv())
        assert started["type"] == "started" and started["slot"] == 0
        await ws1.send(FRAME)
        assert len(await ws1.recv()) == 3840  # the echo

        # the first gateway's lease is lost (it could not renew); another gateway claims the slot
        await pool.redis.delete(pool.keys.lease("fw", 0))
        await pool.redis.delete(pool.keys.held("fw"))
        second = await leases.claim(owner="call-2", ttl_ms=60_000)
        assert second is not None and second.slot == 0 and second.token > first.token

        ws2 = await open_session(worker.port, 0, second.token, "call-2")
        assert json.loads(await ws2.recv())["type"] == "started"
        code, reason = await close_code(ws1)
        assert code == 4003 and "fenced" in reason

        # the fenced-out gateway retries with its old token: busy slot, older token
        ws3 = await open_session(worker.port, 0, first.token, "call-1-again")
        assert (await close_code(ws3))[0] == 4009
        await ws2.send(json.dumps({"type": "stop"}))
        assert (await close_code(ws2))[0] == 1000
        # and once the slot is free again, the old token is stale: refused, not admitted
        ws4 = await open_session(worker.port, 0, first.token, "call-1-again")
        assert (await close_code(ws4))[0] == 4003
    finally:
        worker.proc.stop()
