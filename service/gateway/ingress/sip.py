"""SIP ingress: an INVITE becomes a Call with RTP media, or a clear SIP error.

The order matters for the caller: a slot on a worker is secured *before* the call is
answered (the caller hears ringing while it waits in the queue), so a call is never
answered only to be dropped; an unusable offer gets 488, no capacity 503 with
Retry-After, no RTP port 503. A caller who hangs up (CANCEL) while queued leaves the
queue at once and never takes a slot.

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
from service.gateway.calls.call import PLAYOUT_GRACE_SECONDS, Call, TranscriptEvent
from service.gateway.media.rtp_media import CallMedia
from service.gateway.routing.router import NoCapacity, RoutingUnavailable
from sip import codecs
from sip.dialog import Dialog
from sip.dtmf import INFO_DTMF_TYPES, DtmfDigit, DtmfParseError, parse_info_dtmf
from sip.errors import CallAborted, CallCancelled, SipError
from sip.identity import CallerIdentity
from sip.message import Request
from sip.rtpsession import PortsExhausted, RtpSession
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

if tp.TYPE_CHECKING:
    from service.gateway.main import Gateway

log = logging.getLogger(__name__)

RTP_TIMEOUT_CHECK_SECONDS = 1.0


def local_address_toward(remote_ip: str) -> str:
    """The local IP the kernel would use to reach ``remote_ip`` (no packet is sent)."""
    family = socket.AF_INET6 if ":" in remote_ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((remote_ip, 9))
            return probe.getsockname()[0]
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


class SipCallHandler:
    """Runs one incoming SIP call for the gateway, from INVITE to BYE."""

    def __init__(self, gateway: Gateway, incoming: IncomingCall) -> None:
        self.gateway = gateway
        self.incoming = incoming
        settings = gateway.settings
        self.srtp = srtp_policy(settings.srtp, incoming.transport, settings.srtp_allow_plaintext_keys)
        self.prefs = media_preferences(settings.codecs, self.srtp or "required")
        self.call = Call(ingress="sip", from_uri=str(incoming.from_uri), to_uri=str(incoming.to_uri),
                         sip_call_id=incoming.call_id, source=f"{incoming.source[0]}:{incoming.source[1]}",
                         identity=CallerIdentity.from_request(incoming.request), sip_transport=incoming.transport)
        self.rtp: RtpSession | None = None
        self.media: CallMedia | None = None
        self.dialog: Dialog | None = None
        self._ringing: asyncio.Task | None = None

    async def reject(self, status: int, reason: str, outcome: str, retry_after: bool = False) -> None:
        headers = {"Retry-After": str(self.gateway.settings.retry_after_seconds)} if retry_after else None
        await self.incoming.reject(status, reason, headers=headers)
        self.call.end(outcome)

    async def run(self) -> None:
        call = self.call
        gateway = self.gateway
        gateway.track(call)
        try:
            await self._answer()
            if call.state == "active":
                await self._converse()
        except CallCancelled:
            call.end("cancelled")
        except CallAborted as exc:
            call.end(exc.reason)
        except asyncio.CancelledError:
            call.end("gateway-stopped")
            raise
        except Exception:
            log.exception("call %s failed", call.id)
            call.end("error")
            with contextlib.suppress(Exception):
                await self.incoming.reject(500, "Server Internal Error")
        finally:
            await self._cleanup()

    async def _answer(self) -> None:
        call, incoming, gateway = self.call, self.incoming, self.gateway
        if not gateway.accepting():
            await self.reject(503, "Service Unavailable", "rejected-draining" if gateway.draining else
                              "rejected-unready", retry_after=True)
            metrics.REJECTED_CALLS.labels("draining" if gateway.draining else "unready").inc()
            return
        if self.srtp is None:
            metrics.REJECTED_CALLS.labels("srtp").inc()
            await self.reject(488, f"Not Acceptable Here (SRTP is required and its keys travel only over TLS, "
                              f"not {incoming.transport})", "rejected-srtp")
            return
        local_ip = gateway.settings.public_host or local_address_toward(incoming.source[0])
        try:
            self.rtp = await RtpSession.open(gateway.ports, host=gateway.rtp_bind_host(local_ip))
        except PortsExhausted:
            metrics.REJECTED_CALLS.labels("rtp-ports").inc()
            await self.reject(503, "Service Unavailable (no RTP port)", "rejected-ports", retry_after=True)
            return
        negotiated: NegotiatedMedia | None = None
        if incoming.offer is None:
            # A delayed offer: ours goes in the 200, the answer comes in the ACK.
            local_sdp = build_offer(self.prefs, local_ip, self.rtp.local_port)
        else:
            try:
                local_sdp, negotiated = answer_offer(incoming.offer, self.prefs, local_ip, self.rtp.local_port)
            except EncryptionMismatch as exc:
                metrics.REJECTED_CALLS.labels("srtp").inc()
                await self.reject(488, f"Not Acceptable Here ({exc})"[:160], "rejected-srtp")
                log.info("call %s: %s", call.id, exc)
                return
            except NoCommonCodec as exc:
                await self.reject(488, "Not Acceptable Here", "rejected-codec")
                log.info("call %s: %s", call.id, exc)
                return
            except SdpError as exc:
                await self.reject(488, f"Not Acceptable Here ({exc})"[:120], "rejected-sdp")
                return
            problem = self._media_problem(negotiated)
            if problem is not None:
                log.info("call %s: %s", call.id, problem)
                await self.reject(488, f"Not Acceptable Here ({problem})"[:160], "rejected-sdp")
                return
            call.codec = negotiated.codec
            call.media_encryption = media_encryption(negotiated)
        await self._record_start()
        if negotiated is not None and incoming.reliable_provisionals:
            # RFC 3262 peers (carriers, SBCs) expect the answer early and reliably.
            await incoming.provisional(183, "Session Progress", sdp=local_sdp)
        if not await self._connect():
            call.end(incoming.abort_reason or "cancelled")
            return
        if negotiated is not None:
            self._start_media(negotiated)
        dialog = await incoming.accept(str(local_sdp), headers={CALL_ID_HEADER: call.id},
                                       check_media=self._media_problem)
        self.dialog = dialog
        dialog.on_media_update = self._on_media_update
        dialog.on_info = self._on_info
        call.mark_answered()
        gateway.record_answer(call)

    async def _connect(self) -> bool:
        """Get a worker slot, waiting in the queue (ringing) for up to the queue time. False
        when the caller hung up (CANCEL) or the call ended otherwise first: the call left the
        queue at once and holds no slot. Raises NoCapacity, RoutingUnavailable (answered here)."""
        call, incoming, gateway = self.call, self.incoming, self.gateway
        connect = asyncio.create_task(call.connect(gateway.router, wait=gateway.settings.queue_seconds,
                                                   on_queued=self._queued), name=f"connect-{call.id}")
        aborted = asyncio.create_task(incoming.aborted.wait())
        try:
            await asyncio.wait({connect, aborted}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            aborted.cancel()
            if not connect.done():
                connect.cancel()  # leaves the queue; a claim under way is released (routing.py)
                await asyncio.gather(connect, return_exceptions=True)
        if connect.cancelled():
            metrics.ABANDONED_CALLS.inc()
            log.info("call %s: the caller hung up while waiting for a slot", call.id)
            return False
        try:
            connect.result()
        except NoCapacity as exc:
            metrics.REJECTED_CALLS.labels("no-slot").inc()
            log.info("call %s: no capacity: %s", call.id, exc)
            await self.reject(503, "Service Unavailable (all agents busy)", "rejected-busy", retry_after=True)
            return False
        except RoutingUnavailable as exc:
            metrics.REJECTED_CALLS.labels("pool-unavailable").inc()
            log.warning("call %s: pool unavailable: %s", call.id, exc)
            await self.reject(503, "Service Unavailable (pool unavailable)", "rejected-pool", retry_after=True)
            return False
        return not incoming.aborted.is_set()

    async def _queued(self) -> None:
        # Ringing in the background: a reliable 180 may wait for a PRACK, the queue must not.
        if self._ringing is None:
            self._ringing = asyncio.create_task(self.incoming.ringing(), name=f"ringing-{self.call.id}")

    def _media_problem(self, negotiated: NegotiatedMedia) -> str | None:
        """Why RTP cannot flow to what the peer's SDP names (c= address), or None."""
        if negotiated.remote_address is None or self.rtp is None:  # c=0.0.0.0: on hold
            return None
        return self.rtp.remote_problem(negotiated.remote_address)

    def _start_media(self, negotiated: NegotiatedMedia) -> None:
        assert self.rtp is not None
        if negotiated.remote_address is not None:
            self.rtp.update_remote(negotiated.remote_address, negotiated.remote_port, negotiated.remote_rtcp_port)
        self.rtp.trust_ip(self.incoming.source[0])
        settings = self.gateway.settings
        self.media = CallMedia(self.rtp, negotiated, to_model=self.call.send_to_model, on_dtmf=self._on_dtmf,
                               jitter_min_ms=settings.jitter_min_ms, jitter_max_ms=settings.jitter_max_ms,
                               resampler=settings.resampler)
        self.call.media = self.media
        self.media.start()

    def _on_media_update(self, negotiated: NegotiatedMedia) -> None:
        if self.media is not None:
            self.media.update(negotiated)
        elif self.call.state == "active" and not self.call.ended.is_set():
            # The answer to our offer (delayed offer) arrived in the ACK: media starts now.
            self.call.codec = negotiated.codec
            self.call.media_encryption = media_encryption(negotiated)
            self._start_media(negotiated)
            self.gateway.record_update(self.call, codec=negotiated.codec, media_encryption=self.call.media_encryption)

    def _on_dtmf(self, digit: DtmfDigit) -> None:
        metrics.DTMF_DIGITS.inc()
        self.call.add_transcript(TranscriptEvent(t=self.call.call_seconds, kind="dtmf", text=digit.digit,
                                                 duration_ms=digit.duration_ms))

    def _on_info(self, request: Request) -> None:
        """SIP INFO in the dialog: DTMF (application/dtmf-relay, application/dtmf) is reported
        like RFC 4733 digits; an empty INFO (a keep-alive) is answered 200; other bodies get
        415, unreadable DTMF bodies 400."""
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
        metrics.DTMF_DIGITS.inc()
        self.call.add_transcript(TranscriptEvent(t=self.call.call_seconds, kind="dtmf", text=digit.digit,
                                                 duration_ms=digit.duration_ms))

    async def _converse(self) -> None:
        call, gateway, dialog = self.call, self.gateway, self.dialog
        assert dialog is not None
        supervisor = asyncio.create_task(call.supervise(gateway.router), name=f"supervise-{call.id}")

        def on_terminated(future: asyncio.Future) -> None:
            if dialog.end_detail and not call.ended.is_set():
                call.end_detail = dialog.end_detail
            call.end(future.result() if not future.cancelled() and not future.exception() else "dialog-error")

        # The dialog's own future: never cancel it, only stop listening.
        dialog.terminated.add_done_callback(on_terminated)
        rtp_watch = asyncio.create_task(self._watch_rtp(), name=f"rtp-watch-{call.id}")
        try:
            await call.ended.wait()
        finally:
            for task in (supervisor, rtp_watch):
                task.cancel()
            dialog.terminated.remove_done_callback(on_terminated)
            await asyncio.gather(supervisor, rtp_watch, return_exceptions=True)
        if not dialog.is_terminated:
            if call.end_reason in ("max_duration", "worker-ended") and self.media is not None:
                await asyncio.sleep(min(PLAYOUT_GRACE_SECONDS, 0.02 * self.media.pacer.queued_packets))
            with contextlib.suppress(Exception):
                await dialog.bye()

    async def _watch_rtp(self) -> None:
        timeout = self.gateway.settings.rtp_timeout_seconds
        if timeout <= 0:
            return
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(RTP_TIMEOUT_CHECK_SECONDS)
            media = self.media
            if media is None or not media.negotiated.receives:
                continue
            if loop.time() - media.last_rtp_at > timeout:
                log.warning("call %s: no RTP for %.0fs, hanging up", self.call.id, timeout)
                self.call.end("rtp-timeout")
                return

    async def _record_start(self) -> None:
        self.gateway.record_create(self.call)

    async def _cleanup(self) -> None:
        call = self.call
        if self._ringing is not None:
            self._ringing.cancel()
            await asyncio.gather(self._ringing, return_exceptions=True)
        if self.media is not None:
            self.media.stop()
        await call.release()
        if self.rtp is not None:
            self.rtp.close()
        self.gateway.untrack(call)
