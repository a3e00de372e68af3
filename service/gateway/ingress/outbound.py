"""Outbound calls: the AI calls someone (``POST /v1/calls``: callbacks, reminders).

An outbound call is a call of the lifecycle like any other, whose leg *places* it: the
route is the one named (or the one the caller-ID number matches), the call is admitted
and its worker slot claimed **first** (no queue: with no slot free the API answers 503
with Retry-After and no INVITE is sent), then :meth:`OutboundLeg.answer` sends the
INVITE through the gateway's user agent (``UserAgent.invite``) and the API request
returns the call id. Once the callee answers, the media, the record and the transcript
are those of an inbound call. A callee that is busy, does not answer within
``--outbound-ring-seconds`` or refuses ends the call with ``outbound-busy``,
``outbound-no-answer`` or ``outbound-failed``, the SIP status in ``end_detail``.

Targets: a ``sip:``/``sips:`` URI is called directly; a number (``+81312345678``,
``tel:+81…``, ``03-1234-5678``) goes to the ``--outbound-trunk``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re

from service.api.control import CALL_ID_HEADER, ControlError
from service.gateway import metrics
from service.gateway.calls.call import Call
from service.gateway.calls.lifecycle import CallLifecycle, Refusal, Refused
from service.gateway.ingress.sip import (
    SipDialogLeg,
    local_address_toward,
    media_encryption,
    media_preferences,
    srtp_policy,
)
from service.gateway.media.prompts import Prompt
from service.gateway.routes.schema import Route
from service.settings import GatewaySettings
from sip.errors import CallFailed, SipParseError, TransportError
from sip.identity import CallerIdentity, Party
from sip.rtpsession import PortAllocator, PortsExhausted, RtpSession
from sip.sdp import build_offer
from sip.ua import UserAgent
from sip.uri import SipUri

log = logging.getLogger(__name__)

NUMBER = re.compile(r"\+?[0-9][0-9\-.() ]{0,31}")
VISUAL = re.compile(r"[\-.() ]")
BUSY = frozenset({486, 600})
NO_ANSWER = frozenset({408, 480, 487})
# a refusal before the INVITE, as the API answers it
HTTP_STATUS = {503: 503, 404: 404, 488: 422}


def outcome_of(status: int) -> str:
    """The end reason of an outbound call whose INVITE failed with ``status``."""
    if status in BUSY:
        return "outbound-busy"
    if status in NO_ANSWER:
        return "outbound-no-answer"
    return "outbound-failed"


def number_of(text: str) -> str | None:
    """``text`` as a number to dial (``tel:`` and visual separators dropped), or None."""
    candidate = text.removeprefix("tel:").strip()
    if not NUMBER.fullmatch(candidate):
        return None
    return VISUAL.sub("", candidate)


class OutboundCalls:
    """Places the calls that ``POST /v1/calls`` asks for (see the module docstring)."""

    def __init__(
        self,
        lifecycle: CallLifecycle,
        settings: GatewaySettings,
        ports: PortAllocator,
        ua: UserAgent,
        *,
        gateway_id: str,
    ) -> None:
        self.lifecycle = lifecycle
        self.settings = settings
        self.ports = ports
        self.ua = ua
        self.gateway_id = gateway_id
        self.trunk = SipUri.parse(settings.outbound_trunk, "outbound trunk") if settings.outbound_trunk else None
        user, _, password = (settings.outbound_auth or "").partition(":")
        self.credentials = (user, password) if settings.outbound_auth else None
        self._tasks: set[asyncio.Task[None]] = set()

    def target(self, to: str) -> SipUri:
        """The URI to INVITE for ``to``; ControlError 422 when it cannot be called."""
        if to.startswith(("sip:", "sips:")):
            try:
                return SipUri.parse(to, "to")
            except SipParseError as exc:
                raise ControlError(422, f"'to': {exc}") from None
        number = number_of(to)
        if number is None:
            raise ControlError(422, "'to' must be a sip: or sips: URI, a tel: URI or a number")
        if self.trunk is None:
            raise ControlError(422, "calling a number needs an outbound trunk (MOSHIMOSHI_OUTBOUND_TRUNK)")
        trunk = self.trunk
        return SipUri(trunk.host, user=number, port=trunk.port, scheme=trunk.scheme, params=trunk.params)

    def route_for(self, route_name: str | None, caller_id: str) -> Route:
        routes = self.lifecycle.routes
        if route_name:
            route = routes.named(route_name)
            if route is None:
                raise ControlError(404, f"no route named {route_name!r}")
            return route
        route = routes.resolve(caller_id) if caller_id else routes.named(routes.routes.unmatched or "")
        if route is None:
            raise ControlError(422, "no route for this call: name one ('route')")
        return route

    async def place(self, to: str, caller_id: str | None, route_name: str | None) -> Call:
        """Admit the call and claim its slot, then send the INVITE in the background;
        returns the call (ControlError: 422 bad target, 404 unknown route, 503 no slot)."""
        target = self.target(to)
        caller = caller_id or ""
        if caller and not caller.startswith(("sip:", "sips:")) and number_of(caller) is None:
            raise ControlError(422, "'from' must be a number or a sip: URI")
        route = self.route_for(route_name, number_of(caller) or "")
        refusal = self.lifecycle.refusal()
        if refusal is not None:  # refused before any state is made
            metrics.OUTBOUND_CALLS.labels("refused").inc()
            raise ControlError(
                503, f"not placing calls ({refusal.detail})", retry_after=self.settings.retry_after_seconds
            )
        identity = CallerIdentity(dialled=str(target.user or ""), from_party=Party(uri=caller, number=caller))
        call = Call("outbound", from_uri=caller, to_uri=str(target), identity=identity, gateway_id=self.gateway_id)
        leg = OutboundLeg(self, call, target, caller)
        task = asyncio.create_task(
            self.lifecycle.run(call, leg, route=route, outbound=True), name=f"outbound-{call.id}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        await asyncio.shield(leg.admitted)  # the slot is held (or ControlError)
        return call


class OutboundLeg(SipDialogLeg):
    """One call the gateway places, as a leg of the lifecycle: the INVITE goes out once the
    call holds its slot (``answer``); ``admitted`` tells the API."""

    def __init__(self, outbound: OutboundCalls, call: Call, target: SipUri, caller: str) -> None:
        super().__init__(outbound.settings, outbound.lifecycle, "")
        self.outbound = outbound
        self.call = call
        self.target = target
        self.caller = caller
        self.admitted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.admitted.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved, even if unawaited
        self.srtp: str | None = None

    def _refused(self, status: int, detail: str, retry: bool) -> None:
        if not self.admitted.done():
            self.admitted.set_exception(
                ControlError(
                    HTTP_STATUS.get(status, 500),
                    detail,
                    retry_after=self.settings.retry_after_seconds if retry else None,
                )
            )

    async def prepare(self, call: Call) -> None:
        settings = self.settings
        transport = (self.target.wire_transport or "UDP").upper()
        self.srtp = srtp_policy(settings.srtp, transport, settings.srtp_allow_plaintext_keys)
        if self.srtp is None:
            raise Refused(
                Refusal(488, f"SRTP is required and its keys travel only over TLS, not {transport}", "rejected-srtp")
            )
        try:
            self.peer_ip = await self.outbound.ua.transport.resolve(self.target.param("maddr") or self.target.host)
        except TransportError as exc:
            raise Refused(Refusal(488, str(exc), "outbound-failed")) from None
        local_ip = settings.public_host or local_address_toward(self.peer_ip)
        bind = (
            settings.sip_host
            if settings.sip_host not in ("0.0.0.0", "::")
            else ("::" if ":" in local_ip and settings.sip_host == "::" else settings.sip_host)
        )
        try:
            self.rtp = await RtpSession.open(self.outbound.ports, host=bind)
        except PortsExhausted:
            metrics.REJECTED_CALLS.labels("rtp-ports").inc()
            raise Refused(Refusal(503, "no RTP port", "rejected-ports", retry_after=True)) from None
        self.local_sdp = str(build_offer(media_preferences(settings.codecs, self.srtp), local_ip, self.rtp.local_port))

    async def queued(self, call: Call, prompt: Prompt | None) -> None:
        pass  # outbound calls do not queue: no slot, no call

    async def left(self) -> str:
        await asyncio.get_running_loop().create_future()  # nobody is on the line before the answer
        return ""

    async def refuse(self, refusal: Refusal) -> None:
        metrics.OUTBOUND_CALLS.labels("refused").inc()
        self._refused(refusal.status, refusal.detail or refusal.outcome, refusal.retry_after)

    async def answer(self, call: Call) -> bool:
        """The slot is held: tell the API, then call (until answered, refused, or given up)."""
        if not self.admitted.done():
            self.admitted.set_result(None)
        caller = self.caller
        invite = asyncio.create_task(
            self.outbound.ua.invite(
                self.target,
                self.local_sdp,
                timeout=self.settings.outbound_ring_seconds,
                username=self.outbound.credentials[0] if self.outbound.credentials else None,
                password=self.outbound.credentials[1] if self.outbound.credentials else None,
                from_uri=caller if caller.startswith(("sip:", "sips:")) else None,
                from_user=None if caller.startswith(("sip:", "sips:")) else caller or None,
                headers={CALL_ID_HEADER: call.id},
            ),
            name=f"invite-{call.id}",
        )
        ended = asyncio.ensure_future(call.ended.wait())
        try:
            await asyncio.wait({invite, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
            if not invite.done():  # hung up through the API while ringing: CANCEL
                invite.cancel()
                await asyncio.gather(invite, return_exceptions=True)
        if invite.cancelled():
            metrics.OUTBOUND_CALLS.labels("cancelled").inc()
            return False
        try:
            dialog = invite.result()
        except CallFailed as exc:
            reason = outcome_of(exc.status)
            metrics.OUTBOUND_CALLS.labels(reason.removeprefix("outbound-")).inc()
            log.info("call %s: outbound call to %s failed: %s %s", call.id, self.target, exc.status, exc.reason)
            call.end(reason, f"{exc.status} {exc.reason or ''}".strip())
            return False
        self._attach_dialog(dialog)
        negotiated = dialog.media
        problem = "the answer has no usable media" if negotiated is None else self._media_problem(negotiated)
        if negotiated is None or problem is not None:
            metrics.OUTBOUND_CALLS.labels("failed").inc()
            call.end("outbound-failed", problem or "")
            with contextlib.suppress(Exception):
                await dialog.bye()
            return False
        self.negotiated = negotiated
        call.record.codec = negotiated.codec
        call.record.media_encryption = media_encryption(negotiated)
        self._start_media(call, negotiated)
        metrics.OUTBOUND_CALLS.labels("answered").inc()
        log.info("call %s: outbound call to %s answered (%s)", call.id, self.target, negotiated.codec)
        return True

    async def close(self, call: Call) -> None:
        self._refused(503, f"the call ended before it was placed ({call.end_reason})", retry=True)
        self._stop_media()
