"""SRTP/SRTCP through libsrtp and SDES ``a=crypto`` lines (RFC 3711, RFC 4568, RFC 7714)."""

from __future__ import annotations

import base64

import pylibsrtp
import pytest

from sip import g711
from sip.rtcp import ReceiverReport, build_compound, parse_compound
from sip.rtp import RtpPacket
from sip.srtp import (
    SUITES,
    CryptoAttribute,
    CryptoError,
    SrtpAuthFailed,
    SrtpContext,
    SrtpError,
    SrtpKeys,
    SrtpReplayed,
    new_crypto,
)

# RFC 4568 §9.1's example key (30 bytes: master key and salt)
RFC_KEY = "PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR"


def rtp(seq: int, payload: bytes = b"\x55" * 160, ssrc: int = 0x1234) -> bytes:
    return RtpPacket(0, seq & 0xFFFF, seq * 160, ssrc, payload).build()


def pair(suite: str) -> tuple[SrtpContext, SrtpContext]:
    """Two ends of one call: each sends with its key and checks the other's."""
    a, b = new_crypto(1, suite), new_crypto(1, suite)
    return (SrtpContext(SrtpKeys(suite, a.key, b.key)), SrtpContext(SrtpKeys(suite, b.key, a.key)))


def test_crypto_line_of_rfc4568_parses_and_round_trips():
    value = f"1 AES_CM_128_HMAC_SHA1_80 inline:{RFC_KEY}|2^20"
    crypto = CryptoAttribute.parse(value)
    assert (crypto.tag, crypto.suite, crypto.lifetime) == (1, "AES_CM_128_HMAC_SHA1_80", 2**20)
    assert crypto.key == base64.b64decode(RFC_KEY) and len(crypto.key) == 30
    assert str(crypto) == value
    assert RFC_KEY not in repr(crypto)  # logs never show key material


@pytest.mark.parametrize(
    "value, fault",
    [
        ("1 AES_CM_128_HMAC_SHA1_80", "expected"),
        ("x AES_CM_128_HMAC_SHA1_80 inline:" + RFC_KEY, "tag"),
        ("1 F8_128_HMAC_SHA1_80 inline:" + RFC_KEY, "not supported"),
        ("1 AES_CM_128_HMAC_SHA1_80 outline:" + RFC_KEY, "inline"),
        ("1 AES_CM_128_HMAC_SHA1_80 inline:" + RFC_KEY + "|1:4", "MKI"),
        ("1 AES_CM_128_HMAC_SHA1_80 inline:" + RFC_KEY + "|2^20|1:4", "MKI"),
        ("1 AES_CM_128_HMAC_SHA1_80 inline:" + RFC_KEY + ";inline:" + RFC_KEY, "more than one key"),
        ("1 AES_CM_128_HMAC_SHA1_80 inline:" + RFC_KEY[:-4], "needs 30 bytes"),
        ("1 AEAD_AES_128_GCM inline:" + RFC_KEY, "needs 28 bytes"),
        ("1 AES_CM_128_HMAC_SHA1_80 inline:" + "!" * 40, "base64"),
        ("1 AES_CM_128_HMAC_SHA1_80 inline:" + RFC_KEY + "|junk", "lifetime"),
        ("1 AES_CM_128_HMAC_SHA1_80 inline:" + RFC_KEY + " UNENCRYPTED_SRTP", "session parameter"),
        ("1 AES_CM_128_HMAC_SHA1_80 inline:" + RFC_KEY + " KDR=3", "session parameter"),
    ],
)
def test_crypto_lines_we_cannot_run_are_refused_with_the_reason(value, fault):
    with pytest.raises(CryptoError, match=fault):
        CryptoAttribute.parse(value)


def test_window_size_hint_and_zero_key_derivation_rate_are_accepted():
    crypto = CryptoAttribute.parse(f"7 AES_CM_128_HMAC_SHA1_32 inline:{RFC_KEY} KDR=0 WSH=2048")
    assert crypto.tag == 7 and crypto.window_size_hint == 2048


@pytest.mark.parametrize("suite", list(SUITES))
def test_each_suite_protects_and_checks_rtp_and_rtcp_both_ways(suite):
    alice, bob = pair(suite)
    plain = RtpPacket(0, 1, 160, 0xAB, g711.encode("PCMU", _tone())).build()
    protected = alice.protect(plain)
    assert len(protected) == len(plain) + SUITES[suite].rtp_overhead
    assert protected[:12] == plain[:12]  # the header stays readable (RFC 3711 §3.1)
    assert protected[12:172] != plain[12:172]  # the payload does not
    assert bob.unprotect(protected) == plain
    report = build_compound([ReceiverReport(0xAB, [])])
    assert parse_compound(alice.unprotect_rtcp(bob.protect_rtcp(report)))[0].ssrc == 0xAB


def _tone():
    import numpy as np

    return (8000 * np.sin(np.arange(160) * 2 * np.pi * 440 / 8000)).astype(np.int16)


def test_encrypted_g711_does_not_decode_back_to_the_audio():
    """What the wire carries under SRTP is not the caller's voice read as G.711."""
    import numpy as np

    alice, _ = pair("AES_CM_128_HMAC_SHA1_80")
    payload = g711.encode("PCMU", _tone())
    wire = alice.protect(RtpPacket(0, 1, 160, 0xAB, payload).build())[12:172]
    heard = g711.decode("PCMU", wire).astype(np.float64)
    assert abs(np.corrcoef(heard, _tone())[0, 1]) < 0.3


@pytest.mark.parametrize("suite", list(SUITES))
def test_replayed_and_tampered_packets_raise_and_the_stream_goes_on(suite):
    alice, bob = pair(suite)
    first = alice.protect(rtp(1))
    assert bob.unprotect(first) == rtp(1)
    with pytest.raises(SrtpReplayed):
        bob.unprotect(first)
    tampered = bytearray(alice.protect(rtp(2)))
    tampered[20] ^= 0x01
    with pytest.raises(SrtpAuthFailed):
        bob.unprotect(bytes(tampered))
    assert bob.unprotect(alice.protect(rtp(3))) == rtp(3)  # the stream goes on
    rtcp = alice.protect_rtcp(build_compound([ReceiverReport(0xAB, [])]))
    bob.unprotect_rtcp(rtcp)
    with pytest.raises(SrtpReplayed):
        bob.unprotect_rtcp(rtcp)


def test_a_packet_under_another_key_or_a_plain_one_fails_authentication():
    alice, bob = pair("AES_CM_128_HMAC_SHA1_80")
    stranger, _ = pair("AES_CM_128_HMAC_SHA1_80")
    with pytest.raises(SrtpAuthFailed):
        bob.unprotect(stranger.protect(rtp(1)))
    with pytest.raises(SrtpAuthFailed):
        bob.unprotect(rtp(2))  # plain RTP: its last bytes are no tag
    with pytest.raises(SrtpError):
        bob.unprotect(b"\x80")  # too short for a header
    assert bob.unprotect(alice.protect(rtp(3))) == rtp(3)  # no state was created for them


def test_rekey_checks_the_peers_packets_under_both_keys_until_the_new_one_is_used():
    suite = "AES_CM_128_HMAC_SHA1_80"
    ours, theirs_old, theirs_new = (new_crypto(1, suite) for _ in range(3))
    we = SrtpContext(SrtpKeys(suite, ours.key, theirs_old.key))
    old_sender = SrtpContext(SrtpKeys(suite, theirs_old.key, ours.key))
    new_sender = SrtpContext(SrtpKeys(suite, theirs_new.key, ours.key))
    assert we.unprotect(old_sender.protect(rtp(1))) == rtp(1)
    in_flight = old_sender.protect(rtp(2))
    rekeyed = we.rekeyed(SrtpKeys(suite, ours.key, theirs_new.key))
    assert rekeyed.unprotect(in_flight) == rtp(2)  # sent before the peer switched
    assert rekeyed.unprotect(new_sender.protect(rtp(3))) == rtp(3)
    with pytest.raises(SrtpAuthFailed):  # once the new key is in use the old one is done
        rekeyed.unprotect(old_sender.protect(rtp(4)))
    # our key did not change: what we send still verifies at the peer's old context
    assert old_sender.unprotect(rekeyed.protect(rtp(5))) == rtp(5)
    assert we.rekeyed(we.keys) is we


def test_an_unchanged_remote_key_keeps_the_replay_window():
    suite = "AES_CM_128_HMAC_SHA1_80"
    alice, bob = pair(suite)
    packet = alice.protect(rtp(1))
    bob.unprotect(packet)
    renewed = bob.rekeyed(SrtpKeys(suite, new_crypto(1, suite).key, bob.keys.remote_key))
    with pytest.raises(SrtpReplayed):
        renewed.unprotect(packet)


def test_oversized_packets_are_an_srtp_error_not_a_crash():
    alice, bob = pair("AES_CM_128_HMAC_SHA1_80")
    with pytest.raises(SrtpError):
        alice.protect(rtp(1, payload=b"\0" * 1500))
    with pytest.raises(SrtpError):
        bob.unprotect(rtp(1, payload=b"\0" * 1500))


def test_new_keys_are_random_and_of_the_suites_length():
    keys = {new_crypto(1, "AEAD_AES_128_GCM").key for _ in range(20)}
    assert len(keys) == 20 and {len(k) for k in keys} == {28}
    assert pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_128_GCM == SUITES["AEAD_AES_128_GCM"].profile


@pytest.mark.parametrize(
    "configured, transport, plaintext, policy",
    [
        ("optional", "TLS", False, "optional"),
        ("required", "TLS", False, "required"),
        ("optional", "UDP", False, "off"),
        ("optional", "TCP", False, "off"),
        ("required", "UDP", False, None),  # no way to take the call: 488
        ("required", "UDP", True, "required"),
        ("optional", "TCP", True, "optional"),
        ("off", "TLS", False, "off"),
    ],
)
def test_the_gateway_exchanges_srtp_keys_only_over_tls(configured, transport, plaintext, policy):
    from service.gateway.ingress.sip import srtp_policy

    assert srtp_policy(configured, transport, plaintext) == policy
