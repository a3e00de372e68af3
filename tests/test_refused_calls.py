"""State only for real calls (issue 13, item 4): a call that ends before its answer (refused
with 488, 503, 500, or left by its caller) creates no call record and no transcript in
Redis; it is counted, and kept in a short-lived, capped record of refusals that every
replica's API lists (the caller's number masked).

Against a real Redis: two gateway replicas (real Gateway objects and apps, calls driven
through the lifecycle's own steps), and a real gateway process flooded with refused INVITEs.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from service.gateway.calls.refusals import MAX_KEPT, RefusalLog, RefusedCall
from service.gateway.control.refusal_store import RefusalStore
from service.pool import connect
from service.privacy import mask_number
from service.settings import CallSettings
from service.tools.call import place_call
from tests.support.api import api_gateway, identity_of
from tests.support.polling import eventually
from tests.support.services import start_gateway, start_worker
from tests.support.sip_peer import (
    CALLER_NUMBER,
    DIALLED_NUMBER,
    G729_OFFER,
    PCMU_OFFER,
    InviteCaller,
    RawPeer,
)
from tests.test_api_calls import get

pytestmark = pytest.mark.system

WINDOW = 3600


async def all_keys(url: str) -> set[str]:
    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        return {key async for key in client.scan_iter(count=1000)}
    finally:
        await client.aclose()


async def ttl_ms(url: str, key: str) -> int:
    client = aioredis.Redis.from_url(url)
    try:
        return int(await client.pttl(key))
    finally:
        await client.aclose()


def test_a_number_is_masked_but_for_its_last_four_digits():
    assert mask_number("+819012345678") == "*********5678"
    assert mask_number("0312345678") == "******5678"
    assert mask_number("1234") == "****"
    assert mask_number("alice") == "*****"  # a name is no number: nothing kept
    assert mask_number("") == ""


async def test_refused_calls_leave_no_record_or_transcript_only_a_masked_short_lived_entry(redis_server):
    """Before: every refused call wrote its 7-day record and a transcript stream (its end entry)."""
    url = redis_server.url
    async with api_gateway(url, gateway_id="gw-a") as a, api_gateway(url, gateway_id="gw-b") as b:
        before = await all_keys(url)
        identity = identity_of(f"P-Asserted-Identity: <sip:{CALLER_NUMBER}@carrier.example>", dialled=DIALLED_NUMBER)
        busy = [a.refuse_call("rejected-busy", 503, identity=identity) for _ in range(20)]
        codec = [a.refuse_call("rejected-codec", 488, identity=identity, detail="") for _ in range(5)]
        unready = [a.refuse_call("rejected-unready", 503, identity=identity, detail="unready") for _ in range(3)]
        refused_ids = {c.id for c in [*busy, *codec, *unready]}
        real = a.start_call(identity=identity)  # a call that was answered: stored as ever
        a.say(real, "はい")
        a.end_call(real)
        await a.settle()

        added = await all_keys(url) - before
        assert not [k for k in added if any(i in k for i in refused_ids)], added
        assert {k for k in added if ":call:" in k or ":transcript:" in k} == {
            f"mm:call:{real.id}",
            f"mm:transcript:{real.id}",
        }, added
        shared = {k for k in added if ":refusals" in k}
        assert shared == added - {f"mm:call:{real.id}", f"mm:transcript:{real.id}", "mm:calls"}
        assert 1 <= len(shared) <= 3, shared  # the stream and the count of this minute (or two)
        for key in shared:
            assert 0 < await ttl_ms(url, key) <= (WINDOW + 2 * 60) * 1000, key

        # any replica: the counts by reason and the latest, masked
        body = (await get(b.base, "/v1/refusals")).json()
        assert body["total"] == 28 and body["by_reason"] == {
            "rejected-busy": 20,
            "rejected-codec": 5,
            "rejected-unready": 3,
        }, body
        assert not body["partial"] and body["window_seconds"] == WINDOW
        assert [r["id"] for r in body["refusals"]] == [c.id for c in reversed([*busy, *codec, *unready])]
        first = body["refusals"][-1]
        assert (
            first["status"],
            first["reason"],
            first["detail"],
            first["caller"],
            first["dialled"],
            first["source"],
            first["gateway_id"],
            first["ingress"],
            first["sip_transport"],
        ) == (
            503,
            "rejected-busy",
            "all agents busy",
            mask_number(CALLER_NUMBER),
            DIALLED_NUMBER,
            "192.0.2.10",
            "gw-a",
            "sip",
            "UDP",
        )
        assert CALLER_NUMBER not in str(body) and CALLER_NUMBER[1:] not in str(body)

        # /v1/calls lists them among ended calls (on any replica), and one by id
        listed = {c["id"]: c for c in (await get(b.base, "/v1/calls", state="ended", limit=100)).json()["calls"]}
        assert refused_ids | {real.id} == set(listed)
        shown = listed[busy[0].id]
        assert shown["end_reason"] == "rejected-busy" and shown["answered_at"] is None
        assert shown["caller"]["number"] == mask_number(CALLER_NUMBER) and shown["gateway_id"] == "gw-a"
        assert CALLER_NUMBER[1:] not in str({i: listed[i] for i in refused_ids})
        assert listed[real.id]["caller"]["number"] == CALLER_NUMBER  # a real call's record is whole
        one = await get(b.base, f"/v1/calls/{codec[0].id}")
        assert one.status_code == 200 and one.json()["end_reason"] == "rejected-codec"
        assert (await get(a.base, f"/v1/calls/{codec[0].id}")).json()["on_this_gateway"]
        assert (await get(b.base, f"/v1/calls/{codec[0].id}/transcript")).status_code == 404


async def test_the_record_of_refusals_is_capped_while_its_counts_stay_exact(redis_server):
    url = redis_server.url
    async with api_gateway(url, gateway_id="gw-a") as a:
        before = await all_keys(url)
        flood = MAX_KEPT + 500
        for _ in range(flood):
            a.refuse_call("rejected-sdp", 488, detail="x" * 500)
        await a.settle()
        added = await all_keys(url) - before
        assert len(added) <= 3, added
        client = aioredis.Redis.from_url(url)
        try:
            length = await client.xlen("mm:refusals")
            size = await client.memory_usage("mm:refusals")
        finally:
            await client.aclose()
        assert MAX_KEPT <= length <= MAX_KEPT + 200, length  # approximate trimming: whole stream nodes
        assert size < 600 * 1024, size  # bounded whatever the flood: the detail is cut to 160 characters
        assert len(a.gateway.refusals.recent) == MAX_KEPT
        body = (await get(a.base, "/v1/refusals", limit=1000)).json()
        assert body["total"] == flood and body["by_reason"] == {"rejected-sdp": flood}
        assert len(body["refusals"]) == 1000 and len(body["refusals"][0]["detail"]) == 160


async def test_refusals_older_than_the_window_are_neither_listed_nor_counted_nor_kept(redis_server):
    async with connect(redis_server.url) as client:
        store = RefusalStore(client, window=1.5)
        log = RefusalLog(store, window=1.5)
        store.start()
        try:
            now = time.time()
            log.add(RefusedCall(call_id="c-old", ended_at=now, started_at=now, reason="rejected-busy", status=503))
            assert await store.flush(5)
            assert [r.call_id for r in (await log.summary()).latest] == ["c-old"]
            await asyncio.sleep(1.7)
            now = time.time()
            log.add(RefusedCall(call_id="c-new", ended_at=now, started_at=now, reason="cancelled", status=487))
            assert await store.flush(5)
            summary = await log.summary()
            assert [r.call_id for r in summary.latest] == ["c-new"] and summary.by_reason.get("cancelled") == 1
            assert await log.get("c-old") is None and log.local()[0].call_id == "c-new"
            assert [
                e for e in await client.redis.xrange("mm:refusals") if e[1]["call_id"] == "c-old"
            ] == []  # trimmed by age
        finally:
            await store.close()


async def test_refusals_wait_in_memory_while_redis_refuses_and_the_api_says_partial(redis_server):
    url = redis_server.url
    async with api_gateway(url, gateway_id="gw-a") as a:
        redis_server.stop()
        try:
            refused = a.refuse_call("rejected-unready", 503, detail="unready")
            body = (await get(a.base, "/v1/refusals")).json()
            assert body["partial"] and [r["id"] for r in body["refusals"]] == [refused.id]
            assert body["by_reason"] == {"rejected-unready": 1}
        finally:
            redis_server.start()
        await eventually(lambda: a.gateway.refusal_store.stored == 1, timeout=15, what="stored once Redis is back")
        body = (await get(a.base, "/v1/refusals")).json()
        assert not body["partial"] and body["by_reason"] == {"rejected-unready": 1}


# -- a real gateway process and a flood of refused INVITEs ------------------------------------


@pytest.fixture
def one_slot(redis_server, tmp_path):
    """An echo worker with one slot and a gateway that queues for 0.3 s, no rate limit."""
    worker = start_worker(tmp_path, redis_server.url, "w-one", "echo", 1)
    gateway = start_gateway(tmp_path, redis_server.url, "--queue-seconds", "0.3", "--sip-rate-limit", "0")
    try:
        worker.wait_ready()
        gateway.wait_ready()
        yield gateway
    finally:
        gateway.proc.stop()
        worker.proc.stop()


async def test_refused_invites_from_an_allowed_source_create_no_redis_state(one_slot, redis_server, tmp_path):
    """488 for the offer, 503 busy after waiting in the queue, 487 cancelled while queued:
    before, each wrote a call record and a transcript stream that lived seven days."""
    gateway, url = one_slot, redis_server.url
    caller = InviteCaller(await RawPeer.udp(), gateway.sip_port)
    holder = None
    try:
        before = await all_keys(url)
        assert [await caller.call(G729_OFFER) for _ in range(10)] == [488] * 10
        holder = asyncio.create_task(place_call(CallSettings(uri=gateway.uri, seconds=10, local_host="127.0.0.1")))

        def slot_held() -> bool:
            status, pool = gateway.get("/v1/pool")
            return status == 200 and pool["slots_busy"] == 1

        await eventually(slot_held, timeout=15, what="the holding call on the one slot")

        async def recorded() -> bool:
            return any(k.startswith("mm:call:") for k in await all_keys(url))

        await eventually(recorded, timeout=5, what="the holding call's record")
        holding = await all_keys(url)
        # the holding call is a real call: its transcript stream may appear at any time (its
        # first piece: the agent's words, or the note that no ASR worker is up)
        own = {"mm:transcript:" + k.removeprefix("mm:call:") for k in holding if k.startswith("mm:call:")}
        busy = await asyncio.gather(*(caller.call(PCMU_OFFER) for _ in range(10)))
        cancelled = await asyncio.gather(*(caller.call(PCMU_OFFER, cancel=True) for _ in range(10)))
        assert (busy, cancelled) == ([503] * 10, [487] * 10)

        def counted() -> dict | None:
            status, body = gateway.get("/v1/refusals")
            return body if status == 200 and body["total"] == 30 else None

        await eventually(counted, timeout=10, what="30 refusals recorded")
        body = counted()
        assert body["by_reason"] == {"rejected-codec": 10, "rejected-busy": 10, "cancelled": 10}, body
        added = await all_keys(url) - holding - own
        assert added <= {
            "mm:refusals",
            *(f"mm:refusals:count:{m}" for m in range(int(time.time() // 60) - 2, int(time.time() // 60) + 1)),
        }, added
        assert not [k for k in holding - before - own if ":refusals" not in k and "transcript" in k], holding - before
        status, listed = gateway.get("/v1/calls?state=ended&limit=100")
        reasons = sorted(c["end_reason"] for c in listed["calls"])
        assert reasons == ["cancelled"] * 10 + ["rejected-busy"] * 10 + ["rejected-codec"] * 10
        assert CALLER_NUMBER[1:] not in str(listed)
        metrics = gateway.get("/metrics", token=None)[1]
        assert 'moshimoshi_calls_total{ingress="sip",outcome="rejected-busy"} 10.0' in metrics
        summary = await holder
        assert summary["packets_received"] > 0
    finally:
        if holder is not None and not holder.done():
            holder.cancel()
        await caller.close()

    # the answered call is a real call: its record and transcript are stored
    async def stored() -> bool:
        keys = await all_keys(url)
        return {f"mm:call:{summary['gateway_call_id']}", f"mm:transcript:{summary['gateway_call_id']}"} <= keys

    await eventually(stored, timeout=10, what="the answered call's record and transcript end")
