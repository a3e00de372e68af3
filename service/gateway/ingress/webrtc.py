"""WebRTC ingress: an SDP offer (WHIP style) becomes a Call with Opus media, or a clear error.

The same order as a SIP call: the offer is checked (400 with the reason), admission is
the gateway's (503 with Retry-After while it is not accepting or when no slot frees within
the queue wait), and a slot on a worker is held *before* the answer goes back, so a peer
that gets an answer has an agent. The peer then has ``webrtc_connect_seconds`` to bring up
ICE and DTLS; one that does not is dropped and its slot released. Each session is run by
one task that owns its peer connection, media and call from offer to hang-up and releases
them on every exit path.

Hang-up: DELETE on the session's URL (``remote-hangup``), the peer connection failing or
closing (``peer-gone``), no RTP for ``rtp_timeout_seconds`` (``rtp-timeout``), the worker
ending the session, or the API's hang-up. A data channel opened by the peer carries the
call's id, the live transcript and the gateway's view of call quality as JSON messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import typing as tp

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.rtcdatachannel import RTCDataChannel
from aiortc.rtcicetransport import parse_stun_turn_uri

from service.config import ConfigError
from service.gateway import metrics
from service.gateway.calls.call import PLAYOUT_GRACE_SECONDS, Call, TranscriptEvent
from service.gateway.ingress.aiortc_tap import tap_receiver
from service.gateway.ingress.webrtc_sdp import OfferError, OfferSummary, check_offer
from service.gateway.media.webrtc_media import WebRtcMedia
from service.gateway.routing.router import NoCapacity, RoutingUnavailable
from service.settings import GatewaySettings

if tp.TYPE_CHECKING:
    from service.gateway.main import Gateway

log = logging.getLogger(__name__)

STATS_SECONDS = 1.0
RTP_TIMEOUT_CHECK_SECONDS = 1.0
CLOSE_SECONDS = 5.0
PENDING_MESSAGES = 200  # data channel messages kept until the channel opens


class OfferRejected(Exception):
    """The offer gets an HTTP error: ``status`` (400, 503, 500) and a reason for the peer."""

    def __init__(self, status: int, reason: str, *, retry_after: bool = False) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.retry_after = retry_after


def ice_servers(settings: GatewaySettings) -> list[RTCIceServer]:
    """The configured STUN/TURN servers; an empty list means host candidates only.

    (aiortc falls back to a public STUN server when given none at all, so the empty list
    is passed explicitly.)
    """
    servers = []
    for url in settings.webrtc_ice_servers:
        try:
            parsed = parse_stun_turn_uri(url)
        except ValueError:
            raise ConfigError(f"MOSHIMOSHI_WEBRTC_ICE_SERVERS: cannot parse {url!r}") from None
        if parsed["scheme"] == "stun":
            servers.append(RTCIceServer(urls=url))
        else:
            servers.append(RTCIceServer(urls=url, username=settings.webrtc_turn_username,
                                        credential=settings.webrtc_turn_password))
    return servers


def opus_codecs() -> list[tp.Any]:
    capabilities = RTCRtpSender.getCapabilities("audio")
    return [c for c in capabilities.codecs if c.mimeType.lower() == "audio/opus"]


class WebRtcIngress:
    """The gateway's WebRTC sessions: offers in, answers out, hang-ups by session id."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.ice_servers = ice_servers(gateway.settings)
        if not logging.getLogger("aioice").level:
            logging.getLogger("aioice").setLevel(logging.WARNING)  # a line per candidate pair otherwise
        self.sessions: dict[str, WebRtcSession] = {}
        self._tasks: set[asyncio.Task] = set()

    async def offer(self, sdp: str, source: str) -> WebRtcSession:
        """Answer an offer: the session, with ``answer_sdp`` set, or raise OfferRejected."""
        gateway = self.gateway
        try:
            summary = check_offer(sdp)
        except OfferError as exc:
            metrics.WEBRTC_OFFERS.labels("bad-sdp").inc()
            raise OfferRejected(400, str(exc)) from None
        if not gateway.accepting():
            reason = "draining" if gateway.draining else "unready"
            metrics.WEBRTC_OFFERS.labels("unavailable").inc()
            metrics.REJECTED_CALLS.labels(reason).inc()
            raise OfferRejected(503, f"not taking calls ({reason})", retry_after=True)
        session = WebRtcSession(self, source, summary)
        self.sessions[session.id] = session
        task = asyncio.create_task(session.run(sdp), name=f"webrtc-{session.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # The session owns itself from here: if this request is cancelled (the peer went
        # away before its answer), the session still ends by its connect timeout.
        await asyncio.shield(session.answer)
        return session

    def hangup(self, session_id: str) -> bool:
        session = self.sessions.get(session_id)
        if session is None:
            return False
        session.call.end("remote-hangup")
        return True


class WebRtcSession:
    """One WebRTC call, from offer to hang-up; ``run`` owns and releases everything."""

    def __init__(self, ingress: WebRtcIngress, source: str, offer: OfferSummary) -> None:
        self.ingress = ingress
        self.gateway = ingress.gateway
        self.offer = offer
        self.call = Call(ingress="webrtc", from_uri=f"webrtc:{source}", source=source, codec="opus/48000",
                         media_encryption="DTLS-SRTP")  # WebRTC media is always DTLS-SRTP (aiortc)
        self.id = self.call.id
        settings = self.gateway.settings
        self.media = WebRtcMedia(to_model=self.call.send_to_model, jitter_min_ms=settings.jitter_min_ms,
                                 jitter_max_ms=settings.jitter_max_ms)
        self.call.media = self.media
        self.answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.answer.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved, even if unawaited
        self.pc: RTCPeerConnection | None = None
        self.channel: RTCDataChannel | None = None
        self.connected = asyncio.Event()
        self._pending: list[str] = []
        self._answered_at = 0.0

    @property
    def answer_sdp(self) -> str:
        return self.answer.result()

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self, offer_sdp: str) -> None:
        call = self.call
        self.gateway.track(call)
        try:
            await self._negotiate(offer_sdp)
            if self.answer.done() and not self.answer.exception() and not call.ended.is_set():
                await self._await_connection()
            if call.state == "active":
                await self._converse()
        except asyncio.CancelledError:
            call.end("gateway-stopped")
            self._reject(503, "the gateway is stopping", "gateway-stopped", retry_after=True)
            raise
        except Exception:
            log.exception("webrtc call %s failed", call.id)
            metrics.WEBRTC_OFFERS.labels("error").inc()
            self._reject(500, "internal error", "error")
            call.end("error")
        finally:
            await self._cleanup()

    def _reject(self, status: int, reason: str, outcome: str, *, retry_after: bool = False) -> None:
        if not self.answer.done():
            self.answer.set_exception(OfferRejected(status, reason, retry_after=retry_after))
        self.call.end(outcome)

    async def _negotiate(self, offer_sdp: str) -> None:
        call, gateway = self.call, self.gateway
        pc = self.pc = RTCPeerConnection(RTCConfiguration(iceServers=self.ingress.ice_servers))
        transceiver = pc.addTransceiver(self.media.track, direction="sendrecv")
        transceiver.setCodecPreferences(opus_codecs())
        pc.on("connectionstatechange", self._on_connection_state)
        pc.on("datachannel", self._on_datachannel)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        except Exception as exc:  # aiortc's parser raises anything from AssertionError to KeyError
            metrics.WEBRTC_OFFERS.labels("bad-sdp").inc()
            detail = str(exc) or type(exc).__name__
            self._reject(400, f"the WebRTC stack cannot use this offer: {detail}"[:300], "rejected-sdp")
            return
        tap_receiver(transceiver.receiver, self.media.on_rtp, asyncio.get_running_loop().time)
        gateway.record_create(call)
        try:
            await call.connect(gateway.router, wait=gateway.settings.queue_seconds)
        except NoCapacity as exc:
            metrics.WEBRTC_OFFERS.labels("busy").inc()
            metrics.REJECTED_CALLS.labels("no-slot").inc()
            log.info("webrtc call %s: no capacity: %s", call.id, exc)
            self._reject(503, "all agents busy", "rejected-busy", retry_after=True)
            return
        except RoutingUnavailable as exc:
            metrics.WEBRTC_OFFERS.labels("unavailable").inc()
            metrics.REJECTED_CALLS.labels("pool-unavailable").inc()
            log.warning("webrtc call %s: pool unavailable: %s", call.id, exc)
            self._reject(503, "pool unavailable", "rejected-pool", retry_after=True)
            return
        if call.ended.is_set():
            self._reject(503, "the call ended while waiting for an agent", call.end_reason, retry_after=True)
            return
        await pc.setLocalDescription(await pc.createAnswer())
        self._answered_at = asyncio.get_running_loop().time()
        metrics.WEBRTC_OFFERS.labels("answered").inc()
        self.answer.set_result(pc.localDescription.sdp)

    async def _await_connection(self) -> None:
        call = self.call
        connected = asyncio.ensure_future(self.connected.wait())
        ended = asyncio.ensure_future(call.ended.wait())
        try:
            await asyncio.wait({connected, ended}, timeout=self.gateway.settings.webrtc_connect_seconds,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            connected.cancel()
            ended.cancel()
        if call.ended.is_set():
            return
        if not self.connected.is_set():
            log.info("webrtc call %s: the peer did not connect within %.0fs", call.id,
                     self.gateway.settings.webrtc_connect_seconds)
            call.end("connect-timeout")
            return
        metrics.WEBRTC_CONNECT.observe(asyncio.get_running_loop().time() - self._answered_at)
        call.mark_answered()
        self.gateway.record_answer(call)
        self.media.start()
        self._send({"type": "call", "call_id": call.id, "model": call.model, "license": call.license,
                    "worker_id": call.worker_id})

    async def _converse(self) -> None:
        call = self.call
        tasks = [
            asyncio.create_task(call.supervise(self.gateway.router), name=f"supervise-{call.id}"),
            asyncio.create_task(self._poll_stats(), name=f"stats-{call.id}"),
            asyncio.create_task(self._forward_transcript(), name=f"transcript-{call.id}"),
        ]
        if self.offer.direction in ("sendrecv", "sendonly"):
            tasks.append(asyncio.create_task(self._watch_rtp(), name=f"rtp-watch-{call.id}"))
        try:
            await call.ended.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if call.end_reason in ("max_duration", "worker-ended"):
            await asyncio.sleep(min(PLAYOUT_GRACE_SECONDS, 0.02 * self.media.pacer.queued_packets))
        self._send({"type": "end", "reason": call.end_reason})

    async def _cleanup(self) -> None:
        call = self.call
        if not self.answer.done():
            self._reject(503, "the call ended before it was answered", call.end_reason or "error",
                         retry_after=True)
        self.media.stop()
        if self.pc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pc.close(), CLOSE_SECONDS)
        await call.release()
        self.gateway.untrack(call)
        self.ingress.sessions.pop(self.id, None)

    # -- peer connection events --------------------------------------------------------

    def _on_connection_state(self) -> None:
        pc = self.pc
        if pc is None:
            return
        state = pc.connectionState
        if state == "connected":
            self.connected.set()
        elif state in ("failed", "closed") and not self.call.ended.is_set():
            log.info("webrtc call %s: peer connection %s", self.call.id, state)
            self.call.end("peer-gone" if self.connected.is_set() else "ice-failed")

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if self.channel is not None:
            return  # one events channel per call; others are ignored
        self.channel = channel

        def flush() -> None:
            pending, self._pending = self._pending, []
            for message in pending:
                channel.send(message)

        if channel.readyState == "open":
            flush()
        else:
            channel.on("open", flush)

    def _send(self, message: dict[str, tp.Any]) -> None:
        """A JSON message to the peer's data channel (kept until it opens; dropped if it never does)."""
        text = json.dumps(message, ensure_ascii=False)
        channel = self.channel
        if channel is not None and channel.readyState == "open":
            with contextlib.suppress(Exception):
                channel.send(text)
        elif len(self._pending) < PENDING_MESSAGES:
            self._pending.append(text)

    # -- while connected ---------------------------------------------------------------

    async def _forward_transcript(self) -> None:
        queue: asyncio.Queue[TranscriptEvent | None] = asyncio.Queue()
        listeners = self.gateway.transcript_listeners.setdefault(self.call.id, set())
        listeners.add(queue)
        try:
            for event in list(self.call.transcript):
                self._send({"type": "transcript", **event.to_dict()})
            while (event := await queue.get()) is not None:
                self._send({"type": "transcript", **event.to_dict()})
        finally:
            listeners.discard(queue)

    async def _poll_stats(self) -> None:
        """aiortc's RTCP view (round trip, what the peer reports of our stream) into the quality,
        and the quality to the peer, every second."""
        assert self.pc is not None
        while True:
            with contextlib.suppress(Exception):
                report = await self.pc.getStats()
                for stats in report.values():
                    if stats.type == "remote-inbound-rtp":
                        if stats.roundTripTime is not None:
                            self.media.rtt_ms = stats.roundTripTime * 1000
                        self.media.remote_loss_fraction = round(stats.fractionLost / 256, 4)
                        self.media.remote_jitter_ms = round(stats.jitter / 48, 2)
            self._send({"type": "quality", **self.media.quality()})
            await asyncio.sleep(STATS_SECONDS)

    async def _watch_rtp(self) -> None:
        timeout = self.gateway.settings.rtp_timeout_seconds
        if timeout <= 0:
            return
        while True:
            await asyncio.sleep(RTP_TIMEOUT_CHECK_SECONDS)
            if time.monotonic() - self.media.last_rtp_at > timeout:
                log.warning("webrtc call %s: no RTP for %.0fs, hanging up", self.call.id, timeout)
                self.call.end("rtp-timeout")
                return
