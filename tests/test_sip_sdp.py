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
    answer, media = answer_offer(sdp(OFFER), MediaPreferences(codecs=["PCMU", "PCMA"], order="ours"),
                                 "192.0.2.10", 40000)
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
    "v=0\no=- 1 1 IN IP4 h\ns=-\nc=IN IP4 1.2.3.4\nt=0 0\nm=audio 5000 RTP/AVP 18 3\n",
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


# -- codec choice and wideband ---------------------------------------------------------------

def audio_offer(formats: str, *lines: str, ptime: int | None = None) -> SessionDescription:
    body = "v=0\no=- 1 1 IN IP4 h\ns=-\nc=IN IP4 10.0.0.1\nt=0 0\n" + f"m=audio 5000 RTP/AVP {formats}\n"
    body += "".join(f"a={line}\n" for line in lines) + (f"a=ptime:{ptime}\n" if ptime else "")
    return sdp(body)


OPUS_MAP = "rtpmap:111 opus/48000/2"


@pytest.mark.parametrize("formats, lines, chosen", [
    ("0 8 9 111", [OPUS_MAP], "opus"),  # the best audio, wherever it stands in the offer
    ("111 9 0", [OPUS_MAP], "opus"),
    ("0 8 9", [], "G722"),
    ("8 9 0", [], "G722"),
    ("8 0", [], "PCMA"),  # equals: the offer's order
    ("0 8", [], "PCMU"),
])
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
    answer, media = answer_offer(audio_offer("9 0 101", "rtpmap:101 telephone-event/8000"), MediaPreferences(),
                                 "10.0.0.2", 6000)
    assert (media.codec, media.payload_type, media.clock_rate, media.dtmf_payload_type) == ("G722", 9, 8000, 101)
    assert "a=rtpmap:9 G722/8000" in str(answer) and answer.media[0].formats == ["9", "101"]


def test_opus_answer_has_rtpmap_fmtp_ptime_and_the_matching_telephone_event():
    offer = audio_offer("111 0 101 110", OPUS_MAP, "fmtp:111 useinbandfec=1;maxaveragebitrate=20000",
                        "rtpmap:101 telephone-event/8000", "rtpmap:110 telephone-event/48000", ptime=30)
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


@pytest.mark.parametrize("lines, chosen", [
    (["rtpmap:111 opus/8000/2"], "PCMU"),  # a wrong clock rate is not Opus
    (["rtpmap:111 opus/48000/2", "fmtp:111 ;;==;maxaveragebitrate=x;stereo=7;\x00"], "opus"),  # odd fmtp
    (["rtpmap:111 opus/48000"], "opus"),  # channels left out, as many stacks write it
    (["rtpmap:111 opus/48000/6"], "PCMU"),
    (["rtpmap:9 G722/16000"], "PCMU"),  # G.722 on a 16 kHz clock is not RFC 3551's
    (["rtpmap:111 opus/48000/2", "rtpmap:111 opus/abc/2"], "opus"),  # a malformed second rtpmap is ignored
])
def test_malformed_codec_entries_fall_back(lines, chosen):
    _, media = answer_offer(audio_offer("111 9 0" if "9 " in " ".join(lines) else "111 0", *lines),
                            MediaPreferences(), "10.0.0.2", 6000)
    assert media.codec == chosen


@pytest.mark.parametrize("offer", [
    "m=audio 5000 RTP/AVP 111\na=rtpmap:111 opus/16000/2\n",
    "m=audio 5000 RTP/AVP 9\na=rtpmap:9 G722/16000\n",
    "m=audio 5000 RTP/AVP 300\na=rtpmap:300 PCMU/8000\n",
])
def test_nothing_usable_is_no_common_codec(offer):
    with pytest.raises(NoCommonCodec):
        answer_offer(sdp("v=0\no=- 1 1 IN IP4 h\ns=-\nc=IN IP4 1.2.3.4\nt=0 0\n" + offer), MediaPreferences(),
                     "10.0.0.2", 6000)


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
    answer = sdp("v=0\no=- 1 1 IN IP4 h\ns=-\nc=IN IP4 192.0.2.30\nt=0 0\nm=audio 31000 RTP/AVP 0 96\n"
                 "a=rtpmap:96 telephone-event/8000\na=fmtp:96 0-15\n")
    media = negotiated_from_answer(offer, answer)
    assert (media.codec, media.dtmf_payload_type, media.dtmf_clock_rate) == ("PCMU", 96, 8000)
