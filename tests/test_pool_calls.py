"""Call records against a real redis-server: create, partial updates, listing, retention."""

from __future__ import annotations

import time

import pytest

from service.call_record import CallQuality, GatewayLatency
from service.pool import ACTIVE, ENDED, CallRecord, CallRecords, connect
from tests.support.pool import eventually


@pytest.fixture
async def client(redis_server):
    async with connect(redis_server.url, prefix="t:") as client:
        yield client


def record(call_id: str, started_at: float, worker_id: str = "w1", **extra) -> CallRecord:
    return CallRecord(
        call_id=call_id,
        sip_call_id=f"{call_id}@pbx",
        from_uri="sip:0312345678@pbx",
        to_uri="sip:agent@moshi",
        codec="PCMU",
        worker_id=worker_id,
        slot=0,
        started_at=started_at,
        **extra,
    )


async def test_create_update_end_get(client):
    records = CallRecords(client)
    started = time.time()
    assert await records.create(record("c1", started, quality=CallQuality(ptime_ms=20)))
    assert not await records.create(record("c1", started))  # no overwrite
    assert await records.update("c1", state=ACTIVE, answered_at=started + 0.5, quality=CallQuality(jitter_ms=3.5))
    assert await records.update(
        "c1", quality=CallQuality(loss_fraction=0.01, resampler="日本語", gateway_latency_ms=GatewayLatency(p50=1.5))
    )
    got = await records.get("c1")
    assert got.state == ACTIVE and got.answered_at == pytest.approx(started + 0.5)
    assert got.started_at == pytest.approx(started) and got.ended_at is None and got.slot == 0
    assert (got.sip_call_id, got.from_uri, got.to_uri, got.codec) == (
        "c1@pbx",
        "sip:0312345678@pbx",
        "sip:agent@moshi",
        "PCMU",
    )
    assert got.quality == CallQuality(
        ptime_ms=20, jitter_ms=3.5, loss_fraction=0.01, resampler="日本語", gateway_latency_ms=GatewayLatency(p50=1.5)
    )

    assert await records.end("c1", "bye_caller", ended_at=started + 60)
    got = await records.get("c1")
    assert (got.state, got.end_reason, got.ended_at) == (ENDED, "bye_caller", pytest.approx(started + 60))
    assert got.to_dict()["quality"]["loss_fraction"] == 0.01


async def test_a_record_stored_by_an_earlier_version_reads_back(client):
    """Records of earlier gateways kept ingress, gateway and sampling among the quality
    fields, and quality fields this version does not know: they read back, the unknown
    ones left out."""
    await client.redis.hset(
        client.keys.call("c-old"),
        mapping={
            "call_id": "c-old",
            "state": "active",
            "started_at": "1700000000.5",
            "slot": "2",
            "q.ingress": '"sip"',
            "q.gateway": '"gw-old"',
            "q.sampling": '{"temp": 0.8}',
            "q.jitter_ms": "4.5",
            "q.mos": "4.1",
            "answered_at": "not a number",
        },
    )
    got = await CallRecords(client).get("c-old")
    assert (got.ingress, got.gateway_id, got.sampling, got.slot) == ("sip", "gw-old", {"temp": 0.8}, 2)
    assert got.quality == CallQuality(jitter_ms=4.5) and got.answered_at is None


async def test_updates_never_recreate_a_missing_record(client):
    records = CallRecords(client)
    assert not await records.update("nope", answered_at=1.0)
    assert not await records.end("nope", "bye")
    assert await records.get("nope") is None
    with pytest.raises(ValueError, match="not updatable"):
        await records.update("c1", started_at=3.0)
    with pytest.raises(ValueError):
        await records.get("bad id")


async def test_list_filters_and_order(client):
    records = CallRecords(client)
    now = time.time()
    for i in range(6):
        await records.create(record(f"c{i}", now - 100 + i * 10, worker_id="w1" if i % 2 else "w2"))
    await records.end("c1", "bye")
    await records.end("c4", "error")

    newest_first = [r.call_id for r in await records.list()]
    assert newest_first == ["c5", "c4", "c3", "c2", "c1", "c0"]
    assert [r.call_id for r in await records.list(state=ACTIVE)] == ["c5", "c3", "c2", "c0"]
    assert [r.call_id for r in await records.list(state=ENDED)] == ["c4", "c1"]
    assert [r.call_id for r in await records.list(worker_id="w1")] == ["c5", "c3", "c1"]
    assert [r.call_id for r in await records.list(since=now - 75)] == ["c5", "c4", "c3"]
    assert [r.call_id for r in await records.list(state=ACTIVE, worker_id="w2", since=now - 85)] == ["c2"]
    assert [r.call_id for r in await records.list(limit=2)] == ["c5", "c4"]
    with pytest.raises(ValueError):
        await records.list(state="ringing")


async def test_records_expire_after_retention_and_leave_the_index(client):
    records = CallRecords(client, retention=0.3, active_ttl=30)
    now = time.time()
    await records.create(record("short", now - 1))
    await records.create(record("long", now))
    await records.end("short", "bye")
    # an ended record lives `retention`; an active one `active_ttl`
    assert 0 < await client.redis.pttl(client.keys.call("short")) <= 300
    assert await client.redis.pttl(client.keys.call("long")) > 1000

    async def short_gone() -> bool:
        return await records.get("short") is None

    await eventually(short_gone, what="retention expiry")
    assert [r.call_id for r in await records.list()] == ["long"]
    assert await client.redis.zrange(client.keys.calls, 0, -1) == ["long"]  # the listing trimmed the index

    # creating trims expired entries older than the retention from the index too
    await client.redis.zadd(client.keys.calls, {"ancient": (now - 3600) * 1000})
    await records.create(record("next", now + 1))
    assert "ancient" not in await client.redis.zrange(client.keys.calls, 0, -1)
