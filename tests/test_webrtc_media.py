"""The WebRTC ingress's parts: Opus packet sizes, 48↔24 kHz, the offer check, the receive and send paths."""

from __future__ import annotations

import asyncio
import fractions
import functools

import av
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.mediastreams import MediaStreamError
from aiortc.rtp import RtpPacket
from hypothesis import given, settings
from hypothesis import strategies as st

from service.gateway.ingress.aiortc_tap import tap_receiver
from service.gateway.ingress.webrtc_sdp import OfferError, check_offer
from service.gateway.media.bridge import MODEL_FRAME_BYTES
from service.gateway.media.pipeline import CallerAudio
from service.gateway.media.resample import Decimator48to24, Interpolator24to48, wideband_taps
from service.gateway.media.webrtc_media import (
    PACKET_SAMPLES_48K,
    TRACK_QUEUE_PACKETS,
    ModelAudioTrack,
    WebRtcMedia,
)
from sip.opus import OpusMonoDecoder, OpusPacketError, opus_packet_samples


def opus_packets(pcm: np.ndarray, frame_ms: int = 20) -> list[bytes]:
    """Real libopus packets of ``pcm`` (int16 mono 48 kHz), ``frame_ms`` each."""
    codec = av.CodecContext.create("libopus", "w")
    codec.sample_rate = 48000
    codec.layout = "mono"
    codec.format = "s16"
    codec.bit_rate = 64000
    codec.time_base = fractions.Fraction(1, 48000)
    codec.options = {"frame_duration": str(frame_ms), "application": "voip"}
    packets = []
    for start in range(0, len(pcm) - 959, 960):
        frame = av.AudioFrame.from_ndarray(pcm[start : start + 960].reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = 48000
        frame.pts = start
        packets += [bytes(p) for p in codec.encode(frame)]
    return packets


def voice(seconds: float, rate: int = 48000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * np.cumsum(140 + 20 * np.sin(2 * np.pi * 0.8 * t)) / rate
    signal = sum(np.sin(k * phase) / k for k in range(1, 8)) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    return (signal / np.max(np.abs(signal)) * 10000).astype(np.int16)


def rtp(seq: int, payload: bytes, ssrc: int = 0x1234) -> RtpPacket:
    packet = RtpPacket(payload_type=111, sequence_number=seq & 0xFFFF, timestamp=(seq * 960) & 0xFFFFFFFF)
    packet.ssrc = ssrc
    packet.payload = payload
    return packet


# -- Opus -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("frame_ms", "samples"), [(10, 480), (20, 960), (60, 2880)])
def test_packet_duration_from_real_libopus_packets(frame_ms, samples):
    packets = opus_packets(voice(0.5), frame_ms)
    assert packets
    assert {opus_packet_samples(p) for p in packets} == {samples}
    decoder = OpusMonoDecoder()
    assert len(decoder.decode(packets[0])) == samples


@pytest.mark.parametrize(
    ("payload", "samples"),
    [
        (bytes([0 << 3]), 480),  # SILK 10 ms
        (bytes([3 << 3]), 2880),  # SILK 60 ms
        (bytes([16 << 3]), 120),  # CELT 2.5 ms
        (bytes([31 << 3 | 1]), 1920),  # CELT 20 ms, two frames
        (bytes([19 << 3 | 3, 6]), 6 * 960),  # CELT 20 ms, code 3 with six frames
    ],
)
def test_packet_duration_table(payload, samples):
    assert opus_packet_samples(payload) == samples


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "empty"),
        (bytes([19 << 3 | 3]), "frame count"),
        (bytes([19 << 3 | 3, 0]), "zero frames"),
        (bytes([3 << 3 | 3, 3]), "exceeds 120 ms"),  # 3 × 60 ms
    ],
)
def test_malformed_packets_are_named(payload, reason):
    with pytest.raises(OpusPacketError, match=reason):
        opus_packet_samples(payload)


@given(st.binary(max_size=40))
def test_any_bytes_give_a_duration_or_opus_packet_error(payload):
    try:
        assert 120 <= opus_packet_samples(payload) <= 5760
    except OpusPacketError:
        pass


# -- 48 ↔ 24 kHz ------------------------------------------------------------------------------


def tone(freq: float, rate: int, seconds: float = 0.5) -> np.ndarray:
    return np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate).astype(np.float32)


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x[len(x) // 4 :]))))  # past the filter's start-up


@pytest.mark.parametrize("freq", [300.0, 3000.0, 9000.0])
def test_decimator_passes_the_voice_band(freq):
    out = Decimator48to24().process(tone(freq, 48000))
    assert rms(out) == pytest.approx(1 / np.sqrt(2), rel=0.02)


@pytest.mark.parametrize("freq", [13000.0, 18000.0])
def test_decimator_stops_what_would_alias(freq):
    out = Decimator48to24().process(tone(freq, 48000))
    assert 20 * np.log10(rms(out) * np.sqrt(2)) < -50


def test_interpolator_keeps_the_band_and_suppresses_the_image():
    out = Interpolator24to48().process(tone(3000.0, 24000))
    spectrum = np.abs(np.fft.rfft(out[len(out) // 4 :] * np.hanning(len(out) - len(out) // 4)))
    freqs = np.fft.rfftfreq(len(out) - len(out) // 4, 1 / 48000)
    wanted = spectrum[np.argmin(np.abs(freqs - 3000))]
    image = spectrum[np.argmin(np.abs(freqs - 21000))]
    assert rms(out) == pytest.approx(1 / np.sqrt(2), rel=0.02)
    assert 20 * np.log10(image / wanted) < -50


def test_the_matrix_filters_compute_the_plain_convolutions():
    taps = wideband_taps()
    signal = np.random.default_rng(1).normal(size=5001).astype(np.float32)
    decimated = np.convolve(np.concatenate((np.zeros(len(taps) - 1, np.float32), signal)), taps, "valid")[::2]
    np.testing.assert_allclose(Decimator48to24().process(signal), decimated, atol=1e-5)
    padded = np.zeros(len(taps) + 1, np.float32)
    padded[: len(taps)] = taps * 2
    history = np.zeros(len(padded) // 2 - 1, np.float32)
    branches = [np.convolve(np.concatenate((history, signal)), padded[phase::2], "valid") for phase in (0, 1)]
    np.testing.assert_allclose(Interpolator24to48().process(signal), np.stack(branches, axis=1).reshape(-1), atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=700), min_size=1, max_size=12))
def test_resampling_in_chunks_equals_resampling_at_once(cuts):
    signal = np.random.default_rng(3).normal(size=4000).astype(np.float32)
    bounds = sorted({0, len(signal), *(min(c * 5, len(signal)) for c in cuts)})
    for make in (Decimator48to24, Interpolator24to48):
        whole = make().process(signal)
        streaming = make()
        pieces = np.concatenate([streaming.process(signal[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)])
        np.testing.assert_allclose(pieces, whole, atol=1e-5)


# -- the offer check --------------------------------------------------------------------------


async def aiortc_offer(data_channel: bool = True) -> str:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("audio", direction="sendrecv")
    if data_channel:
        pc.createDataChannel("events")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


async def test_an_aiortc_offer_passes():
    summary = check_offer(await aiortc_offer())
    assert summary.has_data_channel
    assert summary.direction == "sendrecv"
    assert summary.opus_payload_type == 96


async def test_unusable_offers_are_rejected_with_their_reason():
    good = await aiortc_offer(data_channel=False)
    no_opus = good.replace("a=rtpmap:96 opus/48000/2\r\n", "").replace("UDP/TLS/RTP/SAVPF 96 ", "UDP/TLS/RTP/SAVPF ")
    video = good + "m=video 9 UDP/TLS/RTP/SAVPF 97\r\na=rtpmap:97 VP8/90000\r\n"
    cases = {
        "": "must start with v=0",
        "hello": "must start with v=0",
        "v=0\r\nthis is not sdp\r\n": "line 2 is not of the form",
        "v=0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n": "no audio section",
        good.replace("UDP/TLS/RTP/SAVPF", "RTP/AVP"): "needs UDP/TLS/RTP/SAVPF",
        no_opus: "no Opus",
        video: "video is not supported",
        good.replace("a=sendrecv", "a=inactive"): "inactive",
        "\r\n".join(line for line in good.split("\r\n") if not line.startswith("a=fingerprint")): "no DTLS fingerprint",
        "\r\n".join(line for line in good.split("\r\n") if not line.startswith("a=ice-pwd")): "no ICE credentials",
        good + good[good.index("m=audio") :]: "more than one audio section",
        "v=0\r\nm=audio x UDP/TLS/RTP/SAVPF 96\r\n": "bad port",
    }
    for offer, reason in cases.items():
        with pytest.raises(OfferError, match=reason):
            check_offer(offer)
    assert "PCMU/8000" in str(pytest.raises(OfferError, check_offer, no_opus).value)


@functools.cache
def offer_lines() -> list[str]:
    return asyncio.run(aiortc_offer()).split("\r\n")


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_damaged_offers_pass_or_fail_with_offer_error(data):
    lines = offer_lines()
    kept = data.draw(st.lists(st.sampled_from(range(len(lines))), max_size=len(lines), unique=True))
    text = "\r\n".join(lines[i] for i in sorted(kept))
    text += data.draw(st.text(max_size=30))
    try:
        check_offer(text)
    except OfferError:
        pass


# -- receive path -----------------------------------------------------------------------------


def test_receive_path_plays_on_time_conceals_a_loss_and_frames_for_the_model():
    frames: list[bytes] = []
    media = WebRtcMedia(to_model=frames.append)
    heard: list[CallerAudio] = []
    media.taps.caller.attach(heard.append)  # the caller tap: what the model's frames are cut from
    packets = opus_packets(voice(2.0))
    lost = {30, 61}
    t0 = 100.0
    for i, payload in enumerate(packets):
        if i not in lost:
            media.on_rtp(rtp(i, payload), t0 + i * 0.02 + 0.003)
        media.play(t0 + i * 0.02 + 0.025)  # the playout clock never waits
    jitter = media.jitter
    assert jitter is not None
    assert jitter.frames_concealed == 2
    assert len(frames) == len(packets) // 4
    assert all(len(f) == MODEL_FRAME_BYTES for f in frames)
    audio = np.frombuffer(b"".join(frames), dtype="<i2")
    assert np.sqrt(np.mean(audio[4800:].astype(float) ** 2)) > 1000
    counters = media.counters()
    assert 0 <= len(packets) - 2 - counters["packets_received"] <= 1  # RFC 3550 probation
    assert counters["packets_lost"] == 2
    assert counters["frames_concealed"] == 2
    quality = media.quality()
    assert quality.codec == "opus/48000" and quality.ptime_ms == 20.0
    assert {a.rate for a in heard} == {24000} and len(heard) == len(packets)
    tapped = np.concatenate([a.pcm for a in heard])
    assert np.array_equal(tapped[: len(audio)], audio)


def test_bad_packets_are_counted_and_a_ptime_change_restarts_the_buffer():
    frames: list[bytes] = []
    media = WebRtcMedia(to_model=frames.append)
    media.on_rtp(rtp(0, b""), 1.0)
    media.on_rtp(rtp(1, bytes([19 << 3 | 3, 0])), 1.0)
    assert media.packets_malformed == 2 and media.jitter is None
    ten_ms = opus_packets(voice(0.2), 10)
    for i, payload in enumerate(ten_ms):
        packet = rtp(i, payload)
        packet.timestamp = i * 480
        media.on_rtp(packet, 2.0 + i * 0.01)
    assert media.ptime_ms == 10.0 and media.ptime_changes == 0
    media.on_rtp(rtp(100, opus_packets(voice(0.1))[0]), 3.0)
    assert media.ptime_ms == 20.0 and media.ptime_changes == 1


def test_tap_takes_the_packets_from_aiortc_receiver():
    async def run() -> None:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        transceiver = pc.addTransceiver("audio")
        seen = []
        tap = tap_receiver(transceiver.receiver, lambda p, at: seen.append((p.sequence_number, at)), lambda: 7.0)
        assert tap.add(rtp(5, b"\x78")) == (False, None)
        assert seen == [(5, 7.0)]
        await pc.close()

    asyncio.run(run())


# -- send path --------------------------------------------------------------------------------


async def test_track_returns_what_the_pacer_released_and_silence_for_nothing():
    track = ModelAudioTrack()
    pcm = np.full(PACKET_SAMPLES_48K, 1000, dtype=np.int16)
    track.put(pcm, 1)
    track.put(None, 3)  # a tick that found nothing due, after two skipped ones
    first = await track.recv()
    second = await track.recv()
    assert first.sample_rate == 48000 and first.samples == PACKET_SAMPLES_48K
    assert np.all(first.to_ndarray() == 1000)
    assert not second.to_ndarray().any()
    assert second.pts == 3 * PACKET_SAMPLES_48K  # the skipped ticks advance the media clock
    for _ in range(TRACK_QUEUE_PACKETS + 3):
        track.put(pcm, 1)
    assert track.dropped == 3
    waiting = asyncio.ensure_future(asyncio.gather(*(track.recv() for _ in range(TRACK_QUEUE_PACKETS + 1))))
    await asyncio.sleep(0.01)
    track.stop()
    with pytest.raises(MediaStreamError):
        await waiting


async def test_model_frames_go_out_as_paced_20ms_packets():
    media = WebRtcMedia(to_model=lambda frame: None)
    media.start()
    try:
        frame = (np.sin(np.arange(1920) * 0.1) * 8000).astype("<i2").tobytes()
        media.from_model(frame)
        frames = [await asyncio.wait_for(media.track.recv(), 2) for _ in range(6)]
    finally:
        media.stop()
    loud = [f for f in frames if np.abs(f.to_ndarray()).max() > 1000]
    assert len(loud) >= 3  # the frame's four packets (the first may be eased in by the filter)
    assert media.pacer.stats.model_packets == 4


# -- configuration ----------------------------------------------------------------------------


def test_ice_server_settings_are_checked_and_passed_to_aiortc():
    from service.config import ConfigError, load
    from service.gateway.ingress.webrtc import ice_servers
    from service.settings import GatewaySettings

    assert ice_servers(load(GatewaySettings, environ={})) == []  # host candidates only, no public STUN
    settings = load(
        GatewaySettings,
        environ={
            "MOSHIMOSHI_WEBRTC_ICE_SERVERS": "stun:stun.example.org:3478, turn:turn.example.org?transport=tcp",
            "MOSHIMOSHI_WEBRTC_TURN_USERNAME": "user",
            "MOSHIMOSHI_WEBRTC_TURN_PASSWORD": "pass",
        },
    )
    stun, turn = ice_servers(settings)
    assert stun.urls == "stun:stun.example.org:3478" and stun.username is None
    assert (turn.urls, turn.username, turn.credential) == ("turn:turn.example.org?transport=tcp", "user", "pass")
    with pytest.raises(ConfigError, match="not a stun:, turn: or turns: URL"):
        load(GatewaySettings, environ={"MOSHIMOSHI_WEBRTC_ICE_SERVERS": "http://stun.example.org"})
    with pytest.raises(ConfigError, match="needs MOSHIMOSHI_WEBRTC_TURN_USERNAME"):
        load(GatewaySettings, environ={"MOSHIMOSHI_WEBRTC_ICE_SERVERS": "turn:turn.example.org"})
    with pytest.raises(ConfigError, match="WEBRTC_CONNECT_SECONDS"):
        load(GatewaySettings, environ={"MOSHIMOSHI_WEBRTC_CONNECT_SECONDS": "0"})


@given(st.text(max_size=300))
def test_any_text_is_an_offer_or_an_offer_error(text):
    try:
        check_offer("v=0\r\n" + text)
    except OfferError:
        pass
