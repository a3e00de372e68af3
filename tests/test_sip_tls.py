"""SIP over TLS (RFC 3261 §26.3.1, RFC 5630, RFC 5923) through the transport and the user
agent: its own port beside UDP/TCP, IPv4 and IPv6, handshake cases probed with the
event loop's own TLS client (unknown certificate, TLS 1.0, no SNI, no handshake at all),
mutual TLS, certificate rotation, connection reuse, and sips: rules."""

from __future__ import annotations

import asyncio
import os
import ssl
import warnings

import pytest

from sip.errors import TransportError
from sip.message import Request, make_response
from sip.streamlimits import StreamLimits
from sip.tls import ServerCertificates, certificate_subject, client_context
from sip.transport import Flow, Transport
from sip.ua import UserAgent
from tests.support.certs import TestCa, serial_of
from tests.support.procs import has_ipv6
from tests.support.sip_peer import RawPeer, branch, options

pytestmark = pytest.mark.timeout(60)


class Received:
    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()

    def __call__(self, message, flow) -> None:
        self.queue.put_nowait((message, flow))

    async def get(self):
        return await asyncio.wait_for(self.queue.get(), 5.0)


@pytest.fixture
def ca(tmp_path):
    return TestCa(tmp_path / "pki")


@pytest.fixture
def server_cert(ca):
    return ca.issue("sip.gateway.test", stem="gateway")


async def start_transport(certificates: ServerCertificates, host: str = "127.0.0.1", **kwargs) -> Transport:
    transport = Transport(host, 0, on_message=Received(), tls_certificates=certificates, tls_port=0, **kwargs)
    transport.received = transport.on_message
    await transport.start()
    return transport


@pytest.fixture
async def server(server_cert):
    transport = await start_transport(
        ServerCertificates(str(server_cert.cert), str(server_cert.key)),
        stream_limits=StreamLimits(handshake_seconds=1.0),
    )
    yield transport
    await transport.stop()


async def answer_once(server: Transport):
    message, flow = await server.received.get()
    server.send(make_response(message, 200).to_bytes(), server.response_flow(message, flow))
    return message, flow


async def test_tls_has_its_own_port_beside_udp_and_tcp_and_answers_on_the_connection(server, ca):
    assert server.tls_port not in (None, server.port)
    peer = await RawPeer.tls("127.0.0.1", server.tls_port, client_context(str(ca.path)))
    tcp = await RawPeer.tcp("127.0.0.1", server.port)
    try:
        assert peer.ssl_object.version() in ("TLSv1.2", "TLSv1.3")
        peer.send(options(f"sip:a@127.0.0.1:{server.tls_port}", peer, call_id="over-tls"))
        message, flow = await answer_once(server)
        assert message.call_id == "over-tls" and flow.transport == "TLS" and flow.connection.name == "TLS"
        response = await peer.receive()
        assert response.status == 200 and response.call_id == "over-tls"
        tcp.send(options(f"sip:a@127.0.0.1:{server.port}", tcp, call_id="over-tcp"))
        message, flow = await server.received.get()
        assert flow.transport == "TCP"
        peer.send(b"\r\n\r\n")  # RFC 5626 keep-alive inside TLS
        await asyncio.wait_for(_until(lambda: server.counters.keepalives == 1), 5)
        assert server.counters.tls_handshakes == 1 and server.tcp_connections == 2
    finally:
        await peer.close()
        await tcp.close()


async def _until(condition, within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


@pytest.mark.skipif(not has_ipv6(), reason="no IPv6 loopback here")
async def test_tls_over_ipv6(server_cert, ca):
    transport = await start_transport(ServerCertificates(str(server_cert.cert), str(server_cert.key)), host="::")
    try:
        peer = await RawPeer.tls("::1", transport.tls_port, client_context(str(ca.path)))
        peer.send(options(f"sip:a@[::1]:{transport.tls_port}", peer, call_id="v6"))
        message, flow = await answer_once(transport)
        assert flow.host == "::1" and flow.transport == "TLS"
        assert (await peer.receive()).status == 200
        v4 = await RawPeer.tls("127.0.0.1", transport.tls_port, client_context(str(ca.path)))
        v4.send(options(f"sip:a@127.0.0.1:{transport.tls_port}", v4, call_id="v4"))
        _, flow = await answer_once(transport)
        assert flow.host == "127.0.0.1"
        await peer.close()
        await v4.close()
    finally:
        await transport.stop()


async def test_a_client_that_does_not_know_our_certificate_fails_and_the_server_counts_it(server, tmp_path):
    stranger_ca = TestCa(tmp_path / "other", "another CA")
    with pytest.raises(ssl.SSLCertVerificationError):
        await RawPeer.tls("127.0.0.1", server.tls_port, client_context(str(stranger_ca.path)))
    await asyncio.wait_for(_until(lambda: server.counters.tls_handshake_failures == 1), 5)
    await asyncio.wait_for(_until(lambda: server.tcp_connections == 0), 5)


async def test_an_expired_server_certificate_is_refused_by_a_verifying_client(ca, tmp_path):
    expired = ca.issue("old.gateway", stem="expired", expired=True)
    transport = await start_transport(ServerCertificates(str(expired.cert), str(expired.key)))
    try:
        with pytest.raises(ssl.SSLCertVerificationError, match="expired"):
            await RawPeer.tls("127.0.0.1", transport.tls_port, client_context(str(ca.path)))
    finally:
        await transport.stop()


@pytest.mark.parametrize("version", ["TLSv1", "TLSv1_1"])
async def test_tls_1_0_and_1_1_are_refused(server, version):
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = old.maximum_version = ssl.TLSVersion[version]
    old.set_ciphers("ALL:@SECLEVEL=0")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await RawPeer.tls("127.0.0.1", server.tls_port, old, server_hostname=None)
    await asyncio.wait_for(_until(lambda: server.counters.tls_handshake_failures == 1), 5)


async def test_a_client_without_sni_is_served(server, ca):
    context = client_context(str(ca.path))
    context.check_hostname = False  # no server name: no SNI, no name check (the chain still is)
    peer = await RawPeer.tls("127.0.0.1", server.tls_port, context, server_hostname=None)
    try:
        peer.send(options(f"sip:a@127.0.0.1:{server.tls_port}", peer))
        await answer_once(server)
        assert (await peer.receive()).status == 200
    finally:
        await peer.close()


async def test_no_handshake_in_time_or_plain_sip_on_the_tls_port_is_cut_off_and_counted(server):
    silent = await RawPeer.tcp("127.0.0.1", server.tls_port)
    plain = await RawPeer.tcp("127.0.0.1", server.tls_port)
    try:
        plain.send(options(f"sip:a@127.0.0.1:{server.tls_port}", plain))
        await asyncio.wait_for(plain.closed.wait(), 5)
        assert server.counters.tls_handshake_failures == 1 and server.counters.messages_received == 0
        await asyncio.wait_for(silent.closed.wait(), 5)  # handshake_seconds=1
        assert server.counters.tls_handshake_timeouts == 1 and server.counters.tcp_slow_closed == 1
        await asyncio.wait_for(_until(lambda: server.tcp_connections == 0), 5)
        assert server.received.queue.empty()
    finally:
        await silent.close()
        await plain.close()


async def test_the_connection_limit_counts_tls_connections(server_cert, ca):
    transport = await start_transport(
        ServerCertificates(str(server_cert.cert), str(server_cert.key)), stream_limits=StreamLimits(max_connections=2)
    )
    peers = [
        await RawPeer.tcp("127.0.0.1", transport.port),
        await RawPeer.tls("127.0.0.1", transport.tls_port, client_context(str(ca.path))),
    ]
    try:
        with pytest.raises((ssl.SSLError, ConnectionError, OSError, asyncio.IncompleteReadError)):
            third = await RawPeer.tls("127.0.0.1", transport.tls_port, client_context(str(ca.path)))
            peers.append(third)
            third.send(options("sip:a@b", third))
            await asyncio.wait_for(third.closed.wait(), 5)
            raise ConnectionError("closed")
        assert transport.counters.tcp_rejected == 1 and transport.tcp_connections == 2
    finally:
        for peer in peers:
            await peer.close()
        await transport.stop()


async def test_mutual_tls_admits_only_clients_with_a_certificate_from_the_client_ca(server_cert, ca, tmp_path):
    trunk = ca.issue("trunk.carrier.test", stem="trunk", client=True)
    transport = await start_transport(
        ServerCertificates(str(server_cert.cert), str(server_cert.key), client_ca=str(ca.path))
    )
    try:
        anonymous = await RawPeer.tls("127.0.0.1", transport.tls_port, client_context(str(ca.path)))
        anonymous.send(options("sip:a@b", anonymous))  # TLS 1.3: refused after the handshake
        await asyncio.wait_for(anonymous.closed.wait(), 5)
        assert transport.received.queue.empty() and transport.counters.tls_handshake_failures == 1
        await anonymous.close()
        with_cert = client_context(str(ca.path), cert_file=str(trunk.cert), key_file=str(trunk.key))
        peer = await RawPeer.tls("127.0.0.1", transport.tls_port, with_cert)
        peer.send(options("sip:a@b", peer))
        _, flow = await answer_once(transport)
        assert certificate_subject(flow.connection.peer_certificate) == "trunk.carrier.test"
        await peer.close()
    finally:
        await transport.stop()


async def test_a_renewed_certificate_serves_new_connections_while_open_ones_go_on(server, server_cert, ca):
    before = await RawPeer.tls("127.0.0.1", server.tls_port, client_context(str(ca.path)))
    try:
        assert serial_of(before.ssl_object.getpeercert(binary_form=True)) == server_cert.serial
        renewed = ca.issue("sip.gateway.test", stem="renewed")
        os.replace(renewed.cert, server_cert.cert)
        os.replace(renewed.key, server_cert.key)
        after = await RawPeer.tls("127.0.0.1", server.tls_port, client_context(str(ca.path)))
        assert serial_of(after.ssl_object.getpeercert(binary_form=True)) == renewed.serial
        for peer in (before, after):  # both connections carry SIP
            peer.send(options("sip:a@b", peer))
            await answer_once(server)
            assert (await peer.receive()).status == 200
        assert server.tls_certificates.reloads == 1
        await after.close()
    finally:
        await before.close()


async def test_outgoing_tls_verifies_the_server_and_an_alias_makes_the_connection_reusable(server, ca):
    client = Transport("127.0.0.1", 0, on_message=Received(), tls_client_context=client_context(str(ca.path)))
    client.received = client.on_message
    await client.start()
    try:
        flow = await client.connect(Flow("TLS", "127.0.0.1", server.tls_port, server_name="localhost"))
        again = await client.connect(Flow("TLS", "127.0.0.1", server.tls_port))
        assert flow.connection is again.connection and client.tcp_connections == 1
        local_port = flow.connection.transport.get_extra_info("sockname")[1]
        request = Request(
            "OPTIONS",
            f"sip:a@127.0.0.1:{server.tls_port}",
            [
                ("Via", f"SIP/2.0/TLS 127.0.0.1:5061;branch={branch()};alias"),
                ("From", "<sip:c@d>;tag=1"),
                ("To", "<sip:a@b>"),
                ("Call-ID", "out"),
                ("CSeq", "1 OPTIONS"),
            ],
        )
        client.send(request.to_bytes(), flow)
        _, server_flow = await answer_once(server)
        response, response_flow = await client.received.get()
        assert response.status == 200 and response_flow.connection is flow.connection
        # RFC 5923: a request to the client's advertised sent-by (127.0.0.1:5061) reuses the connection
        back = await server.connect(Flow("TLS", "127.0.0.1", 5061))
        assert back.connection is server_flow.connection and server.tcp_connections == 1
        assert server_flow.connection.remote == ("127.0.0.1", local_port)
    finally:
        await client.stop()
    # a server whose name does not match is refused
    other = Transport("127.0.0.1", 0, on_message=Received(), tls_client_context=client_context(str(ca.path)))
    await other.start()
    try:
        with pytest.raises(TransportError, match="certificate verification failed"):
            await other.connect(Flow("TLS", "127.0.0.1", server.tls_port, server_name="other.example"))
        assert other.counters.tls_handshake_failures == 1
        await asyncio.wait_for(_until(lambda: other.tcp_connections == 0), 5)
    finally:
        await other.stop()


async def test_an_alias_for_another_ip_is_ignored(server, ca):
    peer = await RawPeer.tls("127.0.0.1", server.tls_port, client_context(str(ca.path)))
    try:
        honest = options("sip:a@b", peer, call_id="honest", via_port=5061).replace(b";rport", b";rport;alias")
        forged = (
            options("sip:a@b", peer, call_id="forged")
            .replace(b";rport", b";rport;alias")
            .replace(f"127.0.0.1:{peer.port}".encode(), b"192.0.2.99:5061", 1)
        )
        peer.send(honest)
        peer.send(forged)
        await answer_once(server)
        await answer_once(server)
        assert set(server._aliases) == {("127.0.0.1", 5061, "TLS")}
    finally:
        await peer.close()
    await asyncio.wait_for(_until(lambda: not server._aliases), 5)  # gone with its connection


# -- the user agent ------------------------------------------------------------------------

SDP = (
    "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    "m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
)


@pytest.fixture
async def uas(server_cert):
    answered: list = []

    async def on_invite(call):
        answered.append(call)
        await call.accept(SDP)

    agent = UserAgent(
        "127.0.0.1",
        0,
        on_invite=on_invite,
        tls_port=0,
        tls_certificates=ServerCertificates(str(server_cert.cert), str(server_cert.key)),
    )
    agent.answered = answered
    await agent.start()
    yield agent
    await agent.stop()


async def test_a_sips_request_over_udp_or_tcp_gets_416_and_over_tls_200(uas, ca):
    udp = await RawPeer.udp()
    tcp = await RawPeer.tcp("127.0.0.1", uas.port)
    tls = await RawPeer.tls("127.0.0.1", uas.tls_port, client_context(str(ca.path)))
    try:
        udp.send(options(f"sips:a@127.0.0.1:{uas.port}", udp), ("127.0.0.1", uas.port))
        tcp.send(options(f"sips:a@127.0.0.1:{uas.port}", tcp))
        tls.send(options(f"sips:a@127.0.0.1:{uas.tls_port}", tls))
        for peer, status in ((udp, 416), (tcp, 416), (tls, 200)):
            response = await peer.final_response()
            assert response.status == status, (peer.transport, response)
    finally:
        for peer in (udp, tcp, tls):
            await peer.close()


@pytest.mark.parametrize("scheme", ["sip", "sips"])
async def test_a_call_over_tls_keeps_to_its_connection_and_names_tls_in_contact(uas, ca, scheme):
    caller = UserAgent("127.0.0.1", 0, tls_client_context=client_context(str(ca.path)))
    await caller.start()
    try:
        target = (
            f"sips:agent@localhost:{uas.tls_port}"
            if scheme == "sips"
            else f"sip:agent@localhost:{uas.tls_port};transport=tls"
        )
        dialog = await caller.invite(target, SDP)
        incoming = uas.answered[0]
        assert incoming.transport == "TLS" and incoming.secure == (scheme == "sips")
        assert "SIP/2.0/TLS" in incoming.request.headers.get("Via") and ";alias" in incoming.request.headers.get("Via")
        contact = dialog.answer_response.headers.get("Contact")
        expected = (
            f"<sips:moshimoshi@127.0.0.1:{uas.tls_port}>"
            if scheme == "sips"
            else f"<sip:moshimoshi@127.0.0.1:{uas.tls_port};transport=tls>"
        )
        assert contact == expected
        # the UAS hangs up: its BYE goes over the caller's connection (there is no other way in)
        await incoming.dialog.bye()
        assert await asyncio.wait_for(dialog.terminated, 5) == "remote-bye"
        assert caller.transport.tcp_connections == 1 and uas.transport.tcp_connections == 1
        assert caller.transport.counters.tls_handshakes == 1
    finally:
        await caller.stop()


async def test_a_caller_that_does_not_trust_the_gateway_fails_the_call(uas, tmp_path):
    stranger = TestCa(tmp_path / "other", "another CA")
    caller = UserAgent("127.0.0.1", 0, tls_client_context=client_context(str(stranger.path)))
    await caller.start()
    try:
        from sip.errors import CallFailed

        with pytest.raises(CallFailed) as failed:
            await caller.invite(f"sip:agent@localhost:{uas.tls_port};transport=tls", SDP, timeout=5)
        assert failed.value.status == 503 and not uas.answered
    finally:
        await caller.stop()
