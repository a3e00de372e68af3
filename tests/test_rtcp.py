"""RTCP: SR, RR, SDES, BYE, compound packets, NTP time, round trip; fuzzed parser."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sip.rtcp import (
    PT_APP,
    SDES_CNAME,
    Bye,
    ReceiverReport,
    ReportBlock,
    RtcpParseError,
    RtcpUnknown,
    SdesChunk,
    SenderReport,
    SourceDescription,
    build_compound,
    first_report_about,
    ntp_middle,
    ntp_timestamp,
    ntp_to_unix,
    parse_compound,
    round_trip_time,
    sdes_cname,
)


def _hand_built_rr() -> bytes:
    """An RR with one report block, written out field by field from RFC 3550 §6.4.2."""
    header = bytes([0x81, 201]) + struct.pack("!H", 7)  # V=2, RC=1, PT=RR, length 7 words
    body = struct.pack("!I", 0x11111111)  # reporter SSRC
    body += struct.pack("!I", 0x22222222)  # source SSRC
    body += bytes([64]) + (-3 & 0xFFFFFF).to_bytes(3, "big")  # fraction 64/256, cumulative -3
    body += struct.pack("!IIII", 0x0001_0010, 42, 0xAABBCCDD, 65536)
    return header + body


def test_parse_hand_built_receiver_report() -> None:
    (rr,) = parse_compound(_hand_built_rr())
    assert rr == ReceiverReport(0x11111111, [ReportBlock(0x22222222, 64, -3, 0x00010010, 42, 0xAABBCCDD, 65536)])
    assert build_compound([rr]) == _hand_built_rr()


def test_compound_sr_sdes_bye_round_trip() -> None:
    packets = [
        SenderReport(
            0xCAFE,
            ntp_timestamp(1_700_000_000.25),
            123456,
            500,
            80000,
            [ReportBlock(0xBEEF, 12, 34, 70000, 56, 0x12345678, 0x9ABC)],
        ),
        sdes_cname(0xCAFE, "moshimoshi@example"),
        Bye([0xCAFE, 0xF00D], "call ended"),
    ]
    data = build_compound(packets)
    assert len(data) % 4 == 0
    parsed = parse_compound(data)
    assert parsed == packets
    assert parsed[1].chunks[0].cname == "moshimoshi@example"


def test_sdes_with_several_chunks_and_items() -> None:
    packet = SourceDescription(
        [
            SdesChunk(1, [(SDES_CNAME, b"a"), (2, b"Name"), (6, b"tool 1.0")]),
            SdesChunk(2, [(SDES_CNAME, b"exactly8")]),
            SdesChunk(3, []),
        ]
    )
    (parsed,) = parse_compound(build_compound([packet]))
    assert parsed == packet
    assert parsed.chunks[2].cname is None


def test_unknown_packet_types_are_kept() -> None:
    app = RtcpUnknown(PT_APP, 3, b"name" + b"data")
    packets = [ReceiverReport(5), app]
    assert parse_compound(build_compound(packets)) == packets


def test_bye_without_reason_and_empty_rr() -> None:
    packets = [ReceiverReport(9), Bye([9])]
    data = build_compound(packets)
    assert len(data) == 8 + 8
    assert parse_compound(data) == packets


def test_padding_on_last_packet_is_accepted() -> None:
    rr = build_compound([ReceiverReport(7)])
    padded = bytes([rr[0] | 0x20, rr[1]]) + struct.pack("!H", 2) + rr[4:] + b"\x00\x00\x00\x04"
    assert parse_compound(padded) == [ReceiverReport(7)]


@pytest.mark.parametrize(
    ("data", "fault"),
    [
        (b"\x80\xc9\x00", "too short"),
        (b"\x40\xc9\x00\x01" + bytes(4), "bad RTCP version 1"),
        (b"\x80\xc9\x00\x05" + bytes(4), "claims 24 bytes"),
        (b"\x81\xc9\x00\x01" + bytes(4), "RR with 1 report blocks"),
        (b"\x80\xc8\x00\x01" + bytes(4), "sender info needs 24"),
        (b"\x80\xc9\x00\x00", "needs at least an SSRC"),
        (b"\xa0\xc9\x00\x01" + bytes(4) + b"\x80\xc9\x00\x01" + bytes(4), "not the last one"),
        (b"\xa0\xc9\x00\x01" + bytes(3) + b"\x09", "padding count 9"),
        (b"\x81\xca\x00\x01" + b"\x00\x00\x00\x01", "not terminated"),
        (b"\x81\xca\x00\x02" + b"\x00\x00\x00\x01" + b"\x01\x09ab", "beyond the packet"),
        (b"\x82\xca\x00\x02" + b"\x00\x00\x00\x01" + bytes(4), "chunk 2 of 2 missing"),
        (b"\x82\xcb\x00\x01" + bytes(4), "BYE with 2 sources"),
        (b"\x81\xcb\x00\x02" + bytes(4) + b"\x09abc", "reason claims 9"),
        (_hand_built_rr() + b"\x80", "trailing bytes"),
    ],
)
def test_parse_errors_name_the_fault(data: bytes, fault: str) -> None:
    with pytest.raises(RtcpParseError, match=fault):
        parse_compound(data)


def test_build_rejects_what_cannot_be_encoded() -> None:
    with pytest.raises(ValueError):
        build_compound([ReceiverReport(1, [ReportBlock(2, fraction_lost=256)])])
    with pytest.raises(ValueError):
        build_compound([ReceiverReport(1, [ReportBlock(2, cumulative_lost=1 << 23)])])
    with pytest.raises(ValueError):
        build_compound([ReceiverReport(1, [ReportBlock(i) for i in range(32)])])
    with pytest.raises(ValueError):
        build_compound([Bye([1], "x" * 300)])
    with pytest.raises(TypeError):
        build_compound(["not a packet"])  # type: ignore[list-item]


def test_ntp_time_conversions() -> None:
    assert ntp_timestamp(0.0) == 2208988800 << 32
    assert ntp_timestamp(0.5) & 0xFFFFFFFF == 1 << 31
    assert abs(ntp_to_unix(ntp_timestamp(1_700_000_000.123456)) - 1_700_000_000.123456) < 1e-6
    assert ntp_middle(0x1122334455667788) == 0x33445566


def test_round_trip_time_from_rfc_figure_2() -> None:
    # RFC 3550 Figure 2: SR sent at n (LSR = 0xb705:2000), RR arrives at A = 0xb710:8000 with
    # DLSR 0x0005:4000 (5.250 s), so RTT = 0x0006:2000 = 6.125 s
    assert round_trip_time(0xB7108000, 0xB7052000, 0x00054000) == pytest.approx(6.125)
    assert round_trip_time(0xB7108000, 0, 0) is None  # no SR received by the peer yet
    assert round_trip_time(0x00000010, 0xFFFFFFF0, 0x10) == pytest.approx(0x10 / 65536)  # wraps
    assert round_trip_time(0x1000, 0x1000, 1) == 0.0  # a tick of rounding below zero
    assert round_trip_time(0x1000, 0x1000_0000, 0) is None  # LSR in our future: nonsense


def test_first_report_about_finds_our_block() -> None:
    ours = ReportBlock(42, fraction_lost=10)
    packets = [SenderReport(1, 0, 0, 0, 0, [ReportBlock(7)]), ReceiverReport(2, [ours]), sdes_cname(2, "x")]
    assert first_report_about(packets, 42) is ours
    assert first_report_about(packets, 43) is None


@given(st.binary(max_size=300))
def test_parser_raises_only_its_own_error(data: bytes) -> None:
    try:
        parse_compound(data)
    except RtcpParseError:
        pass


report_blocks = st.builds(
    ReportBlock,
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 255),
    st.integers(-0x800000, 0x7FFFFF),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 0xFFFFFFFF),
)
words = st.binary(max_size=12).map(lambda b: b[: len(b) // 4 * 4])
rtcp_packets = st.one_of(
    st.builds(
        SenderReport,
        st.integers(0, 0xFFFFFFFF),
        st.integers(0, (1 << 64) - 1),
        st.integers(0, 0xFFFFFFFF),
        st.integers(0, 0xFFFFFFFF),
        st.integers(0, 0xFFFFFFFF),
        st.lists(report_blocks, max_size=3),
        words,
    ),
    st.builds(ReceiverReport, st.integers(0, 0xFFFFFFFF), st.lists(report_blocks, max_size=3), words),
    st.builds(
        SourceDescription,
        st.lists(
            st.builds(
                SdesChunk,
                st.integers(0, 0xFFFFFFFF),
                st.lists(st.tuples(st.integers(1, 255), st.binary(max_size=20)), max_size=3),
            ),
            max_size=3,
        ),
    ),
    st.builds(
        Bye,
        st.lists(st.integers(0, 0xFFFFFFFF), max_size=4),
        st.none() | st.text(max_size=20).filter(lambda t: len(t.encode()) <= 255),
    ),
    st.builds(RtcpUnknown, st.integers(204, 210), st.integers(0, 31), words),
)


@given(st.lists(rtcp_packets, min_size=1, max_size=4))
def test_any_compound_round_trips(packets) -> None:
    assert parse_compound(build_compound(packets)) == packets


@given(st.lists(rtcp_packets, min_size=1, max_size=3), st.data())
def test_corrupted_compound_raises_only_its_own_error(packets, data) -> None:
    raw = bytearray(build_compound(packets))
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        parse_compound(bytes(raw[:cut]))
    except RtcpParseError:
        pass
