"""The pool as the API shows it (workers, slots, leases) and draining a worker.

With a pool the workers come from the Redis registry; without one, the single configured
worker describes itself on its ``/v1/info``; the in-gateway echo has no slots at all.
"""

from __future__ import annotations

import logging
import typing as tp
from urllib.parse import urlsplit

import httpx

from service.api.control import ControlError
from service.api.models import DrainResult, PoolState, SlotState, WorkerState
from service.gateway.control.directory import redis_failed
from service.gateway.routing.loopback import LOOPBACK_URL
from service.pool import MODEL_ROLE, OVERLOADED, READY, PoolError, RegistryReader, WorkerStatus
from service.wire import authorization

log = logging.getLogger("moshimoshi.api")

WORKER_HTTP_TIMEOUT = 3.0


def http_base(url: str) -> str:
    """A worker's HTTP base from its WebSocket URL: ws://h:p/... → http://h:p."""
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return f"{scheme}://{parts.netloc}"


def worker_state(worker: WorkerStatus) -> WorkerState:
    leases = {lease.slot: lease for lease in worker.leases}
    slots = []
    for slot in range(worker.capacity):
        lease = leases.get(slot)
        if lease is None:
            slots.append(SlotState(slot=slot, state="free"))
        else:
            slots.append(
                SlotState(
                    slot=slot, state="leased", call_id=lease.owner or None, token=lease.token, ttl_ms=lease.ttl_ms
                )
            )
    return WorkerState(
        worker_id=worker.worker_id,
        url=worker.url,
        http_url=http_base(worker.url) if worker.url else "",
        model=worker.model,
        license=worker.license,
        version=worker.version,
        state=worker.state,
        alive=worker.alive,
        capacity=worker.capacity,
        busy_slots=len(worker.leases),
        free_slots=worker.free_slots if worker.alive else 0,
        last_seen=worker.last_seen,
        started_at=worker.started_at,
        slots_reason=worker.slots_reason,
        memory_slots=worker.memory_slots,
        step_budget_ms=worker.step_budget_ms,
        warmup_p50_ms=worker.warmup_p50_ms,
        warmup_p99_ms=worker.warmup_p99_ms,
        step_p99_ms=worker.step_p99_ms,
        context_seconds=worker.context_seconds,
        slots=slots,
        role=worker.role,
        sessions=worker.sessions,
        free_sessions=(worker.reported_free or 0) if worker.alive and worker.role != MODEL_ROLE else 0,
    )


def _loopback(busy: int) -> PoolState:
    """``--worker-url echo:``: calls are echoed inside the gateway; no slot limit."""
    worker = WorkerState(
        worker_id="loopback",
        url=LOOPBACK_URL,
        model="echo",
        license="n/a (loopback)",
        state=READY,
        alive=True,
        busy_slots=busy,
    )
    return PoolState(mode="loopback", workers=[worker], workers_ready=1, slots_total=0, slots_busy=busy, slots_free=0)


async def _single_worker(url: str, secret: str | None) -> PoolState:
    """Without a pool: the one configured worker, as its /v1/info describes it."""
    worker = WorkerState(worker_id=url, url=url, http_url=http_base(url), alive=False)
    try:
        async with httpx.AsyncClient(timeout=WORKER_HTTP_TIMEOUT, headers=authorization(secret)) as client:
            info = (await client.get(worker.http_url + "/v1/info")).json()
        worker.alive = True
        worker.state = str(info.get("state", ""))
        if worker.state == READY and info.get("overloaded"):
            worker.state = OVERLOADED
        worker.model = str(info.get("model", ""))
        worker.license = str(info.get("license", ""))
        worker.capacity = int(info.get("slots") or 0)
        worker.busy_slots = int(info.get("busy") or 0)
        worker.free_slots = int(info.get("free") or 0)
        worker.slots = [SlotState(slot=i, state="unknown") for i in range(worker.capacity)]
        _sizing_from_info(worker, info)
    except (httpx.HTTPError, ValueError, TypeError, AttributeError) as exc:
        log.info("worker %s: no /v1/info (%s)", url, exc)
    ready = worker.alive and worker.state == READY
    return PoolState(
        mode="single-worker",
        workers=[worker],
        workers_ready=int(ready),
        slots_total=worker.capacity if ready else 0,
        slots_busy=worker.busy_slots,
        slots_free=worker.free_slots if ready else 0,
    )


def _number(value: tp.Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _sizing_from_info(worker: WorkerState, info: dict) -> None:
    """The sizing figures of a worker's /v1/info (no pool: nothing in Redis to read them from)."""
    sizing = info.get("sizing")
    sizing = sizing if isinstance(sizing, dict) else {}
    worker.slots_reason = str(sizing.get("reason") or "")
    memory = _number(sizing.get("memory_slots"))
    worker.memory_slots = int(memory) if memory is not None else None
    worker.warmup_p50_ms = _number(sizing.get("p50_ms"))
    worker.warmup_p99_ms = _number(sizing.get("p99_ms"))
    worker.step_budget_ms = _number(info.get("step_budget_ms"))
    worker.step_p99_ms = _number(info.get("step_p99_ms"))
    model_info = info.get("model_info")
    model_info = model_info if isinstance(model_info, dict) else {}
    worker.context_seconds = _number(model_info.get("context_seconds"))


class PoolView:
    """The pool as the API shows it, and draining a worker (see the module docstring)."""

    def __init__(
        self,
        registry: RegistryReader | None,
        *,
        worker_url: str | None,
        worker_secret: str | None,
        live_calls: tp.Callable[[], int],
    ) -> None:
        self.registry = registry
        self.worker_url = worker_url or ""
        self.worker_secret = worker_secret
        self.live_calls = live_calls

    async def state(self) -> PoolState:
        """Every worker seen recently (live, or dead and not yet forgotten) with each slot's
        lease: the call holding it, its fencing token and the time left on it."""
        if self.registry is None:
            if self.worker_url == LOOPBACK_URL:
                return _loopback(self.live_calls())
            return await _single_worker(self.worker_url, self.worker_secret)
        try:
            workers = await self.registry.workers()
        except PoolError:
            redis_failed()
            raise ControlError(503, "the pool is unavailable (Redis unreachable)") from None
        states = [worker_state(w) for w in workers]
        ready = [w for w in states if w.alive and w.state == READY and w.role == MODEL_ROLE]
        total = sum(w.capacity for w in ready)
        busy = sum(w.busy_slots for w in states if w.alive)
        return PoolState(
            mode="pool",
            workers=states,
            workers_ready=len(ready),
            slots_total=total,
            slots_busy=busy,
            slots_free=sum(w.free_slots for w in ready),
        )

    async def drain(self, worker_id: str) -> DrainResult:
        """Ask a worker to drain, as its SIGTERM would (its own ``POST /v1/drain``)."""
        if self.registry is None:
            url = self.worker_url
            if worker_id != url or url == LOOPBACK_URL:
                raise ControlError(404, f"no worker {worker_id!r}")
        else:
            try:
                workers = await self.registry.workers()
            except PoolError:
                redis_failed()
                raise ControlError(503, "the pool is unavailable (Redis unreachable)") from None
            found = next((w for w in workers if w.worker_id == worker_id and w.alive), None)
            if found is None:
                raise ControlError(404, f"no live worker {worker_id!r}")
            url = found.url
        target = http_base(url) + "/v1/drain"
        try:
            async with httpx.AsyncClient(
                timeout=WORKER_HTTP_TIMEOUT, headers=authorization(self.worker_secret)
            ) as client:
                response = await client.post(target)
            answer = response.json() if response.content else {}
        except (httpx.HTTPError, ValueError) as exc:
            raise ControlError(502, f"worker {worker_id} did not answer at {target}: {exc}") from None
        log.info("worker %s: drain requested through the API (worker answered %d)", worker_id, response.status_code)
        return DrainResult(
            worker_id=worker_id,
            status=response.status_code,
            answer=answer if isinstance(answer, dict) else {"answer": answer},
        )
