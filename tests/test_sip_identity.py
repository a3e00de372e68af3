"""Caller identity headers (RFC 3323, RFC 3325, Remote-Party-ID, Diversion, History-Info)
and the dialled number, read from INVITEs: what is kept, what privacy withholds, and the
bounds that hold against an attacker's headers."""

from __future__ import annotations

from sip.identity import MAX_ENTRIES, MAX_NUMBER_CHARS, MAX_VALUE_CHARS, CallerIdentity
from sip.message import parse_message


def invite(*headers: str, uri: str = "sip:0501234567@gw.example.com;user=phone") -> CallerIdentity:
    text = (
        f"INVITE {uri} SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1\r\n"
        'From: "Anonymous" <sip:anonymous@anonymous.invalid>;tag=1\r\nTo: <sip:agent@gw.example.com>\r\n'
        "Call-ID: id-1\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\n"
        + "".join(h + "\r\n" for h in headers)
        + "Content-Length: 0\r\n\r\n"
    )
    return CallerIdentity.from_request(parse_message(text.encode()))


def test_the_asserted_identity_is_the_caller_and_the_request_uri_the_dialled_number():
    identity = invite(
        'P-Asserted-Identity: "Yamada Taro" <sip:+81312345678@trunk.example;user=phone>',
        "P-Asserted-Identity: <tel:+81312345678>",
    )
    assert identity.dialled == "0501234567"
    assert identity.caller.number == "+81312345678" and identity.caller.name == "Yamada Taro"
    assert identity.caller_source == "p-asserted-identity" and not identity.withheld
    assert [p.number for p in identity.asserted] == ["+81312345678", "+81312345678"]
    assert CallerIdentity.from_dict(identity.to_dict()) == identity


def test_remote_party_id_is_used_without_pai_and_its_privacy_honoured():
    identity = invite('Remote-Party-ID: "Sato" <sip:0311112222@pbx.example>;party=calling;privacy=full;screen=no')
    assert identity.caller.number == "0311112222" and identity.caller_source == "remote-party-id"
    assert identity.withheld and identity.name_withheld
    named = invite('Remote-Party-ID: "Sato" <sip:0311112222@pbx.example>;party=calling;privacy=name')
    assert not named.withheld and named.name_withheld
    called = invite("Remote-Party-ID: <sip:0399998888@pbx.example>;party=called")
    assert called.remote_party is None and called.caller_source == "from"


def test_privacy_values_withhold_what_they_name():
    pai = "P-Asserted-Identity: <sip:+81312345678@trunk.example>"
    redirect = "History-Info: <sip:0312340000@pbx.example>;index=1"
    assert not invite(pai, "Privacy: none").withheld
    assert invite(pai, "Privacy: id").withheld
    assert invite(pai, "Privacy: user; session").withheld
    withheld = invite(pai, redirect, "Privacy: header;id")
    assert withheld.withheld and withheld.redirects_withheld
    history = invite(pai, redirect, "Privacy: history")
    assert history.redirects_withheld and not history.withheld
    assert invite(pai, "Privacy: ID").privacy == ("id",)


def test_diversion_and_history_info_are_kept_in_order_with_their_reason():
    identity = invite(
        "Diversion: <sip:0312340000@pbx.example>;reason=unconditional;counter=1, "
        "<sip:0312340001@pbx.example>;reason=no-answer",
        "History-Info: <sip:0312340000@pbx.example>;index=1,<sip:0501234567@gw.example.com>;index=1.1",
    )
    assert [(p.number, p.params["reason"]) for p in identity.diversion] == [
        ("0312340000", "unconditional"),
        ("0312340001", "no-answer"),
    ]
    assert [p.params["index"] for p in identity.history_info] == ["1", "1.1"]


def test_attacker_sized_and_malformed_headers_are_bounded_and_never_raise():
    huge_user = "9" * 5000
    identity = invite(
        f'P-Asserted-Identity: "{"名" * 3000}" <sip:{huge_user}@x.example>',
        "Diversion: " + ", ".join(f"<sip:{i}@x.example>" for i in range(50)),
        "History-Info: <<<not an address>>>; \x01\x02",
        "Privacy: " + ";".join(["id"] * 100),
        uri=f"sip:{huge_user}@gw.example.com",
    )
    assert identity.truncated
    assert len(identity.dialled) <= MAX_NUMBER_CHARS and len(identity.caller.number) <= MAX_NUMBER_CHARS
    assert len(identity.asserted[0].name) <= MAX_VALUE_CHARS and len(identity.asserted[0].uri) <= MAX_VALUE_CHARS
    assert len(identity.diversion) == MAX_ENTRIES and len(identity.privacy) <= MAX_ENTRIES
    [garbled] = identity.history_info
    assert garbled.number == "" and all(c.isprintable() for c in garbled.uri)
    assert len(str(identity.to_dict())) < 20_000
