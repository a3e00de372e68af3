"""Slot leases: claim a free slot on a worker, renew it, release it, validate it.

One Lua script does the whole claim atomically (lua/claim.lua), so two gateways can never
be given the same slot. The lease key is the truth: a slot is given only if it has no
lease key, and an expired lease frees its slot by itself, so no slot can be stuck or
double-booked. (Free slots are counted from a per-worker index of lease expiries, so a
claim costs O(workers) rather than O(slots); a lease key deleted by hand instead of
released keeps its slot counted as busy until the lease's own expiry time.)
Each lease carries a fencing token from one counter; the worker admits a session only
when the slot's current lease carries exactly its token (see ``fencing.SlotFence``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
import typing as tp
from collections.abc import AsyncIterator
from dataclasses import dataclass

from service.pool.connection import PoolClient, PoolError
from service.pool.keys import check_model

log = logging.getLogger(__name__)

DEFAULT_LEASE_TTL_MS = 15_000
RELEASE = "lease-release"  # the operation's name in retry counts
# How long per-worker bookkeeping (the held-slot index, the issued tokens) lives after the
# last claim or renew on that worker.
BOOKKEEPING_TTL_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class Lease:
    """A claimed slot: where to stream (``url``), which ``slot``, and its fencing ``token``."""

    worker_id: str
    url: str
    slot: int
    token: int
    model: str
    ttl_ms: int
    owner: str
    expires_at: float  # wall-clock (time.time()) when the lease runs out unless renewed


class RenewResult(enum.Enum):
    """What a renew found."""

    RENEWED = "renewed"  # the lease was there with our token: its TTL is reset
    RECREATED = "recreated"  # the lease was gone and nobody took the slot since: re-created
    LOST = "lost"  # another token holds or has held the slot, or ours was released: fenced out


_RENEW_RESULTS = {1: RenewResult.RENEWED, 2: RenewResult.RECREATED, 0: RenewResult.LOST}


def parse_lease_value(value: str | None) -> tuple[int, str] | None:
    """``"<token>|<owner>"`` → (token, owner); None for an absent or malformed value."""
    if not value:
        return None
    token_text, _, owner = value.partition("|")
    try:
        return int(token_text), owner
    except ValueError:
        return None


class SlotLeases:
    """Claim, renew, release and validate slot leases. All methods raise PoolUnavailable."""

    def __init__(self, client: PoolClient) -> None:
        self.client = client
        self.keys = client.keys

    async def claim(
        self, model: str | None = None, *, ttl_ms: int = DEFAULT_LEASE_TTL_MS, owner: str = ""
    ) -> Lease | None:
        """A lease on a free slot of the least loaded live, ready worker serving ``model``
        (any model when None), or None when no slot is free anywhere.

        ``owner`` (e.g. the call id) is stored with the lease for display.
        """
        if ttl_ms < 1:
            raise ValueError("ttl_ms must be at least 1")
        if model is not None:
            check_model(model)
        async with self.client.guard("claim"):
            reply = await self.client.script("claim")(
                keys=[self.keys.workers, self.keys.fence],
                args=[self.keys.prefix, model or "", ttl_ms, owner, BOOKKEEPING_TTL_MS],
            )
        if reply is None:
            return None
        worker_id, url, slot, token, worker_model = reply
        return Lease(
            worker_id=worker_id,
            url=url,
            slot=int(slot),
            token=int(token),
            model=worker_model,
            ttl_ms=ttl_ms,
            owner=owner,
            expires_at=time.time() + ttl_ms / 1000,
        )

    async def release(self, lease: Lease) -> bool:
        """Give the slot back; False when the lease was already gone or fenced out."""
        async with self.client.guard("release"):
            released = await self.client.script("release")(
                keys=[
                    self.keys.lease(lease.worker_id, lease.slot),
                    self.keys.issued(lease.worker_id),
                    self.keys.held(lease.worker_id),
                ],
                args=[lease.token, lease.slot, BOOKKEEPING_TTL_MS],
            )
        return bool(released)

    def release_eventually(self, lease: Lease, give_up_after: float | None = None) -> None:
        """Release in the background, retried with backoff (``client.retries``) for at most
        ``give_up_after`` seconds (default: the lease's TTL, after which it has expired)."""
        bound = lease.ttl_ms / 1000 if give_up_after is None else give_up_after
        self.client.retries.submit(RELEASE, lambda: self.release(lease), give_up_after=max(bound, 1.0))

    async def renew(self, lease: Lease, ttl_ms: int | None = None) -> RenewResult:
        """Extend the lease by ``ttl_ms`` (default: its own TTL); see RenewResult."""
        ttl = lease.ttl_ms if ttl_ms is None else ttl_ms
        if ttl < 1:
            raise ValueError("ttl_ms must be at least 1")
        async with self.client.guard("renew"):
            code = await self.client.script("renew")(
                keys=[
                    self.keys.lease(lease.worker_id, lease.slot),
                    self.keys.issued(lease.worker_id),
                    self.keys.fence,
                    self.keys.held(lease.worker_id),
                ],
                args=[lease.token, ttl, lease.owner, lease.slot, BOOKKEEPING_TTL_MS],
            )
        return _RENEW_RESULTS[int(code)]

    async def validate(self, worker_id: str, slot: int, token: int) -> bool:
        """True only if the slot's current lease carries exactly ``token``."""
        async with self.client.guard("validate"):
            value = await self.client.redis.get(self.keys.lease(worker_id, slot))
        parsed = parse_lease_value(tp.cast(str | None, value))  # str: the client decodes replies
        return parsed is not None and parsed[0] == token

    @contextlib.asynccontextmanager
    async def hold(
        self, lease: Lease, *, renew_every: float | None = None, on_lost: tp.Callable[[Lease], object] | None = None
    ) -> AsyncIterator[LeaseHolder]:
        """Keep ``lease`` alive for the body (renewing every TTL/3) and release it on exit,
        however the body ends (cancellation included). ``on_lost`` runs once if the lease is
        fenced out; Redis outages are ridden out (renew re-creates the lease afterwards).
        """
        holder = LeaseHolder(self, lease, renew_every=renew_every, on_lost=on_lost)
        holder.start()
        try:
            yield holder
        finally:
            await holder.close()


class LeaseHolder:
    """Renews one lease in the background until closed; then releases it."""

    def __init__(
        self,
        leases: SlotLeases,
        lease: Lease,
        *,
        renew_every: float | None = None,
        on_lost: tp.Callable[[Lease], object] | None = None,
    ) -> None:
        self.leases = leases
        self.lease = lease
        self.renew_every = renew_every if renew_every is not None else lease.ttl_ms / 3000
        self.on_lost = on_lost
        self.lost = asyncio.Event()
        self.renewals = 0
        self.recreations = 0
        self.renew_failures = 0  # renews that could not reach Redis
        self.released: bool | None = None  # None: not released (yet, or Redis was down)
        self._task: asyncio.Task | None = None
        self._closing = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"lease-{self.lease.worker_id}-{self.lease.slot}")

    async def _run(self) -> None:
        # the flag as well as the cancel: a cancellation swallowed somewhere below (asyncio
        # on 3.11 can) must not leave this loop renewing a lease that is being released
        while not self._closing:
            await asyncio.sleep(self.renew_every)
            if self._closing:
                return
            try:
                result = await self.leases.renew(self.lease)
            except PoolError as exc:
                self.renew_failures += 1
                log.warning(
                    "lease %s/%d (token %d) not renewed: %s",
                    self.lease.worker_id,
                    self.lease.slot,
                    self.lease.token,
                    exc,
                )
                continue
            if result is RenewResult.LOST:
                log.warning(
                    "lease %s/%d (token %d) lost: fenced out", self.lease.worker_id, self.lease.slot, self.lease.token
                )
                self.lost.set()
                if self.on_lost is not None:
                    try:
                        self.on_lost(self.lease)
                    except Exception:
                        log.exception("on_lost callback failed")
                return
            self.renewals += 1
            if result is RenewResult.RECREATED:
                self.recreations += 1
                log.info(
                    "lease %s/%d (token %d) re-created after it was lost from Redis",
                    self.lease.worker_id,
                    self.lease.slot,
                    self.lease.token,
                )

    async def close(self) -> None:
        """Stop renewing and release the lease. If Redis cannot take it now (down, failing
        over, full), the release is retried in the background until it succeeds or the
        lease has expired by itself (``client.retries``)."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
            self._task = None
        if self.lost.is_set() or self.released is not None:
            return
        try:
            self.released = await self.leases.release(self.lease)
        except PoolError as exc:
            log.warning(
                "lease %s/%d (token %d) not released yet, retrying: %s",
                self.lease.worker_id,
                self.lease.slot,
                self.lease.token,
                exc,
            )
            self.leases.release_eventually(self.lease)
