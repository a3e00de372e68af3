"""Digest authentication (RFC 2617 / RFC 8760) for the UAC."""

from __future__ import annotations

import pytest

from sip.auth import DigestChallenge, authorization, digest_response, parse_auth_params
from sip.errors import SipParseError

RFC2617_CHALLENGE = (
    'Digest realm="testrealm@host.com", qop="auth,auth-int", '
    'nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", opaque="5ccc069c403ebaf9f0171e9517f40e41"'
)


def test_rfc2617_example_response():
    challenge = DigestChallenge.parse(RFC2617_CHALLENGE)
    assert challenge.qop == ["auth", "auth-int"] and challenge.algorithm == "MD5"
    header = authorization(
        challenge, method="GET", uri="/dir/index.html", username="Mufasa", password="Circle Of Life", cnonce="0a4f113b"
    )
    scheme, params = parse_auth_params(header, "Authorization")
    assert scheme == "Digest"
    assert params["response"] == "6629fae49393a05397450978507c4ef1"
    assert params["qop"] == "auth" and params["nc"] == "00000001" and params["opaque"] == challenge.opaque


def test_rfc2069_style_without_qop():
    challenge = DigestChallenge.parse('Digest realm="biloxi.com", nonce="abc"')
    # MD5(MD5(bob:biloxi.com:zanzibar):abc:MD5(INVITE:sip:bob@biloxi.com)), computed independently:
    import hashlib

    def h(s: str) -> str:
        return hashlib.md5(s.encode()).hexdigest()

    expected = h(f"{h('bob:biloxi.com:zanzibar')}:abc:{h('INVITE:sip:bob@biloxi.com')}")
    assert (
        digest_response(challenge, method="INVITE", uri="sip:bob@biloxi.com", username="bob", password="zanzibar")
        == expected
    )
    assert "qop" not in authorization(
        challenge, method="INVITE", uri="sip:bob@biloxi.com", username="bob", password="zanzibar"
    )


def test_sha256_and_unsupported_challenges():
    challenge = DigestChallenge.parse('Digest realm="r", nonce="n", algorithm=SHA-256, qop="auth", stale=TRUE')
    assert challenge.supported and challenge.stale
    assert (
        len(
            parse_auth_params(
                authorization(challenge, method="BYE", uri="sip:a@b", username="u", password="p"), "Authorization"
            )[1]["response"]
        )
        == 64
    )
    assert not DigestChallenge.parse('Digest realm="r", nonce="n", algorithm=AKAv1-MD5').supported
    with pytest.raises(SipParseError, match="not Digest"):
        DigestChallenge.parse('Basic realm="r"')
    with pytest.raises(SipParseError, match="realm and nonce"):
        DigestChallenge.parse('Digest realm="r"')
