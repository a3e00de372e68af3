"""SIP messages, headers and URIs: parsing, validation and serialisation."""

from __future__ import annotations

import pytest

from sip.errors import SipParseError
from sip.framing import StreamFramer
from sip.headers import Address, CSeq, Headers, Via, canonical_name
from sip.message import Request, Response, make_response, parse_message, stateless_response
from sip.uri import AbsoluteUri, SipUri, parse_uri

INVITE = (
    "INVITE sip:bob@example.com SIP/2.0\r\n"
    "Via: SIP/2.0/UDP pc33.example.com:5062;branch=z9hG4bK776asdhds;rport\r\n"
    "Max-Forwards: 70\r\n"
    'To: "Bob" <sip:bob@example.com>\r\n'
    "From: Alice <sip:alice@example.com>;tag=1928301774\r\n"
    "Call-ID: a84b4c76e66710@pc33.example.com\r\n"
    "CSeq: 314159 INVITE\r\n"
    "Contact: <sip:alice@pc33.example.com>\r\n"
    "Content-Type: application/sdp\r\n"
    "Content-Length: 4\r\n"
    "\r\n"
    "v=0\n"
)


def crlf(text: str) -> bytes:
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode()


def test_parses_a_request_and_its_typed_headers():
    msg = parse_message(INVITE.encode())
    assert isinstance(msg, Request)
    assert msg.method == "INVITE" and str(msg.uri) == "sip:bob@example.com"
    assert msg.top_via.host == "pc33.example.com" and msg.top_via.port == 5062
    assert msg.top_via.branch == "z9hG4bK776asdhds" and msg.top_via.has_rport and msg.top_via.rport is None
    assert msg.to_addr.display_name == "Bob" and msg.to_addr.tag is None
    assert msg.from_addr.display_name == "Alice" and msg.from_addr.tag == "1928301774"
    assert msg.cseq == CSeq(314159, "INVITE")
    assert msg.call_id == "a84b4c76e66710@pc33.example.com"
    assert msg.contacts[0].uri == SipUri("pc33.example.com", user="alice")
    assert msg.body == b"v=0\n"


def test_serialisation_round_trips_and_fixes_content_length():
    msg = parse_message(INVITE.encode())
    msg.body = b"v=0\r\ns=-\r\n"
    again = parse_message(msg.to_bytes())
    assert again.body == b"v=0\r\ns=-\r\n"
    assert again.headers.get_all("Content-Length") == ["10"]
    assert [n for n, _ in again.headers][:3] == ["Via", "Max-Forwards", "To"]


def test_compact_forms_become_full_names():
    text = crlf(
        "OPTIONS sip:a@b SIP/2.0\n"
        "v: SIP/2.0/UDP h;branch=z9hG4bKx\n"
        "f: <sip:c@d>;tag=1\nt: sip:a@b\ni: abc\n"
        "CSeq: 1 OPTIONS\nm: <sip:c@h>\nk: timer\nx: 90\nc: text/plain\nl: 2\n\nhi"
    )
    msg = parse_message(text)
    names = [name for name, _ in msg.headers]
    assert names == [
        "Via",
        "From",
        "To",
        "Call-ID",
        "CSeq",
        "Contact",
        "Supported",
        "Session-Expires",
        "Content-Type",
        "Content-Length",
    ]
    assert msg.headers.get("call-id") == msg.headers.get("I") == "abc"
    assert canonical_name("www-authenticate") == "WWW-Authenticate"
    assert canonical_name("X-Custom") == "X-Custom"


def test_folded_header_values_are_unfolded():
    text = crlf(
        "OPTIONS sip:a@b SIP/2.0\n"
        "Via: SIP/2.0/UDP h;branch=z9hG4bKx\n"
        "From: <sip:c@d>\n ;tag=1\nTo: sip:a@b\nCall-ID: abc\nCSeq:\n\t7\n  OPTIONS\n"
        "Subject: first\n second\n\n"
    )
    msg = parse_message(text)
    assert msg.from_addr.tag == "1"
    assert msg.cseq.seq == 7
    assert msg.headers.get("Subject") == "first second"


def test_comma_separated_values_split_outside_quotes_and_brackets():
    text = crlf(
        "INVITE sip:a@b SIP/2.0\n"
        "Via: SIP/2.0/UDP h1;branch=z9hG4bK1, SIP/2.0/TCP [2001:db8::1]:5070;branch=z9hG4bK2\n"
        "Via: SIP/2.0/UDP h3;branch=z9hG4bK3\n"
        'Contact: "Watson, Thomas" <sip:t,u@w;a=1>;q=0.5, <sip:x@y>\n'
        "Route: <sip:p1;lr>,<sip:p2;lr>\n"
        "Record-Route: <sip:r1;lr>\n"
        "Supported: timer, 100rel,, \n"
        "From: <sip:c@d>;tag=1\nTo: sip:a@b\nCall-ID: abc\nCSeq: 1 INVITE\n\n"
    )
    msg = parse_message(text)
    assert [v.host for v in msg.vias] == ["h1", "2001:db8::1", "h3"]
    assert msg.vias[1].port == 5070 and msg.vias[1].transport == "TCP"
    assert [c.display_name for c in msg.contacts] == ["Watson, Thomas", None]
    assert msg.contacts[0].uri.user == "t,u" and msg.contacts[0].params.get("q") == "0.5"
    assert [str(r.uri) for r in msg.routes] == ["sip:p1;lr", "sip:p2;lr"]
    assert msg.values("Supported") == ["timer", "100rel"]


@pytest.mark.parametrize(
    "uri, user, password, host, port, params, headers",
    [
        ("sip:alice@atlanta.com", "alice", None, "atlanta.com", None, [], []),
        (
            "sip:alice:secretword@atlanta.com;transport=tcp",
            "alice",
            "secretword",
            "atlanta.com",
            None,
            [("transport", "tcp")],
            [],
        ),
        (
            "sips:alice@atlanta.com?subject=project%20x&priority=urgent",
            "alice",
            None,
            "atlanta.com",
            None,
            [],
            [("subject", "project x"), ("priority", "urgent")],
        ),
        (
            "sip:+1-212-555-1212:1234@gateway.com;user=phone",
            "+1-212-555-1212",
            "1234",
            "gateway.com",
            None,
            [("user", "phone")],
            [],
        ),
        (
            "sip:[2001:db8::10]:5070;maddr=239.255.255.1;ttl=15",
            None,
            None,
            "2001:db8::10",
            5070,
            [("maddr", "239.255.255.1"), ("ttl", "15")],
            [],
        ),
        ("sip:%61lice@atlanta.com;%6C%72", "alice", None, "atlanta.com", None, [("lr", None)], []),
        ("sip:user;par=u%40example.net@example.com", "user;par=u@example.net", None, "example.com", None, [], []),
        ("sip:192.0.2.4:5060", None, None, "192.0.2.4", 5060, [], []),
    ],
)
def test_sip_uri_parsing(uri, user, password, host, port, params, headers):
    parsed = parse_uri(uri)
    assert isinstance(parsed, SipUri)
    assert (parsed.user, parsed.password, parsed.host, parsed.port) == (user, password, host, port)
    assert parsed.params == params and parsed.headers == headers
    assert str(parsed) == uri  # the written form is kept


def test_uri_building_escapes_and_comparison_ignores_escapes_and_host_case():
    built = SipUri("Example.COM", user="a b", port=5070, params={"transport": "tcp"})
    assert str(built) == "sip:a%20b@Example.COM:5070;transport=tcp"
    assert parse_uri("sip:a%20b@example.com:5070;TRANSPORT=TCP") == built
    assert parse_uri("sip:alice@atlanta.com") != parse_uri("sip:ALICE@atlanta.com")
    assert parse_uri("sip:a@b;transport=tcp") != parse_uri("sip:a@b")
    assert str(SipUri("::1", port=5060)) == "sip:[::1]:5060"


def test_other_schemes_are_absolute_uris():
    assert parse_uri("tel:+81-3-1234-5678") == AbsoluteUri("tel", "+81-3-1234-5678")
    assert isinstance(parse_uri("urn:service:sos"), AbsoluteUri)


@pytest.mark.parametrize(
    "bad, fault",
    [
        ("sip:", "empty host"),
        ("sip:@example.com", "empty user part"),
        ("sip:a@exa mple.com", "' ' not allowed"),
        ("sip:a@[2001:db8::1", "unterminated IPv6"),
        ("sip:a@example.com:99999", "bad port"),
        ("sip:a@example.com;;lr", "empty URI parameter"),
        ("sip:a%zz@example.com", "bad escape"),
        ("sip:a@256.1.1.1", "not an IPv4 address"),
        ("<sip:a@b>", "no scheme"),
    ],
)
def test_bad_uris_name_the_fault(bad, fault):
    with pytest.raises(SipParseError, match=fault):
        parse_uri(bad, "Request-URI")


def test_addresses_name_addr_and_addr_spec():
    a = Address.parse('"Mr. \\"Quoted\\"" <sip:q@example.com;transport=udp>;tag=abc;x="y z"')
    assert a.display_name == 'Mr. "Quoted"' and a.tag == "abc" and a.params.get_unquoted("x") == "y z"
    assert a.uri.params == [("transport", "udp")]
    b = Address.parse("sip:bob@example.com;tag=xyz")  # addr-spec: the ;tag belongs to the header
    assert b.tag == "xyz" and b.uri.params == []
    c = Address.parse("token1 token2 <sip:c@example.com>")
    assert c.display_name == "token1 token2"
    assert str(Address.parse("<tel:+8112345>;tag=1")) == "<tel:+8112345>;tag=1"


@pytest.mark.parametrize(
    "bad, fault",
    [
        ('"unterminated <sip:a@b>', "unterminated quoted string"),
        ("Bell, Alexander <sip:a@b>", "character ',' in an unquoted display name"),
        ("< sip:a@b >", "whitespace inside"),
        ("<sip:a@b", "without a closing"),
        ("sip:a@b?subject=x", "not enclosed in <...>"),
        ("<sip:a@b>;;tag=1", "empty parameter"),
        ("<sip:a@b>;tag=", "empty value"),
        ("<sip:a@b> junk", "unexpected"),
    ],
)
def test_bad_addresses_name_the_fault(bad, fault):
    with pytest.raises(SipParseError, match=fault):
        Address.parse(bad, "To")


def test_via_parsing_with_lws_ipv6_and_params():
    via = Via.parse(
        "SIP / 2.0 / udp  [2001:db8::9]:5080 ; branch = z9hG4bKabc ; rport=5090;received=2001:db8::1;maddr=10.0.0.1"
    )
    assert via.transport == "UDP" and via.host == "2001:db8::9" and via.port == 5080
    assert via.branch == "z9hG4bKabc" and via.rport == 5090 and via.received == "2001:db8::1"
    assert via.maddr == "10.0.0.1" and via.has_rfc3261_branch
    assert not Via.parse("SIP/2.0/UDP h;branch=z9hG4bK").has_rfc3261_branch
    assert str(Via.parse("SIP/2.0/TCP h:5;branch=z9hG4bK1;rport")) == "SIP/2.0/TCP h:5;branch=z9hG4bK1;rport"
    for bad, fault in [
        ("SIP/2.0/UDP", "whitespace before the sent-by"),
        ("SIP/2.0 UDP h", "'/'"),
        ("SIP/2.0/UDP h;rport=x", "bad rport"),
        ("SIP/2.0/UDP h:0x1", "unexpected"),
    ]:
        with pytest.raises(SipParseError, match=fault):
            Via.parse(bad)


def request_with(
    *, start: str = "OPTIONS sip:a@b SIP/2.0", drop: tuple[str, ...] = (), add: str = "", body: str = ""
) -> bytes:
    headers = {
        "Via": "SIP/2.0/UDP h;branch=z9hG4bKx",
        "From": "<sip:c@d>;tag=1",
        "To": "<sip:a@b>",
        "Call-ID": "abc",
        "CSeq": "1 OPTIONS",
        "Max-Forwards": "70",
    }
    lines = [start] + [f"{k}: {v}" for k, v in headers.items() if k not in drop] + ([add] if add else [])
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


@pytest.mark.parametrize(
    "data, status, fault",
    [
        (request_with(drop=("Call-ID",)), 400, "missing Call-ID"),
        (request_with(start="OPTIONS sip:a@b SIP/3.0"), 505, "version SIP/3.0"),
        (request_with(start="OPTIONS  sip:a@b SIP/2.0"), 400, "single spaces"),
        (request_with(start="OPTIONS sip:a@b?x=y SIP/2.0"), 400, "must not contain headers"),
        (request_with(add="CSeq: 2 OPTIONS"), 400, "CSeq appears 2 times"),
        (request_with(add="Max-Forwards: 256", drop=("Max-Forwards",)), 400, "Max-Forwards"),
        (request_with(add="Content-Length: 10", body="short"), 400, "exceeds the 5 bytes"),
        (request_with(add="Content-Length: -1"), 400, "Content-Length"),
        (request_with(add="Expires: 99999999999"), 400, "Expires"),
        (request_with(add="Date: Fri, 01 Jan 2010 16:00:00 EST"), 400, "GMT"),
        (request_with(add="NoColonHere"), 400, "no colon"),
        (request_with(add="Bad Name: x"), 400, "not a valid header name"),
        (request_with(start="INVITE sip:a@b SIP/2.0"), 400, "does not match"),
        (b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h", 400, "no blank line"),
    ],
)
def test_malformed_requests_raise_sip_parse_error_naming_the_fault(data, status, fault):
    with pytest.raises(SipParseError, match=fault) as info:
        parse_message(data)
    assert info.value.status == status


def test_body_longer_than_content_length_is_cut_and_missing_length_takes_the_rest():
    msg = parse_message(request_with(add="Content-Type: text/plain\r\nContent-Length: 3", body="abcdef"))
    assert msg.body == b"abc"
    msg = parse_message(request_with(add="Content-Type: text/plain", body="abcdef"))
    assert msg.body == b"abcdef"


def test_oversized_messages_are_refused_with_513():
    data = request_with(add="X-Pad: " + "a" * 2000)
    with pytest.raises(SipParseError) as info:
        parse_message(data, max_size=1024)
    assert info.value.status == 513
    assert parse_message(data).headers.get("X-Pad") == "a" * 2000


def test_parses_responses():
    text = crlf(
        "SIP/2.0 180 Ringing\nVia: SIP/2.0/UDP h;branch=z9hG4bKx\nFrom: <sip:c@d>;tag=1\n"
        "To: <sip:a@b>;tag=2\nCall-ID: abc\nCSeq: 1 INVITE\n\n"
    )
    msg = parse_message(text)
    assert isinstance(msg, Response) and msg.status == 180 and msg.reason == "Ringing"
    with pytest.raises(SipParseError, match="not a status code"):
        parse_message(text.replace(b"180", b"1800"))


def test_make_response_copies_the_dialog_headers_and_adds_a_tag():
    request = parse_message(INVITE.encode())
    response = make_response(request, 200, to_tag="t1", headers={"Contact": "<sip:me@h>"})
    assert response.headers.get_all("Via") == request.headers.get_all("Via")
    assert response.to_addr.tag == "t1" and response.from_addr.tag == "1928301774"
    assert response.cseq == request.cseq and response.headers.get("Contact") == "<sip:me@h>"
    assert make_response(request, 100, to_tag="t1").to_addr.tag is None


def test_stateless_response_for_unparsable_requests():
    data = request_with(add="CSeq: 2 OPTIONS")
    salvage = stateless_response(data, 400, "Bad Request (CSeq appears twice)")
    assert salvage is not None
    response, via = salvage
    assert response.status == 400 and via.host == "h" and response.to_addr.tag
    assert stateless_response(b"\x00\x01garbage", 400, "x") is None
    assert stateless_response(b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP h\r\n\r\n", 400, "x") is None
    assert stateless_response(request_with(start="ACK sip:a@b SIP/2.0", drop=("Call-ID",)), 400, "x") is None


def test_headers_collection_is_case_insensitive_and_ordered():
    headers = Headers([("Via", "a"), ("X-One", "1"), ("via", "b")])
    assert headers.get_all("VIA") == ["a", "b"] and "x-one" in headers
    headers.set("Via", "c")
    assert list(headers) == [("Via", "c"), ("X-One", "1")]
    headers.remove("x-ONE")
    assert len(headers) == 1


class TestStreamFramer:
    def test_splits_a_stream_by_content_length_and_skips_keepalives(self):
        one = request_with(add="Content-Type: text/plain\r\nContent-Length: 5", body="hello")
        two = request_with(add="Content-Length: 0")
        framer = StreamFramer()
        stream = b"\r\n\r\n" + one + b"\r\n" + two
        out = []
        for i in range(0, len(stream), 7):  # arbitrary segmentation
            out.extend(framer.feed(stream[i : i + 7]))
        assert out == [one, two]
        assert framer.keepalives == 1 and framer.buffered == 0
        assert parse_message(out[0]).body == b"hello"

    def test_content_length_is_required_on_a_stream(self):
        framer = StreamFramer()
        with pytest.raises(SipParseError, match="missing Content-Length"):
            framer.feed(request_with())
        assert framer.error_head is not None and framer.error_head.startswith(b"OPTIONS")

    @pytest.mark.parametrize(
        "add, fault",
        [
            ("Content-Length: 1\r\nl: 1", "more than once"),
            ("Content-Length: -5", "not a non-negative"),
        ],
    )
    def test_bad_lengths(self, add, fault):
        with pytest.raises(SipParseError, match=fault):
            StreamFramer().feed(request_with(add=add))

    def test_oversized_stream_messages(self):
        framer = StreamFramer(max_size=200)
        with pytest.raises(SipParseError) as info:
            framer.feed(request_with(add="Content-Length: 1000"))
        assert info.value.status == 513
        with pytest.raises(SipParseError) as info:
            StreamFramer(max_size=200).feed(b"OPTIONS sip:a@b SIP/2.0\r\nX: " + b"a" * 300)
        assert info.value.status == 513
