"""TCP limits (sip.streamlimits) on real sockets: what a slowloris can hold, and that a
legitimate TCP call still gets in while one does."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from sip.streamlimits import StreamLimits
from sip.transport import Transport
from sip.ua import UserAgent
from tests.support.sip_peer import RawPeer, options
from tests.test_sip_ua import TIMERS, AnsweringApp, offer

TRICKLE = b"OPTIONS sip:a@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.2:5060;branch=z9hG4bKslow\r\n"


class Received:
    def __init__(self) -> None:
        self.messages: list = []

    def __call__(self, message, flow) -> None:
        self.messages.append((message, flow))


async def transport_with(limits: StreamLimits) -> Transport:
    transport = Transport("127.0.0.1", 0, on_message=Received(), stream_limits=limits)
    await transport.start()
    return transport


async def connect_from(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(host, 0))


async def closed_by_peer(reader: asyncio.StreamReader, within: float) -> bytes:
    """What the server sent before it closed the connection (fails if it stays open)."""
    return await asyncio.wait_for(reader.read(), within)


async def test_a_connection_that_never_completes_a_message_is_closed_after_the_first_message_deadline():
    transport = await transport_with(StreamLimits(first_message_seconds=0.4, message_seconds=5.0))
    try:
        silent_reader, silent = await connect_from("127.0.0.2", transport.port)
        began = time.monotonic()
        assert await closed_by_peer(silent_reader, 5) == b""
        assert 0.3 < time.monotonic() - began < 3
        assert transport.counters.tcp_slow_closed == 1 and transport.tcp_connections == 0
        silent.close()
    finally:
        await transport.stop()


async def test_trickled_bytes_do_not_keep_a_message_alive():
    transport = await transport_with(StreamLimits(first_message_seconds=60, message_seconds=0.6))
    try:
        reader, writer = await connect_from("127.0.0.2", transport.port)
        began = time.monotonic()
        closed = asyncio.ensure_future(reader.read())
        for byte in TRICKLE:  # one byte every 50 ms: the connection is never quiet
            if closed.done():
                break
            writer.write(bytes([byte]))
            await asyncio.sleep(0.05)
        assert await asyncio.wait_for(closed, 5) == b""
        assert time.monotonic() - began < 3
        assert transport.counters.tcp_slow_closed == 1
        writer.close()
    finally:
        await transport.stop()


async def test_a_whole_message_in_time_keeps_the_connection_until_it_is_idle():
    transport = await transport_with(StreamLimits(first_message_seconds=0.5, idle_seconds=1.0))
    peer = await RawPeer.tcp("127.0.0.1", transport.port)
    try:
        peer.send(options(f"sip:a@127.0.0.1:{transport.port}", peer))
        await asyncio.sleep(0.7)  # past the first-message deadline, within the idle time
        assert not peer.closed.is_set() and transport.tcp_connections == 1
        await asyncio.wait_for(peer.closed.wait(), 5)
        assert transport.counters.tcp_idle_closed == 1 and transport.counters.tcp_slow_closed == 0
    finally:
        await peer.close()
        await transport.stop()


async def test_an_endless_header_is_refused_at_the_header_cap():
    transport = await transport_with(StreamLimits(max_header_bytes=2048))
    try:
        reader, writer = await connect_from("127.0.0.1", transport.port)
        writer.write(TRICKLE.replace(b"127.0.0.2", b"127.0.0.1") + b"X-Pad: " + b"a" * 4096)
        answer = await closed_by_peer(reader, 5)
        assert answer.startswith(b"SIP/2.0 513 ")
        writer.close()
    finally:
        await transport.stop()


async def test_one_source_cannot_take_every_connection():
    transport = await transport_with(StreamLimits(max_per_source=8, first_message_seconds=30))
    attackers = []
    try:
        for _ in range(20):
            attackers.append(await connect_from("127.0.0.2", transport.port))
        await asyncio.sleep(0.2)
        assert transport.tcp_connections == 8 and transport.counters.tcp_rejected == 12
        peer = await RawPeer.tcp("127.0.0.1", transport.port)
        peer.send(options(f"sip:a@127.0.0.1:{transport.port}", peer))
        await asyncio.sleep(0.2)
        assert transport.tcp_connections == 9 and not peer.closed.is_set()
        await peer.close()
    finally:
        for _, writer in attackers:
            writer.close()
        await transport.stop()


async def test_a_slowloris_of_1024_connections_does_not_stop_a_tcp_call():
    limits = StreamLimits(first_message_seconds=2.0, message_seconds=4.0)
    app = AnsweringApp()
    uas = UserAgent("127.0.0.1", 0, on_invite=app, timers=TIMERS, stream_limits=limits)
    uac = UserAgent("127.0.0.1", 0, timers=TIMERS)
    await uas.start()
    await uac.start()
    sockets: list[socket.socket] = []
    try:
        for _ in range(1024):  # non-blocking connects: the kernel completes them in the backlog
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.bind(("127.0.0.2", 0))
            try:
                sock.connect(("127.0.0.1", uas.port))
            except BlockingIOError:
                pass
            sockets.append(sock)
        await asyncio.sleep(0.5)
        for sock in sockets:  # a first byte each: the slowloris begins its trickle
            try:
                sock.send(TRICKLE[:1])
            except OSError:
                pass
        assert uas.transport.tcp_connections <= limits.max_per_source
        dialog = await uac.invite(f"sip:echo@127.0.0.1:{uas.port};transport=tcp", offer(), timeout=10)
        answered = await app.dialog()
        await dialog.bye()
        assert await asyncio.wait_for(answered.terminated, 5) == "remote-bye"
        counters = uas.transport.counters
        deadline = time.monotonic() + 30
        while counters.tcp_rejected < 1024 - limits.max_per_source and time.monotonic() < deadline:
            assert uas.transport.tcp_connections <= limits.max_per_source + 1  # the attacker's + the call's
            await asyncio.sleep(0.1)
        assert counters.tcp_rejected >= 1024 - limits.max_per_source, counters
        # The slowloris's trickle is too slow: what it kept is closed by the first-message deadline.
        deadline = time.monotonic() + 15
        while uas.transport.tcp_connections > 1 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        assert uas.transport.tcp_connections <= 1 and counters.tcp_slow_closed >= limits.max_per_source
    finally:
        for sock in sockets:
            sock.close()
        await uac.stop()
        await uas.stop()


@pytest.mark.parametrize("field, value", [("max_per_source", 0), ("message_seconds", 0.0), ("max_header_bytes", 100)])
def test_limits_are_validated(field, value):
    with pytest.raises(ValueError):
        StreamLimits(**{field: value})
