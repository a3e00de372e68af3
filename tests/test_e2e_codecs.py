"""Each codec end to end against `moshimoshi serve --model echo`.

Two independent peers: baresip with only the codec module under test loaded (it drops
packets whose payload type it did not negotiate), and a raw RTP socket that decodes what
comes back by the payload type each packet carries. The echo must be the caller's own
audio, on the negotiated payload type.
"""

from __future__ import annotations

import asyncio
import audioop
import secrets
import shutil
import struct
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np
import pytest

from service.tools.call import read_wav
from sip.ua import UserAgent
from tests.support.baresip import write_baresip_config
from tests.support.procs import free_port_pair
from tests.support.realtime import realtime_test
from tests.support.services import ADMIN_TOKEN, start_serve, wait_until
from tests.support.tools import requires
from tests.support.udp import UdpPeer
from tests.test_e2e_echo import echo_delay, noise_bursts_wav, sound_segments

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def echo_gateway(tmp_path_factory):
    # DTMF digits in clear: these tests check the digits the gateway decoded (masking: test_call_capture.py)
    gateway = start_serve(tmp_path_factory.mktemp("codec-echo-serve"), "echo", env={"MOSHIMOSHI_DTMF_CLEAR": "true"})
    try:
        gateway.wait_ready()
        yield gateway
    finally:
        code = gateway.proc.stop()
        assert code in (0, -2, 130), f"serve exited {code}:\n{gateway.proc.log()[-3000:]}"


def ended_calls(gateway) -> list[dict]:
    status, body = gateway.get("/v1/calls?state=ended&limit=50")
    assert status == 200, body
    return body["calls"]


def new_call(gateway, before: set[str]) -> dict:
    calls = wait_until(lambda: [c for c in ended_calls(gateway) if c["id"] not in before], 10, "the call's record")
    return calls[0]


def wideband_bursts_wav(path: Path, rate: int, seconds: float = 4.0, top_hz: float = 7000.0) -> Path:
    """Noise from 300 Hz to ``top_hz`` in 200 ms bursts with 100 ms gaps, at ``rate``."""
    rng = np.random.default_rng(11)
    n = int(rate * seconds)
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / rate)
    spectrum[(freqs < 300) | (freqs > top_hz)] = 0
    noise = np.fft.irfft(spectrum, n)
    noise *= 0.2 / noise.std()
    envelope = (np.arange(n) % int(0.3 * rate)) < int(0.2 * rate)
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes((np.clip(noise * envelope, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def band_share(pcm: np.ndarray, rate: int, lo: float, hi: float) -> float:
    """The share of the signal's energy (above 300 Hz) that lies in [lo, hi) Hz."""
    spectrum = np.abs(np.fft.rfft(pcm.astype(np.float64))) ** 2
    freqs = np.fft.rfftfreq(len(pcm), 1 / rate)
    total = spectrum[freqs >= 300].sum()
    return float(spectrum[(freqs >= lo) & (freqs < hi)].sum() / total) if total else 0.0


def read_wav_native(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as wav:
        rate, channels = wav.getframerate(), wav.getnchannels()
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), "<i2").reshape(-1, channels)[:, 0]
    return pcm, rate


def run_baresip(
    tmp_path: Path,
    uri: str,
    wav: Path,
    modules: list[str],
    codecs: str,
    srate: int = 8000,
    extra: list[str] | None = None,
) -> tuple[str, Path | None, Path | None]:
    """Call ``uri`` from baresip with only ``modules`` as codecs and the account's
    ``audio_codecs`` set to ``codecs``; returns (output, what it sent, what it heard)."""
    config = write_baresip_config(
        tmp_path / "baresip",
        port=free_port_pair(),
        source=wav,
        folder=tmp_path,
        account=f"<sip:baresip@127.0.0.1>;regint=0;audio_codecs={codecs}",
        rtp_ports=(31000, 31999),
        srate=srate,
        codecs=modules,
        extra=extra or (),
    )
    result = subprocess.run(
        ["baresip", "-f", str(config), "-e", f"/dial {uri}", "-t", "10"], capture_output=True, text=True, timeout=40
    )
    output = result.stdout + result.stderr
    sent = sorted(tmp_path.glob("dump-*-enc.wav"))
    heard = sorted(tmp_path.glob("dump-*-dec.wav"))
    return output, sent[0] if sent else None, heard[0] if heard else None


needs_baresip = requires(shutil.which("baresip") is not None, "baresip is not installed")


@needs_baresip
@realtime_test()
def test_baresip_pcma_only_hears_the_echo(echo_gateway, tmp_path, timing):
    """A PCMA-only caller (baresip drops any payload type it did not negotiate) hears
    its own audio back: the gateway sends A-law as payload type 8, not 0."""
    tmp_path = Path(tempfile.mkdtemp(dir=tmp_path))
    before = {c["id"] for c in ended_calls(echo_gateway)}
    wav = noise_bursts_wav(tmp_path / "bursts.wav")
    output, sent, heard = run_baresip(tmp_path, echo_gateway.uri, wav, ["g711"], "PCMA")
    assert "Call established" in output, output[-3000:]
    assert "audio encoder: PCMA" in output, output[-3000:]
    assert sent and heard, output[-3000:]
    delay_ms, correlation = echo_delay(read_wav(sent), read_wav(heard))
    assert correlation > 0.5, (delay_ms, correlation, output[-2000:])  # the echo came back, as A-law
    timing.expect(correlation > 0.8, f"echo heard intact: {correlation:.2f} of the sounds")
    timing.expect(40 < delay_ms < 400, f"echo 40-400 ms late: {delay_ms}")
    assert new_call(echo_gateway, before)["codec"] == "PCMA"


# -- raw RTP ------------------------------------------------------------------------------

RTP_HEADER = struct.Struct("!BBHII")
DECODERS = {0: audioop.ulaw2lin, 8: audioop.alaw2lin}


def offer_sdp(port: int, formats: str, rtpmaps: list[str]) -> str:
    return "\r\n".join(
        [
            "v=0",
            f"o=raw {secrets.randbelow(10**9)} 1 IN IP4 127.0.0.1",
            "s=-",
            "c=IN IP4 127.0.0.1",
            "t=0 0",
            f"m=audio {port} RTP/AVP {formats}",
            *(f"a={line}" for line in rtpmaps),
            "a=ptime:20",
            "a=sendrecv",
            "",
        ]
    )


def rtp_packet(
    payload_type: int, sequence: int, timestamp: int, ssrc: int, payload: bytes, marker: bool = False
) -> bytes:
    return (
        RTP_HEADER.pack(0x80, (0x80 if marker else 0) | payload_type, sequence & 0xFFFF, timestamp & 0xFFFFFFFF, ssrc)
        + payload
    )


def dtmf_packets(digit: int, start_ts: int, step: int, updates: int = 6) -> list[tuple[bytes, bool]]:
    """RFC 4733 payloads (and marker bits) of one event: start, updates, three ends."""
    out = []
    for i in range(1, updates + 1):
        out.append((struct.pack("!BBH", digit, 10, i * step), i == 1))
    out += [(struct.pack("!BBH", digit, 0x80 | 10, updates * step), False)] * 3
    return out


@realtime_test()
async def test_raw_rtp_pcma_echo_comes_back_as_pcma_and_dtmf_on_pt_96(echo_gateway, tmp_path, timing):
    """Offer only PCMA (8) and telephone-event on the dynamic type 96, play A-law noise
    bursts and two digits from a bare socket; decode what comes back by the payload type
    each packet carries."""
    before = {c["id"] for c in ended_calls(echo_gateway)}
    rate = 8000
    sent_pcm = read_wav(noise_bursts_wav(tmp_path / "bursts.wav", seconds=3.0))
    rtp = await UdpPeer.open()
    ua = UserAgent("127.0.0.1", 0, user_agent="raw-rtp-test")
    await ua.start()
    try:
        offer = offer_sdp(
            rtp.address[1], "8 96", ["rtpmap:8 PCMA/8000", "rtpmap:96 telephone-event/8000", "fmtp:96 0-15"]
        )
        dialog = await ua.invite(echo_gateway.uri, offer)
        answer = dialog.remote_sdp
        assert answer is not None
        media_line = next(line for line in str(answer).splitlines() if line.startswith("m=audio"))
        assert media_line.split()[3:] == ["8", "96"], str(answer)
        remote = (answer.connection_of(answer.media[0]).host, answer.media[0].port)
        ssrc, seq, ts = secrets.randbits(32), secrets.randbits(16), secrets.randbits(32)
        loop = asyncio.get_running_loop()
        start = loop.time()
        received: list[bytes] = []
        samples = rate // 50
        ticks = len(sent_pcm) // samples
        for tick in range(ticks + 40):  # 800 ms more to hear the end of the echo
            delay = start + tick * 0.02 - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            chunk = sent_pcm[tick * samples : (tick + 1) * samples]
            if len(chunk) < samples:
                chunk = np.zeros(samples, np.int16)
            rtp.send(rtp_packet(8, seq, ts, ssrc, audioop.lin2alaw(chunk.tobytes(), 2)), remote)
            seq, ts = seq + 1, ts + samples
            received += [data for data, _ in rtp.drain()]
        for digit in (5, 11):  # "5", "#"
            event_ts = ts
            for payload, marker in dtmf_packets(digit, event_ts, samples):
                rtp.send(rtp_packet(96, seq, event_ts, ssrc, payload, marker), remote)
                seq += 1
                await asyncio.sleep(0.02)
            ts += 8 * samples
        await asyncio.sleep(0.3)
        received += [data for data, _ in rtp.drain()]
        await dialog.bye()
    finally:
        await ua.stop()
        rtp.close()

    audio = [p for p in received if len(p) >= 12 and not 192 <= p[1] <= 223]  # RTCP muxed or not
    types = {p[1] & 0x7F for p in audio}
    assert types == {8}, f"payload types received: {sorted(types)} (offered and answered: PCMA = 8)"
    first_ts = None
    timeline = np.zeros(0, np.int16)
    for packet in audio:
        pt, timestamp = packet[1] & 0x7F, RTP_HEADER.unpack_from(packet)[3]
        first_ts = timestamp if first_ts is None else first_ts
        at = (timestamp - first_ts) & 0xFFFFFFFF
        pcm = np.frombuffer(DECODERS[pt](packet[12:], 2), "<i2")
        if at + len(pcm) > len(timeline):
            timeline = np.concatenate((timeline, np.zeros(at + len(pcm) - len(timeline), np.int16)))
        timeline[at : at + len(pcm)] = pcm
    # the echo's timeline starts with the gateway's first packet, about when ours did
    delay_ms, correlation = echo_delay(sent_pcm, timeline)
    assert correlation > 0.5, (delay_ms, correlation)
    timing.expect(correlation > 0.8, f"echo heard intact: {correlation:.2f} of the sounds")
    call = new_call(echo_gateway, before)
    assert call["codec"] == "PCMA"
    status, transcript = echo_gateway.get(f"/v1/calls/{call['id']}/transcript")
    assert status == 200, transcript
    assert [e["text"] for e in transcript["events"] if e["kind"] == "dtmf"] == ["5", "#"], transcript


def tone_bursts_wav(path: Path, rate: int, tones: tuple[int, ...], seconds: float = 4.0) -> Path:
    """200 ms tones with 100 ms gaps, cycling through ``tones`` (Hz), at ``rate``."""
    burst, gap = int(0.2 * rate), int(0.1 * rate)
    t = np.arange(burst) / rate
    pieces = []
    for i in range(int(seconds / 0.3)):
        pieces += [0.3 * np.sin(2 * np.pi * tones[i % len(tones)] * t) * np.hanning(burst), np.zeros(gap)]
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes((np.concatenate(pieces) * 32767).astype("<i2").tobytes())
    return path


def tone_sequence(pcm: np.ndarray, rate: int, tones: tuple[int, ...]) -> list[int]:
    """For each stretch of sound in ``pcm``: the index of the tone it is (-1: none of them)."""
    out = []
    for start, end in sound_segments(pcm, rate):
        middle = pcm[start + (end - start) // 4 : end - (end - start) // 4].astype(np.float64)
        peak = np.argmax(np.abs(np.fft.rfft(middle))) * rate / len(middle)
        out.append(next((i for i, tone in enumerate(tones) if abs(peak - tone) < 40), -1))
    return out


WIDEBAND_TONES = (700, 2500, 5000, 6500)  # two of them above what G.711 carries


@needs_baresip
@realtime_test()
@pytest.mark.parametrize(
    "module, codec, baresip_codec, rate, extra",
    [
        ("g722", "G722", "G722/16000/1", 16000, []),
        ("opus", "opus", "opus/48000/1", 48000, ["opus_stereo no", "opus_sprop_stereo no"]),
    ],
)
def test_baresip_wideband_call_is_answered_with_its_codec_and_hears_the_band_back(
    echo_gateway, tmp_path, timing, module, codec, baresip_codec, rate, extra
):
    """baresip offering G.722 or Opus besides G.711 gets the wideband codec and hears its own
    audio back, 5 and 6.5 kHz tones included (G.711 stops at 4 kHz): the tones come back in
    the order they were played, and noise bursts up to 7 kHz keep their 4-7 kHz share."""
    tmp_path = Path(tempfile.mkdtemp(dir=tmp_path))
    before = {c["id"] for c in ended_calls(echo_gateway)}
    tones_dir, noise_dir = tmp_path / "tones", tmp_path / "noise"
    tones_dir.mkdir()
    noise_dir.mkdir()
    wav = tone_bursts_wav(tones_dir / "tones.wav", rate, WIDEBAND_TONES)
    output, sent, heard = run_baresip(
        tones_dir, echo_gateway.uri, wav, [module, "g711"], f"{baresip_codec},PCMU,PCMA", srate=rate, extra=extra
    )
    assert "Call established" in output, output[-3000:]
    assert f"audio encoder: {codec}" in output, output[-3000:]
    assert sent and heard, output[-3000:]
    spoken, spoken_rate = read_wav_native(sent)
    echoed, echoed_rate = read_wav_native(heard)
    said = tone_sequence(spoken, spoken_rate, WIDEBAND_TONES)
    echo = tone_sequence(echoed, echoed_rate, WIDEBAND_TONES)
    assert len(said) >= 12 and -1 not in said, said
    # every tone came back at its frequency, 5 and 6.5 kHz included
    assert len(echo) >= 6 and {2, 3} <= set(echo) and echo.count(-1) <= 1, echo
    timing.expect(
        -1 not in echo and all((b - a) % len(WIDEBAND_TONES) == 1 for a, b in zip(echo, echo[1:], strict=False)),
        f"the tones came back whole and in order: {echo}",
    )
    assert new_call(echo_gateway, before)["codec"] == codec

    wav = wideband_bursts_wav(noise_dir / "noise.wav", rate)
    output, sent, heard = run_baresip(
        noise_dir, echo_gateway.uri, wav, [module, "g711"], f"{baresip_codec},PCMU,PCMA", srate=rate, extra=extra
    )
    assert sent and heard, output[-3000:]
    spoken, spoken_rate = read_wav_native(sent)
    echoed, echoed_rate = read_wav_native(heard)
    sent_share = band_share(spoken, spoken_rate, 4000, 7000)
    heard_share = band_share(echoed, echoed_rate, 4000, 7000)
    assert sent_share > 0.3, sent_share
    assert heard_share > 0.7 * sent_share, (heard_share, sent_share)
    if codec == "G722":  # a waveform coder: the echo is the same waveform (Opus is perceptual)
        delay_ms, correlation = echo_delay(read_wav(sent), read_wav(heard))
        assert correlation > 0.5, (delay_ms, correlation)
        timing.expect(correlation > 0.8, f"echo heard intact: {correlation:.2f} of the sounds")
        timing.expect(40 < delay_ms < 400, f"echo 40-400 ms late: {delay_ms}")


@realtime_test()
@pytest.mark.parametrize("codec, rate", [("PCMA", 8000), ("G722", 16000), ("opus", 48000)])
async def test_moshimoshi_call_offers_its_codec_first_and_hears_it_back(echo_gateway, tmp_path, timing, codec, rate):
    """`moshimoshi call --codec X` offers X, then G.711: the gateway takes X, the recording is
    at X's rate, tones come back in order, and DTMF digits arrive on the negotiated type."""
    from service.settings import CallSettings
    from service.tools.call import place_call

    tones = WIDEBAND_TONES if rate > 8000 else (500, 1200, 2500, 3300)
    wav = tone_bursts_wav(tmp_path / "tones.wav", rate, tones, seconds=3.0)
    settings = CallSettings(
        uri=echo_gateway.uri,
        play=str(wav),
        record=str(tmp_path / "out.wav"),
        seconds=3.6,
        local_host="127.0.0.1",
        codec=codec,
        dtmf="7*",
        api=echo_gateway.api,
        api_token=ADMIN_TOKEN,
    )
    summary = await place_call(settings)
    assert (summary["codec"], summary["sample_rate"]) == (codec, rate)
    with wave.open(summary["recording"]) as rec:
        assert rec.getframerate() == rate
        frames = np.frombuffer(rec.readframes(rec.getnframes()), "<i2").reshape(-1, 2)
    echo = tone_sequence(np.ascontiguousarray(frames[:, 1]), rate, tones)
    assert len(echo) >= 5 and {2, 3} <= set(echo) and echo.count(-1) <= 1, echo
    timing.expect(
        -1 not in echo and all((b - a) % len(tones) == 1 for a, b in zip(echo, echo[1:], strict=False)),
        f"the tones came back whole and in order: {echo}",
    )
    status, transcript = echo_gateway.get(f"/v1/calls/{summary['gateway_call_id']}/transcript")
    assert status == 200, transcript
    assert [e["text"] for e in transcript["events"] if e["kind"] == "dtmf"] == ["7", "*"], transcript
