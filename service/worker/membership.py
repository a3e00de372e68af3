"""The worker's membership of the Redis pool: registration, heartbeats, fenced admission.

Once the model is warm the worker registers (address, model, capacity, licence) and
heartbeats; every session's ``start`` must present the slot's current lease token, or it
is refused with 4003. Each heartbeat also re-asserts the lease of every session in progress
(so a Redis that restarted empty cannot give a live call's slot away). When a session ends the worker releases its lease at once
(compare-and-delete on the token), so a gateway that died gives its slots back as its
sockets drop instead of after the lease TTL. Draining is announced in the registry, so
gateways stop claiming this worker's slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import typing as tp

from service.pool import (
    DRAINING,
    OVERLOADED,
    READY,
    Admission,
    Lease,
    LiveSession,
    PoolClient,
    PoolError,
    SlotLeases,
    WorkerInfo,
    WorkerRegistration,
    connect,
)
from service.settings import WorkerSettings
from service.worker.runtime import WorkerRuntime

log = logging.getLogger(__name__)

RELEASE_RETRY_SECONDS = 60.0  # a session's lease release is retried this long if Redis refuses it


def default_advertise_url(host: str, port: int) -> str:
    """ws://<an address gateways can reach>:<port>: the bind address unless it is a wildcard."""
    if host in ("0.0.0.0", "::", ""):
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect(("192.0.2.1", 9))  # no packet is sent; picks the outbound address
                host = probe.getsockname()[0]
        except OSError:
            host = "127.0.0.1"
    return f"ws://[{host}]:{port}" if ":" in host else f"ws://{host}:{port}"


class PoolMembership:
    """Registers a ready worker in the pool and checks the leases of its sessions."""

    def __init__(self, settings: WorkerSettings, runtime: WorkerRuntime, port: int) -> None:
        assert settings.redis_url
        self.settings = settings
        self.runtime = runtime
        self.url = settings.advertise_url or default_advertise_url(settings.host, port)
        self.worker_id = settings.worker_id or f"{socket.gethostname()}-{port}"
        self.client: PoolClient = connect(settings.redis_url)
        self.client.retries.listeners.append(self._count_retry)
        self.leases = SlotLeases(self.client)
        self.registration: WorkerRegistration | None = None
        self._created = asyncio.Event()  # the registration exists (the model is warm)
        self._task: asyncio.Task | None = None
        self._releases: set[asyncio.Task] = set()

    async def validate(self, slot: int, token: int | None, call_id: str) -> bool:
        """The token validator of the worker's slot table."""
        registration = self.registration
        if token is None or registration is None:
            return False
        try:
            verdict = await registration.admit(slot, token)
        except PoolError as exc:
            log.warning("cannot check the lease of %s (slot %d): %s", call_id, slot, exc)
            return False
        if verdict is not Admission.ADMITTED:
            log.info("session %s refused on slot %d: token %d %s", call_id, slot, token, verdict.value)
        return verdict is Admission.ADMITTED

    def start(self) -> None:
        self.runtime.on_slot_released = self._on_slot_released
        self.runtime.on_overload = self._on_overload
        self._task = asyncio.create_task(self._register_when_ready(), name="pool-membership")

    async def _register_when_ready(self) -> None:
        await self.runtime.ready_event.wait()
        if self.runtime.error is not None or self.runtime.table is None:
            return
        info = self.runtime.info
        sizing = self.runtime.sizing
        self.registration = WorkerRegistration(
            self.client,
            WorkerInfo(
                worker_id=self.worker_id,
                url=self.url,
                model=info.model,
                capacity=self.runtime.table.size,
                license=info.license,
                started_at=time.time(),
                slots_reason=sizing.reason if sizing else "",
                memory_slots=sizing.memory_slots if sizing else None,
                step_budget_ms=self.settings.step_budget_ms,
                warmup_p50_ms=_rounded(sizing.p50_ms) if sizing else None,
                warmup_p99_ms=_rounded(sizing.p99_ms) if sizing else None,
                context_seconds=info.context_seconds,
            ),
            interval=self.settings.heartbeat_seconds,
            live=self._live_fields,
            sessions=self._live_sessions,
        )
        self.registration.state = self._state()
        self._created.set()
        if await self.registration.start():
            log.info("in the pool as %s at %s", self.worker_id, self.url)
        else:
            log.error(
                "not in the pool: Redis at %s does not answer; %s registers as soon as it does",
                self.client.location,
                self.worker_id,
            )

    async def wait_registered(self) -> None:
        """Returns once this worker is in the pool (a heartbeat reached Redis)."""
        await self._created.wait()
        assert self.registration is not None
        await self.registration.joined.wait()

    def _state(self) -> str:
        if self.runtime.state == "draining":
            return DRAINING
        return OVERLOADED if self.runtime.overloaded else READY

    def _live_fields(self) -> dict[str, tp.Any]:
        watch = self.runtime.watch
        return {"step_p99_ms": _rounded(watch.p99_ms) if watch is not None else None}

    def _live_sessions(self) -> list[LiveSession]:
        """The sessions this worker serves, for their leases to be re-asserted with each heartbeat."""
        table = self.runtime.table
        if table is None:
            return []
        live = []
        for slot, session in list(self.runtime.sessions.items()):
            token = table.token(slot)
            if token is not None:
                live.append(LiveSession(slot, token, session.call_id))
        return live

    def _count_retry(self, operation: str, event: str) -> None:
        metrics = self.runtime.metrics
        if event == "retried":
            metrics.redis_write_retries.labels(operation).inc()
        elif event == "abandoned":
            metrics.redis_writes_abandoned.labels(operation).inc()

    def _on_overload(self, overloaded: bool) -> None:
        """Announce at once: gateways stop (or resume) claiming this worker's slots."""
        registration = self.registration
        if registration is None or registration.state == DRAINING:
            return
        task = asyncio.create_task(registration.set_state(self._state()))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    def _on_slot_released(self, slot: int, token: int | None) -> None:
        registration = self.registration
        if registration is None:
            return
        if self.runtime.table is not None:
            registration.report_free(self.runtime.table.free)
        if token is None:
            return
        lease = Lease(
            worker_id=self.worker_id, url=self.url, slot=slot, token=token, model="", ttl_ms=1, owner="", expires_at=0.0
        )
        self.leases.release_eventually(lease, give_up_after=RELEASE_RETRY_SECONDS)

    async def drain(self) -> None:
        """Announce draining: gateways claim no more of this worker's slots."""
        if self.registration is not None:
            await self.registration.drain()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._releases:
            await asyncio.wait(list(self._releases), timeout=2)
        if self.registration is not None:
            await self.registration.stop()
        with contextlib.suppress(Exception):
            await self.client.close()


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
