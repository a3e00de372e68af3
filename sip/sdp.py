"""SDP (RFC 4566) parsing and serialisation, and offer/answer for audio (RFC 3264).

``SessionDescription.parse`` keeps every line it does not interpret, in order, so a
description survives a parse/serialise round trip. ``answer_offer`` answers an offer
with our codec preferences; ``build_offer`` makes one for outgoing calls;
``negotiated_from_answer`` reads the answer to our offer; ``reanswer`` answers a
re-offer (hold, unhold, refresh) the way the previous answer did. Each yields a
``NegotiatedMedia``: what the RTP side needs to know.

Codec choice (``MediaPreferences.order``): by default (``"quality"``) the best audio the
offer holds among our codecs: Opus, then G.722, then G.711, and among equals (PCMU and
PCMA) the one offered first. ``"ours"`` takes the first codec of our list that the offer
holds (a configured order), ``"offerer"`` the first offered one we support. An entry that
names a codec with the wrong clock rate or channels (``opus/8000``, ``G722/16000``) is not
that codec and is passed over.

Encryption (``MediaPreferences.srtp``): ``"off"`` answers ``RTP/AVP`` streams only;
``"optional"`` answers an ``RTP/SAVP`` stream with SRTP (SDES keys, RFC 4568: the first
``a=crypto`` line we can run, answered under its tag with a fresh key of ours) and an
``RTP/AVP`` one with plain RTP; ``"required"`` answers ``RTP/SAVP`` only
(``EncryptionMismatch``, a 488, for a plain offer). Offers are ``RTP/SAVP`` with one
``a=crypto`` line per suite unless the policy is ``"off"``. The agreed keys travel in
``NegotiatedMedia.srtp``; whether keys may be exchanged at all (only over TLS) is the
caller's decision, made before it picks the policy.
"""

from __future__ import annotations

import contextlib
import copy
import secrets
from dataclasses import dataclass, field

from sip import codecs
from sip.srtp import DEFAULT_SUITES, SUITES, CryptoAttribute, CryptoError, SrtpKeys, new_crypto

DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")
MIRRORED_DIRECTION = {"sendrecv": "sendrecv", "sendonly": "recvonly", "recvonly": "sendonly", "inactive": "inactive"}
_SESSION_ORDER = {"i": 1, "u": 2, "e": 3, "p": 4, "c": 5, "b": 6, "t": 7, "r": 8, "z": 9, "k": 10, "a": 11}
_MEDIA_ORDER = {"i": 1, "c": 2, "b": 3, "k": 4, "a": 5}


class SdpError(ValueError):
    """A session description is malformed or cannot be used; the message says why."""


class NoCommonCodec(SdpError):
    """The offer has no audio stream with a codec we support: answer 488."""


class EncryptionMismatch(NoCommonCodec):
    """The offer's media encryption does not meet the policy (plain RTP where SRTP is
    required, SRTP where it is off, no ``a=crypto`` line we can run): answer 488."""


SRTP_POLICIES = ("off", "optional", "required")


@dataclass
class Origin:
    username: str = "-"
    session_id: str = "0"
    session_version: int = 0
    nettype: str = "IN"
    addrtype: str = "IP4"
    address: str = "0.0.0.0"

    @classmethod
    def parse(cls, value: str) -> Origin:
        parts = value.split()
        if len(parts) != 6:
            raise SdpError(f"o=: expected 6 fields, got {value!r}")
        if not parts[2].isdigit():
            raise SdpError(f"o=: session version {parts[2]!r} is not a number")
        return cls(parts[0], parts[1], int(parts[2]), parts[3], parts[4], parts[5])

    def __str__(self) -> str:
        return f"{self.username} {self.session_id} {self.session_version} {self.nettype} {self.addrtype} {self.address}"


@dataclass
class Connection:
    address: str
    addrtype: str = "IP4"
    nettype: str = "IN"

    @property
    def host(self) -> str:
        """The address without a multicast ``/ttl`` suffix."""
        return self.address.split("/")[0]

    @property
    def is_hold(self) -> bool:
        """RFC 2543-style hold: ``c=IN IP4 0.0.0.0`` (RFC 3264 §8.4)."""
        return self.host in ("0.0.0.0", "::")

    @classmethod
    def parse(cls, value: str) -> Connection:
        parts = value.split()
        if len(parts) != 3:
            raise SdpError(f"c=: expected 'IN IP4 address', got {value!r}")
        return cls(parts[2], parts[1].upper(), parts[0].upper())

    def __str__(self) -> str:
        return f"{self.nettype} {self.addrtype} {self.address}"


@dataclass(frozen=True)
class RtpMap:
    payload_type: int
    encoding: str
    clock_rate: int
    channels: int = 1

    @classmethod
    def parse(cls, value: str) -> RtpMap | None:
        """``a=rtpmap`` value, or None when it is malformed (such lines are ignored)."""
        pt, _, rest = value.strip().partition(" ")
        parts = rest.strip().split("/")
        if not pt.isdigit() or len(parts) < 2 or not parts[0] or not parts[1].isdigit():
            return None
        channels = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else 1
        return cls(int(pt), parts[0], int(parts[1]), channels)

    def __str__(self) -> str:
        suffix = f"/{self.channels}" if self.channels != 1 else ""
        return f"{self.payload_type} {self.encoding}/{self.clock_rate}{suffix}"


STATIC_PAYLOAD_TYPES = {
    0: RtpMap(0, "PCMU", 8000),
    3: RtpMap(3, "GSM", 8000),
    4: RtpMap(4, "G723", 8000),
    8: RtpMap(8, "PCMA", 8000),
    9: RtpMap(9, "G722", 8000),
    13: RtpMap(13, "CN", 8000),
    18: RtpMap(18, "G729", 8000),
}


def _order(lines: list[tuple[str, str]], rank: dict[str, int]) -> list[tuple[str, str]]:
    return sorted(lines, key=lambda line: rank.get(line[0], 12))


@dataclass
class MediaDescription:
    """One ``m=`` section with its ``c=`` and attributes; other lines kept in ``lines``."""

    media: str
    port: int
    proto: str
    formats: list[str]
    port_count: int | None = None
    connection: Connection | None = None
    attributes: list[tuple[str, str | None]] = field(default_factory=list)
    lines: list[tuple[str, str]] = field(default_factory=list)

    def attribute(self, name: str) -> str | None:
        """The value of the first ``a=name:value`` (``""`` for a flag), or None."""
        for key, value in self.attributes:
            if key == name:
                return value if value is not None else ""
        return None

    def attribute_values(self, name: str) -> list[str]:
        return [value or "" for key, value in self.attributes if key == name]

    def rtpmaps(self) -> dict[int, RtpMap]:
        """Payload type → RtpMap for every format, static types filled in."""
        maps: dict[int, RtpMap] = {}
        for fmt in self.formats:
            if fmt.isdigit() and int(fmt) in STATIC_PAYLOAD_TYPES:
                maps[int(fmt)] = STATIC_PAYLOAD_TYPES[int(fmt)]
        for value in self.attribute_values("rtpmap"):
            rtpmap = RtpMap.parse(value)
            if rtpmap is not None:
                maps[rtpmap.payload_type] = rtpmap
        return maps

    def fmtp(self, payload_type: int) -> str | None:
        for value in self.attribute_values("fmtp"):
            pt, _, params = value.partition(" ")
            if pt == str(payload_type):
                return params.strip()
        return None

    @property
    def direction(self) -> str | None:
        for key, _ in self.attributes:
            if key in DIRECTIONS:
                return key
        return None

    def set_direction(self, direction: str) -> None:
        self.attributes = [(k, v) for k, v in self.attributes if k not in DIRECTIONS]
        self.attributes.append((direction, None))

    @property
    def ptime(self) -> int | None:
        value = self.attribute("ptime")
        try:
            return int(float(value)) if value else None
        except ValueError:
            return None

    @property
    def rtcp_port(self) -> int:
        value = self.attribute("rtcp")
        if value:
            first = value.split()[0]
            if first.isdigit():
                return int(first)
        return self.port + 1

    def to_lines(self) -> list[str]:
        port = f"{self.port}/{self.port_count}" if self.port_count is not None else str(self.port)
        out = [f"m={' '.join([self.media, port, self.proto, *self.formats])}"]
        extra = list(self.lines)
        if self.connection is not None:
            extra.append(("c", str(self.connection)))
        extra.extend(("a", k if v is None else f"{k}:{v}") for k, v in self.attributes)
        out.extend(f"{kind}={value}" for kind, value in _order(extra, _MEDIA_ORDER))
        return out


@dataclass
class SessionDescription:
    """A whole SDP body."""

    origin: Origin = field(default_factory=Origin)
    session_name: str = "-"
    connection: Connection | None = None
    timing: list[str] = field(default_factory=lambda: ["0 0"])
    attributes: list[tuple[str, str | None]] = field(default_factory=list)
    media: list[MediaDescription] = field(default_factory=list)
    lines: list[tuple[str, str]] = field(default_factory=list)
    version: int = 0

    @classmethod
    def parse(cls, data: str | bytes) -> SessionDescription:
        text = data.decode("utf-8", "surrogateescape") if isinstance(data, bytes) else data
        rows = [row.rstrip("\r") for row in text.split("\n")]
        while rows and not rows[-1].strip():
            rows.pop()
        if not rows:
            raise SdpError("empty session description")
        sdp = cls(timing=[])
        media: MediaDescription | None = None
        seen_origin = False
        for number, row in enumerate(rows, start=1):
            if len(row) < 2 or row[1] != "=" or not row[0].isalpha():
                raise SdpError(f"line {number}: {row[:60]!r} is not 'x=value'")
            kind, value = row[0], row[2:]
            if number == 1:
                if kind != "v" or value.strip() != "0":
                    raise SdpError(f"line 1: expected 'v=0', got {row[:60]!r}")
                continue
            if kind == "m":
                media = _parse_media(value, number)
                sdp.media.append(media)
            elif kind == "c":
                connection = Connection.parse(value)
                if media is None:
                    sdp.connection = connection
                else:
                    media.connection = connection
            elif kind == "a":
                name, colon, attr = value.partition(":")
                item = (name, attr if colon else None)
                (sdp.attributes if media is None else media.attributes).append(item)
            elif media is not None:
                media.lines.append((kind, value))
            elif kind == "o":
                sdp.origin = Origin.parse(value)
                seen_origin = True
            elif kind == "s":
                sdp.session_name = value
            elif kind == "t":
                sdp.timing.append(value)
            elif kind == "v":
                raise SdpError(f"line {number}: a second v= line")
            else:
                sdp.lines.append((kind, value))
        if not seen_origin:
            raise SdpError("missing o= line")
        return sdp

    def direction_of(self, media: MediaDescription) -> str:
        """The stream's direction attribute, else the session's, else sendrecv."""
        if media.direction:
            return media.direction
        for key, _ in self.attributes:
            if key in DIRECTIONS:
                return key
        return "sendrecv"

    def connection_of(self, media: MediaDescription) -> Connection | None:
        return media.connection or self.connection

    def first_audio(self) -> MediaDescription | None:
        for media in self.media:
            if media.media == "audio" and media.port != 0:
                return media
        return None

    def copy(self) -> SessionDescription:
        return copy.deepcopy(self)

    def __str__(self) -> str:
        out = [f"v={self.version}", f"o={self.origin}", f"s={self.session_name}"]
        extra = list(self.lines)
        if self.connection is not None:
            extra.append(("c", str(self.connection)))
        extra.extend(("t", t) for t in (self.timing or ["0 0"]))
        extra.extend(("a", k if v is None else f"{k}:{v}") for k, v in self.attributes)
        out.extend(f"{kind}={value}" for kind, value in _order(extra, _SESSION_ORDER))
        for media in self.media:
            out.extend(media.to_lines())
        return "\r\n".join(out) + "\r\n"

    def to_bytes(self) -> bytes:
        return str(self).encode("utf-8", "surrogateescape")


def _parse_media(value: str, number: int) -> MediaDescription:
    parts = value.split()
    if len(parts) < 3:
        raise SdpError(f"line {number}: m= needs 'media port proto formats', got {value!r}")
    port_text, _, count_text = parts[1].partition("/")
    if not port_text.isdigit() or int(port_text) > 65535:
        raise SdpError(f"line {number}: bad port {parts[1]!r} in m=")
    if count_text and not count_text.isdigit():
        raise SdpError(f"line {number}: bad port count {parts[1]!r} in m=")
    return MediaDescription(parts[0], int(port_text), parts[2], parts[3:], int(count_text) if count_text else None)


# --- offer / answer --------------------------------------------------------------------


@dataclass
class MediaPreferences:
    """What we accept and prefer when answering or offering audio."""

    codecs: list[str] = field(default_factory=lambda: list(codecs.available()))
    telephone_event: bool = True
    ptime: int = 20
    min_ptime: int = 10
    max_ptime: int = 40
    order: str = "quality"  # or "ours", "offerer": see the module docstring
    srtp: str = "off"  # or "optional", "required": see the module docstring
    srtp_suites: tuple[str, ...] = DEFAULT_SUITES


@dataclass(frozen=True)
class NegotiatedMedia:
    """The outcome of offer/answer for the audio stream, as the RTP side needs it.

    ``direction`` is *ours*, the answer to the peer's: ``sendrecv``; ``recvonly`` (the peer
    put the call on hold: do not send); ``sendonly`` (the peer only listens); or
    ``inactive``. ``remote_address`` is None when the peer gave ``c=0.0.0.0`` (old-style
    hold), so ``sends`` is False then too.
    """

    remote_address: str | None
    remote_port: int
    remote_rtcp_port: int | None
    codec: str
    payload_type: int
    clock_rate: int
    ptime: int
    dtmf_payload_type: int | None
    direction: str
    fmtp: str | None = None  # the peer's format parameters for the codec (Opus: what it wants)
    dtmf_clock_rate: int = 8000
    srtp: SrtpKeys | None = None  # SDES-SRTP keys; None: plain RTP

    @property
    def sends(self) -> bool:
        return self.direction in ("sendrecv", "sendonly") and self.remote_address is not None

    @property
    def receives(self) -> bool:
        return self.direction in ("sendrecv", "recvonly")


def _addrtype(address: str) -> str:
    return "IP6" if ":" in address else "IP4"


def _session_id() -> str:
    return str(secrets.randbelow(10**12) + 10**11)


def codec_of(rtpmap: RtpMap) -> codecs.CodecSpec | None:
    """The codec an rtpmap entry names, if we know it at that clock rate and channel count."""
    found = codecs.SPECS.get(rtpmap.encoding.upper())
    return found if found is not None and found.matches(rtpmap.encoding, rtpmap.clock_rate, rtpmap.channels) else None


def _offered_rtpmaps(media: MediaDescription) -> list[RtpMap]:
    maps = media.rtpmaps()
    return [maps[int(fmt)] for fmt in media.formats if fmt.isdigit() and int(fmt) in maps and int(fmt) <= 127]


def _choose_codec(media: MediaDescription, prefs: MediaPreferences) -> tuple[RtpMap, codecs.CodecSpec] | None:
    ours = [c.upper() for c in prefs.codecs]
    candidates = []
    for rtpmap in _offered_rtpmaps(media):
        codec = codec_of(rtpmap)
        if codec is not None and codec.name.upper() in ours:
            candidates.append((rtpmap, codec))
    if not candidates:
        return None
    if prefs.order == "offerer":
        return candidates[0]
    if prefs.order == "ours":
        return min(candidates, key=lambda c: ours.index(c[1].name.upper()))
    # max() keeps the first of equals: the offerer's order among codecs of one rank
    return max(candidates, key=lambda c: c[1].rank)


def _telephone_event(media: MediaDescription, clock_rate: int = 8000) -> RtpMap | None:
    """The offered telephone-event at the audio's clock rate (RFC 4733 §2.1), else at 8000."""
    events = [rm for rm in _offered_rtpmaps(media) if rm.encoding.lower() == "telephone-event"]
    for wanted in (clock_rate, 8000):
        for rtpmap in events:
            if rtpmap.clock_rate == wanted:
                return rtpmap
    return None


def _ptime(offered: int | None, codec: codecs.CodecSpec, prefs: MediaPreferences) -> int:
    """The offered ptime if we and the codec can do it, else ours (else the codec's nearest)."""
    for ptime in (offered, prefs.ptime):
        if ptime is not None and prefs.min_ptime <= ptime <= prefs.max_ptime and ptime in codec.ptimes:
            return ptime
    return min(codec.ptimes, key=lambda p: abs(p - prefs.ptime))


def _offered_direction(offer: SessionDescription, media: MediaDescription) -> str:
    direction = offer.direction_of(media)
    connection = offer.connection_of(media)
    if connection is not None and connection.is_hold:
        # c=0.0.0.0: the offerer will not receive (RFC 3264 §8.4).
        direction = {"sendrecv": "sendonly", "recvonly": "inactive"}.get(direction, direction)
    return direction


def _choose_crypto(media: MediaDescription, suites: tuple[str, ...]) -> tuple[CryptoAttribute | None, str]:
    """The first offered ``a=crypto`` line we can run (RFC 4568 §6.1), or None and why not."""
    why = "the RTP/SAVP stream has no a=crypto line"
    for value in media.attribute_values("crypto"):
        try:
            crypto = CryptoAttribute.parse(value)
        except CryptoError as exc:
            why = str(exc)
            continue
        if crypto.suite in suites:
            return crypto, ""
        why = f"crypto: suite {crypto.suite} is not enabled here"
    return None, why


def _stream_encryption(media: MediaDescription, prefs: MediaPreferences) -> tuple[bool, CryptoAttribute | None, str]:
    """Whether we may answer this audio stream under the encryption policy, with the
    offered crypto line to use (SRTP) or None (plain RTP), else why not."""
    proto = media.proto.upper()
    if proto == "RTP/AVP":
        if prefs.srtp == "required":
            return False, None, "SRTP is required here and the offer is plain RTP/AVP"
        return True, None, ""
    if proto == "RTP/SAVP":
        if prefs.srtp == "off":
            return False, None, "SRTP (RTP/SAVP) is not accepted here"
        crypto, why = _choose_crypto(media, prefs.srtp_suites)
        return crypto is not None, crypto, why
    return False, None, f"transport protocol {media.proto[:40]} is not supported"


def _srtp_keys(offered: CryptoAttribute, keep: SrtpKeys | None) -> tuple[CryptoAttribute, SrtpKeys]:
    """Our answering crypto line under the offered tag: a fresh key, or ``keep``'s when the
    peer's key and suite are unchanged (a re-offer that does not rekey)."""
    if keep is not None and keep.suite == offered.suite and keep.remote_key == offered.key:
        local = CryptoAttribute(offered.tag, offered.suite, keep.local_key)
    else:
        local = new_crypto(offered.tag, offered.suite)
    return local, SrtpKeys(offered.suite, local.key, offered.key, offered.window_size_hint)


def answer_offer(
    offer: SessionDescription,
    prefs: MediaPreferences,
    local_address: str,
    local_port: int,
    *,
    username: str = "moshimoshi",
    session_id: str | None = None,
    session_version: int | None = None,
    keep_srtp: SrtpKeys | None = None,
) -> tuple[SessionDescription, NegotiatedMedia]:
    """Answer ``offer``: the first audio stream the encryption policy admits (RTP/AVP,
    RTP/SAVP with a crypto line we run) with a codec we support is accepted on
    ``local_address:local_port``; every other stream is rejected with port 0. Raises
    ``EncryptionMismatch`` when a stream had a codec but not the encryption we need,
    ``NoCommonCodec`` when no stream can be accepted. ``keep_srtp``: the keys in force
    (a re-offer), reused when the peer did not change its own."""
    chosen: tuple[int, RtpMap, codecs.CodecSpec, CryptoAttribute | None] | None = None
    refusal = ""
    for index, media in enumerate(offer.media):
        if media.media != "audio" or media.port == 0:
            continue
        found = _choose_codec(media, prefs)
        if found is None:
            continue
        admitted, crypto, why = _stream_encryption(media, prefs)
        if admitted:
            chosen = (index, *found, crypto)
            break
        refusal = refusal or why
    if chosen is None:
        if refusal:
            raise EncryptionMismatch(refusal)
        offered = [f"{m.media} {m.proto} {' '.join(m.formats)}" for m in offer.media if m.port != 0]
        raise NoCommonCodec(
            f"no audio stream offers {' or '.join(prefs.codecs)} (offered: {'; '.join(offered)[:200] or 'nothing'})"
        )
    index, codec, spec, offered_crypto = chosen
    offered_media = offer.media[index]
    connection = offer.connection_of(offered_media)
    if connection is None:
        raise SdpError("the audio stream has no c= line (neither media nor session level)")
    dtmf = _telephone_event(offered_media, spec.clock_rate) if prefs.telephone_event else None
    ptime = _ptime(offered_media.ptime, spec, prefs)
    direction = MIRRORED_DIRECTION[_offered_direction(offer, offered_media)]

    formats = [str(codec.payload_type)]
    attributes: list[tuple[str, str | None]] = [("rtpmap", spec.rtpmap(codec.payload_type))]
    if codecs.fmtp(spec):
        attributes.append(("fmtp", f"{codec.payload_type} {codecs.fmtp(spec)}"))
    if dtmf is not None:
        formats.append(str(dtmf.payload_type))
        attributes.append(("rtpmap", f"{dtmf.payload_type} telephone-event/{dtmf.clock_rate}"))
        attributes.append(("fmtp", f"{dtmf.payload_type} {_dtmf_events(offered_media.fmtp(dtmf.payload_type))}"))
    srtp = None
    if offered_crypto is not None:
        local_crypto, srtp = _srtp_keys(offered_crypto, keep_srtp)
        attributes.append(("crypto", str(local_crypto)))
    attributes.append(("ptime", str(ptime)))
    attributes.append((direction, None))
    media_lines = []
    for i, media in enumerate(offer.media):
        if i == index:
            media_lines.append(
                MediaDescription("audio", local_port, offered_media.proto, formats, attributes=attributes)
            )
        else:
            media_lines.append(MediaDescription(media.media, 0, media.proto, list(media.formats[:1]) or ["0"]))
    sid = session_id or _session_id()
    answer = SessionDescription(
        origin=Origin(
            username,
            sid,
            session_version if session_version is not None else int(sid) % 10**9,
            "IN",
            _addrtype(local_address),
            local_address,
        ),
        session_name="-",
        connection=Connection(local_address, _addrtype(local_address)),
        timing=list(offer.timing) or ["0 0"],
        media=media_lines,
    )
    negotiated = NegotiatedMedia(
        remote_address=None if connection.is_hold else connection.host,
        remote_port=offered_media.port,
        remote_rtcp_port=offered_media.rtcp_port,
        codec=spec.name,
        payload_type=codec.payload_type,
        clock_rate=spec.clock_rate,
        ptime=ptime,
        dtmf_payload_type=dtmf.payload_type if dtmf else None,
        direction=direction,
        fmtp=offered_media.fmtp(codec.payload_type),
        dtmf_clock_rate=dtmf.clock_rate if dtmf else 8000,
        srtp=srtp,
    )
    return answer, negotiated


def _dtmf_events(offered: str | None) -> str:
    """The events we answer: the offer's list when it is a plain one, else 0-15 (the digits)."""
    text = (offered or "").replace(" ", "")
    allowed = set("0123456789-,")
    return text if text and len(text) <= 40 and set(text) <= allowed else "0-16"


def build_offer(
    prefs: MediaPreferences,
    local_address: str,
    local_port: int,
    *,
    username: str = "moshimoshi",
    session_id: str | None = None,
    direction: str = "sendrecv",
    dtmf_payload_type: int = 101,
) -> SessionDescription:
    """An audio offer with our codecs in preference order (+ telephone-event); codecs
    without a static payload type get dynamic ones from 96 up. Unless ``prefs.srtp`` is
    "off" the stream is RTP/SAVP with a fresh key for each of ``prefs.srtp_suites``."""
    formats: list[str] = []
    attributes: list[tuple[str, str | None]] = []
    dynamic = (pt for pt in range(96, 128) if pt != dtmf_payload_type)
    for name in prefs.codecs:
        try:
            spec = codecs.spec(name)
        except ValueError as exc:
            raise SdpError(str(exc)) from None
        pt = spec.static_payload_type if spec.static_payload_type is not None else next(dynamic)
        formats.append(str(pt))
        attributes.append(("rtpmap", spec.rtpmap(pt)))
        if codecs.fmtp(spec):
            attributes.append(("fmtp", f"{pt} {codecs.fmtp(spec)}"))
    if prefs.telephone_event:
        formats.append(str(dtmf_payload_type))
        attributes.append(("rtpmap", f"{dtmf_payload_type} telephone-event/8000"))
        attributes.append(("fmtp", f"{dtmf_payload_type} 0-16"))
    proto = "RTP/AVP"
    if prefs.srtp != "off":
        proto = "RTP/SAVP"
        for tag, suite in enumerate(prefs.srtp_suites, start=1):
            attributes.append(("crypto", str(new_crypto(tag, suite))))
    attributes.append(("ptime", str(prefs.ptime)))
    attributes.append((direction, None))
    sid = session_id or _session_id()
    return SessionDescription(
        origin=Origin(username, sid, int(sid) % 10**9, "IN", _addrtype(local_address), local_address),
        connection=Connection(local_address, _addrtype(local_address)),
        media=[MediaDescription("audio", local_port, proto, formats, attributes=attributes)],
    )


def _answered_srtp(offered: MediaDescription | None, answered: MediaDescription) -> SrtpKeys | None:
    """The keys an answer to our offer agreed on: its crypto line must name the tag and
    suite of one of ours (RFC 4568 §7.1.2). Raises ``SdpError`` when the answer does not
    match the offer's encryption."""
    offered_proto = (offered.proto if offered is not None else answered.proto).upper()
    if answered.proto.upper() != offered_proto:
        raise SdpError(f"the answer's transport protocol {answered.proto[:40]} is not the offer's {offered_proto}")
    if offered_proto != "RTP/SAVP":
        return None
    assert offered is not None
    values = answered.attribute_values("crypto")
    if len(values) != 1:
        raise SdpError(f"the SRTP answer has {len(values)} a=crypto lines, not one")
    try:
        theirs = CryptoAttribute.parse(values[0])
    except CryptoError as exc:
        raise SdpError(str(exc)) from None
    for value in offered.attribute_values("crypto"):
        ours = CryptoAttribute.parse(value)
        if ours.tag == theirs.tag:
            if ours.suite != theirs.suite:
                raise SdpError(f"the answer's crypto tag {theirs.tag} names {theirs.suite}, we offered {ours.suite}")
            return SrtpKeys(ours.suite, ours.key, theirs.key, theirs.window_size_hint)
    raise SdpError(f"the answer's crypto tag {theirs.tag} was not offered")


def negotiated_from_answer(offer: SessionDescription, answer: SessionDescription) -> NegotiatedMedia:
    """What the answer to our ``offer`` agreed on. Raises ``SdpError`` when the answer
    rejects the audio stream or picks a codec that was not offered."""
    for index, media in enumerate(answer.media):
        if media.media != "audio" or media.port == 0:
            continue
        offered = offer.media[index] if index < len(offer.media) else None
        offered_formats = set(offered.formats) if offered is not None else set(media.formats)
        codec = next(
            (rm for rm in _offered_rtpmaps(media) if rm.encoding.lower() not in ("telephone-event", "cn")), None
        )
        if codec is None:
            raise SdpError("the answer's audio stream has no usable codec")
        if str(codec.payload_type) not in offered_formats:
            raise SdpError(f"the answer chose payload type {codec.payload_type}, which was not offered")
        spec = codec_of(codec)
        if spec is None:
            raise SdpError(f"the answer chose {codec.encoding}/{codec.clock_rate}, a codec we cannot run")
        connection = answer.connection_of(media)
        if connection is None:
            raise SdpError("the answer's audio stream has no c= line")
        dtmf = _telephone_event(media, spec.clock_rate)
        ptime = media.ptime or (offered.ptime if offered is not None else None) or 20
        if ptime not in spec.ptimes:
            ptime = 20
        srtp = _answered_srtp(offered, media)
        return NegotiatedMedia(
            remote_address=None if connection.is_hold else connection.host,
            remote_port=media.port,
            remote_rtcp_port=media.rtcp_port,
            codec=spec.name,
            payload_type=codec.payload_type,
            clock_rate=spec.clock_rate,
            ptime=ptime,
            dtmf_payload_type=dtmf.payload_type if dtmf else None,
            direction=MIRRORED_DIRECTION[_offered_direction(answer, media)],
            fmtp=media.fmtp(codec.payload_type),
            dtmf_clock_rate=dtmf.clock_rate if dtmf else 8000,
            srtp=srtp,
        )
    raise NoCommonCodec("the answer rejected every audio stream")


def _srtp_of_our_answer(offered: MediaDescription, answered: MediaDescription) -> SrtpKeys | None:
    """The keys an answer we gave (one crypto line, ours) agreed on with the offer's line of its tag."""
    if answered.proto.upper() != "RTP/SAVP":
        return None
    values = answered.attribute_values("crypto")
    if len(values) != 1:
        raise SdpError(f"the SRTP answer has {len(values)} a=crypto lines, not one")
    try:
        ours = CryptoAttribute.parse(values[0])
    except CryptoError as exc:
        raise SdpError(str(exc)) from None
    for value in offered.attribute_values("crypto"):
        with contextlib.suppress(CryptoError):
            theirs = CryptoAttribute.parse(value)
            if theirs.tag == ours.tag and theirs.suite == ours.suite:
                return SrtpKeys(ours.suite, ours.key, theirs.key, theirs.window_size_hint)
    raise SdpError(f"the answer's crypto tag {ours.tag} ({ours.suite}) matches no usable offered line")


def reanswer(
    previous: SessionDescription, offer: SessionDescription, *, srtp: SrtpKeys | None = None
) -> tuple[SessionDescription, NegotiatedMedia]:
    """Answer a re-offer in the same dialog as ``previous`` (our last answer) did: same
    address, port and codec, direction mirrored from the new offer (hold/unhold), the
    o= version bumped only when the answer changed (RFC 3264 §8). An SRTP call stays SRTP
    (a plain re-offer gets ``EncryptionMismatch``) and a plain one plain; ``srtp`` (the keys
    in force) is kept unless the peer changed its key or suite (a rekey: we answer with a
    fresh key too)."""
    ours = previous.first_audio()
    if ours is None:
        raise NoCommonCodec("the previous answer has no active audio stream")
    codec = next((rm for rm in _offered_rtpmaps(ours) if rm.encoding.lower() != "telephone-event"), None)
    spec = codec_of(codec) if codec is not None else None
    if spec is None:
        raise NoCommonCodec("the previous answer has no codec")
    secure = ours.proto.upper() == "RTP/SAVP"
    prefs = MediaPreferences(
        codecs=[spec.name],
        telephone_event=_telephone_event(ours, spec.clock_rate) is not None,
        ptime=ours.ptime or 20,
        order="ours",
        srtp="required" if secure else "off",
        srtp_suites=tuple(SUITES),
    )
    connection = previous.connection_of(ours)
    address = connection.host if connection is not None else previous.origin.address
    answer, negotiated = answer_offer(
        offer,
        prefs,
        address,
        ours.port,
        username=previous.origin.username,
        session_id=previous.origin.session_id,
        session_version=previous.origin.session_version,
        keep_srtp=srtp,
    )
    if str(answer) != str(previous):
        answer.origin.session_version = previous.origin.session_version + 1
    return answer, negotiated


def negotiated_as_answerer(offer: SessionDescription, answer: SessionDescription) -> NegotiatedMedia:
    """What an answer *we* gave to the peer's ``offer`` agreed on (for answers that
    ``answer_offer`` did not build, e.g. from an application's ``on_reoffer``)."""
    for index, media in enumerate(answer.media):
        if media.media != "audio" or media.port == 0 or index >= len(offer.media):
            continue
        offered = offer.media[index]
        codec = next(
            (rm for rm in _offered_rtpmaps(media) if rm.encoding.lower() not in ("telephone-event", "cn")), None
        )
        spec = codec_of(codec) if codec is not None else None
        if codec is None or spec is None:
            raise SdpError("the answer's audio stream has no usable codec")
        connection = offer.connection_of(offered)
        if connection is None:
            raise SdpError("the offer's audio stream has no c= line")
        dtmf = _telephone_event(media, spec.clock_rate)
        srtp = _srtp_of_our_answer(offered, media)
        return NegotiatedMedia(
            remote_address=None if connection.is_hold else connection.host,
            remote_port=offered.port,
            remote_rtcp_port=offered.rtcp_port,
            codec=spec.name,
            payload_type=codec.payload_type,
            clock_rate=spec.clock_rate,
            ptime=media.ptime or offered.ptime or 20,
            dtmf_payload_type=dtmf.payload_type if dtmf else None,
            direction=answer.direction_of(media),
            fmtp=offered.fmtp(codec.payload_type),
            dtmf_clock_rate=dtmf.clock_rate if dtmf else 8000,
            srtp=srtp,
        )
    raise NoCommonCodec("the answer rejected every audio stream")
