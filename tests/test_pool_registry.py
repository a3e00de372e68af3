"""Worker registry against a real redis-server: registration, heartbeats, expiry, draining."""

from __future__ import annotations

import time

import pytest

from service.pool import (
    ASR_ROLE,
    DRAINING,
    MODEL_ROLE,
    OVERLOADED,
    READY,
    Admission,
    RegistryReader,
    SlotLeases,
    WorkerInfo,
    WorkerRegistration,
    connect,
)
from tests.support.pool import eventually, worker


@pytest.fixture
async def client(redis_server):
    async with connect(redis_server.url, prefix="t:") as client:
        yield client


async def by_id(reader: RegistryReader) -> dict:
    return {w.worker_id: w for w in await reader.workers()}


async def test_registration_is_listed_with_every_field(client):
    info = worker("w1", capacity=3, model="llm-jp/llm-jp-moshi-v1")
    registration = WorkerRegistration(client, info, interval=0.2)
    assert await registration.start()
    try:
        registration.fence.observe(17)
        registration.report_free(2)
        await registration.heartbeat()
        [status] = await RegistryReader(client).workers()
        assert status.worker_id == "w1" and status.alive
        assert status.url == info.url and status.model == "llm-jp/llm-jp-moshi-v1"
        assert status.capacity == 3 and status.free_slots == 3 and status.reported_free == 2
        assert status.state == READY and status.license == "Apache-2.0" and status.version == info.version
        assert status.started_at == pytest.approx(info.started_at)
        assert abs(status.last_seen - time.time()) < 30
        assert status.highest_token == 17 and status.leases == []
        assert await RegistryReader(client).fence() == 17  # the heartbeat lifted the counter
        assert set(status.to_dict()) >= {"worker_id", "alive", "leases", "free_slots"}
    finally:
        await registration.stop()
    assert await RegistryReader(client).workers() == []  # deregistered on a clean stop


async def test_worker_that_stops_heartbeating_disappears_within_three_intervals(client):
    interval = 0.2
    registration = WorkerRegistration(client, worker("w1"), interval=interval)
    await registration.start()
    leases = SlotLeases(client)
    assert await leases.claim() is not None
    assert registration.ttl_ms == 600
    # the key outlives at least one missed heartbeat: the worker is still there right after
    ttl = await client.redis.pttl(client.keys.worker("w1"))
    assert 0 < ttl <= 600
    await registration.stop(deregister=False)  # a crash: no goodbye
    stopped = time.monotonic()

    async def gone() -> bool:
        return not (await by_id(RegistryReader(client)))["w1"].alive

    await eventually(gone, timeout=5, what="registration expiry")
    assert time.monotonic() - stopped < 3 * interval + 2.0  # generous slack for a busy machine
    assert await leases.claim() is None  # a dead worker takes no claims
    status = (await by_id(RegistryReader(client)))["w1"]
    assert status.alive is False and status.capacity == 0  # listed as dead until forgotten


async def test_heartbeats_keep_a_worker_alive(client):
    registration = WorkerRegistration(client, worker("w1"), interval=0.05)
    await registration.start()
    try:
        before = registration.heartbeats
        await eventually(lambda: registration.heartbeats > before + 10, what="10 heartbeats")
        assert (await by_id(RegistryReader(client)))["w1"].alive
    finally:
        await registration.stop()


async def test_draining_worker_takes_no_new_claims(client):
    a = WorkerRegistration(client, worker("a", capacity=2), interval=30)
    b = WorkerRegistration(client, worker("b", capacity=2), interval=30)
    await a.heartbeat()
    await b.heartbeat()
    leases = SlotLeases(client)
    first = await leases.claim()
    assert first is not None and first.worker_id == "a"
    await a.drain()
    assert (await by_id(RegistryReader(client)))["a"].state == DRAINING
    claimed = [await leases.claim() for _ in range(3)]
    assert [lease.worker_id if lease else None for lease in claimed] == ["b", "b", None]
    # its existing lease is untouched: draining only stops new claims
    assert await leases.validate("a", first.slot, first.token)
    await a.set_state(READY)
    again = await leases.claim()
    assert again is not None and again.worker_id == "a" and again.slot == 1
    with pytest.raises(ValueError):
        await a.set_state("asleep")


async def test_an_overloaded_worker_takes_no_new_claims_and_shows_its_sizing(client):
    step_p99 = {"step_p99_ms": 91.5}
    a = WorkerRegistration(
        client,
        worker(
            "a",
            capacity=2,
            slots_reason="time",
            memory_slots=34,
            step_budget_ms=70.0,
            warmup_p50_ms=41.0,
            warmup_p99_ms=66.5,
            context_seconds=120.0,
        ),
        interval=30,
        live=lambda: step_p99,
    )
    b = WorkerRegistration(client, worker("b", capacity=1), interval=30)
    await a.heartbeat()
    await b.heartbeat()
    await a.set_state(OVERLOADED)
    listed = await by_id(RegistryReader(client))
    assert listed["a"].state == OVERLOADED
    assert (
        listed["a"].slots_reason,
        listed["a"].memory_slots,
        listed["a"].step_budget_ms,
        listed["a"].warmup_p50_ms,
        listed["a"].warmup_p99_ms,
        listed["a"].step_p99_ms,
        listed["a"].context_seconds,
    ) == ("time", 34, 70.0, 41.0, 66.5, 91.5, 120.0)
    assert (listed["b"].slots_reason, listed["b"].step_p99_ms) == ("", None)  # not measured: absent
    leases = SlotLeases(client)
    claimed = [await leases.claim() for _ in range(2)]
    assert [lease.worker_id if lease else None for lease in claimed] == ["b", None]
    step_p99["step_p99_ms"] = 40.0
    await a.set_state(READY)
    assert (await by_id(RegistryReader(client)))["a"].step_p99_ms == 40.0  # live: read at each heartbeat
    again = await leases.claim()
    assert again is not None and again.worker_id == "a"


async def test_claims_respect_the_model(client):
    await WorkerRegistration(client, worker("ja", capacity=1, model="llm-jp/llm-jp-moshi-v1"), interval=30).heartbeat()
    await WorkerRegistration(client, worker("nu", capacity=1, model="nu-dialogue/j-moshi"), interval=30).heartbeat()
    leases = SlotLeases(client)
    assert await leases.claim("kyutai/other") is None
    lease = await leases.claim("nu-dialogue/j-moshi")
    assert lease is not None and (lease.worker_id, lease.model) == ("nu", "nu-dialogue/j-moshi")
    assert await leases.claim("nu-dialogue/j-moshi") is None
    anything = await leases.claim(None)
    assert anything is not None and anything.worker_id == "ja"


async def test_asr_workers_are_listed_with_their_role_and_never_claimed(client):
    model = "test/model"
    await WorkerRegistration(client, worker("asr-1", capacity=64, model=model, role=ASR_ROLE), interval=30).heartbeat()
    leases = SlotLeases(client)
    assert await leases.claim(None) is None  # the only worker is an ASR worker
    assert await leases.claim(model) is None  # even one registered under the asked-for model name
    await WorkerRegistration(client, worker("moshi-1", capacity=1, model=model), interval=30).heartbeat()
    lease = await leases.claim(None)
    assert lease is not None and lease.worker_id == "moshi-1"
    assert await leases.claim(None) is None
    statuses = {w.worker_id: w for w in await RegistryReader(client).workers()}
    assert (statuses["asr-1"].role, statuses["asr-1"].sessions, statuses["asr-1"].capacity) == (ASR_ROLE, 64, 0)
    assert (statuses["moshi-1"].role, statuses["moshi-1"].sessions) == (MODEL_ROLE, 0)
    # a gateway that predates roles reads the hash's capacity: 0 slots, never claimed
    assert await client.redis.hget(client.keys.worker("asr-1"), "capacity") == "0"


async def test_a_registration_without_a_role_is_a_model_worker(client):
    """Workers that predate roles write no ``role`` field: they stay claimable model workers."""
    await WorkerRegistration(client, worker("old", capacity=1), interval=30).heartbeat()
    await client.redis.hdel(client.keys.worker("old"), "role")
    [status] = await RegistryReader(client).workers()
    assert status.role == MODEL_ROLE
    assert (await SlotLeases(client).claim(None)).worker_id == "old"


async def test_reader_shows_per_slot_leases(client):
    await WorkerRegistration(client, worker("w1", capacity=3), interval=30).heartbeat()
    leases = SlotLeases(client)
    first = await leases.claim(owner="call-1", ttl_ms=60_000)
    second = await leases.claim(owner="call-2", ttl_ms=60_000)
    await leases.release(first)
    [status] = await RegistryReader(client).workers()
    assert status.free_slots == 2
    [held] = status.leases
    assert (held.slot, held.token, held.owner) == (second.slot, second.token, "call-2")
    assert 0 < held.ttl_ms <= 60_000


async def test_admit_checks_slot_fence_and_lease(client):
    registration = WorkerRegistration(client, worker("w1", capacity=2), interval=30)
    await registration.heartbeat()
    leases = SlotLeases(client)
    lease = await leases.claim()
    assert await registration.admit(5, lease.token) is Admission.BAD_SLOT
    assert await registration.admit(lease.slot, lease.token + 100) is Admission.NOT_LEASED
    assert await registration.admit(lease.slot, lease.token) is Admission.ADMITTED
    assert await registration.admit(lease.slot, lease.token) is Admission.ADMITTED  # a reconnect
    await leases.release(lease)
    newer = await leases.claim()
    assert newer.slot == lease.slot and newer.token > lease.token
    assert await registration.admit(newer.slot, newer.token) is Admission.ADMITTED
    # the old gateway comes back, and even re-creates its lease somehow: the worker's memory refuses it
    await client.redis.set(client.keys.lease("w1", lease.slot), f"{lease.token}|zombie")
    assert await registration.admit(lease.slot, lease.token) is Admission.STALE
    assert registration.fence.refused_stale == 1
    assert registration.fence.highest == lease.token + 100  # every token seen goes out with heartbeats


def test_worker_info_is_validated():
    with pytest.raises(ValueError, match="capacity"):
        WorkerInfo("w", "ws://w", "m", 0)
    with pytest.raises(ValueError, match="worker_id"):
        WorkerInfo("has space", "ws://w", "m", 1)
    with pytest.raises(ValueError, match="url"):
        WorkerInfo("w", "", "m", 1)
    with pytest.raises(ValueError, match="role"):
        WorkerInfo("w", "ws://w", "m", 1, role="gpu")
