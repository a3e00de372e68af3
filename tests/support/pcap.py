"""A tiny reader for classic pcap files: the UDP datagrams in a capture, for tests.

Handles both byte orders and the nanosecond variant of the pcap header; link types
Ethernet (with 802.1Q tags), Linux cooked capture (SLL), BSD loopback and raw IP; IPv4
(unfragmented) and IPv6 (no extension headers) carrying UDP. Anything else is skipped.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LINUX_SLL = 113

_MAGICS = {
    b"\xd4\xc3\xb2\xa1": ("<", 1e-6),
    b"\xa1\xb2\xc3\xd4": (">", 1e-6),
    b"\x4d\x3c\xb2\xa1": ("<", 1e-9),
    b"\xa1\xb2\x3c\x4d": (">", 1e-9),
}


@dataclass(frozen=True)
class UdpDatagram:
    time: float
    source: tuple[str, int]
    destination: tuple[str, int]
    payload: bytes


def _ip_text(raw: bytes) -> str:
    if len(raw) == 4:
        return ".".join(str(b) for b in raw)
    import ipaddress

    return str(ipaddress.IPv6Address(raw))


def _udp_from_ip(packet: bytes) -> tuple[str, str, bytes] | None:
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4:
        header_length = (packet[0] & 0x0F) * 4
        total_length, flags_fragment, protocol = struct.unpack_from("!H2xHxB", packet, 2)
        if protocol != 17 or flags_fragment & 0x3FFF:
            return None
        return _ip_text(packet[12:16]), _ip_text(packet[16:20]), packet[header_length:total_length]
    if version == 6:
        payload_length, next_header = struct.unpack_from("!HB", packet, 4)
        if next_header != 17:
            return None
        return _ip_text(packet[8:24]), _ip_text(packet[24:40]), packet[40 : 40 + payload_length]
    return None


def _ip_from_link(link_type: int, frame: bytes) -> bytes | None:
    if link_type == LINKTYPE_ETHERNET:
        offset = 12
        ethertype = struct.unpack_from("!H", frame, offset)[0]
        while ethertype == 0x8100:  # 802.1Q VLAN tag
            offset += 4
            ethertype = struct.unpack_from("!H", frame, offset)[0]
        return frame[offset + 2 :] if ethertype in (0x0800, 0x86DD) else None
    if link_type == LINKTYPE_LINUX_SLL:
        return frame[16:] if struct.unpack_from("!H", frame, 14)[0] in (0x0800, 0x86DD) else None
    if link_type == LINKTYPE_NULL:
        return frame[4:]
    if link_type == LINKTYPE_RAW:
        return frame
    return None


def read_udp(path: str | Path) -> list[UdpDatagram]:
    """Every UDP datagram in the capture, in file order."""
    data = Path(path).read_bytes()
    if len(data) < 24 or data[:4] not in _MAGICS:
        raise ValueError(f"{path}: not a classic pcap file")
    order, resolution = _MAGICS[data[:4]]
    link_type = struct.unpack_from(order + "I", data, 20)[0]
    record = struct.Struct(order + "IIII")
    datagrams = []
    offset = 24
    while offset + record.size <= len(data):
        seconds, fraction, captured, _original = record.unpack_from(data, offset)
        offset += record.size
        frame = data[offset : offset + captured]
        offset += captured
        ip = _ip_from_link(link_type, frame)
        udp = _udp_from_ip(ip) if ip is not None else None
        if udp is None:
            continue
        source_ip, destination_ip, segment = udp
        if len(segment) < 8:
            continue
        source_port, destination_port, length = struct.unpack_from("!HHH", segment)
        datagrams.append(
            UdpDatagram(
                seconds + fraction * resolution,
                (source_ip, source_port),
                (destination_ip, destination_port),
                segment[8:length],
            )
        )
    return datagrams
