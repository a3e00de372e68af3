"""Routing a call to a worker slot: a fixed worker, or a fenced lease from the Redis pool.

``open`` returns a ``WorkerSession``: the open WebSocket link plus whatever must be given
back when the call ends (the lease, renewed in the background meanwhile). Its owner calls
``close`` on every exit path.

Calls that find no free slot wait in FIFO order on this gateway (the caller hears
ringing) for up to ``wait`` seconds; only the head of the queue polls Redis, so a queue
of a hundred calls costs a few claims a second, not a hundred.

``open`` may be cancelled at any point (the caller hung up while queued): it leaves the
queue at once. A claim or handshake already under way is never cut short (that could
leave a lease taken in Redis, or a slot reserved on a worker, with no owner): it runs to
its end in the background and whatever it got is closed and released.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import typing as tp
from dataclasses import dataclass

from service.gateway import metrics
from service.gateway.routing.loopback import LoopbackLink
from service.gateway.routing.worker_link import WorkerLink, WorkerRefused
from service.pool import Lease, LeaseHolder, PoolError, SlotLeases
from service.wire import CloseCode

log = logging.getLogger(__name__)

CLAIM_POLL_SECONDS = 0.1
HANDSHAKE_SECONDS = 5.0
CLAIM_FAILURE_BACKOFF_SECONDS = 1.0  # after a claim Redis refused, calls get 503 this long


class NoCapacity(Exception):
    """No slot became free within the wait (answer 503 with Retry-After)."""


class RoutingUnavailable(Exception):
    """The pool cannot be reached (Redis down): no new calls until it is back (503)."""


class LinkCallbacks(tp.NamedTuple):
    on_frame: tp.Callable[[bytes], None]
    on_text: tp.Callable[[str, float], None]
    on_end: tp.Callable[[str], None]


@dataclass
class WorkerSession:
    """A call's current session on a worker, and what to give back when it ends."""

    link: WorkerLink | LoopbackLink
    worker_id: str
    lease: Lease | None = None
    holder: LeaseHolder | None = None

    @property
    def slot(self) -> int | None:
        return self.link.slot

    async def close(self) -> None:
        """Stop the session and release the lease (idempotent, never raises)."""
        with contextlib.suppress(Exception):
            await self.link.close()
        if self.holder is not None:
            with contextlib.suppress(Exception):
                await self.holder.close()
            self.holder = None


@dataclass(frozen=True)
class SessionNeeds:
    """What a call asks of its worker session: the ``model`` (None: the gateway's own
    ``--model``, or any) and ``sampling`` overrides for the session (its route's)."""

    model: str | None = None
    sampling: tp.Mapping[str, float | int | bool] | None = None


ANY = SessionNeeds()


class Router(tp.Protocol):
    async def open(
        self,
        call_id: str,
        callbacks: LinkCallbacks,
        *,
        wait: float,
        on_queued: tp.Callable[[], tp.Awaitable[None]] | None = None,
        exclude: tp.Collection[str] = (),
        needs: SessionNeeds = ANY,
    ) -> WorkerSession: ...

    def ready(self) -> bool: ...


_orphans: set[asyncio.Future] = set()  # sessions being closed after their caller was cancelled


async def _to_the_end(work: tp.Awaitable[WorkerSession | None]) -> WorkerSession | None:
    """Await ``work`` (a claim, a handshake); when the awaiting task is cancelled meanwhile,
    let ``work`` finish anyway and close the session it yields (see the module docstring)."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:

        def release(done: asyncio.Future) -> None:
            if done.cancelled() or done.exception() is not None:
                return
            session = done.result()
            if session is not None:
                closing = asyncio.ensure_future(session.close())
                _orphans.add(closing)
                closing.add_done_callback(_orphans.discard)

        task.add_done_callback(release)
        raise


async def _opened(link: WorkerLink, **session: tp.Any) -> WorkerSession:
    await link.open(timeout=HANDSHAKE_SECONDS)
    return WorkerSession(link=link, **session)


def _link(url: str, call_id: str, callbacks: LinkCallbacks, **kwargs: tp.Any) -> WorkerLink:
    return WorkerLink(
        url, call_id, on_frame=callbacks.on_frame, on_text=callbacks.on_text, on_end=callbacks.on_end, **kwargs
    )


def _closing(link: WorkerLink) -> tp.Callable[[Lease], object]:
    """A lease holder's ``on_lost``: the link to the worker goes with the lease."""
    return lambda _lease: asyncio.ensure_future(link.close())


class FixedRouter:
    """Every call goes to one configured worker, which picks the slot (no pool)."""

    def __init__(self, url: str, model: str | None = None, secret: str | None = None) -> None:
        self.url = url
        self.model = model
        self.secret = secret
        self.worker_ok = True

    def ready(self) -> bool:
        return self.worker_ok

    async def open(
        self,
        call_id: str,
        callbacks: LinkCallbacks,
        *,
        wait: float,
        on_queued: tp.Callable[[], tp.Awaitable[None]] | None = None,
        exclude: tp.Collection[str] = (),
        needs: SessionNeeds = ANY,
    ) -> WorkerSession:
        if self.url in exclude:
            raise NoCapacity("the only worker failed")
        deadline = time.monotonic() + wait
        queued = False
        while True:
            link = _link(
                self.url,
                call_id,
                callbacks,
                model=needs.model or self.model,
                secret=self.secret,
                sampling=needs.sampling,
            )
            try:
                session = await _to_the_end(_opened(link, worker_id=self.url))
                assert session is not None
                self.worker_ok = True
                return session
            except WorkerRefused as exc:
                if exc.code != CloseCode.NO_SLOT or time.monotonic() >= deadline:
                    raise NoCapacity(str(exc)) from None
            except (OSError, TimeoutError) as exc:
                self.worker_ok = False
                raise NoCapacity(f"worker {self.url} unreachable: {exc}") from None
            if not queued:
                queued = True
                metrics.QUEUED_CALLS.inc()
                if on_queued is not None:
                    await on_queued()
            await asyncio.sleep(CLAIM_POLL_SECONDS)


class LoopbackRouter:
    """Every call is echoed inside the gateway (``--worker-url echo:``): a line check."""

    def __init__(self, delay_ms: int = 0) -> None:
        self.delay_ms = delay_ms

    def ready(self) -> bool:
        return True

    async def open(
        self,
        call_id: str,
        callbacks: LinkCallbacks,
        *,
        wait: float,
        on_queued: tp.Callable[[], tp.Awaitable[None]] | None = None,
        exclude: tp.Collection[str] = (),
        needs: SessionNeeds = ANY,
    ) -> WorkerSession:
        link = LoopbackLink(call_id, callbacks.on_frame, self.delay_ms)
        return WorkerSession(link=link, worker_id="loopback")


class _ModelQueue:
    """The calls of one model waiting on this gateway, in order, and whether its last
    claim found every slot taken."""

    __slots__ = ("tickets", "full")

    def __init__(self) -> None:
        self.tickets: list[int] = []
        self.full = False


class PoolRouter:
    """Claims a fenced lease on the least loaded worker serving the call's model through
    Redis, then connects. Each model has its own queue: calls for a model whose workers
    are all busy never hold up calls for another."""

    def __init__(
        self,
        leases: SlotLeases,
        *,
        model: str | None,
        gateway_id: str,
        lease_ttl_ms: int = 15_000,
        secret: str | None = None,
    ) -> None:
        self.leases = leases
        self.model = model  # the gateway's --model: what calls whose route names none ask for
        self.secret = secret  # the workers' shared secret
        self.gateway_id = gateway_id
        self.lease_ttl_ms = lease_ttl_ms
        self.redis_ok = True
        self._claim_failed_at = -CLAIM_FAILURE_BACKOFF_SECONDS
        self._tickets = itertools.count()
        self._queues: dict[str | None, _ModelQueue] = {}
        self._queue_changed = asyncio.Condition()

    def ready(self) -> bool:
        # not latched: the next call tries again after the backoff (the gateway's own Redis
        # check keeps it unready for as long as Redis refuses writes)
        return self.redis_ok or time.monotonic() - self._claim_failed_at >= CLAIM_FAILURE_BACKOFF_SECONDS

    @property
    def queued(self) -> int:
        return sum(len(q.tickets) for q in self._queues.values())

    async def open(
        self,
        call_id: str,
        callbacks: LinkCallbacks,
        *,
        wait: float,
        on_queued: tp.Callable[[], tp.Awaitable[None]] | None = None,
        exclude: tp.Collection[str] = (),
        needs: SessionNeeds = ANY,
    ) -> WorkerSession:
        started = time.monotonic()
        deadline = started + wait
        model = needs.model or self.model
        queue = self._queues.setdefault(model, _ModelQueue())
        ticket = next(self._tickets)
        queue.tickets.append(ticket)
        queued = False
        try:
            while True:
                if queue.tickets[0] == ticket:
                    session = await _to_the_end(self._try_claim(call_id, callbacks, exclude, model, needs.sampling))
                    if session is not None:
                        queue.full = False
                        if queued:
                            metrics.QUEUE_WAIT.observe(time.monotonic() - started)
                        return session
                    queue.full = True
                if queue.full and not queued:
                    # Only a call that found every slot taken is queued (and hears ringing);
                    # the others just wait their turn to claim, for milliseconds.
                    queued = True
                    metrics.QUEUED_CALLS.inc()
                    if on_queued is not None:
                        await on_queued()
                if time.monotonic() >= deadline:
                    if queued:
                        metrics.QUEUE_WAIT.observe(time.monotonic() - started)
                    raise NoCapacity(f"no free slot within {wait:.1f}s" + (f" for model {model}" if model else ""))
                async with self._queue_changed:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(min(CLAIM_POLL_SECONDS, max(0.0, deadline - time.monotonic()))):
                            await self._queue_changed.wait()
        finally:
            queue.tickets.remove(ticket)
            if not queue.tickets and self._queues.get(model) is queue:
                del self._queues[model]
            async with self._queue_changed:
                self._queue_changed.notify_all()

    async def _try_claim(
        self,
        call_id: str,
        callbacks: LinkCallbacks,
        exclude: tp.Collection[str],
        model: str | None,
        sampling: tp.Mapping[str, float | int | bool] | None,
    ) -> WorkerSession | None:
        """One claim; a worker that fails its handshake is skipped and its lease released."""
        refused: list[Lease] = []
        try:
            for _ in range(4):
                lease = await self._claim(call_id, model)
                if lease is None:
                    return None
                if lease.worker_id in exclude:
                    refused.append(lease)
                    continue
                link = _link(
                    lease.url,
                    call_id,
                    callbacks,
                    slot=lease.slot,
                    token=lease.token,
                    model=model,
                    secret=self.secret,
                    sampling=sampling,
                )
                try:
                    await link.open(timeout=HANDSHAKE_SECONDS)
                except (WorkerRefused, OSError, TimeoutError) as exc:
                    log.warning(
                        "call %s: worker %s slot %d refused or unreachable: %s",
                        call_id,
                        lease.worker_id,
                        lease.slot,
                        exc,
                    )
                    refused.append(lease)
                    continue
                holder = LeaseHolder(self.leases, lease, on_lost=_closing(link))
                holder.start()
                return WorkerSession(link=link, worker_id=lease.worker_id, lease=lease, holder=holder)
            return None
        finally:
            for lease in refused:
                try:
                    await self.leases.release(lease)
                except PoolError:
                    self.leases.release_eventually(lease)

    async def _claim(self, call_id: str, model: str | None) -> Lease | None:
        started = time.perf_counter()
        try:
            lease = await self.leases.claim(model, ttl_ms=self.lease_ttl_ms, owner=call_id)
        except PoolError as exc:  # down, failing over, full (maxmemory): 503, never 500
            self.redis_ok = False
            self._claim_failed_at = time.monotonic()
            metrics.REDIS_ERRORS.labels("claim").inc()
            raise RoutingUnavailable(str(exc)) from None
        self.redis_ok = True
        metrics.CLAIM_LATENCY.observe(time.perf_counter() - started)
        return lease
