"""RtpSession over real UDP sockets: latching, strays, routing, RTCP between two sessions, close."""

from __future__ import annotations

import asyncio
import socket

import pytest

from sip.dtmf import DtmfReceiver
from sip.jitterbuffer import JitterBuffer
from sip.rtcp import Bye, ReceiverReport, SenderReport, parse_compound
from sip.rtp import RtpPacket, is_rtcp
from sip.rtpsession import PortAllocator, PortsExhausted, RtpSession
from sip.srtp import SrtpContext, SrtpKeys, new_crypto
from tests.support.polling import eventually
from tests.support.procs import has_ipv6
from tests.support.udp import Relay, UdpPeer, port_allocator

pytestmark = pytest.mark.timeout(60)


def rtp(seq: int, ssrc: int = 0xAAAA, pt: int = 0, payload: bytes = b"\xff" * 160) -> bytes:
    return RtpPacket(pt, seq & 0xFFFF, seq * 160, ssrc, payload).build()


class Collector:
    def __init__(self) -> None:
        self.packets: list[RtpPacket] = []

    def __call__(self, packet: RtpPacket, arrival: float) -> None:
        self.packets.append(packet)

    def payload(self, ssrc: int, timestamp: int, payload: bytes, arrival: float) -> None:
        """A payload handler's delivery (the fast path); the packets of these tests carry
        timestamp = sequence × 160, so the sequence is known from it."""
        self.packets.append(RtpPacket(0, timestamp // 160 & 0xFFFF, timestamp, ssrc, payload))


@pytest.fixture(params=["packet", "payload"])
def delivery(request) -> str:
    """How the audio reaches its handler: a packet object (``route``), or the fields of a
    packet in the common form without one (``route_payload``, the fast path)."""
    return request.param


def route(session: RtpSession, payload_type: int, collector: Collector, delivery: str) -> None:
    if delivery == "packet":
        session.route(payload_type, collector)
    else:
        session.route_payload(payload_type, collector.payload)


@pytest.fixture
async def ports():
    allocator = port_allocator()
    yield allocator
    assert allocator.in_use == 0, "a test leaked an RTP port pair"


@pytest.fixture
async def peers():
    opened: list[UdpPeer] = []

    async def open_peer(host: str = "127.0.0.1") -> UdpPeer:
        peer = await UdpPeer.open(host)
        opened.append(peer)
        return peer

    yield open_peer
    for peer in opened:
        peer.close()


async def test_symmetric_latching_behind_nat(ports, peers, delivery) -> None:
    peer = await peers()
    async with await RtpSession.open(ports, host="127.0.0.1", rtcp_interval=60) as session:
        assert session.local_port % 2 == 0 and session.local_rtcp_port == session.local_port + 1
        # the SDP says port 4000 on 127.0.0.1; a NAT made it the peer's real port instead
        session.update_remote("127.0.0.1", 4000)
        got = Collector()
        route(session, 0, got, delivery)
        peer.send(rtp(1), ("127.0.0.1", session.local_port))
        await eventually(lambda: len(got.packets) == 1)
        assert session.remote_address == peer.address
        assert session.send(b"\xd5" * 160)
        data, source = await peer.receive()
        assert source[1] == session.local_port
        sent = RtpPacket.parse(data)
        assert sent.ssrc == session.ssrc and sent.payload == b"\xd5" * 160 and sent.payload_type == 0


async def test_stray_packets_from_other_ports_and_ips_are_dropped_and_counted(ports, peers, delivery) -> None:
    peer, other_port, other_ip = await peers(), await peers(), await peers("127.0.0.2")
    async with await RtpSession.open(ports, host="0.0.0.0", rtcp_interval=60) as session:
        session.update_remote(*peer.address)
        got = Collector()
        route(session, 0, got, delivery)
        target = ("127.0.0.1", session.local_port)
        other_ip.send(rtp(1, ssrc=0xBAD), target)  # before anything is latched: wrong IP
        peer.send(rtp(2), target)
        await eventually(lambda: len(got.packets) == 1)
        other_port.send(rtp(3), target)  # same IP, another port, same SSRC: bleed
        other_ip.send(rtp(4), target)
        other_ip.send(b"garbage", target)
        peer.send(rtp(5), target)
        await eventually(lambda: len(got.packets) == 2)
        await eventually(lambda: session.stats().packets_stray == 4)
        assert [p.sequence for p in got.packets] == [2, 5]
        stats = session.stats()
        assert stats.packets_received == 2 and stats.packets_malformed == 0
        assert stats.remote_address == peer.address


async def test_no_latch_onto_a_foreign_ip_unless_allowed(ports, peers) -> None:
    foreign = await peers("127.0.0.2")
    async with (
        await RtpSession.open(ports, host="0.0.0.0", rtcp_interval=60) as strict,
        await RtpSession.open(ports, host="0.0.0.0", rtcp_interval=60, allow_nat_any_ip=True) as lenient,
    ):
        for session in (strict, lenient):
            session.update_remote("127.0.0.1", 4000)
            session.route(0, Collector())
            foreign.send(rtp(1), ("127.0.0.1", session.local_port))
        await eventually(lambda: strict.packets_stray == 1 and lenient.packets_received == 1)
        assert strict.remote_address == ("127.0.0.1", 4000)
        assert lenient.remote_address == foreign.address


async def test_media_from_the_signalling_source_latches_when_sdp_names_another_address(ports, peers) -> None:
    """A NATed phone names its private address in SDP and sends from its public one."""
    public = await peers("127.0.0.2")
    stranger = await peers("127.0.0.3")
    async with await RtpSession.open(ports, host="0.0.0.0", rtcp_interval=60) as session:
        session.update_remote("10.1.2.3", 4000)  # the private address in the SDP
        session.trust_ip("127.0.0.2")  # where the INVITE came from
        collector = Collector()
        session.route(0, collector)
        stranger.send(rtp(1, ssrc=7), ("127.0.0.1", session.local_port))
        public.send(rtp(1), ("127.0.0.1", session.local_port))
        await eventually(lambda: session.packets_received == 1 and session.packets_stray == 1)
        assert session.remote_address == public.address
        stranger.send(rtp(2, ssrc=7), ("127.0.0.1", session.local_port))  # latched: still stray
        await eventually(lambda: session.packets_stray == 2)


async def test_relatch_only_on_an_ssrc_change_from_the_latched_ip(ports, peers, delivery) -> None:
    first, second = await peers(), await peers()
    async with await RtpSession.open(ports, host="127.0.0.1", rtcp_interval=60) as session:
        session.update_remote("127.0.0.1", 4000)
        got = Collector()
        route(session, 0, got, delivery)
        target = ("127.0.0.1", session.local_port)
        first.send(rtp(1, ssrc=1), target)
        await eventually(lambda: len(got.packets) == 1)
        second.send(rtp(2, ssrc=1), target)  # same SSRC from a new port: not the peer
        await eventually(lambda: session.packets_stray == 1)
        second.send(rtp(100, ssrc=2), target)  # the peer restarted media behind its NAT
        await eventually(lambda: len(got.packets) == 2)
        assert session.remote_address == second.address
        first.send(rtp(3, ssrc=1), target)  # the old source is now the stray one
        await eventually(lambda: session.packets_stray == 2)
        stats = session.stats()
        assert stats.relatches == 1 and stats.ssrc_changes == 1


async def test_every_form_of_packet_from_the_latched_peer_reaches_the_handler(ports, peers, delivery) -> None:
    """The common form goes the fast way with a payload handler; a marker, CSRCs, an
    extension, padding or a new SSRC take the general path: the handler sees the same."""
    peer, other_port = await peers(), await peers()
    async with await RtpSession.open(ports, host="127.0.0.1", rtcp_interval=60) as session:
        session.update_remote(*peer.address)
        got = Collector()
        route(session, 0, got, delivery)
        target = ("127.0.0.1", session.local_port)
        forms = [
            RtpPacket(0, 1, 160, 0xAAAA, b"\x01" * 160),
            RtpPacket(0, 2, 320, 0xAAAA, b"\x02" * 160, marker=True),
            RtpPacket(0, 3, 480, 0xAAAA, b"\x03" * 160, csrc=(5, 6)),
            RtpPacket(0, 4, 640, 0xAAAA, b"\x04" * 160, padding=4),
            RtpPacket(0, 5, 800, 0xAAAA, b"\x05" * 160),
            RtpPacket(0, 6, 960, 0xBBBB, b"\x06" * 160),  # the peer's media restarted
            RtpPacket(0, 7, 1120, 0xBBBB, b"\x07" * 160),
        ]
        for count, form in enumerate(forms, 1):
            peer.send(form.build(), target)
            await eventually(lambda count=count: len(got.packets) == count)
        assert [(p.ssrc, p.timestamp, p.payload) for p in got.packets] == [
            (p.ssrc, p.timestamp, p.payload) for p in forms
        ]
        stats = session.stats()
        assert stats.packets_received == 7 and stats.octets_received == 7 * 160
        assert stats.ssrc_changes == 1 and stats.packets_lost == 0 and stats.relatches == 0
        assert stats.packets_stray == stats.packets_malformed == 0
        # the stream the session follows now is the new SSRC's: that SSRC from another port
        # is bleed, not a restart
        other_port.send(RtpPacket(0, 8, 1280, 0xBBBB, b"\x08" * 160).build(), target)
        await eventually(lambda: session.packets_stray == 1)
        assert session.remote_address == peer.address and len(got.packets) == 7


async def test_malformed_and_unknown_payload_types_are_counted(ports, peers, delivery) -> None:
    peer = await peers()
    async with await RtpSession.open(ports, host="127.0.0.1", rtcp_interval=60) as session:
        session.update_remote(*peer.address)
        got = Collector()
        route(session, 0, got, delivery)
        target = ("127.0.0.1", session.local_port)
        peer.send(rtp(1), target)
        peer.send(b"\x80\x00", target)  # too short
        peer.send(b"\x40" + bytes(20), target)  # version 1
        peer.send(rtp(2, pt=96), target)
        peer.send(rtp(3), target)
        await eventually(lambda: len(got.packets) == 2)
        await eventually(lambda: session.stats().packets_unknown_payload_type == 1)
        assert session.stats().packets_malformed == 2


async def test_jitter_buffer_and_dtmf_routing_between_two_sessions(ports) -> None:
    async with (
        await RtpSession.open(ports, host="127.0.0.1", rtcp_interval=60) as caller,
        await RtpSession.open(ports, host="127.0.0.1", rtcp_interval=60) as callee,
    ):
        caller.update_remote("127.0.0.1", callee.local_port)
        callee.update_remote("127.0.0.1", caller.local_port)
        caller.trust_ip("127.0.0.1")  # each is the other's signalling peer
        callee.trust_ip("127.0.0.1")
        jitter_buffer = JitterBuffer()
        digits = []
        receiver = DtmfReceiver(on_digit=digits.append)
        callee.attach_jitter_buffer(jitter_buffer)
        callee.route(101, receiver.receive)
        for _ in range(5):
            caller.send(b"\xff" * 160)
        await caller.send_dtmf("5", duration_ms=100)
        await eventually(lambda: len(digits) == 1)
        await eventually(lambda: jitter_buffer.packets_received == 5)
        # audio, then the digit: start, one update, three ends
        await eventually(lambda: callee.stats().packets_received == 5 + 5)
        assert digits[0].digit == "5" and digits[0].duration_ms == 100
        assert receiver.digits_received == 1
        stats = callee.stats()
        assert stats.packets_unknown_payload_type == 0
        assert stats.packets_duplicate == 0 and stats.packets_late == 0


async def test_rtcp_between_two_sessions_gives_loss_jitter_and_round_trip(ports) -> None:
    """A --relay (25 ms each way, drops every 10th RTP packet A->B)--> B, RTCP muxed through it."""

    def drop(data: bytes, direction: str) -> bool:
        if direction != "a->b" or is_rtcp(data):
            return False
        return RtpPacket.parse(data).sequence % 10 == 3

    async with (
        await RtpSession.open(ports, host="127.0.0.1", rtcp_interval=0.3, rtcp_mux=True) as a,
        await RtpSession.open(ports, host="127.0.0.1", rtcp_interval=0.3, rtcp_mux=True) as b,
    ):
        relay = await Relay.open(delay=0.025, drop=drop, b_target=("127.0.0.1", b.local_port))
        try:
            a.update_remote(*relay.a_side)
            b.update_remote(*relay.b_side)
            a.trust_ip("127.0.0.1")
            b.trust_ip("127.0.0.1")
            a.route(0, Collector())
            b.route(0, Collector())
            for _ in range(100):
                a.send(b"\xff" * 160)
                b.send(b"\xff" * 160)
                await asyncio.sleep(0.02)

            def both_informed() -> bool:
                sa, sb = a.stats(), b.stats()
                return (
                    sa.rtt_ms is not None
                    and sb.rtt_ms is not None
                    and sa.remote_packets_lost is not None
                    and sa.remote_packets_lost >= relay.dropped - 1
                    and sb.remote_packets_lost is not None
                )

            await eventually(both_informed)
            sa, sb = a.stats(), b.stats()
            assert relay.dropped >= 9
            # B measured the loss itself, and told A about it in its reports
            assert sb.packets_lost >= relay.dropped - 1
            assert sa.remote_packets_lost >= relay.dropped - 1 and sa.remote_fraction_lost is not None
            assert sb.remote_packets_lost == 0  # nothing was lost B->A
            # 25 ms each way: the round trip is at least 50 ms (and loopback adds little)
            for measured in (sa.rtt_ms, sb.rtt_ms):
                assert 45 <= measured < 1000
            assert sa.rtcp_sent > 0 and sa.rtcp_received > 0 and sb.rtcp_received > 0
            assert sb.jitter_ms >= 0
        finally:
            await relay.close()


async def test_rtcp_on_separate_ports_reaches_the_peer_session(ports) -> None:
    async with (
        await RtpSession.open(ports, host="127.0.0.1", rtcp_interval=0.2) as a,
        await RtpSession.open(ports, host="127.0.0.1", rtcp_interval=0.2) as b,
    ):
        a.update_remote("127.0.0.1", b.local_port)
        b.update_remote("127.0.0.1", a.local_port)
        a.trust_ip("127.0.0.1")
        b.trust_ip("127.0.0.1")
        a.route(0, Collector())
        b.route(0, Collector())
        for _ in range(10):
            a.send(b"\xff" * 160)
            b.send(b"\xff" * 160)
            await asyncio.sleep(0.02)
        await eventually(lambda: a.stats().rtt_ms is not None and b.stats().rtt_ms is not None)
        assert a.stats().remote_packets_lost == 0 and a.stats().remote_fraction_lost == 0
        assert a.stats().rtt_ms < 1000


async def test_reports_are_sr_when_sending_and_rr_otherwise_and_bye_on_close(ports, peers) -> None:
    peer_rtp, peer_rtcp = await peers(), await peers()
    session = await RtpSession.open(ports, host="127.0.0.1", rtcp_interval=60, cname="test@moshimoshi")
    session.update_remote("127.0.0.1", peer_rtp.address[1], peer_rtcp.address[1])
    session.trust_ip("127.0.0.1")
    session.send_report()
    data, source = await peer_rtcp.receive()
    assert source[1] == session.local_rtcp_port
    rr, sdes = parse_compound(data)
    assert isinstance(rr, ReceiverReport) and rr.ssrc == session.ssrc
    assert sdes.chunks[0].cname == "test@moshimoshi"
    session.send(b"\xff" * 160)
    await peer_rtp.receive()
    session.send_report()
    sr = parse_compound((await peer_rtcp.receive())[0])[0]
    assert isinstance(sr, SenderReport) and sr.packet_count == 1 and sr.octet_count == 160
    port = session.local_port
    session.close("bye now")
    session.close()  # idempotent
    packets = parse_compound((await peer_rtcp.receive())[0])
    assert isinstance(packets[-1], Bye) and packets[-1].ssrcs == [session.ssrc]
    assert packets[-1].reason == "bye now"
    assert not session.send(b"\xff")
    await asyncio.sleep(0.05)
    assert ports.in_use == 0
    for p in (port, port + 1):  # the sockets are really closed
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", p))


async def test_remote_bye_is_noticed(ports) -> None:
    async with await RtpSession.open(ports, host="127.0.0.1", rtcp_interval=60) as a:
        b = await RtpSession.open(ports, host="127.0.0.1", rtcp_interval=60)
        a.update_remote("127.0.0.1", b.local_port)
        b.update_remote("127.0.0.1", a.local_port)
        b.trust_ip("127.0.0.1")
        reasons = []
        a.on_bye = reasons.append
        b.close("hangup")
        await eventually(lambda: a.stats().remote_bye)
        assert reasons == ["hangup"]


async def test_update_remote_moves_the_media(ports, peers) -> None:
    old, new = await peers(), await peers()
    async with await RtpSession.open(ports, host="127.0.0.1", rtcp_interval=60) as session:
        got = Collector()
        session.route(0, got)
        session.update_remote(*old.address)
        old.send(rtp(1), ("127.0.0.1", session.local_port))
        await eventually(lambda: len(got.packets) == 1)
        session.update_remote(*new.address)  # re-INVITE
        session.send(b"\xff" * 160)
        await new.receive()
        new.send(rtp(2), ("127.0.0.1", session.local_port))
        await eventually(lambda: len(got.packets) == 2)
        assert session.remote_address == new.address
        assert old.drain() == []


async def test_no_media_goes_to_an_unverified_address(ports, peers) -> None:
    """The reflection attack: an INVITE from 127.0.0.1 whose SDP names a third party
    (127.0.0.3) must not make us stream at it, RTP or RTCP."""
    victim_rtp, victim_rtcp, caller = await peers("127.0.0.3"), await peers("127.0.0.3"), await peers()
    async with await RtpSession.open(ports, host="0.0.0.0", rtcp_interval=60) as session:
        session.update_remote("127.0.0.3", victim_rtp.address[1], victim_rtcp.address[1])
        session.trust_ip("127.0.0.1")  # where the INVITE came from
        assert not session.verified
        stamp = session.timestamp
        for _ in range(50):
            assert not session.send(b"\xff" * 160)
        session.send_report()
        await asyncio.sleep(0.2)
        assert victim_rtp.drain() == [] and victim_rtcp.drain() == []
        assert session.stats().packets_withheld == 50 and session.stats().packets_sent == 0
        assert session.timestamp == (stamp + 50 * 160) & 0xFFFFFFFF  # the media clock ran on
        # media from the signalling source's IP latches, and media goes back there only
        caller.send(rtp(1), ("127.0.0.1", session.local_port))
        await eventually(lambda: session.verified)
        assert session.send(b"\xff" * 160)
        await caller.receive()
        assert victim_rtp.drain() == []


async def test_the_signalled_address_gets_media_at_once_when_it_is_the_signalling_source(ports, peers) -> None:
    peer = await peers()
    async with await RtpSession.open(ports, host="127.0.0.1", rtcp_interval=60) as session:
        session.trust_ip("127.0.0.1")
        session.update_remote(*peer.address)
        assert session.send(b"\xff" * 160)
        await peer.receive()


async def test_a_reinvite_to_a_third_party_moves_media_only_once_it_sends(ports, peers) -> None:
    caller, elsewhere = await peers(), await peers("127.0.0.3")
    async with await RtpSession.open(ports, host="0.0.0.0", rtcp_interval=60) as session:
        session.route(0, Collector())
        session.trust_ip("127.0.0.1")
        session.update_remote(*caller.address)
        assert session.send(b"\xff" * 160)
        await caller.receive()
        session.update_remote(*elsewhere.address)  # a re-INVITE naming another host
        assert not session.send(b"\xff" * 160)
        await asyncio.sleep(0.1)
        assert elsewhere.drain() == []
        elsewhere.send(rtp(1), ("127.0.0.1", session.local_port))  # its media proves it is the peer
        await eventually(lambda: session.verified)
        assert session.send(b"\xff" * 160)
        await elsewhere.receive()


@pytest.mark.skipif(not has_ipv6(), reason="no IPv6 loopback")
async def test_ipv6_sessions_talk(ports) -> None:
    async with (
        await RtpSession.open(ports, host="::1", rtcp_interval=0.2) as a,
        await RtpSession.open(ports, host="::1", rtcp_interval=0.2) as b,
    ):
        a.update_remote("::1", b.local_port)
        b.update_remote("0:0:0:0:0:0:0:1", a.local_port)  # any spelling of the address
        a.trust_ip("::1")
        b.trust_ip("0::1")
        got = Collector()
        b.route(0, got)
        a.route(0, Collector())
        a.send(b"\xff" * 160)
        b.send(b"\xff" * 160)
        await eventually(lambda: len(got.packets) == 1 and a.packets_received == 1)
        await eventually(lambda: a.stats().rtt_ms is not None)
        assert b.remote_address == ("::1", a.local_port)


async def test_port_allocator_never_hands_out_a_held_port() -> None:
    allocator = PortAllocator(30000, 30009, start=30000)
    assert allocator.capacity == 5
    held = [allocator.acquire() for _ in range(5)]
    assert sorted(held) == [30000, 30002, 30004, 30006, 30008]
    with pytest.raises(PortsExhausted):
        allocator.acquire()
    allocator.release(30004)
    assert allocator.acquire() == 30004
    allocator.release(30000)
    allocator.release(30002)
    assert allocator.acquire() == 30000  # round robin: the oldest free first
    with pytest.raises(ValueError):
        PortAllocator(100, 200)
    with pytest.raises(ValueError):
        PortAllocator(40000, 40000)
    with pytest.raises(ValueError):
        PortAllocator(30000, 30009, start=30003)


async def test_port_allocator_starts_its_round_at_a_random_pair() -> None:
    starts = {PortAllocator(30000, 39999).acquire() for _ in range(20)}
    assert len(starts) > 10 and all(p % 2 == 0 and 30000 <= p < 40000 for p in starts)


async def test_busy_ports_are_skipped_without_leaking(ports) -> None:
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        blocker.bind(("127.0.0.1", ports.first + 1))  # the first pair's RTCP port is taken
        async with await RtpSession.open(ports, host="127.0.0.1", rtcp_interval=60) as session:
            assert session.local_port != ports.first
            assert ports.in_use == 1
    finally:
        blocker.close()


async def test_cancelled_open_releases_its_ports(ports) -> None:
    for _ in range(20):
        task = asyncio.create_task(RtpSession.open(ports, host="127.0.0.1", rtcp_interval=60))
        await asyncio.sleep(0)
        task.cancel()
        try:
            session = await task
        except asyncio.CancelledError:
            continue
        session.close()
    assert ports.in_use == 0


async def test_remote_must_be_an_ip_address(ports) -> None:
    async with await RtpSession.open(ports, host="127.0.0.1", rtcp_interval=60) as session:
        with pytest.raises(ValueError, match="not an IP address"):
            session.update_remote("example.com", 4000)
        with pytest.raises(ValueError, match="out of range"):
            session.update_remote("127.0.0.1", 70000)


async def test_bad_addresses_at_open_are_refused_without_leaking(ports) -> None:
    with pytest.raises(ValueError, match="bind address"):
        await RtpSession.open(ports, host="localhost")
    with pytest.raises(ValueError, match="not an IP address"):
        await RtpSession.open(ports, host="127.0.0.1", remote=("peer.example", 4000))
    assert ports.in_use == 0


@pytest.mark.parametrize(
    "host, ipv4, ipv6, problem",
    [
        ("192.0.2.7", True, False, None),
        ("2001:db8::7", True, True, None),
        ("::ffff:192.0.2.7", True, False, None),
        ("2001:db8::7", True, False, "IPv6, but this RTP socket is IPv4-only"),
        ("192.0.2.7", False, True, "IPv4, but this RTP socket is IPv6-only"),
        ("localhost", True, True, "not an IP address"),
        ("x" * 500, True, True, "not an IP address"),
        ("224.0.1.9", True, True, "multicast"),
        ("ff02::1", True, True, "multicast"),
        ("255.255.255.255", True, True, "broadcast"),
        ("0.0.0.0", True, True, "unspecified"),
    ],
)
def test_media_addresses_rtp_cannot_use_are_named(host, ipv4, ipv6, problem):
    from sip.rtpsession import media_address_problem

    found = media_address_problem(host, ipv4=ipv4, ipv6=ipv6)
    assert (found is None) if problem is None else (problem in found and len(found) < 120)


async def test_a_session_knows_which_addresses_its_socket_reaches():
    v4 = await RtpSession.open(PortAllocator(41000, 41099), host="127.0.0.1")
    try:
        assert v4.remote_problem("127.0.0.1") is None and "IPv6" in v4.remote_problem("::1")
    finally:
        v4.close()
    if has_ipv6():
        dual = await RtpSession.open(PortAllocator(41100, 41199), host="::")
        try:
            assert dual.remote_problem("127.0.0.1") is None and dual.remote_problem("::1") is None
        finally:
            dual.close()


# -- SRTP ------------------------------------------------------------------------------------------


def srtp_keys(suite: str = "AES_CM_128_HMAC_SHA1_80") -> tuple[SrtpKeys, SrtpKeys]:
    """(ours, the peer's) for one call: each sends with its key and checks the other's."""
    a, b = new_crypto(1, suite).key, new_crypto(1, suite).key
    return SrtpKeys(suite, a, b), SrtpKeys(suite, b, a)


async def test_srtp_session_sends_srtp_and_drops_replayed_forged_and_plain_packets(ports, peers, delivery) -> None:
    peer, other_port = await peers(), await peers()
    ours, theirs = srtp_keys()
    far_end = SrtpContext(theirs)
    async with await RtpSession.open(ports, host="127.0.0.1", rtcp_interval=60) as session:
        session.set_srtp(ours)
        session.update_remote("127.0.0.1", 4000)  # a NAT will rewrite the port
        got = Collector()
        route(session, 0, got, delivery)
        target = ("127.0.0.1", session.local_port)
        # a forged packet from the signalled IP cannot latch (it would, as plain RTP)
        stranger = SrtpContext(srtp_keys()[1])
        other_port.send(stranger.protect(rtp(1)), target)
        await eventually(lambda: session.packets_srtp_auth_failed == 1)
        assert session.remote_address == ("127.0.0.1", 4000) and not got.packets
        first = far_end.protect(rtp(2))
        peer.send(first, target)
        await eventually(lambda: len(got.packets) == 1)
        assert session.remote_address == peer.address and got.packets[0].payload == b"\xff" * 160
        peer.send(first, target)  # replayed
        tampered = bytearray(far_end.protect(rtp(3)))
        tampered[30] ^= 0x04
        peer.send(bytes(tampered), target)  # a flipped bit
        peer.send(rtp(4), target)  # plain RTP
        peer.send(far_end.protect(rtp(5)), target)
        await eventually(lambda: len(got.packets) == 2)
        stats = session.stats()
        assert [p.sequence for p in got.packets] == [2, 5]  # the call goes on
        assert stats.srtp and stats.packets_srtp_replayed == 1 and stats.packets_srtp_auth_failed == 3
        assert stats.packets_received == 2 and stats.packets_malformed == 0
        # what goes out is SRTP: the far end's key opens it, its payload is not ours in clear
        assert session.send(b"\xd5" * 160)
        data, _ = await peer.receive()
        assert data[12:172] != b"\xd5" * 160 and len(data) == 12 + 160 + 10
        assert RtpPacket.parse(far_end.unprotect(data)).payload == b"\xd5" * 160


async def test_srtcp_both_ways_between_two_srtp_sessions_and_a_rekey(ports) -> None:
    ours, theirs = srtp_keys()
    async with (
        await RtpSession.open(ports, host="127.0.0.1", rtcp_interval=60) as a,
        await RtpSession.open(ports, host="127.0.0.1", rtcp_interval=60) as b,
    ):
        a.set_srtp(ours)
        b.set_srtp(theirs)
        a.update_remote("127.0.0.1", b.local_port)
        b.update_remote("127.0.0.1", a.local_port)
        a.trust_ip("127.0.0.1")  # each is the other's signalling peer
        b.trust_ip("127.0.0.1")
        got_a, got_b = Collector(), Collector()
        a.route(0, got_a)
        b.route(0, got_b)
        for _ in range(3):
            a.send(b"\x01" * 160)
            b.send(b"\x02" * 160)
        await eventually(lambda: len(got_a.packets) == 3 and len(got_b.packets) == 3)
        a.send_report()
        b.send_report()
        await eventually(lambda: a.rtcp_received == 1 and b.rtcp_received == 1)
        # b rekeys (a re-INVITE with a new key of its own, and a fresh one of ours in the answer)
        ours2, theirs2 = srtp_keys("AEAD_AES_128_GCM")
        b.set_srtp(theirs2)
        a.set_srtp(ours2)
        a.send(b"\x03" * 160)
        b.send(b"\x04" * 160)
        await eventually(lambda: len(got_a.packets) == 4 and len(got_b.packets) == 4)
        assert got_b.packets[-1].payload == b"\x03" * 160 and got_a.packets[-1].payload == b"\x04" * 160
        assert a.packets_srtp_auth_failed == b.packets_srtp_auth_failed == 0
        a.close()  # an SRTCP BYE
        await eventually(lambda: b.remote_bye)
