"""UDP and TCP transports: one port, IPv4/IPv6, Via routing (RFC 3261 §18, RFC 3581),
malformed input, TCP framing, idle connections and the connection limit."""

from __future__ import annotations

import asyncio

import pytest

from sip.message import Request, make_response
from sip.streamlimits import StreamLimits
from sip.transport import Flow, Transport
from tests.support.procs import has_ipv6
from tests.support.sip_peer import RawPeer, branch, options


class Received:
    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()

    def __call__(self, message, flow) -> None:
        self.queue.put_nowait((message, flow))

    async def get(self):
        return await asyncio.wait_for(self.queue.get(), 5.0)


@pytest.fixture
async def server():
    received = Received()
    transport = Transport(
        "127.0.0.1", 0, on_message=received, max_message_size=4096, stream_limits=StreamLimits(idle_seconds=60)
    )
    await transport.start()
    transport.received = received
    yield transport
    await transport.stop()


async def test_udp_and_tcp_share_one_port(server):
    udp = await RawPeer.udp()
    tcp = await RawPeer.tcp("127.0.0.1", server.port)
    try:
        udp.send(options(f"sip:a@127.0.0.1:{server.port}", udp, call_id="over-udp"), ("127.0.0.1", server.port))
        tcp.send(options(f"sip:a@127.0.0.1:{server.port}", tcp, call_id="over-tcp"))
        got = {}
        for _ in range(2):
            message, flow = await server.received.get()
            got[message.call_id] = flow
        assert got["over-udp"].transport == "UDP" and got["over-udp"].port == udp.port
        assert got["over-tcp"].transport == "TCP" and got["over-tcp"].connection is not None
    finally:
        await udp.close()
        await tcp.close()


async def test_udp_response_goes_to_received_and_rport(server):
    peer = await RawPeer.udp()
    try:
        data = options("sip:a@example.com", peer).replace(
            f"{peer.host}:{peer.port}".encode(), b"client.invalid:5999"
        )  # sent-by we cannot reach
        peer.send(data, ("127.0.0.1", server.port))
        request, flow = await server.received.get()
        assert request.top_via.received == "127.0.0.1" and request.top_via.rport == peer.port
        target = server.response_flow(request, flow)
        assert (target.host, target.port) == ("127.0.0.1", peer.port)
        server.send(make_response(request, 200).to_bytes(), target)
        response = await peer.receive()
        assert response.status == 200 and response.top_via.rport == peer.port
    finally:
        await peer.close()


async def test_udp_response_without_rport_goes_to_the_sent_by_port(server):
    sender = await RawPeer.udp()
    listener = await RawPeer.udp()  # the port the client advertises in Via
    try:
        sender.send(options("sip:a@b", sender, via_port=listener.port, rport=False), ("127.0.0.1", server.port))
        request, flow = await server.received.get()
        assert "received" not in request.top_via.params  # sent-by host equals the source
        assert not request.top_via.has_rport
        target = server.response_flow(request, flow)
        server.send(make_response(request, 200).to_bytes(), target)
        assert (await listener.receive()).status == 200
        assert sender.queue.empty()
    finally:
        await sender.close()
        await listener.close()


async def test_force_rport_answers_the_source_port():
    received = Received()
    transport = Transport("127.0.0.1", 0, on_message=received, force_rport=True)
    await transport.start()
    peer = await RawPeer.udp()
    try:
        peer.send(options("sip:a@b", peer, via_port=5060, rport=False), ("127.0.0.1", transport.port))
        request, flow = await received.get()
        assert request.top_via.rport == peer.port
        transport.send(make_response(request, 200).to_bytes(), transport.response_flow(request, flow))
        assert (await peer.receive()).status == 200
    finally:
        await peer.close()
        await transport.stop()


async def test_tcp_response_goes_back_on_the_connection(server):
    peer = await RawPeer.tcp("127.0.0.1", server.port)
    try:
        peer.send(options("sip:a@b", peer, via_port=5060, rport=False))
        request, flow = await server.received.get()
        target = server.response_flow(request, flow)
        assert target.connection is flow.connection
        server.send(make_response(request, 200).to_bytes(), target)
        assert (await peer.receive()).status == 200
    finally:
        await peer.close()


@pytest.mark.skipif(not has_ipv6(), reason="no IPv6 loopback")
async def test_dual_stack_wildcard_serves_ipv6_and_ipv4():
    received = Received()
    transport = Transport("::", 0, on_message=received)
    await transport.start()
    v6 = await RawPeer.udp("::1")
    v4 = await RawPeer.udp("127.0.0.1")
    tcp6 = await RawPeer.tcp("::1", transport.port)
    try:
        v6.send(options(f"sip:a@[::1]:{transport.port}", v6, call_id="v6"), ("::1", transport.port))
        v4.send(options("sip:a@b", v4, call_id="v4"), ("127.0.0.1", transport.port))
        tcp6.send(options("sip:a@b", tcp6, call_id="tcp6"))
        flows = {}
        for _ in range(3):
            message, flow = await received.get()
            flows[message.call_id] = (message, flow)
        assert flows["v6"][1].host == "::1" and flows["v4"][1].host == "127.0.0.1"
        assert flows["tcp6"][1].transport == "TCP"
        for name, peer in (("v6", v6), ("v4", v4), ("tcp6", tcp6)):
            message, flow = flows[name]
            transport.send(make_response(message, 200).to_bytes(), transport.response_flow(message, flow))
            assert (await peer.receive()).status == 200
        assert transport.local_host_for("::1") in ("::1", "0:0:0:0:0:0:0:1")
    finally:
        for peer in (v6, v4, tcp6):
            await peer.close()
        await transport.stop()


async def test_malformed_requests_get_400_naming_the_fault_and_garbage_is_dropped(server):
    peer = await RawPeer.udp()
    try:
        bad = options("sip:a@b", peer).replace(b"CSeq: 1 OPTIONS", b"CSeq: 1 INVITE")
        peer.send(bad, ("127.0.0.1", server.port))
        response = await peer.receive()
        assert response.status == 400 and "CSeq" in response.reason
        peer.send(b"\x16\x03\x01 definitely not SIP\r\n\r\n", ("127.0.0.1", server.port))
        peer.send(b"SIP/2.0 999 Nope\r\nVia: SIP/2.0/UDP h\r\n\r\n", ("127.0.0.1", server.port))
        peer.send(options("sip:a@b", peer, call_id="after"), ("127.0.0.1", server.port))
        message, _ = await server.received.get()
        assert message.call_id == "after"  # still serving
        counters = server.counters
        assert counters.parse_errors == 3 and counters.bad_requests_answered == 1 and counters.dropped == 2
        assert peer.queue.empty()
    finally:
        await peer.close()


async def test_oversized_messages_are_refused_and_counted(server):
    peer = await RawPeer.udp()
    try:
        big = options("sip:a@b", peer, extra="X-Pad: " + "a" * 5000 + "\r\n")
        peer.send(big, ("127.0.0.1", server.port))
        response = await peer.receive()
        assert response.status == 513
        assert server.counters.oversized == 1 and server.received.queue.empty()
    finally:
        await peer.close()


async def test_tcp_framing_error_answers_400_and_closes(server):
    peer = await RawPeer.tcp("127.0.0.1", server.port)
    try:
        peer.send(options("sip:a@b", peer).replace(b"Content-Length: 0\r\n", b""))
        response = await peer.receive()
        assert response.status == 400 and "Content-Length" in response.reason
        await asyncio.wait_for(peer.closed.wait(), 5)
        assert server.counters.parse_errors == 1
    finally:
        await peer.close()


async def test_tcp_keepalive_ping_gets_a_pong(server):
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"\r\n\r\n")
        assert await asyncio.wait_for(reader.readexactly(2), 5) == b"\r\n"
        assert server.counters.keepalives == 1
    finally:
        writer.close()


async def test_idle_tcp_connections_are_closed_unless_held():
    received = Received()
    transport = Transport("127.0.0.1", 0, on_message=received, stream_limits=StreamLimits(idle_seconds=0.3))
    await transport.start()
    idle = await RawPeer.tcp("127.0.0.1", transport.port)
    held = await RawPeer.tcp("127.0.0.1", transport.port)
    try:
        idle.send(options("sip:a@b", idle))
        await received.get()
        held.send(options("sip:a@b", held))
        _, flow = await received.get()
        flow.connection.hold()
        await asyncio.wait_for(idle.closed.wait(), 10)
        assert transport.counters.tcp_idle_closed == 1
        assert not held.closed.is_set() and transport.tcp_connections == 1
        flow.connection.release()
        await asyncio.wait_for(held.closed.wait(), 10)
        assert transport.tcp_connections == 0
    finally:
        await idle.close()
        await held.close()
        await transport.stop()


async def test_tcp_connections_are_bounded():
    transport = Transport("127.0.0.1", 0, on_message=Received(), stream_limits=StreamLimits(max_connections=2))
    await transport.start()
    peers = [await RawPeer.tcp("127.0.0.1", transport.port) for _ in range(3)]
    try:
        await asyncio.wait_for(peers[2].closed.wait(), 5)
        assert transport.counters.tcp_rejected == 1 and transport.tcp_connections == 2
        assert not peers[0].closed.is_set()
    finally:
        for peer in peers:
            await peer.close()
        await transport.stop()


async def test_outgoing_tcp_connections_are_opened_once_and_reused(server):
    received = Received()
    client = Transport("127.0.0.1", 0, on_message=received)
    await client.start()
    try:
        flow = await client.connect(Flow("TCP", "127.0.0.1", server.port))
        again = await client.connect(Flow("TCP", "127.0.0.1", server.port))
        assert flow.connection is again.connection and client.tcp_connections == 1
        request = Request(
            "OPTIONS",
            f"sip:a@127.0.0.1:{server.port}",
            [
                ("Via", f"SIP/2.0/TCP 127.0.0.1:{client.port};branch={branch()}"),
                ("From", "<sip:c@d>;tag=1"),
                ("To", "<sip:a@b>"),
                ("Call-ID", "out"),
                ("CSeq", "1 OPTIONS"),
            ],
        )
        client.send(request.to_bytes(), flow)
        message, server_flow = await server.received.get()
        server.send(make_response(message, 200).to_bytes(), server.response_flow(message, server_flow))
        response, response_flow = await received.get()
        assert response.status == 200 and response_flow.connection is flow.connection
    finally:
        await client.stop()


async def test_bind_failure_is_reported():
    taken = Transport("127.0.0.1", 0, on_message=Received())
    await taken.start()
    try:
        clash = Transport("127.0.0.1", taken.port, on_message=Received())
        with pytest.raises(OSError):
            await clash.start()
    finally:
        await taken.stop()
