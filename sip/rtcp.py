"""RTCP packets (RFC 3550 §6.4–6.6): SR, RR, SDES, BYE and compound packets; NTP time.

:func:`parse_compound` turns a datagram into a list of packets; any other RTCP packet type
(APP, feedback, XR) comes back as :class:`RtcpUnknown` so that nothing valid is refused.
Malformed input raises :class:`RtcpParseError` naming the fault.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

RTCP_VERSION = 2
PT_SR = 200
PT_RR = 201
PT_SDES = 202
PT_BYE = 203
PT_APP = 204

SDES_END = 0
SDES_CNAME = 1

NTP_EPOCH_OFFSET = 2208988800  # seconds from 1900-01-01 (NTP era 0) to 1970-01-01

_HEADER = struct.Struct("!BBH")
_SENDER_INFO = struct.Struct("!IQIII")
_REPORT_BLOCK = struct.Struct("!IIIIII")
_SSRC = struct.Struct("!I")


class RtcpParseError(ValueError):
    """The bytes are not a well-formed RTCP (compound) packet; the message names the fault."""


@dataclass(slots=True)
class ReportBlock:
    """A reception report about one source (RFC 3550 §6.4.1).

    ``cumulative_lost`` is signed (24 bits on the wire); ``lsr`` and ``dlsr`` are in NTP
    short format (1/65536 s).
    """

    ssrc: int
    fraction_lost: int = 0
    cumulative_lost: int = 0
    highest_sequence: int = 0
    jitter: int = 0
    lsr: int = 0
    dlsr: int = 0

    def _pack(self) -> bytes:
        if not 0 <= self.fraction_lost <= 255:
            raise ValueError(f"fraction_lost {self.fraction_lost} is not an 8-bit value")
        if not -0x800000 <= self.cumulative_lost <= 0x7FFFFF:
            raise ValueError(f"cumulative_lost {self.cumulative_lost} does not fit 24 signed bits")
        lost_word = (self.fraction_lost << 24) | (self.cumulative_lost & 0xFFFFFF)
        return _REPORT_BLOCK.pack(self.ssrc, lost_word, self.highest_sequence, self.jitter, self.lsr, self.dlsr)

    @classmethod
    def _unpack(cls, data: bytes, offset: int) -> ReportBlock:
        ssrc, lost_word, highest, jitter, lsr, dlsr = _REPORT_BLOCK.unpack_from(data, offset)
        cumulative = lost_word & 0xFFFFFF
        if cumulative & 0x800000:
            cumulative -= 0x1000000
        return cls(ssrc, lost_word >> 24, cumulative, highest, jitter, lsr, dlsr)


@dataclass(slots=True)
class SenderReport:
    """SR: sender info plus reception reports. ``ntp_timestamp`` is the full 64-bit NTP time."""

    ssrc: int
    ntp_timestamp: int
    rtp_timestamp: int
    packet_count: int
    octet_count: int
    reports: list[ReportBlock] = field(default_factory=list)
    extension: bytes = b""


@dataclass(slots=True)
class ReceiverReport:
    """RR: reception reports from a participant that has not sent media."""

    ssrc: int
    reports: list[ReportBlock] = field(default_factory=list)
    extension: bytes = b""


@dataclass(slots=True)
class SdesChunk:
    """The SDES items of one source: (item type, value) pairs."""

    ssrc: int
    items: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def cname(self) -> str | None:
        for item_type, value in self.items:
            if item_type == SDES_CNAME:
                return value.decode("utf-8", "replace")
        return None


@dataclass(slots=True)
class SourceDescription:
    """SDES: one chunk per source."""

    chunks: list[SdesChunk] = field(default_factory=list)


@dataclass(slots=True)
class Bye:
    """BYE: the sources leaving, with an optional reason."""

    ssrcs: list[int] = field(default_factory=list)
    reason: str | None = None


@dataclass(slots=True)
class RtcpUnknown:
    """Any other RTCP packet (APP, RTPFB, PSFB, XR...), kept as its body after the header."""

    packet_type: int
    count: int
    body: bytes = b""


RtcpPacket = SenderReport | ReceiverReport | SourceDescription | Bye | RtcpUnknown


# ---------------------------------------------------------------------------------------------
# parsing


def parse_compound(data: bytes) -> list[RtcpPacket]:
    """Parse a (compound) RTCP datagram into its packets.

    Checks per RFC 3550 Appendix A.2: version 2 everywhere, every length inside the
    datagram, padding only on the last packet. The first packet need not be SR/RR (reduced
    size RTCP, RFC 5506, is tolerated).
    """
    size = len(data)
    if size < 4:
        raise RtcpParseError(f"packet too short: {size} bytes, an RTCP header needs 4")
    packets: list[RtcpPacket] = []
    offset = 0
    while offset < size:
        if size - offset < 4:
            raise RtcpParseError(f"{size - offset} trailing bytes at offset {offset}, too short for an RTCP header")
        first, packet_type, words = _HEADER.unpack_from(data, offset)
        version = first >> 6
        if version != RTCP_VERSION:
            raise RtcpParseError(f"bad RTCP version {version} at offset {offset}, expected {RTCP_VERSION}")
        length = (words + 1) * 4
        end = offset + length
        if end > size:
            raise RtcpParseError(
                f"packet type {packet_type} at offset {offset} claims {length} bytes, only {size - offset} left"
            )
        body_end = end
        if first & 0x20:
            if end != size:
                raise RtcpParseError(f"padding bit set on packet type {packet_type} that is not the last one")
            padding = data[end - 1]
            if padding == 0 or padding > length - 4:
                raise RtcpParseError(f"padding count {padding} invalid for a {length}-byte packet")
            body_end = end - padding
        packets.append(_parse_one(data, offset + 4, body_end, first & 0x1F, packet_type))
        offset = end
    return packets


def _parse_one(data: bytes, start: int, end: int, count: int, packet_type: int) -> RtcpPacket:
    if packet_type == PT_SR:
        return _parse_sr(data, start, end, count)
    if packet_type == PT_RR:
        return _parse_rr(data, start, end, count)
    if packet_type == PT_SDES:
        return _parse_sdes(data, start, end, count)
    if packet_type == PT_BYE:
        return _parse_bye(data, start, end, count)
    return RtcpUnknown(packet_type, count, bytes(data[start:end]))


def _parse_reports(data: bytes, offset: int, end: int, count: int, what: str) -> list[ReportBlock]:
    needed = offset + 24 * count
    if needed > end:
        raise RtcpParseError(f"{what} with {count} report blocks needs {needed - offset} bytes, has {end - offset}")
    return [ReportBlock._unpack(data, offset + 24 * i) for i in range(count)]


def _parse_sr(data: bytes, start: int, end: int, count: int) -> SenderReport:
    if end - start < 24:
        raise RtcpParseError(f"SR body is {end - start} bytes, sender info needs 24")
    ssrc, ntp, rtp_ts, packets, octets = _SENDER_INFO.unpack_from(data, start)
    reports = _parse_reports(data, start + 24, end, count, "SR")
    return SenderReport(ssrc, ntp, rtp_ts, packets, octets, reports, bytes(data[start + 24 + 24 * count : end]))


def _parse_rr(data: bytes, start: int, end: int, count: int) -> ReceiverReport:
    if end - start < 4:
        raise RtcpParseError(f"RR body is {end - start} bytes, needs at least an SSRC")
    (ssrc,) = _SSRC.unpack_from(data, start)
    reports = _parse_reports(data, start + 4, end, count, "RR")
    return ReceiverReport(ssrc, reports, bytes(data[start + 4 + 24 * count : end]))


def _parse_sdes(data: bytes, start: int, end: int, count: int) -> SourceDescription:
    chunks: list[SdesChunk] = []
    offset = start
    for _ in range(count):
        if offset + 4 > end:
            raise RtcpParseError(f"SDES chunk {len(chunks) + 1} of {count} missing")
        (ssrc,) = _SSRC.unpack_from(data, offset)
        offset += 4
        items: list[tuple[int, bytes]] = []
        while True:
            if offset >= end:
                raise RtcpParseError("SDES chunk not terminated by a null item")
            item_type = data[offset]
            if item_type == SDES_END:
                # the null octet(s) pad the chunk to the next 32-bit boundary
                offset = start + ((offset - start) // 4 + 1) * 4
                break
            if offset + 2 > end:
                raise RtcpParseError("SDES item header truncated")
            length = data[offset + 1]
            if offset + 2 + length > end:
                raise RtcpParseError(f"SDES item of type {item_type} claims {length} bytes beyond the packet")
            items.append((item_type, bytes(data[offset + 2 : offset + 2 + length])))
            offset += 2 + length
        if offset > end:
            raise RtcpParseError("SDES chunk padding runs beyond the packet")
        chunks.append(SdesChunk(ssrc, items))
    return SourceDescription(chunks)


def _parse_bye(data: bytes, start: int, end: int, count: int) -> Bye:
    needed = start + 4 * count
    if needed > end:
        raise RtcpParseError(f"BYE with {count} sources needs {4 * count} bytes, has {end - start}")
    ssrcs = list(struct.unpack_from(f"!{count}I", data, start))
    reason = None
    if needed < end:
        length = data[needed]
        if needed + 1 + length > end:
            raise RtcpParseError(f"BYE reason claims {length} bytes beyond the packet")
        reason = bytes(data[needed + 1 : needed + 1 + length]).decode("utf-8", "replace")
    return Bye(ssrcs, reason)


# ---------------------------------------------------------------------------------------------
# building


def _with_header(count: int, packet_type: int, body: bytes) -> bytes:
    if len(body) % 4:
        raise ValueError(f"RTCP packet body of {len(body)} bytes is not a whole number of 32-bit words")
    if not 0 <= count <= 31:
        raise ValueError(f"RTCP count {count} does not fit 5 bits")
    return _HEADER.pack(0x80 | count, packet_type, len(body) // 4) + body


def build_packet(packet: RtcpPacket) -> bytes:
    """One RTCP packet's wire bytes."""
    if isinstance(packet, SenderReport):
        body = _SENDER_INFO.pack(
            packet.ssrc, packet.ntp_timestamp, packet.rtp_timestamp, packet.packet_count, packet.octet_count
        )
        body += b"".join(block._pack() for block in packet.reports) + packet.extension
        return _with_header(len(packet.reports), PT_SR, body)
    if isinstance(packet, ReceiverReport):
        body = _SSRC.pack(packet.ssrc) + b"".join(block._pack() for block in packet.reports) + packet.extension
        return _with_header(len(packet.reports), PT_RR, body)
    if isinstance(packet, SourceDescription):
        parts = []
        for chunk in packet.chunks:
            chunk_bytes = bytearray(_SSRC.pack(chunk.ssrc))
            for item_type, value in chunk.items:
                if not 1 <= item_type <= 255 or len(value) > 255:
                    raise ValueError(f"SDES item type {item_type} with {len(value)} bytes cannot be encoded")
                chunk_bytes += bytes((item_type, len(value))) + value
            chunk_bytes += bytes(4 - len(chunk_bytes) % 4)  # null terminator plus padding
            parts.append(bytes(chunk_bytes))
        return _with_header(len(packet.chunks), PT_SDES, b"".join(parts))
    if isinstance(packet, Bye):
        body = b"".join(_SSRC.pack(ssrc) for ssrc in packet.ssrcs)
        if packet.reason is not None:
            reason = packet.reason.encode("utf-8")
            if len(reason) > 255:
                raise ValueError("BYE reason longer than 255 bytes")
            body += bytes((len(reason),)) + reason
            body += bytes(-len(body) % 4)
        return _with_header(len(packet.ssrcs), PT_BYE, body)
    if isinstance(packet, RtcpUnknown):
        return _with_header(packet.count, packet.packet_type, packet.body)
    raise TypeError(f"not an RTCP packet: {packet!r}")


def build_compound(packets: Iterable[RtcpPacket]) -> bytes:
    """A compound RTCP datagram; RFC 3550 wants it to start with an SR or RR."""
    return b"".join(build_packet(packet) for packet in packets)


def sdes_cname(ssrc: int, cname: str) -> SourceDescription:
    """An SDES packet carrying just our CNAME."""
    return SourceDescription([SdesChunk(ssrc, [(SDES_CNAME, cname.encode("utf-8")[:255])])])


# ---------------------------------------------------------------------------------------------
# NTP time and round trip


def ntp_timestamp(unix_time: float) -> int:
    """64-bit NTP timestamp (32.32 fixed point since 1900) for a Unix time."""
    return int(round((unix_time + NTP_EPOCH_OFFSET) * (1 << 32))) & 0xFFFFFFFFFFFFFFFF


def ntp_to_unix(ntp: int) -> float:
    return ntp / (1 << 32) - NTP_EPOCH_OFFSET


def ntp_middle(ntp: int) -> int:
    """The middle 32 bits of a 64-bit NTP timestamp: the LSR format (1/65536 s)."""
    return (ntp >> 16) & 0xFFFFFFFF


def round_trip_time(arrival_middle: int, lsr: int, dlsr: int) -> float | None:
    """Round-trip time in seconds from a report block (RFC 3550 §6.4.1, Figure 2).

    ``arrival_middle`` is the middle 32 bits of our NTP clock when the report arrived. None
    when the peer has not received an SR from us yet (LSR 0) or the result is implausible.
    """
    if lsr == 0:
        return None
    raw = (arrival_middle - lsr - dlsr) & 0xFFFFFFFF
    if raw >= 0x80000000:
        # "negative": clocks rounded across each other by a tick, or a bogus report
        return 0.0 if raw > 0xFFFFFFFF - 0x10 else None
    return raw / 65536.0


def first_report_about(packets: Sequence[RtcpPacket], ssrc: int) -> ReportBlock | None:
    """The first report block in ``packets`` that describes source ``ssrc``."""
    for packet in packets:
        if isinstance(packet, SenderReport | ReceiverReport):
            for block in packet.reports:
                if block.ssrc == ssrc:
                    return block
    return None
