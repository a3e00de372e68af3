"""Redis outages: restart with data loss, Redis down, Redis hung."""

from __future__ import annotations

import asyncio
import time

import pytest

from service.pool import (
    Admission,
    Backoff,
    CallRecord,
    CallRecords,
    LeaseHolder,
    LiveSession,
    PoolUnavailable,
    RegistryReader,
    RenewResult,
    SlotLeases,
    WorkerRegistration,
    connect,
)
from tests.support.pool import eventually, lease_keys, worker

FAST = 1.5  # seconds: an outage must be reported at least this fast


async def test_restart_without_persistence_reconciles_leases_registry_and_fence(redis_server):
    async with connect(redis_server.url, prefix="o:") as client:
        registration = WorkerRegistration(client, worker("w1", capacity=4), interval=0.1)
        await registration.start()
        leases = SlotLeases(client)
        first = await leases.claim(ttl_ms=60_000, owner="call-1")
        second = await leases.claim(ttl_ms=60_000, owner="call-2")
        third = await leases.claim(ttl_ms=60_000, owner="call-3")
        for lease in (first, second, third):
            assert await registration.admit(lease.slot, lease.token) is Admission.ADMITTED
        assert await leases.release(third)
        assert (first.slot, second.slot, third.slot) == (0, 1, 2)
        highest = third.token

        async with leases.hold(first, renew_every=0.05) as holder:
            redis_server.stop()
            await eventually(lambda: holder.renew_failures > 0, what="a failed renew while Redis is down")
            redis_server.start()  # same port, empty: everything in Redis is gone

            # the worker's heartbeats repopulate the registry and lift the fence above every token seen
            reader = RegistryReader(client)

            async def registered() -> bool:
                try:
                    return any(w.alive for w in await reader.workers())
                except PoolUnavailable:
                    return False

            await eventually(registered, what="re-registration")
            assert registration.heartbeat_failures > 0
            assert await reader.fence() >= highest
            # the held lease comes back with the same token
            await eventually(lambda: holder.recreations == 1, what="lease re-created by its holder")
            assert await leases.validate("w1", first.slot, first.token)
            # a gateway that renews by hand gets the same
            assert await leases.renew(second) is RenewResult.RECREATED
            assert await leases.renew(second) is RenewResult.RENEWED
            assert await registration.admit(second.slot, second.token) is Admission.ADMITTED

            # new claims get larger tokens and the free slots only: no double booking
            fresh = await leases.claim(ttl_ms=60_000)
            assert fresh.token > highest and fresh.slot == 2
            assert await registration.admit(fresh.slot, fresh.token) is Admission.ADMITTED
            assert set(await lease_keys(client)) == {client.keys.lease("w1", s) for s in (0, 1, 2)}
            assert not holder.lost.is_set()
        assert holder.released is True

        # nothing stuck, nothing left over
        assert await leases.release(second) and await leases.release(fresh)
        assert await lease_keys(client) == {}
        refill = [await leases.claim() for _ in range(4)]
        assert sorted(lease.slot for lease in refill) == [0, 1, 2, 3]
        assert min(lease.token for lease in refill) > fresh.token
        await registration.stop()


async def test_operations_fail_fast_and_are_counted_when_redis_is_down(redis_server):
    async with connect(redis_server.url, prefix="o:") as client:
        registration = WorkerRegistration(client, worker("w1"), interval=30)
        await registration.heartbeat()
        leases = SlotLeases(client)
        lease = await leases.claim()
        records = CallRecords(client)
        redis_server.stop()

        operations = {
            "ping": client.ping,
            "claim": leases.claim,
            "renew": lambda: leases.renew(lease),
            "release": lambda: leases.release(lease),
            "validate": lambda: leases.validate("w1", 0, lease.token),
            "heartbeat": registration.heartbeat,
            "admit": lambda: registration.admit(lease.slot, lease.token),
            "list workers": RegistryReader(client).workers,
            "create call": lambda: records.create(CallRecord("c1")),
            "list calls": records.list,
        }
        errors_before = client.errors_total
        for name, operation in operations.items():
            start = time.monotonic()
            with pytest.raises(PoolUnavailable, match="Redis unavailable"):
                await operation()
            assert time.monotonic() - start < FAST, name
        assert client.errors_total == errors_before + len(operations)
        assert client.last_error is not None

        # the heartbeat loop rides the outage out instead of dying
        beating = WorkerRegistration(client, worker("w2"), interval=0.05)
        assert await beating.start() is False
        await eventually(lambda: beating.heartbeat_failures >= 3, what="heartbeats retried")
        redis_server.start()
        await eventually(lambda: beating.registered, what="registered again")
        await beating.stop()


@pytest.fixture
async def hung_redis():
    """A TCP server that accepts connections and never answers: a hung or partitioned Redis."""
    connections: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        while await reader.read(65536):
            pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"redis://127.0.0.1:{port}/0"
    server.close()
    for writer in connections:
        writer.close()
    await server.wait_closed()


async def test_a_hung_redis_is_reported_within_the_deadline(hung_redis):
    async with connect(hung_redis, prefix="o:") as client:
        leases = SlotLeases(client)
        for _ in range(2):
            start = time.monotonic()
            with pytest.raises(PoolUnavailable):
                await leases.claim()
            elapsed = time.monotonic() - start
            assert 1.0 < elapsed < FAST + 0.5  # the operation deadline (1.25 s) fired, nothing hung
        assert client.errors_total == 2


async def test_an_unreachable_url_is_reported_fast():
    from tests.support.procs import free_port

    async with connect(f"redis://127.0.0.1:{free_port()}/0") as client:
        start = time.monotonic()
        with pytest.raises(PoolUnavailable):
            await client.ping()
        assert time.monotonic() - start < FAST


async def test_a_recreated_lease_lifts_the_fence_even_before_any_worker_heartbeat(redis_server):
    async with connect(redis_server.url, prefix="o:") as client:
        leases = SlotLeases(client)
        await WorkerRegistration(client, worker("w1", capacity=8), interval=30).heartbeat()
        claimed = [await leases.claim(ttl_ms=60_000) for _ in range(5)]
        newest = claimed[-1]
        redis_server.stop()
        redis_server.start()  # empty
        # a worker that never admitted anything comes back first: it cannot lift the counter
        await WorkerRegistration(client, worker("w1", capacity=8), interval=30).heartbeat()
        assert await RegistryReader(client).fence() == 0
        assert await leases.renew(newest) is RenewResult.RECREATED
        assert await RegistryReader(client).fence() == newest.token
        fresh = await leases.claim()
        assert fresh.token > newest.token and fresh.slot != newest.slot


async def test_the_deadline_cuts_a_slow_reply_without_desynchronising_the_connection(redis_server):
    async with connect(redis_server.url, prefix="o:", operation_timeout=0.3, max_connections=1) as client:
        start = time.monotonic()
        with pytest.raises(PoolUnavailable, match="no answer within 0.3 s"):
            async with client.guard("slow read"):
                await client.redis.blpop(["o:never"], timeout=2)
        assert time.monotonic() - start < 1.0
        # the late BLPOP reply must not be read as the answer to the next command
        await client.redis.rpush("o:never", "late")
        await client.redis.set("o:probe", "fresh")
        assert await client.redis.get("o:probe") == "fresh"
        assert await client.redis.lrange("o:never", 0, -1) == ["late"]


async def test_an_empty_restart_gives_no_live_session_s_slot_away(redis_server):
    """A full worker, Redis back empty: its first heartbeat re-asserts every live session's lease
    before it is claimable again, so no claim takes a live slot and no holder is fenced out."""
    async with connect(redis_server.url, prefix="o:") as client:
        live: dict[int, LiveSession] = {}
        registration = WorkerRegistration(
            client, worker("w1", capacity=4), interval=30, sessions=lambda: list(live.values())
        )
        await registration.heartbeat()
        leases = SlotLeases(client)
        claimed = [await leases.claim(ttl_ms=15_000, owner=f"call-{i}") for i in range(4)]
        for lease in claimed:
            assert await registration.admit(lease.slot, lease.token) is Admission.ADMITTED
            live[lease.slot] = LiveSession(lease.slot, lease.token, lease.owner)
        holders = [LeaseHolder(leases, lease) for lease in claimed]  # renewing every 5 s
        for holder in holders:
            holder.start()

        redis_server.kill()
        redis_server.start()  # empty
        assert await leases.claim() is None  # no worker registered yet: nothing to give
        await registration.heartbeat()
        assert registration.leases_recreated == 4
        for _ in range(8):
            assert await leases.claim(ttl_ms=15_000) is None  # the pool is still full
        in_redis = await lease_keys(client)
        assert in_redis == {client.keys.lease("w1", x.slot): f"{x.token}|{x.owner}" for x in claimed}
        assert await RegistryReader(client).fence() == claimed[-1].token
        # the gateways' next renewals find their own leases
        for lease in claimed:
            assert await leases.renew(lease) is RenewResult.RENEWED
        assert not any(holder.lost.is_set() for holder in holders)

        # a session that ends gives its slot back; a heartbeat that still listed it (it was
        # read before the end) cannot bring the lease back
        ended = claimed[0]
        await holders[0].close()
        assert holders[0].released is True
        await registration.heartbeat()  # `live` still lists the ended session
        assert client.keys.lease("w1", ended.slot) not in await lease_keys(client)
        assert registration.lease_conflicts == 1
        fresh = await leases.claim()
        assert fresh is not None and fresh.slot == ended.slot and fresh.token > claimed[-1].token
        for holder in holders[1:]:
            await holder.close()


async def test_a_live_session_keeps_its_lease_while_its_gateway_cannot_renew(redis_server):
    """The worker co-holds the lease of a session it serves: a gateway cut off from Redis for
    longer than the lease TTL keeps its call; once the session ends, the slot is free."""
    async with connect(redis_server.url, prefix="o:") as client:
        live: list[LiveSession] = []
        registration = WorkerRegistration(client, worker("w1", capacity=1), interval=0.05, sessions=lambda: list(live))
        await registration.start()
        leases = SlotLeases(client)
        lease = await leases.claim(ttl_ms=200, owner="call-1")  # never renewed by its gateway
        assert await registration.admit(lease.slot, lease.token) is Admission.ADMITTED
        live.append(LiveSession(lease.slot, lease.token, lease.owner))
        await asyncio.sleep(0.6)  # three lease TTLs
        assert await leases.validate("w1", 0, lease.token)
        assert await leases.claim() is None
        live.clear()  # the session ends; the worker releases its lease
        assert await leases.release(lease)
        fresh = await leases.claim()
        assert fresh is not None and fresh.slot == 0
        await registration.stop()


async def fill_to_maxmemory(client) -> None:
    """Write junk until Redis refuses writes, then set maxmemory under what it holds (it stays full)."""
    from redis.exceptions import OutOfMemoryError

    count = 0
    with pytest.raises(OutOfMemoryError):
        while True:
            await client.redis.set(f"junk:{count}", b"x" * 65536)
            count += 1
    used = int((await client.redis.info("memory"))["used_memory"])
    await client.redis.config_set("maxmemory", used - 256 * 1024)


async def test_a_full_redis_is_unavailable_yet_releases_and_heartbeats_still_work(small_redis_server):
    async with connect(small_redis_server.url, prefix="o:") as client:
        live: list[LiveSession] = []
        registration = WorkerRegistration(client, worker("w1", capacity=3), interval=30, sessions=lambda: live)
        await registration.heartbeat()
        leases = SlotLeases(client)
        first = await leases.claim(owner="call-1")
        second = await leases.claim(owner="call-2")
        assert await registration.admit(first.slot, first.token) is Admission.ADMITTED
        live.append(LiveSession(first.slot, first.token, "call-1"))
        await client.check_writable("gw1")
        await fill_to_maxmemory(client)

        # what needs memory says "unavailable" (a 503 for a call), not a bare error (a 500)
        with pytest.raises(PoolUnavailable, match="full"):
            await client.check_writable("gw1")
        with pytest.raises(PoolUnavailable, match="full"):
            await CallRecords(client).create(CallRecord("c1"))
        with pytest.raises(PoolUnavailable, match="full"):
            await leases.claim()  # a slot is free, but Redis cannot write its lease
        # what frees memory or keeps the pool running still works when full
        assert await leases.release(second) is True
        assert await leases.renew(first) is RenewResult.RENEWED
        await registration.heartbeat()  # the worker does not drop out of the pool
        assert [w.alive for w in await RegistryReader(client).workers()] == [True]
        assert await leases.release(first) is True
        assert await lease_keys(client) == {}
        await registration.stop()


async def test_retries_back_off_until_the_write_succeeds_and_are_counted():
    from service.pool import Backoff, PoolError, Retries

    events: list[tuple[str, str]] = []
    retries = Retries(retry_on=(PoolError,), backoff=Backoff(first=0.01, factor=2.0, most=0.04))
    retries.listeners.append(lambda what, event: events.append((what, event)))
    attempts: list[float] = []

    async def flaky() -> str:
        attempts.append(time.monotonic())
        if len(attempts) < 5:
            raise PoolUnavailable("down")
        return "done"

    assert await retries.run("record-end", flaky, give_up_after=5.0) == "done"
    gaps = [round(b - a, 3) for a, b in zip(attempts, attempts[1:], strict=False)]
    assert [g >= d for g, d in zip(gaps, (0.01, 0.02, 0.04, 0.04), strict=True)] == [True] * 4, gaps
    assert retries.retried["record-end"] == 4 and retries.recovered["record-end"] == 1
    assert events == [("record-end", "retried")] * 4 + [("record-end", "recovered")]

    async def never() -> None:
        raise PoolUnavailable("still down")

    started = time.monotonic()
    with pytest.raises(PoolUnavailable):
        await retries.run("lease-release", never, give_up_after=0.2)
    assert time.monotonic() - started < 0.5  # bounded
    assert retries.abandoned["lease-release"] == 1 and events[-1] == ("lease-release", "abandoned")

    async def bad() -> None:
        raise ValueError("a bug is not retried")

    with pytest.raises(ValueError):
        await retries.run("record-end", bad, give_up_after=5.0)

    # in the background: owned by the Retries object, waited for (then cancelled) at close
    done = asyncio.Event()
    state = {"calls": 0}

    async def later() -> None:
        state["calls"] += 1
        if state["calls"] < 3:
            raise PoolUnavailable("down")
        done.set()

    retries.submit("lease-release", later, give_up_after=5.0)
    assert retries.pending == 1
    await asyncio.wait_for(done.wait(), 2)
    retries.submit("lease-release", never, give_up_after=60.0)
    await retries.close(timeout=0.05)
    assert retries.pending == 0


async def test_a_release_refused_by_redis_is_retried_until_it_succeeds(redis_server):
    async with connect(redis_server.url, prefix="o:") as client:
        client.retries.backoff = Backoff(first=0.05, factor=2.0, most=0.2)
        await WorkerRegistration(client, worker("w1", capacity=1), interval=30).heartbeat()
        leases = SlotLeases(client)
        lease = await leases.claim(ttl_ms=60_000)
        holder = LeaseHolder(leases, lease)
        holder.start()
        redis_server.stop()
        await holder.close()  # cannot release now: retried in the background
        assert holder.released is None and client.retries.pending == 1
        await eventually(lambda: client.retries.retried["lease-release"] >= 2, what="retries while down")
        redis_server.start()  # empty: the release finds nothing to delete, and notes the token given back
        await eventually(lambda: client.retries.pending == 0, what="the release retried")
        assert client.retries.recovered["lease-release"] == 1
        assert client.retries.retried["lease-release"] >= 1
        assert await leases.renew(lease) is RenewResult.LOST  # released: no renew brings it back
