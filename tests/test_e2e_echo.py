"""`moshimoshi serve --model echo` answers real SIP peers and echoes their audio.

Peers: sipp (its built-in uac scenario, and a scenario playing Debian's PCMA and RFC 4733
captures), baresip (an independent SIP stack playing a WAV and recording what it hears),
and our own `moshimoshi call`.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from service.realtime import EVENT_LOOPS
from service.settings import CallSettings
from service.tools.call import place_call, read_wav
from tests.support.baresip import write_baresip_config
from tests.support.procs import free_port, free_port_pair
from tests.support.realtime import realtime_test
from tests.support.services import start_serve, wait_until
from tests.support.sipp import SCENARIOS, Sipp, media_port
from tests.support.tools import requires

pytestmark = pytest.mark.system

SIPP_AUDIO = Path("/usr/share/sip-tester/g711a.pcap")


def tone_wav(path: Path, seconds: float = 4.0, rate: int = 8000) -> Path:
    """A 440 Hz tone switched on and off at 1.5 Hz: easy to find again in an echo."""
    t = np.arange(int(rate * seconds)) / rate
    pcm = 0.3 * np.sin(2 * np.pi * 440 * t) * (np.sin(2 * np.pi * 1.5 * t) > 0)
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes((pcm * 32767).astype("<i2").tobytes())
    return path


def noise_bursts_wav(path: Path, seconds: float = 4.0, rate: int = 8000) -> Path:
    """Telephone-band noise in 200 ms bursts with 100 ms gaps: unlike a tone, it matches
    itself at one lag only, so an echo's delay and fidelity can be read off it."""
    rng = np.random.default_rng(7)
    n = int(rate * seconds)
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / rate)
    spectrum[(freqs < 300) | (freqs > 3400)] = 0
    noise = np.fft.irfft(spectrum, n)
    noise *= 0.25 / noise.std()
    envelope = (np.arange(n) % int(0.3 * rate)) < int(0.2 * rate)
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes((np.clip(noise * envelope, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def sound_segments(pcm: np.ndarray, rate: int = 8000) -> list[tuple[int, int]]:
    """(start, end) sample indices of the stretches of sound in ``pcm``: 10 ms blocks louder
    than a quiet floor, joined across gaps shorter than 30 ms, kept when at least 100 ms."""
    block = rate // 100
    loud = [np.abs(pcm[i : i + block].astype(np.float64)).mean() > 300 for i in range(0, len(pcm) - block, block)]
    segments: list[tuple[int, int]] = []
    for i, is_loud in enumerate(loud):
        if not is_loud:
            continue
        if segments and i * block - segments[-1][1] < 3 * block:
            segments[-1] = (segments[-1][0], (i + 1) * block)
        else:
            segments.append((i * block, (i + 1) * block))
    return [(a, b) for a, b in segments if b - a >= 10 * block]


def echo_delay(sent: np.ndarray, received: np.ndarray) -> tuple[float, float]:
    """(typical delay in ms, share of sounds that came back) for ``received`` as an echo of
    ``sent``. Each stretch of sound in ``sent`` is looked for in ``received`` 20 to 400 ms
    later; it came back when the best match correlates above 0.9. Sounds are matched one
    by one because the delay may move by a frame or two in the pauses between them (the
    jitter buffers on both sides adapt in silence), but never within one."""
    a, b = sent.astype(np.float64), received.astype(np.float64)
    lo, hi = 160, 3200
    delays, found, sounds = [], 0, 0
    for start, end in sound_segments(sent):
        window = a[start:end]
        span = b[start + lo : end + hi]
        if len(span) < len(window) + hi - lo:
            continue  # too close to the end of the recording to be heard back in it
        sounds += 1
        scores = np.correlate(span, window, mode="valid")
        lag = int(np.argmax(scores))
        match = span[lag : lag + len(window)]
        if match.std() > 0 and np.corrcoef(window, match)[0, 1] > 0.9:
            found += 1
            delays.append((lag + lo) / 8.0)
    if not sounds:
        return 0.0, 0.0
    return (float(np.median(delays)) if delays else 0.0), found / sounds


@pytest.fixture(scope="module", params=EVENT_LOOPS)
def echo_gateway(request, tmp_path_factory):
    """``moshimoshi serve --model echo`` on each event loop the service supports (uvloop, the
    production default, and asyncio), chosen the way an operator would: MOSHIMOSHI_EVENT_LOOP."""
    log_dir = tmp_path_factory.mktemp("echo-serve")
    # DTMF digits in clear: the tests check the digits the gateway decoded (masking: test_call_capture.py)
    gateway = start_serve(
        log_dir, "echo", env={"MOSHIMOSHI_EVENT_LOOP": request.param, "MOSHIMOSHI_DTMF_CLEAR": "true"}
    )
    try:
        gateway.wait_ready()
        assert f"event loop {request.param}" in gateway.proc.log(), gateway.proc.log()[-3000:]
        yield gateway
    finally:
        code = gateway.proc.stop()
        assert code in (0, -2, 130), f"serve exited {code}:\n{gateway.proc.log()[-3000:]}"


def ended_calls(gateway) -> list[dict]:
    status, body = gateway.get("/v1/calls?state=ended&limit=50")
    assert status == 200, body
    return body["calls"] if isinstance(body, dict) else body


async def test_sipp_builtin_uac_calls_complete(echo_gateway, tmp_path):
    sipp = Sipp(tmp_path, "-sn", "uac", f"127.0.0.1:{echo_gateway.sip_port}", "-mp", str(free_port()), "-d", "1000")
    sipp.args[sipp.args.index("-m") + 1] = "3"
    await sipp.start()
    await sipp.finished(within=60)


@requires(SIPP_AUDIO.exists(), "sip-tester's pcaps are not installed")
@pytest.mark.parametrize("transport", ["u1", "t1"])
async def test_sipp_audio_is_echoed_and_its_dtmf_digit_reported(echo_gateway, tmp_path, transport):
    # calls of earlier tests may still be ending: only a call that arrived after this one began counts
    began = time.time()
    sipp = Sipp(
        tmp_path,
        "-sf",
        str(SCENARIOS / "uac_pcma_dtmf.xml"),
        f"127.0.0.1:{echo_gateway.sip_port}",
        "-mp",
        str(media_port()),
        transport=transport,
    )
    await sipp.start()
    await sipp.finished(within=60)
    new = wait_until(
        lambda: [c for c in ended_calls(echo_gateway) if c["started_at"] >= began], 10, "the sipp call's record"
    )
    call = new[0]
    assert call["codec"] == "PCMA"
    assert call["end_reason"] == "remote-bye"
    status, detail = echo_gateway.get(f"/v1/calls/{call['id']}")
    assert status == 200, detail
    quality = detail["quality"]
    # sipp's A-law speech came in and the echo went back out as model audio. The pcap holds
    # a packet every 30 ms and sipp plays it for the scenario's 3 s pause, until the DTMF
    # pcap replaces it: about 100 packets.
    assert quality["packets_received"] > 90
    assert quality["model_packets"] > 100
    status, transcript = echo_gateway.get(f"/v1/calls/{call['id']}/transcript")
    assert status == 200, transcript
    digits = [e for e in transcript["events"] if e["kind"] == "dtmf"]
    assert [d["text"] for d in digits] == ["1"], transcript
    assert digits[0]["duration_ms"] > 50


@realtime_test()
async def test_moshimoshi_call_hears_its_own_audio_back(echo_gateway, tmp_path, timing):
    wav = noise_bursts_wav(tmp_path / "bursts.wav")
    settings = CallSettings(
        uri=echo_gateway.uri, play=str(wav), record=str(tmp_path / "out.wav"), seconds=4.0, local_host="127.0.0.1"
    )
    summary = await place_call(settings)
    assert summary["ended_by"] == "local-bye"
    assert summary["gateway_call_id"]
    with wave.open(summary["recording"]) as rec:
        frames = np.frombuffer(rec.readframes(rec.getnframes()), "<i2").reshape(-1, 2)
    delay_ms, correlation = echo_delay(frames[:, 0], frames[:, 1])
    # the share of the caller's sounds heard back: most of them on any machine, all of them on time
    assert correlation > 0.5, (delay_ms, correlation)
    timing.expect(correlation > 0.8, f"echo heard intact: {correlation:.2f} of the sounds")
    timing.expect(40 < delay_ms < 250, f"echo 40-250 ms late: {delay_ms}")  # 80 ms frame + buffers
    arrivals = summary["arrivals"]
    assert arrivals["packets_per_second"] > 25, arrivals  # the echo flowed all call long
    timing.expect(arrivals["packets_per_second"] == pytest.approx(50, abs=1.5), f"50 packets/s: {arrivals}")
    timing.expect(arrivals["sequence_gaps"] == 0, f"no packet lost on loopback: {arrivals}")


@requires(shutil.which("baresip") is not None, "baresip is not installed")
@pytest.mark.parametrize("transport", ["udp", "tcp"])
@realtime_test()
def test_baresip_calls_and_hears_the_echo(echo_gateway, tmp_path, timing, transport):
    tmp_path = Path(tempfile.mkdtemp(dir=tmp_path))  # a fresh folder per attempt
    began = time.time()
    wav = noise_bursts_wav(tmp_path / "bursts.wav", seconds=4.0)
    config = write_baresip_config(
        tmp_path / "baresip",
        port=free_port_pair(),
        source=wav,
        folder=tmp_path,
        account="<sip:baresip@127.0.0.1>;regint=0",
        rtp_ports=(31000, 31999),
    )
    target = echo_gateway.uri + (";transport=tcp" if transport == "tcp" else "")
    result = subprocess.run(
        ["baresip", "-f", str(config), "-e", f"/dial {target}", "-t", "10"], capture_output=True, text=True, timeout=40
    )
    output = result.stdout + result.stderr
    assert "Call established" in output, output[-3000:]
    calls = wait_until(
        lambda: [c for c in ended_calls(echo_gateway) if "baresip@" in c["from_uri"] and c["started_at"] >= began],
        10,
        "baresip's call record",
    )
    assert calls[0]["end_reason"] == "remote-bye", calls[0]
    received = sorted(tmp_path.glob("dump-*-dec.wav"))
    sent = sorted(tmp_path.glob("dump-*-enc.wav"))
    assert received and sent, output[-3000:]
    heard = read_wav(received[0])
    spoken = read_wav(sent[0])
    delay_ms, correlation = echo_delay(spoken, heard)
    assert correlation > 0.5, (delay_ms, correlation, output[-2000:])
    timing.expect(correlation > 0.8, f"echo heard intact: {correlation:.2f} of the sounds")
    timing.expect(40 < delay_ms < 400, f"echo 40-400 ms late: {delay_ms}")


def sip_options(port: int) -> str:
    """Send an out-of-dialog OPTIONS over UDP; return the status line of the answer."""
    import socket
    import uuid

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5)
        local = sock.getsockname()[1]
        message = (
            f"OPTIONS sip:agent@127.0.0.1:{port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{local};branch=z9hG4bK{uuid.uuid4().hex};rport\r\n"
            f"From: <sip:probe@127.0.0.1>;tag=p1\r\nTo: <sip:agent@127.0.0.1>\r\n"
            f"Call-ID: {uuid.uuid4().hex}\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n"
            f"Content-Length: 0\r\n\r\n"
        )
        sock.sendto(message.encode(), ("127.0.0.1", port))
        return sock.recv(65536).decode().split("\r\n", 1)[0]


@pytest.mark.system
async def test_concurrent_calls_each_hear_their_own_echo(echo_gateway, tmp_path):
    """As many calls as the worker has slots, at once: each hears its own audio back."""
    settings = []
    for i, freq in enumerate((300, 500, 700, 900)):
        t = np.arange(8000 * 3) / 8000
        path = tmp_path / f"tone{i}.wav"
        with wave.open(str(path), "wb") as wav:
            wav.setnchannels(1)
            wav.setsampwidth(2)
            wav.setframerate(8000)
            wav.writeframes((0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2").tobytes())
        settings.append(
            CallSettings(
                uri=echo_gateway.uri,
                play=str(path),
                record=str(tmp_path / f"out{i}.wav"),
                seconds=3.0,
                local_host="127.0.0.1",
            )
        )
    summaries = await asyncio.gather(*(place_call(s) for s in settings))
    for summary, freq in zip(summaries, (300, 500, 700, 900), strict=True):
        with wave.open(summary["recording"]) as rec:
            heard = np.frombuffer(rec.readframes(rec.getnframes()), "<i2").reshape(-1, 2)[4000:, 1]
        spectrum = np.abs(np.fft.rfft(heard.astype(np.float64)))
        peak_hz = np.argmax(spectrum) * 8000 / len(heard)
        assert abs(peak_hz - freq) < 10, (freq, peak_hz)  # its own tone, nobody else's


def test_options_probe_is_answered(echo_gateway):
    assert sip_options(echo_gateway.sip_port) == "SIP/2.0 200 OK"
