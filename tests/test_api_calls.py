"""/v1/calls, /v1/pool, probes and the OpenAPI document, against a real Redis shared by two
gateway replicas (real Gateway objects and apps; SIP is not started)."""

from __future__ import annotations

import contextlib
import time

import httpx

from service.pool import SlotLeases, WorkerRegistration, connect
from tests.support.api import ADMIN, READ, api_gateway
from tests.support.pool import eventually, worker

SAMPLING = {"greedy": False, "temp": 0.8, "temp_text": 0.7, "top_k": 250, "top_k_text": 25}


@contextlib.asynccontextmanager
async def two_replicas(redis_url: str):
    async with api_gateway(redis_url, gateway_id="gw-a") as a, api_gateway(redis_url, gateway_id="gw-b") as b:
        yield a, b


async def get(base: str, path: str, headers=READ, **params) -> httpx.Response:
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        return await client.get(path, headers=headers, params=params)


async def post(base: str, path: str, headers=ADMIN) -> httpx.Response:
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        return await client.post(path, headers=headers)


async def test_any_replica_lists_every_call_with_filters(redis_server):
    async with two_replicas(redis_server.url) as (a, b):
        client = connect(redis_server.url)
        registration = WorkerRegistration(client, worker("w-1", capacity=2))
        await registration.heartbeat()
        leases = SlotLeases(client)
        on_a = a.start_call(from_uri="sip:alice@192.0.2.10", worker_id="w-1", slot=0, sampling=SAMPLING)
        lease = await leases.claim(ttl_ms=30_000, owner=on_a.id)  # the slot A's call holds
        assert lease is not None
        ended_on_b = b.start_call(from_uri="sip:bob@192.0.2.11", worker_id="w-2", slot=1)
        b.end_call(ended_on_b, "remote-bye")
        await a.settle()
        await b.settle()

        # B lists A's live call (from its lease and record) and its own ended one
        listed = (await get(b.base, "/v1/calls")).json()
        assert listed["partial"] is False
        by_id = {c["id"]: c for c in listed["calls"]}
        assert set(by_id) == {on_a.id, ended_on_b.id}
        remote = by_id[on_a.id]
        assert (remote["state"], remote["from_uri"], remote["worker_id"], remote["slot"]) == (
            "active",
            "sip:alice@192.0.2.10",
            "w-1",
            0,
        )
        assert (remote["gateway_id"], remote["on_this_gateway"]) == ("gw-a", False)
        assert remote["sampling"] == SAMPLING  # from A's record in Redis
        own = by_id[ended_on_b.id]
        assert (own["state"], own["end_reason"], own["on_this_gateway"]) == ("ended", "remote-bye", True)
        assert [c["id"] for c in listed["calls"]] == [ended_on_b.id, on_a.id]  # newest first

        active = (await get(b.base, "/v1/calls", state="active")).json()["calls"]
        assert [c["id"] for c in active] == [on_a.id]
        ended = (await get(a.base, "/v1/calls", state="ended")).json()["calls"]
        assert [(c["id"], c["on_this_gateway"], c["gateway_id"]) for c in ended] == [(ended_on_b.id, False, "gw-b")]
        assert [c["id"] for c in (await get(a.base, "/v1/calls", worker="w-2")).json()["calls"]] == [ended_on_b.id]
        assert (await get(a.base, "/v1/calls", since=time.time() + 60)).json()["calls"] == []
        assert len((await get(a.base, "/v1/calls", limit=1)).json()["calls"]) == 1
        assert (await get(a.base, "/v1/calls", state="ringing")).status_code == 422
        assert (await get(a.base, "/v1/calls", limit=0)).status_code == 422

        # one call: live on A, from Redis on B
        here = (await get(a.base, f"/v1/calls/{on_a.id}")).json()
        assert here["on_this_gateway"] and here["state"] == "active" and here["duration_s"] >= 0
        there = (await get(b.base, f"/v1/calls/{on_a.id}")).json()
        assert (there["id"], there["gateway_id"], there["on_this_gateway"]) == (on_a.id, "gw-a", False)
        assert (await get(b.base, "/v1/calls/c-unknown")).status_code == 404
        assert (await get(b.base, "/v1/calls/bad%20id")).status_code == 404

        await leases.release(lease)
        a.end_call(on_a, "remote-bye")
        await a.settle()
        stored = (await get(b.base, f"/v1/calls/{on_a.id}")).json()
        assert (stored["state"], stored["end_reason"]) == ("ended", "remote-bye")
        assert stored["quality"]["failovers"] == 0
        await client.close()


async def test_hangup_here_and_on_another_replica(redis_server):
    async with two_replicas(redis_server.url) as (a, b):
        assert b.gateway.commands is not None
        await eventually(b.gateway.commands.subscribed.is_set, what="B subscribed to call requests")
        local = a.start_call()
        answer = await post(a.base, f"/v1/calls/{local.id}/hangup")
        assert answer.status_code == 202
        assert answer.json() == {"call_id": local.id, "status": "hanging-up", "on_this_gateway": True}
        assert local.ended.is_set() and local.end_reason == "api-hangup"
        a.end_call(local)

        remote = b.start_call()
        await b.settle()
        answer = await post(a.base, f"/v1/calls/{remote.id}/hangup")
        assert (answer.status_code, answer.json()["on_this_gateway"]) == (202, False)
        await eventually(remote.ended.is_set, what="B hangs up its call")
        assert remote.end_reason == "api-hangup"
        b.end_call(remote)
        await b.settle()

        assert (await post(a.base, f"/v1/calls/{remote.id}/hangup")).status_code == 409  # ended
        assert (await post(a.base, "/v1/calls/c-nobody/hangup")).status_code == 404
        assert (await post(a.base, f"/v1/calls/{remote.id}/hangup", headers=READ)).status_code == 403


async def test_pool_shows_workers_slots_and_leases_and_readiness_follows_redis(redis_server):
    async with api_gateway(redis_server.url) as api:
        assert (await get(api.base, "/readyz", headers={})).status_code == 503  # no worker yet
        client = connect(redis_server.url)
        registration = WorkerRegistration(
            client,
            worker(
                "w-1",
                capacity=3,
                slots_reason="time",
                memory_slots=34,
                step_budget_ms=70.0,
                warmup_p50_ms=40.0,
                warmup_p99_ms=61.0,
                context_seconds=240.0,
            ),
            live=lambda: {"step_p99_ms": 58.0},
        )
        await registration.heartbeat()
        lease = await SlotLeases(client).claim(ttl_ms=30_000, owner="c-holder")
        assert lease is not None
        await api.gateway.pool_watch.refresh_once()
        ready = await get(api.base, "/readyz", headers={})
        assert ready.status_code == 200 and ready.json()["workers_ready"] == 1

        pool = (await get(api.base, "/v1/pool")).json()
        assert (pool["mode"], pool["workers_ready"], pool["slots_total"], pool["slots_busy"], pool["slots_free"]) == (
            "pool",
            1,
            3,
            1,
            2,
        )
        [w] = pool["workers"]
        assert (w["worker_id"], w["url"], w["http_url"], w["state"], w["alive"], w["license"]) == (
            "w-1",
            "ws://w-1.test:8081",
            "http://w-1.test:8081",
            "ready",
            True,
            "Apache-2.0",
        )
        assert (
            w["capacity"],
            w["slots_reason"],
            w["memory_slots"],
            w["step_budget_ms"],
            w["warmup_p50_ms"],
            w["warmup_p99_ms"],
            w["step_p99_ms"],
            w["context_seconds"],
        ) == (3, "time", 34, 70.0, 40.0, 61.0, 58.0, 240.0)
        slots = {s["slot"]: s for s in w["slots"]}
        assert slots[lease.slot]["state"] == "leased" and slots[lease.slot]["call_id"] == "c-holder"
        assert slots[lease.slot]["token"] == lease.token and 0 < slots[lease.slot]["ttl_ms"] <= 30_000
        assert [s["state"] for i, s in slots.items() if i != lease.slot] == ["free", "free"]

        # a worker that cannot be reached cannot be drained: 502 naming it
        drained = await post(api.base, "/v1/workers/w-1/drain")
        assert drained.status_code == 502 and "w-1" in drained.json()["detail"]

        await registration.set_state("overloaded")  # its step p99 is over budget: no capacity for new calls
        await api.gateway.pool_watch.refresh_once()
        assert (await get(api.base, "/readyz", headers={})).json()["ready"] is False
        pool = (await get(api.base, "/v1/pool")).json()
        assert (pool["workers_ready"], pool["slots_total"], pool["workers"][0]["state"]) == (0, 0, "overloaded")
        await registration.drain()
        await api.gateway.pool_watch.refresh_once()
        assert (await get(api.base, "/readyz", headers={})).json()["ready"] is False
        await registration.set_state("ready")
        await api.gateway.pool_watch.refresh_once()
        assert (await get(api.base, "/readyz", headers={})).status_code == 200

        # Redis down: not ready; pool 503; calls listed from this gateway only, flagged partial
        local = api.start_call()
        await api.settle()
        redis_server.stop()
        await api.gateway.pool_watch.refresh_once()
        down = await get(api.base, "/readyz", headers={})
        assert down.status_code == 503 and down.json()["redis"] is False
        assert (await get(api.base, "/healthz", headers={})).status_code == 200
        assert (await get(api.base, "/v1/pool")).status_code == 503
        partial = (await get(api.base, "/v1/calls")).json()
        assert partial["partial"] is True and [c["id"] for c in partial["calls"]] == [local.id]
        assert (await get(api.base, "/v1/calls/c-elsewhere")).status_code == 503
        await client.close()


async def test_draining_gateway_is_not_ready_but_alive(redis_server):
    async with api_gateway(redis_server.url) as api:
        client = connect(redis_server.url)
        await WorkerRegistration(client, worker("w-1")).heartbeat()
        await api.gateway.pool_watch.refresh_once()
        assert (await get(api.base, "/readyz", headers={})).status_code == 200
        api.start_call()  # keeps the drain from finishing
        api.gateway.drain()
        answer = await get(api.base, "/readyz", headers={})
        assert answer.status_code == 503 and answer.json()["draining"] is True
        assert (await get(api.base, "/healthz", headers={})).json() == {"status": "ok"}
        await client.close()


async def test_single_worker_mode_without_redis(unused_tcp_port):
    async with api_gateway(None, worker_url=f"ws://127.0.0.1:{unused_tcp_port}") as api:
        pool = (await get(api.base, "/v1/pool")).json()
        assert pool["mode"] == "single-worker" and pool["workers"][0]["alive"] is False
        call = api.start_call()
        api.say(call, "もしもし")
        listed = (await get(api.base, "/v1/calls")).json()
        assert [c["id"] for c in listed["calls"]] == [call.id] and listed["partial"] is False
        api.end_call(call)
        transcript = (await get(api.base, f"/v1/calls/{call.id}/transcript")).json()
        assert transcript["text"] == "もしもし" and transcript["complete"] is True


async def test_openapi_documents_every_route(redis_server):
    async with api_gateway(redis_server.url) as api:
        document = (await get(api.base, "/openapi.json", headers={})).json()
    paths = document["paths"]
    for path in (
        "/v1/calls",
        "/v1/calls/{call_id}",
        "/v1/calls/{call_id}/hangup",
        "/v1/calls/{call_id}/transcript",
        "/v1/pool",
        "/v1/workers/{worker_id}/drain",
        "/healthz",
        "/readyz",
        "/metrics",
        "/dashboard",
    ):
        assert path in paths, path
        for method, operation in paths[path].items():
            assert operation.get("summary") and operation.get("tags"), (method, path)
            assert "200" in operation["responses"] or "202" in operation["responses"], (method, path)
    schemas = document["components"]["schemas"]
    for model in (
        "CallInfo",
        "CallQuality",
        "CallList",
        "Transcript",
        "TranscriptPiece",
        "PoolState",
        "WorkerState",
        "SlotState",
        "HangupResult",
        "DrainResult",
    ):
        assert model in schemas, model
    listed = paths["/v1/calls"]["get"]
    assert listed["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/CallList")
    assert {"401", "403"} <= set(listed["responses"])
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "text/plain" in paths["/v1/calls/{call_id}/transcript"]["get"]["responses"]["200"]["content"]


async def test_record_writes_reach_redis_in_order_even_back_to_back(redis_server):
    """Create, update and end of a short call are issued within microseconds: each waits
    for the previous one, so no end is lost before its create (the record staying active)."""
    async with (
        api_gateway(redis_server.url, gateway_id="gw-a") as a,
        api_gateway(redis_server.url, gateway_id="gw-b") as b,
    ):
        calls = [a.start_call(from_uri=f"sip:caller{i}@192.0.2.1") for i in range(20)]
        for call in calls:
            a.end_call(call, "rejected-busy")
        await a.settle()
        assert a.gateway.recorder.writing == 0
        seen_from_b = (await get(b.base, "/v1/calls", limit=100)).json()["calls"]
        assert {c["id"]: (c["state"], c["end_reason"]) for c in seen_from_b} == {
            call.id: ("ended", "rejected-busy") for call in calls
        }
