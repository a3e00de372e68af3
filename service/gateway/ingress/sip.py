"""SIP ingress: an INVITE becomes a call with RTP media, run by the call lifecycle.

``SipLeg`` translates SIP into the lifecycle's steps: the offer is checked before a slot
is claimed (488 for an unusable one, 503 when no RTP port is free), the caller hears the
route's announcement while the call waits in the queue (early media: a 183 Session
Progress with the SDP answer, reliable when the caller supports 100rel, then the prompt
on the call's RTP stream; or a plain 180 Ringing for the route announcement ``ringing``
or an offerless INVITE), a CANCEL while queued leaves the queue at once, and the answer
is a 200 OK naming the call id (``X-Moshimoshi-Call-Id``), the media going on on the same
RTP stream; a BYE from either side ends the call. A transfer may ask the caller's side to
take the call elsewhere by REFER (``refer``; ``calls/transfer.py``).

Offers: an INVITE with SDP is answered in the 200 (and first, reliably, in a 183 Session
Progress when the caller supports RFC 3262 100rel); an INVITE without SDP (a delayed
offer, the default of Cisco CUCM and Avaya trunks) gets our offer in the 200, and the
media starts with the answer the ACK brings; an ACK without a usable answer ends the call
with BYE (end reason ``ack-without-answer`` or ``unacceptable-answer``).

Encryption: ``--srtp`` decides which offers are answered (``sip.sdp``), but SDES keys only
travel over TLS: on UDP/TCP the policy ``optional`` becomes ``off`` (an RTP/SAVP offer there
gets 488 unless it also offers RTP/AVP) and ``required`` refuses the call with 488, unless
``--srtp-allow-plaintext-keys`` (tests). Refusals for encryption end as ``rejected-srtp``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import typing as tp

from service.api.control import CALL_ID_HEADER
from service.gateway import metrics
from service.gateway.calls.call import Call
from service.gateway.calls.lifecycle import CallLifecycle, PeerLeft, Refusal, Refused
from service.gateway.media.prompts import Prompt, PromptPlayer
from service.gateway.media.rtp_media import CallMedia
from service.gateway.routes.table import Trunk
from service.settings import GatewaySettings
from sip import codecs
from sip.dialog import Dialog
from sip.dtmf import INFO_DTMF_TYPES, DtmfParseError, parse_info_dtmf
from sip.errors import CallAborted, CallCancelled, SipError
from sip.identity import CallerIdentity
from sip.message import Request
from sip.refer import Referral
from sip.rtpsession import PortAllocator, PortsExhausted, RtpSession
from sip.sdp import (
    EncryptionMismatch,
    MediaPreferences,
    NegotiatedMedia,
    NoCommonCodec,
    SdpError,
    answer_offer,
    build_offer,
)
from sip.ua import IncomingCall

log = logging.getLogger(__name__)

REASON_PHRASES = {
    400: "Bad Request",
    404: "Not Found",
    488: "Not Acceptable Here",
    500: "Server Internal Error",
    503: "Service Unavailable",
}


def local_address_toward(remote_ip: str) -> str:
    """The local IP the kernel would use to reach ``remote_ip`` (no packet is sent)."""
    family = socket.AF_INET6 if ":" in remote_ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((remote_ip, 9))
            address: str = probe.getsockname()[0]
            return address
        except OSError:
            return "::1" if family == socket.AF_INET6 else "127.0.0.1"


def media_preferences(configured: list[str], srtp: str = "off") -> MediaPreferences:
    """No configured codecs: the best audio the peer offers (Opus, G.722, then G.711 in the
    offer's order). A configured list: those codecs only, in that order. ``srtp``: the
    encryption policy for this call (see :func:`srtp_policy`)."""
    if not configured:
        return MediaPreferences(codecs=list(codecs.available()), order="quality", srtp=srtp)
    return MediaPreferences(codecs=list(configured), order="ours", srtp=srtp)


def srtp_policy(configured: str, transport: str, allow_plaintext_keys: bool) -> str | None:
    """The SRTP policy for a call whose signalling came over ``transport``: the configured
    one over TLS (or anywhere with ``allow_plaintext_keys``); elsewhere keys would travel in
    clear text, so ``optional`` is ``off``, and ``required`` is None: the call cannot be taken."""
    if configured == "off" or transport == "TLS" or allow_plaintext_keys:
        return configured
    return "off" if configured == "optional" else None


def media_encryption(negotiated: NegotiatedMedia) -> str:
    return "SDES-SRTP" if negotiated.srtp is not None else "none"


class SipIngress:
    """The UserAgent's ``on_invite``: each INVITE runs as a call of the lifecycle."""

    def __init__(
        self, lifecycle: CallLifecycle, settings: GatewaySettings, ports: PortAllocator, *, gateway_id: str
    ) -> None:
        self.lifecycle = lifecycle
        self.settings = settings
        self.ports = ports
        self.gateway_id = gateway_id

    def rtp_bind_host(self, local_ip: str) -> str:
        host = self.settings.sip_host
        if host in ("0.0.0.0", "::"):
            return "::" if ":" in local_ip and host == "::" else host
        return host

    async def on_invite(self, incoming: IncomingCall) -> None:
        call = Call(
            "sip",
            from_uri=str(incoming.from_uri),
            to_uri=str(incoming.to_uri),
            sip_call_id=incoming.call_id,
            source=f"{incoming.source[0]}:{incoming.source[1]}",
            sip_transport=incoming.transport,
            identity=CallerIdentity.from_request(incoming.request),
            gateway_id=self.gateway_id,
        )
        call.trunk = Trunk(source=incoming.source[0], digest_user=incoming.digest_user)
        await self.lifecycle.run(call, SipLeg(self, incoming))


@contextlib.contextmanager
def _peer_errors() -> tp.Iterator[None]:
    """The SIP stack's "the caller went away" as the lifecycle's PeerLeft."""
    try:
        yield
    except CallCancelled:
        raise PeerLeft("cancelled") from None
    except CallAborted as exc:
        raise PeerLeft(exc.reason) from None


class SipDialogLeg:
    """What an incoming and an outgoing SIP call share once there is a dialog: the RTP
    media (started on the negotiated SDP, moved by re-INVITEs), SIP INFO DTMF, the peer's
    BYE, ours. ``peer_ip`` is the signalling peer, whose address media may latch from."""

    def __init__(self, settings: GatewaySettings, lifecycle: CallLifecycle, peer_ip: str) -> None:
        self.settings = settings
        self.lifecycle = lifecycle
        self.peer_ip = peer_ip
        self.call: Call | None = None
        self.rtp: RtpSession | None = None
        self.local_sdp = ""
        self.negotiated: NegotiatedMedia | None = None
        self.media: CallMedia | None = None
        self.dialog: Dialog | None = None

    def _attach_dialog(self, dialog: Dialog) -> None:
        self.dialog = dialog
        dialog.on_media_update = self._on_media_update
        dialog.on_info = self._on_info

    async def watch(self, call: Call) -> None:
        dialog = self.dialog
        assert dialog is not None

        def on_terminated(future: asyncio.Future[str]) -> None:
            reason = future.result() if not future.cancelled() and not future.exception() else "dialog-error"
            call.end(reason, dialog.end_detail)

        # The dialog's own future: never cancel it, only stop listening.
        dialog.terminated.add_done_callback(on_terminated)
        try:
            await asyncio.get_running_loop().create_future()  # until cancelled
        finally:
            dialog.terminated.remove_done_callback(on_terminated)

    async def hang_up(self, call: Call) -> None:
        if self.dialog is not None and not self.dialog.is_terminated:
            with contextlib.suppress(Exception):
                await self.dialog.bye()

    def _stop_media(self) -> None:
        if self.media is not None:
            self.media.stop()
        if self.rtp is not None:
            self.rtp.close()

    # -- media -------------------------------------------------------------------------

    def _media_problem(self, negotiated: NegotiatedMedia) -> str | None:
        """Why RTP cannot flow to what the peer's SDP names (c= address), or None."""
        if negotiated.remote_address is None or self.rtp is None:  # c=0.0.0.0: on hold
            return None
        return self.rtp.remote_problem(negotiated.remote_address)

    def _start_media(self, call: Call, negotiated: NegotiatedMedia) -> None:
        assert self.rtp is not None
        if negotiated.remote_address is not None:
            self.rtp.update_remote(negotiated.remote_address, negotiated.remote_port, negotiated.remote_rtcp_port)
        self.rtp.trust_ip(self.peer_ip)
        settings = self.settings
        self.media = CallMedia(
            self.rtp,
            negotiated,
            to_model=call.pipeline.to_model,
            taps=call.pipeline.taps,
            jitter_min_ms=settings.jitter_min_ms,
            jitter_max_ms=settings.jitter_max_ms,
            resampler=settings.resampler,
        )
        call.pipeline.attach_edge(self.media)
        self.media.start()

    def _on_media_update(self, negotiated: NegotiatedMedia) -> None:
        call = self.call
        if self.media is not None:
            self.media.update(negotiated)
        elif call is not None and call.answered and not call.ended.is_set():
            # The answer to our offer (delayed offer) arrived in the ACK: media starts now.
            call.record.codec = negotiated.codec
            call.record.media_encryption = media_encryption(negotiated)
            self._start_media(call, negotiated)
            self.lifecycle.media_changed(call)

    def _on_info(self, request: Request) -> None:
        """SIP INFO in the dialog: DTMF (application/dtmf-relay, application/dtmf) goes to
        the call's ``dtmf`` tap like RFC 4733 digits; an empty INFO (a keep-alive) is
        answered 200; other bodies get 415, unreadable DTMF bodies 400."""
        content_type = request.content_type
        if not request.body and content_type is None:
            metrics.SIP_INFO.labels("empty").inc()
            return
        if content_type not in INFO_DTMF_TYPES:
            metrics.SIP_INFO.labels("unsupported-type").inc()
            raise SipError(415, headers={"Accept": ", ".join(INFO_DTMF_TYPES)})
        try:
            digit = parse_info_dtmf(content_type, request.body)
        except DtmfParseError as exc:
            metrics.SIP_INFO.labels("bad-body").inc()
            raise SipError(400, f"Bad Request ({exc})"[:160]) from None
        metrics.SIP_INFO.labels("dtmf").inc()
        if self.call is not None:
            self.call.pipeline.taps.dtmf.emit(digit)


class SipLeg(SipDialogLeg):
    """One incoming SIP call as a leg of the lifecycle, from INVITE to BYE."""

    def __init__(self, ingress: SipIngress, incoming: IncomingCall) -> None:
        super().__init__(ingress.settings, ingress.lifecycle, incoming.source[0])
        self.ingress = ingress
        self.incoming = incoming
        self.srtp = srtp_policy(self.settings.srtp, incoming.transport, self.settings.srtp_allow_plaintext_keys)
        self.prefs = media_preferences(self.settings.codecs, self.srtp or "required")
        self._ringing: asyncio.Task[None] | None = None
        self._early_sdp_sent = False  # our answer went in a 183 (early media may flow)
        self._announcement: PromptPlayer | None = None

    # -- before the answer -------------------------------------------------------------

    async def prepare(self, call: Call) -> None:
        self.call = call
        incoming = self.incoming
        if self.srtp is None:
            metrics.REJECTED_CALLS.labels("srtp").inc()
            raise Refused(
                Refusal(
                    488,
                    f"SRTP is required and its keys travel only over TLS, not {incoming.transport}",
                    "rejected-srtp",
                )
            )
        local_ip = self.settings.public_host or local_address_toward(incoming.source[0])
        try:
            self.rtp = await RtpSession.open(self.ingress.ports, host=self.ingress.rtp_bind_host(local_ip))
        except PortsExhausted:
            metrics.REJECTED_CALLS.labels("rtp-ports").inc()
            raise Refused(Refusal(503, "no RTP port", "rejected-ports", retry_after=True)) from None
        if incoming.offer is None:
            # A delayed offer: ours goes in the 200, the answer comes in the ACK.
            self.local_sdp = str(build_offer(self.prefs, local_ip, self.rtp.local_port))
            return
        try:
            local_sdp, negotiated = answer_offer(incoming.offer, self.prefs, local_ip, self.rtp.local_port)
        except EncryptionMismatch as exc:
            metrics.REJECTED_CALLS.labels("srtp").inc()
            log.info("call %s: %s", call.id, exc)
            raise Refused(Refusal(488, str(exc), "rejected-srtp")) from None
        except NoCommonCodec as exc:
            log.info("call %s: %s", call.id, exc)
            raise Refused(Refusal(488, "", "rejected-codec")) from None
        except SdpError as exc:
            raise Refused(Refusal(488, str(exc), "rejected-sdp")) from None
        problem = self._media_problem(negotiated)
        if problem is not None:
            log.info("call %s: %s", call.id, problem)
            raise Refused(Refusal(488, problem, "rejected-sdp"))
        self.local_sdp, self.negotiated = str(local_sdp), negotiated
        call.record.codec = negotiated.codec
        call.record.media_encryption = media_encryption(negotiated)
        if incoming.reliable_provisionals:
            # RFC 3262 peers (carriers, SBCs) expect the answer early and reliably.
            with _peer_errors():
                await incoming.provisional(183, "Session Progress", sdp=local_sdp)
            self._early_sdp_sent = True

    async def queued(self, call: Call, prompt: Prompt | None) -> None:
        # In the background: a reliable provisional may wait for a PRACK, the queue must not.
        if self._ringing is not None:
            return
        if prompt is None or self.negotiated is None:  # no early media without our answer
            self._ringing = asyncio.create_task(self.incoming.ringing(), name=f"ringing-{call.id}")
            return
        self._start_media(call, self.negotiated)
        self._announcement = PromptPlayer(
            prompt, call.pipeline.play, keep_going=lambda: not (call.answered or call.pipeline.model_frames)
        )
        self._ringing = asyncio.create_task(self._early_media(), name=f"early-media-{call.id}")

    async def _early_media(self) -> None:
        """A 183 with our answer (unless one went already), then the announcement."""
        if not self._early_sdp_sent:
            await self.incoming.provisional(183, "Session Progress", sdp=self.local_sdp)
            self._early_sdp_sent = True
        if self._announcement is not None:
            self._announcement.start()

    async def left(self) -> str:
        await self.incoming.aborted.wait()
        return self.incoming.abort_reason or "cancelled"

    async def refuse(self, refusal: Refusal) -> None:
        phrase = REASON_PHRASES.get(refusal.status, "")
        reason = f"{phrase} ({refusal.detail})"[:160] if refusal.detail else phrase
        headers = {"Retry-After": str(self.settings.retry_after_seconds)} if refusal.retry_after else None
        await self.incoming.reject(refusal.status, reason or None, headers=headers)

    # -- the answer and after ----------------------------------------------------------

    async def answer(self, call: Call) -> bool:
        await self._stop_announcement(call)
        if self.negotiated is not None and self.media is None:
            self._start_media(call, self.negotiated)
        with _peer_errors():
            dialog = await self.incoming.accept(
                self.local_sdp, headers={CALL_ID_HEADER: call.id}, check_media=self._media_problem
            )
        self._attach_dialog(dialog)
        return True

    # -- transfer (calls/transfer.py: ReferringLeg) -------------------------------------

    def refer_allowed(self) -> bool:
        """False when the caller's side listed its methods (Allow) without REFER."""
        dialog = self.dialog
        return dialog is not None and (dialog.peer_allow is None or "REFER" in dialog.peer_allow)

    async def refer(self, target: str) -> Referral:
        dialog = self.dialog
        if dialog is None or dialog.is_terminated:
            raise RuntimeError("the call's dialog is not up")
        return await dialog.refer(target)

    async def _stop_announcement(self, call: Call) -> None:
        if self._ringing is not None:
            self._ringing.cancel()
            await asyncio.gather(self._ringing, return_exceptions=True)
        if self._announcement is not None:
            await self._announcement.stop()
            self._announcement = None
            call.pipeline.stop_prompt()

    async def close(self, call: Call) -> None:
        await self._stop_announcement(call)
        self._stop_media()
        if self.dialog is None:  # ended before its answer (a hang-up while queued): say so
            retry = call.end_reason == "gateway-stopped"
            with contextlib.suppress(Exception):
                await self.refuse(Refusal(503, call.end_reason, call.end_reason, retry_after=retry))
