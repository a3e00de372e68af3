"""RTP packets (RFC 3550 §5.1, profile RFC 3551): parse and build.

The media path parses every packet of every call (50 a second per call at 20 ms ptime), so
parsing is one ``struct`` unpack plus slicing, and :class:`RtpPacket` is a slotted dataclass.
Anything that is not a well-formed RTP packet raises :class:`RtpParseError` naming the fault.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

RTP_VERSION = 2
RTP_HEADER_SIZE = 12

_HEADER = struct.Struct("!BBHII")
_EXTENSION_HEADER = struct.Struct("!HH")


class RtpParseError(ValueError):
    """The bytes are not a well-formed RTP packet; the message names the fault."""


@dataclass(slots=True, frozen=True)
class RtpExtension:
    """An RTP header extension (RFC 3550 §5.3.1): 16-bit profile and a body of 32-bit words."""

    profile: int
    data: bytes = b""

    def __post_init__(self) -> None:
        if not 0 <= self.profile <= 0xFFFF:
            raise ValueError(f"extension profile {self.profile} is not a 16-bit value")
        if len(self.data) % 4:
            raise ValueError(f"extension data is {len(self.data)} bytes, not a whole number of 32-bit words")
        if len(self.data) > 4 * 0xFFFF:
            raise ValueError("extension data longer than 65535 words")


@dataclass(slots=True)
class RtpPacket:
    """One RTP packet. ``padding`` is the number of padding octets (including the count octet)."""

    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    payload: bytes = b""
    marker: bool = False
    csrc: tuple[int, ...] = ()
    extension: RtpExtension | None = None
    padding: int = 0

    @classmethod
    def parse(cls, data: bytes) -> RtpPacket:
        """Parse one RTP packet; raise :class:`RtpParseError` if it is malformed."""
        size = len(data)
        if size < RTP_HEADER_SIZE:
            raise RtpParseError(f"packet too short: {size} bytes, an RTP header needs {RTP_HEADER_SIZE}")
        first, second, sequence, timestamp, ssrc = _HEADER.unpack_from(data)
        if first == 0x80:  # the common packet: version 2, no padding, extension or CSRC
            return cls(second & 0x7F, sequence, timestamp, ssrc, bytes(data[RTP_HEADER_SIZE:]), second > 0x7F)
        version = first >> 6
        if version != RTP_VERSION:
            raise RtpParseError(f"bad RTP version {version}, expected {RTP_VERSION}")
        position = RTP_HEADER_SIZE
        csrc: tuple[int, ...] = ()
        csrc_count = first & 0x0F
        if csrc_count:
            position += 4 * csrc_count
            if position > size:
                raise RtpParseError(f"CSRC count {csrc_count} needs {position} bytes, packet has {size}")
            csrc = struct.unpack_from(f"!{csrc_count}I", data, RTP_HEADER_SIZE)
        extension = None
        if first & 0x10:
            if position + 4 > size:
                raise RtpParseError(f"header extension starts at byte {position}, beyond the {size}-byte packet")
            profile, words = _EXTENSION_HEADER.unpack_from(data, position)
            start = position + 4
            position = start + 4 * words
            if position > size:
                raise RtpParseError(f"header extension of {words} words ends at byte {position}, packet has {size}")
            extension = RtpExtension(profile, bytes(data[start:position]))
        end = size
        padding = 0
        if first & 0x20:
            padding = data[-1]
            if padding == 0:
                raise RtpParseError("padding bit set but padding count is 0")
            if padding > size - position:
                raise RtpParseError(
                    f"padding of {padding} bytes is longer than the {size - position} bytes after the header"
                )
            end = size - padding
        return cls(
            second & 0x7F,
            sequence,
            timestamp,
            ssrc,
            bytes(data[position:end]),
            bool(second & 0x80),
            csrc,
            extension,
            padding,
        )

    def build(self) -> bytes:
        """The packet's wire bytes; raise ``ValueError`` if a field is out of range."""
        if not 0 <= self.payload_type <= 127:
            raise ValueError(f"payload type {self.payload_type} is not a 7-bit value")
        if len(self.csrc) > 15:
            raise ValueError(f"{len(self.csrc)} CSRCs, at most 15 fit")
        if not 0 <= self.padding <= 255:
            raise ValueError(f"padding {self.padding} does not fit one octet")
        first = 0x80 | len(self.csrc)
        if self.padding:
            first |= 0x20
        if self.extension is not None:
            first |= 0x10
        parts = [
            _HEADER.pack(
                first, (0x80 if self.marker else 0) | self.payload_type, self.sequence, self.timestamp, self.ssrc
            )
        ]
        if self.csrc:
            parts.append(struct.pack(f"!{len(self.csrc)}I", *self.csrc))
        if self.extension is not None:
            parts.append(_EXTENSION_HEADER.pack(self.extension.profile, len(self.extension.data) // 4))
            parts.append(self.extension.data)
        parts.append(self.payload)
        if self.padding:
            parts.append(bytes(self.padding - 1) + bytes((self.padding,)))
        return b"".join(parts)

    __bytes__ = build


def build_rtp(
    payload_type: int, sequence: int, timestamp: int, ssrc: int, payload: bytes, marker: bool = False
) -> bytes:
    """Fast path for the common packet: no CSRC, no extension, no padding.

    Out-of-range fields raise ``struct.error`` (sequence, timestamp, ssrc) or ``ValueError``.
    """
    if not 0 <= payload_type <= 127:
        raise ValueError(f"payload type {payload_type} is not a 7-bit value")
    return _HEADER.pack(0x80, (0x80 if marker else 0) | payload_type, sequence, timestamp, ssrc) + payload


def is_rtcp(data: bytes) -> bool:
    """True when a datagram on a multiplexed port is RTCP rather than RTP (RFC 5761 §4)."""
    return len(data) >= 2 and 192 <= data[1] <= 223


def sequence_delta(a: int, b: int) -> int:
    """Signed distance ``a - b`` between 16-bit sequence numbers, in [-32768, 32767]."""
    return ((a - b + 0x8000) & 0xFFFF) - 0x8000


def timestamp_delta(a: int, b: int) -> int:
    """Signed distance ``a - b`` between 32-bit RTP timestamps."""
    return ((a - b + 0x80000000) & 0xFFFFFFFF) - 0x80000000
