"""The per-call RTP endpoint: a UDP port pair (RTP on an even port, RTCP on the next) on asyncio.

Who may send us media (the "RTP bleed" defence), in order:

1. Before anything is latched, the first packet from the *signalled* address (the SDP's),
   or from any port at the signalled IP (a NAT rewrote the port), or, with
   ``allow_nat_any_ip``, from anywhere, latches the session onto its source. So does a
   packet from an IP given to ``trust_ip`` (the call's SIP source: a peer behind NAT often
   names its private address in SDP but sends from the address it signals from).
2. Once latched, only that exact source is accepted, with two exceptions that re-latch:
   a packet from the exact signalled address (signalling is the stronger evidence), and a
   packet from another port of the latched IP carrying a *different SSRC* than the latched
   stream (the peer restarted its media behind the same NAT).
3. Everything else is a stray packet: dropped unparsed and counted. Malformed packets from
   an admissible source are dropped and counted too. ``update_remote`` (re-INVITE) clears
   the latch (so a re-INVITE moves our media only to a verified address, or to one whose
   media has arrived).

Where we send (the "reflection" defence: an INVITE naming a third party's address in its SDP
must not make us stream at it): media goes back to where the latched peer's packets come
from (symmetric RTP). Until something is latched it goes to the signalled address only when
that address is *verified*: it is an IP given to ``trust_ip`` (the address the call's
signalling came from), or one this session's media came from before (a re-INVITE moving the
peer's port). Otherwise nothing is sent (the packets are counted as withheld) until
media arrives from the peer. RTCP follows the same idea: accepted from the signalled or
latched IP, sent to where the peer's RTCP comes from, or to a verified address; if the peer
multiplexes RTCP onto the RTP port (RFC 5761) so do we. Every ``rtcp_interval`` (randomised ×0.5–1.5
per RFC 3550 §6.3.1) we send an SR (if we sent media since the report before last) or an
RR, with SDES CNAME; :meth:`RtpSession.close` sends BYE and releases the ports.

With SRTP (:meth:`RtpSession.set_srtp`, SDES keys from offer/answer) everything sent is
protected and everything received is authenticated before it is parsed or may latch: a
replayed packet (``packets_srtp_replayed``) or one whose tag does not verify (forged,
corrupted, a stranger's: ``packets_srtp_auth_failed``) is dropped and counted, RTCP too.

Received RTP goes to the handler routed for its payload type (:meth:`RtpSession.route`):
telephone-event to a DTMF receiver's ``receive``. The audio type goes to a payload handler
(:meth:`RtpSession.route_payload`: a jitter buffer's ``put_payload``), which takes the
fields a jitter buffer needs rather than a packet object: a packet in the stream's common
form (version 2, no padding, extension or CSRC, from the latched source and SSRC) is then
delivered without being parsed into one. Handlers run on the event loop and must not block.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import random
import secrets
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from sip.dtmf import DtmfSender
from sip.jitterbuffer import JitterBuffer
from sip.rtcp import (
    Bye,
    ReceiverReport,
    ReportBlock,
    RtcpPacket,
    RtcpParseError,
    SenderReport,
    build_compound,
    ntp_middle,
    ntp_timestamp,
    parse_compound,
    round_trip_time,
    sdes_cname,
)
from sip.rtp import RTP_HEADER_SIZE, RtpPacket, RtpParseError
from sip.rtpstats import ReceiverStatistics, SenderStatistics
from sip.srtp import SrtpContext, SrtpError, SrtpKeys, SrtpReplayed

log = logging.getLogger(__name__)

Address = tuple[str, int]
PacketHandler = Callable[[RtpPacket, float], object]
PayloadHandler = Callable[[int, int, bytes, float], object]  # (ssrc, timestamp, payload, arrival)

_RTP_HEADER = struct.Struct("!BBHII")


class PortsExhausted(RuntimeError):
    """Every RTP port pair in the configured range is in use."""


class PortAllocator:
    """Hands out even RTP ports from ``[first, last]`` (RTCP is port + 1), never one that is held.

    Ports are handed out round robin, so a just-released port is the last to be reused and
    late packets of an ended call rarely reach the next one. The round starts at ``start``,
    by default a random pair: two processes sharing a range (a gateway restarted while its
    old ports drain, several test callers) do not all begin on the same port, and an
    attacker cannot guess the next call's port from the range alone.
    """

    def __init__(self, first: int = 16384, last: int = 32767, start: int | None = None) -> None:
        first += first & 1
        if not 1024 <= first < last <= 65535:
            raise ValueError(f"RTP port range {first}-{last} must lie within 1024-65535 and hold a pair")
        self.first = first
        self.last = last
        if start is None:
            start = first + 2 * secrets.randbelow(self.capacity)
        if not first <= start <= last - 1 or (start - first) % 2:
            raise ValueError(f"RTP start port {start} is not an even pair within {first}-{last}")
        self._next = start
        self._held: set[int] = set()

    @property
    def capacity(self) -> int:
        return (self.last - self.first + 1) // 2

    @property
    def in_use(self) -> int:
        return len(self._held)

    def acquire(self) -> int:
        for _ in range(self.capacity):
            port = self._next
            self._next = port + 2 if port + 3 <= self.last else self.first
            if port not in self._held:
                self._held.add(port)
                return port
        raise PortsExhausted(f"all {self.capacity} RTP port pairs in {self.first}-{self.last} are in use")

    def release(self, port: int) -> None:
        self._held.discard(port)


def _canonical_ip(host: str) -> str:
    """The form the kernel reports source addresses in; IPv4-mapped IPv6 becomes IPv4."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address (resolve names before handing them to RTP)") from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def media_address_problem(host: str, *, ipv4: bool, ipv6: bool) -> str | None:
    """Why RTP cannot be sent to ``host`` (a peer's SDP ``c=`` address) from a socket that
    reaches IPv4 and/or IPv6, or None when it can. Unicast IP literals only: a name
    (``c=IN IP4 localhost``), a multicast, broadcast or unspecified address, or the other
    family than the socket's is refused. (``0.0.0.0`` as RFC 2543 hold is the SDP layer's
    business: it never gets here as an address.)"""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        shown = host if len(host) <= 64 else host[:61] + "..."
        return f"c= address {shown!r} is not an IP address"
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_multicast:
        return f"c= address {address} is multicast (unicast RTP only)"
    if address.is_unspecified:
        return f"c= address {address} is unspecified"
    if address.version == 4 and address == ipaddress.IPv4Address("255.255.255.255"):
        return f"c= address {address} is broadcast"
    if address.version == 6 and not ipv6:
        return f"c= address {address} is IPv6, but this RTP socket is IPv4-only"
    if address.version == 4 and not ipv4:
        return f"c= address {address} is IPv4, but this RTP socket is IPv6-only"
    return None


def _source(addr: tuple) -> Address:
    host = addr[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return (host, addr[1])


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, tuple], None], on_error: Callable[[Exception], None]) -> None:
        self.on_datagram = on_datagram
        self.on_error = on_error
        # the loop looks the handler up on every datagram: hand it the session's directly (an
        # attribute shadowing the method on purpose, which mypy cannot express)
        self.datagram_received = on_datagram  # type: ignore[method-assign,assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.on_error(exc)


@dataclass(slots=True)
class RtpSessionStats:
    """A snapshot of one session's counters. ``None``: not known yet (no RTCP report so far)."""

    packets_sent: int
    octets_sent: int
    packets_received: int
    octets_received: int
    packets_lost: int
    fraction_lost: float
    packets_late: int
    packets_duplicate: int
    packets_stray: int
    packets_withheld: int
    packets_malformed: int
    packets_unknown_payload_type: int
    rtcp_sent: int
    rtcp_received: int
    jitter_ms: float
    rtt_ms: float | None
    remote_fraction_lost: float | None
    remote_packets_lost: int | None
    remote_jitter_ms: float | None
    relatches: int
    ssrc_changes: int
    send_errors: int
    remote_address: Address | None
    remote_bye: bool
    srtp: bool = False
    packets_srtp_replayed: int = 0
    packets_srtp_auth_failed: int = 0


class RtpSession:
    """One call's RTP/RTCP endpoint; create it with :meth:`open`. See the module docstring."""

    def __init__(
        self,
        *,
        loop: asyncio.AbstractEventLoop,
        ports: PortAllocator,
        port: int,
        family: socket.AddressFamily,
        payload_type: int,
        clock_rate: int,
        ptime_ms: float,
        allow_nat_any_ip: bool,
        rtcp_mux: bool,
        rtcp_interval: float,
        cname: str,
        ssrc: int,
    ) -> None:
        self._loop = loop
        self._ports = ports
        self.local_port = port
        self.local_rtcp_port = port + 1
        self._family = family
        self._dual_stack = False
        self.payload_type = payload_type
        self.clock_rate = clock_rate
        self.samples_per_packet = int(clock_rate * ptime_ms / 1000)
        self.allow_nat_any_ip = allow_nat_any_ip
        self.rtcp_mux = rtcp_mux
        self.rtcp_interval = rtcp_interval
        self.cname = cname
        self.ssrc = ssrc
        self._rtp_transport: asyncio.DatagramTransport | None = None
        self._rtcp_transport: asyncio.DatagramTransport | None = None
        self._rtcp_task: asyncio.Task | None = None
        self._closed = False
        # peer
        self._remote: Address | None = None
        self._remote_rtcp: Address | None = None
        self._latched: Address | None = None
        self._latched_addr: tuple | None = None  # the latched source as the socket reports it
        self._trusted_ips: set[str] = set()
        self._media_ips: deque[str] = deque(maxlen=8)  # where this session's media came from
        self._latched_ssrc: int | None = None
        self._retired_ssrcs: deque[int] = deque(maxlen=8)
        self._rtcp_latched: Address | None = None
        self._peer_muxes = False
        self._dest: tuple | None = None
        # sending
        # unpredictable starting points (RFC 3550 §5.1) make blind injection harder
        self._sequence = secrets.randbits(16)
        self.timestamp = secrets.randbits(32)
        self._sender = SenderStatistics(clock_rate)
        self._sent_at_reports = [0, 0]
        # receiving
        self._receiver = ReceiverStatistics(clock_rate)
        self._handlers: dict[int, PacketHandler] = {}
        self._payload_handlers: dict[int, PayloadHandler] = {}
        self._jitter_buffers: list[JitterBuffer] = []
        self.packets_received = 0
        self.octets_received = 0
        self.packets_stray = 0
        self.packets_withheld = 0  # media not sent: no verified peer to send it to yet
        self.packets_malformed = 0
        self.packets_unknown_payload_type = 0
        self.handler_errors = 0
        self.relatches = 0
        self.send_errors = 0
        self.rtcp_sent = 0
        self.rtcp_received = 0
        self._srtp: SrtpContext | None = None
        self.packets_srtp_replayed = 0
        self.packets_srtp_auth_failed = 0
        self.remote_bye = False
        self.on_bye: Callable[[str | None], object] | None = None
        self._remote_report: ReportBlock | None = None
        self._rtt: float | None = None
        # our NTP clock: wall time at start, advanced by the monotonic loop clock
        self._wall_origin = time.time()
        self._mono_origin = loop.time()

    # -- life cycle ----------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        ports: PortAllocator,
        *,
        host: str = "0.0.0.0",
        remote: Address | None = None,
        remote_rtcp: Address | None = None,
        rtcp_mux: bool = False,
        payload_type: int = 0,
        clock_rate: int = 8000,
        ptime_ms: float = 20.0,
        allow_nat_any_ip: bool = False,
        rtcp_interval: float = 5.0,
        cname: str | None = None,
        ssrc: int | None = None,
        bind_attempts: int = 64,
    ) -> RtpSession:
        """Bind a port pair from ``ports`` on ``host`` and start RTCP; the peer may follow later."""
        loop = asyncio.get_running_loop()
        try:
            family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        except ValueError:
            raise ValueError(f"RTP bind address {host!r} is not an IP address") from None
        for _ in range(min(bind_attempts, ports.capacity)):
            port = ports.acquire()
            session = cls(
                loop=loop,
                ports=ports,
                port=port,
                family=family,
                payload_type=payload_type,
                clock_rate=clock_rate,
                ptime_ms=ptime_ms,
                allow_nat_any_ip=allow_nat_any_ip,
                rtcp_mux=rtcp_mux,
                rtcp_interval=rtcp_interval,
                cname=cname or f"moshimoshi-{os.getpid()}-{secrets.token_hex(4)}",
                ssrc=secrets.randbits(32) if ssrc is None else ssrc,
            )
            try:
                await session._bind(host)
            except OSError:
                session.close(send_bye=False)
                continue
            except BaseException:
                session.close(send_bye=False)
                raise
            try:
                if remote is not None:
                    session.update_remote(
                        remote[0],
                        remote[1],
                        None if remote_rtcp is None else remote_rtcp[1],
                        rtcp_host=None if remote_rtcp is None else remote_rtcp[0],
                    )
                session._rtcp_task = loop.create_task(session._rtcp_loop(), name=f"rtcp-{port}")
            except BaseException:
                session.close(send_bye=False)
                raise
            return session
        raise PortsExhausted(f"no bindable RTP port pair on {host} after {bind_attempts} attempts")

    async def _bind(self, host: str) -> None:
        self._dual_stack = host == "::"  # '::' also reaches IPv4 peers (mapped addresses)
        self._rtp_transport, _ = await self._loop.create_datagram_endpoint(
            lambda: _Datagrams(self._on_rtp, self._on_socket_error),
            local_addr=(host, self.local_port),
            family=self._family,
        )
        self._rtcp_transport, _ = await self._loop.create_datagram_endpoint(
            lambda: _Datagrams(self._on_rtcp, self._on_socket_error),
            local_addr=(host, self.local_rtcp_port),
            family=self._family,
        )

    def close(self, reason: str | None = None, *, send_bye: bool = True) -> None:
        """Send RTCP BYE, stop RTCP, close both sockets, release the ports. Idempotent, never raises."""
        if self._closed:
            return
        self._closed = True
        self._latched_addr = None
        try:
            if self._rtcp_task is not None:
                self._rtcp_task.cancel()
            if send_bye and self._rtp_transport is not None:
                self._send_rtcp([*self._report(self._loop.time()), Bye([self.ssrc], reason)])
        finally:
            for transport in (self._rtp_transport, self._rtcp_transport):
                if transport is not None:
                    transport.close()
            self._ports.release(self.local_port)

    @property
    def closed(self) -> bool:
        return self._closed

    async def __aenter__(self) -> RtpSession:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    # -- peer ----------------------------------------------------------------------------------

    def remote_problem(self, host: str) -> str | None:
        """Why media cannot go to ``host`` from this session's socket (see
        :func:`media_address_problem`), or None."""
        ipv6 = self._family == socket.AF_INET6
        return media_address_problem(host, ipv4=not ipv6 or self._dual_stack, ipv6=ipv6)

    def update_remote(
        self, host: str, port: int, rtcp_port: int | None = None, *, rtcp_host: str | None = None
    ) -> None:
        """The signalled peer (SDP c=/m=, a=rtcp); clears the latch, e.g. after a re-INVITE."""
        if not 0 < port <= 65535:
            raise ValueError(f"remote RTP port {port} out of range")
        self._remote = (_canonical_ip(host), port)
        rtcp_port = port + 1 if rtcp_port is None else rtcp_port
        self._remote_rtcp = (_canonical_ip(rtcp_host or host), rtcp_port)
        self._latched = None
        self._latched_addr = None
        self._latched_ssrc = None
        self._rtcp_latched = None
        self._set_destination(self._remote if self._verified_ip(self._remote[0]) else None)

    @property
    def remote_address(self) -> Address | None:
        """Where media goes: the latched source, else the signalled address."""
        return self._latched or self._remote

    def _set_destination(self, address: Address | None) -> None:
        self._dest = None if address is None else self._sockaddr(address)

    def _sockaddr(self, address: Address) -> tuple:
        host, port = address
        if self._family == socket.AF_INET6 and ":" not in host:
            return ("::ffff:" + host, port)
        return (host, port)

    def trust_ip(self, host: str) -> None:
        """``host`` is the call's signalling peer (the address its INVITE came from, or the
        one we called): media may be sent to it before any arrives from it, and media from
        it is latched onto (peers behind NAT often name a private address in their SDP)."""
        ip = _canonical_ip(host)
        self._trusted_ips.add(ip)
        if self._latched is None and self._remote is not None and self._remote[0] == ip:
            self._set_destination(self._remote)

    @property
    def verified(self) -> bool:
        """Whether media goes out: to a latched source, or a signalled address given to ``trust_ip``."""
        return self._dest is not None

    def _verified_ip(self, ip: str) -> bool:
        return ip in self._trusted_ips or ip in self._media_ips

    def _admissible_ip(self, ip: str) -> bool:
        if self.allow_nat_any_ip:
            return True
        remote, latched = self._remote, self._latched
        return (
            (remote is not None and ip == remote[0])
            or (latched is not None and ip == latched[0])
            or (latched is None and ip in self._trusted_ips)
        )

    def _try_latch(self, source: Address, ssrc: int) -> bool:
        latched, signalled = self._latched, self._remote
        if latched is None:
            ok = (
                self.allow_nat_any_ip
                or (signalled is not None and source[0] == signalled[0])
                or source[0] in self._trusted_ips
            )
        else:
            ok = source == signalled or (
                source[0] == latched[0] and ssrc != self._latched_ssrc and ssrc not in self._retired_ssrcs
            )
        if ok:
            if latched is not None:
                self.relatches += 1
                self._retire(ssrc)
            if source[0] not in self._media_ips:
                self._media_ips.append(source[0])
            self._latched = source
            self._latched_ssrc = ssrc
            self._set_destination(source)
        return ok

    def _retire(self, new_ssrc: int) -> None:
        if self._latched_ssrc is not None and self._latched_ssrc != new_ssrc:
            self._retired_ssrcs.append(self._latched_ssrc)
        self._latched_ssrc = new_ssrc

    def set_format(self, payload_type: int, clock_rate: int, ptime_ms: float) -> None:
        """The negotiated audio format: the payload type media goes out with (and whose
        packets the jitter is measured on), its RTP clock rate and packet time. The session
        is opened before offer/answer picks them (the answer names its port), so the owner
        of the call's media sets them once they are known."""
        if not 0 <= payload_type <= 127:
            raise ValueError(f"payload type {payload_type} is not in 0..127")
        if clock_rate <= 0 or ptime_ms <= 0:
            raise ValueError(f"clock rate {clock_rate} and ptime {ptime_ms} must be positive")
        self.payload_type = payload_type
        self.samples_per_packet = int(clock_rate * ptime_ms / 1000)
        if clock_rate != self.clock_rate:
            self.clock_rate = clock_rate
            self._sender.clock_rate = clock_rate
            self._receiver.clock_rate = clock_rate
            if self._receiver.source is not None:
                self._receiver.source.clock_rate = clock_rate

    def set_srtp(self, keys: SrtpKeys | None) -> None:
        """Protect media with SRTP under ``keys`` (None: plain RTP). New keys on a session
        that has some (a re-INVITE) rekey it: see :meth:`SrtpContext.rekeyed`."""
        if keys is None:
            self._srtp = None
        elif self._srtp is None:
            self._srtp = SrtpContext(keys)
        else:
            self._srtp = self._srtp.rekeyed(keys)

    @property
    def srtp(self) -> bool:
        """Whether media is SRTP."""
        return self._srtp is not None

    def _srtp_failed(self, exc: SrtpError) -> None:
        if isinstance(exc, SrtpReplayed):
            self.packets_srtp_replayed += 1
        else:
            self.packets_srtp_auth_failed += 1

    # -- receiving -----------------------------------------------------------------------------

    def route(self, payload_type: int, handler: PacketHandler | None) -> None:
        """Deliver received packets of ``payload_type`` to ``handler(packet, arrival)``; None unroutes."""
        self._payload_handlers.pop(payload_type, None)
        if handler is None:
            self._handlers.pop(payload_type, None)
        else:
            self._handlers[payload_type] = handler

    def route_payload(self, payload_type: int, handler: PayloadHandler | None) -> None:
        """Deliver received packets of ``payload_type`` as ``handler(ssrc, timestamp, payload,
        arrival)``, on the fast path where they have the common form; None unroutes."""
        self._handlers.pop(payload_type, None)
        if handler is None:
            self._payload_handlers.pop(payload_type, None)
        else:
            self._payload_handlers[payload_type] = handler

    def attach_jitter_buffer(self, jitter_buffer: JitterBuffer, payload_type: int | None = None) -> None:
        """Route the audio payload type to ``jitter_buffer`` and report its late/duplicate counts."""
        self.route_payload(self.payload_type if payload_type is None else payload_type, jitter_buffer.put_payload)
        self._jitter_buffers.append(jitter_buffer)

    def now(self) -> float:
        """The clock that arrival times are on (the event loop's monotonic clock)."""
        return self._loop.time()

    def _on_rtp(self, data: bytes, addr: tuple) -> None:
        # The fast path: from the latched source (None once closed), the common header form
        # (version 2, no padding, extension or CSRC), a payload type with a payload handler,
        # not RTCP, the latched SSRC. No packet object; statistics and delivery as below.
        if addr == self._latched_addr and len(data) >= RTP_HEADER_SIZE and data[0] == 0x80:
            second = data[1]
            handler = self._payload_handlers.get(second & 0x7F)
            if handler is not None and not 192 <= second <= 223:
                srtp = self._srtp
                if srtp is not None:
                    try:
                        data = srtp.unprotect(data)
                    except SrtpError as exc:
                        self._srtp_failed(exc)
                        return
                _, _, sequence, timestamp, ssrc = _RTP_HEADER.unpack_from(data)
                if ssrc != self._latched_ssrc:  # authenticated (if SRTP): the general path goes on from here
                    self._on_clear_rtp(data, _source(addr), True)
                    return
                arrival = self._loop.time()
                payload = data[RTP_HEADER_SIZE:]
                size = len(payload)
                self.packets_received += 1
                self.octets_received += size
                self._receiver.update(ssrc, sequence, timestamp, arrival, size, (second & 0x7F) == self.payload_type)
                try:
                    handler(ssrc, timestamp, payload, arrival)
                except Exception:
                    self.handler_errors += 1
                    log.exception("RTP handler for payload type %d failed", second & 0x7F)
                return
        if self._closed:
            return
        source = _source(addr)
        latched = source == self._latched
        if not latched and not self._admissible_ip(source[0]):
            self.packets_stray += 1
            return
        if len(data) >= 2 and 192 <= data[1] <= 223:
            if self._handle_rtcp(data):
                self._peer_muxes = True
            return
        srtp = self._srtp
        if srtp is not None:
            try:
                data = srtp.unprotect(data)
            except SrtpError as exc:
                self._srtp_failed(exc)
                return
        if self._on_clear_rtp(data, source, latched):
            self._latched_addr = addr  # accepted: from the latched source, now or from here on

    def _on_clear_rtp(self, data: bytes, source: Address, latched: bool) -> bool:
        """An admitted RTP packet, authenticated and decrypted if SRTP: parse, latch,
        account and deliver it. False when it was dropped (malformed or stray)."""
        try:
            packet = RtpPacket.parse(data)
        except RtpParseError:
            self.packets_malformed += 1
            return False
        if not latched and not self._try_latch(source, packet.ssrc):
            self.packets_stray += 1
            return False
        if packet.ssrc != self._latched_ssrc:
            self._retire(packet.ssrc)
        arrival = self._loop.time()
        payload_type = packet.payload_type
        self.packets_received += 1
        self.octets_received += len(packet.payload)
        self._receiver.update(
            packet.ssrc,
            packet.sequence,
            packet.timestamp,
            arrival,
            len(packet.payload),
            measure_jitter=payload_type == self.payload_type,
        )
        handler = self._handlers.get(payload_type)
        payload_handler = self._payload_handlers.get(payload_type) if handler is None else None
        if handler is None and payload_handler is None:
            self.packets_unknown_payload_type += 1
            return True
        try:
            if handler is not None:
                handler(packet, arrival)
            elif payload_handler is not None:
                payload_handler(packet.ssrc, packet.timestamp, packet.payload, arrival)
        except Exception:
            self.handler_errors += 1
            log.exception("RTP handler for payload type %d failed", payload_type)
        return True

    def _on_rtcp(self, data: bytes, addr: tuple) -> None:
        if self._closed:
            return
        source = _source(addr)
        if source == self._rtcp_latched:
            self._handle_rtcp(data)
        elif not self._admissible_ip(source[0]):
            self.packets_stray += 1
        elif self._handle_rtcp(data):
            self._rtcp_latched = source  # only a packet that parsed (and authenticated) latches

    def _handle_rtcp(self, data: bytes) -> bool:
        srtp = self._srtp
        if srtp is not None:
            try:
                data = srtp.unprotect_rtcp(data)
            except SrtpError as exc:
                self._srtp_failed(exc)
                return False
        try:
            packets = parse_compound(data)
        except RtcpParseError:
            self.packets_malformed += 1
            return False
        now = self._loop.time()
        self.rtcp_received += 1
        for packet in packets:
            if isinstance(packet, SenderReport):
                self._receiver.on_sender_report(packet.ssrc, packet.ntp_timestamp, now)
            if isinstance(packet, SenderReport | ReceiverReport):
                for block in packet.reports:
                    if block.ssrc == self.ssrc:
                        self._remote_report = block
                        rtt = round_trip_time(ntp_middle(self._ntp_now(now)), block.lsr, block.dlsr)
                        if rtt is not None:
                            self._rtt = rtt
            elif isinstance(packet, Bye):
                self.remote_bye = True
                if self.on_bye is not None:
                    try:
                        self.on_bye(packet.reason)
                    except Exception:
                        self.handler_errors += 1
                        log.exception("RTCP BYE handler failed")
        return True

    def _on_socket_error(self, exc: Exception) -> None:
        # ICMP errors (port unreachable while the peer is not listening yet) are not fatal
        self.send_errors += 1
        log.debug("RTP socket error on port %d: %s", self.local_port, exc)

    # -- sending -------------------------------------------------------------------------------

    def send(
        self,
        payload: bytes,
        *,
        marker: bool = False,
        timestamp_increment: int | None = None,
        payload_type: int | None = None,
        timestamp: int | None = None,
    ) -> bool:
        """Send one RTP packet now; the caller's clock decides when. False if there is no
        verified peer yet (see the module docstring): the packet is withheld and counted, and
        a media packet still advances the media timestamp.

        By default the packet carries the media timestamp, which then advances by
        ``timestamp_increment`` (default: one ptime of samples). An explicit ``timestamp``
        (RFC 4733 events repeat their start time) is sent as given and leaves the media
        timestamp alone.
        """
        dest = self._dest
        if dest is None or self._closed:
            if dest is None and not self._closed:  # withheld until the peer is verified
                self.packets_withheld += 1
                if timestamp is None:  # the media clock runs on regardless
                    self.timestamp = (
                        self.timestamp
                        + (self.samples_per_packet if timestamp_increment is None else timestamp_increment)
                    ) & 0xFFFFFFFF
            return False
        media = timestamp is None
        stamp = self.timestamp if timestamp is None else timestamp
        data = (
            _RTP_HEADER.pack(
                0x80,
                (0x80 if marker else 0) | (self.payload_type if payload_type is None else payload_type),
                self._sequence,
                stamp,
                self.ssrc,
            )
            + payload
        )
        assert self._rtp_transport is not None
        try:
            if self._srtp is not None:
                data = self._srtp.protect(data)
            self._rtp_transport.sendto(data, dest)
        except (OSError, SrtpError):
            self.send_errors += 1
            return False
        self._sequence = (self._sequence + 1) & 0xFFFF
        now = self._loop.time()
        if media:
            self._sender.on_sent(len(payload), now, stamp)
            self.timestamp = (
                stamp + (self.samples_per_packet if timestamp_increment is None else timestamp_increment)
            ) & 0xFFFFFFFF
        else:
            self._sender.on_sent(len(payload), now)
        return True

    def send_media(self, payload: bytes, timestamp_increment: int) -> bool:
        """:meth:`send` for the next packet of the media stream (its payload type, the media
        timestamp, no marker): the egress pacer's path, 50 times a second per call."""
        dest = self._dest
        transport = self._rtp_transport
        if dest is None or transport is None or self._closed:
            return self.send(payload, timestamp_increment=timestamp_increment)
        stamp = self.timestamp
        data = _RTP_HEADER.pack(0x80, self.payload_type, self._sequence, stamp, self.ssrc) + payload
        try:
            if self._srtp is not None:
                data = self._srtp.protect(data)
            transport.sendto(data, dest)
        except (OSError, SrtpError):
            self.send_errors += 1
            return False
        self._sequence = (self._sequence + 1) & 0xFFFF
        self.timestamp = (stamp + timestamp_increment) & 0xFFFFFFFF
        self._sender.on_sent(len(payload), self._loop.time(), stamp)
        return True

    async def send_dtmf(
        self, digit: str, duration_ms: float = 100.0, *, payload_type: int = 101, sender: DtmfSender | None = None
    ) -> None:
        """Send one RFC 4733 digit in real time (start, updates, three ends), stamped with the
        current media timestamp. Audio sent meanwhile continues on its own timestamps."""
        packets = (sender or DtmfSender(self.clock_rate)).packets(digit, duration_ms)
        event_timestamp = self.timestamp
        start = self._loop.time()
        for packet in packets:
            delay = start + packet.offset - self._loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self.send(packet.payload, marker=packet.marker, payload_type=payload_type, timestamp=event_timestamp)

    # -- RTCP ----------------------------------------------------------------------------------

    def _ntp_now(self, now: float) -> int:
        return ntp_timestamp(self._wall_origin + (now - self._mono_origin))

    def _report(self, now: float) -> list[RtcpPacket]:
        """SR or RR plus SDES CNAME, as RFC 3550 wants every compound packet to start."""
        blocks = self._receiver.report_blocks(now)
        sent = self._sender.packets
        report: RtcpPacket
        if sent != self._sent_at_reports[0]:
            report = SenderReport(
                self.ssrc,
                self._ntp_now(now),
                self._sender.rtp_timestamp_at(now),
                self._sender.packet_count,
                self._sender.octet_count,
                blocks,
            )
        else:
            report = ReceiverReport(self.ssrc, blocks)
        self._sent_at_reports = [self._sent_at_reports[1], sent]
        return [report, sdes_cname(self.ssrc, self.cname)]

    def _send_rtcp(self, packets: list[RtcpPacket]) -> None:
        data = build_compound(packets)
        if self.rtcp_mux or self._peer_muxes:
            transport, dest = self._rtp_transport, self._dest
        else:
            transport = self._rtcp_transport
            address = self._rtcp_latched
            if address is None and self._remote_rtcp is not None and self._verified_ip(self._remote_rtcp[0]):
                address = self._remote_rtcp
            if address is None and self._dest is not None and self.remote_address is not None:
                address = (self.remote_address[0], self.remote_address[1] + 1)
            dest = None if address is None else self._sockaddr(address)
        if transport is None or dest is None:
            return
        try:
            if self._srtp is not None:
                data = self._srtp.protect_rtcp(data)
            transport.sendto(data, dest)
        except (OSError, SrtpError):
            self.send_errors += 1
            return
        self.rtcp_sent += 1

    def send_report(self) -> None:
        """Send an RTCP report now (the timer does this every ``rtcp_interval``)."""
        if not self._closed:
            self._send_rtcp(self._report(self._loop.time()))

    async def _rtcp_loop(self) -> None:
        # RFC 3550 §6.2: the first report after half an interval; then randomised intervals
        delay = self.rtcp_interval * random.uniform(0.5, 1.5) / 2
        while not self._closed:
            await asyncio.sleep(delay)
            with contextlib.suppress(Exception):
                self.send_report()
            delay = self.rtcp_interval * random.uniform(0.5, 1.5)

    # -- statistics ----------------------------------------------------------------------------

    def stats(self) -> RtpSessionStats:
        block = self._remote_report
        receiver = self._receiver
        return RtpSessionStats(
            packets_sent=self._sender.packets,
            octets_sent=self._sender.octets,
            packets_received=self.packets_received,
            octets_received=self.octets_received,
            packets_lost=receiver.packets_lost,
            fraction_lost=receiver.fraction_lost,
            packets_late=sum(jb.packets_late for jb in self._jitter_buffers),
            packets_duplicate=sum(jb.packets_duplicate for jb in self._jitter_buffers),
            packets_stray=self.packets_stray,
            packets_withheld=self.packets_withheld,
            packets_malformed=self.packets_malformed,
            packets_unknown_payload_type=self.packets_unknown_payload_type,
            rtcp_sent=self.rtcp_sent,
            rtcp_received=self.rtcp_received,
            jitter_ms=receiver.jitter_seconds * 1000,
            rtt_ms=None if self._rtt is None else self._rtt * 1000,
            remote_fraction_lost=None if block is None else block.fraction_lost / 256,
            remote_packets_lost=None if block is None else block.cumulative_lost,
            remote_jitter_ms=None if block is None else block.jitter * 1000 / self.clock_rate,
            relatches=self.relatches,
            ssrc_changes=receiver.ssrc_changes,
            send_errors=self.send_errors,
            remote_address=self.remote_address,
            remote_bye=self.remote_bye,
            srtp=self._srtp is not None,
            packets_srtp_replayed=self.packets_srtp_replayed,
            packets_srtp_auth_failed=self.packets_srtp_auth_failed,
        )
