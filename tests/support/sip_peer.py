"""A bare SIP peer for tests: raw bytes out over UDP or TCP, parsed messages back.

It deliberately implements no SIP logic of its own (no transactions, no retransmission)
so that tests see exactly what the stack under test sends.
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
import time

from sip.errors import SipParseError
from sip.framing import StreamFramer
from sip.headers import Headers
from sip.message import Request, Response, parse_message, split_head
from sip.uri import format_host


def branch() -> str:
    return "z9hG4bK" + secrets.token_hex(8)


class RawPeer:
    """Send bytes to a SIP server and collect what it sends back (parsed)."""

    def __init__(self, transport: str) -> None:
        self.transport = transport
        self.queue: asyncio.Queue[Request | Response] = asyncio.Queue()
        self.raw: list[bytes] = []
        self.unparsable: list[bytes] = []
        self._udp: asyncio.DatagramTransport | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self.host = "127.0.0.1"
        self.port = 0
        self.ssl_object: ssl.SSLObject | None = None
        self.closed = asyncio.Event()

    @classmethod
    async def udp(cls, host: str = "127.0.0.1") -> RawPeer:
        peer = cls("UDP")
        loop = asyncio.get_running_loop()
        peer._udp, _ = await loop.create_datagram_endpoint(lambda: _Datagrams(peer), local_addr=(host, 0))
        peer.host, peer.port = peer._udp.get_extra_info("sockname")[:2]
        return peer

    @classmethod
    async def tcp(cls, host: str, port: int) -> RawPeer:
        peer = cls("TCP")
        reader, writer = await asyncio.open_connection(host, port)
        peer._writer = writer
        peer.host, peer.port = writer.get_extra_info("sockname")[:2]
        peer._reader_task = asyncio.create_task(peer._read(reader))
        return peer

    @classmethod
    async def tls(
        cls,
        host: str,
        port: int,
        context: ssl.SSLContext,
        server_hostname: str | None = "localhost",
        *,
        via_host: str | None = None,
    ) -> RawPeer:
        """A TLS client (the event loop's own TLS, not the stack under test's)."""
        peer = cls("TLS")
        reader, writer = await asyncio.open_connection(
            host, port, ssl=context, server_hostname=server_hostname, ssl_handshake_timeout=10
        )
        peer._writer = writer
        peer.host, peer.port = writer.get_extra_info("sockname")[:2]
        peer.ssl_object = writer.get_extra_info("ssl_object")
        peer._reader_task = asyncio.create_task(peer._read(reader))
        return peer

    async def _read(self, reader: asyncio.StreamReader) -> None:
        framer = StreamFramer()
        try:
            while data := await reader.read(65536):
                for message in framer.feed(data):
                    self._deliver(message)
        except (ConnectionError, OSError):  # a reset, a TLS alert: the peer is closed
            pass
        finally:
            self.closed.set()

    def _deliver(self, data: bytes) -> None:
        self.raw.append(data)
        try:
            message = parse_message(data)
        except SipParseError:
            # A server may echo malformed headers (a 400 copies what it got); keep the
            # status and the raw headers so that tests can still look at it.
            message = _unvalidated(data)
            if message is None:
                self.unparsable.append(data)
                return
        self.queue.put_nowait(message)

    def send(self, data: bytes | Request | Response, address: tuple[str, int] | None = None) -> None:
        payload = data if isinstance(data, bytes) else data.to_bytes()
        if self._udp is not None:
            self._udp.sendto(payload, address)
        else:
            assert self._writer is not None
            self._writer.write(payload)

    async def receive(self, within: float = 5.0) -> Request | Response:
        return await asyncio.wait_for(self.queue.get(), within)

    async def expect(self, predicate, within: float = 5.0, what: str = "a matching message") -> Request | Response:
        """The first message satisfying ``predicate``; the ones before it are put back."""
        deadline = time.monotonic() + within
        skipped = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {what} within {within} s; got {skipped!r}")
            try:
                message = await asyncio.wait_for(self.queue.get(), remaining)
            except TimeoutError:
                raise AssertionError(f"no {what} within {within} s; got {skipped!r}") from None
            if predicate(message):
                for other in skipped:
                    self.queue.put_nowait(other)
                return message
            skipped.append(message)

    async def final_response(self, call_id: str | None = None, within: float = 5.0) -> Response:
        def is_final(message) -> bool:
            if not isinstance(message, Response) or message.status < 200:
                return False
            return call_id is None or message.headers.get("Call-ID") == call_id

        response = await self.expect(is_final, within, f"final response for {call_id}")
        assert isinstance(response, Response)
        return response

    def drain(self) -> list[Request | Response]:
        items = []
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        return items

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except (ConnectionError, OSError):
                pass
        if self._reader_task is not None:
            self._reader_task.cancel()


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, peer: RawPeer) -> None:
        self.peer = peer

    def datagram_received(self, data: bytes, addr) -> None:
        self.peer._deliver(data)


def options(
    target: str,
    peer: RawPeer,
    *,
    call_id: str | None = None,
    transport: str | None = None,
    via_port: int | None = None,
    rport: bool = True,
    extra: str = "",
) -> bytes:
    """A well-formed OPTIONS from ``peer``."""
    call_id = call_id or f"probe-{secrets.token_hex(6)}"
    host = format_host(peer.host)
    rport_param = ";rport" if rport else ""
    return (
        f"OPTIONS {target} SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport or peer.transport} {host}:{via_port or peer.port};branch={branch()}{rport_param}\r\n"
        f"Max-Forwards: 70\r\n"
        f"From: <sip:probe@{host}>;tag={secrets.token_hex(4)}\r\n"
        f"To: <{target}>\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: 1 OPTIONS\r\n"
        f"{extra}"
        f"Content-Length: 0\r\n\r\n"
    ).encode()


def _unvalidated(data: bytes) -> Response | None:
    parts = split_head(data)
    head = (parts[0] if parts else data).decode("utf-8", "replace").split("\r\n")
    status_line = head[0].split(" ", 2)
    if len(status_line) < 2 or not status_line[0].startswith("SIP/") or not status_line[1].isdigit():
        return None
    headers = Headers()
    for line in head[1:]:
        name, colon, value = line.partition(":")
        if colon:
            headers.add(name.strip(), value.strip())
    return Response(int(status_line[1]), status_line[2] if len(status_line) > 2 else "", headers)


# -- many INVITE transactions over one socket (refused-call floods) ----------------------------


def _offer(media: str) -> str:
    return f"v=0\r\no=peer 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n{media}\r\n"


PCMU_OFFER = _offer("m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000")
G729_OFFER = _offer("m=audio 40000 RTP/AVP 18\r\na=rtpmap:18 G729/8000")  # no codec in common: 488
CALLER_NUMBER = "+819012345678"
DIALLED_NUMBER = "0312345678"


class InviteCaller:
    """One UDP socket, many INVITE transactions at once (responses routed by Call-ID): each
    INVITE is sent, optionally CANCELled once it rings, and its final response ACKed.
    From ``CALLER_NUMBER`` to ``DIALLED_NUMBER``."""

    def __init__(self, peer: RawPeer, port: int, host: str = "127.0.0.1") -> None:
        self.peer = peer
        self.target = (host, port)
        self.waiting: dict[str, asyncio.Queue[Response]] = {}
        self.reader = asyncio.create_task(self._route())

    def request(self, method: str, call_id: str, via: str, *, body: str = "", to_tag: str = "") -> bytes:
        peer = self.peer
        uri = f"sip:{DIALLED_NUMBER}@{format_host(self.target[0])}:{self.target[1]}"
        typed = "Content-Type: application/sdp\r\n" if body else ""
        to = f"<{uri}>" + (f";tag={to_tag}" if to_tag else "")
        return (
            f"{method} {uri} SIP/2.0\r\nVia: SIP/2.0/UDP {peer.host}:{peer.port};branch={via};rport\r\n"
            f"Max-Forwards: 70\r\nFrom: <sip:{CALLER_NUMBER}@{peer.host}>;tag=t{call_id[:8]}\r\nTo: {to}\r\n"
            f"Call-ID: {call_id}\r\nCSeq: 1 {method}\r\nContact: <sip:caller@{peer.host}:{peer.port}>\r\n"
            f"{typed}Content-Length: {len(body.encode())}\r\n\r\n{body}"
        ).encode()

    async def _route(self) -> None:
        while True:
            message = await self.peer.queue.get()
            if isinstance(message, Response):
                queue = self.waiting.get(message.call_id)
                if queue is not None:
                    queue.put_nowait(message)

    @staticmethod
    async def _next(queue: asyncio.Queue[Response], predicate, within: float) -> Response:
        while True:
            response = await asyncio.wait_for(queue.get(), within)
            if response.headers.get("CSeq", "").endswith("INVITE") and predicate(response.status):
                return response

    async def call(self, offer: str, *, cancel: bool = False, within: float = 30.0) -> int:
        """One INVITE: its final status (after the CANCEL when ``cancel``: 487)."""
        call_id = secrets.token_hex(10)
        via = branch()
        queue: asyncio.Queue[Response] = asyncio.Queue()
        self.waiting[call_id] = queue
        try:
            self.peer.send(self.request("INVITE", call_id, via, body=offer), self.target)
            if cancel:
                await self._next(queue, lambda status: status == 180, within)  # ringing: queued for a slot
                self.peer.send(self.request("CANCEL", call_id, via), self.target)
            final = await self._next(queue, lambda status: status >= 200, within)
            to_tag = (final.headers.get("To") or "").partition("tag=")[2]
            self.peer.send(self.request("ACK", call_id, via, to_tag=to_tag), self.target)
            return final.status
        finally:
            del self.waiting[call_id]

    async def close(self) -> None:
        self.reader.cancel()
        await self.peer.close()
