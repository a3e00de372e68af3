"""Benchmark of the callers' transcript: ASR real-time factor per batch size, and the delay
from the end of a caller's utterance to its text, through the real path.

1. **Batches.** The ASR backend (faster-whisper, as ``moshimoshi asr`` runs it) transcribes
   B utterances of espeak-ng Japanese speech at once, for B = 1, 2, 4, ...: the time per
   batch and the real-time factor (batch time / audio in the batch; lower is better, 1/RTF
   is the call-seconds one worker can keep up with).
2. **Delay.** An ASR worker serves C simulated calls on loopback; each call's caller says
   three sentences separated by 1 s silences, fed at real time in 20 ms packets at 8 kHz
   through the gateway-side ``CallerTranscriber`` (resampled to 16 kHz and streamed; the
   worker's batched Silero VAD cuts the utterances). Measured: from the end of the speech
   as the worker's VAD placed it to its text at the gateway (``VAD end → text``, p50/p99),
   and from the true end of the speech (adds the VAD's 400 ms of silence that ends an
   utterance); the gateway side's CPU per call-second (resampling, queueing, the socket),
   and the worker's VAD CPU per call-second.
3. **VAD.** Silero VAD over C calls' audio: run per call (each call its own model run per
   32 ms window, as a gateway running it would) and batched across the calls (one run per
   window of every call, as the worker runs it): CPU per call-second and their ratio.

Models: ``--model tiny`` (default: the tiny random Whisper of the tests and ``demo``),
``--model kotoba-v2`` (kotoba-whisper-v2.0's real architecture, Whisper large-v3's encoder
with 2 decoder layers, at random weights: its speed is the real model's, its text is not),
or a CTranslate2 Whisper directory or repo id. Random weights loop to the length bound, so
their decode time is a worst case. The last line is JSON.

    python ops/bench/asr.py                                   # tiny, CPU, one thread
    python ops/bench/asr.py --device cuda --model kotoba-v2   # a GPU
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from service.asr.tinywhisper import SHAPES, build_whisper  # noqa: E402

SENTENCES = (
    "おでんわ ありがとう ございます。",
    "きょうは いい てんき ですね。",
    "あしたの ごぜんちゅうに とどきます。",
    "ごちゅうもんの かくにん ですね。 おなまえを おねがいします。",
)
RATE = 8000
CHUNK_MS = 20


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def espeak(text: str, rate: int) -> np.ndarray:
    import io
    import subprocess
    import wave

    import soxr

    out = subprocess.run(["espeak-ng", "-v", "ja", "--stdout", text], capture_output=True, check=True).stdout
    with wave.open(io.BytesIO(out)) as w:
        native = w.getframerate()
        samples = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768
    loud = np.flatnonzero(np.abs(samples) > 0.01)
    return soxr.resample(samples[loud[0] : loud[-1] + 1], native, rate).astype(np.float32)


def prepare_model(name: str, device: str, workdir: Path) -> tuple[str, str]:
    """(path or repo id, description)."""
    if name in SHAPES:
        dtype = "float16" if device == "cuda" and name != "tiny" else "float32"
        started = time.perf_counter()
        path = build_whisper(workdir / name, SHAPES[name], dtype=dtype)
        shape = SHAPES[name]
        return str(path), (
            f"{name} at random weights (d_model {shape.d_model}, {shape.encoder_layers}+"
            f"{shape.decoder_layers} layers, {shape.n_mels} mels, {dtype}; built in "
            f"{time.perf_counter() - started:.0f} s)"
        )
    return name, name


def bench_batches(backend, sizes: list[int], repeats: int, utterances: list[np.ndarray]) -> list[dict]:
    rows = []
    backend.transcribe_sync(utterances[:1])  # warm-up
    for size in sizes:
        batch = [utterances[i % len(utterances)] for i in range(size)]
        audio = sum(len(a) for a in batch) / 16000
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            results = backend.transcribe_sync(batch)
            times.append(time.perf_counter() - started)
            assert len(results) == size and all(r.error is None for r in results)
        p50 = statistics.median(times)
        rows.append(
            {
                "batch": size,
                "audio_s": round(audio, 2),
                "batch_ms_p50": round(p50 * 1000, 1),
                "batch_ms_max": round(max(times) * 1000, 1),
                "rtf": round(p50 / audio, 4),
                "per_utterance_ms": round(p50 * 1000 / size, 1),
            }
        )
    return rows


def bench_vad(calls: list[int], speech: np.ndarray, seconds: float = 10.0) -> list[dict]:
    """CPU per call-second of Silero VAD per call vs batched across the calls."""
    import soxr

    from service.asr.vad import WINDOW_SAMPLES, SileroVad, batch_inputs, commit_batch

    model = SileroVad()
    audio = soxr.resample(np.resize(speech, int(seconds * RATE)), RATE, 16000).astype(np.float32)
    chunk = 16000 * 80 // 1000  # the 80 ms a gateway's tap gives at a time
    rows = []
    for count in calls:
        streams = [model.stream() for _ in range(count)]
        started = time.thread_time()
        for k in range(0, len(audio), chunk):
            for stream in streams:
                stream.process(audio[k : k + chunk])
        per_call = time.thread_time() - started
        streams = [model.stream() for _ in range(count)]
        started = time.thread_time()
        for k in range(0, len(audio), chunk):
            for stream in streams:
                stream.push(audio[k : k + chunk])
            while streams[0].pending:
                windows, states = batch_inputs(streams)
                probabilities, new_states = model.run(windows, states)
                commit_batch(streams, probabilities, new_states)
            for stream in streams:
                stream.take()
        batched = time.thread_time() - started
        call_seconds = count * len(audio) / 16000
        rows.append(
            {
                "calls": count,
                "windows": count * (len(audio) // WINDOW_SAMPLES),
                "per_call_cpu_ms_per_call_s": round(per_call * 1000 / call_seconds, 2),
                "batched_cpu_ms_per_call_s": round(batched * 1000 / call_seconds, 2),
                "ratio": round(per_call / batched, 1) if batched else None,
            }
        )
    return rows


def metric_value(text: str, name: str) -> float:
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(name + " ") or line.startswith(name + "{")
    )


async def one_call(index: int, url: str, speech: np.ndarray, spans: list[tuple[float, float]], results: dict) -> None:
    from service.asr.client import AsrWorkerFinder, CallerEvent, CallerTranscriber

    arrivals: list[tuple[float, CallerEvent]] = []
    started = time.monotonic() + index * 0.037 % 1.0  # calls do not speak in lockstep
    transcriber = CallerTranscriber(
        f"bench-{index}",
        AsrWorkerFinder(url=url),
        lambda e: arrivals.append((time.monotonic(), e)),
        rate=RATE,
        clock=lambda: time.monotonic() - started,
    )
    size = RATE * CHUNK_MS // 1000
    await asyncio.sleep(max(0.0, started - time.monotonic()))
    cpu = 0.0
    for k in range(0, len(speech) - size + 1, size):
        pcm = (speech[k : k + size] * 32767).astype("<i2").tobytes()
        t0 = time.thread_time()
        transcriber.feed(pcm, k / RATE)
        cpu += time.thread_time() - t0
        delay = started + (k + size) / RATE - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
    await transcriber.close(timeout=60)
    results["gateway_cpu_s"] += cpu
    results["call_s"] += len(speech) / RATE
    results["end_to_text"].extend(transcriber.text_delays)
    results["lost"] += transcriber.failed
    results["lost_s"] += transcriber.lost_seconds
    results["texts"] += transcriber.transcribed
    for arrived, event in arrivals:
        if event.kind != "caller":
            continue
        truth = min(spans, key=lambda s: abs(s[0] - event.start))
        results["speech_end_to_text"].append(arrived - (started + truth[1]))


async def bench_delay(
    settings, model_path: str, calls: int, speech: np.ndarray, spans: list[tuple[float, float]]
) -> dict:
    from service.asr.main import serve_asr

    listening: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    server = asyncio.create_task(serve_asr(settings, on_listening=listening.set_result))
    port = await listening
    import httpx

    await asyncio.sleep(0)
    for _ in range(6000):  # the model loads in a thread; /readyz says when it is ready
        async with httpx.AsyncClient() as client:
            if (await client.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                break
        await asyncio.sleep(0.1)
    results: dict = {
        "end_to_text": [],
        "speech_end_to_text": [],
        "lost": 0,
        "lost_s": 0.0,
        "texts": 0,
        "gateway_cpu_s": 0.0,
        "call_s": 0.0,
    }
    url = f"ws://127.0.0.1:{port}/v1/asr"
    async with httpx.AsyncClient() as client:
        before = metric_value(
            (await client.get(f"http://127.0.0.1:{port}/metrics")).text, "moshimoshi_asr_vad_cpu_seconds_total"
        )
    await asyncio.gather(*(one_call(i, url, speech, spans, results) for i in range(calls)))
    async with httpx.AsyncClient() as client:
        after = metric_value(
            (await client.get(f"http://127.0.0.1:{port}/metrics")).text, "moshimoshi_asr_vad_cpu_seconds_total"
        )
        await client.post(f"http://127.0.0.1:{port}/v1/drain")
    with contextlib.suppress(Exception):
        await asyncio.wait_for(server, 30)
    ms = [d * 1000 for d in results["end_to_text"]]
    speech_ms = [d * 1000 for d in results["speech_end_to_text"]]
    return {
        "calls": calls,
        "utterances": results["texts"],
        "lost": results["lost"],
        "end_to_text_ms_p50": round(percentile(ms, 50), 1),
        "end_to_text_ms_p99": round(percentile(ms, 99), 1),
        "speech_end_to_text_ms_p50": round(percentile(speech_ms, 50), 1),
        "speech_end_to_text_ms_p99": round(percentile(speech_ms, 99), 1),
        "audio_lost_s": round(results["lost_s"], 2),
        "gateway_cpu_ms_per_call_s": round(results["gateway_cpu_s"] * 1000 / max(results["call_s"], 1e-9), 2),
        "worker_vad_cpu_ms_per_call_s": round((after - before) * 1000 / max(results["call_s"], 1e-9), 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny, kotoba-v2 (random weights), a directory or repo id")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--compute-type", default="default")
    parser.add_argument("--cpu-threads", type=int, default=1)
    parser.add_argument("--batches", default="1,2,4,8,16", help="batch sizes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", default="1,8", help="concurrent calls for the delay measurement")
    parser.add_argument("--max-batch", type=int, default=8, help="the worker's batch limit for the delay run")
    parser.add_argument("--vad-calls", default="1,16,64", help="calls for the VAD comparison")
    args = parser.parse_args()

    from service.asr.backends import FasterWhisperBackend
    from service.settings import AsrSettings

    voices16 = [espeak(text, 16000) for text in SENTENCES]
    voices8 = [espeak(text, RATE) for text in SENTENCES[:3]]
    parts, spans, position = [np.zeros(RATE // 2, np.float32)], [], RATE // 2
    for voice in voices8:
        spans.append((position / RATE, (position + len(voice)) / RATE))
        parts += [voice, np.zeros(RATE, np.float32)]
        position += len(voice) + RATE
    call_audio = np.concatenate(parts)

    with tempfile.TemporaryDirectory(prefix="asr-bench-") as tmp:
        model_path, described = prepare_model(args.model, args.device, Path(tmp))
        backend = FasterWhisperBackend(
            model_path, device=args.device, compute_type=args.compute_type, cpu_threads=args.cpu_threads
        )
        sizes = [int(b) for b in args.batches.split(",")]
        batch_rows = bench_batches(backend, sizes, args.repeats, voices16)
        settings = AsrSettings(
            model=model_path,
            device=args.device,
            compute_type=args.compute_type,
            cpu_threads=args.cpu_threads,
            host="127.0.0.1",
            port=0,
            log_level="warning",
            max_batch=args.max_batch,
            drain_grace_seconds=60.0,
        )
        delay_rows = [
            asyncio.run(bench_delay(settings, model_path, int(c), call_audio, spans)) for c in args.calls.split(",")
        ]
    vad_rows = bench_vad([int(c) for c in args.vad_calls.split(",")], call_audio)

    device = args.device
    if device == "cuda":
        with contextlib.suppress(Exception):
            import torch

            device = f"cuda ({torch.cuda.get_device_name(0)})"
    print(f"model: {described}")
    print(
        f"device: {device}, compute type {args.compute_type}, {args.cpu_threads} CPU thread(s); "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    )
    print(f"utterances: espeak-ng Japanese, {', '.join(f'{len(v) / 16000:.1f}' for v in voices16)} s")
    print()
    print("batch | audio s | batch ms p50 | max | per utterance ms | RTF")
    for row in batch_rows:
        print(
            f"{row['batch']:5d} | {row['audio_s']:7.1f} | {row['batch_ms_p50']:12.1f} | {row['batch_ms_max']:6.1f} |"
            f" {row['per_utterance_ms']:16.1f} | {row['rtf']:.4f}"
        )
    print()
    print(
        "calls | utterances | failed | lost s | VAD end → text ms p50 / p99 | speech end → text ms p50 / p99 | "
        "gateway CPU ms per call-s | worker VAD CPU ms per call-s"
    )
    for row in delay_rows:
        print(
            f"{row['calls']:5d} | {row['utterances']:10d} | {row['lost']:6d} | {row['audio_lost_s']:6.2f} | "
            f"{row['end_to_text_ms_p50']:8.1f} / {row['end_to_text_ms_p99']:8.1f} | "
            f"{row['speech_end_to_text_ms_p50']:8.1f} / {row['speech_end_to_text_ms_p99']:8.1f} | "
            f"{row['gateway_cpu_ms_per_call_s']:.2f} | {row['worker_vad_cpu_ms_per_call_s']:.2f}"
        )
    print()
    print("Silero VAD, CPU ms per call-second: per call (a run per call) | batched (a run per window of all calls)")
    for row in vad_rows:
        print(
            f"{row['calls']:5d} calls | {row['per_call_cpu_ms_per_call_s']:6.2f} | "
            f"{row['batched_cpu_ms_per_call_s']:6.2f} | ×{row['ratio']}"
        )
    print(
        json.dumps(
            {
                "bench": "asr",
                "model": args.model,
                "device": device,
                "batches": batch_rows,
                "delay": delay_rows,
                "vad": vad_rows,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
