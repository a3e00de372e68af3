"""SDP parsing, serialisation and offer/answer (RFC 4566, RFC 3264)."""

from __future__ import annotations

import pytest

from sip.sdp import (
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


@pytest.mark.parametrize("text, fault", [
    ("", "empty"), ("o=x 1 1 IN IP4 h\n", "v=0"), ("v=0\ns=-\n", "missing o="),
    ("v=0\no=x 1 IN IP4 h\n", "6 fields"), ("v=0\no=x 1 1 IN IP4 h\nm=audio x RTP/AVP 0\n", "bad port"),
    ("v=0\no=x 1 1 IN IP4 h\nm =video 1 RTP/AVP 0\n", "not 'x=value'"), ("v=0\no=x 1 1 IN IP4 h\nc=IN IP4\n", "c="),
])
def test_malformed_sdp_raises_sdp_error(text, fault):
    with pytest.raises(SdpError, match=fault):
        SessionDescription.parse(text)


def test_answer_picks_our_first_preferred_codec_mirrors_dtmf_and_rejects_other_streams():
    answer, media = answer_offer(sdp(OFFER), MediaPreferences(codecs=["PCMU", "PCMA"]), "192.0.2.10", 40000)
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
    _, media = answer_offer(sdp(OFFER), MediaPreferences(offerer_order=True), "192.0.2.10", 40000)
    assert media.codec == "PCMA" and media.payload_type == 8


def test_ptime_out_of_range_falls_back_to_20_and_no_dtmf_when_not_offered():
    offer = sdp("v=0\no=- 1 1 IN IP4 h\ns=-\nc=IN IP4 10.0.0.1\nt=0 0\nm=audio 5000 RTP/AVP 0\na=ptime:60\n")
    answer, media = answer_offer(offer, MediaPreferences(), "10.0.0.2", 6000)
    assert media.ptime == 20 and media.dtmf_payload_type is None and answer.media[0].formats == ["0"]


@pytest.mark.parametrize("offered, answered, ours", [
    ("sendonly", "recvonly", "recvonly"), ("recvonly", "sendonly", "sendonly"),
    ("inactive", "inactive", "inactive"), ("sendrecv", "sendrecv", "sendrecv"),
])
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


@pytest.mark.parametrize("offer", [
    "v=0\no=- 1 1 IN IP4 h\ns=-\nc=IN IP4 1.2.3.4\nt=0 0\nm=audio 5000 RTP/AVP 18 9\n",
    "v=0\no=- 1 1 IN IP4 h\ns=-\nc=IN IP4 1.2.3.4\nt=0 0\nm=audio 0 RTP/AVP 0\n",
    "v=0\no=- 1 1 IN IP4 h\ns=-\nc=IN IP4 1.2.3.4\nt=0 0\nm=audio 5000 RTP/SAVP 0\n",
    "v=0\no=- 1 1 IN IP4 h\ns=-\nc=IN IP4 1.2.3.4\nt=0 0\nm=video 5000 RTP/AVP 31\n",
    "v=0\no=- 1 1 IN IP4 h\ns=-\nc=IN IP4 1.2.3.4\nt=0 0\nm=audio 5000 RTP/AVP 96\na=rtpmap:96 PCMU/16000\n",
])
def test_no_common_codec(offer):
    with pytest.raises(NoCommonCodec):
        answer_offer(sdp(offer), MediaPreferences(), "10.0.0.2", 6000)


def test_build_offer_and_read_the_answer():
    offer = build_offer(MediaPreferences(codecs=["PCMA", "PCMU"]), "192.0.2.20", 30000)
    audio = offer.media[0]
    assert audio.formats == ["8", "0", "101"] and audio.fmtp(101) == "0-16" and audio.direction == "sendrecv"
    answer, _ = answer_offer(SessionDescription.parse(str(offer)), MediaPreferences(codecs=["PCMU"]), "192.0.2.30", 31000)
    media = negotiated_from_answer(offer, answer)
    assert (media.codec, media.remote_address, media.remote_port, media.dtmf_payload_type) == (
        "PCMU", "192.0.2.30", 31000, 101)
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
