"""Dialogs (RFC 3261 §12-§15): in-dialog requests both ways, the 2xx/ACK handshake,
re-offers (hold, unhold, refresh), session timers (RFC 4028) and blind transfer by REFER
(RFC 3515, ``dialog.refer(target)``: its NOTIFYs are answered here, see ``sip/refer.py``).

A ``Dialog`` is created by the ``UserAgent`` (``IncomingCall.accept`` or
``UserAgent.invite``), sees it only through :class:`DialogUA`, and lives until
``terminated`` resolves with its reason:

- ``remote-bye``: the peer hung up; ``local-bye``: we did (``await dialog.bye()``);
- ``ack-timeout``: the ACK for our 2xx never came (we sent BYE);
- ``session-expired``: the session timer ran out, or a refresh failed (we sent BYE);
- ``transport-error``: the peer could not be reached for a refresh;
- ``ack-without-answer`` / ``unacceptable-answer``: we made the offer in our 2xx (the INVITE
  had no SDP: a delayed offer) and the ACK carried no answer, or one we cannot use (we sent
  BYE with a ``Reason`` header; ``end_detail`` says what was wrong);
- ``stopped``: the user agent was stopped.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import typing as tp
from collections.abc import Awaitable, Callable, Coroutine, Mapping

from sip.acl import canonical_ip
from sip.errors import SipError, SipParseError, TransportError
from sip.headers import Address, Headers
from sip.message import HeaderItems, Request, Response, make_response
from sip.refer import SIPFRAG, Referral, ReferStatus, event_package, parse_sipfrag, subscription_terminated
from sip.sdp import (
    NegotiatedMedia,
    SdpError,
    SessionDescription,
    negotiated_as_answerer,
    negotiated_from_answer,
    reanswer,
)
from sip.session_timer import SessionTimer, answer_session_timer, min_se_of, timer_from_response
from sip.transaction import ServerTransaction, Timers, TransactionLayer
from sip.transport import Flow, Transport
from sip.uri import SipUri, Uri, parse_uri

log = logging.getLogger("sip.dialog")

DialogId = tuple[str, str, str]
SdpLike = str | SessionDescription
ReofferHandler = Callable[[SessionDescription], SdpLike | Awaitable[SdpLike]]
InfoHandler = Callable[[Request], None | Awaitable[None]]
MediaHandler = Callable[[NegotiatedMedia], None]
MediaCheck = Callable[[NegotiatedMedia], str | None]


class DialogUA(tp.Protocol):
    """What a dialog needs of its user agent (``sip.ua.UserAgent`` is one): where it runs
    and sends, how its headers and responses are made, where its background work goes, and
    the agent's session-timer settings and counters. A dialog knows nothing else of it."""

    loop: asyncio.AbstractEventLoop
    timers: Timers
    transport: Transport
    transactions: TransactionLayer
    allow: str  # the Allow header's value
    user_agent: str
    session_expires: int
    min_se: int
    ack_timeouts: int
    session_refreshes: int

    def response(
        self,
        request: Request,
        status: int,
        reason: str | None = None,
        *,
        headers: HeaderItems | None = None,
        to_tag: str | None = None,
    ) -> Response: ...
    def capabilities(self, request: Request) -> Response: ...
    def via(self, flow: Flow) -> str: ...
    def contact(self, flow: Flow, *, secure: bool = False) -> str: ...
    def authorization_headers(
        self, request: Request, response: Response, credentials: tuple[str, str], tried_nonces: set[str]
    ) -> list[tuple[str, str]]: ...
    def spawn(self, coro: Coroutine[tp.Any, tp.Any, tp.Any]) -> asyncio.Task[tp.Any]: ...
    def forget_dialog(self, dialog: Dialog) -> None: ...


TERMINATION_REASONS = (
    "remote-bye",
    "local-bye",
    "ack-timeout",
    "session-expired",
    "transport-error",
    "ack-without-answer",
    "unacceptable-answer",
    "stopped",
)


def uri_ip(uri: Uri | None) -> str | None:
    """The IP address a SIP URI names (its maddr, else its host), or None for a name."""
    if not isinstance(uri, SipUri):
        return None
    return canonical_ip(uri.param("maddr") or uri.host)


def peer_hosts(source: str, route_set: list[Address], target: Uri | None) -> frozenset[str]:
    """Where a dialog's peer may send its in-dialog requests from: the address the dialog's
    first request came from (or went to), the first hop of its route set, and its remote
    target (Contact), each when an IP address is known."""
    hosts = {canonical_ip(source), uri_ip(route_set[0].uri) if route_set else None, uri_ip(target)}
    return frozenset(host for host in hosts if host is not None)


class Dialog:
    """One dialog, UAS or UAC side. See the module docstring for its life cycle.

    Application hooks (all optional):

    - ``on_reoffer(offer) -> answer``: answer a re-INVITE/UPDATE offer (str or
      SessionDescription, may be async); raise ``SipError`` to reject (e.g. 488). The
      default answers like the previous answer, direction mirrored (hold/unhold).
    - ``on_info(request)``: an INFO request (e.g. ``application/dtmf-relay``); 200 is sent
      after it returns; raising ``SipError`` answers that status instead.
    - ``on_media_update(media)``: the negotiated media changed (re-offer accepted, or the
      answer to our offer arrived in the ACK).
    - ``check_media(media) -> problem``: a reason the media cannot be used (an address the
      RTP socket cannot reach), or None. A re-offer it refuses gets 488; an answer in the
      ACK it refuses ends the dialog ("unacceptable-answer").
    """

    def __init__(
        self,
        ua: DialogUA,
        *,
        role: str,
        call_id: str,
        local_tag: str,
        remote_tag: str,
        local_header: str,
        remote_header: str,
        local_seq: int,
        remote_seq: int | None,
        remote_target: Uri,
        route_set: list[str],
        flow: Flow,
        local_sdp: SessionDescription | None,
        remote_sdp: SessionDescription | None,
        peer_allow: set[str] | None,
        credentials: tuple[str, str] | None = None,
    ) -> None:
        self.ua = ua
        self.role = role
        self.call_id = call_id
        self.local_tag = local_tag
        self.remote_tag = remote_tag
        self.local_header = local_header
        self.remote_header = remote_header
        self.local_seq = local_seq
        self.remote_seq = remote_seq
        self.remote_target = remote_target
        self.route_set = [Address.parse(value, "Record-Route") for value in route_set]
        self._route_values = list(route_set)
        self.flow = flow
        self._first_hops = peer_hosts(flow.host, self.route_set, None)
        self.local_sdp = local_sdp
        self.remote_sdp = remote_sdp
        # RFC 3261 §12.1: a sips: dialog over TLS; its Contacts are sips: URIs
        self.secure = False
        self.media: NegotiatedMedia | None = None
        self.answer_response: Response | None = None  # UAC: the 2xx that created the dialog
        self.session_timer: SessionTimer | None = None
        self.peer_allow = peer_allow
        self.credentials = credentials
        self.on_reoffer: ReofferHandler | None = None
        self.on_info: InfoHandler | None = None
        self.on_media_update: MediaHandler | None = None
        self.check_media: MediaCheck | None = None
        self.end_detail = ""  # why the dialog ended, in words, when its reason alone does not say
        self._awaiting_answer = False  # our offer went in the 2xx: the ACK must answer it
        self.confirmed = asyncio.Event()
        self.terminated: asyncio.Future[str] = ua.loop.create_future()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._pending_2xx: tuple[int, bytes, Flow] | None = None
        self._retransmit_interval = ua.timers.t1
        self._ack: tuple[int, bytes, Flow] | None = None
        self._outgoing_offer = False
        self._incoming_invite: ServerTransaction | None = None
        self._referral: Referral | None = None  # the REFER we sent last (sip/refer.py)
        self._referral_seqs = (0, 0)  # the CSeq numbers its REFER may have used (auth retries)
        if flow.connection is not None:
            flow.connection.hold()

    @property
    def id(self) -> DialogId:
        return (self.call_id, self.local_tag, self.remote_tag)

    @property
    def local_uri(self) -> Uri:
        return Address.parse(self.local_header).uri

    @property
    def remote_uri(self) -> Uri:
        return Address.parse(self.remote_header).uri

    @property
    def is_terminated(self) -> bool:
        return self.terminated.done()

    @property
    def peer_hosts(self) -> frozenset[str]:
        """The IP addresses this dialog's peer may send from (see ``peer_hosts``)."""
        target = uri_ip(self.remote_target)
        return self._first_hops if target is None else self._first_hops | {target}

    def is_peer(self, host: str) -> bool:
        """Whether a request from ``host`` may come from this dialog's peer."""
        ip = canonical_ip(host)
        return ip in self._first_hops or (ip is not None and ip == uri_ip(self.remote_target))

    def __repr__(self) -> str:
        return f"<Dialog {self.role} {self.call_id} {'terminated' if self.is_terminated else 'active'}>"

    # -- timers ---------------------------------------------------------------------------

    def _set_timer(self, name: str, delay: float, callback: Callable[[], object]) -> None:
        self._clear_timer(name)
        self._timers[name] = self.ua.loop.call_later(delay, callback)

    def _clear_timer(self, name: str) -> None:
        handle = self._timers.pop(name, None)
        if handle is not None:
            handle.cancel()

    # -- termination ----------------------------------------------------------------------

    def _terminate(self, reason: str) -> None:
        if self.terminated.done():
            return
        log.info("dialog %s ended: %s", self.call_id, reason)
        self.terminated.set_result(reason)
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        self._pending_2xx = None
        self.confirmed.set()
        if self._referral is not None:
            self._referral.finish(ReferStatus(487, f"the dialog ended ({reason}) before the transfer did", local=True))
        if self.flow.connection is not None:
            self.flow.connection.release()
        self.ua.forget_dialog(self)

    async def bye(self) -> None:
        """Hang up: send BYE (after the ACK, if ours is the answering side and it is still
        awaited) and return when the BYE transaction ends. ``terminated`` resolves with
        ``local-bye`` at once."""
        if self.is_terminated:
            return
        if not self.confirmed.is_set():
            try:
                await asyncio.wait_for(self.confirmed.wait(), self.ua.timers.timeout)
            except TimeoutError:
                pass
        await self._bye("local-bye")

    async def _bye(self, reason: str, headers: Mapping[str, str] | None = None) -> None:
        if self.is_terminated:
            return
        self._terminate(reason)
        response = await self.request("BYE", headers=headers)
        if not response.is_success:
            log.info("BYE in %s answered %d %s", self.call_id, response.status, response.reason)

    def _bye_soon(self, reason: str, headers: Mapping[str, str] | None = None) -> None:
        if not self.is_terminated:
            self.ua.spawn(self._bye(reason, headers))

    # -- sending requests -----------------------------------------------------------------

    async def _next_hop(self) -> Flow:
        target = self.route_set[0].uri if self.route_set else self.remote_target
        if not isinstance(target, SipUri):
            raise TransportError(f"cannot route a request to {target}")
        transport = target.wire_transport or self.flow.transport
        if transport not in ("UDP", "TCP", "TLS"):
            raise TransportError(f"transport {transport} is not supported")
        connection = self.flow.connection
        if transport == self.flow.transport and connection is not None and not connection.closed:
            return self.flow  # the dialog's connection (RFC 5923 reuse), while it lasts
        host = target.param("maddr") or target.host
        address = await self.ua.transport.resolve(host)
        return Flow(transport, address, target.port_for(transport), server_name=host)

    def _target_and_routes(self) -> tuple[Uri, list[str]]:
        """Request-URI and Route set per §12.2.1.1 (loose or strict routing)."""
        if not self.route_set:
            return self.remote_target, []
        first = self.route_set[0].uri
        if isinstance(first, SipUri) and not first.has_param("lr"):
            return first.without_headers(), self._route_values[1:] + [f"<{self.remote_target}>"]
        return self.remote_target, list(self._route_values)

    def _build(
        self,
        method: str,
        flow: Flow,
        *,
        cseq: int | None = None,
        body: bytes = b"",
        content_type: str | None = None,
        headers: Mapping[str, str] | None = None,
        auth: list[tuple[str, str]] | None = None,
    ) -> Request:
        if cseq is None:
            self.local_seq += 1
            cseq = self.local_seq
        uri, routes = self._target_and_routes()
        out = Headers()
        out.add("Via", self.ua.via(flow))
        out.add("Max-Forwards", "70")
        out.add("From", self.local_header)
        out.add("To", self.remote_header)
        out.add("Call-ID", self.call_id)
        out.add("CSeq", f"{cseq} {method}")
        for route in routes:
            out.add("Route", route)
        if method in ("INVITE", "UPDATE", "REFER"):
            out.add("Contact", self.ua.contact(flow, secure=self.secure))
            out.add("Allow", self.ua.allow)
        if method in ("INVITE", "UPDATE") and "Supported" not in (headers or {}):
            out.add("Supported", "timer")
        out.add("User-Agent", self.ua.user_agent)
        for name, value in (headers or {}).items():
            out.add(name, value)
        for name, value in auth or []:
            out.add(name, value)
        if body:
            out.add("Content-Type", content_type or "application/sdp")
        return Request(method, uri, out, body)

    async def request(
        self,
        method: str,
        *,
        body: bytes | str = b"",
        content_type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """Send an in-dialog request and return its final response (a local 408/503
        when the peer could not be reached). Answers a 401/407 with the dialog's
        credentials; ACKs a 2xx to INVITE."""
        if self.is_terminated and method != "BYE":
            raise RuntimeError(f"{self!r} is terminated")
        data = body.encode() if isinstance(body, str) else body
        auth: list[tuple[str, str]] = []
        tried: set[str] = set()
        for attempt in range(3):
            try:
                flow = await self._next_hop()
            except TransportError as exc:
                response = Response(503, f"Service Unavailable ({exc})")
                response.local = True
                return response
            request = self._build(method, flow, body=data, content_type=content_type, headers=headers, auth=auth)
            transaction = await self.ua.transactions.send_request(request, flow)
            response = await transaction.response
            if response.status in (401, 407) and self.credentials is not None and attempt < 2:
                auth = self.ua.authorization_headers(request, response, self.credentials, tried)
                if auth:
                    continue
            if method == "INVITE" and response.is_success:
                self._send_ack(request.cseq.seq, flow, auth)
                self._refresh_target(response)
            return response
        raise AssertionError("unreachable")

    def _send_ack(self, cseq: int, flow: Flow, auth: list[tuple[str, str]] | None = None, body: bytes = b"") -> None:
        ack = self._build("ACK", flow, cseq=cseq, body=body, auth=auth)
        data = ack.to_bytes()
        self._ack = (cseq, data, flow)
        self.ua.transport.send(data, flow)
        self.confirmed.set()

    def on_2xx_retransmission(self, response: Response) -> None:
        """The 2xx to our INVITE came again: our ACK was lost; send it again (§13.2.2.4)."""
        if self._ack is not None and response.cseq.seq == self._ack[0]:
            self.ua.transport.send(self._ack[1], self._ack[2])

    def _refresh_target(self, message: Request | Response) -> None:
        try:
            contacts = message.contacts
        except SipParseError:
            return
        if contacts:
            self.remote_target = contacts[0].uri
        allow = message.values("Allow")
        if allow:
            self.peer_allow = {m.upper() for m in allow}

    async def reinvite(self, sdp: SdpLike | None = None, headers: Mapping[str, str] | None = None) -> Response:
        """Send a re-INVITE offering ``sdp`` (default: our current SDP), e.g. to hold
        (``a=sendonly``) or resume. On 2xx the answer becomes ``remote_sdp``; the final
        response is returned either way."""
        if self._outgoing_offer or self._incoming_invite is not None or self._pending_2xx is not None:
            raise RuntimeError("an offer/answer exchange is already in progress in this dialog")
        body = str(sdp) if sdp is not None else (str(self.local_sdp) if self.local_sdp else "")
        extra = dict(self._timer_request_headers())
        extra.update(headers or {})
        self._outgoing_offer = True
        try:
            response = await self.request("INVITE", body=body, content_type="application/sdp", headers=extra)
        finally:
            self._outgoing_offer = False
        if response.is_success:
            self._after_offer_accepted(body, response)
        return response

    async def refer(
        self, target: str | Uri, *, referred_by: str | None = None, headers: Mapping[str, str] | None = None
    ) -> Referral:
        """Ask the peer to call ``target`` (a blind transfer, RFC 3515): send REFER with
        ``Refer-To`` and ``Referred-By`` (default: our URI in this dialog) and return the
        :class:`~sip.refer.Referral` once the REFER has its final response. When that is a
        2xx the peer's NOTIFYs report the transfer's progress (``referral.outcome()``); any
        other response finishes the referral with its status (405, 603, 501: the peer does
        not take transfers). Raises ``SipParseError`` for a target that is no URI, and
        ``RuntimeError`` when the dialog ended or a referral is still under way."""
        uri = parse_uri(str(target), "Refer-To")
        if self.is_terminated:
            raise RuntimeError(f"{self!r} is terminated")
        if self._referral is not None and not self._referral.done:
            raise RuntimeError("a transfer is already under way in this dialog")
        first = self.local_seq + 1
        referral = Referral(event_id=str(first))
        self._referral = referral
        self._referral_seqs = (first, first)
        extra = {"Refer-To": f"<{uri}>", "Referred-By": referred_by or f"<{self.local_uri}>"}
        extra.update(headers or {})
        try:
            response = await self.request("REFER", headers=extra)
        except BaseException:
            referral.finish(ReferStatus(500, "the REFER could not be sent", local=True))
            raise
        self._referral_seqs = (first, response.cseq.seq if response.headers.get("CSeq") else self.local_seq)
        referral.event_id = str(self._referral_seqs[1])
        referral.response = response
        if not response.is_success:
            referral.finish(ReferStatus(response.status, response.reason, local=response.local))
        return referral

    def _after_offer_accepted(self, offer_text: str, response: Response) -> None:
        try:
            if offer_text:
                self.local_sdp = SessionDescription.parse(offer_text)
            if response.body and response.content_type == "application/sdp":
                self.remote_sdp = SessionDescription.parse(response.body)
                if self.local_sdp is not None:
                    self._set_media(negotiated_from_answer(self.local_sdp, self.remote_sdp))
        except SdpError as exc:
            log.warning("dialog %s: unusable SDP answer: %s", self.call_id, exc)
        try:
            timer = timer_from_response(response)
        except SipParseError:
            timer = None
        if timer is not None or self.session_timer is not None:
            self._apply_timer(timer or self.session_timer)

    def _set_media(self, media: NegotiatedMedia) -> None:
        changed = media != self.media
        self.media = media
        if changed and self.on_media_update is not None:
            try:
                self.on_media_update(media)
            except Exception:
                log.exception("on_media_update failed")

    # -- the 2xx/ACK handshake (answering side) -------------------------------------------

    def _send_2xx(self, response: Response, transaction: ServerTransaction) -> None:
        """Send a 2xx to an INVITE and retransmit it until the ACK (§13.3.1.4)."""
        transaction.respond(response)
        self._pending_2xx = (response.cseq.seq, response.to_bytes(), transaction.response_flow)
        self._retransmit_interval = self.ua.timers.t1
        self._set_timer("2xx", self._retransmit_interval, self._retransmit_2xx)
        self._set_timer("ack", self.ua.timers.timeout, self._ack_timeout)

    def _retransmit_2xx(self) -> None:
        if self._pending_2xx is None:
            return
        self.ua.transport.send(self._pending_2xx[1], self._pending_2xx[2])
        self._retransmit_interval = min(2 * self._retransmit_interval, self.ua.timers.t2)
        self._set_timer("2xx", self._retransmit_interval, self._retransmit_2xx)

    def _ack_timeout(self) -> None:
        if self._pending_2xx is None:
            return
        log.warning("dialog %s: no ACK for our 2xx within 64*T1; hanging up", self.call_id)
        self._pending_2xx = None
        self._clear_timer("2xx")
        self.ua.ack_timeouts += 1
        self._bye_soon("ack-timeout")

    def on_ack(self, ack: Request) -> None:
        if self._pending_2xx is None or ack.cseq.seq != self._pending_2xx[0]:
            return  # a retransmitted or stray ACK
        self._pending_2xx = None
        self._clear_timer("2xx")
        self._clear_timer("ack")
        self.confirmed.set()
        awaiting, self._awaiting_answer = self._awaiting_answer, False
        if not ack.body:
            if awaiting:
                self._refuse_answer("ack-without-answer", "the ACK carried no SDP answer to our offer")
            return
        # The answer to the offer we made in the 2xx (offerless INVITE or re-INVITE).
        problem = None
        if ack.content_type != "application/sdp":
            problem = f"the ACK's body is {ack.content_type or 'untyped'}, not application/sdp"
        else:
            try:
                remote = SessionDescription.parse(ack.body)
                if self.local_sdp is None:
                    raise SdpError("we made no offer")
                media = negotiated_from_answer(self.local_sdp, remote)
                problem = self.check_media(media) if self.check_media is not None else None
            except SdpError as exc:
                problem = f"SDP: {exc}"
            else:
                if problem is None:
                    self.remote_sdp = remote
                    self._set_media(media)
                    return
        if awaiting:
            self._refuse_answer("unacceptable-answer", problem)
        else:
            log.warning("dialog %s: unusable answer in ACK: %s", self.call_id, problem)

    def _refuse_answer(self, reason: str, detail: str) -> None:
        """§13.2.1 left unfulfilled: no usable answer to the offer in our 2xx. Hang up."""
        log.info("dialog %s: %s; hanging up", self.call_id, detail)
        self.end_detail = detail
        text = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "?" for c in detail)[:120]
        self._bye_soon(reason, {"Reason": f'SIP ;cause=488 ;text="{text}"'})

    # -- requests from the peer -----------------------------------------------------------

    def handle_request(self, request: Request, transaction: ServerTransaction) -> None:
        method = request.method
        seq = request.cseq.seq
        if self.remote_seq is not None and seq <= self.remote_seq:
            transaction.respond(
                make_response(request, 500, "Server Internal Error (CSeq out of order)", headers={"Retry-After": "1"})
            )
            return
        self.remote_seq = seq
        if method == "BYE":
            transaction.respond(self.ua.response(request, 200))
            pending = self._incoming_invite
            if pending is not None and pending.final_status is None:
                pending.respond(make_response(pending.request, 487))
            self._terminate("remote-bye")
        elif method == "INVITE":
            if self._incoming_invite is not None:
                transaction.respond(self.ua.response(request, 500, headers={"Retry-After": str(random.randint(1, 10))}))
                return
            self._incoming_invite = transaction
            self.ua.spawn(self._on_reinvite(request, transaction))
        elif method == "UPDATE":
            self.ua.spawn(self._on_update(request, transaction))
        elif method == "INFO":
            self.ua.spawn(self._on_info(request, transaction))
        elif method == "NOTIFY":
            self._on_notify(request, transaction)
        elif method == "OPTIONS":
            transaction.respond(self.ua.capabilities(request))
        elif method == "PRACK":
            # Every reliable provisional was acknowledged before our 2xx went out.
            transaction.respond(
                self.ua.response(
                    request, 481, "Call/Transaction Does Not Exist (no unacknowledged provisional response)"
                )
            )
        else:
            transaction.respond(self.ua.response(request, 405, headers={"Allow": self.ua.allow}))

    def _offer_of(self, request: Request) -> SessionDescription | None:
        if not request.body:
            return None
        if request.content_type != "application/sdp":
            raise SipError(415, headers={"Accept": "application/sdp"})
        try:
            return SessionDescription.parse(request.body)
        except SdpError as exc:
            raise SipError(400, f"Bad Request (SDP: {exc})") from exc

    async def _answer(self, offer: SessionDescription) -> tuple[str, NegotiatedMedia | None]:
        if self.on_reoffer is not None:
            result = self.on_reoffer(offer)
            if inspect.isawaitable(result):
                result = await result
            text = str(result)
            try:
                media = negotiated_as_answerer(offer, SessionDescription.parse(text))
            except SdpError:
                media = None
        else:
            if self.local_sdp is None:
                raise SipError(488, "Not Acceptable Here (no previous answer to build on)")
            answer, media = reanswer(self.local_sdp, offer, srtp=self.media.srtp if self.media else None)
            text = str(answer)
        problem = self.check_media(media) if media is not None and self.check_media is not None else None
        if problem is not None:
            raise SipError(488, f"Not Acceptable Here ({problem})"[:160])
        return text, media

    async def _negotiate(
        self, request: Request
    ) -> tuple[SessionTimer | None, list[tuple[str, str]], SessionDescription | None, str, NegotiatedMedia | None]:
        timer, timer_headers = answer_session_timer(request, preferred=self.ua.session_expires, min_se=self.ua.min_se)
        offer = self._offer_of(request)
        answer_text, media = ("", None)
        if offer is not None:
            try:
                answer_text, media = await self._answer(offer)
            except SdpError as exc:
                raise SipError(488, f"Not Acceptable Here ({exc})") from exc
        return timer, timer_headers, offer, answer_text, media

    def _error_response(self, request: Request, exc: BaseException) -> Response:
        if isinstance(exc, SipError):
            return self.ua.response(request, exc.status, exc.reason, headers=exc.headers)
        if isinstance(exc, SipParseError):
            return self.ua.response(request, 400, f"Bad Request ({exc})")
        log.error("dialog %s: answering %s failed", self.call_id, request.method, exc_info=exc)
        return self.ua.response(request, 500)

    async def _on_reinvite(self, request: Request, transaction: ServerTransaction) -> None:
        if self._outgoing_offer:
            self._incoming_invite = None
            transaction.respond(self.ua.response(request, 491))
            return
        if self._pending_2xx is not None:
            self._incoming_invite = None
            transaction.respond(self.ua.response(request, 500, headers={"Retry-After": str(random.randint(1, 10))}))
            return
        try:
            timer, timer_headers, offer, answer_text, media = await self._negotiate(request)
        except Exception as exc:
            self._incoming_invite = None
            transaction.respond(self._error_response(request, exc))
            return
        self._incoming_invite = None
        if self.is_terminated or transaction.final_status is not None:
            return
        if offer is None and self.local_sdp is not None:
            answer_text = str(self.local_sdp)  # offerless re-INVITE: our offer, answer in the ACK
        self._refresh_target(request)
        response = self._ok(request, answer_text, timer_headers)
        self._send_2xx(response, transaction)
        if offer is not None:
            self.remote_sdp = offer
            try:
                self.local_sdp = SessionDescription.parse(answer_text)
            except SdpError:
                log.warning("dialog %s: on_reoffer returned unparsable SDP", self.call_id)
            if media is not None:
                self._set_media(media)
        self._apply_timer(timer)

    async def _on_update(self, request: Request, transaction: ServerTransaction) -> None:
        if request.body and (self._outgoing_offer or self._incoming_invite is not None):
            transaction.respond(self.ua.response(request, 491))
            return
        try:
            timer, timer_headers, offer, answer_text, media = await self._negotiate(request)
        except Exception as exc:
            transaction.respond(self._error_response(request, exc))
            return
        if self.is_terminated:
            return
        self._refresh_target(request)
        transaction.respond(self._ok(request, answer_text, timer_headers))
        if offer is not None:
            self.remote_sdp = offer
            try:
                self.local_sdp = SessionDescription.parse(answer_text)
            except SdpError:
                pass
            if media is not None:
                self._set_media(media)
        self._apply_timer(timer)

    def _ok(self, request: Request, body: str, extra: list[tuple[str, str]]) -> Response:
        response = self.ua.response(request, 200)
        response.headers.add("Contact", self.ua.contact(self.flow, secure=self.secure))
        response.headers.add("Allow", self.ua.allow)
        response.headers.add("Supported", "timer")
        response.headers.extend(extra)
        if body:
            response.headers.add("Content-Type", "application/sdp")
            response.body = body.encode()
        return response

    async def _on_info(self, request: Request, transaction: ServerTransaction) -> None:
        try:
            if self.on_info is not None:
                result = self.on_info(request)
                if inspect.isawaitable(result):
                    await result
        except Exception as exc:
            transaction.respond(self._error_response(request, exc))
            return
        transaction.respond(self.ua.response(request, 200))

    def _on_notify(self, request: Request, transaction: ServerTransaction) -> None:
        """A NOTIFY of the implicit subscription of our REFER (sip/refer.py): 200, and its
        sipfrag status to the referral; 489 for another event package, 481 when it matches
        no referral under way, 400 for a body that is no sipfrag."""
        package, event_id = event_package(request.headers.get("Event"))
        if package != "refer":
            transaction.respond(self.ua.response(request, 489, headers={"Allow-Events": "refer"}))
            return
        referral = self._referral
        first, last = self._referral_seqs
        if (
            referral is None
            or referral.done
            or (event_id is not None and not (event_id.isdigit() and first <= int(event_id) <= max(last, first)))
        ):
            transaction.respond(self.ua.response(request, 481, "Subscription Does Not Exist"))
            return
        if request.content_type != SIPFRAG:
            transaction.respond(
                self.ua.response(
                    request,
                    415 if request.body else 400,
                    None if request.body else "Bad Request (no sipfrag body)",
                    headers={"Accept": SIPFRAG},
                )
            )
            return
        try:
            status = parse_sipfrag(request.body)
        except SipParseError as exc:
            transaction.respond(self.ua.response(request, 400, f"Bad Request ({exc})"[:160]))
            return
        transaction.respond(self.ua.response(request, 200))
        referral.notified(status, terminated=subscription_terminated(request.headers.get("Subscription-State")))

    # -- session timer --------------------------------------------------------------------

    def _timer_request_headers(self) -> list[tuple[str, str]]:
        timer = self.session_timer
        if timer is None:
            return []
        refresher = "uac" if timer.refresher == "local" else "uas"
        return [("Session-Expires", f"{timer.interval};refresher={refresher}"), ("Min-SE", str(self.ua.min_se))]

    def _apply_timer(self, timer: SessionTimer | None) -> None:
        self.session_timer = timer
        self._clear_timer("refresh")
        self._clear_timer("expire")
        if timer is None or self.is_terminated:
            return
        if timer.refresher == "local":
            self._set_timer("refresh", timer.refresh_after, lambda: self.ua.spawn(self._refresh()))
            self._set_timer("expire", timer.interval, self._expired)
        else:
            self._set_timer("expire", timer.expire_after, self._expired)

    def _expired(self) -> None:
        log.info("dialog %s: session expired", self.call_id)
        self._bye_soon("session-expired")

    async def _refresh(self) -> None:
        """Refresh the session (we are the refresher): UPDATE when the peer allows it,
        else a re-INVITE with our current SDP (§7.4, §10)."""
        timer = self.session_timer
        if timer is None or self.is_terminated:
            return
        if self._outgoing_offer or self._incoming_invite is not None or self._pending_2xx is not None:
            self._set_timer("refresh", max(timer.interval / 8, 0.05), lambda: self.ua.spawn(self._refresh()))
            return
        use_update = self.peer_allow is not None and "UPDATE" in self.peer_allow
        method = "UPDATE" if use_update else "INVITE"
        body = "" if use_update or self.local_sdp is None else str(self.local_sdp)
        interval = timer.interval
        response: Response | None = None
        self._outgoing_offer = True
        try:
            for attempt in range(2):
                headers = {"Session-Expires": f"{interval};refresher=uac", "Min-SE": str(self.ua.min_se)}
                response = await self.request(method, body=body, content_type="application/sdp", headers=headers)
                demanded = min_se_of(response) if response.status == 422 else None
                if demanded is not None and attempt == 0:
                    interval = max(interval, demanded)
                    continue
                break
        except RuntimeError:
            return  # terminated meanwhile
        finally:
            self._outgoing_offer = False
        assert response is not None
        if response.is_success:
            self.ua.session_refreshes += 1
            try:
                new = timer_from_response(response)
            except SipParseError:
                new = None
            if body:
                self._after_offer_accepted(body, response)
            self._apply_timer(new or SessionTimer(interval, "local"))
        elif response.status == 481:
            self._terminate("session-expired")
        elif response.status == 408 or response.local:
            reason = "transport-error" if response.status == 503 else "session-expired"
            await self._bye(reason)
        else:
            log.warning(
                "dialog %s: session refresh answered %d; the session expires unless refreshed",
                self.call_id,
                response.status,
            )
