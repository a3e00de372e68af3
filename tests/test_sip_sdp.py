"""SDP parsing, serialisation and offer/answer (RFC 4566, RFC 3264)."""

from __future__ import annotations

import base64

import pytest

from sip.sdp import (
    EncryptionMismatch,
    MediaPreferences,
    NoCommonCodec,
    SdpError,
    SessionDescription,
    answer_offer,
    build_offer,
    negotiated_as_answerer,
    negotiated_from_answer,
    reanswer,
)
from sip.srtp import DEFAULT_SUITES, CryptoAttribute, SrtpKeys

OFFER = """v=0
o=alice 2890844526 2890844526 IN IP4 198.51.100.1
s=call
i=a session
c=IN IP4 198.51.100.1
b=AS:64
t=0 0
a=tool:softphone
m=audio 49170 RTP/AVP 8 0 96 101
a=rtpmap:96 opus/48000/2
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-15
a=ptime:30
a=x-unknown:keep me
m=video 51372 RTP/AVP 31
a=rtpmap:31 H261/90000
"""


def sdp(text: str) -> SessionDescription:
    return SessionDescription.parse(text.replace("\n", "\r\n"))


def test_parse_keeps_every_line_and_round_trips():
    parsed = sdp(OFFER)
    assert parsed.origin.username == "alice" and parsed.origin.session_version == 2890844526
    assert parsed.connection.address == "198.51.100.1"
    audio = parsed.media[0]
    assert audio.formats == ["8", "0", "96", "101"] and audio.ptime == 30
    assert audio.rtpmaps()[8].encoding == "PCMA" and audio.rtpmaps()[96].channels == 2
    assert audio.fmtp(101) == "0-15" and audio.attribute("x-unknown") == "keep me"
    assert str(parsed) == OFFER.replace("\n", "\r\n")
    assert SessionDescription.parse(parsed.to_bytes()) == parsed


@pytest.mark.parametrize(
    "text, fault",
    [
        ("", "empty"),
        ("o=x 1 1 IN IP4 h\n", "v=0"),
        ("v=0\ns=-\n", "missing o="),
        ("v=0\no=x 1 IN IP4 h\n", "6 fields"),
        ("v=0\no=x 1 1 IN IP4 h\nm=audio x RTP/AVP 0\n", "bad port"),
        ("v=0\no=x 1 1 IN IP4 h\nm =video 1 RTP/AVP 0\n", "not 'x=value'"),
        ("v=0\no=x 1 1 IN IP4 h\nc=IN IP4\n", "c="),
    ],
)
def test_malformed_sdp_raises_sdp_error(text, fault):
    with pytest.raises(SdpError, match=fault):
        SessionDescription.parse(text)


def test_answer_picks_our_first_preferred_codec_mirrors_dtmf_and_rejects_other_streams():
    answer, media = answer_offer(
        sdp(OFFER), MediaPreferences(codecs=["PCMU", "PCMA"], order="ours"), "192.0.2.10", 40000
    )
    audio, video = answer.media
    assert audio.port == 40000 and audio.formats == ["0", "101"]
    assert audio.fmtp(101) == "0-15" and audio.ptime == 30 and audio.direction == "sendrecv"
    assert video.port == 0 and video.formats == ["31"]
    assert answer.connection.address == "192.0.2.10" and answer.timing == ["0 0"]
    assert (media.codec, media.payload_type, media.clock_rate, media.dtmf_payload_type) == ("PCMU", 0, 8000, 101)
    assert (media.remote_address, media.remote_port, media.remote_rtcp_port) == ("198.51.100.1", 49170, 49171)
    assert media.sends and media.receives
    SessionDescription.parse(str(answer))  # our answer parses


def test_answer_in_offerer_order_when_asked():
    _, media = answer_offer(sdp(OFFER), MediaPreferences(order="offerer"), "192.0.2.10", 40000)
    assert media.codec == "PCMA" and media.payload_type == 8


def test_ptime_out_of_range_falls_back_to_20_and_no_dtmf_when_not_offered():
    offer = sdp("v=0\no=- 1 1 IN IP4 h\ns=-\nc=IN IP4 10.0.0.1\nt=0 0\nm=audio 5000 RTP/AVP 0\na=ptime:60\n")
    answer, media = answer_offer(offer, MediaPreferences(), "10.0.0.2", 6000)
    assert media.ptime == 20 and media.dtmf_payload_type is None and answer.media[0].formats == ["0"]


@pytest.mark.parametrize(
    "offered, answered, ours",
    [
        ("sendonly", "recvonly", "recvonly"),
        ("recvonly", "sendonly", "sendonly"),
        ("inactive", "inactive", "inactive"),
        ("sendrecv", "sendrecv", "sendrecv"),
    ],
)
def test_direction_is_answered_per_rfc3264(offered, answered, ours):
    offer = sdp(f"v=0\no=- 1 1 IN IP4 h\ns=-\nc=IN IP4 10.0.0.1\nt=0 0\nm=audio 5000 RTP/AVP 0\na={offered}\n")
    answer, media = answer_offer(offer, MediaPreferences(), "10.0.0.2", 6000)
    assert answer.media[0].direction == answered and media.direction == ours


def test_connection_zero_is_old_style_hold():
    offer = sdp("v=0\no=- 1 2 IN IP4 h\ns=-\nc=IN IP4 0.0.0.0\nt=0 0\nm=audio 5000 RTP/AVP 0\n")
    answer, media = answer_offer(offer, MediaPreferences(), "10.0.0.2", 6000)
    assert media.remote_address is None and not media.sends
    assert answer.media[0].direction == "recvonly"


def test_session_level_direction_and_media_level_connection():
    offer = sdp("v=0\no=- 1 2 IN IP4 h\ns=-\nt=0 0\na=sendonly\nm=audio 5000 RTP/AVP 8\nc=IN IP4 10.9.9.9\n")
    _, media = answer_offer(offer, MediaPreferences(), "10.0.0.2", 6000)
    assert media.direction == "recvonly" and media.remote_address == "10.9.9.9" and media.codec == "PCMA"


@pytest.mark.parametrize(
    "offer",
    [
        "v=0\no=- 1 1 IN IP4 h\ns=-\nc=IN IP4 1.2.3.4\nt=0 0\nm=audio 5000 RTP/AVP 18 3\n",
        "v=0\no=- 1 1 IN IP4 h\ns=-\nc=IN IP4 1.2.3.4\nt=0 0\nm=audio 0 RTP/AVP 0\n",
        "v=0\no=- 1 1 IN IP4 h\ns=-\nc=IN IP4 1.2.3.4\nt=0 0\nm=audio 5000 RTP/SAVP 0\n",
        "v=0\no=- 1 1 IN IP4 h\ns=-\nc=IN IP4 1.2.3.4\nt=0 0\nm=video 5000 RTP/AVP 31\n",
        "v=0\no=- 1 1 IN IP4 h\ns=-\nc=IN IP4 1.2.3.4\nt=0 0\nm=audio 5000 RTP/AVP 96\na=rtpmap:96 PCMU/16000\n",
    ],
)
def test_no_common_codec(offer):
    with pytest.raises(NoCommonCodec):
        answer_offer(sdp(offer), MediaPreferences(), "10.0.0.2", 6000)


def test_build_offer_and_read_the_answer():
    offer = build_offer(MediaPreferences(codecs=["PCMA", "PCMU"]), "192.0.2.20", 30000)
    audio = offer.media[0]
    assert audio.formats == ["8", "0", "101"] and audio.fmtp(101) == "0-16" and audio.direction == "sendrecv"
    answer, _ = answer_offer(
        SessionDescription.parse(str(offer)), MediaPreferences(codecs=["PCMU"]), "192.0.2.30", 31000
    )
    media = negotiated_from_answer(offer, answer)
    assert (media.codec, media.remote_address, media.remote_port, media.dtmf_payload_type) == (
        "PCMU",
        "192.0.2.30",
        31000,
        101,
    )
    bogus = sdp("v=0\no=- 1 1 IN IP4 h\ns=-\nc=IN IP4 1.2.3.4\nt=0 0\nm=audio 5000 RTP/AVP 18\n")
    with pytest.raises(SdpError, match="not offered"):
        negotiated_from_answer(offer, bogus)


def test_reanswer_mirrors_hold_and_bumps_version_only_on_change():
    offer = sdp(OFFER)
    first, _ = answer_offer(offer, MediaPreferences(), "192.0.2.10", 40000)
    same, media = reanswer(first, offer)
    assert str(same) == str(first) and media.direction == "sendrecv"
    hold = offer.copy()
    hold.media[0].set_direction("sendonly")
    held, media = reanswer(first, hold)
    assert held.media[0].direction == "recvonly" and media.direction == "recvonly"
    assert held.origin.session_version == first.origin.session_version + 1
    assert held.media[0].port == 40000 and held.media[0].formats == first.media[0].formats
    assert negotiated_as_answerer(hold, held) == media


def test_reanswer_without_the_previous_codec_is_no_common_codec():
    first, _ = answer_offer(sdp(OFFER), MediaPreferences(), "192.0.2.10", 40000)
    pcma_only = sdp("v=0\no=- 1 1 IN IP4 h\ns=-\nc=IN IP4 1.2.3.4\nt=0 0\nm=audio 5000 RTP/AVP 8\n")
    with pytest.raises(NoCommonCodec):
        reanswer(first, pcma_only)


# -- codec choice and wideband ---------------------------------------------------------------


def audio_offer(formats: str, *lines: str, ptime: int | None = None) -> SessionDescription:
    body = "v=0\no=- 1 1 IN IP4 h\ns=-\nc=IN IP4 10.0.0.1\nt=0 0\n" + f"m=audio 5000 RTP/AVP {formats}\n"
    body += "".join(f"a={line}\n" for line in lines) + (f"a=ptime:{ptime}\n" if ptime else "")
    return sdp(body)


OPUS_MAP = "rtpmap:111 opus/48000/2"


@pytest.mark.parametrize(
    "formats, lines, chosen",
    [
        ("0 8 9 111", [OPUS_MAP], "opus"),  # the best audio, wherever it stands in the offer
        ("111 9 0", [OPUS_MAP], "opus"),
        ("0 8 9", [], "G722"),
        ("8 9 0", [], "G722"),
        ("8 0", [], "PCMA"),  # equals: the offer's order
        ("0 8", [], "PCMU"),
    ],
)
def test_default_prefers_the_best_audio_then_the_offers_order(formats, lines, chosen):
    _, media = answer_offer(audio_offer(formats, *lines), MediaPreferences(), "10.0.0.2", 6000)
    assert media.codec == chosen


def test_a_configured_order_overrides_quality():
    prefs = MediaPreferences(codecs=["PCMA", "G722"], order="ours")
    _, media = answer_offer(audio_offer("111 9 0 8", OPUS_MAP), prefs, "10.0.0.2", 6000)
    assert media.codec == "PCMA"
    _, media = answer_offer(audio_offer("111 9 0", OPUS_MAP), prefs, "10.0.0.2", 6000)
    assert media.codec == "G722"
    with pytest.raises(NoCommonCodec):
        answer_offer(audio_offer("111 0", OPUS_MAP), prefs, "10.0.0.2", 6000)


def test_g722_is_answered_on_its_8000_hz_rtp_clock():
    answer, media = answer_offer(
        audio_offer("9 0 101", "rtpmap:101 telephone-event/8000"), MediaPreferences(), "10.0.0.2", 6000
    )
    assert (media.codec, media.payload_type, media.clock_rate, media.dtmf_payload_type) == ("G722", 9, 8000, 101)
    assert "a=rtpmap:9 G722/8000" in str(answer) and answer.media[0].formats == ["9", "101"]


def test_opus_answer_has_rtpmap_fmtp_ptime_and_the_matching_telephone_event():
    offer = audio_offer(
        "111 0 101 110",
        OPUS_MAP,
        "fmtp:111 useinbandfec=1;maxaveragebitrate=20000",
        "rtpmap:101 telephone-event/8000",
        "rtpmap:110 telephone-event/48000",
        ptime=30,
    )
    answer, media = answer_offer(offer, MediaPreferences(), "10.0.0.2", 6000)
    audio = answer.media[0]
    assert audio.formats == ["111", "110"]
    assert audio.rtpmaps()[111].encoding == "opus" and audio.rtpmaps()[111].clock_rate == 48000
    assert audio.rtpmaps()[111].channels == 2
    assert "maxplaybackrate=24000" in audio.fmtp(111) and "stereo=0" in audio.fmtp(111)
    assert audio.ptime == 20  # 30 ms is no Opus frame size
    assert (media.codec, media.clock_rate, media.ptime) == ("opus", 48000, 20)
    assert (media.dtmf_payload_type, media.dtmf_clock_rate) == (110, 48000)
    assert media.fmtp == "useinbandfec=1;maxaveragebitrate=20000"
    SessionDescription.parse(str(answer))


@pytest.mark.parametrize(
    "lines, chosen",
    [
        (["rtpmap:111 opus/8000/2"], "PCMU"),  # a wrong clock rate is not Opus
        (["rtpmap:111 opus/48000/2", "fmtp:111 ;;==;maxaveragebitrate=x;stereo=7;\x00"], "opus"),  # odd fmtp
        (["rtpmap:111 opus/48000"], "opus"),  # channels left out, as many stacks write it
        (["rtpmap:111 opus/48000/6"], "PCMU"),
        (["rtpmap:9 G722/16000"], "PCMU"),  # G.722 on a 16 kHz clock is not RFC 3551's
        (["rtpmap:111 opus/48000/2", "rtpmap:111 opus/abc/2"], "opus"),  # a malformed second rtpmap is ignored
    ],
)
def test_malformed_codec_entries_fall_back(lines, chosen):
    _, media = answer_offer(
        audio_offer("111 9 0" if "9 " in " ".join(lines) else "111 0", *lines), MediaPreferences(), "10.0.0.2", 6000
    )
    assert media.codec == chosen


@pytest.mark.parametrize(
    "offer",
    [
        "m=audio 5000 RTP/AVP 111\na=rtpmap:111 opus/16000/2\n",
        "m=audio 5000 RTP/AVP 9\na=rtpmap:9 G722/16000\n",
        "m=audio 5000 RTP/AVP 300\na=rtpmap:300 PCMU/8000\n",
    ],
)
def test_nothing_usable_is_no_common_codec(offer):
    with pytest.raises(NoCommonCodec):
        answer_offer(
            sdp("v=0\no=- 1 1 IN IP4 h\ns=-\nc=IN IP4 1.2.3.4\nt=0 0\n" + offer), MediaPreferences(), "10.0.0.2", 6000
        )


def test_offer_with_opus_and_g722_and_the_answer_read_back():
    offer = build_offer(MediaPreferences(codecs=["opus", "G722", "PCMU"]), "192.0.2.20", 30000)
    audio = offer.media[0]
    assert audio.formats == ["96", "9", "0", "101"]
    assert str(audio.rtpmaps()[96]) == "96 opus/48000/2" and audio.fmtp(96).startswith("maxplaybackrate=")
    answer, ours = answer_offer(SessionDescription.parse(str(offer)), MediaPreferences(), "192.0.2.30", 31000)
    theirs = negotiated_from_answer(offer, answer)
    assert (ours.codec, theirs.codec, theirs.payload_type, theirs.clock_rate) == ("opus", "opus", 96, 48000)
    assert theirs.fmtp == audio.fmtp(96).replace("96 ", "") or theirs.fmtp.startswith("maxplaybackrate")


def test_reanswer_keeps_opus_and_its_fmtp():
    offer = audio_offer("111 0", OPUS_MAP)
    first, media = answer_offer(offer, MediaPreferences(), "10.0.0.2", 6000)
    again, media_again = reanswer(first, offer)
    assert str(again) == str(first) and media_again == media


def test_the_answers_telephone_event_type_is_the_one_used_both_ways():
    """A peer that answers telephone-event on another dynamic type (96 for our 101): we send
    and receive digits on 96, at its clock."""
    offer = build_offer(MediaPreferences(codecs=["PCMU"]), "192.0.2.20", 30000)
    answer = sdp(
        "v=0\no=- 1 1 IN IP4 h\ns=-\nc=IN IP4 192.0.2.30\nt=0 0\nm=audio 31000 RTP/AVP 0 96\n"
        "a=rtpmap:96 telephone-event/8000\na=fmtp:96 0-15\n"
    )
    media = negotiated_from_answer(offer, answer)
    assert (media.codec, media.dtmf_payload_type, media.dtmf_clock_rate) == ("PCMU", 96, 8000)


# -- SDES-SRTP (RFC 4568) ----------------------------------------------------------------------

KEY_80 = "PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR"
KEY_GCM = "MTIzNDU2Nzg5MDEyMzQ1Njc4OTAxMjM0NTY3OA"  # 28 bytes


def srtp_offer(*crypto: str, proto: str = "RTP/SAVP", extra: str = "") -> SessionDescription:
    lines = "".join(f"a=crypto:{c}\n" for c in crypto)
    return sdp(
        "v=0\no=- 1 1 IN IP4 198.51.100.1\ns=-\nc=IN IP4 198.51.100.1\nt=0 0\n"
        f"m=audio 5000 {proto} 0 101\na=rtpmap:101 telephone-event/8000\n{lines}{extra}"
    )


def test_an_srtp_offer_is_answered_with_the_first_usable_crypto_line_and_a_fresh_key():
    offer = srtp_offer(
        f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY_80}|1:4",  # MKI: passed over
        "2 F8_128_HMAC_SHA1_80 inline:" + KEY_80,  # unknown suite
        f"3 AEAD_AES_128_GCM inline:{KEY_GCM}",
        f"4 AES_CM_128_HMAC_SHA1_32 inline:{KEY_80}",
    )
    answer, media = answer_offer(offer, MediaPreferences(codecs=["PCMU"], srtp="optional"), "192.0.2.10", 40000)
    audio = answer.media[0]
    assert audio.proto == "RTP/SAVP"
    [line] = audio.attribute_values("crypto")
    ours = CryptoAttribute.parse(line)
    assert (ours.tag, ours.suite) == (3, "AEAD_AES_128_GCM")
    assert media.srtp == SrtpKeys("AEAD_AES_128_GCM", ours.key, base64.b64decode(KEY_GCM + "=="))
    again, _ = answer_offer(offer, MediaPreferences(codecs=["PCMU"], srtp="optional"), "192.0.2.10", 40000)
    assert CryptoAttribute.parse(again.media[0].attribute_values("crypto")[0]).key != ours.key
    assert negotiated_as_answerer(offer, answer) == media


@pytest.mark.parametrize(
    "policy, proto, answered",
    [
        ("off", "RTP/AVP", "RTP/AVP"),
        ("off", "RTP/SAVP", None),
        ("optional", "RTP/AVP", "RTP/AVP"),
        ("optional", "RTP/SAVP", "RTP/SAVP"),
        ("required", "RTP/AVP", None),
        ("required", "RTP/SAVP", "RTP/SAVP"),
        ("optional", "RTP/SAVPF", None),
        ("optional", "UDP/TLS/RTP/SAVP", None),
    ],
)
def test_the_srtp_policy_decides_which_offers_are_answered(policy, proto, answered):
    offer = srtp_offer(f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY_80}", proto=proto)
    prefs = MediaPreferences(codecs=["PCMU"], srtp=policy)
    if answered is None:
        with pytest.raises(EncryptionMismatch):
            answer_offer(offer, prefs, "192.0.2.10", 40000)
        return
    answer, media = answer_offer(offer, prefs, "192.0.2.10", 40000)
    assert answer.media[0].proto == answered
    assert (media.srtp is not None) == (answered == "RTP/SAVP")
    if answered == "RTP/AVP":
        assert not answer.media[0].attribute_values("crypto")  # a=crypto in RTP/AVP means nothing


def test_an_srtp_stream_we_cannot_run_falls_to_the_plain_alternative_when_optional():
    offer = sdp(
        "v=0\no=- 1 1 IN IP4 198.51.100.1\ns=-\nc=IN IP4 198.51.100.1\nt=0 0\n"
        f"m=audio 5000 RTP/SAVP 0\na=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:{KEY_80}|1:4\n"
        "m=audio 5002 RTP/AVP 0\n"
    )
    answer, media = answer_offer(offer, MediaPreferences(codecs=["PCMU"], srtp="optional"), "192.0.2.10", 40000)
    assert [m.port for m in answer.media] == [0, 40000] and media.srtp is None and media.remote_port == 5002
    with pytest.raises(EncryptionMismatch, match="MKI"):
        answer_offer(offer, MediaPreferences(codecs=["PCMU"], srtp="required"), "192.0.2.10", 40000)
    plain_codec_mismatch = srtp_offer(f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY_80}").copy()
    with pytest.raises(NoCommonCodec) as caught:
        answer_offer(plain_codec_mismatch, MediaPreferences(codecs=["PCMA"], srtp="required"), "h", 1)
    assert not isinstance(caught.value, EncryptionMismatch)  # the codec, not the encryption


def test_our_srtp_offer_and_the_answer_to_it_agree_on_keys_both_ways():
    prefs = MediaPreferences(codecs=["PCMU"], srtp="required")
    offer = build_offer(prefs, "192.0.2.20", 30000)
    audio = offer.media[0]
    lines = [CryptoAttribute.parse(v) for v in audio.attribute_values("crypto")]
    assert audio.proto == "RTP/SAVP" and [c.suite for c in lines] == list(DEFAULT_SUITES)
    assert [c.tag for c in lines] == [1, 2, 3]
    answer, answered = answer_offer(SessionDescription.parse(str(offer)), prefs, "192.0.2.30", 31000)
    ours = negotiated_from_answer(offer, answer)
    assert ours.srtp.local_key == answered.srtp.remote_key and ours.srtp.remote_key == answered.srtp.local_key
    assert ours.srtp.suite == "AES_CM_128_HMAC_SHA1_80"
    assert build_offer(MediaPreferences(codecs=["PCMU"]), "h", 1).media[0].proto == "RTP/AVP"


@pytest.mark.parametrize(
    "change, fault",
    [
        (lambda a: a.replace("a=crypto:1 ", "a=crypto:9 "), "tag 9 was not offered"),
        (lambda a: a.replace("a=crypto:1 AES_CM_128_HMAC_SHA1_80", "a=crypto:1 AES_CM_128_HMAC_SHA1_32"), "we offered"),
        (lambda a: a.replace("RTP/SAVP", "RTP/AVP"), "not the offer's"),
        (lambda a: "\r\n".join(line for line in a.split("\r\n") if "crypto" not in line), "0 a=crypto lines"),
    ],
)
def test_an_answer_that_does_not_match_our_srtp_offer_is_refused(change, fault):
    prefs = MediaPreferences(codecs=["PCMU"], srtp="required")
    offer = build_offer(prefs, "192.0.2.20", 30000)
    answer, _ = answer_offer(SessionDescription.parse(str(offer)), prefs, "192.0.2.30", 31000)
    with pytest.raises(SdpError, match=fault):
        negotiated_from_answer(offer, SessionDescription.parse(change(str(answer))))


def test_a_reoffer_keeps_our_key_unless_the_peer_rekeys_and_may_not_drop_srtp():
    offer = srtp_offer(f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY_80}")
    first, media = answer_offer(offer, MediaPreferences(codecs=["PCMU"], srtp="optional"), "192.0.2.10", 40000)
    same, again = reanswer(first, offer, srtp=media.srtp)
    assert str(same) == str(first) and again.srtp == media.srtp  # a refresh changes nothing
    hold = offer.copy()
    hold.media[0].set_direction("sendonly")
    held, held_media = reanswer(first, hold, srtp=media.srtp)
    assert held_media.srtp == media.srtp and held.media[0].direction == "recvonly"
    rekey = srtp_offer(f"2 AEAD_AES_128_GCM inline:{KEY_GCM}")
    rekeyed, new = reanswer(first, rekey, srtp=media.srtp)
    assert new.srtp.suite == "AEAD_AES_128_GCM" and new.srtp.local_key != media.srtp.local_key
    assert CryptoAttribute.parse(rekeyed.media[0].attribute_values("crypto")[0]).tag == 2
    assert rekeyed.origin.session_version == first.origin.session_version + 1
    with pytest.raises(EncryptionMismatch):
        reanswer(first, srtp_offer(proto="RTP/AVP"), srtp=media.srtp)
    plain, _ = answer_offer(srtp_offer(proto="RTP/AVP"), MediaPreferences(codecs=["PCMU"]), "192.0.2.10", 40000)
    with pytest.raises(EncryptionMismatch):  # nor may a plain call turn SRTP by re-INVITE
        reanswer(plain, offer)
