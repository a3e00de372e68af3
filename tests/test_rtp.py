"""RTP packets: round trips, every parse error, real captures, and a fuzz property."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sip.rtp import (
    RtpExtension,
    RtpPacket,
    RtpParseError,
    build_rtp,
    is_rtcp,
    sequence_delta,
    timestamp_delta,
)
from tests.support.pcap import read_udp

CAPTURES = Path("/usr/share/sip-tester")


def test_minimal_packet_round_trip() -> None:
    packet = RtpPacket(payload_type=0, sequence=1234, timestamp=567890, ssrc=0xDEADBEEF, payload=b"\xff" * 160)
    data = packet.build()
    assert len(data) == 12 + 160
    assert data[:2] == b"\x80\x00"
    assert RtpPacket.parse(data) == packet
    assert bytes(packet) == data


def test_round_trip_with_csrc_extension_padding_and_marker() -> None:
    packet = RtpPacket(
        payload_type=101,
        sequence=65535,
        timestamp=0xFFFFFFFF,
        ssrc=1,
        payload=b"\x01\x0a\x00\xa0",
        marker=True,
        csrc=(11, 22, 33),
        extension=RtpExtension(0xBEDE, b"\x10\xaa\x00\x00"),
        padding=4,
    )
    data = packet.build()
    first, second = data[0], data[1]
    assert first >> 6 == 2 and first & 0x20 and first & 0x10 and first & 0x0F == 3
    assert second == 0x80 | 101
    assert len(data) == 12 + 3 * 4 + 4 + 4 + 4 + 4
    assert data[-1] == 4
    assert RtpPacket.parse(data) == packet


def test_fast_builder_matches_dataclass_builder() -> None:
    packet = RtpPacket(8, 7, 160, 99, b"\xd5" * 160, marker=True)
    assert build_rtp(8, 7, 160, 99, b"\xd5" * 160, marker=True) == packet.build()
    with pytest.raises(ValueError):
        build_rtp(128, 0, 0, 0, b"")


def test_parse_accepts_memoryview_and_bytearray() -> None:
    data = RtpPacket(0, 1, 2, 3, b"abc").build()
    assert RtpPacket.parse(bytearray(data)).payload == b"abc"
    assert RtpPacket.parse(memoryview(data)).payload == b"abc"


@pytest.mark.parametrize(
    ("data", "fault"),
    [
        (b"\x80\x00\x00", "too short"),
        (b"\x40" + bytes(11), "bad RTP version 1"),
        (b"\x00" + bytes(11), "bad RTP version 0"),
        (b"\x83" + bytes(11) + bytes(8), "CSRC count 3"),
        (b"\x90" + bytes(11) + b"\x00\x01", "header extension starts"),
        (b"\x90" + bytes(11) + b"\x00\x01\x00\x02" + bytes(4), "header extension of 2 words"),
        (b"\xa0" + bytes(11) + b"\x00", "padding count is 0"),
        (b"\xa0" + bytes(11) + b"ab\x05", "padding of 5 bytes is longer"),
    ],
)
def test_parse_errors_name_the_fault(data: bytes, fault: str) -> None:
    with pytest.raises(RtpParseError, match=fault):
        RtpPacket.parse(data)


def test_padding_exactly_the_rest_is_an_empty_payload() -> None:
    packet = RtpPacket.parse(b"\xa0" + bytes(11) + b"\x00\x00\x03")
    assert packet.payload == b"" and packet.padding == 3


def test_build_rejects_out_of_range_fields() -> None:
    with pytest.raises(ValueError):
        RtpPacket(128, 0, 0, 0).build()
    with pytest.raises(ValueError):
        RtpPacket(0, 0, 0, 0, csrc=tuple(range(16))).build()
    with pytest.raises(struct.error):
        RtpPacket(0, 65536, 0, 0).build()
    with pytest.raises(ValueError):
        RtpExtension(1, b"abc")


def test_sequence_and_timestamp_arithmetic_wraps() -> None:
    assert sequence_delta(0, 65535) == 1
    assert sequence_delta(65535, 0) == -1
    assert sequence_delta(100, 50) == 50
    assert timestamp_delta(80, 0xFFFFFFF0) == 96
    assert timestamp_delta(0xFFFFFFF0, 80) == -96


def test_is_rtcp_tells_muxed_rtcp_from_rtp() -> None:
    assert is_rtcp(b"\x80\xc8\x00\x06")  # SR
    assert is_rtcp(b"\x81\xc9\x00\x07")  # RR
    assert not is_rtcp(RtpPacket(0, 1, 2, 3).build())
    assert not is_rtcp(RtpPacket(101, 1, 2, 3, marker=True).build())


def test_real_g711a_capture_parses() -> None:
    datagrams = read_udp(CAPTURES / "g711a.pcap")
    packets = [RtpPacket.parse(d.payload) for d in datagrams]
    assert len(packets) > 200
    assert {p.payload_type for p in packets} == {8}
    assert len({p.ssrc for p in packets}) == 1
    assert packets[0].marker
    # consecutive sequence numbers, 30 ms (240 samples) per packet
    for earlier, later in zip(packets, packets[1:], strict=False):
        assert sequence_delta(later.sequence, earlier.sequence) == 1
        assert timestamp_delta(later.timestamp, earlier.timestamp) == 240
        assert len(later.payload) == 240
    # re-building reproduces the captured bytes exactly
    assert all(p.build() == d.payload for p, d in zip(packets, datagrams, strict=True))


@pytest.mark.parametrize("name", sorted(p.name for p in CAPTURES.glob("dtmf_2833_*.pcap")))
def test_real_dtmf_captures_parse(name: str) -> None:
    packets = [RtpPacket.parse(d.payload) for d in read_udp(CAPTURES / name)]
    assert packets and all(p.payload_type == 101 and len(p.payload) == 4 for p in packets)
    assert packets[0].marker and not any(p.marker for p in packets[1:])


@given(st.binary(max_size=200))
def test_parser_raises_only_its_own_error(data: bytes) -> None:
    try:
        packet = RtpPacket.parse(data)
    except RtpParseError:
        return
    # whatever parses builds back to the same bytes (padding contents aside)
    rebuilt = packet.build()
    if not packet.padding:
        assert rebuilt == data
    else:
        assert rebuilt[: -packet.padding] == data[: -packet.padding]


@given(
    payload_type=st.integers(0, 127),
    sequence=st.integers(0, 0xFFFF),
    timestamp=st.integers(0, 0xFFFFFFFF),
    ssrc=st.integers(0, 0xFFFFFFFF),
    payload=st.binary(max_size=64),
    marker=st.booleans(),
    csrc=st.lists(st.integers(0, 0xFFFFFFFF), max_size=15).map(tuple),
    extension=st.none()
    | st.builds(RtpExtension, st.integers(0, 0xFFFF), st.binary(max_size=16).map(lambda b: b[: len(b) // 4 * 4])),
    padding=st.integers(0, 255),
)
def test_any_packet_round_trips(
    payload_type, sequence, timestamp, ssrc, payload, marker, csrc, extension, padding
) -> None:
    packet = RtpPacket(payload_type, sequence, timestamp, ssrc, payload, marker, csrc, extension, padding)
    assert RtpPacket.parse(packet.build()) == packet
