"""Slot leases against a real redis-server: claim, release, renew, expiry, fencing, hold()."""

from __future__ import annotations

import asyncio

import pytest

from service.pool import RenewResult, SlotLeases, WorkerRegistration, connect
from service.pool.leases import Lease
from tests.support.pool import eventually, expire_lease, lease_keys, worker

B = 4


@pytest.fixture
async def client(redis_server):
    async with connect(redis_server.url, prefix="t:") as client:
        yield client


@pytest.fixture
async def two_workers(client):
    for worker_id in ("w-a", "w-b"):
        await WorkerRegistration(client, worker(worker_id, capacity=B), interval=30).heartbeat()
    return SlotLeases(client)


async def expire(client, lease: Lease) -> None:
    await expire_lease(client, lease.worker_id, lease.slot)


async def test_two_workers_fill_alternately_then_none(client, two_workers):
    leases = two_workers
    claimed = [await leases.claim(ttl_ms=60_000, owner=f"call-{i}") for i in range(2 * B)]
    assert [lease.worker_id for lease in claimed] == ["w-a", "w-b"] * B  # least loaded first
    assert sorted((lease.worker_id, lease.slot) for lease in claimed) == sorted(
        (w, s) for w in ("w-a", "w-b") for s in range(B)
    )
    tokens = [lease.token for lease in claimed]
    assert tokens == sorted(set(tokens))  # strictly increasing
    assert claimed[0].url == "ws://w-a.test:8081" and claimed[0].model == "test/model"
    assert await leases.claim() is None

    victim = claimed[5]
    assert await leases.release(victim)
    again = await leases.claim(ttl_ms=60_000)
    assert (again.worker_id, again.slot) == (victim.worker_id, victim.slot)  # exactly that slot
    assert again.token > max(tokens)
    assert await leases.claim() is None
    held = await lease_keys(client)
    assert len(held) == 2 * B


async def test_lease_key_layout_matches_keys(client, two_workers):
    lease = await two_workers.claim(owner="c1")
    held = await lease_keys(client)
    assert held == {client.keys.lease(lease.worker_id, lease.slot): f"{lease.token}|c1"}
    assert 0 < await client.redis.pttl(client.keys.lease(lease.worker_id, lease.slot)) <= lease.ttl_ms


async def test_release_is_compare_and_delete(client, two_workers):
    leases = two_workers
    lease = await leases.claim()
    forged = Lease(**{**lease.__dict__, "token": lease.token - 1})
    assert not await leases.release(forged)
    assert await leases.validate(lease.worker_id, lease.slot, lease.token)
    assert await leases.release(lease)
    assert not await leases.release(lease)  # twice: nothing left to release
    assert not await leases.validate(lease.worker_id, lease.slot, lease.token)


async def test_expired_lease_is_reclaimed_and_the_old_holder_is_fenced_out(client):
    await WorkerRegistration(client, worker("solo", capacity=1), interval=30).heartbeat()
    leases = SlotLeases(client)
    old = await leases.claim(ttl_ms=60_000)
    assert await leases.claim() is None
    await expire(client, old)
    new = await leases.claim(ttl_ms=60_000)
    assert new is not None and new.slot == old.slot and new.token > old.token
    assert await leases.renew(old) is RenewResult.LOST
    assert not await leases.release(old)
    assert not await leases.validate("solo", old.slot, old.token)
    assert await leases.validate("solo", new.slot, new.token)
    assert await leases.renew(new) is RenewResult.RENEWED
    # the stale holder still cannot resurrect once the new one released
    assert await leases.release(new)
    assert await leases.renew(old) is RenewResult.LOST
    assert await lease_keys(client) == {}


async def test_renew_resets_the_ttl(client, two_workers):
    leases = two_workers
    lease = await leases.claim(ttl_ms=5_000)
    key = client.keys.lease(lease.worker_id, lease.slot)
    assert await leases.renew(lease, ttl_ms=60_000) is RenewResult.RENEWED
    assert 5_000 < await client.redis.pttl(key) <= 60_000
    # the free-slot index follows: the slot stays counted as busy as long as the key lives
    seconds, micros = await client.redis.time()
    now_ms = seconds * 1000 + micros // 1000
    expiry = await client.redis.zscore(client.keys.held(lease.worker_id), str(lease.slot))
    assert now_ms + 30_000 < expiry <= now_ms + 60_000


async def test_renew_recreates_an_expired_lease_nobody_took(client, two_workers):
    leases = two_workers
    lease = await leases.claim(ttl_ms=60_000, owner="c1")
    await expire(client, lease)
    assert await leases.renew(lease) is RenewResult.RECREATED
    assert await leases.validate(lease.worker_id, lease.slot, lease.token)
    assert (await lease_keys(client)) == {client.keys.lease(lease.worker_id, lease.slot): f"{lease.token}|c1"}
    assert await leases.renew(lease) is RenewResult.RENEWED


async def test_a_released_lease_cannot_be_renewed_back(client, two_workers):
    leases = two_workers
    lease = await leases.claim()
    assert await leases.release(lease)
    assert await leases.renew(lease) is RenewResult.LOST
    assert await lease_keys(client) == {}


async def test_hold_renews_and_releases(client, two_workers):
    leases = two_workers
    lease = await leases.claim(ttl_ms=2_000)
    async with leases.hold(lease, renew_every=0.02) as holder:
        await eventually(lambda: holder.renewals >= 5, what="5 renewals")
        assert await leases.validate(lease.worker_id, lease.slot, lease.token)
    assert holder.released is True
    assert await lease_keys(client) == {}


async def test_hold_reports_a_lost_lease(client, two_workers):
    leases = two_workers
    lease = await leases.claim(ttl_ms=60_000)
    lost: list[Lease] = []
    async with leases.hold(lease, renew_every=0.02, on_lost=lost.append) as holder:
        # another gateway got the slot after our lease ran out
        await client.redis.set(client.keys.lease(lease.worker_id, lease.slot), f"{lease.token + 50}|other")
        await asyncio.wait_for(holder.lost.wait(), 10)
    assert lost == [lease]
    assert holder.released is None  # not ours to release
    assert (await lease_keys(client))[client.keys.lease(lease.worker_id, lease.slot)] == f"{lease.token + 50}|other"


async def test_hold_releases_when_the_call_task_is_cancelled(client, two_workers):
    leases = two_workers
    lease = await leases.claim(ttl_ms=60_000)
    entered = asyncio.Event()

    async def call() -> None:
        async with leases.hold(lease, renew_every=0.02):
            entered.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(call())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await lease_keys(client) == {}


async def test_bad_arguments_are_refused(client, two_workers):
    with pytest.raises(ValueError):
        await two_workers.claim(ttl_ms=0)
    with pytest.raises(ValueError):
        await two_workers.claim("")
    assert await two_workers.claim("/models/a local checkpoint") is None  # any model id; none serves it


async def test_claims_check_lease_keys_even_when_the_index_is_lost(client):
    await WorkerRegistration(client, worker("solo", capacity=2), interval=30).heartbeat()
    leases = SlotLeases(client)
    first, second = await leases.claim(ttl_ms=60_000), await leases.claim(ttl_ms=60_000)
    await client.redis.delete(client.keys.held("solo"))  # the free-slot index says: all free
    assert await leases.claim() is None  # the lease keys say otherwise, and they win
    assert sorted(await client.redis.zrange(client.keys.held("solo"), 0, -1)) == ["0", "1"]  # repaired
    assert await leases.release(second)
    again = await leases.claim()
    assert again.slot == second.slot and await leases.validate("solo", first.slot, first.token)


async def test_a_lease_deleted_by_hand_frees_its_slot_by_its_expiry_at_the_latest(client):
    await WorkerRegistration(client, worker("solo", capacity=1), interval=30).heartbeat()
    leases = SlotLeases(client)
    lease = await leases.claim(ttl_ms=300)
    await client.redis.delete(client.keys.lease("solo", lease.slot))  # not released: removed behind our back
    await eventually(leases.claim, what="slot free again")
