"""Property tests: no input makes the SIP or SDP parsers raise anything but their own error."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sip.errors import SipParseError
from sip.framing import StreamFramer
from sip.headers import Address, Via
from sip.message import Request, parse_message, stateless_response
from sip.sdp import MediaPreferences, SdpError, SessionDescription, answer_offer, reanswer
from sip.uri import parse_uri

VALID_MESSAGES = [
    (
        b"INVITE sip:bob@example.com;transport=tcp SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP [2001:db8::1]:5062;branch=z9hG4bK776;rport, SIP/2.0/TCP p.example.com\r\n"
        b'Max-Forwards: 70\r\nTo: "Bob \\"B\\"" <sip:bob@example.com>\r\n'
        b"f: Alice <sip:alice@example.com>;tag=19\r\ni: a84b4c76e66710\r\nCSeq: 314159 INVITE\r\n"
        b"Contact: <sip:alice@pc33.example.com>;expires=60, sip:x@y\r\nSupported: timer\r\n"
        b"Session-Expires: 1800;refresher=uac\r\nc: application/sdp\r\nl: 58\r\n\r\n"
        b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\nc=IN IP4 1.2.3.4\r\nm=audio 5 RTP/AVP 0\r\n"
    ),
    (
        b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP h;branch=z9hG4bKx;received=10.0.0.1;rport=5060\r\n"
        b"From: <sip:c@d>;tag=1\r\nTo: sip:a@b;tag=2\r\nCall-ID: abc\r\nCSeq: 1 BYE\r\n"
        b"Record-Route: <sip:p1;lr>,<sip:p2;lr>\r\nContent-Length: 0\r\n\r\n"
    ),
    (
        b"OPTIONS sip:user;par=u%40example.net@example.com SIP/2.0\r\nVia: SIP  /  2.0 / UDP\r\n h;branch=z9hG4bKq\r\n"
        b"From: token1 token2 <sip:c@d>;tag=1\r\nTo: <sip:a@b>\r\nCall-ID: abc\r\nCSeq: 1\r\n OPTIONS\r\n"
        b"Accept: application/sdp, text/plain\r\n\r\n"
    ),
]
VALID_SDP = (
    "v=0\r\no=alice 1 1 IN IP4 198.51.100.1\r\ns=-\r\nc=IN IP4 198.51.100.1\r\nt=0 0\r\n"
    "m=audio 49170 RTP/AVP 8 0 101\r\na=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\n"
    "a=ptime:20\r\na=sendonly\r\nm=video 0 RTP/AVP 31\r\n"
)

SPECIAL = list(b'<>;,"\\:@ \t\r\n=/?%[]') + [0, 255]
settings.register_profile(
    "sip",
    max_examples=int(os.environ.get("SIP_HYPOTHESIS_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("sip")


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["delete", "insert", "replace", "duplicate", "truncate"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if kind == "delete":
            del data[at : at + draw(st.integers(1, 20))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8) | st.sampled_from([bytes([c]) for c in SPECIAL]))
        elif kind == "replace":
            data[at] = draw(st.sampled_from(SPECIAL) | st.integers(0, 255))
        elif kind == "duplicate":
            end = data.find(b"\n", at)
            start = data.rfind(b"\n", 0, at) + 1
            if end > start:
                data[end + 1 : end + 1] = data[start : end + 1]
        else:
            del data[at:]
    return bytes(data)


def parse_or_error(data: bytes):
    try:
        return parse_message(data)
    except SipParseError as exc:
        assert exc.status in (400, 505, 513)
        return None


@given(st.binary(max_size=2000))
def test_arbitrary_bytes_raise_only_sip_parse_error(data):
    parse_or_error(data)
    salvage = stateless_response(data, 400, "Bad Request")
    if salvage is not None:
        parse_or_error(salvage[0].to_bytes())


@given(mutated(VALID_MESSAGES))
def test_mutated_messages_raise_only_sip_parse_error_and_reparse_when_valid(data):
    message = parse_or_error(data)
    if message is None:
        stateless_response(data, 400, "Bad Request")
        return
    again = parse_message(message.to_bytes())
    assert type(again) is type(message)
    assert again.body == message.body
    assert [h for h in again.headers if h[0] != "Content-Length"] == [
        h for h in message.headers if h[0] != "Content-Length"
    ]
    if isinstance(message, Request):
        assert again.method == message.method and str(again.uri) == str(message.uri)


@given(st.lists(mutated(VALID_MESSAGES), min_size=1, max_size=4), st.integers(1, 64))
def test_stream_framer_raises_only_sip_parse_error(messages, chunk):
    stream = b"".join(messages)
    framer = StreamFramer(max_size=4096)
    try:
        for i in range(0, len(stream), chunk):
            for message in framer.feed(stream[i : i + chunk]):
                parse_or_error(message)
    except SipParseError:
        pass


@given(st.text(max_size=200))
def test_header_value_parsers_raise_only_sip_parse_error(text):
    for parse in (parse_uri, Address.parse, Via.parse):
        try:
            parse(text)
        except SipParseError:
            pass


@given(st.text(max_size=1000) | st.binary(max_size=1000))
def test_arbitrary_sdp_raises_only_sdp_error(data):
    try:
        SessionDescription.parse(data)
    except SdpError:
        pass


@given(mutated([VALID_SDP.encode()]))
def test_mutated_sdp_raises_only_sdp_error_and_round_trips(data):
    try:
        parsed = SessionDescription.parse(data)
    except SdpError:
        return
    assert str(SessionDescription.parse(str(parsed))) == str(parsed)  # serialisation is stable
    try:
        answer, _ = answer_offer(parsed, MediaPreferences(), "192.0.2.1", 4000)
        reanswer(answer, parsed)
    except SdpError:
        pass
