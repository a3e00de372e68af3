"""SIP over UDP and TCP on one port, and TLS on another, IPv4 and IPv6 (RFC 3261 §18,
§26.3.1, RFC 3581).

``Transport`` binds UDP and TCP on the same port (``::`` gives a dual-stack socket), and,
given server certificates, TLS on ``tls_port``; it parses what arrives and hands each
message with its ``Flow`` (where it came from) to ``on_message``. On requests it stamps
the top Via with ``received`` and fills ``rport`` (RFC 3581), so that ``response_flow``
can route the answer per §18.2.2: UDP responses go to received:rport when the client
asked for rport, else to the sent-by port; TCP and TLS responses go back on the
connection the request came on.

A TLS connection is a TCP connection that runs TLS (``sip.tls.TlsSession``) over its bytes:
the same ``StreamLimits`` (connection caps, per source too, and deadlines) plus the
handshake deadline (``StreamLimits.handshake_seconds``): a peer that connects and does not
finish the handshake in time is cut off and counted, so half-open handshakes cannot hold
connections. Each new connection takes the server context ``ServerCertificates`` holds at
that moment (a renewed certificate is used from the next connection on). A request whose
top Via carries ``alias`` (RFC 5923) makes its connection reusable for requests *to* the
sent-by address too, when that is the connection's own peer IP.

Malformed input is answered with 400 (505, 513) when enough can be read to route a
response, and is otherwise dropped; both are counted in ``counters``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl
import typing
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from typing import Any

from sip.errors import SipParseError, TransportError
from sip.framing import StreamFramer
from sip.message import DEFAULT_MAX_MESSAGE_SIZE, Request, Response, parse_message, stateless_response
from sip.ratelimit import source_key
from sip.status import reason_phrase
from sip.streamlimits import HANDSHAKE, IDLE, ConnectionClock, StreamLimits
from sip.tls import ServerCertificates, TlsError, TlsSession, client_context

log = logging.getLogger("sip.transport")

UDP_RECEIVE_BUFFER = 4 * 1024 * 1024
# A connection flood fills the accept queue; what waits there is accepted (and refused past
# the limits) at once, instead of the kernel dropping SYNs, legitimate ones among them.
LISTEN_BACKLOG = 1024
MessageHandler = Callable[[Request | Response, "Flow"], None]
STREAM_TRANSPORTS = frozenset({"TCP", "TLS"})


@dataclass
class TransportCounters:
    """What the transport saw; the application reads (and may export) these."""

    messages_received: int = 0
    messages_sent: int = 0
    parse_errors: int = 0  # malformed messages (answered or dropped)
    bad_requests_answered: int = 0  # malformed requests answered statelessly (400/505/513)
    dropped: int = 0  # malformed input that no response could be formed for
    oversized: int = 0  # messages over max_message_size
    keepalives: int = 0  # CRLF keep-alives (and empty datagrams)
    filtered: int = 0  # datagrams and connections from sources ``source_filter`` refused, unread
    send_errors: int = 0
    tcp_accepted: int = 0
    tcp_rejected: int = 0  # refused: max_connections in all, or max_per_source from one address
    tcp_idle_closed: int = 0
    tcp_slow_closed: int = 0  # closed for a first message, message or handshake too slow (slowloris)
    tcp_open: int = 0  # TCP and TLS connections open now
    tls_handshakes: int = 0  # TLS handshakes completed (either side)
    tls_handshake_failures: int = 0  # refused: protocol version, ciphers, certificates, garbage; or the peer gave up
    tls_handshake_timeouts: int = 0  # connected, but no finished handshake in time (also in tcp_slow_closed)
    tls_errors: int = 0  # TLS record errors after the handshake
    responses_sent: dict[int, int] = field(default_factory=dict)  # by status, retransmissions not counted

    def count_response(self, status: int) -> None:
        self.responses_sent[status] = self.responses_sent.get(status, 0) + 1

    def as_dict(self) -> dict[str, int | dict[int, int]]:
        return asdict(self)


@dataclass(frozen=True, eq=False)
class Flow:
    """Where a message came from or goes to: transport, address and, for TCP and TLS, the
    connection to prefer (a new one to host:port is opened when it has closed);
    ``server_name``: the name a new TLS connection checks the server's certificate
    against (default: ``host``)."""

    transport: str
    host: str
    port: int
    connection: TcpConnection | None = None
    server_name: str | None = None

    @property
    def is_stream(self) -> bool:
        return self.transport in STREAM_TRANSPORTS

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def __repr__(self) -> str:
        return f"Flow({self.transport} {self.host}:{self.port})"


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _normalise(address: tuple) -> tuple[str, int]:
    host, port = address[0], address[1]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host, port


def _same_host(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a.lower() == b.lower()


def _reason(exc: SipParseError) -> str:
    detail = "".join(c if 32 <= ord(c) < 127 else "?" for c in str(exc))
    if len(detail) > 160:
        detail = detail[:157] + "..."
    return f"{reason_phrase(exc.status)} ({detail})"


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, owner: Transport) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.owner._on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.owner.counters.send_errors += 1
        log.debug("UDP error: %s", exc)


class TcpConnection(asyncio.Protocol):
    """One TCP or TLS connection, either direction: frames the stream and keeps its
    deadlines (``StreamLimits``, applied by a ``ConnectionClock``). It is closed when idle
    unless something (a transaction, a dialog) holds it. With ``tls`` it runs TLS over the
    stream: a server (``inbound``) or a client checking ``server_hostname``; ``ready``
    resolves when the handshake is done (at once for TCP)."""

    def __init__(
        self,
        owner: Transport,
        tls: ssl.SSLContext | None = None,
        *,
        inbound: bool = True,
        server_hostname: str | None = None,
    ) -> None:
        self.owner = owner
        self.inbound = inbound
        self.name = "TLS" if tls is not None else "TCP"
        self.tls = TlsSession(tls, server_side=inbound, server_hostname=server_hostname) if tls else None
        self.ready: asyncio.Future[None] = owner._loop.create_future()
        self.framer = StreamFramer(owner.max_message_size, owner.stream_limits.max_header_bytes)
        self.transport: asyncio.Transport | None = None
        self.remote: tuple[str, int] = ("", 0)
        self.source = ""
        self.closed = False
        self.holds = 0
        self.clock: ConnectionClock | None = None
        self._keepalives_seen = 0
        self._registered = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, but not necessarily an asyncio.Transport subclass: uvloop's
        # TCPTransport is not one (and an isinstance check refused every uvloop connection).
        self.transport = typing.cast(asyncio.Transport, transport)
        self.remote = _normalise(transport.get_extra_info("peername"))
        self.source = source_key(self.remote[0])
        if not self.owner._register(self):
            self.closed = True
            self.transport.abort()
            self._fail_ready(TransportError("connection refused locally (limit)"))
            return
        self._registered = True
        self.clock = ConnectionClock(
            self.owner.stream_limits, self.owner._loop, self._expired, inbound=self.inbound, held=lambda: self.holds > 0
        )
        if self.tls is None:
            self.ready.set_result(None)
            return
        self.clock.start_handshake()
        try:
            hello = self.tls.start()
        except TlsError as exc:
            self._tls_failed(exc)
            return
        if hello:
            self.transport.write(hello)

    def _tls_failed(self, exc: TlsError) -> None:
        assert self.tls is not None
        if self.tls.established:
            self.owner.counters.tls_errors += 1
        else:
            self.owner.counters.tls_handshake_failures += 1
        log.info("TLS with %s:%d failed: %s", *self.remote, exc)
        self._fail_ready(TransportError(f"TLS with {self.remote[0]}:{self.remote[1]}: {exc}"))
        self.abort()

    def _fail_ready(self, exc: Exception) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc)
            self.ready.exception()  # retrieved: nobody may be waiting (a server-side connection)

    def _decrypt(self, data: bytes) -> bytes | None:
        """TLS records in, application data out (None: the connection is being closed)."""
        tls = self.tls
        assert tls is not None and self.transport is not None
        was_established = tls.established
        try:
            data, reply = tls.feed(data)
        except TlsError as exc:
            self._tls_failed(exc)
            return None
        if reply:
            self.transport.write(reply)
        if tls.established and not was_established:
            if self.clock is not None:
                self.clock.handshake_done()
            self.owner.counters.tls_handshakes += 1
            if not self.ready.done():
                self.ready.set_result(None)
        if tls.closed:
            self.close()
            return None
        return data

    @property
    def peer_certificate(self) -> dict | None:
        """The peer's verified certificate (mutual TLS), else None."""
        return self.tls.peer.certificate if self.tls is not None and self.tls.peer is not None else None

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self.tls is not None:
            decrypted = self._decrypt(data)
            if not decrypted:
                return
            data = decrypted
        try:
            messages = self.framer.feed(data)
        except SipParseError as exc:
            self.owner._on_stream_error(self, exc)
            return
        pings = self.framer.keepalives - self._keepalives_seen
        if pings:
            self.owner.counters.keepalives += pings
            self._keepalives_seen = self.framer.keepalives
            self.write(b"\r\n")  # RFC 5626 pong
        if self.clock is not None:
            self.clock.received(len(messages) + pings, self.framer.buffered > 0)
        for message in messages:
            self.owner._on_stream_message(message, self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.clock is not None:
            self.clock.cancel()
        if self.tls is not None and not self.tls.established and not self.ready.done() and self._registered:
            self.owner.counters.tls_handshake_failures += 1  # the peer gave up (e.g. it refused our certificate)
        self._fail_ready(TransportError(f"connection to {self.remote[0]}:{self.remote[1]} closed"))
        if self._registered:
            self._registered = False
            self.owner._unregister(self)

    def write(self, data: bytes) -> None:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise TransportError(f"{self.name} connection to {self.remote[0]}:{self.remote[1]} is closed")
        if self.tls is not None:
            try:
                data = self.tls.encrypt(data)
            except TlsError as exc:
                raise TransportError(f"TLS connection to {self.remote[0]}:{self.remote[1]}: {exc}") from None
        self.transport.write(data)
        if self.clock is not None:
            self.clock.sent()

    def hold(self) -> None:
        self.holds += 1

    def release(self) -> None:
        self.holds = max(0, self.holds - 1)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            if self.tls is not None:
                with contextlib.suppress(TlsError, OSError):
                    self.transport.write(self.tls.close())
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.closed = True
            self.transport.abort()

    def _expired(self, reason: str) -> None:
        if self.closed:
            return
        if reason == IDLE:
            self.owner.counters.tcp_idle_closed += 1
            log.debug("closing idle %s connection to %s:%d", self.name, *self.remote)
            self.close()
        else:
            self.owner.counters.tcp_slow_closed += 1
            if reason == HANDSHAKE:
                self.owner.counters.tls_handshake_timeouts += 1
                self._fail_ready(TransportError(f"TLS handshake with {self.remote[0]}:{self.remote[1]} timed out"))
            log.info("closing %s connection from %s:%d: %s deadline passed", self.name, *self.remote, reason)
            self.abort()


class Transport:
    """UDP and TCP listeners on one port, TLS on another; see the module docstring.

    ``tls_certificates``: the server certificates (None: no TLS listener); ``tls_port``
    (0: any free port); ``tls_client_context``: how connections we open check TLS servers
    (default: the system's CAs).
    """

    def __init__(
        self,
        host: str = "0.0.0.0",
        port: int = 0,
        *,
        on_message: MessageHandler | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        stream_limits: StreamLimits | None = None,
        tcp_connect_timeout: float = 5.0,
        force_rport: bool = False,
        public_host: str | None = None,
        tls_certificates: ServerCertificates | None = None,
        tls_port: int = 5061,
        tls_client_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.on_message = on_message
        self.max_message_size = max_message_size
        self.stream_limits = stream_limits or StreamLimits()
        self.tcp_connect_timeout = tcp_connect_timeout
        self.force_rport = force_rport
        self.public_host = public_host
        self.tls_certificates = tls_certificates
        self.tls_port = tls_port if tls_certificates is not None else None
        self._tls_client_context = tls_client_context
        self.counters = TransportCounters()
        # Called with each datagram's (and each new connection's) source address before
        # anything is parsed: False drops it unread (a banned flooder costs a lookup).
        self.source_filter: Callable[[str], bool] | None = None
        self._family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._udp: asyncio.DatagramTransport | None = None
        self._server: asyncio.Server | None = None
        self._tls_server: asyncio.Server | None = None
        self._connections: dict[tuple[str, int, str], TcpConnection] = {}
        self._aliases: dict[tuple[str, int, str], TcpConnection] = {}  # RFC 5923
        self._by_source: dict[str, set[TcpConnection]] = {}  # inbound connections per source
        self._tasks: set[asyncio.Task] = set()
        self._local_hosts: dict[str, str] = {}
        self._loop = asyncio.get_event_loop()

    # -- life cycle ---------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        udp_sock, tcp_sock = self._bind()
        self.port = udp_sock.getsockname()[1]
        self._udp, _ = await self._loop.create_datagram_endpoint(lambda: _UdpProtocol(self), sock=udp_sock)
        self._server = await self._loop.create_server(
            lambda: TcpConnection(self, inbound=True), sock=tcp_sock, backlog=LISTEN_BACKLOG
        )
        log.info("SIP listening on %s port %d (UDP and TCP)", self.host, self.port)
        if self.tls_certificates is not None:
            assert self.tls_port is not None
            tls_sock = self._new_socket(socket.SOCK_STREAM)
            try:
                tls_sock.bind((self.host, self.tls_port))
                tls_sock.listen(LISTEN_BACKLOG)
            except OSError:
                tls_sock.close()
                await self.stop()
                raise
            self.tls_port = tls_sock.getsockname()[1]
            self._tls_server = await self._loop.create_server(self._accept_tls, sock=tls_sock, backlog=LISTEN_BACKLOG)
            log.info("SIP listening on %s port %d (TLS)", self.host, self.tls_port)

    def _accept_tls(self) -> TcpConnection:
        assert self.tls_certificates is not None
        return TcpConnection(self, self.tls_certificates.context(), inbound=True)

    def _new_socket(self, kind: int) -> socket.socket:
        sock = socket.socket(self._family, kind)
        if self._family == socket.AF_INET6:
            # '::' serves IPv4 too (mapped addresses); a specific v6 address only v6.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if self.host == "::" else 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        else:
            # Bursts (hundreds of INVITEs at once) must not overflow the receive queue;
            # the kernel caps this at net.core.rmem_max.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)
        sock.setblocking(False)
        return sock

    def _bind(self) -> tuple[socket.socket, socket.socket]:
        last_error: OSError | None = None
        for _ in range(50):
            udp = self._new_socket(socket.SOCK_DGRAM)
            try:
                udp.bind((self.host, self.port))
            except OSError:
                udp.close()
                raise
            port = udp.getsockname()[1]
            tcp = self._new_socket(socket.SOCK_STREAM)
            try:
                tcp.bind((self.host, port))
                tcp.listen(LISTEN_BACKLOG)
            except OSError as exc:
                udp.close()
                tcp.close()
                if self.port != 0:
                    raise
                last_error = exc
                continue
            return udp, tcp
        raise OSError(f"no port free for both UDP and TCP on {self.host}: {last_error}")

    async def stop(self) -> None:
        for connection in list(self._connections.values()):
            connection.abort()
        self._connections.clear()
        self._aliases.clear()
        self._by_source.clear()
        for server in (self._server, self._tls_server):
            if server is not None:
                server.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(server.wait_closed(), 2.0)
        self._server = self._tls_server = None
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- receiving ----------------------------------------------------------------------

    def _on_datagram(self, data: bytes, addr: tuple) -> None:
        host, port = _normalise(addr)
        if self.source_filter is not None and not self.source_filter(host):
            self.counters.filtered += 1
            return
        if not data.strip(b"\r\n\t \x00"):
            self.counters.keepalives += 1
            return
        self._handle(data, Flow("UDP", host, port))

    def _on_stream_message(self, data: bytes, connection: TcpConnection) -> None:
        self._handle(data, Flow(connection.name, connection.remote[0], connection.remote[1], connection))

    def _on_stream_error(self, connection: TcpConnection, exc: SipParseError) -> None:
        head = connection.framer.error_head
        flow = Flow(connection.name, connection.remote[0], connection.remote[1], connection)
        self._reject(head + b"\r\n\r\n" if head is not None else b"", exc, flow)
        log.info("closing %s connection from %s:%d: %s", connection.name, *connection.remote, exc)
        connection.close()

    def _handle(self, data: bytes, flow: Flow) -> None:
        self.counters.messages_received += 1
        try:
            message = parse_message(data, max_size=self.max_message_size)
        except SipParseError as exc:
            self._reject(data, exc, flow)
            return
        if isinstance(message, Request):
            self._stamp_via(message, flow)
            if flow.connection is not None and "alias" in message.top_via.params:
                self._alias(message, flow.connection)
        if self.on_message is None:
            return
        try:
            self.on_message(message, flow)
        except Exception:
            log.exception("error handling %r from %r", message, flow)

    def _reject(self, data: bytes, exc: SipParseError, flow: Flow) -> None:
        if exc.status == 513:
            self.counters.oversized += 1
        else:
            self.counters.parse_errors += 1
        salvage = stateless_response(data[: self.max_message_size], exc.status, _reason(exc)) if data else None
        if salvage is None:
            self.counters.dropped += 1
            log.debug("dropped malformed message from %r: %s", flow, exc)
            return
        response, via = salvage
        if flow.is_stream:
            target = flow
        else:
            port = flow.port if (via.has_rport or self.force_rport) else (via.port or 5060)
            target = Flow("UDP", flow.host, port)
        log.debug("answering malformed request from %r with %d: %s", flow, exc.status, exc)
        self.counters.bad_requests_answered += 1
        self.counters.count_response(response.status)
        self.send(response.to_bytes(), target)

    def _stamp_via(self, request: Request, flow: Flow) -> None:
        via = request.top_via
        changed = False
        if not _same_host(via.host, flow.host):
            via.params.set("received", flow.host)
            changed = True
        if via.has_rport or self.force_rport:
            via.params.set("rport", str(flow.port))
            changed = True
        if changed:
            request.headers.replace_first("Via", str(via))

    def _alias(self, request: Request, connection: TcpConnection) -> None:
        """RFC 5923: the client offers its connection for requests to its Via sent-by. Only
        for its own IP (an alias for another host would let it capture that host's traffic)."""
        via = request.top_via
        port = via.port or (5061 if connection.name == "TLS" else 5060)
        if not _same_host(via.host, connection.remote[0]) and not _same_host(via.received or "", connection.remote[0]):
            return
        key = (connection.remote[0], port, connection.name)
        if key not in self._connections and self._aliases.get(key) is not connection:
            self._aliases[key] = connection

    # -- routing and sending ------------------------------------------------------------

    def response_flow(self, request: Request, flow: Flow) -> Flow:
        """Where responses to ``request`` (received on ``flow``) go (RFC 3261 §18.2.2)."""
        via = request.top_via
        if flow.is_stream:
            # Back on the connection; if it closes, a new one to received:sent-by-port.
            default_port = 5061 if flow.transport == "TLS" else 5060
            return Flow(flow.transport, via.received or flow.host, via.port or default_port, flow.connection)
        maddr = via.maddr
        host = maddr if maddr and is_ip(maddr) else (via.received or via.host)
        port = via.rport if via.rport is not None else (via.port or 5060)
        return Flow("UDP", host, port)

    def send(self, data: bytes, flow: Flow) -> None:
        """Send ``data`` on ``flow`` now. A TCP flow whose connection has gone is
        reconnected in the background. Failures are counted and logged, never raised."""
        try:
            if flow.is_stream:
                connection = self._live_connection(flow)
                if connection is None:
                    self._spawn(self._connect_and_send(data, flow))
                    return
                connection.write(data)
            else:
                if self._udp is None:
                    raise TransportError("transport is stopped")
                self._udp.sendto(data, self._udp_address(flow.host, flow.port))
            self.counters.messages_sent += 1
        except (OSError, TransportError) as exc:
            self.counters.send_errors += 1
            log.info("cannot send to %r: %s", flow, exc)

    async def _connect_and_send(self, data: bytes, flow: Flow) -> None:
        try:
            connected = await self.connect(flow)
            assert connected.connection is not None
            connected.connection.write(data)
            self.counters.messages_sent += 1
        except (OSError, TransportError) as exc:
            self.counters.send_errors += 1
            log.info("cannot send to %r: %s", flow, exc)

    def _live_connection(self, flow: Flow) -> TcpConnection | None:
        connection = flow.connection
        if connection is not None and not connection.closed and connection.ready.done():
            return connection
        key = (flow.host, flow.port, flow.transport)
        for table in (self._connections, self._aliases):
            connection = table.get(key)
            if connection is not None and not connection.closed and connection.ready.done():
                return connection
        return None

    def _udp_address(self, host: str, port: int) -> tuple:
        if not is_ip(host):
            raise TransportError(f"{host!r} is not an IP address (resolve it first)")
        if ":" in host:
            if self._family != socket.AF_INET6:
                raise TransportError(f"cannot reach IPv6 {host} from an IPv4 socket")
            return (host, port, 0, 0)
        if self._family == socket.AF_INET6:
            if self.host != "::":
                raise TransportError(f"cannot reach IPv4 {host} from an IPv6-only socket")
            return ("::ffff:" + host, port, 0, 0)
        return (host, port)

    def tls_client_context(self) -> ssl.SSLContext:
        """How connections we open check TLS servers (the system's CAs unless configured)."""
        if self._tls_client_context is None:
            self._tls_client_context = client_context()
        return self._tls_client_context

    async def connect(self, flow: Flow) -> Flow:
        """``flow`` ready to send: for TCP and TLS, with a live connection (reused or
        opened; a TLS one with its handshake done)."""
        if not flow.is_stream:
            return flow
        connection = self._live_connection(flow)
        if connection is None:
            limit = self.stream_limits.max_connections
            if len(self._connections) >= limit:
                raise TransportError(f"the TCP connection limit ({limit}) is reached")
            tls = self.tls_client_context() if flow.transport == "TLS" else None
            server_name = flow.server_name or flow.host
            try:
                _, opened = await asyncio.wait_for(
                    self._loop.create_connection(
                        lambda: TcpConnection(self, tls, inbound=False, server_hostname=server_name),
                        flow.host,
                        flow.port,
                    ),
                    self.tcp_connect_timeout,
                )
            except (TimeoutError, OSError) as exc:
                raise TransportError(f"cannot connect to {flow.host}:{flow.port} over {flow.transport}: {exc}") from exc
            await opened.ready  # TransportError: refused locally, handshake failed or timed out
            connection = opened
        return Flow(flow.transport, flow.host, flow.port, connection, flow.server_name)

    def _register(self, connection: TcpConnection) -> bool:
        """Admit a new connection within ``stream_limits``: the total, and for one we
        accepted, the connections from its source that carry nothing (no transaction or
        dialog holds them: a trunk's calls never count against it)."""
        limits = self.stream_limits
        if connection.inbound and self.source_filter is not None and not self.source_filter(connection.remote[0]):
            self.counters.filtered += 1
            return False
        if len(self._connections) >= limits.max_connections:
            return self._refuse(connection, "the TCP connection limit")
        if connection.inbound:
            same_source = self._by_source.setdefault(connection.source, set())
            if sum(1 for other in same_source if other.holds == 0) >= limits.max_per_source:
                if not same_source:
                    del self._by_source[connection.source]
                return self._refuse(connection, "the per-source TCP connection limit")
            same_source.add(connection)
        self._connections[(*connection.remote, connection.name)] = connection
        self.counters.tcp_accepted += 1
        self.counters.tcp_open = len(self._connections)
        return True

    def _refuse(self, connection: TcpConnection, limit: str) -> bool:
        self.counters.tcp_rejected += 1
        if self.counters.tcp_rejected & (self.counters.tcp_rejected - 1) == 0:  # 1st, 2nd, 4th, 8th...
            log.warning(
                "refusing %s connection from %s:%d: %s is reached (%d refused so far)",
                connection.name,
                *connection.remote,
                limit,
                self.counters.tcp_rejected,
            )
        return False

    def _unregister(self, connection: TcpConnection) -> None:
        key = (*connection.remote, connection.name)
        if self._connections.get(key) is connection:
            del self._connections[key]
        for alias in [k for k, c in self._aliases.items() if c is connection]:
            del self._aliases[alias]
        same_source = self._by_source.get(connection.source)
        if same_source is not None:
            same_source.discard(connection)
            if not same_source:
                del self._by_source[connection.source]
        self.counters.tcp_open = len(self._connections)

    @property
    def tcp_connections(self) -> int:
        return len(self._connections)

    # -- addresses ----------------------------------------------------------------------

    async def resolve(self, host: str) -> str:
        """An IP address for ``host`` (a literal is returned as is); non-blocking."""
        host = host.strip("[]")
        if is_ip(host):
            return host
        family = socket.AF_INET if self._family == socket.AF_INET else socket.AF_UNSPEC
        try:
            infos = await self._loop.getaddrinfo(host, None, family=family, type=socket.SOCK_DGRAM)
        except OSError as exc:
            raise TransportError(f"cannot resolve {host!r}: {exc}") from exc
        if self._family == socket.AF_INET6 and self.host != "::":
            infos = [i for i in infos if i[0] == socket.AF_INET6] or infos
        if not infos:
            raise TransportError(f"cannot resolve {host!r}: no address")
        return _normalise(infos[0][4])[0]

    def local_host_for(self, remote_host: str) -> str:
        """The address to put in Via, Contact and SDP toward ``remote_host``:
        ``public_host``, else the bound address, else the interface that routes there."""
        if self.public_host:
            return self.public_host
        if self.host not in ("0.0.0.0", "::"):
            return self.host
        cached = self._local_hosts.get(remote_host)
        if cached is not None:
            return cached
        family = socket.AF_INET6 if ":" in remote_host else socket.AF_INET
        local = "::1" if family == socket.AF_INET6 else "127.0.0.1"
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.connect((remote_host, 9))  # no packet is sent; the kernel picks a route
                local = _normalise(probe.getsockname())[0]
        except OSError:
            pass
        if len(self._local_hosts) > 4096:
            self._local_hosts.clear()
        self._local_hosts[remote_host] = local
        return local
