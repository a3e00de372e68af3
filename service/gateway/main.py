"""The gateway process: SIP user agent, call table, routing to workers, HTTP control plane."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
import sys
import time
import typing as tp

import uvicorn

from service import realtime
from service.api.auth import ApiTokens
from service.config import ConfigError
from service.gateway import metrics
from service.gateway.calls.call import WATCHDOG_PERIOD, Call, TranscriptEvent
from service.gateway.control.hangups import HangupChannel
from service.gateway.control.sampler import sample_forever
from service.gateway.control.transcripts import TranscriptStore
from service.gateway.control.webhook import WebhookSender, call_ended_payload
from service.gateway.ingress.sip import SipCallHandler
from service.gateway.routing.loopback import LOOPBACK_URL
from service.gateway.routing.router import FixedRouter, LoopbackRouter, PoolRouter, Router
from service.pool import (
    DRAINING,
    MODEL_ROLE,
    OVERLOADED,
    READY,
    CallRecord,
    CallRecords,
    PoolClient,
    PoolError,
    RegistryReader,
    Retries,
    SlotLeases,
    connect,
    redacted,
)
from service.realtime import quiet_gc
from service.settings import GatewaySettings
from sip.rtpsession import PortAllocator
from sip.tls import ServerCertificates, client_context
from sip.ua import IncomingCall, UserAgent
from sip.uri import format_host

log = logging.getLogger("moshimoshi.gateway")

POOL_REFRESH_SECONDS = 1.0
STOP_CALLS_SECONDS = 3.0
RECORD_END_RETRY_SECONDS = 300.0  # a call's end is retried this long if Redis refuses it


def banner(settings: GatewaySettings, sip_port: int, http_port: int, tls_port: int | None = None) -> str:
    """The line printed once the gateway is up: where to call it and where to watch it."""
    web = settings.http_host if settings.http_host not in ("0.0.0.0", "::") else "localhost"
    sip_host = format_host(settings.public_host or settings.sip_host)
    web = format_host(web)
    tls = f"  sips:agent@{sip_host}:{tls_port}" if tls_port is not None else ""
    return (f"moshimoshi gateway up: SIP sip:agent@{sip_host}:{sip_port}{tls}  "
            f"dashboard http://{web}:{http_port}/dashboard  softphone http://{web}:{http_port}/phone")


def tls_settings(settings: GatewaySettings) -> tuple[ServerCertificates | None, ssl.SSLContext | None]:
    """The TLS server certificates (None: TLS off) and how servers we connect to are checked.
    A certificate or key that does not load stops the gateway with a message naming it."""
    if not settings.sip_tls:
        return None, None
    assert settings.sip_tls_cert and settings.sip_tls_key
    try:
        certificates = ServerCertificates(settings.sip_tls_cert, settings.sip_tls_key, settings.sip_tls_client_ca)
        verify = client_context(settings.sip_tls_client_ca)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"MOSHIMOSHI_SIP_TLS_CERT={settings.sip_tls_cert}, MOSHIMOSHI_SIP_TLS_KEY="
                          f"{settings.sip_tls_key}"
                          + (f", MOSHIMOSHI_SIP_TLS_CLIENT_CA={settings.sip_tls_client_ca}"
                             if settings.sip_tls_client_ca else "")
                          + f": {exc}") from None
    return certificates, verify


class Gateway:
    """One gateway: answers calls, routes them to worker slots, serves the control plane."""

    def __init__(self, settings: GatewaySettings, *, model: str | None = None) -> None:
        if not settings.redis_url and not settings.worker_url:
            raise ConfigError("set REDIS_URL (a pool of workers) or MOSHIMOSHI_WORKER_URL (one worker)")
        self.settings = settings
        self.model = model or settings.model
        self.gateway_id = settings.gateway_id or f"{socket.gethostname()}-{settings.sip_port}-{os.getpid()}"
        self.calls: dict[str, Call] = {}
        self.recent: list[dict[str, tp.Any]] = []
        self.draining = False
        self.started_at = time.time()
        self.exit_code = 0
        self.ports = PortAllocator(settings.rtp_port_min, settings.rtp_port_max)
        tls_certificates, tls_verify = tls_settings(settings)
        self.ua = UserAgent(settings.sip_host, settings.sip_port, public_host=settings.public_host,
                            on_invite=self._on_invite, session_expires=settings.session_expires,
                            user_agent="moshimoshi-gateway", guard=settings.sip_guard(),
                            stream_limits=settings.sip_stream_limits(), tls_certificates=tls_certificates,
                            tls_port=settings.sip_tls_port, tls_client_context=tls_verify)
        self.ua.available = self.accepting
        self.pool: PoolClient | None = None
        self.records: CallRecords | None = None
        self.registry: RegistryReader | None = None
        self.router: Router
        if settings.redis_url:
            self.pool = connect(settings.redis_url)
            self.pool.retries.listeners.append(metrics.count_pool_retry)
            self.records = CallRecords(self.pool, retention=settings.call_retention_seconds)
            self.registry = RegistryReader(self.pool)
            self.router = PoolRouter(SlotLeases(self.pool), model=self.model, gateway_id=self.gateway_id,
                                     lease_ttl_ms=int(settings.lease_ttl_seconds * 1000),
                                     secret=settings.worker_secret)
        elif settings.worker_url == LOOPBACK_URL:
            self.router = LoopbackRouter(settings.echo_delay_ms)
        else:
            assert settings.worker_url
            self.router = FixedRouter(settings.worker_url, model=self.model, secret=settings.worker_secret)
        self.workers_ready = 0
        self.redis_ok: bool | None = True if self.pool is None else None  # None: not checked yet
        self._stop = asyncio.Event()
        self.no_calls = asyncio.Event()
        self.no_calls.set()
        self._tasks: set[asyncio.Task] = set()
        self._record_writes: dict[str, asyncio.Task] = {}  # call id → its latest record write
        self._http: uvicorn.Server | None = None
        self.http_port = settings.http_port
        self.call_stats = metrics.install_call_stats(self._live_counters)
        metrics.install_sip_stats(lambda: self.ua.transport.counters, lambda: self.ua.guard,
                                  lambda: self.ua.transport.tls_certificates)
        self.transcript_listeners: dict[str, set[asyncio.Queue]] = {}
        # control plane: API tokens, transcripts in Redis, hang-ups across replicas, webhook
        self.api_tokens = ApiTokens.parse(settings.api_tokens)
        self.webhook = WebhookSender.from_settings(settings)
        self.transcripts: TranscriptStore | None = None
        self.hangups: HangupChannel | None = None
        if self.pool is not None:
            self.transcripts = TranscriptStore(self.pool, retention=settings.call_retention_seconds)
            self.hangups = HangupChannel(self.pool, self.hangup)

    @property
    def pool_retries(self) -> Retries | None:
        return self.pool.retries if self.pool is not None else None

    # -- readiness ---------------------------------------------------------------------

    def accepting(self) -> bool:
        """True when a new call can be taken: not draining, pool reachable, a worker ready."""
        return not self.draining and self.router.ready() and bool(self.redis_ok) and self.workers_ready > 0

    def readiness(self) -> dict[str, tp.Any]:
        return {"ready": self.accepting(), "draining": self.draining, "redis": self.redis_ok,
                "workers_ready": self.workers_ready, "calls": len(self.calls)}

    # -- calls -------------------------------------------------------------------------

    def rtp_bind_host(self, local_ip: str) -> str:
        host = self.settings.sip_host
        if host in ("0.0.0.0", "::"):
            return "::" if ":" in local_ip and host == "::" else host
        return host

    async def _on_invite(self, incoming: IncomingCall) -> None:
        await SipCallHandler(self, incoming).run()

    def track(self, call: Call) -> None:
        self.calls[call.id] = call
        self.no_calls.clear()
        call.on_transcript = self._on_transcript
        metrics.CALLS_ACTIVE.labels(call.ingress).inc()

    def untrack(self, call: Call) -> None:
        if self.calls.pop(call.id, None) is None:
            return
        if not self.calls:
            self.no_calls.set()
        call.ended_at = time.time()
        call.state = "ended"
        metrics.CALLS_ACTIVE.labels(call.ingress).dec()
        metrics.CALLS_TOTAL.labels(call.ingress, call.end_reason or "unknown").inc()
        if call.answered_at is not None:
            metrics.CALL_DURATION.observe(call.ended_at - call.answered_at)
        if call.media is not None:
            self.call_stats.add_ended(call.media.counters())
        summary = call.record()
        if call.media is not None:
            summary["quality"] = call.media.quality()
        summary["transcript"] = [e.to_dict() for e in call.transcript]
        self.recent.insert(0, summary)
        del self.recent[200:]
        self.record_end(call)
        if self.transcripts is not None:
            self.transcripts.end(call.id, call.end_reason or "unknown")
        if self.webhook is not None and call.answered_at is not None:
            self.webhook.submit(call.id, call_ended_payload(summary, self.gateway_id))
        for queue in self.transcript_listeners.pop(call.id, set()):
            queue.put_nowait(None)
        log.info("call %s ended: %s (%.1fs, %d transcript pieces)", call.id, call.end_reason,
                 summary["duration_s"], len(call.transcript))

    def hangup(self, call_id: str) -> bool:
        call = self.calls.get(call_id)
        if call is None:
            return False
        call.end("api-hangup")
        return True

    def _live_counters(self) -> tp.Iterator[dict[str, int]]:
        for call in list(self.calls.values()):
            if call.media is not None:
                yield call.media.counters()

    def _on_transcript(self, call: Call, event: TranscriptEvent) -> None:
        for queue in self.transcript_listeners.get(call.id, ()):
            queue.put_nowait(event)
        if self.transcripts is not None:
            self.transcripts.append(call.id, len(call.transcript) - 1, event)

    # -- call records (best effort: Redis may be down; media never waits for it) --------

    def _background(self, coro: tp.Coroutine) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guarded(self, what: str, coro: tp.Awaitable) -> None:
        try:
            await coro
        except PoolError as exc:
            metrics.REDIS_ERRORS.labels(what).inc()
            log.warning("%s failed: %s", what, exc)

    def _record_write(self, call_id: str, what: str, coro: tp.Coroutine) -> None:
        """Write a call's record after its previous write: in order, or an update or the end
        could reach Redis before the create and be lost (the record staying "active")."""
        previous = self._record_writes.get(call_id)

        async def write() -> None:
            if previous is not None:
                await asyncio.wait([previous])
            await self._guarded(what, coro)

        task = asyncio.create_task(write())
        self._tasks.add(task)
        self._record_writes[call_id] = task

        def done(finished: asyncio.Task) -> None:
            self._tasks.discard(finished)
            if self._record_writes.get(call_id) is finished:
                del self._record_writes[call_id]

        task.add_done_callback(done)

    def record_create(self, call: Call) -> None:
        if self.records is None:
            return
        record = CallRecord(call_id=call.id, sip_call_id=call.sip_call_id, from_uri=call.from_uri,
                            to_uri=call.to_uri, codec=call.codec, started_at=call.started_at,
                            sip_transport=call.sip_transport, media_encryption=call.media_encryption,
                            identity=call.identity.to_dict() if call.identity is not None else None,
                            quality={"ingress": call.ingress, "gateway": self.gateway_id})
        self._record_write(call.id, "record-create", self.records.create(record))

    def record_update(self, call: Call, **fields: tp.Any) -> None:
        if self.records is None:
            return
        fields = {k: v for k, v in fields.items() if v is not None}
        self._record_write(call.id, "record-update", self.records.update(call.id, **fields))

    def record_answer(self, call: Call) -> None:
        """An answered call's worker, slot, codec, encryption and sampling, into its record."""
        self.record_update(call, answered_at=call.answered_at, worker_id=call.worker_id, slot=call.slot,
                           codec=call.codec, media_encryption=call.media_encryption or None,
                           quality={"sampling": call.sampling} if call.sampling else None)

    def record_end(self, call: Call) -> None:
        if self.records is None:
            return
        quality = call.media.quality() if call.media is not None else {}
        quality = {k: v for k, v in quality.items() if v is not None}
        quality["failovers"] = call.failovers
        records, reason, ended_at, detail = self.records, call.end_reason or "unknown", call.ended_at, call.end_detail
        self._record_write(call.id, "record-end", self.pool_retries.run(  # type: ignore[union-attr]
            "record-end", lambda: records.end(call.id, reason, ended_at=ended_at, quality=quality, detail=detail),
            give_up_after=RECORD_END_RETRY_SECONDS))

    async def _watch_calls(self) -> None:
        """One watchdog for every call (not a timer per call): flags stalled worker sessions."""
        while True:
            await asyncio.sleep(WATCHDOG_PERIOD)
            now = time.monotonic()
            for call in list(self.calls.values()):
                call.check_stall(now)

    # -- pool state --------------------------------------------------------------------

    async def _refresh_pool(self) -> None:
        while True:
            await self.refresh_pool_once()
            await asyncio.sleep(POOL_REFRESH_SECONDS)

    async def refresh_pool_once(self) -> None:
        if self.registry is None:
            self.workers_ready = 1 if self.router.ready() else 0
            metrics.READY.set(1 if self.accepting() else 0)
            return
        try:
            # a write, not just a read: a full (maxmemory) or read-only Redis takes no calls
            await self.pool.check_writable(self.gateway_id)  # type: ignore[union-attr]
            workers = await self.registry.workers()
        except PoolError as exc:
            if self.redis_ok:
                log.warning("Redis unavailable: new calls get 503 until it is back (%s)", exc)
            self.redis_ok = False
            metrics.REDIS_ERRORS.labels("registry").inc()
            metrics.READY.set(0)
            return
        if self.redis_ok is False:
            log.info("Redis available again")
        self.redis_ok = True
        live = [w for w in workers if w.alive and w.role == MODEL_ROLE]  # ASR workers take no calls
        ready = [w for w in live if w.state == READY and (self.model is None or w.model == self.model)]
        if ready and not self.workers_ready:
            print(f"moshimoshi: {len(ready)} worker(s) ready ({', '.join(sorted({w.model for w in ready}))}): "
                  "calls are answered", flush=True)
        elif self.workers_ready and not ready:
            log.warning("no worker ready: new calls get 503 until one is")
        self.workers_ready = len(ready)
        capacity: dict[str, int] = {}
        busy: dict[str, int] = {}
        for w in live:
            if w.state == READY:
                capacity[w.model] = capacity.get(w.model, 0) + w.capacity
            busy[w.model] = busy.get(w.model, 0) + (w.capacity - w.free_slots)
        for model in set(capacity) | set(busy):
            metrics.POOL_SLOTS.labels(model).set(capacity.get(model, 0))
            metrics.POOL_SLOTS_BUSY.labels(model).set(busy.get(model, 0))
        metrics.POOL_WORKERS.labels(READY).set(sum(1 for w in live if w.state == READY))
        metrics.POOL_WORKERS.labels(DRAINING).set(sum(1 for w in live if w.state == DRAINING))
        metrics.POOL_WORKERS.labels(OVERLOADED).set(sum(1 for w in live if w.state == OVERLOADED))
        metrics.READY.set(1 if self.accepting() else 0)

    # -- lifecycle ---------------------------------------------------------------------

    def drain(self) -> None:
        """Take no new calls (503); stop once the calls in progress end or the grace runs out."""
        if self.draining:
            return
        self.draining = True
        log.info("draining: %d calls in progress, grace %.0fs", len(self.calls),
                 self.settings.drain_grace_seconds)
        self._background(self._drain())

    async def _drain(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.drain_grace_seconds):
                await self.no_calls.wait()
        self.stop()

    def stop(self) -> None:
        self._stop.set()

    def on_local_worker_exit(self) -> None:
        """``serve``: the worker child exited. Unless we are shutting down, that is fatal."""
        if not self._stop.is_set() and not self.draining:
            log.error("the worker process exited; stopping")
            self.exit_code = 1
            self.stop()

    async def run(self) -> int:
        from service.api.app import create_app

        await self.ua.start()
        app = create_app(self)
        config = uvicorn.Config(app, host=self.settings.http_host, port=self.settings.http_port,
                                log_level="warning", lifespan="off", access_log=False)
        self._http = uvicorn.Server(config)
        # Signals are the gateway's (SIGTERM drains while HTTP keeps answering probes);
        # uvicorn would otherwise take SIGINT/SIGTERM over and stop serving at once.
        self._http.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
        http_task = asyncio.create_task(self._http.serve(), name="http")
        while not self._http.started and not http_task.done():  # noqa: ASYNC110 (uvicorn has no event)
            await asyncio.sleep(0.02)
        if http_task.done():
            await self.ua.stop()
            http_task.result()
            return 1
        self.http_port = self._http.servers[0].sockets[0].getsockname()[1] if self._http.servers else 0
        await self.refresh_pool_once()
        refresher = asyncio.create_task(self._refresh_pool(), name="pool-refresh")
        sampler = asyncio.create_task(sample_forever(self), name="quality-sampler")
        watchdog = asyncio.create_task(self._watch_calls(), name="call-watchdog")
        self.start_control_plane()
        where = redacted(self.settings.redis_url) if self.settings.redis_url else self.settings.worker_url
        tls = f", TLS on {self.ua.tls_port}" if self.ua.tls_port is not None else ""
        log.info("gateway %s: SIP on %s:%d (UDP+TCP%s), SRTP %s, HTTP on %s:%d, workers via %s, event loop %s",
                 self.gateway_id, self.settings.sip_host, self.ua.port, tls, self.settings.srtp,
                 self.settings.http_host, self.http_port, where, realtime.running_loop_name())
        print(banner(self.settings, self.ua.port, self.http_port, self.ua.tls_port), flush=True)
        try:
            await self._stop.wait()
        finally:
            refresher.cancel()
            sampler.cancel()
            watchdog.cancel()
            await self._shutdown(http_task)
        return self.exit_code

    def start_control_plane(self) -> None:
        for weak in self.api_tokens.weak_entries():
            log.warning("MOSHIMOSHI_API_TOKENS entry %d is short (under 16 characters): easy to guess", weak)
        if not self.api_tokens:
            log.warning("no API tokens configured: /v1 refuses every request (set MOSHIMOSHI_API_TOKENS)")
        if not self.settings.worker_secret and self.settings.worker_url != LOOPBACK_URL:
            log.warning("no worker secret: workers that require one refuse this gateway's sessions "
                        "(set MOSHIMOSHI_WORKER_SECRET to theirs)")
        if self.transcripts is not None:
            self.transcripts.start()
        if self.hangups is not None:
            self.hangups.start()

    async def _shutdown(self, http_task: asyncio.Task) -> None:
        for call in list(self.calls.values()):
            call.end("gateway-stopped")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_CALLS_SECONDS):
                await self.no_calls.wait()
        await self.ua.stop()
        if self._http is not None:
            self._http.should_exit = True
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await http_task
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2)
        await self.stop_control_plane()
        if self.pool is not None:
            with contextlib.suppress(Exception):
                await self.pool.close()

    async def stop_control_plane(self) -> None:
        """After the calls: store the last transcript pieces, deliver the last webhooks."""
        if self.hangups is not None:
            await self.hangups.close()
        if self.transcripts is not None:
            await self.transcripts.close(timeout=2.0)
        if self.webhook is not None:
            await self.webhook.close(timeout=3.0)


def run_gateway(settings: GatewaySettings) -> int:
    quiet_gc()

    async def main() -> int:
        try:
            gateway = Gateway(settings)
        except ConfigError as exc:
            print(f"moshimoshi: configuration error: {exc}", file=sys.stderr)
            return 2
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, gateway.drain)
        loop.add_signal_handler(signal.SIGINT, gateway.stop)
        return await gateway.run()

    return realtime.run(main())
