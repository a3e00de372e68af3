"""Whether the pool can take calls: Redis writable, model workers ready. Checked every second.

The check writes (a full or read-only Redis takes no calls) and reads the registry; it
also exports the pool's slots and workers as gauges. Without a pool the router's own
readiness stands in (a single worker, or the in-gateway echo).
"""

from __future__ import annotations

import asyncio
import logging
import typing as tp

from service.gateway import metrics
from service.gateway.routing.router import Router
from service.pool import DRAINING, MODEL_ROLE, OVERLOADED, READY, PoolClient, PoolError, RegistryReader

log = logging.getLogger("moshimoshi.gateway")

REFRESH_SECONDS = 1.0


class PoolWatch:
    """``workers_ready`` and ``redis_ok`` as of the last check (see the module docstring)."""

    def __init__(
        self,
        router: Router,
        pool: PoolClient | None,
        registry: RegistryReader | None,
        *,
        model: str | None,
        gateway_id: str,
        accepting: tp.Callable[[], bool],
    ) -> None:
        self.router = router
        self.pool = pool
        self.registry = registry
        self.model = model
        self.gateway_id = gateway_id
        self.accepting = accepting  # the gateway's whole answer (draining included), for the gauge
        self.workers_ready = 0
        self.redis_ok: bool | None = True if pool is None else None  # None: not checked yet
        # told (count, their models) when workers become ready, and (0, []) when none is left
        self.on_workers: tp.Callable[[int, list[str]], None] | None = None
        # told (calls holding a slot, capacity of ready workers) at each check; without a pool,
        # ``live_calls`` (this gateway's calls) stands for the calls
        self.on_sample: tp.Callable[[int, int], None] | None = None
        self.live_calls: tp.Callable[[], int] = lambda: 0

    def _workers(self, ready: int, models: list[str]) -> None:
        was = self.workers_ready
        self.workers_ready = ready
        if bool(ready) != bool(was) and self.on_workers is not None:
            self.on_workers(ready, models)

    async def run(self) -> None:
        while True:
            await self.refresh_once()
            await asyncio.sleep(REFRESH_SECONDS)

    async def refresh_once(self) -> None:
        if self.registry is None or self.pool is None:
            self._workers(1 if self.router.ready() else 0, [self.model or "echo"])
            if self.on_sample is not None:
                self.on_sample(self.live_calls(), 0)
            metrics.READY.set(1 if self.accepting() else 0)
            return
        try:
            # a write, not just a read: a full (maxmemory) or read-only Redis takes no calls
            await self.pool.check_writable(self.gateway_id)
            workers = await self.registry.workers()
        except PoolError as exc:
            if self.redis_ok is not False:
                log.error("Redis unreachable: new calls are refused (503) until it is back (%s)", exc)
            self.redis_ok = False
            metrics.REDIS_ERRORS.labels("registry").inc()
            metrics.READY.set(0)
            return
        if self.redis_ok is False:
            log.info("Redis is back: new calls are taken again")
        self.redis_ok = True
        live = [w for w in workers if w.alive and w.role == MODEL_ROLE]  # ASR workers take no calls
        ready = [w for w in live if w.state == READY and (self.model is None or w.model == self.model)]
        self._workers(len(ready), sorted({w.model for w in ready}))
        capacity: dict[str, int] = {}
        busy: dict[str, int] = {}
        for w in live:
            if w.state == READY:
                capacity[w.model] = capacity.get(w.model, 0) + w.capacity
            busy[w.model] = busy.get(w.model, 0) + (w.capacity - w.free_slots)
        for model in set(capacity) | set(busy):
            metrics.POOL_SLOTS.labels(model).set(capacity.get(model, 0))
            metrics.POOL_SLOTS_BUSY.labels(model).set(busy.get(model, 0))
        if self.on_sample is not None:
            self.on_sample(sum(busy.values()), sum(capacity.values()))
        metrics.POOL_WORKERS.labels(READY).set(sum(1 for w in live if w.state == READY))
        metrics.POOL_WORKERS.labels(DRAINING).set(sum(1 for w in live if w.state == DRAINING))
        metrics.POOL_WORKERS.labels(OVERLOADED).set(sum(1 for w in live if w.state == OVERLOADED))
        metrics.READY.set(1 if self.accepting() else 0)
