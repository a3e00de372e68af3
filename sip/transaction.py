"""SIP transactions (RFC 3261 §17, with the Accepted states of RFC 6026).

Server transactions absorb retransmitted requests by replaying the last response; the
INVITE server transaction sends 100 Trying at once, retransmits a non-2xx final response
until the ACK (timers G, H, I) and, after a 2xx, stays Accepted for 64*T1 so that
retransmitted INVITEs are absorbed while the dialog layer retransmits the 2xx. Client
transactions retransmit over UDP (timers A/E), time out (B/F, answered with a local
408), ACK non-2xx responses themselves (timer D) and absorb response retransmissions
(timer K). Matching follows §17.1.3 and §17.2.3, with the RFC 2543 fallback for
requests whose branch lacks the magic cookie.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sip.errors import SipParseError, TransportError
from sip.headers import Headers
from sip.message import Request, Response, make_response, new_tag
from sip.transport import Flow, Transport

log = logging.getLogger("sip.transaction")


@dataclass(frozen=True)
class Timers:
    """RFC 3261 timer base values in seconds; shrink them in tests."""

    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0

    @property
    def timeout(self) -> float:
        """64*T1: timers B, F, H, J, L and M."""
        return 64 * self.t1


class TransactionUser(Protocol):
    def on_request(self, request: Request, transaction: ServerTransaction | None, flow: Flow) -> None:
        """A new request (``transaction`` is None for an ACK that matched none)."""

    def on_stray_response(self, response: Response, flow: Flow) -> None:
        """A response that matched no client transaction."""

    def on_invite_2xx_retransmission(self, response: Response) -> None:
        """A retransmitted 2xx to an INVITE we sent: the dialog sends its ACK again."""


def server_key(request: Request, method: str | None = None) -> tuple:
    """The server transaction a request belongs to (§17.2.3). ACK maps to its INVITE;
    ``method`` overrides the request's (a CANCEL looks for its INVITE)."""
    via = request.top_via
    method = method or request.method
    if method == "ACK":
        method = "INVITE"
    if via.has_rfc3261_branch:
        return (via.branch, via.sent_by_key, method)
    return (
        "rfc2543",
        str(request.uri),
        request.from_addr.tag,
        request.call_id,
        request.cseq.seq,
        via.sent_by_key,
        via.branch,
        method,
    )


def client_key(message: Request | Response) -> tuple:
    """The client transaction of a request we send or of a response to it (§17.1.3)."""
    method = message.cseq.method
    return (message.top_via.branch, "INVITE" if method == "ACK" else method)


class Transaction:
    """What server and client transactions share: timers and termination."""

    def __init__(self, layer: TransactionLayer, key: tuple, request: Request, flow: Flow) -> None:
        self.layer = layer
        self.key = key
        self.request = request
        self.flow = flow
        self.reliable = flow.is_stream
        self.state = "init"
        self._timers: list[asyncio.TimerHandle] = []
        if flow.connection is not None:
            flow.connection.hold()

    @property
    def timers(self) -> Timers:
        return self.layer.timers

    def _after(self, delay: float, callback: Callable[[], None]) -> None:
        self._timers.append(self.layer.loop.call_later(delay, callback))

    def _cancel_timers(self) -> None:
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()

    @property
    def terminated(self) -> bool:
        return self.state == "terminated"

    def terminate(self) -> None:
        if self.state == "terminated":
            return
        self.state = "terminated"
        self._cancel_timers()
        if self.flow.connection is not None:
            self.flow.connection.release()
        self.layer._forget(self)


# --- server side -----------------------------------------------------------------------


class ServerTransaction(Transaction):
    """A request we received; the TU answers with ``respond``."""

    def __init__(self, layer: TransactionLayer, key: tuple, request: Request, flow: Flow) -> None:
        super().__init__(layer, key, request, flow)
        self.response_flow = layer.transport.response_flow(request, flow)
        self.last_response: Response | None = None
        self._last_bytes: bytes | None = None

    @property
    def final_status(self) -> int | None:
        response = self.last_response
        return response.status if response is not None and response.status >= 200 else None

    def _send(self, response: Response) -> None:
        self.last_response = response
        self._last_bytes = response.to_bytes()
        self.layer.transport.counters.count_response(response.status)
        self.layer.transport.send(self._last_bytes, self.response_flow)

    def _resend(self) -> None:
        if self._last_bytes is not None:
            self.layer.transport.send(self._last_bytes, self.response_flow)

    def respond(self, response: Response) -> bool:
        raise NotImplementedError

    def on_retransmission(self, request: Request) -> None:
        raise NotImplementedError


class NonInviteServerTransaction(ServerTransaction):
    """§17.2.2: Trying → Proceeding → Completed (timer J) → Terminated."""

    def __init__(self, layer: TransactionLayer, key: tuple, request: Request, flow: Flow) -> None:
        super().__init__(layer, key, request, flow)
        self.state = "trying"

    def respond(self, response: Response) -> bool:
        if self.state not in ("trying", "proceeding"):
            log.debug("%r: response %d after the final one ignored", self.request, response.status)
            return False
        self._send(response)
        if response.status < 200:
            self.state = "proceeding"
        else:
            self.state = "completed"
            self._after(0 if self.reliable else self.timers.timeout, self.terminate)  # timer J
        return True

    def on_retransmission(self, request: Request) -> None:
        self.layer.absorbed_retransmissions += 1
        if self.state in ("proceeding", "completed"):
            self._resend()


class InviteServerTransaction(ServerTransaction):
    """§17.2.1 + RFC 6026: Proceeding → Accepted (2xx, timer L) or Completed (timers G/H)
    → Confirmed (timer I) → Terminated. Sends 100 Trying at once."""

    def __init__(self, layer: TransactionLayer, key: tuple, request: Request, flow: Flow) -> None:
        super().__init__(layer, key, request, flow)
        self.state = "proceeding"
        self._interval = self.timers.t1
        self.ack_timed_out = False
        self._send(make_response(request, 100))

    def respond(self, response: Response) -> bool:
        if self.state != "proceeding":
            log.debug("%r: response %d in state %s ignored", self.request, response.status, self.state)
            return False
        self._send(response)
        if response.status < 200:
            return True
        if response.status < 300:
            self.state = "accepted"
            self._after(self.timers.timeout, self.terminate)  # timer L
        else:
            self.state = "completed"
            if not self.reliable:
                self._after(self._interval, self._timer_g)
            self._after(self.timers.timeout, self._timer_h)
        return True

    def _timer_g(self) -> None:
        if self.state == "completed":
            self._resend()
            self._interval = min(2 * self._interval, self.timers.t2)
            self._after(self._interval, self._timer_g)

    def _timer_h(self) -> None:
        if self.state == "completed":
            self.ack_timed_out = True
            self.layer.ack_timeouts += 1
            log.info("%r: no ACK for %d within 64*T1", self.request, self.final_status or 0)
            self.terminate()

    def on_ack(self, ack: Request, flow: Flow) -> None:
        if self.state == "completed":
            self.state = "confirmed"
            self._cancel_timers()
            self._after(0 if self.reliable else self.timers.t4, self.terminate)  # timer I
        elif self.state == "accepted":
            # An ACK for the 2xx that reused the INVITE's branch: the dialog's business.
            self.layer.user.on_request(ack, None, flow)
        else:
            self.layer.absorbed_retransmissions += 1

    def on_retransmission(self, request: Request) -> None:
        self.layer.absorbed_retransmissions += 1
        if self.state in ("proceeding", "accepted", "completed"):
            self._resend()


# --- client side -----------------------------------------------------------------------


class ClientTransaction(Transaction):
    """A request we sent. ``response`` resolves with the final response: from the peer,
    or made up locally (``Response.local``) as 408 on timeout and 503 on transport failure."""

    def __init__(
        self,
        layer: TransactionLayer,
        request: Request,
        flow: Flow,
        on_provisional: Callable[[Response], None] | None = None,
    ) -> None:
        super().__init__(layer, client_key(request), request, flow)
        self.response: asyncio.Future[Response] = layer.loop.create_future()
        self.provisional = asyncio.Event()
        self.on_provisional = on_provisional
        self._bytes = request.to_bytes()
        self._interval = self.timers.t1

    def start(self) -> None:
        raise NotImplementedError

    def _send(self) -> None:
        self.layer.transport.send(self._bytes, self.flow)

    def _resolve(self, response: Response) -> None:
        if not self.response.done():
            self.response.set_result(response)

    def _local(self, status: int, reason: str | None = None) -> Response:
        response = make_response(self.request, status, reason)
        response.local = True
        return response

    def fail(self, status: int, reason: str) -> None:
        """End now with a locally made response (timeout, transport error, shutdown)."""
        self._resolve(self._local(status, reason))
        self.terminate()

    def _provisional(self, response: Response) -> None:
        self.provisional.set()
        if self.on_provisional is not None:
            try:
                self.on_provisional(response)
            except Exception:
                log.exception("on_provisional callback failed")

    def on_response(self, response: Response) -> None:
        raise NotImplementedError


class NonInviteClientTransaction(ClientTransaction):
    """§17.1.2: Trying → Proceeding → Completed (timer K) → Terminated; timers E and F."""

    def start(self) -> None:
        self.state = "trying"
        self._send()
        if not self.reliable:
            self._after(self._interval, self._timer_e)
        self._after(self.timers.timeout, self._timer_f)

    def _timer_e(self) -> None:
        if self.state in ("trying", "proceeding"):
            self._send()
            self._interval = self.timers.t2 if self.state == "proceeding" else min(2 * self._interval, self.timers.t2)
            self._after(self._interval, self._timer_e)

    def _timer_f(self) -> None:
        if self.state in ("trying", "proceeding"):
            self.fail(408, "Request Timeout")

    def on_response(self, response: Response) -> None:
        if self.state not in ("trying", "proceeding"):
            return
        if response.status < 200:
            self.state = "proceeding"
            self._provisional(response)
            return
        self.state = "completed"
        self._cancel_timers()
        self._resolve(response)
        self._after(0 if self.reliable else self.timers.t4, self.terminate)  # timer K


class InviteClientTransaction(ClientTransaction):
    """§17.1.1 + RFC 6026: Calling (timers A, B) → Proceeding → Accepted (2xx, timer M)
    or Completed (non-2xx, ACK sent, timer D) → Terminated."""

    def __init__(
        self,
        layer: TransactionLayer,
        request: Request,
        flow: Flow,
        on_provisional: Callable[[Response], None] | None = None,
    ) -> None:
        super().__init__(layer, request, flow, on_provisional)
        self._ack: bytes | None = None

    def start(self) -> None:
        self.state = "calling"
        self._send()
        if not self.reliable:
            self._after(self._interval, self._timer_a)
        self._after(self.timers.timeout, self._timer_b)

    def _timer_a(self) -> None:
        if self.state == "calling":
            self._send()
            self._interval *= 2
            self._after(self._interval, self._timer_a)

    def _timer_b(self) -> None:
        if self.state == "calling":
            self.fail(408, "Request Timeout")

    def on_response(self, response: Response) -> None:
        if response.status < 200:
            if self.state in ("calling", "proceeding"):
                self.state = "proceeding"
                self._provisional(response)
            return
        if response.status < 300:
            if self.state in ("calling", "proceeding"):
                self.state = "accepted"
                self._cancel_timers()
                self._resolve(response)
                self._after(self.timers.timeout, self.terminate)  # timer M
            elif self.state == "accepted":
                self.layer.user.on_invite_2xx_retransmission(response)
            return
        if self.state in ("calling", "proceeding"):
            self.state = "completed"
            self._cancel_timers()
            self._ack = self._build_ack(response).to_bytes()
            self.layer.transport.send(self._ack, self.flow)
            self._resolve(response)
            self._after(0 if self.reliable else self.timers.timeout, self.terminate)  # timer D
        elif self.state == "completed" and self._ack is not None:
            self.layer.transport.send(self._ack, self.flow)

    def _build_ack(self, response: Response) -> Request:
        """§17.1.1.3: the ACK for a non-2xx final response (same branch)."""
        request = self.request
        headers = Headers()
        headers.add("Via", request.headers.get_all("Via")[0])
        for name in ("Max-Forwards", "From"):
            value = request.headers.get(name)
            if value is not None:
                headers.add(name, value)
        headers.add("To", response.headers.get("To") or request.headers.get("To") or "")
        headers.add("Call-ID", request.call_id)
        headers.add("CSeq", f"{request.cseq.seq} ACK")
        for route in request.headers.get_all("Route"):
            headers.add("Route", route)
        return Request("ACK", request.uri, headers)


# --- the layer -------------------------------------------------------------------------


class TransactionLayer:
    """Matches messages to transactions, creates server transactions for new requests
    and hands them to the transaction user (the UA)."""

    def __init__(self, transport: Transport, timers: Timers, user: TransactionUser) -> None:
        self.transport = transport
        self.timers = timers
        self.user = user
        self.loop = asyncio.get_event_loop()
        self.server: dict[tuple, ServerTransaction] = {}
        self.client: dict[tuple, ClientTransaction] = {}
        self._merged: dict[tuple, tuple] = {}
        self.absorbed_retransmissions = 0
        self.stray_responses = 0
        self.merged_requests = 0
        self.ack_timeouts = 0

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()

    def receive(self, message: Request | Response, flow: Flow) -> None:
        if isinstance(message, Request):
            self._receive_request(message, flow)
        else:
            self._receive_response(message, flow)

    def _receive_request(self, request: Request, flow: Flow) -> None:
        key = server_key(request)
        transaction = self.server.get(key)
        if transaction is not None:
            if request.method == "ACK":
                if isinstance(transaction, InviteServerTransaction):
                    transaction.on_ack(request, flow)
            else:
                transaction.on_retransmission(request)
            return
        if request.method == "ACK":
            self.user.on_request(request, None, flow)
            return
        transaction = (InviteServerTransaction if request.method == "INVITE" else NonInviteServerTransaction)(
            self, key, request, flow
        )
        self.server[key] = transaction
        merged = self._merged_key(request)
        if merged is not None:
            other = self._merged.get(merged)
            if other is not None and other != key and other in self.server:
                # §8.2.2.2: the same request reached us by another path.
                self.merged_requests += 1
                transaction.respond(make_response(request, 482, to_tag=new_tag()))
                return
            self._merged[merged] = key
        self.user.on_request(request, transaction, flow)

    @staticmethod
    def _merged_key(request: Request) -> tuple | None:
        if request.method == "CANCEL" or request.to_addr.tag is not None:
            return None
        from_tag = request.from_addr.tag
        if from_tag is None:
            return None
        return (from_tag, request.call_id, request.cseq.seq, request.method)

    def _receive_response(self, response: Response, flow: Flow) -> None:
        try:
            key = client_key(response)
        except SipParseError:
            self.stray_responses += 1
            return
        transaction = self.client.get(key)
        if transaction is None:
            self.stray_responses += 1
            self.user.on_stray_response(response, flow)
            return
        transaction.on_response(response)

    async def send_request(
        self, request: Request, flow: Flow, on_provisional: Callable[[Response], None] | None = None
    ) -> ClientTransaction:
        """Start a client transaction for ``request`` (its top Via and branch already set).
        Await ``transaction.response`` for the final response."""
        cls = InviteClientTransaction if request.method == "INVITE" else NonInviteClientTransaction
        try:
            flow = await self.transport.connect(flow)
        except TransportError as exc:
            transaction = cls(self, request, flow, on_provisional)
            transaction.state = "terminated"
            transaction._resolve(transaction._local(503, f"Service Unavailable ({exc})"))
            return transaction
        transaction = cls(self, request, flow, on_provisional)
        self.client[transaction.key] = transaction
        transaction.start()
        return transaction

    def find_invite(self, cancel: Request) -> InviteServerTransaction | None:
        """The INVITE server transaction a CANCEL refers to (§9.2), if still alive."""
        transaction = self.server.get(server_key(cancel, "INVITE"))
        return transaction if isinstance(transaction, InviteServerTransaction) else None

    def _forget(self, transaction: Transaction) -> None:
        if isinstance(transaction, ServerTransaction):
            if self.server.get(transaction.key) is transaction:
                del self.server[transaction.key]
                merged = None
                try:
                    merged = self._merged_key(transaction.request)
                except SipParseError:
                    pass
                if merged is not None and self._merged.get(merged) == transaction.key:
                    del self._merged[merged]
        elif self.client.get(transaction.key) is transaction:
            del self.client[transaction.key]

    def stop(self) -> None:
        for transaction in list(self.server.values()):
            transaction.terminate()
        for client in list(self.client.values()):
            client.fail(503, "Service Unavailable (stopping)")

    def counts(self) -> dict[str, int]:
        return {"server_transactions": len(self.server), "client_transactions": len(self.client)}
