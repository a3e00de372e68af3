"""No slot is ever given to two calls, and stale tokens are refused: property tests.

1. A differential test: hypothesis draws sequences of claim / release / renew / expire /
   validate / admit / end of a session / drain / heartbeat / Redis restarted empty against a
   real redis-server, and a plain-Python model of the pool predicts every answer exactly
   (which worker and slot, which token, what renew says); after every step the lease keys
   in Redis must equal the model's.
2. Many asyncio claimers over several connections race for slots, with and without
   leases running out under them; every confirmation (claim, renew) is checked against
   the history of tokens issued per slot.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.pool import (
    Admission,
    LiveSession,
    PoolClient,
    RenewResult,
    SlotLeases,
    WorkerRegistration,
    connect,
)
from service.pool.leases import Lease
from tests.support.pool import eventually, expire_lease, lease_keys, worker

MODELS = ("m1", "m2")


@dataclass
class Model:
    """What the pool must do, in plain Python."""

    workers: dict[str, tuple[int, str]]  # id -> (capacity, model)
    draining: set[str] = field(default_factory=set)
    held: dict[tuple[str, int], int] = field(default_factory=dict)  # slot -> token of its lease
    issued: dict[tuple[str, int], tuple[int, bool]] = field(default_factory=dict)  # newest, released
    fence: int = 0
    # worker-side memory, kept across Redis restarts
    admitted: dict[tuple[str, int], int] = field(default_factory=dict)  # highest admitted per slot
    seen: dict[str, int] = field(default_factory=dict)  # highest token each worker was shown
    live: dict[tuple[str, int], int] = field(default_factory=dict)  # sessions served: slot -> token
    registered: set[str] = field(default_factory=set)

    def claim(self, model: str | None) -> tuple[str, int, int] | None:
        best: tuple[int, str] | None = None
        for worker_id in sorted(self.workers):
            capacity, served = self.workers[worker_id]
            if (
                worker_id not in self.registered
                or worker_id in self.draining
                or (model is not None and served != model)
            ):
                continue
            free = sum((worker_id, s) not in self.held for s in range(capacity))
            if free > 0 and (best is None or free > best[0]):
                best = (free, worker_id)
        if best is None:
            return None
        worker_id = best[1]
        slot = next(s for s in range(self.workers[worker_id][0]) if (worker_id, s) not in self.held)
        self.fence += 1
        self.held[(worker_id, slot)] = self.fence
        self.issued[(worker_id, slot)] = (self.fence, False)
        return worker_id, slot, self.fence

    def release(self, lease: Lease) -> bool:
        where = (lease.worker_id, lease.slot)
        if where not in self.issued or self.issued[where][0] == lease.token:
            self.issued[where] = (lease.token, True)  # even if it had run out: no renew brings it back
        if self.held.get(where) != lease.token:
            return False
        del self.held[where]
        return True

    def renew(self, lease: Lease) -> RenewResult:
        where = (lease.worker_id, lease.slot)
        if where in self.held:
            return RenewResult.RENEWED if self.held[where] == lease.token else RenewResult.LOST
        newest, released = self.issued.get(where, (0, False))
        if newest > lease.token or (newest == lease.token and released):
            return RenewResult.LOST
        self.held[where] = lease.token
        self.issued[where] = (lease.token, False)
        self.fence = max(self.fence, lease.token)
        return RenewResult.RECREATED

    def admit(self, lease: Lease) -> Admission:
        where = (lease.worker_id, lease.slot)
        self.seen[lease.worker_id] = max(self.seen.get(lease.worker_id, 0), lease.token)
        if lease.token < self.admitted.get(where, 0):
            return Admission.STALE
        if self.held.get(where) != lease.token:
            return Admission.NOT_LEASED
        self.admitted[where] = lease.token
        self.live[where] = lease.token  # the session starts (a newer one fences out the old)
        return Admission.ADMITTED

    def end_session(self, where: tuple[str, int]) -> Lease:
        """The worker's session on ``where`` ends: it releases its lease."""
        token = self.live.pop(where)
        lease = Lease(
            worker_id=where[0], url="", slot=where[1], token=token, model="", ttl_ms=1, owner="", expires_at=0.0
        )
        return lease

    def heartbeat(self, worker_id: str) -> None:
        """Re-assert the worker's live sessions' leases, register it, lift the fence."""
        for (w, slot), token in self.live.items():
            if w != worker_id:
                continue
            where = (w, slot)
            if where in self.held:
                continue  # kept if it is ours; left alone if another token holds it
            newest, released = self.issued.get(where, (0, False))
            if newest > token or (newest == token and released):
                continue
            self.held[where] = token
            self.issued[where] = (token, False)
        self.registered.add(worker_id)
        self.fence = max(self.fence, self.seen.get(worker_id, 0))

    def restart_empty(self) -> None:
        self.held.clear()
        self.issued.clear()
        self.fence = 0
        self.registered.clear()


workers_strategy = st.dictionaries(
    st.sampled_from(["w0", "w1", "w2"]), st.tuples(st.integers(1, 3), st.sampled_from(MODELS)), min_size=1, max_size=3
)

op_strategy = st.one_of(
    st.tuples(st.just("claim"), st.sampled_from([None, *MODELS])),
    st.tuples(st.just("call"), st.sampled_from([None, *MODELS])),  # claim, then the worker admits it
    st.tuples(st.just("release"), st.integers(0, 4)),
    st.tuples(st.just("renew"), st.integers(0, 4)),
    st.tuples(st.just("expire"), st.integers(0, 4)),
    st.tuples(st.just("validate"), st.integers(0, 4)),
    st.tuples(st.just("admit"), st.integers(0, 4)),
    st.tuples(st.just("drain"), st.integers(0, 2)),
    st.tuples(st.just("end"), st.integers(0, 4)),
    st.tuples(st.just("heartbeat"), st.integers(0, 2)),
    st.tuples(st.just("restart"), st.just(0)),
)


async def run_against_model(client: PoolClient, workers: dict[str, tuple[int, str]], ops: list) -> None:
    await client.redis.flushdb()
    model = Model(workers)
    registrations = {}

    def sessions_of(worker_id: str):
        return lambda: [
            LiveSession(slot, token, f"call-{token}") for (w, slot), token in model.live.items() if w == worker_id
        ]

    for worker_id, (capacity, served) in workers.items():
        registrations[worker_id] = WorkerRegistration(
            client, worker(worker_id, capacity, served), interval=60, sessions=sessions_of(worker_id)
        )
        await registrations[worker_id].heartbeat()
        model.heartbeat(worker_id)
    leases = SlotLeases(client)
    holders: list[Lease] = []  # every lease ever handed out, stale ones included; ops pick recent ones

    for op, arg in ops:
        if op == "call":
            lease = await leases.claim(arg, ttl_ms=600_000)
            expected = model.claim(arg)
            assert (None if lease is None else (lease.worker_id, lease.slot, lease.token)) == expected
            if lease is not None:
                holders.append(lease)
                assert await registrations[lease.worker_id].admit(lease.slot, lease.token) is model.admit(lease)
            op = "check"
        if op == "restart":
            await client.redis.flushdb()  # what a restart without persistence leaves
            model.restart_empty()
        elif op == "heartbeat":
            worker_id = sorted(workers)[arg % len(workers)]
            await registrations[worker_id].heartbeat()
            model.heartbeat(worker_id)
        elif op == "claim":
            lease = await leases.claim(arg, ttl_ms=600_000)
            expected = model.claim(arg)
            got = None if lease is None else (lease.worker_id, lease.slot, lease.token)
            assert got == expected, f"claim({arg}) gave {got}, model says {expected}"
            if lease is not None:
                holders.append(lease)
        elif op == "check" or not holders:
            pass
        elif op == "release":
            lease = holders[-1 - arg % len(holders)]
            assert await leases.release(lease) == model.release(lease)
        elif op == "renew":
            lease = holders[-1 - arg % len(holders)]
            assert await leases.renew(lease) is model.renew(lease)
        elif op == "expire":
            lease = holders[-1 - arg % len(holders)]
            where = (lease.worker_id, lease.slot)
            if where in model.held:
                await expire_lease(client, *where)
                del model.held[where]
        elif op == "validate":
            lease = holders[-1 - arg % len(holders)]
            expected_valid = model.held.get((lease.worker_id, lease.slot)) == lease.token
            assert await leases.validate(lease.worker_id, lease.slot, lease.token) == expected_valid
        elif op == "admit":
            lease = holders[-1 - arg % len(holders)]
            assert await registrations[lease.worker_id].admit(lease.slot, lease.token) is model.admit(lease)
        elif op == "end":
            if model.live:
                where = sorted(model.live)[arg % len(model.live)]
                ended = model.end_session(where)
                assert await leases.release(ended) == model.release(ended)
        elif op == "drain":  # announced with a heartbeat
            worker_id = sorted(workers)[arg % len(workers)]
            if worker_id in model.draining:
                model.draining.discard(worker_id)
                await registrations[worker_id].set_state("ready")
            else:
                model.draining.add(worker_id)
                await registrations[worker_id].drain()
            model.heartbeat(worker_id)

        # the lease keys are exactly the model's: one token per slot, no ghost, none missing
        in_redis = {key: int(value.partition("|")[0]) for key, value in (await lease_keys(client)).items()}
        assert in_redis == {client.keys.lease(*where): token for where, token in model.held.items()}
        assert int(await client.redis.get(client.keys.fence) or 0) == model.fence
        # and the free-slot index counts exactly those as busy
        now_ms = (await client.redis.time())[0] * 1000
        for worker_id in workers:
            busy = await client.redis.zrangebyscore(client.keys.held(worker_id), now_ms, "+inf")
            assert sorted(int(slot) for slot in busy) == sorted(s for w, s in model.held if w == worker_id)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(workers=workers_strategy, ops=st.lists(op_strategy, min_size=1, max_size=60))
def test_pool_matches_the_model(redis_server, workers, ops):
    async def main() -> None:
        async with connect(redis_server.url, prefix="prop:") as client:
            await run_against_model(client, workers, ops)

    asyncio.run(main())


class History:
    """Per slot, the tokens issued, stamped with a logical clock of the event loop."""

    def __init__(self) -> None:
        self.clock = 0
        self.claims: dict[tuple[str, int], list[tuple[int, int]]] = {}  # slot -> [(returned at, token)]

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def claimed(self, lease: Lease) -> None:
        self.claims.setdefault((lease.worker_id, lease.slot), []).append((self.tick(), lease.token))

    def newer_claim_before(self, lease: Lease, sent_at: int) -> int | None:
        """A token newer than ``lease``'s for its slot whose claim had returned before ``sent_at``."""
        for returned_at, token in self.claims.get((lease.worker_id, lease.slot), []):
            if returned_at < sent_at and token > lease.token:
                return token
        return None


async def race(
    clients: list[PoolClient], claimers: int, rounds: int, ttl_ms: int, stall_every: int, seed: int
) -> tuple[int, History]:
    history = History()
    occupied: dict[tuple[str, int], int] = {}  # for claimers that never stall: slot -> token
    claims = 0

    async def claimer(index: int) -> None:
        nonlocal claims
        rng = random.Random(seed * 1000 + index)
        leases = SlotLeases(clients[index % len(clients)])
        for round_ in range(rounds):
            lease = await leases.claim(ttl_ms=ttl_ms, owner=f"c{index}")
            if lease is None:
                await asyncio.sleep(rng.random() * 0.002)
                continue
            claims += 1
            where = (lease.worker_id, lease.slot)
            history.claimed(lease)
            stalls = stall_every and (index + round_) % stall_every == 0
            if not stall_every:
                assert where not in occupied, f"{where} given to token {lease.token} while {occupied[where]} holds it"
                occupied[where] = lease.token
            for _ in range(rng.randint(0, 3)):
                await asyncio.sleep(rng.random() * 0.003)
                sent_at = history.tick()
                result = await leases.renew(lease)
                if result is not RenewResult.LOST:
                    newer = history.newer_claim_before(lease, sent_at)
                    assert newer is None, f"{where}: token {lease.token} renewed after {newer} was issued"
                elif not stall_every:
                    raise AssertionError(f"{where}: lease {lease.token} lost although nothing expired")
            if stalls:  # a gateway that hangs past its TTL, then comes back
                await asyncio.sleep(ttl_ms / 1000 * 1.5)
                sent_at = history.tick()
                result = await leases.renew(lease)
                if result is not RenewResult.LOST:
                    assert history.newer_claim_before(lease, sent_at) is None
                else:
                    assert not await leases.validate(lease.worker_id, lease.slot, lease.token)
                    assert not await leases.release(lease)
                    continue
            if not stall_every:
                del occupied[where]
            released = await leases.release(lease)
            assert released or stall_every, f"{where}: release of {lease.token} refused"
            # and now the token is stale everywhere
            assert await leases.renew(lease) is RenewResult.LOST
            assert not await leases.validate(lease.worker_id, lease.slot, lease.token)

    async with asyncio.TaskGroup() as group:
        for i in range(claimers):
            group.create_task(claimer(i))
    return claims, history


@pytest.fixture
async def pool_clients(redis_server):
    clients = [connect(redis_server.url, prefix="race:") for _ in range(6)]
    for i in range(4):
        await WorkerRegistration(clients[0], worker(f"w{i}", capacity=6), interval=60).heartbeat()
    yield clients
    for client in clients:
        await client.close()


async def check_clean_afterwards(client: PoolClient, slots: int) -> None:
    assert await lease_keys(client) == {}  # no ghost lease left behind
    leases = SlotLeases(client)
    refill = [await leases.claim(ttl_ms=60_000) for _ in range(slots)]
    assert all(refill) and len({(x.worker_id, x.slot) for x in refill}) == slots  # no stuck slot
    assert await leases.claim() is None


async def test_concurrent_claimers_never_share_a_slot(pool_clients):
    claims, history = await race(pool_clients, claimers=48, rounds=12, ttl_ms=60_000, stall_every=0, seed=1)
    assert claims > 100
    tokens = [token for issued in history.claims.values() for _, token in issued]
    assert len(tokens) == len(set(tokens)) == claims
    await check_clean_afterwards(pool_clients[0], 24)


async def test_concurrent_claimers_with_expiring_leases_never_share_a_slot(pool_clients):
    claims, history = await race(pool_clients, claimers=40, rounds=8, ttl_ms=150, stall_every=3, seed=2)
    assert claims > 50
    # every stalled lease that was not taken over has been released or has run out by now
    await eventually(lambda: _no_leases(pool_clients[0]), timeout=10, what="leases gone")
    await check_clean_afterwards(pool_clients[0], 24)


async def _no_leases(client: PoolClient) -> bool:
    return await lease_keys(client) == {}
