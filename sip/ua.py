"""The user agent: the application-facing API of the sip package.

```python
ua = UserAgent(host="0.0.0.0", port=5060, on_invite=handle_call)
await ua.start()                      # ua.port: the bound port, UDP and TCP

async def handle_call(call: IncomingCall) -> None:   # awaited in its own task
    await call.ringing()
    answer, media = answer_offer(call.offer, prefs, my_ip, rtp_port)   # NoCommonCodec → 488
    dialog = await call.accept(str(answer))           # CallCancelled if CANCEL came first
    reason = await dialog.terminated                  # "remote-bye", "local-bye", ...

dialog = await ua.invite("sip:echo@192.0.2.7", str(offer), username="u", password="p")
await dialog.bye()
await ua.stop()                       # closes sockets, cancels timers; sends no BYE
```

``on_invite`` must answer (accept or reject) before it returns; a call it leaves
unanswered is rejected with 500. Requests the UA does not serve are answered here:
OPTIONS 200, REGISTER/SUBSCRIBE/... 405, unknown methods 501, unknown dialogs 481,
unsupported Require 420, non-SIP Request-URIs 416, Max-Forwards 0 483, non-SDP bodies 415,
unacceptable Accept 406, too short Session-Expires 422.

Reliable provisional responses (RFC 3262): when the INVITE requires ``100rel`` every
provisional response but 100 is sent reliably (``Require: 100rel``, ``RSeq``,
retransmitted from T1 doubling until its PRACK, the call rejected with 500 after 64*T1
without one); when it only supports it, a provisional carrying SDP is. A PRACK is
matched to the unacknowledged response by its ``RAck`` (481 when none matches). The
next reliable provisional, and the 200, wait for the PRACK of the previous one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from sip.acl import canonical_ip
from sip.auth import DigestChallenge, authorization
from sip.dialog import Dialog, DialogId, MediaCheck, SdpLike, peer_hosts
from sip.errors import CallAborted, CallCancelled, CallFailed, SipError, SipParseError, TransportError
from sip.guard import NOT_PEER, Refusal, RequestGuard
from sip.headers import Address, Headers, parse_media_type, parse_uint
from sip.message import DEFAULT_MAX_MESSAGE_SIZE, HeaderItems, Request, Response, make_response, new_tag
from sip.sdp import SdpError, SessionDescription, negotiated_as_answerer, negotiated_from_answer
from sip.session_timer import SessionTimer, answer_session_timer, min_se_of, timer_from_response
from sip.streamlimits import StreamLimits
from sip.tls import ServerCertificates
from sip.transaction import ServerTransaction, Timers, TransactionLayer, server_key
from sip.transport import Flow, Transport
from sip.uri import SipUri, format_host

log = logging.getLogger("sip.ua")

ALLOWED_METHODS = ("INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "UPDATE", "INFO", "PRACK", "NOTIFY")
KNOWN_METHODS = frozenset(ALLOWED_METHODS) | {"REGISTER", "SUBSCRIBE", "NOTIFY", "REFER", "MESSAGE", "PUBLISH"}
SUPPORTED_OPTIONS = frozenset({"timer", "100rel"})
# Responses copy these from the request; what we add ourselves (Contact, Allow, an SDP
# answer...) stays well within RESPONSE_RESERVE bytes.
_COPIED_INTO_RESPONSES = frozenset({"Via", "From", "To", "Call-ID", "CSeq", "Record-Route"})
RESPONSE_RESERVE = 4096
MAX_UDP_PAYLOAD = 65507  # the largest IPv4 UDP datagram
MAX_TCP_FALLBACKS = 64  # UDP requests waiting for a TCP connection for their responses
TCP_FALLBACK_CONNECT_SECONDS = 2.0
SUPPORTED = "100rel, timer"  # what our responses and OPTIONS advertise (requests we send: "timer")
_ACCEPTS_SDP = frozenset({"application/sdp", "application/*", "*/*"})

InviteHandler = Callable[["IncomingCall"], Awaitable[None]]


def new_branch() -> str:
    return "z9hG4bK" + secrets.token_hex(8)


class IncomingCall:
    """An INVITE waiting for the application's answer.

    ``request`` (the INVITE), ``offer`` (its SDP, parsed, or None for an offerless
    INVITE, a *delayed offer*: then the SDP given to ``accept`` is our offer and the answer
    comes in the ACK; the dialog checks it, see ``Dialog.on_ack``), ``source`` (ip, port),
    ``transport`` ("UDP"/"TCP"/"TLS"), ``secure`` (a sips: request over TLS), ``call_id``, ``from_uri``, ``to_uri`` (and
    ``from_addr``/``to_addr`` with display names), ``cancelled`` (set when the caller
    cancelled, by CANCEL or by BYE on the early dialog; the UA already answered 487),
    ``aborted`` (set with ``abort_reason`` when the call ended before an answer for any
    reason: cancelled, or ``no-prack``), ``reliable_provisionals`` (the caller requires or
    supports RFC 3262 reliable provisional responses), ``digest_user`` (the user the INVITE
    authenticated as, when the UA's guard demands digest authentication; else None).
    """

    def __init__(
        self,
        ua: UserAgent,
        request: Request,
        transaction: ServerTransaction,
        flow: Flow,
        offer: SessionDescription | None,
        timer: SessionTimer | None,
        timer_headers: list[tuple[str, str]],
    ) -> None:
        self.ua = ua
        self.request = request
        self.transaction = transaction
        self.flow = flow
        self.offer = offer
        self.source = (flow.host, flow.port)
        self.transport = flow.transport
        self.secure = flow.transport == "TLS" and isinstance(request.uri, SipUri) and request.uri.scheme == "sips"
        self.call_id = request.call_id
        self.from_addr = request.from_addr
        self.to_addr = request.to_addr
        self.from_uri = self.from_addr.uri
        self.to_uri = self.to_addr.uri
        self.local_tag = new_tag()
        self.cancelled = asyncio.Event()
        self.aborted = asyncio.Event()
        self.abort_reason = ""
        self.state = "pending"
        self.dialog: Dialog | None = None
        self._timer = timer
        self._timer_headers = timer_headers
        self.requires_100rel = "100rel" in request.option_tags("Require")
        self.reliable_provisionals = self.requires_100rel or "100rel" in request.option_tags("Supported")
        authenticator = ua.guard.authenticator if ua.guard is not None else None
        # the guard let this INVITE in only if these credentials verified
        self.digest_user = (
            authenticator.username_in(request.headers.get_all("Authorization")) if authenticator is not None else None
        )
        self._rseq = random.randint(1, 2**31 - 1)  # RFC 3262 §3: the first RSeq is random
        self._unacked: tuple[int, bytes] | None = None  # (RSeq, bytes) of the reliable provisional in flight
        self._acked = asyncio.Event()
        self._acked.set()
        self._retransmit: asyncio.TimerHandle | None = None
        self._remote_seq = request.cseq.seq  # the highest CSeq seen in the early dialog (PRACKs)

    def __repr__(self) -> str:
        return f"<IncomingCall {self.call_id} from {self.from_uri} {self.state}>"

    @property
    def early_id(self) -> DialogId:
        return (self.call_id, self.local_tag, self.from_addr.tag or "")

    def is_peer(self, host: str) -> bool:
        """Whether a request in this call's early dialog (PRACK, BYE) may come from ``host``."""
        contacts = self.request.contacts
        hosts = peer_hosts(self.flow.host, self.request.record_routes, contacts[0].uri if contacts else None)
        return canonical_ip(host) in hosts

    def _pending(self) -> bool:
        return self.state == "pending" and not self.aborted.is_set() and self.transaction.final_status is None

    def _raise_if_aborted(self) -> None:
        if self.cancelled.is_set():
            raise CallCancelled(f"call {self.call_id} was cancelled by the caller")
        if self.aborted.is_set():
            raise CallAborted(self.abort_reason, f"call {self.call_id} ended before an answer: {self.abort_reason}")

    async def ringing(self) -> None:
        """Send 180 Ringing."""
        await self.provisional(180)

    async def provisional(
        self,
        status: int = 180,
        reason: str | None = None,
        *,
        sdp: SdpLike | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Send a provisional response (183 with ``sdp`` for early media). Sent reliably
        (RFC 3262) when the caller requires 100rel, or supports it and ``sdp`` is given;
        a reliable one waits for the PRACK of the one before. A no-op once the call is
        answered or cancelled."""
        if not 101 <= status <= 199:
            raise ValueError(f"{status} is not a provisional status (101-199)")
        if not self._pending():
            return
        reliable = self.requires_100rel or (sdp is not None and self.reliable_provisionals)
        if not self._acked.is_set():
            with contextlib.suppress(CallCancelled, CallAborted):
                await self._wait_acknowledged()
            if not self._pending():
                return
        response = self.ua.response(self.request, status, reason, headers=headers, to_tag=self.local_tag)
        for route in self.request.headers.get_all("Record-Route"):  # an early dialog's route set
            response.headers.add("Record-Route", route)
        response.headers.add("Contact", self.ua.contact(self.flow, secure=self.secure))
        if reliable:
            self._rseq += 1
            response.headers.add("Require", "100rel")
            response.headers.add("RSeq", str(self._rseq))
            response.headers.add("Allow", self.ua.allow)
        if sdp is not None:
            response.headers.add("Content-Type", "application/sdp")
            response.body = str(sdp).encode()
        self.ua._early[self.early_id] = self
        self.transaction.respond(response)
        if reliable:
            self._unacked = (self._rseq, response.to_bytes())
            self._acked.clear()
            self._schedule_retransmit(self.ua.timers.t1, 0.0)

    # -- reliable provisional responses (RFC 3262) ----------------------------------------

    def _schedule_retransmit(self, interval: float, elapsed: float) -> None:
        self._retransmit = self.ua.loop.call_later(interval, self._retransmit_provisional, interval, elapsed + interval)

    def _retransmit_provisional(self, interval: float, elapsed: float) -> None:
        self._retransmit = None
        if self._unacked is None or not self._pending():
            return
        if elapsed >= self.ua.timers.timeout:
            log.warning(
                "call %s: no PRACK for reliable provisional RSeq %d within 64*T1; rejecting",
                self.call_id,
                self._unacked[0],
            )
            self.ua.unacknowledged_provisionals += 1
            self.transaction.respond(
                self.ua.response(
                    self.request,
                    500,
                    "Server Internal Error (no PRACK for a reliable provisional response)",
                    to_tag=self.local_tag,
                )
            )
            self.state = "rejected"
            self._end("no-prack")
            return
        self.ua.transport.send(self._unacked[1], self.transaction.response_flow)
        self._schedule_retransmit(2 * interval, elapsed)

    async def _wait_acknowledged(self) -> None:
        """Until the reliable provisional in flight is PRACKed; raises when the call ends first."""
        aborted = asyncio.ensure_future(self.aborted.wait())
        acked = asyncio.ensure_future(self._acked.wait())
        try:
            await asyncio.wait({aborted, acked}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            aborted.cancel()
            acked.cancel()
        self._raise_if_aborted()

    def on_prack(self, request: Request, transaction: ServerTransaction) -> None:
        """A PRACK in the early dialog: 200 when its RAck names the unacknowledged reliable
        provisional response (RSeq, the INVITE's CSeq number and method), else 481."""
        try:
            rseq_text, cseq_text, method = (request.headers.get("RAck") or "").split()
            rseq, cseq = parse_uint(rseq_text, "RAck", 2**32 - 1), parse_uint(cseq_text, "RAck", 2**32 - 1)
        except ValueError:
            raise SipError(400, "Bad Request (RAck: expected 'response-num CSeq-num method')") from None
        if request.cseq.seq <= self._remote_seq:
            raise SipError(500, "Server Internal Error (CSeq out of order)", headers={"Retry-After": "1"})
        self._remote_seq = request.cseq.seq
        unacked = self._unacked
        if (
            unacked is None
            or rseq != unacked[0]
            or cseq != self.request.cseq.seq
            or method.upper() != self.request.cseq.method
        ):
            raise SipError(481, "Call/Transaction Does Not Exist (no unacknowledged provisional matches RAck)")
        if request.body:
            # An offer in a PRACK (RFC 3262 §5) is not supported: the 183 carried our answer.
            self.ua.prack_bodies_ignored += 1
            log.info("call %s: PRACK carries a body (%s); ignored", self.call_id, request.content_type)
        self._unacked = None
        if self._retransmit is not None:
            self._retransmit.cancel()
            self._retransmit = None
        self._acked.set()
        transaction.respond(self.ua.response(request, 200, to_tag=self.local_tag))

    def on_early_bye(self, request: Request, transaction: ServerTransaction) -> None:
        """A BYE in the early dialog (RFC 3261 §15): the caller gives up, as with CANCEL."""
        transaction.respond(self.ua.response(request, 200, to_tag=self.local_tag))
        if self.transaction.final_status is None:
            self.transaction.respond(self.ua.response(self.request, 487, to_tag=self.local_tag))
        self._on_cancel()

    # -- answers --------------------------------------------------------------------------

    async def accept(
        self, answer_sdp: SdpLike, *, headers: Mapping[str, str] | None = None, check_media: MediaCheck | None = None
    ) -> Dialog:
        """Answer 200 with ``answer_sdp`` (our offer, for a delayed-offer INVITE) and
        return the dialog. The 200 waits for the PRACK of a reliable provisional still in
        flight, and is retransmitted until the ACK (``dialog.confirmed``); without one, the
        dialog ends "ack-timeout". ``check_media`` (see ``Dialog``) judges the answer an ACK
        brings. Raises ``CallCancelled`` when the caller cancelled first, ``CallAborted``
        when the call ended otherwise (no PRACK)."""
        self._raise_if_aborted()
        if not self._pending():
            raise RuntimeError(f"call {self.call_id} is already {self.state}")
        if not self._acked.is_set():
            await self._wait_acknowledged()
            if not self._pending():
                raise RuntimeError(f"call {self.call_id} is already {self.state}")
        text = str(answer_sdp)
        local_sdp = SessionDescription.parse(text)
        request = self.request
        response = self.ua.response(request, 200, headers=headers, to_tag=self.local_tag)
        for route in request.headers.get_all("Record-Route"):
            response.headers.add("Record-Route", route)
        response.headers.add("Contact", self.ua.contact(self.flow, secure=self.secure))
        response.headers.add("Allow", self.ua.allow)
        response.headers.add("Supported", SUPPORTED)
        response.headers.extend(self._timer_headers)
        response.headers.add("Content-Type", "application/sdp")
        response.body = text.encode()
        contacts = request.contacts
        to_value = response.headers.get("To") or ""
        dialog = Dialog(
            self.ua,
            role="uas",
            call_id=self.call_id,
            local_tag=self.local_tag,
            remote_tag=self.from_addr.tag or "",
            local_header=to_value,
            remote_header=request.headers.get("From") or "",
            local_seq=random.randint(1, 2**16),
            remote_seq=self._remote_seq,
            remote_target=contacts[0].uri if contacts else self.from_uri,
            route_set=request.headers.get_all("Record-Route"),
            flow=self.flow,
            local_sdp=local_sdp,
            remote_sdp=self.offer,
            peer_allow={m.upper() for m in request.values("Allow")} or None,
        )
        dialog.check_media = check_media
        if self.offer is not None:
            with contextlib.suppress(SdpError):
                dialog.media = negotiated_as_answerer(self.offer, local_sdp)
        else:
            dialog._awaiting_answer = True  # §13.2.1: the answer to our offer comes in the ACK
        dialog.secure = self.secure
        self.ua._add_dialog(dialog)
        dialog._send_2xx(response, self.transaction)
        dialog._apply_timer(self._timer)
        self.state = "answered"
        self.dialog = dialog
        self._finish()
        self.ua.calls_answered += 1
        return dialog

    async def reject(
        self, status: int = 486, reason: str | None = None, *, headers: Mapping[str, str] | None = None
    ) -> None:
        """Answer with a final error, e.g. ``reject(503, headers={"Retry-After": "30"})``.
        A no-op when the call was cancelled or already answered."""
        if not 300 <= status <= 699:
            raise ValueError(f"{status} is not a final error status (300-699)")
        if not self._pending():
            return
        self.transaction.respond(self.ua.response(self.request, status, reason, headers=headers, to_tag=self.local_tag))
        self.state = "rejected"
        self._finish()

    def _on_cancel(self) -> None:
        self.state = "cancelled"
        self.cancelled.set()
        self._end("cancelled")

    def _end(self, reason: str) -> None:
        if not self.aborted.is_set():
            self.abort_reason = reason
            self.aborted.set()
        self._finish()

    def _finish(self) -> None:
        """The INVITE has its final answer: forget the pending call and its early dialog."""
        if self._retransmit is not None:
            self._retransmit.cancel()
            self._retransmit = None
        self._unacked = None
        if self.ua._calls.pop(self.transaction.key, None) is not None:
            self.ua._peer_removed(self.flow.host)
        if self.ua._early.get(self.early_id) is self:
            del self.ua._early[self.early_id]


@dataclass
class _OutgoingInvite:
    """The state of one INVITE we send (across auth and 422 retries)."""

    uri: SipUri
    flow: Flow
    call_id: str
    local_tag: str
    from_value: str
    to_value: str
    offer_text: str
    credentials: tuple[str, str] | None
    cseq: int = 1
    auth: list[tuple[str, str]] = field(default_factory=list)
    tried_nonces: set[str] = field(default_factory=set)
    transaction: Any = None


class UserAgent:
    """A SIP user agent (UAS and UAC) over UDP and TCP on one port. See the module
    docstring for the API; ``counts()`` exposes its live objects for leak checks and
    ``transport.counters`` what the transport dropped or refused.

    - ``host``/``port``: where to bind (``::`` is dual-stack; port 0 picks one, see ``port``).
    - ``public_host``: the address put in Via and Contact (default: the local address
      that routes toward each peer).
    - ``session_expires``: the RFC 4028 interval we ask for and impose (0: none unless the
      peer asks); ``min_se``: the shortest interval we accept (422 below it).
    - ``timers``: T1/T2/T4 (shrink them in tests).
    - ``force_rport``: answer UDP requests at their source port even without ``;rport``
      (for clients behind NAT that do not ask for RFC 3581).
    - ``max_message_size``; ``stream_limits`` (sip.streamlimits): TCP and TLS connection caps,
      in all and per source, and the deadlines of each connection (TLS handshake, first
      message, each message, idle).
    - ``max_udp_response``: a UDP request whose responses could be larger than this (a
      huge Via list) is served over TCP to its sender (RFC 3261 §18.2.2), or answered 513
      when no connection can be opened; never left to fail silently.
    - ``guard``: a ``RequestGuard`` (sip.guard): who may send requests outside a dialog,
      digest authentication of INVITEs, per-source rate limits, scanner user agents, and
      in-dialog requests only from the dialog's peer. Its refusals create no state.
    - ``tls_certificates``: serve SIP over TLS on ``tls_port`` with these (``sip.tls``);
      ``tls_client_context``: how TLS servers we connect to are checked.
    """

    def __init__(
        self,
        host: str = "0.0.0.0",
        port: int = 0,
        *,
        public_host: str | None = None,
        on_invite: InviteHandler | None = None,
        user_agent: str = "moshimoshi/0.1",
        session_expires: int = 1800,
        min_se: int = 90,
        timers: Timers | None = None,
        user: str = "moshimoshi",
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        stream_limits: StreamLimits | None = None,
        force_rport: bool = False,
        guard: RequestGuard | None = None,
        max_udp_response: int = MAX_UDP_PAYLOAD,
        tls_certificates: ServerCertificates | None = None,
        tls_port: int = 5061,
        tls_client_context: ssl.SSLContext | None = None,
    ) -> None:
        self.on_invite = on_invite
        self.guard = guard
        self.max_udp_response = max_udp_response
        self._tcp_fallbacks: set[tuple] = set()
        self.responses_over_tcp = 0  # UDP requests served over TCP: their responses were too big
        self.responses_too_big = 0  # UDP requests answered 513: too big for UDP, and no TCP to the sender
        # Out-of-dialog OPTIONS get 503 while this says False (draining, no capacity).
        self.available: Callable[[], bool] | None = None
        self.user_agent = user_agent
        self.session_expires = session_expires
        self.min_se = min_se
        self.timers = timers or Timers()
        self.user = user
        self.allow = ", ".join(ALLOWED_METHODS)
        self.transport = Transport(
            host,
            port,
            on_message=self._on_message,
            max_message_size=max_message_size,
            stream_limits=stream_limits,
            force_rport=force_rport,
            public_host=public_host,
            tls_certificates=tls_certificates,
            tls_port=tls_port,
            tls_client_context=tls_client_context,
        )
        self.transactions = TransactionLayer(self.transport, self.timers, self)
        # How many live dialogs and pending calls each peer address has: a banned source's
        # datagrams are dropped unread, except a peer's within its own calls.
        self._peer_calls: dict[str, int] = {}
        if guard is not None and guard.rate is not None:
            self.transport.source_filter = self._source_admitted
        self.dialogs: dict[DialogId, Dialog] = {}
        self._calls: dict[tuple, IncomingCall] = {}
        self._early: dict[DialogId, IncomingCall] = {}  # calls that sent a provisional with our tag
        self._tasks: set[asyncio.Task] = set()
        self.loop = asyncio.get_event_loop()
        self.calls_received = 0
        self.calls_answered = 0
        self.stray_acks = 0
        self.ack_timeouts = 0
        self.session_refreshes = 0
        self.unacknowledged_provisionals = 0  # calls rejected for want of a PRACK
        self.prack_bodies_ignored = 0

    # -- life cycle -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self.transport.port

    @property
    def host(self) -> str:
        return self.transport.host

    @property
    def tls_port(self) -> int | None:
        """The bound TLS port (None: no TLS)."""
        return self.transport.tls_port

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transactions.start()
        await self.transport.start()

    async def stop(self) -> None:
        """Close the sockets and cancel every timer and task. Sends nothing (no BYE);
        live dialogs end with reason "stopped"."""
        for dialog in list(self.dialogs.values()):
            dialog._terminate("stopped")
        for call in list(self._calls.values()):
            call._finish()
        self._calls.clear()
        self._early.clear()
        self.transactions.stop()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.transport.stop()

    def counts(self) -> dict[str, int]:
        """Live objects and event counters (for tests, metrics and leak checks)."""
        return {
            "dialogs": len(self.dialogs),
            "pending_calls": len(self._calls),
            "early_dialogs": len(self._early),
            **self.transactions.counts(),
            "tasks": len(self._tasks),
            "tcp_connections": self.transport.tcp_connections,
            "calls_received": self.calls_received,
            "calls_answered": self.calls_answered,
            "stray_acks": self.stray_acks,
            "stray_responses": self.transactions.stray_responses,
            "merged_requests": self.transactions.merged_requests,
            "ack_timeouts": self.ack_timeouts + self.transactions.ack_timeouts,
            "session_refreshes": self.session_refreshes,
            "unacknowledged_provisionals": self.unacknowledged_provisionals,
            "prack_bodies_ignored": self.prack_bodies_ignored,
            "peer_addresses": len(self._peer_calls),
            "responses_over_tcp": self.responses_over_tcp,
            "responses_too_big": self.responses_too_big,
        }

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        """Run ``coro`` in the background, owned (and cancelled at ``stop``) by this agent."""
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    # -- what dialogs and calls use (sip.dialog.DialogUA) ----------------------------------

    def _port_for(self, transport: str) -> int:
        if transport == "TLS" and self.transport.tls_port is not None:
            return self.transport.tls_port
        return self.port

    def via(self, flow: Flow) -> str:
        host = self.transport.local_host_for(flow.host)
        # RFC 5923: over TLS we offer our connection for the peer's requests back to us
        alias = ";alias" if flow.transport == "TLS" else ""
        return (
            f"SIP/2.0/{flow.transport} {format_host(host)}:{self._port_for(flow.transport)};"
            f"branch={new_branch()};rport{alias}"
        )

    def contact(self, flow: Flow, *, secure: bool = False) -> str:
        """Our Contact toward ``flow``: ``sips:`` in a secure (sips:) dialog, else ``sip:``
        with the transport named for TCP and TLS."""
        host = format_host(self.transport.local_host_for(flow.host))
        port = self._port_for(flow.transport)
        if secure:
            return f"<sips:{self.user}@{host}:{port}>"
        suffix = {"TCP": ";transport=tcp", "TLS": ";transport=tls"}.get(flow.transport, "")
        return f"<sip:{self.user}@{host}:{port}{suffix}>"

    def response(
        self,
        request: Request,
        status: int,
        reason: str | None = None,
        *,
        headers: HeaderItems | None = None,
        to_tag: str | None = None,
    ) -> Response:
        """A response to ``request`` from this agent (``Server`` header, a To tag)."""
        response = make_response(request, status, reason, to_tag=to_tag or new_tag(), headers=headers)
        response.headers.add("Server", self.user_agent)
        return response

    def capabilities(self, request: Request) -> Response:
        """The 200 to an OPTIONS: what this agent allows, accepts and supports."""
        return self.response(
            request,
            200,
            headers={
                "Allow": self.allow,
                "Accept": "application/sdp",
                "Accept-Encoding": "identity",
                "Supported": SUPPORTED,
            },
        )

    def _add_dialog(self, dialog: Dialog) -> None:
        self.dialogs[dialog.id] = dialog
        self._peer_added(dialog.flow.host)

    def forget_dialog(self, dialog: Dialog) -> None:
        """A terminated dialog leaves the agent's table."""
        if self.dialogs.get(dialog.id) is dialog:
            del self.dialogs[dialog.id]
            self._peer_removed(dialog.flow.host)

    def _peer_added(self, host: str) -> None:
        ip = canonical_ip(host) or host
        self._peer_calls[ip] = self._peer_calls.get(ip, 0) + 1

    def _peer_removed(self, host: str) -> None:
        ip = canonical_ip(host) or host
        left = self._peer_calls.get(ip, 0) - 1
        if left > 0:
            self._peer_calls[ip] = left
        else:
            self._peer_calls.pop(ip, None)

    def _source_admitted(self, host: str) -> bool:
        """The transport's pre-parse check: everything but a banned source that has no call here."""
        guard = self.guard
        if guard is None or guard.rate is None or not guard.rate.banned(host):
            return True
        return (canonical_ip(host) or host) in self._peer_calls

    def authorization_headers(
        self, request: Request, response: Response, credentials: tuple[str, str], tried_nonces: set[str]
    ) -> list[tuple[str, str]]:
        """Authorization headers answering a 401/407, or [] when we cannot (unknown
        scheme, or an answer to the same realm was refused without ``stale``: wrong
        credentials)."""
        proxy = response.status == 407
        challenge_header = "Proxy-Authenticate" if proxy else "WWW-Authenticate"
        out_header = "Proxy-Authorization" if proxy else "Authorization"
        for value in response.headers.get_all(challenge_header):
            try:
                challenge = DigestChallenge.parse(value, challenge_header)
            except SipParseError:
                continue
            if not challenge.supported:
                continue
            realm_tried = f"realm:{challenge.realm}"
            if not challenge.stale and (challenge.nonce in tried_nonces or realm_tried in tried_nonces):
                return []  # our answer to this realm was refused, not for staleness: wrong credentials
            tried_nonces.update((challenge.nonce, realm_tried))
            username, password = credentials
            return [
                (
                    out_header,
                    authorization(
                        challenge,
                        method=request.method,
                        uri=str(request.uri),
                        username=username,
                        password=password,
                        body=request.body,
                    ),
                )
            ]
        return []

    # -- the transaction user -----------------------------------------------------------

    def _on_message(self, message: Request | Response, flow: Flow) -> None:
        if isinstance(message, Request):
            if self.guard is not None:
                refusal = self._screen(message, flow)
                if refusal is not None:
                    self._refuse(message, flow, refusal)
                    return
            if (
                flow.transport == "UDP"
                and message.method not in ("ACK", "CANCEL")
                and self._udp_response_too_big(message)
                and self.transactions.server.get(server_key(message)) is None
            ):
                self._answer_over_tcp(message, flow)
                return
        self.transactions.receive(message, flow)

    # -- responses too big for a datagram (RFC 3261 §18.2.2) -----------------------------------

    def _udp_response_too_big(self, request: Request) -> bool:
        """Whether our responses to ``request`` could exceed ``max_udp_response``: they copy
        its Via, From, To, Call-ID, CSeq and Record-Route, and add at most RESPONSE_RESERVE."""
        size = RESPONSE_RESERVE
        for name, value in request.headers:
            if name in _COPIED_INTO_RESPONSES:
                size += len(name) + len(value) + 4
        return size > self.max_udp_response

    def _answer_over_tcp(self, request: Request, flow: Flow) -> None:
        """Serve a UDP request whose responses would not fit in a datagram over a TCP
        connection to its sender (received address, sent-by port: §18.2.2 for reliable
        transports); when that cannot be opened, answer 513 over UDP. Retransmissions that
        arrive meanwhile are absorbed."""
        key = server_key(request)
        if key in self._tcp_fallbacks:
            return
        if len(self._tcp_fallbacks) >= MAX_TCP_FALLBACKS:
            self._reply_too_big(request, flow)
            return
        via = request.top_via
        target = Flow("TCP", via.received or flow.host, via.port or 5060)
        self._tcp_fallbacks.add(key)
        self.spawn(self._serve_over_tcp(request, flow, target, key))

    async def _serve_over_tcp(self, request: Request, flow: Flow, target: Flow, key: tuple) -> None:
        try:
            tcp = await asyncio.wait_for(self.transport.connect(target), TCP_FALLBACK_CONNECT_SECONDS)
        except (TransportError, TimeoutError) as exc:
            log.info("%r from %r: its responses need TCP, and %r failed: %s; answering 513", request, flow, target, exc)
            self._reply_too_big(request, flow)
            return
        finally:
            self._tcp_fallbacks.discard(key)
        self.responses_over_tcp += 1
        self.transactions.receive(request, tcp)

    def _reply_too_big(self, request: Request, flow: Flow) -> None:
        self.responses_too_big += 1
        response = self.response(
            request, 513, "Message Too Large (the response would not fit in a UDP datagram; send the request over TCP)"
        )
        self.transport.counters.count_response(513)
        self.transport.send(response.to_bytes(), self.transport.response_flow(request, flow))

    # -- the guard: who may talk to us (sip.guard) ---------------------------------------------

    def _screen(self, request: Request, flow: Flow) -> Refusal | None:
        """The guard's verdict on a request, before any state is created for it."""
        guard = self.guard
        assert guard is not None
        if guard.is_scanner(request):
            return Refusal("scanner")
        host = flow.host
        transaction = self.transactions.server.get(server_key(request))
        if transaction is not None:  # a retransmission, or the ACK of our non-2xx
            return None if canonical_ip(transaction.flow.host) == canonical_ip(host) else Refusal(NOT_PEER, 403)
        to_tag = request.to_addr.tag
        if to_tag is not None:
            key = (request.call_id, to_tag, request.from_addr.tag or "")
            owner: Dialog | IncomingCall | None = self.dialogs.get(key) or self._early.get(key)
            if owner is not None:
                return None if owner.is_peer(host) else Refusal(NOT_PEER, 403)
        if request.method == "CANCEL":
            invite = self.transactions.find_invite(request)
            if invite is not None:
                return None if canonical_ip(invite.flow.host) == canonical_ip(host) else Refusal(NOT_PEER, 403)
        if request.method == "ACK":
            return None  # matches nothing: counted as a stray ACK and absorbed
        return guard.screen(request, host)

    def _refuse(self, request: Request, flow: Flow, refusal: Refusal) -> None:
        """Answer (or drop) a refused request statelessly: no transaction, no dialog."""
        assert self.guard is not None
        self.guard.counters.count(refusal.reason)
        if refusal.status is None or request.method == "ACK":
            return
        response = self.response(request, refusal.status, headers=refusal.headers or None)
        self.transport.counters.count_response(refusal.status)
        self.transport.send(response.to_bytes(), self.transport.response_flow(request, flow))

    def on_request(self, request: Request, transaction: ServerTransaction | None, flow: Flow) -> None:
        if transaction is None:
            dialog = self.dialogs.get((request.call_id, request.to_addr.tag or "", request.from_addr.tag or ""))
            if dialog is not None:
                dialog.on_ack(request)
            else:
                self.stray_acks += 1
            return
        try:
            self._dispatch(request, transaction, flow)
        except SipError as exc:
            transaction.respond(self.response(request, exc.status, exc.reason, headers=exc.headers))
        except SipParseError as exc:
            transaction.respond(self.response(request, 400, f"Bad Request ({exc})"))
        except Exception:
            log.exception("error handling %r", request)
            transaction.respond(self.response(request, 500))

    def on_stray_response(self, response: Response, flow: Flow) -> None:
        if response.is_success and response.cseq.method == "INVITE":
            self.on_invite_2xx_retransmission(response)

    def on_invite_2xx_retransmission(self, response: Response) -> None:
        key = (response.call_id, response.from_addr.tag or "", response.to_addr.tag or "")
        dialog = self.dialogs.get(key)
        if dialog is not None:
            dialog.on_2xx_retransmission(response)

    def _dispatch(self, request: Request, transaction: ServerTransaction, flow: Flow) -> None:
        method = request.method
        max_forwards = request.headers.get("Max-Forwards")
        if max_forwards is not None and int(max_forwards) == 0:
            raise SipError(483)
        if method not in ALLOWED_METHODS:
            if method in KNOWN_METHODS:
                raise SipError(405, headers={"Allow": self.allow})
            raise SipError(501)
        if not isinstance(request.uri, SipUri):
            raise SipError(416)
        if request.uri.scheme == "sips" and flow.transport != "TLS":
            # RFC 3261 §26.2.2, RFC 5630: a sips: request must have come over TLS
            raise SipError(416, "Unsupported URI Scheme (sips: requires TLS)")
        if method == "CANCEL":
            self._on_cancel(request, transaction)
            return
        unsupported = request.option_tags("Require") - SUPPORTED_OPTIONS
        if unsupported:
            raise SipError(420, headers={"Unsupported": ", ".join(sorted(unsupported))})
        to_tag = request.to_addr.tag
        if to_tag is not None:
            key = (request.call_id, to_tag, request.from_addr.tag or "")
            dialog = self.dialogs.get(key)
            if dialog is not None:
                dialog.handle_request(request, transaction)
                return
            early = self._early.get(key)
            if early is not None and method == "PRACK":
                early.on_prack(request, transaction)
            elif early is not None and method == "BYE":
                early.on_early_bye(request, transaction)
            else:
                raise SipError(481)
            return
        if method == "OPTIONS":
            if self.available is not None and not self.available():
                # Dispatchers and SBCs probe with OPTIONS: tell them to route elsewhere.
                raise SipError(503, headers={"Retry-After": "10"})
            transaction.respond(self.capabilities(request))
        elif method == "INVITE":
            self._on_invite(request, transaction, flow)
        else:
            raise SipError(481)  # BYE, UPDATE, INFO, PRACK outside any dialog

    def _on_cancel(self, request: Request, transaction: ServerTransaction) -> None:
        invite = self.transactions.find_invite(request)
        if invite is None:
            raise SipError(481)
        call = self._calls.get(invite.key)
        tag = call.local_tag if call is not None else new_tag()
        transaction.respond(self.response(request, 200, to_tag=tag))
        if invite.final_status is None:
            invite.respond(self.response(invite.request, 487, to_tag=tag))
            if call is not None:
                call._on_cancel()

    def _on_invite(self, request: Request, transaction: ServerTransaction, flow: Flow) -> None:
        accepted = request.values("Accept")
        if accepted and not {parse_media_type(v)[0] for v in accepted} & _ACCEPTS_SDP:
            raise SipError(406, headers={"Accept": "application/sdp"})
        if request.option_tags("Content-Encoding") - {"identity"}:
            raise SipError(415, headers={"Accept-Encoding": "identity", "Accept": "application/sdp"})
        offer = None
        if request.body:
            if request.content_type != "application/sdp":
                raise SipError(415, headers={"Accept": "application/sdp"})
            try:
                offer = SessionDescription.parse(request.body)
            except SdpError as exc:
                raise SipError(400, f"Bad Request (SDP: {exc})") from exc
        timer, timer_headers = answer_session_timer(request, preferred=self.session_expires, min_se=self.min_se)
        call = IncomingCall(self, request, transaction, flow, offer, timer, timer_headers)
        self._calls[transaction.key] = call
        self._peer_added(flow.host)
        self.calls_received += 1
        if self.on_invite is None:
            call.state = "rejected"
            call._finish()
            transaction.respond(self.response(request, 480, to_tag=call.local_tag))
            return
        self.spawn(self._run_application(call))

    async def _run_application(self, call: IncomingCall) -> None:
        assert self.on_invite is not None
        try:
            await self.on_invite(call)
        except (CallCancelled, CallAborted):
            return
        except Exception:
            log.exception("on_invite failed for %r", call)
            await call.reject(500)
            return
        if call._pending():
            log.warning("on_invite returned without answering %r: answering 500", call)
            await call.reject(500, "Server Internal Error (call not answered)")

    # -- placing calls ------------------------------------------------------------------

    async def invite(
        self,
        target: str | SipUri,
        offer_sdp: SdpLike,
        *,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 32.0,  # noqa: ASYNC109 - CANCELs on expiry
        on_provisional: Callable[[Response], None] | None = None,
        from_uri: str | SipUri | None = None,
        display_name: str | None = None,
        headers: Mapping[str, str] | None = None,
        from_user: str | None = None,
    ) -> Dialog:
        """Call ``target`` with ``offer_sdp`` and return the dialog once answered (ACK
        sent). Answers 401/407 with digest credentials and 422 with a longer
        Session-Expires. Raises ``CallFailed(status, reason)`` for a final error, no answer
        within ``timeout`` seconds (408, after CANCEL) or an unusable answer (488, after
        ACK and BYE). Cancelling the awaiting task sends CANCEL. Our From is ``from_uri``,
        else ``sip:<from_user or the UA's user>@<our address toward the target>``."""
        uri = SipUri.parse(target, "target") if isinstance(target, str) else target
        transport = uri.wire_transport or "UDP"
        if transport not in ("UDP", "TCP", "TLS"):
            raise ValueError(f"transport {transport} is not supported (UDP, TCP or TLS)")
        host = uri.param("maddr") or uri.host
        try:
            address = await self.transport.resolve(host)
        except TransportError as exc:
            raise CallFailed(503, f"Service Unavailable ({exc})") from exc
        flow = Flow(transport, address, uri.port_for(transport), server_name=host)
        local_host = self.transport.local_host_for(address)
        tag = new_tag()
        if from_uri is None:
            from_uri = SipUri(local_host, user=from_user or self.user)
        elif isinstance(from_uri, str):
            from_uri = SipUri.parse(from_uri, "from_uri")
        offer_text = str(offer_sdp)
        SessionDescription.parse(offer_text)  # refuse to send an offer we could not read back
        state = _OutgoingInvite(
            uri=uri,
            flow=flow,
            call_id=f"{secrets.token_hex(10)}@{format_host(local_host)}",
            local_tag=tag,
            from_value=f"{Address(from_uri, display_name)};tag={tag}",
            to_value=f"<{uri.without_headers()}>",
            offer_text=offer_text,
            credentials=(username, password or "") if username is not None else None,
        )
        try:
            async with asyncio.timeout(timeout):
                response = await self._invite_until_final(state, on_provisional, headers)
        except TimeoutError:
            self.spawn(self._abandon_invite(state))
            raise CallFailed(408, f"Request Timeout (no answer within {timeout:g} s)") from None
        except asyncio.CancelledError:
            self.spawn(self._abandon_invite(state))
            raise
        return await self._dialog_from_2xx(state, response)

    def _build_invite(self, state: _OutgoingInvite, session_expires: int, extra: Mapping[str, str] | None) -> Request:
        out = Headers()
        out.add("Via", self.via(state.flow))
        out.add("Max-Forwards", "70")
        out.add("From", state.from_value)
        out.add("To", state.to_value)
        out.add("Call-ID", state.call_id)
        out.add("CSeq", f"{state.cseq} INVITE")
        out.add("Contact", self.contact(state.flow, secure=state.uri.scheme == "sips"))
        out.add("Allow", self.allow)
        out.add("Supported", "timer")
        if session_expires > 0:
            out.add("Session-Expires", str(session_expires))
            out.add("Min-SE", str(self.min_se))
        out.add("User-Agent", self.user_agent)
        for name, value in (extra or {}).items():
            out.add(name, value)
        out.extend(state.auth)
        out.add("Content-Type", "application/sdp")
        return Request("INVITE", state.uri, out, state.offer_text)

    async def _invite_until_final(
        self, state: _OutgoingInvite, on_provisional: Callable[[Response], None] | None, extra: Mapping[str, str] | None
    ) -> Response:
        session_expires = self.session_expires
        while True:
            request = self._build_invite(state, session_expires, extra)
            transaction = await self.transactions.send_request(request, state.flow, on_provisional)
            state.transaction = transaction
            response = await asyncio.shield(transaction.response)
            if response.is_success:
                state.flow = transaction.flow
                return response
            if response.status in (401, 407) and state.credentials is not None and state.cseq < 10:
                auth = self.authorization_headers(request, response, state.credentials, state.tried_nonces)
                if auth:
                    state.auth = auth
                    state.cseq += 1
                    continue
            demanded = min_se_of(response) if response.status == 422 else None
            if demanded is not None and demanded > session_expires and state.cseq < 10:
                session_expires = demanded
                state.cseq += 1
                continue
            raise CallFailed(response.status, response.reason, response)

    async def _dialog_from_2xx(self, state: _OutgoingInvite, response: Response) -> Dialog:
        contacts = response.contacts
        offer = SessionDescription.parse(state.offer_text)
        dialog = Dialog(
            self,
            role="uac",
            call_id=state.call_id,
            local_tag=state.local_tag,
            remote_tag=response.to_addr.tag or "",
            local_header=state.from_value,
            remote_header=response.headers.get("To") or state.to_value,
            local_seq=state.cseq,
            remote_seq=None,
            remote_target=contacts[0].uri if contacts else state.uri,
            route_set=list(reversed(response.headers.get_all("Record-Route"))),
            flow=state.flow,
            local_sdp=offer,
            remote_sdp=None,
            peer_allow={m.upper() for m in response.values("Allow")} or None,
            credentials=state.credentials,
        )
        dialog.answer_response = response
        dialog.secure = state.uri.scheme == "sips" and state.flow.transport == "TLS"
        self._add_dialog(dialog)
        try:
            ack_flow = await dialog._next_hop()
        except TransportError:
            ack_flow = state.flow
        dialog._send_ack(state.cseq, ack_flow, state.auth)
        problem = None
        if response.body and response.content_type == "application/sdp":
            try:
                dialog.remote_sdp = SessionDescription.parse(response.body)
                dialog.media = negotiated_from_answer(offer, dialog.remote_sdp)
            except SdpError as exc:
                problem = str(exc)
        else:
            problem = "the 2xx carries no SDP answer"
        if problem is not None:
            # §13.2.2.4: ACK, then BYE when the answer is unacceptable.
            self.spawn(dialog._bye("local-bye"))
            raise CallFailed(488, f"Not Acceptable Here ({problem})", response)
        try:
            dialog._apply_timer(timer_from_response(response))
        except SipParseError:
            pass
        return dialog

    async def _abandon_invite(self, state: _OutgoingInvite) -> None:
        """The application gave up on an INVITE (cancelled the task, or timeout): CANCEL
        it once a provisional response came (§9.1); if a 2xx still arrives, ACK and BYE."""
        transaction = state.transaction
        if transaction is None:
            return
        if not transaction.response.done():
            waiter = self.loop.create_task(transaction.provisional.wait())
            try:
                await asyncio.wait(
                    [waiter, transaction.response], timeout=self.timers.timeout, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                waiter.cancel()
            if not transaction.response.done() and transaction.provisional.is_set():
                cancel = self._build_cancel(transaction.request)
                cancel_transaction = await self.transactions.send_request(cancel, transaction.flow)
                await asyncio.shield(cancel_transaction.response)
            try:
                await asyncio.wait_for(asyncio.shield(transaction.response), self.timers.timeout)
            except TimeoutError:
                transaction.fail(408, "Request Timeout")
                return
        response = transaction.response.result()
        if response.is_success:
            log.info("INVITE %s answered after it was abandoned: ACK and BYE", state.call_id)
            state.flow = transaction.flow
            with contextlib.suppress(CallFailed):
                dialog = await self._dialog_from_2xx(state, response)
                await dialog._bye("local-bye")

    @staticmethod
    def _build_cancel(invite: Request) -> Request:
        """§9.1: same Request-URI, Call-ID, To, From, CSeq number and top Via as the INVITE."""
        out = Headers()
        out.add("Via", invite.headers.get_all("Via")[0])
        out.add("Max-Forwards", "70")
        for name in ("From", "To", "Call-ID"):
            out.add(name, invite.headers.get(name) or "")
        out.add("CSeq", f"{invite.cseq.seq} CANCEL")
        for route in invite.headers.get_all("Route"):
            out.add("Route", route)
        return Request("CANCEL", invite.uri, out)
