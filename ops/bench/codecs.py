"""What each codec gives the model: the spectrum that reaches the worker, and CPU per call.

For PCMU, PCMA, G.722 and Opus, a wideband test signal goes the way a caller's audio goes:
the caller's phone resamples it to the codec's rate (soxr HQ) and encodes it; the gateway
decodes it with the codec it runs and resamples it to the model's 24 kHz with the bridge it
runs (service.gateway.media.bridge.MediaBridge). What comes out is what the worker hears.

Signals: a linear chirp 100 Hz – 11.9 kHz (equal energy per Hz: the band shares show the
codec's passband directly), and espeak-ng speech (its voice reaches about 11 kHz) when
espeak-ng is installed. Two figures per band (0.3–3.4 kHz, 3.4–7 kHz, 7–12 kHz):

- **kept**: the band's energy as received over its energy at the source (resampled to 24 kHz
  by soxr HQ); the path has unity gain, so this is the codec's passband as the model sees it;
- **share**: the part of the received signal's energy (above 300 Hz) that lies in the band:
  how much of what the model hears is above the telephone band.

The way back (model → caller: the gateway's bridge and encoder, the caller's decoder) is
measured the same way on the chirp.

CPU per call: what the gateway spends per 20 ms of call, both directions: decode one packet
and resample it to 24 kHz (a quarter of an 80 ms frame), resample a quarter of a model frame
to the codec's rate and encode one packet; the median over many frames, one thread.

The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from service.gateway.media.bridge import MediaBridge  # noqa: E402
from sip import codecs  # noqa: E402

MODEL_RATE = 24000
PTIME_MS = 20
BANDS = {"0.3-3.4k": (300, 3400), "3.4-7k": (3400, 7000), "7-12k": (7000, 12000)}
SPEECH = (
    "Moshi moshi. This is a test of the wideband path: fricatives such as s, sh, f and th "
    "carry most of their energy above four kilohertz, where the telephone band stops."
)


def chirp(rate: int = 48000, seconds: float = 4.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    f0, f1 = 100.0, 11900.0
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds))
    return (0.3 * np.sin(phase)).astype(np.float32)


def espeak_speech() -> tuple[np.ndarray, int] | None:
    if shutil.which("espeak-ng") is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speech.wav"
        subprocess.run(["espeak-ng", "-w", str(path), SPEECH], check=True, capture_output=True)
        with wave.open(str(path)) as wav:
            rate = wav.getframerate()
            pcm = np.frombuffer(wav.readframes(wav.getnframes()), "<i2").astype(np.float32) / 32768
    return pcm * (0.3 / max(1e-6, float(np.abs(pcm).max()))), rate


def resample(pcm: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    import soxr

    return pcm if rate_in == rate_out else soxr.resample(pcm, rate_in, rate_out, quality="HQ").astype(np.float32)


def to_int16(pcm: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(pcm * 32767), -32768, 32767).astype(np.int16)


def band_energies(pcm: np.ndarray, rate: int) -> dict[str, float]:
    spectrum = np.abs(np.fft.rfft(pcm.astype(np.float64) / 32768 * np.hanning(len(pcm)))) ** 2
    freqs = np.fft.rfftfreq(len(pcm), 1 / rate)
    out = {name: float(spectrum[(freqs >= lo) & (freqs < hi)].sum()) for name, (lo, hi) in BANDS.items()}
    out["all"] = float(spectrum[freqs >= 300].sum())
    return out


def compare(received: np.ndarray, source: np.ndarray) -> dict[str, dict[str, float]]:
    """Per band: ``kept`` (received / source energy) and ``share`` (of the received energy)."""
    n = min(len(received), len(source))
    got, ref = band_energies(received[:n], MODEL_RATE), band_energies(source[:n], MODEL_RATE)
    return {
        "kept": {band: got[band] / ref[band] for band in BANDS},
        "share": {band: got[band] / (got["all"] or 1.0) for band in BANDS},
        "source_share": {band: ref[band] / (ref["all"] or 1.0) for band in BANDS},
    }


def caller_to_worker(spec: codecs.CodecSpec, source: np.ndarray, source_rate: int) -> tuple[np.ndarray, int]:
    """The caller's phone encodes ``source``; the gateway decodes and bridges it to 24 kHz.
    Returns the 24 kHz audio the worker gets and the payload bytes sent."""
    at_codec = to_int16(resample(source, source_rate, spec.sample_rate))
    samples = spec.samples(PTIME_MS)
    encoder, decoder = codecs.encoder(spec, PTIME_MS), codecs.decoder(spec)
    bridge = MediaBridge(packet_samples=samples, rate=spec.sample_rate)
    frames, octets = [], 0
    for i in range(len(at_codec) // samples):
        payload = encoder.encode(at_codec[i * samples : (i + 1) * samples])
        octets += len(payload)
        frame = bridge.caller_audio(decoder.decode(payload))
        if frame is not None:
            frames.append(np.frombuffer(frame, "<i2"))
    return np.concatenate(frames), octets


def worker_to_caller(spec: codecs.CodecSpec, model_audio: np.ndarray) -> np.ndarray:
    """The gateway bridges 24 kHz model frames to the codec and encodes them; the caller's
    phone decodes them. Returned at 24 kHz (soxr HQ) to compare spectra."""
    samples = spec.samples(PTIME_MS)
    encoder, decoder = codecs.encoder(spec, PTIME_MS), codecs.decoder(spec)
    bridge = MediaBridge(packet_samples=samples, rate=spec.sample_rate)
    heard = []
    pcm24 = to_int16(model_audio)
    for i in range(len(pcm24) // 1920):
        for packet in bridge.model_audio(pcm24[i * 1920 : (i + 1) * 1920].tobytes()):
            heard.append(decoder.decode(encoder.encode(packet)))
    return resample(np.concatenate(heard).astype(np.float32), spec.sample_rate, MODEL_RATE)


def cpu_per_20ms(spec: codecs.CodecSpec, frames: int) -> dict[str, float]:
    """Median µs the gateway spends per 20 ms of one call, by part."""
    samples = spec.samples(PTIME_MS)
    packets_per_frame = 80 // PTIME_MS
    rng = np.random.default_rng(5)
    caller = to_int16(
        resample(chirp(), 48000, spec.sample_rate)
        + 0.01 * rng.standard_normal(int(4 * spec.sample_rate)).astype(np.float32)
    )
    model = to_int16(resample(chirp(), 48000, MODEL_RATE))
    peer_encoder = codecs.encoder(spec, PTIME_MS)
    payloads = [peer_encoder.encode(caller[i * samples : (i + 1) * samples]) for i in range(len(caller) // samples)]
    decoder, encoder = codecs.decoder(spec), codecs.encoder(spec, PTIME_MS)
    bridge = MediaBridge(packet_samples=samples, rate=spec.sample_rate)
    parts: dict[str, list[float]] = {"decode": [], "resample_in": [], "resample_out": [], "encode": []}
    clock = time.perf_counter
    for n in range(frames):
        decoded = []
        t0 = clock()
        for k in range(packets_per_frame):
            decoded.append(decoder.decode(payloads[(n * packets_per_frame + k) % len(payloads)]))
        t1 = clock()
        for pcm in decoded:
            bridge.caller_audio(pcm)
        t2 = clock()
        start = (n * 1920) % (len(model) - 1920)
        packets = bridge.model_audio(model[start : start + 1920].tobytes())
        t3 = clock()
        for packet in packets:
            encoder.encode(packet)
        t4 = clock()
        for key, value in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            value_us = value * 1e6 / packets_per_frame
            parts[key].append(value_us)
    out = {key: float(np.median(values)) for key, values in parts.items()}
    out["total"] = sum(out.values())
    return out


def run(frames: int) -> dict:
    source_chirp = chirp()
    signals = {"chirp": (source_chirp, 48000)}
    speech = espeak_speech()
    if speech is not None:
        signals["speech"] = speech
    rows = []
    for name in ("PCMU", "PCMA", "G722", "opus"):
        if name not in codecs.available():
            print(f"{name}: not available here (its package is not installed)")
            continue
        spec = codecs.spec(name)
        row: dict = {"codec": name, "audio_rate": spec.sample_rate}
        for signal, (pcm, rate) in signals.items():
            received, octets = caller_to_worker(spec, pcm, rate)
            row[signal] = compare(received, to_int16(resample(pcm, rate, MODEL_RATE)))
            row["kbit_s"] = octets * 8 / (len(pcm) / rate) / 1000
        model_chirp = to_int16(resample(source_chirp, 48000, MODEL_RATE))
        row["to_caller"] = compare(worker_to_caller(spec, model_chirp / 32768), model_chirp)
        row["cpu_us_per_20ms"] = cpu_per_20ms(spec, frames)
        rows.append(row)

    print(
        f"Caller → worker at the model's 24 kHz, {PTIME_MS} ms packets. kept: band energy received / at "
        f"the source; share: part of the received energy in the band. CPU: the gateway's work per "
        f"20 ms of one call, µs (median of {frames} frames, one thread)."
    )
    if rows:
        for signal in signals:
            ref = rows[0][signal]["source_share"]
            print(f"source {signal}: share " + ", ".join(f"{b} {ref[b] * 100:.1f} %" for b in BANDS))
    header = (
        f"{'codec':<6} {'Hz':>6} {'kbit/s':>6} | {'chirp kept 3.4-7k':>17} {'7-12k':>6} | "
        f"{'speech share 3.4-7k':>19} {'7-12k':>6} | {'back kept 3.4-7k':>16} {'7-12k':>6} | "
        f"{'dec':>5} {'rs in':>5} {'rs out':>6} {'enc':>5} {'CPU':>6}"
    )
    print(header)
    print("-" * len(header))

    def pct(value: float) -> str:
        return f"{value * 100:.1f}%"

    for row in rows:
        c, b, cpu = row["chirp"]["kept"], row["to_caller"]["kept"], row["cpu_us_per_20ms"]
        sp = row["speech"]["share"] if "speech" in row else None
        speech_cols = f"{pct(sp['3.4-7k']):>19} {pct(sp['7-12k']):>6}" if sp else f"{'-':>19} {'-':>6}"
        print(
            f"{row['codec']:<6} {row['audio_rate']:>6} {row['kbit_s']:>6.1f} | {pct(c['3.4-7k']):>17} "
            f"{pct(c['7-12k']):>6} | {speech_cols} | {pct(b['3.4-7k']):>16} {pct(b['7-12k']):>6} | "
            f"{cpu['decode']:>5.1f} {cpu['resample_in']:>5.1f} {cpu['resample_out']:>6.1f} "
            f"{cpu['encode']:>5.1f} {cpu['total']:>6.1f}"
        )

    def rounded(tree: dict) -> dict:
        return {
            k: rounded(v) if isinstance(v, dict) else round(v, 4) if isinstance(v, float) else v
            for k, v in tree.items()
        }

    return {
        "benchmark": "codecs",
        "ptime_ms": PTIME_MS,
        "signals": list(signals),
        "codecs": [rounded(row) for row in rows],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=500, help="80 ms frames timed per codec for CPU")
    args = parser.parse_args()
    print(json.dumps(run(args.frames)))


if __name__ == "__main__":
    main()
