"""The codecs (G.711, G.722, Opus), their resampling to the model's 24 kHz, a call's media
path for each, and how the gateway's codec order is configured."""

from __future__ import annotations

import asyncio
import struct

import numpy as np
import pytest

from service.config import ConfigError, load
from service.gateway.ingress.sip import media_preferences
from service.gateway.media.bridge import MediaBridge
from service.gateway.media.pipeline import CallerAudio
from service.gateway.media.resample import make_pair
from service.gateway.media.rtp_media import CallMedia
from service.settings import GatewaySettings
from sip import codecs, g722
from sip.opus import OpusEncoder, OpusMonoDecoder, OpusParams
from sip.rtpsession import RtpSession
from sip.sdp import SessionDescription, answer_offer
from tests.support.realtime import realtime_test
from tests.support.udp import UdpPeer, loopback_media, port_allocator


def tone(freq: float, rate: int, seconds: float, level: float = 8000.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (level * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def peak_hz(pcm: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(pcm.astype(np.float64) * np.hanning(len(pcm))))
    return float(np.argmax(spectrum) * rate / len(pcm))


def level(pcm: np.ndarray) -> float:
    return float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2)))


@pytest.mark.parametrize(
    "name, freq", [("PCMU", 1000), ("PCMA", 3000), ("G722", 6000), ("opus", 6000), ("opus", 10000)]
)
def test_each_codec_round_trips_a_tone_in_its_band(name, freq):
    spec = codecs.spec(name)
    encoder, decoder = codecs.encoder(spec, 20), codecs.decoder(spec)
    pcm = tone(freq, spec.sample_rate, 1.0)
    step = spec.samples(20)
    payloads = [encoder.encode(pcm[i : i + step]) for i in range(0, len(pcm), step)]
    out = np.concatenate([decoder.decode(p) for p in payloads])
    assert len(out) == len(pcm)
    middle = out[len(out) // 4 : 3 * len(out) // 4]
    assert abs(peak_hz(middle, spec.sample_rate) - freq) < 10
    assert 0.7 < level(middle) / level(pcm) < 1.3


def test_g722_packets_are_one_byte_per_two_samples_on_an_8000_hz_clock():
    spec = codecs.spec("g722")
    assert (spec.name, spec.clock_rate, spec.sample_rate, spec.static_payload_type) == ("G722", 8000, 16000, 9)
    assert (spec.samples(20), spec.timestamp_step(20)) == (320, 160)
    assert len(g722.G722Encoder().encode(np.zeros(320, np.int16))) == 160
    with pytest.raises(ValueError):
        g722.G722Encoder().encode(np.zeros(321, np.int16))


def test_opus_is_48000_2_in_sdp_and_its_timestamp_runs_at_48_khz():
    spec = codecs.spec("OPUS")
    assert spec.rtpmap(111) == "111 opus/48000/2"
    assert (spec.samples(20), spec.timestamp_step(20)) == (960, 960)
    assert spec.matches("opus", 48000, 2) and spec.matches("OPUS", 48000, 1)
    assert not spec.matches("opus", 8000, 2) and not spec.matches("opus", 48000, 6)


def test_opus_fmtp_is_read_leniently():
    assert OpusParams.parse(None) == OpusParams()
    params = OpusParams.parse(" useinbandfec=1; maxaveragebitrate=20000;stereo=1;cbr=1;maxplaybackrate=16000")
    assert (params.use_inband_fec, params.max_average_bitrate, params.stereo, params.cbr) == (True, 20000, True, True)
    assert params.max_playback_rate == 16000
    for junk in (
        "",
        ";;;",
        "=",
        "maxaveragebitrate=99999999",
        "maxaveragebitrate=-1",
        "maxplaybackrate=abc",
        "\x00\xff=1",
        "a" * 5000,
    ):
        assert OpusParams.parse(junk).max_average_bitrate is None
    encoder = OpusEncoder(20, OpusParams.parse("maxaveragebitrate=12000;maxplaybackrate=8000"))
    assert (encoder.bitrate, encoder.cutoff_hz) == (12000, 4000)
    with pytest.raises(ValueError):
        OpusEncoder(30)


def test_opus_decoder_rejects_garbage_with_a_value_error_never_a_crash():
    decoder = OpusMonoDecoder()
    with pytest.raises(ValueError):
        decoder.decode(b"")  # an empty packet is an error, not FFmpeg's end of stream
    encoder = OpusEncoder(20)
    assert len(decoder.decode(encoder.encode(np.zeros(960, np.int16)))) == 960  # and decoding goes on
    # whatever libopus makes of random bytes, it is a ValueError or audio, never a crash
    rng = np.random.default_rng(3)
    for _ in range(200):
        try:
            out = decoder.decode(rng.integers(0, 256, int(rng.integers(1, 200)), dtype=np.uint8).tobytes())
        except ValueError:
            continue
        assert out.dtype == np.int16


# -- resampling to and from 24 kHz ------------------------------------------------------------


@pytest.mark.parametrize("rate, freq", [(8000, 3000), (16000, 6500), (48000, 10000)])
def test_codec_rate_to_24k_and_back_keeps_the_codec_band(rate, freq):
    up, down = make_pair("fir", rate)
    pcm = tone(freq, rate, 1.0).astype(np.float32)
    frame = rate * 80 // 1000
    at_24k = np.concatenate([up.process(pcm[i : i + frame]) for i in range(0, len(pcm), frame)])
    assert len(at_24k) == 24000
    assert abs(peak_hz(at_24k[6000:18000], 24000) - freq) < 5
    assert 0.95 < level(at_24k[6000:18000]) / level(pcm) < 1.05
    back = np.concatenate([down.process(at_24k[i : i + 1920]) for i in range(0, len(at_24k), 1920)])
    assert len(back) == len(pcm)
    delay = round((up.held_back_ms + down.held_back_ms) * rate / 1000)
    assert delay == (up.held_back_ms + down.held_back_ms) * rate / 1000  # whole samples: echoes line up
    middle = slice(rate // 4, 3 * rate // 4)
    assert np.abs(back[middle] - pcm[middle.start - delay : middle.stop - delay]).max() < 0.01 * 8000


@pytest.mark.parametrize("rate, model_freq", [(8000, 5000), (16000, 9500), (16000, 11000)])
def test_24k_to_codec_rate_filters_what_the_codec_cannot_carry(rate, model_freq):
    """The model's audio above the codec's Nyquist frequency must not fold back in."""
    _, down = make_pair("fir", rate)
    out = np.concatenate(
        [down.process(chunk) for chunk in np.split(tone(model_freq, 24000, 1.0).astype(np.float32), 12)]
    )
    assert 20 * np.log10(level(out[rate // 4 :]) / 8000 * np.sqrt(2)) < -55


def test_bridge_frames_g722_audio_at_16k_into_80ms_model_frames():
    bridge = MediaBridge(packet_samples=320, rate=16000)
    frames = [bridge.caller_audio(tone(1000, 16000, 0.02)) for _ in range(8)]
    assert [f is not None for f in frames] == [False, False, False, True] * 2
    assert all(len(f) == 3840 for f in frames if f is not None)
    packets = bridge.model_audio(bytes(3840))
    assert [len(p) for p in packets] == [320] * 4


# -- a call's media path per codec ------------------------------------------------------------


@realtime_test()
@pytest.mark.parametrize(
    "name, payload_type, ptime",
    [("G722", 9, 20), ("G722", 9, 10), ("opus", 111, 20), ("opus", 111, 40), ("PCMA", 8, 30)],
)
async def test_call_media_sends_the_negotiated_payload_type_on_the_codecs_clock(name, payload_type, ptime, timing):
    spec = codecs.spec(name)
    rtp = await RtpSession.open(port_allocator(), host="127.0.0.1")
    peer = await UdpPeer.open()
    to_model: list[bytes] = []
    negotiated = loopback_media(
        peer.address[1], codec=spec.name, payload_type=payload_type, clock_rate=spec.clock_rate, ptime=ptime
    )
    rtp.update_remote("127.0.0.1", peer.address[1])
    media = CallMedia(rtp, negotiated, to_model=to_model.append)
    tapped: list[CallerAudio] = []
    media.taps.caller.attach(tapped.append)  # the caller at the codec's rate, before resampling
    media.start()
    try:
        # caller side: a 1 kHz tone, encoded by an encoder of our own, at the codec's clock
        encoder = codecs.encoder(spec, ptime)
        samples, step = spec.samples(ptime), spec.timestamp_step(ptime)
        pcm = tone(1000, spec.sample_rate, 1.2)
        for i in range(len(pcm) // samples):
            payload = encoder.encode(pcm[i * samples : (i + 1) * samples])
            if i % 10 == 9:
                payload = b""  # nothing to decode: counted and concealed, never a crash
            header = struct.pack("!BBHII", 0x80, payload_type, i, 1000 + i * step, 0x1234)
            peer.send(header + payload, ("127.0.0.1", rtp.local_port))
            media.from_model(
                tone(6000 if spec.sample_rate > 8000 else 2000, 24000, 0.08).tobytes()
                if i % (80 // ptime if 80 % ptime == 0 else 3) == 0
                else b""
            )
            await asyncio.sleep(ptime / 1000)
        await asyncio.sleep(0.3)
    finally:
        media.stop()
        rtp.close()
    received = [data for data, _ in peer.drain() if not 192 <= data[1] <= 223]
    peer.close()
    assert len(received) > 20
    assert {data[1] & 0x7F for data in received} == {payload_type}
    stamps = [struct.unpack_from("!I", data, 4)[0] for data in received]
    steps = [(b - a) & 0xFFFFFFFF for a, b in zip(stamps, stamps[1:], strict=False)]
    # one packet time each (more only where a stalled loop skipped ticks: the clock runs on)
    assert all(d > 0 and d % step == 0 for d in steps), steps
    timing.expect(steps.count(step) > 0.8 * len(steps), f"one packet per tick: {steps}")
    decoder = codecs.decoder(spec)
    out = np.concatenate([decoder.decode(data[12:]) for data in received])
    assert len(out) == len(received) * samples
    sent_freq = 6000 if spec.sample_rate > 8000 else 2000
    assert abs(peak_hz(out, spec.sample_rate) - sent_freq) < 20  # the model's tone, wideband where it can be
    assert media.decode_errors > 0 and media.counters()["packets_malformed"] >= media.decode_errors
    heard = np.frombuffer(b"".join(to_model[3:]), "<i2")
    assert abs(peak_hz(heard, 24000) - 1000) < 10 and level(heard) > 500  # the caller's tone reached the model
    assert {a.rate for a in tapped} == {spec.sample_rate}
    caller = np.concatenate([a.pcm for a in tapped])
    assert abs(len(caller) * 24000 / spec.sample_rate - len(to_model) * 1920) < 1920  # what the frames came from
    assert abs(peak_hz(caller[len(caller) // 4 :], spec.sample_rate) - 1000) < 10
    timing.expect(level(heard) > 3000, f"the caller's tone whole (not concealed): level {level(heard):.0f}")


# -- the gateway's order ----------------------------------------------------------------------


def offer(formats: str, *lines: str) -> SessionDescription:
    body = "v=0\r\no=- 1 1 IN IP4 h\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\n" + f"m=audio 5000 RTP/AVP {formats}\r\n"
    return SessionDescription.parse(body + "".join(f"a={line}\r\n" for line in lines))


def test_gateway_default_takes_the_best_offered_and_configured_codecs_override():
    both = offer("0 8 9 111", "rtpmap:111 opus/48000/2")
    assert answer_offer(both, media_preferences([]), "10.0.0.2", 6000)[1].codec == "opus"
    assert answer_offer(offer("8 0 9"), media_preferences([]), "10.0.0.2", 6000)[1].codec == "G722"
    assert answer_offer(offer("8 0"), media_preferences([]), "10.0.0.2", 6000)[1].codec == "PCMA"
    configured = media_preferences(["PCMU", "G722"])
    assert answer_offer(both, configured, "10.0.0.2", 6000)[1].codec == "PCMU"


@pytest.mark.parametrize(
    "value, parsed", [("", []), ("opus,g722,pcmu", ["opus", "G722", "PCMU"]), ("PCMA, PCMA ,pcmu", ["PCMA", "PCMU"])]
)
def test_codecs_setting_is_normalised(value, parsed):
    assert load(GatewaySettings, environ={"MOSHIMOSHI_CODECS": value}).codecs == parsed


@pytest.mark.parametrize("bad", [["G729"], ["PCMU", "speex"]])
def test_unknown_codecs_setting_is_a_clear_error(bad):
    with pytest.raises(ConfigError, match="MOSHIMOSHI_CODECS"):
        load(GatewaySettings, environ={"MOSHIMOSHI_CODECS": ",".join(bad)})
