"""The gateway process: wires the SIP user agent, the ingresses, the call lifecycle, the
routing to workers and the HTTP control plane together, and runs them.

The call's path reads in this order: ``ingress/`` (SIP, WebRTC) → ``calls/lifecycle.py``
(admission, slot claim, answer, supervision, release) with ``media/`` (the edge and its
pipeline) and ``routing/`` (the worker slot and session); ``control/`` serves the API.
"""

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
from service.api.app import create_app
from service.api.auth import ApiTokens
from service.api.models import Readiness
from service.asr.client import AsrWorkerFinder
from service.config import ConfigError
from service.gateway import metrics
from service.gateway.banner import ready_banner
from service.gateway.calls.call import Call
from service.gateway.calls.capture import CallCapture
from service.gateway.calls.lifecycle import CallLifecycle
from service.gateway.calls.policy import CallPolicy
from service.gateway.calls.recorder import CallRecorder
from service.gateway.calls.refusals import WINDOW_SECONDS, RefusalLog
from service.gateway.calls.sampler import sample_forever
from service.gateway.calls.table import CallTable
from service.gateway.calls.transcript import TranscriptFeed
from service.gateway.control.commands import CallCommands
from service.gateway.control.concurrency import ConcurrencyHistory
from service.gateway.control.directory import CallDirectory
from service.gateway.control.plane import GatewayControl
from service.gateway.control.pool_view import PoolView
from service.gateway.control.refusal_store import RefusalStore
from service.gateway.control.transcript_reader import TranscriptReader
from service.gateway.control.transcript_store import TranscriptStore
from service.gateway.control.transfers import TransferChannel
from service.gateway.control.webhook import WebhookSender, call_ended_payload
from service.gateway.ingress.outbound import OutboundCalls
from service.gateway.ingress.sip import SipIngress
from service.gateway.ingress.sip_dialer import SipDialer
from service.gateway.ingress.webrtc import WebRtcIngress
from service.gateway.media.announcement import load_announcement
from service.gateway.recording.storage import LocalStorage, S3Storage, Storage
from service.gateway.recording.writer import RecordingWriter
from service.gateway.routes.schema import RoutesError
from service.gateway.routes.table import RouteTable
from service.gateway.routing.loopback import LOOPBACK_URL
from service.gateway.routing.pool_watch import PoolWatch
from service.gateway.routing.router import FixedRouter, LoopbackRouter, PoolRouter, Router
from service.pool import CallRecords, PoolClient, RegistryReader, SlotLeases, connect, redacted
from service.realtime import quiet_gc
from service.settings import GatewaySettings
from service.startup import StartupError, check_free, gateway_listeners, listen, wait_for_redis
from sip.rtpsession import PortAllocator
from sip.tls import ServerCertificates, client_context
from sip.ua import UserAgent

log = logging.getLogger("moshimoshi.gateway")

STOP_CALLS_SECONDS = 3.0
REFUSALS_WINDOW = WINDOW_SECONDS  # how long refused calls are kept (an hour)
RECORDING_CLOSE_SECONDS = 10.0  # at shutdown, the recordings of the last calls are written out this long
SWEEP_MAX_SECONDS = 3600.0  # recordings past the retention are deleted at least this often


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
        raise ConfigError(
            f"MOSHIMOSHI_SIP_TLS_CERT={settings.sip_tls_cert}, MOSHIMOSHI_SIP_TLS_KEY="
            f"{settings.sip_tls_key}"
            + (f", MOSHIMOSHI_SIP_TLS_CLIENT_CA={settings.sip_tls_client_ca}" if settings.sip_tls_client_ca else "")
            + f": {exc}"
        ) from None
    return certificates, verify


def recording_storage(settings: GatewaySettings, routes: RouteTable | None = None) -> Storage | None:
    """Where recordings are kept (None when neither this gateway's settings nor its routes
    record, and there is no bucket); ConfigError naming the setting when it cannot be used."""
    routed = routes is not None and any(
        route.recording is not None and route.recording.format != "off" for route in routes.routes.routes
    )
    if settings.recording == "off" and not routed and not settings.recording_s3_bucket:
        return None
    try:
        if settings.recording_s3_bucket:
            return S3Storage(
                settings.recording_s3_bucket,
                prefix=settings.recording_s3_prefix,
                endpoint_url=settings.recording_s3_endpoint_url,
                region=settings.recording_s3_region,
                spool=settings.recording_dir,
            )
        return LocalStorage(settings.recording_dir)
    except OSError as exc:
        raise ConfigError(f"MOSHIMOSHI_RECORDING_DIR={settings.recording_dir}: {exc.strerror or exc}") from None
    except ImportError:
        raise ConfigError("MOSHIMOSHI_RECORDING_S3_BUCKET needs boto3 (pip install boto3)") from None
    except ValueError as exc:  # botocore refuses a region or endpoint
        raise ConfigError(f"MOSHIMOSHI_RECORDING_S3_*: {exc}") from None


def asr_finder(settings: GatewaySettings, registry: RegistryReader | None) -> AsrWorkerFinder | None:
    """How calls find an ASR worker: --asr-url, else the pool's; None when there is neither
    (or the callers' transcript is off)."""
    if not settings.transcription:
        return None
    if settings.asr_url:
        return AsrWorkerFinder(url=settings.asr_url, secret=settings.worker_secret)
    if registry is not None:
        return AsrWorkerFinder(registry, secret=settings.worker_secret)
    return None


class Gateway:
    """One gateway: answers calls, routes them to worker slots, serves the control plane."""

    def __init__(self, settings: GatewaySettings, *, model: str | None = None) -> None:
        if not settings.redis_url and not settings.worker_url:
            raise ConfigError("set REDIS_URL (a pool of workers) or MOSHIMOSHI_WORKER_URL (one worker)")
        self.settings = settings
        self.model = model or settings.model
        self.gateway_id = settings.gateway_id or f"{socket.gethostname()}-{settings.sip_port}-{os.getpid()}"
        self.draining = False
        self.started_at = time.time()
        self.exit_code = 0
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._http: uvicorn.Server | None = None
        self._http_socket: socket.socket | None = None
        self._announced = False  # the ready banner was printed
        self.http_port = settings.http_port

        # routing: a pool of workers through Redis, one worker, or the in-gateway echo
        self.pool: PoolClient | None = None
        self.records: CallRecords | None = None
        self.registry: RegistryReader | None = None
        self.router: Router
        if settings.redis_url:
            self.pool = connect(settings.redis_url)
            self.pool.retries.listeners.append(metrics.count_pool_retry)
            self.records = CallRecords(self.pool, retention=settings.call_retention_seconds)
            self.registry = RegistryReader(self.pool)
            self.router = PoolRouter(
                SlotLeases(self.pool),
                model=self.model,
                gateway_id=self.gateway_id,
                lease_ttl_ms=int(settings.lease_ttl_seconds * 1000),
                secret=settings.worker_secret,
            )
        elif settings.worker_url == LOOPBACK_URL:
            self.router = LoopbackRouter(settings.echo_delay_ms)
        else:
            assert settings.worker_url
            self.router = FixedRouter(settings.worker_url, model=self.model, secret=settings.worker_secret)
        self.pool_watch = PoolWatch(
            self.router,
            self.pool,
            self.registry,
            model=self.model,
            gateway_id=self.gateway_id,
            accepting=self.accepting,
        )
        self.concurrency = ConcurrencyHistory()  # the dashboard's sparkline, sampled by the pool's check
        self.pool_watch.on_sample = self.concurrency.add

        # routes: which model, limits and announcements each dialled number gets
        try:
            self.routes = RouteTable.open(
                settings.routes, model=self.model, digest_users=bool(settings.sip_credentials())
            )
        except RoutesError as exc:
            raise ConfigError(f"MOSHIMOSHI_ROUTES: {exc.where(settings.routes or '')}") from None

        # calls: their table, records, transcripts and the lifecycle that runs each one
        self.table = CallTable(settings.call_retention_seconds)
        self.pool_watch.live_calls = lambda: len(self.table)
        self.transcript_store = (
            TranscriptStore(self.pool, retention=settings.call_retention_seconds) if self.pool is not None else None
        )
        self.transcripts = TranscriptFeed(self.transcript_store)
        self.recorder = CallRecorder(self.records, self.pool.retries if self.pool is not None else None)
        self.refusal_store = RefusalStore(self.pool, window=REFUSALS_WINDOW) if self.pool is not None else None
        self.refusals = RefusalLog(self.refusal_store, window=REFUSALS_WINDOW)

        # the record beyond the agent's words: the caller's words, the recording, consent, DTMF
        consent: list[bytes] = []
        if settings.consent_announcement:
            try:
                consent = load_announcement(settings.consent_announcement)
            except ValueError as exc:
                raise ConfigError(f"MOSHIMOSHI_CONSENT_ANNOUNCEMENT={settings.consent_announcement}: {exc}") from None
        self.policy = CallPolicy.from_settings(settings, consent)  # what a route leaves unsaid
        self.asr_finder = asr_finder(settings, self.registry)
        self.recording_storage = recording_storage(settings, self.routes)
        self.recording_writer = (
            RecordingWriter(self.recording_storage, on_dropped=metrics.RECORDING_DROPPED.inc)
            if self.recording_storage is not None
            else None
        )
        self.capture = CallCapture(policy=self._policy_of, asr=self.asr_finder, writer=self.recording_writer)
        self.lifecycle = CallLifecycle(
            router=self.router,
            table=self.table,
            recorder=self.recorder,
            transcripts=self.transcripts,
            queue_seconds=settings.queue_seconds,
            rtp_timeout_seconds=settings.rtp_timeout_seconds,
            admission=self.admission,
            refusals=self.refusals,
            transfer_ring_seconds=settings.transfer_ring_seconds,
            stall_seconds=settings.worker_stall_ms / 1000,
            routes=self.routes,
            capture=self.capture,
        )
        self.call_stats = metrics.install_call_stats(self._live_counters)
        self.webhook = WebhookSender.from_settings(settings)
        self.lifecycle.on_end.append(self._on_call_end)

        # ingresses
        self.ports = PortAllocator(settings.rtp_port_min, settings.rtp_port_max)
        self.sip = SipIngress(self.lifecycle, settings, self.ports, gateway_id=self.gateway_id)
        tls_certificates, tls_verify = tls_settings(settings)
        self.ua = UserAgent(
            settings.sip_host,
            settings.sip_port,
            public_host=settings.public_host,
            on_invite=self.sip.on_invite,
            session_expires=settings.session_expires,
            user_agent="moshimoshi-gateway",
            guard=settings.sip_guard(),
            stream_limits=settings.sip_stream_limits(),
            tls_certificates=tls_certificates,
            tls_port=settings.sip_tls_port,
            tls_client_context=tls_verify,
        )
        self.ua.available = self.accepting
        self.lifecycle.transfers.dialer = SipDialer(self.ua, self.ports, settings, self.sip.rtp_bind_host)
        metrics.install_sip_stats(
            lambda: self.ua.transport.counters, lambda: self.ua.guard, lambda: self.ua.transport.tls_certificates
        )
        self.webrtc = WebRtcIngress(self.lifecycle, self.transcripts, settings, gateway_id=self.gateway_id)
        self.outbound = OutboundCalls(self.lifecycle, settings, self.ports, self.ua, gateway_id=self.gateway_id)

        # control plane: API tokens, hang-ups across replicas, what the API asks of the gateway
        self.api_tokens = ApiTokens.parse(settings.api_tokens)
        self.commands = CallCommands(self.pool, self._on_call_request) if self.pool is not None else None
        self.control = GatewayControl(
            lifecycle=self.lifecycle,
            directory=CallDirectory(self.table, self.records, self.registry, self.refusals),
            transcripts=TranscriptReader(self.table, self.transcripts, self.transcript_store, self.records),
            pool=PoolView(
                self.registry,
                worker_url=settings.worker_url,
                worker_secret=settings.worker_secret,
                live_calls=lambda: len(self.table),
            ),
            webrtc=self.webrtc,
            outbound=self.outbound,
            commands=self.commands,
            readiness=self.readiness,
            retry_after_seconds=settings.retry_after_seconds,
            recordings=self.recording_storage,
            concurrency=self.concurrency,
        )
        # transfers across replicas: the API of one replica, the call on another
        self.transfer_channel = (
            TransferChannel(self.pool, self.control.start_transfer) if self.pool is not None else None
        )
        self.control.transfers = self.transfer_channel

    # -- readiness ---------------------------------------------------------------------

    def accepting(self) -> bool:
        """True when a new call can be taken: not draining, pool reachable, a worker ready."""
        return self.admission() is None

    def admission(self) -> str | None:
        """None when a new call can be taken, else why not: draining, or unready."""
        if self.draining:
            return "draining"
        watch = self.pool_watch
        if not self.router.ready() or not watch.redis_ok or watch.workers_ready <= 0:
            return "unready"
        return None

    def readiness(self) -> Readiness:
        return Readiness(
            ready=self.accepting(),
            draining=self.draining,
            redis=self.pool_watch.redis_ok,
            workers_ready=self.pool_watch.workers_ready,
            calls=len(self.table),
        )

    def _on_workers(self, ready: int, models: list[str]) -> None:
        """The first time workers are ready the banner says where to call; later, the log."""
        if not ready:
            log.warning("no worker ready: new calls get 503 until one is")
            return
        what = (
            f"{ready} worker{'s' if ready != 1 else ''} ({', '.join(models)})"
            if self.pool is not None
            else "echo in the gateway"
            if self.settings.worker_url == LOOPBACK_URL
            else f"the worker at {self.settings.worker_url}"
        )
        if self._announced:
            log.info("%s ready: calls are answered again", what)
            return
        self._announced = True
        print(
            ready_banner(
                sip_host=self.settings.sip_host,
                public_host=self.settings.public_host,
                sip_port=self.ua.port,
                tls_port=self.ua.tls_port,
                http_host=self.settings.http_host,
                http_port=self.http_port,
                workers=what,
            ),
            flush=True,
        )

    # -- calls -------------------------------------------------------------------------

    def _live_counters(self) -> tp.Iterator[dict[str, int]]:
        for call in list(self.table.live.values()):
            counters = call.pipeline.counters()
            if counters is not None:
                yield counters

    def _policy_of(self, call: Call) -> CallPolicy:
        """What the call's record holds: its route's choices, the gateway's for the rest."""
        route = call.route
        consent = self.routes.prompt(route.consent_announcement) if route is not None else None
        return self.policy.for_route(route, consent)

    def _on_call_request(self, op: str, call_id: str) -> bool:
        return self.control.on_request(op, call_id)

    def _on_call_end(self, call: Call) -> None:
        counters = call.pipeline.counters()
        if counters is not None:
            self.call_stats.add_ended(counters)
        if call.recording is not None and call.recording.done is not None:
            self._background(self._after_recording(call))
        elif self.webhook is not None and call.stored:
            self.webhook.submit(call.id, call_ended_payload(call.record, call.transcript))

    async def _after_recording(self, call: Call) -> None:
        """The call's recording stored: its record says where; then the webhook (with it)."""
        if await self.capture.stored(call):
            result = call.recording.result if call.recording is not None else None
            metrics.RECORDINGS.labels("stored" if result is not None and result.location else "failed").inc()
            self.recorder.update(call, "recording")
            self.table.refresh(call)
        if self.webhook is not None and call.stored:
            self.webhook.submit(call.id, call_ended_payload(call.record, call.transcript))

    async def _sweep_recordings(self) -> None:
        """Delete recordings past the call records' retention (their records expire then too)."""
        storage = self.recording_storage
        assert storage is not None
        retention = self.settings.call_retention_seconds
        while True:
            try:
                removed = await asyncio.to_thread(storage.sweep, time.time() - retention)
            except Exception as exc:  # the bucket unreachable: next time
                log.warning("recordings past the retention not deleted: %s", type(exc).__name__)
            else:
                if removed:
                    metrics.RECORDINGS_EXPIRED.inc(removed)
                    log.info("deleted %d recordings past the retention", removed)
            await asyncio.sleep(min(SWEEP_MAX_SECONDS, retention / 10))

    def _background(self, coro: tp.Coroutine[tp.Any, tp.Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- start and stop ----------------------------------------------------------------

    def drain(self) -> None:
        """Take no new calls (503); stop once the calls in progress end or the grace runs out."""
        if self.draining:
            return
        self.draining = True
        log.info("draining: %d calls in progress, grace %.0fs", len(self.table), self.settings.drain_grace_seconds)
        self._background(self._drain())

    async def _drain(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.drain_grace_seconds):
                await self.table.idle.wait()
        self.stop()

    def stop(self) -> None:
        self._stop.set()

    def reload_routes(self) -> None:
        """SIGHUP: read the routes file again (calls in progress keep their routes)."""
        if self.settings.routes:
            log.info("SIGHUP: reloading the routes from %s", self.settings.routes)
            self._background(self._reload_routes())

    async def _reload_routes(self) -> None:
        await self.routes.reload()

    async def _listen(self) -> socket.socket:
        """SIP (UDP, TCP, TLS) and the HTTP socket, or StartupError naming the port taken."""
        listeners = gateway_listeners(self.settings)
        check_free(listeners)
        try:
            await self.ua.start()
        except OSError as exc:  # taken since the check
            check_free(listeners[:-1])
            raise StartupError(f"cannot listen for SIP on {self.settings.sip_host}: {exc.strerror or exc}") from None
        try:
            return listen(listeners[-1])
        except StartupError:
            await self.ua.stop()
            raise

    async def run(self) -> int:
        if self.settings.redis_url:
            await wait_for_redis(self.settings.redis_url, self.settings.redis_connect_seconds)
        http_socket = self._http_socket = await self._listen()
        app = create_app(self.control, self.api_tokens)
        config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False, log_config=None)
        self._http = uvicorn.Server(config)
        # Signals are the gateway's (SIGTERM drains while HTTP keeps answering probes);
        # uvicorn would otherwise take SIGINT/SIGTERM over and stop serving at once.
        self._http.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
        http_task = asyncio.create_task(self._http.serve(sockets=[http_socket]), name="http")
        while not self._http.started and not http_task.done():  # noqa: ASYNC110 (uvicorn has no event)
            await asyncio.sleep(0.02)
        if http_task.done():
            await self.ua.stop()
            http_task.result()
            return 1
        self.http_port = http_socket.getsockname()[1]
        self.pool_watch.on_workers = self._on_workers
        await self.pool_watch.refresh_once()
        refresher = asyncio.create_task(self.pool_watch.run(), name="pool-refresh")
        sampler = asyncio.create_task(sample_forever(self.table, self.recorder), name="quality-sampler")
        watchdog = asyncio.create_task(self.lifecycle.watch_stalls(), name="call-watchdog")
        routes_watch = asyncio.create_task(self.routes.watch(), name="routes-watch") if self.settings.routes else None
        self.start_control_plane()
        where = redacted(self.settings.redis_url) if self.settings.redis_url else self.settings.worker_url
        tls = f", TLS on {self.ua.tls_port}" if self.ua.tls_port is not None else ""
        log.info(
            "gateway %s: SIP on %s:%d (UDP+TCP%s), SRTP %s, HTTP on %s:%d, workers via %s, event loop %s",
            self.gateway_id,
            self.settings.sip_host,
            self.ua.port,
            tls,
            self.settings.srtp,
            self.settings.http_host,
            self.http_port,
            where,
            realtime.running_loop_name(),
        )
        if not self.pool_watch.workers_ready:
            log.info("calls get 503 until a worker is ready (a worker loading its model takes a while)")
        try:
            await self._stop.wait()
        finally:
            refresher.cancel()
            sampler.cancel()
            watchdog.cancel()
            if routes_watch is not None:
                routes_watch.cancel()
            await self._shutdown(http_task)
        return self.exit_code

    def start_control_plane(self) -> None:
        for weak in self.api_tokens.weak_entries():
            log.warning("MOSHIMOSHI_API_TOKENS entry %d is short (under 16 characters): easy to guess", weak)
        if not self.api_tokens:
            log.warning("no API tokens configured: /v1 refuses every request (set MOSHIMOSHI_API_TOKENS)")
        if not self.settings.worker_secret and self.settings.worker_url != LOOPBACK_URL:
            log.warning(
                "no worker secret: workers that require one refuse this gateway's sessions "
                "(set MOSHIMOSHI_WORKER_SECRET to theirs)"
            )
        if self.transcript_store is not None:
            self.transcript_store.start()
        if self.refusal_store is not None:
            self.refusal_store.start()
        if self.commands is not None:
            self.commands.start()
        if self.transfer_channel is not None:
            self.transfer_channel.start()
        if self.recording_writer is not None:
            self.recording_writer.start()
        if self.recording_storage is not None:
            self._sweeper = asyncio.create_task(self._sweep_recordings(), name="recording-sweeper")
        if self.settings.transcription and self.asr_finder is None:
            log.info("callers' transcript off: no pool to find ASR workers in, and no --asr-url")

    async def _shutdown(self, http_task: asyncio.Task) -> None:
        for call in list(self.table.live.values()):
            call.end("gateway-stopped")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_CALLS_SECONDS):
                await self.table.idle.wait()
        await self.ua.stop()
        if self._http is not None:
            self._http.should_exit = True
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await http_task
        if self._http_socket is not None:
            self._http_socket.close()
        if self.recording_writer is not None:
            await self.recording_writer.close(RECORDING_CLOSE_SECONDS)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2)
        await self.recorder.settle(timeout=2)
        await self.stop_control_plane()
        if self.pool is not None:
            with contextlib.suppress(Exception):
                await self.pool.close()

    async def stop_control_plane(self) -> None:
        """After the calls: store the last transcript pieces, deliver the last webhooks."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        if self.commands is not None:
            await self.commands.close()
        if self.transfer_channel is not None:
            await self.transfer_channel.close()
        if self.transcript_store is not None:
            await self.transcript_store.close(timeout=2.0)
        if self.refusal_store is not None:
            await self.refusal_store.close(timeout=1.0)
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
        loop.add_signal_handler(signal.SIGHUP, gateway.reload_routes)
        return await gateway.run()

    return realtime.run(main())
