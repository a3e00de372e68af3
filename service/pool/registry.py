"""The worker registry: workers announce themselves and heartbeat; anyone can list them.

A worker's registration is a hash whose TTL is ``ttl_factor`` (3) heartbeat intervals, so
a worker that dies or is cut off from Redis disappears from claims within three intervals.
Every heartbeat re-asserts the whole registration (a Redis that restarted empty is
repopulated at once), carries the highest fencing token the worker has seen, and re-asserts
the lease of every session the worker serves, in the same atomic step (lua/register.lua):
a worker becomes claimable again only with its live slots already taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import typing as tp
from dataclasses import dataclass, field

from service import __version__
from service.pool.connection import PoolClient, PoolError
from service.pool.fencing import Admission, SlotFence
from service.pool.keys import check_id, check_model
from service.pool.leases import BOOKKEEPING_TTL_MS, SlotLeases, parse_lease_value

log = logging.getLogger(__name__)

READY = "ready"
DRAINING = "draining"
OVERLOADED = "overloaded"  # its step p99 is over budget: no new claims until it recovers
STATES = (READY, DRAINING, OVERLOADED)
MODEL_ROLE = "model"  # a Moshi worker: B slots, claimed through fenced leases
ASR_ROLE = "asr"  # an ASR worker: call sessions without slots (never claimed)
ROLES = (MODEL_ROLE, ASR_ROLE)
MAX_CAPACITY = 1024
DEFAULT_HEARTBEAT_SECONDS = 1.0
DEFAULT_FORGET_AFTER_SECONDS = 600.0


@dataclass
class WorkerInfo:
    """What a worker registers: who it is, where to reach it, what it serves.

    ``role`` is ``model`` (B slots, leased to calls) or ``asr`` (``capacity`` call sessions,
    not leased). An ASR worker's hash says ``capacity`` 0 and its sessions in ``sessions``,
    so that no claim, not even one by a gateway that predates roles, picks it; a
    registration without a ``role`` (an older worker) is a model worker."""

    worker_id: str
    url: str  # ws:// URL gateways use to reach the worker
    model: str
    capacity: int  # model: B slots, numbered 0..B-1; asr: concurrent sessions
    license: str = ""
    version: str = __version__
    started_at: float = field(default_factory=time.time)
    # How B was chosen (service.worker.sizing), for the pool view; None where not measured.
    slots_reason: str = ""
    memory_slots: int | None = None
    step_budget_ms: float | None = None
    warmup_p50_ms: float | None = None
    warmup_p99_ms: float | None = None
    context_seconds: float | None = None
    role: str = MODEL_ROLE

    def __post_init__(self) -> None:
        check_id("worker_id", self.worker_id)
        check_model(self.model)
        if not self.url:
            raise ValueError("url must not be empty")
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if not 1 <= self.capacity <= MAX_CAPACITY:
            raise ValueError(f"capacity must be between 1 and {MAX_CAPACITY}, got {self.capacity}")

    @property
    def slots(self) -> int:
        """Slots that leases may claim: none on an ASR worker."""
        return self.capacity if self.role == MODEL_ROLE else 0


class LiveSession(tp.NamedTuple):
    """A session the worker serves: its slot, the token it was admitted with, its owner (call id)."""

    slot: int
    token: int
    owner: str


class WorkerRegistration:
    """One worker's presence in the pool: heartbeats, state, and admission of sessions.

    ``start()`` registers and heartbeats every ``interval`` seconds until ``stop()``, which
    deregisters. ``admit(slot, token)`` is the check a worker runs on each session's
    ``start`` message. Redis outages are ridden out: heartbeats keep trying and re-register
    the worker as soon as Redis answers again. ``sessions()`` lists the sessions the worker
    serves: each heartbeat keeps their leases for at least the registration's TTL and
    re-creates any that Redis lost, before the worker is claimable.
    """

    def __init__(
        self,
        client: PoolClient,
        info: WorkerInfo,
        *,
        interval: float = DEFAULT_HEARTBEAT_SECONDS,
        ttl_factor: float = 3.0,
        forget_after: float = DEFAULT_FORGET_AFTER_SECONDS,
        live: tp.Callable[[], dict[str, tp.Any]] | None = None,
        sessions: tp.Callable[[], tp.Iterable[LiveSession]] | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        if ttl_factor < 1.5:
            raise ValueError("ttl_factor must be at least 1.5 (the key would expire between heartbeats)")
        self.client = client
        self.info = info
        self.interval = interval
        self.ttl_ms = max(1, round(interval * ttl_factor * 1000))
        self.forget_after_ms = max(self.ttl_ms, round(forget_after * 1000))
        self.state = READY
        self.free_slots = info.capacity
        self.live = live  # figures that change (e.g. step_p99_ms), read at each heartbeat
        self.sessions = sessions
        self.fence = SlotFence(info.capacity)
        self.leases = SlotLeases(client)
        self.heartbeats = 0
        self.heartbeat_failures = 0
        self.leases_recreated = 0  # live sessions' leases put back after Redis lost them
        self.lease_conflicts = 0  # live sessions whose slot another token holds or has held
        self.registered = False  # whether the last heartbeat reached Redis
        self.joined = asyncio.Event()  # set while registered (for whoever waits to be in the pool)
        self._task: asyncio.Task | None = None
        self._stopping = False

    def _fields(self) -> list[tp.Any]:
        info = self.info
        pairs = {
            "worker_id": info.worker_id,
            "url": info.url,
            "model": info.model,
            "capacity": info.slots,
            "free_slots": self.free_slots,
            "state": self.state,
            "license": info.license,
            "version": info.version,
            "started_at": repr(info.started_at),
            "highest_token": self.fence.highest,
            "slots_reason": info.slots_reason,
            "memory_slots": info.memory_slots,
            "step_budget_ms": info.step_budget_ms,
            "warmup_p50_ms": info.warmup_p50_ms,
            "warmup_p99_ms": info.warmup_p99_ms,
            "context_seconds": info.context_seconds,
            "role": info.role,
        }
        if info.role != MODEL_ROLE:
            pairs["sessions"] = info.capacity
        if self.live is not None:
            pairs.update({key: value for key, value in self.live().items() if key not in pairs})
        return [item for pair in pairs.items() if pair[1] is not None for item in pair]

    def _live_sessions(self) -> list[tp.Any]:
        flat: list[tp.Any] = []
        for session in self.sessions() if self.sessions is not None else ():
            if self.fence.has_slot(session.slot) and session.token > 0:
                flat += [session.slot, session.token, session.owner]
        return flat

    async def heartbeat(self) -> int:
        """Register (or refresh) now, re-asserting the live sessions' leases; returns the
        fencing counter. Raises PoolUnavailable."""
        keys = self.client.keys
        sessions = self._live_sessions()
        async with self.client.guard("heartbeat"):
            fence, recreated, _kept, conflicts = await self.client.script("register")(
                keys=[keys.workers, keys.worker(self.info.worker_id), keys.fence],
                args=[
                    self.info.worker_id,
                    self.ttl_ms,
                    self.fence.highest,
                    self.forget_after_ms,
                    keys.prefix,
                    self.ttl_ms,
                    BOOKKEEPING_TTL_MS,
                    len(sessions) // 3,
                    *sessions,
                    *self._fields(),
                ],
            )
        if recreated:
            self.leases_recreated += int(recreated)
            log.warning(
                "worker %s: re-created %d lease(s) of live sessions that Redis had lost",
                self.info.worker_id,
                int(recreated),
            )
        self.lease_conflicts += int(conflicts)
        self.heartbeats += 1
        if not self.registered:
            log.info(
                "%s worker %s registered (%s, %d %s, %s)",
                self.info.role,
                self.info.worker_id,
                self.info.model,
                self.info.capacity,
                "slots" if self.info.role == MODEL_ROLE else "sessions",
                self.state,
            )
        self.registered = True
        self.joined.set()
        return int(fence)

    async def start(self) -> bool:
        """Register and start heartbeating; False if Redis did not answer yet (the
        heartbeats keep trying)."""
        if self._task is not None:
            raise RuntimeError("registration already started")
        self._stopping = False
        ok = await self._beat()
        self._task = asyncio.create_task(self._run(), name=f"heartbeat-{self.info.worker_id}")
        return ok

    async def _beat(self) -> bool:
        try:
            await self.heartbeat()
            return True
        except PoolError as exc:
            self.heartbeat_failures += 1
            if self.registered:
                log.error(
                    "worker %s is out of the pool until Redis answers again (heartbeat failed: %s)",
                    self.info.worker_id,
                    exc,
                )
            self.registered = False
            self.joined.clear()
            return False

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time() + self.interval
        while not self._stopping:  # the flag as well as the cancel: see LeaseHolder._run
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            if self._stopping:
                return
            await self._beat()
            next_at = max(next_at + self.interval, loop.time())

    def report_free(self, free_slots: int) -> None:
        """The worker's own count of idle slots, sent with the next heartbeat (for display;
        claims count lease keys)."""
        self.free_slots = max(0, min(self.info.capacity, free_slots))

    async def set_state(self, state: str) -> None:
        """``ready``, ``draining`` or ``overloaded`` (both take no new claims); announced at
        once if Redis answers."""
        if state not in STATES:
            raise ValueError(f"state must be one of {', '.join(STATES)}")
        self.state = state
        await self._beat()

    async def drain(self) -> None:
        await self.set_state(DRAINING)

    async def admit(self, slot: int, token: int) -> Admission:
        """May a session with this (slot, token) start? Checks the slot, this worker's own
        highest admitted token, then the lease in Redis. Raises PoolUnavailable."""
        if not self.fence.has_slot(slot):
            return Admission.BAD_SLOT
        self.fence.observe(token)
        if self.fence.is_stale(slot, token):
            self.fence.refused_stale += 1
            return Admission.STALE
        if not await self.leases.validate(self.info.worker_id, slot, token):
            return Admission.NOT_LEASED
        if not self.fence.admit(slot, token):  # a newer token was admitted while we asked Redis
            return Admission.STALE
        return Admission.ADMITTED

    async def stop(self, *, deregister: bool = True) -> None:
        """Stop heartbeating and (by default) remove the registration at once."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
            self._task = None
        if not deregister:
            return
        keys = self.client.keys
        try:
            async with self.client.guard("deregister"):
                async with self.client.redis.pipeline(transaction=True) as pipe:
                    pipe.delete(keys.worker(self.info.worker_id))
                    pipe.zrem(keys.workers, self.info.worker_id)
                    await pipe.execute()
            self.registered = False
        except PoolError as exc:
            log.warning("worker %s not deregistered (its registration expires): %s", self.info.worker_id, exc)

    async def __aenter__(self) -> WorkerRegistration:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


@dataclass
class SlotLease:
    """One held slot as the registry reader sees it."""

    slot: int
    token: int
    owner: str
    ttl_ms: int  # remaining


@dataclass
class WorkerStatus:
    """A worker as listed by the registry reader."""

    worker_id: str
    alive: bool  # its registration has not expired
    last_seen: float  # wall clock of the last heartbeat (Redis clock)
    url: str = ""
    model: str = ""
    capacity: int = 0
    state: str = ""
    license: str = ""
    version: str = ""
    started_at: float | None = None
    reported_free: int | None = None  # the worker's own count (of free sessions, for ASR)
    free_slots: int = 0  # capacity minus lease keys: what claims see
    highest_token: int = 0
    leases: list[SlotLease] = field(default_factory=list)
    slots_reason: str = ""
    memory_slots: int | None = None
    step_budget_ms: float | None = None
    warmup_p50_ms: float | None = None
    warmup_p99_ms: float | None = None
    step_p99_ms: float | None = None  # over the worker's last minute, as of its last heartbeat
    context_seconds: float | None = None
    role: str = MODEL_ROLE
    sessions: int = 0  # an ASR worker's session capacity (0 for model workers)

    def to_dict(self) -> dict[str, tp.Any]:
        return dataclasses.asdict(self)


class RegistryReader:
    """Lists registered workers, live and recently dead, with their slots' leases."""

    def __init__(self, client: PoolClient) -> None:
        self.client = client
        self.keys = client.keys

    async def workers(self) -> list[WorkerStatus]:
        """Every worker seen recently, sorted by id: alive or not, and for live ones the
        lease on each held slot."""
        redis = self.client.redis
        async with self.client.guard("list workers"):
            members = tp.cast(
                list[tuple[str, float]],  # decoded replies
                await redis.zrange(self.keys.workers, 0, -1, withscores=True),
            )
            ids = sorted((str(member), float(score)) for member, score in members)
            async with redis.pipeline(transaction=False) as pipe:
                for worker_id, _ in ids:
                    pipe.hgetall(self.keys.worker(worker_id))
                registrations = await pipe.execute()
            statuses = [
                self._status(worker_id, score, reg) for (worker_id, score), reg in zip(ids, registrations, strict=True)
            ]
            live = [s for s in statuses if s.alive and s.capacity > 0]
            async with redis.pipeline(transaction=False) as pipe:
                for status in live:
                    for slot in range(status.capacity):
                        key = self.keys.lease(status.worker_id, slot)
                        pipe.get(key)
                        pipe.pttl(key)
                replies = await pipe.execute()
        position = 0
        for status in live:
            for slot in range(status.capacity):
                parsed = parse_lease_value(replies[position])
                ttl = replies[position + 1]
                position += 2
                if parsed is not None:
                    status.leases.append(SlotLease(slot, parsed[0], parsed[1], max(0, int(ttl))))
            status.free_slots = status.capacity - len(status.leases)
        return statuses

    @staticmethod
    def _status(worker_id: str, score: float, reg: dict[str, str]) -> WorkerStatus:
        status = WorkerStatus(worker_id=worker_id, alive=bool(reg), last_seen=score / 1000)
        if not reg:
            return status

        def number(name: str, kind: tp.Callable[[str], tp.Any]) -> tp.Any:
            with contextlib.suppress(KeyError, ValueError):
                return kind(reg[name])
            return None

        status.url = reg.get("url", "")
        status.model = reg.get("model", "")
        status.capacity = number("capacity", int) or 0
        status.state = reg.get("state", "")
        status.license = reg.get("license", "")
        status.version = reg.get("version", "")
        status.started_at = number("started_at", float)
        status.reported_free = number("free_slots", int)
        status.highest_token = number("highest_token", int) or 0
        status.slots_reason = reg.get("slots_reason", "")
        status.memory_slots = number("memory_slots", int)
        for name in ("step_budget_ms", "warmup_p50_ms", "warmup_p99_ms", "step_p99_ms", "context_seconds"):
            setattr(status, name, number(name, float))
        status.role = reg.get("role") or MODEL_ROLE
        status.sessions = number("sessions", int) or 0
        last_seen_ms = number("last_seen_ms", int)
        if last_seen_ms is not None:
            status.last_seen = last_seen_ms / 1000
        return status

    async def fence(self) -> int:
        """The fencing counter: the last token issued."""
        async with self.client.guard("read fence"):
            value = await self.client.redis.get(self.keys.fence)
        return int(value or 0)
