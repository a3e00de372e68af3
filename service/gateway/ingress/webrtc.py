"""WebRTC ingress: an SDP offer (WHIP style) becomes a call with Opus media, run by the call
lifecycle, or a clear error.

The same order as a SIP call: the offer is checked (400 with the reason; an offer the
gateway is not taking gets 503 with Retry-After before any state is made), and a slot on
a worker is held *before* the answer goes back, so a peer that gets an answer has an
agent. The peer then has ``webrtc_connect_seconds`` to bring up ICE and DTLS; one that
does not is dropped and its slot released.

Hang-up: DELETE on the session's URL (``remote-hangup``), the peer connection failing or
closing (``peer-gone``), no RTP for ``rtp_timeout_seconds`` (``rtp-timeout``), the worker
ending the session, or the API's hang-up. A data channel opened by the peer carries the
call's id, the live transcript and the gateway's view of call quality as JSON messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import typing as tp

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.rtcdatachannel import RTCDataChannel
from aiortc.rtcicetransport import parse_stun_turn_uri

from service.config import ConfigError
from service.gateway import metrics
from service.gateway.calls.call import Call
from service.gateway.calls.lifecycle import CallLifecycle, Refusal, Refused
from service.gateway.calls.transcript import TranscriptEvent, TranscriptFeed
from service.gateway.ingress.aiortc_tap import tap_receiver
from service.gateway.ingress.webrtc_sdp import OfferError, OfferSummary, check_offer
from service.gateway.media.prompts import Prompt
from service.gateway.media.webrtc_media import WebRtcMedia
from service.settings import GatewaySettings

log = logging.getLogger(__name__)

STATS_SECONDS = 1.0
CLOSE_SECONDS = 5.0
PENDING_MESSAGES = 200  # data channel messages kept until the channel opens
OFFER_OUTCOMES = {
    "rejected-busy": "busy",
    "rejected-route-limit": "busy",
    "rejected-sdp": "bad-sdp",
    "rejected-no-route": "no-route",
    "error": "error",
}  # else "unavailable"


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
            servers.append(
                RTCIceServer(urls=url, username=settings.webrtc_turn_username, credential=settings.webrtc_turn_password)
            )
    return servers


def opus_codecs() -> list[tp.Any]:
    capabilities = RTCRtpSender.getCapabilities("audio")
    return [c for c in capabilities.codecs if c.mimeType.lower() == "audio/opus"]


class WebRtcIngress:
    """The gateway's WebRTC sessions: offers in, answers out, hang-ups by session id."""

    def __init__(
        self, lifecycle: CallLifecycle, transcripts: TranscriptFeed, settings: GatewaySettings, *, gateway_id: str
    ) -> None:
        self.lifecycle = lifecycle
        self.transcripts = transcripts
        self.settings = settings
        self.gateway_id = gateway_id
        self.ice_servers = ice_servers(settings)
        if not logging.getLogger("aioice").level:
            logging.getLogger("aioice").setLevel(logging.WARNING)  # a line per candidate pair otherwise
        self.sessions: dict[str, WebRtcLeg] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def offer(self, sdp: str, source: str, *, owner: str = "") -> WebRtcLeg:
        """Answer an offer: the session, with ``answer_sdp`` set, or raise OfferRejected.
        ``owner``: who placed it (only they, or an admin, may end it)."""
        try:
            summary = check_offer(sdp)
        except OfferError as exc:
            metrics.WEBRTC_OFFERS.labels("bad-sdp").inc()
            raise OfferRejected(400, str(exc)) from None
        refusal = self.lifecycle.refusal()
        if refusal is not None:  # refused before any state is made
            metrics.WEBRTC_OFFERS.labels("unavailable").inc()
            metrics.REJECTED_CALLS.labels(refusal.outcome.removeprefix("rejected-")).inc()
            self.lifecycle.refused_before_call("webrtc", refusal, gateway_id=self.gateway_id)
            raise OfferRejected(refusal.status, f"not taking calls ({refusal.detail})", retry_after=refusal.retry_after)
        call = Call(
            "webrtc",
            from_uri=f"webrtc:{source}",
            source=source,
            codec="opus/48000",
            media_encryption="DTLS-SRTP",
            gateway_id=self.gateway_id,
        )  # WebRTC media: always DTLS-SRTP
        leg = WebRtcLeg(self, call, sdp, summary)
        leg.owner = owner
        self.sessions[leg.id] = leg
        task = asyncio.create_task(self.lifecycle.run(call, leg), name=f"webrtc-{leg.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # The session owns itself from here: if this request is cancelled (the peer went
        # away before its answer), the session still ends by its connect timeout.
        await asyncio.shield(leg.answer_sdp)
        return leg

    def hangup(self, session_id: str, *, owner: str | None = None) -> bool:
        """End a session: ``owner``'s only (None: any); False when there is none."""
        leg = self.sessions.get(session_id)
        if leg is None or (owner is not None and not hmac.compare_digest(leg.owner, owner)):
            return False
        leg.call.end("remote-hangup")
        return True


class WebRtcLeg:
    """One WebRTC call as a leg of the lifecycle: its peer connection, data channel and media."""

    def __init__(self, ingress: WebRtcIngress, call: Call, offer_sdp: str, offer: OfferSummary) -> None:
        self.ingress = ingress
        self.settings = ingress.settings
        self.call = call
        self.offer_sdp = offer_sdp
        self.offer = offer
        self.id = call.id
        self.owner = ""  # who placed the call: a fingerprint of the API token
        self.media = WebRtcMedia(
            to_model=call.pipeline.to_model,
            taps=call.pipeline.taps,
            jitter_min_ms=self.settings.jitter_min_ms,
            jitter_max_ms=self.settings.jitter_max_ms,
            receives=offer.direction in ("sendrecv", "sendonly"),
        )
        call.pipeline.attach_edge(self.media)
        self.answer_sdp: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.answer_sdp.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved, even if unawaited
        self.pc: RTCPeerConnection | None = None
        self.channel: RTCDataChannel | None = None
        self.connected = asyncio.Event()
        self._pending: list[str] = []

    # -- before the answer -------------------------------------------------------------

    async def prepare(self, call: Call) -> None:
        pc = self.pc = RTCPeerConnection(RTCConfiguration(iceServers=self.ingress.ice_servers))
        transceiver = pc.addTransceiver(self.media.track, direction="sendrecv")
        transceiver.setCodecPreferences(opus_codecs())
        pc.on("connectionstatechange", self._on_connection_state)
        pc.on("datachannel", self._on_datachannel)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=self.offer_sdp, type="offer"))
        except Exception as exc:  # aiortc's parser raises anything from AssertionError to KeyError
            detail = str(exc) or type(exc).__name__
            raise Refused(
                Refusal(400, f"the WebRTC stack cannot use this offer: {detail}"[:300], "rejected-sdp")
            ) from None
        tap_receiver(transceiver.receiver, self.media.on_rtp, asyncio.get_running_loop().time)

    async def queued(self, call: Call, prompt: Prompt | None) -> None:
        pass  # the peer waits for its HTTP answer meanwhile (no media before it)

    async def left(self) -> str:
        await asyncio.get_running_loop().create_future()  # a peer that leaves ends the call itself
        return ""

    async def refuse(self, refusal: Refusal) -> None:
        metrics.WEBRTC_OFFERS.labels(OFFER_OUTCOMES.get(refusal.outcome, "unavailable")).inc()
        self._reject(refusal.status, refusal.detail, retry_after=refusal.retry_after)

    def _reject(self, status: int, reason: str, *, retry_after: bool = False) -> None:
        if not self.answer_sdp.done():
            self.answer_sdp.set_exception(OfferRejected(status, reason, retry_after=retry_after))

    # -- the answer and after ----------------------------------------------------------

    async def answer(self, call: Call) -> bool:
        assert self.pc is not None
        loop = asyncio.get_running_loop()
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        answered_at = loop.time()
        metrics.WEBRTC_OFFERS.labels("answered").inc()
        self.answer_sdp.set_result(self.pc.localDescription.sdp)
        connected = asyncio.ensure_future(self.connected.wait())
        ended = asyncio.ensure_future(call.ended.wait())
        try:
            await asyncio.wait(
                {connected, ended}, timeout=self.settings.webrtc_connect_seconds, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            connected.cancel()
            ended.cancel()
        if call.ended.is_set():
            return False
        if not self.connected.is_set():
            log.info(
                "webrtc call %s: the peer did not connect within %.0fs", call.id, self.settings.webrtc_connect_seconds
            )
            call.end("connect-timeout")
            return False
        metrics.WEBRTC_CONNECT.observe(loop.time() - answered_at)
        self.media.start()
        record = call.record
        self._send(
            {
                "type": "call",
                "call_id": call.id,
                "model": record.model,
                "license": record.license,
                "worker_id": record.worker_id,
            }
        )
        return True

    async def watch(self, call: Call) -> None:
        tasks = [
            asyncio.create_task(self._poll_stats(), name=f"stats-{call.id}"),
            asyncio.create_task(self._forward_transcript(call), name=f"transcript-{call.id}"),
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def hang_up(self, call: Call) -> None:
        self._send({"type": "end", "reason": call.end_reason})

    async def close(self, call: Call) -> None:
        if call.end_reason == "gateway-stopped":
            self._reject(503, "the gateway is stopping", retry_after=True)
        else:
            self._reject(503, "the call ended before it was answered", retry_after=True)
        self.media.stop()
        if self.pc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pc.close(), CLOSE_SECONDS)
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

    async def _forward_transcript(self, call: Call) -> None:
        feed = self.ingress.transcripts
        queue = feed.subscribe(call.id)
        try:
            for event in list(call.transcript):
                self._send({"type": "transcript", **event.to_dict()})
            item: TranscriptEvent | None
            while (item := await queue.get()) is not None:
                self._send({"type": "transcript", **item.to_dict()})
        finally:
            feed.unsubscribe(call.id, queue)

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
            self._send({"type": "quality", **dataclasses.asdict(self.media.quality())})
            await asyncio.sleep(STATS_SECONDS)
