"""Checking a WebRTC SDP offer before it reaches aiortc, so that a bad one gets a clear reason.

aiortc's own parser accepts almost anything (an empty body parses as a session without
media) and fails on the rest with bare assertion errors. ``check_offer`` reads the offer's
structure (RFC 8866 lines, media sections, rtpmaps, ICE and DTLS attributes) and raises
``OfferError`` naming the first thing a WebRTC audio call cannot work with: no audio, no
Opus, not DTLS-SRTP, no ICE credentials or fingerprint, video, more than one audio stream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from service.api.control import MAX_OFFER_BYTES

MAX_SECTIONS = 8
_LINE = re.compile(r"^([a-z])=(.*)$")
_RTPMAP = re.compile(r"^rtpmap:(\d+) ([^/\s]+)/(\d+)(?:/(\d+))?$", re.IGNORECASE)
DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")


class OfferError(ValueError):
    """The offer cannot be answered; the message says why (sent back with 400)."""


@dataclass
class MediaSection:
    kind: str
    port: int
    proto: str
    formats: list[str]
    attributes: list[str] = field(default_factory=list)

    def values(self, name: str) -> list[str]:
        prefix = name + ":"
        return [a[len(prefix) :] for a in self.attributes if a.startswith(prefix)]

    def has(self, name: str) -> bool:
        return any(a == name or a.startswith(name + ":") for a in self.attributes)

    def rtpmaps(self) -> dict[int, str]:
        """Payload type → "name/rate" for this section's rtpmap lines."""
        out: dict[int, str] = {}
        for attribute in self.attributes:
            match = _RTPMAP.match(attribute)
            if match:
                out[int(match.group(1))] = f"{match.group(2)}/{match.group(3)}"
        return out


@dataclass
class OfferSummary:
    """What the ingress needs to know about an acceptable offer."""

    opus_payload_type: int
    direction: str
    has_data_channel: bool


def _sections(text: str) -> tuple[list[str], list[MediaSection]]:
    lines = text.replace("\r\n", "\n").split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    if not lines or lines[0].strip() != "v=0":
        raise OfferError("not an SDP offer: the body must start with v=0")
    session: list[str] = []
    sections: list[MediaSection] = []
    for number, line in enumerate(lines, start=1):
        match = _LINE.match(line)
        if match is None:
            raise OfferError(f"SDP line {number} is not of the form <letter>=<value>: {line[:60]!r}")
        kind, value = match.groups()
        if kind == "m":
            parts = value.split()
            if len(parts) < 4:
                raise OfferError(f"SDP line {number}: m= needs media, port, proto and formats")
            port_text = parts[1].split("/")[0]
            if not port_text.isdigit() or int(port_text) > 65535:
                raise OfferError(f"SDP line {number}: bad port {parts[1]!r}")
            sections.append(MediaSection(parts[0].lower(), int(port_text), parts[2], parts[3:]))
            if len(sections) > MAX_SECTIONS:
                raise OfferError(f"more than {MAX_SECTIONS} media sections")
        elif kind == "a":
            (sections[-1].attributes if sections else session).append(value.strip())
    return session, sections


def check_offer(text: str) -> OfferSummary:
    """Validate a WebRTC offer for one audio call; raise OfferError with the reason."""
    if len(text.encode()) > MAX_OFFER_BYTES:
        raise OfferError(f"offer larger than {MAX_OFFER_BYTES} bytes")
    session, sections = _sections(text)
    audio = [s for s in sections if s.kind == "audio" and s.port != 0]
    if not audio:
        raise OfferError("the offer has no audio section (m=audio): nothing to talk with")
    if len(audio) > 1:
        raise OfferError("the offer has more than one audio section; one microphone stream is supported")
    active_video = [s for s in sections if s.kind == "video" and s.port != 0]
    if active_video:
        raise OfferError("video is not supported: offer audio only (and a data channel if you like)")
    unknown = [s.kind for s in sections if s.kind not in ("audio", "video", "application") and s.port != 0]
    if unknown:
        raise OfferError(f"unsupported media section {unknown[0]!r}")
    section = audio[0]
    if "SAVPF" not in section.proto.upper() or "TLS" not in section.proto.upper():
        raise OfferError(f"audio is offered over {section.proto}; WebRTC needs UDP/TLS/RTP/SAVPF (DTLS-SRTP)")
    rtpmaps = section.rtpmaps()
    offered = [int(f) for f in section.formats if f.isdigit()]
    opus = [pt for pt in offered if rtpmaps.get(pt, "").lower() == "opus/48000"]
    if not opus:
        names = ", ".join(rtpmaps[pt] for pt in offered if pt in rtpmaps) or "none named"
        raise OfferError(f"no Opus (opus/48000/2) in the audio offer; offered: {names}")
    directions = [a for a in section.attributes if a in DIRECTIONS] or [a for a in session if a in DIRECTIONS]
    direction = directions[0] if directions else "sendrecv"
    if direction == "inactive":
        raise OfferError("the audio section is inactive")

    def anywhere(name: str) -> bool:
        return section.has(name) or any(a == name or a.startswith(name + ":") for a in session)

    if not (anywhere("ice-ufrag") and anywhere("ice-pwd")):
        raise OfferError("no ICE credentials (a=ice-ufrag and a=ice-pwd)")
    if not anywhere("fingerprint"):
        raise OfferError("no DTLS fingerprint (a=fingerprint)")
    has_data = any(s.kind == "application" and s.port != 0 for s in sections)
    return OfferSummary(opus_payload_type=opus[0], direction=direction, has_data_channel=has_data)
