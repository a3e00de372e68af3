"""Real UDP helpers for RTP tests: a bare peer socket and a lossy, delaying relay."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from sip.rtpsession import PortAllocator
from sip.sdp import NegotiatedMedia
from tests.support.procs import free_port


def port_allocator(pairs: int = 50) -> PortAllocator:
    """An allocator over a range starting at a port that is free right now."""
    while True:
        base = free_port(socket.SOCK_DGRAM)
        base += base & 1
        if base + 2 * pairs < 65535:
            return PortAllocator(base, base + 2 * pairs - 1, start=base)


def loopback_media(
    remote_port: int = 9, *, codec: str = "PCMU", payload_type: int = 0, clock_rate: int = 8000, ptime: int = 20
) -> NegotiatedMedia:
    """What a plain sendrecv answer negotiates with a peer on 127.0.0.1 (no RTCP port, no DTMF)."""
    return NegotiatedMedia(
        remote_address="127.0.0.1",
        remote_port=remote_port,
        remote_rtcp_port=None,
        codec=codec,
        payload_type=payload_type,
        clock_rate=clock_rate,
        ptime=ptime,
        dtmf_payload_type=None,
        direction="sendrecv",
    )


class UdpPeer(asyncio.DatagramProtocol):
    """A plain UDP socket: what it receives lands in ``received`` as (data, source)."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[bytes, tuple]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    @classmethod
    async def open(cls, host: str = "127.0.0.1") -> UdpPeer:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        _, peer = await loop.create_datagram_endpoint(cls, local_addr=(host, 0), family=family)
        return peer

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.received.put_nowait((data, addr))

    @property
    def address(self) -> tuple[str, int]:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return host, port

    def send(self, data: bytes, address: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(data, address)

    async def receive(self) -> tuple[bytes, tuple]:
        """The next datagram; fails after 5 s."""
        async with asyncio.timeout(5.0):
            return await self.received.get()

    def drain(self) -> list[tuple[bytes, tuple]]:
        items = []
        while not self.received.empty():
            items.append(self.received.get_nowait())
        return items

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Relay:
    """Forwards datagrams between two sides with a fixed delay, dropping those ``drop`` picks.

    Side A talks to ``relay.a_side``, side B to ``relay.b_side``; each side's replies go to
    wherever that side last sent from (like a NAT).
    """

    def __init__(self, a: UdpPeer, b: UdpPeer, delay: float, drop: Callable[[bytes, str], bool]) -> None:
        self.a, self.b = a, b
        self.delay = delay
        self.drop = drop
        self.dropped = 0
        self.a_peer: tuple | None = None
        self.b_peer: tuple | None = None
        self._tasks: list[asyncio.Task] = []

    @classmethod
    async def open(
        cls,
        delay: float = 0.0,
        drop: Callable[[bytes, str], bool] = lambda data, direction: False,
        b_target: tuple[str, int] | None = None,
    ) -> Relay:
        relay = cls(await UdpPeer.open(), await UdpPeer.open(), delay, drop)
        relay.b_peer = b_target
        relay._tasks = [
            asyncio.create_task(relay._pump(relay.a, "a->b")),
            asyncio.create_task(relay._pump(relay.b, "b->a")),
        ]
        return relay

    @property
    def a_side(self) -> tuple[str, int]:
        return self.a.address

    @property
    def b_side(self) -> tuple[str, int]:
        return self.b.address

    async def _pump(self, inbound: UdpPeer, direction: str) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data, source = await inbound.received.get()
            if direction == "a->b":
                self.a_peer = source[:2]
                out, target = self.b, self.b_peer
            else:
                self.b_peer = source[:2]
                out, target = self.a, self.a_peer
            if target is None:
                continue
            if self.drop(data, direction):
                self.dropped += 1
                continue
            loop.call_later(self.delay, out.send, data, target)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.a.close()
        self.b.close()
