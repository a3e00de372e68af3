"""Benchmark: how many real-time calls one worker process carries, against Kyutai's moshi.server.

    python ops/bench/worker.py                          # tiny random Moshi on this CPU
    python ops/bench/worker.py --size 7b --device cuda  # the full 7B architecture, random bf16, CUDA graphs
    python ops/bench/worker.py --size 7b --device meta  # the 7B's memory per slot, no device needed

Part 1, the batched engine, for each context (default: the checkpoint's 240 s, then 120 s):
memory per slot (the KV ring, and every streaming-state tensor measured at B=1), then for
B = 1, 8, 16, 24, 32, 48, 64 (tiny on CPU: 1, 2, 4, ... 64, 96, 128) the real MoshiEngine step
(Mimi encode + LMGen step + Mimi decode for all B slots, sampling as in production, on
noise) timed over --steps steps after warm-up; a batch holds real time when its p99 is
under the 80 ms frame. Then the B the worker chooses by itself: service.worker.sizing's
search from the memory bound (on CPU from 128: --max-slots) down to the largest B whose p99
holds the step budget (--step-budget-ms, the worker's default 70 ms).

Part 2, Kyutai's server: ``python -m moshi.server`` with the SAME checkpoint files
(--moshi-weight/--mimi-weight/--tokenizer/--config-path, --device cpu, --static none) serves
one conversation at a time. A client streams Opus (sphn) to it at real time and the server's
own "frame handled in X ms" log gives its per-frame handling time. It carries 1 real-time
call if its p99 is under 80 ms, else 0. It gets the same number of torch threads as the
worker (OMP_NUM_THREADS), so both run on the same CPU budget. Two shims, both outside moshi: moshi.server's warm-up
calls torch.cuda.synchronize(), which fails on a CPU-only torch, so
ops/bench/moshi_server_shim/sitecustomize.py (first on its PYTHONPATH) makes that a no-op
without a GPU; and since moshi.server has no --mimi-config flag, the config it is given
names the tiny Mimi's config as a file:// path. Note that moshi.server always runs the LM in
bfloat16 (float16 with --half), while the worker runs float32 on CPU.

--size 7b builds the Moshi 7B architecture (moshi's own _lm_kwargs and stock Mimi) with
random weights in bfloat16 directly on the device: no download, no checkpoint files, so
part 2 is skipped there. On the meta device only the memory figures are computed. Readable
figures first; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from service.wire import FRAME_SAMPLES, FRAME_SECONDS  # noqa: E402
from service.worker.capacity import (  # noqa: E402
    FRAME_RATE,
    GPU_MEMORY_HEADROOM,
    PER_SLOT_OVERHEAD,
    kv_bytes_per_slot,
    memory_slots,
    set_context,
    streaming_state_bytes,
)
from service.worker.checkpoint import LoadedModel, ModelInfo, load_checkpoint  # noqa: E402
from service.worker.tinymodel import build_tiny_checkpoint  # noqa: E402

FRAME_MS = FRAME_SECONDS * 1000
GPU_SIZES_GIB = (79.2, 139.8)  # what an H100 80 GB and an H200 report as total memory
SHIM_DIR = Path(__file__).resolve().parent / "moshi_server_shim"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


# --- part 1: the batched engine ---------------------------------------------------------
def tiny_model_factory(checkpoint: Path, device: str):
    loaded: list[LoadedModel] = []

    def make() -> LoadedModel:  # loaded once: the context is set on it between parts
        if not loaded:
            loaded.append(load_checkpoint(str(checkpoint), device=device))
        return loaded[0]

    return make


def random_7b_factory(device: str, dtype: str):
    """The Moshi 7B LM and the stock Mimi, random weights, built once on ``device``."""
    import torch
    from moshi.models import loaders

    torch_dtype = getattr(torch, dtype)
    print(f"building the 7B architecture with random {dtype} weights on {device} ...", flush=True)
    started = time.monotonic()
    with torch.device(device):
        lm = loaders.get_moshi_lm(None, lm_kwargs=loaders._lm_kwargs, device=device, dtype=torch_dtype)
        mimi = loaders.get_mimi(None, loaders._mimi_config, device=device, num_codebooks=8)
    params = sum(p.numel() for p in lm.parameters()) / 1e9
    print(f"  {params:.2f} B LM parameters, built in {time.monotonic() - started:.0f} s", flush=True)
    info = ModelInfo(
        model="random-moshi-7b", license="n/a (random weights)", source="benchmark", context_steps=lm.context
    )
    model = LoadedModel(checkpoint=types.SimpleNamespace(lm_gen_config={}), mimi=mimi, lm=lm, tokenizer=None, info=info)
    return lambda: model  # the engine leaves streaming on close: the modules are reused


def memory_figures(model: LoadedModel, device: str) -> dict:
    """Per slot: the KV ring by its shapes, and every streaming-state tensor measured at B=1."""
    from moshi.models import LMGen

    kv = kv_bytes_per_slot(model.lm)
    measured = streaming_state_bytes(LMGen(model.lm, support_out_of_sync=True)) + streaming_state_bytes(model.mimi)
    out = {
        "context_steps": model.lm.context,
        "context_seconds": model.lm.context / FRAME_RATE,
        "kv_bytes_per_slot": kv,
        "state_bytes_per_slot_measured": measured,
    }
    if device != "meta":
        bound = memory_slots(model.lm, device)
        out.update(memory_slots=bound.slots, free_bytes=bound.free_bytes)
    else:  # what the worker's estimate would give on the GPUs a 7B is served on, weights loaded
        weights = sum(p.numel() * p.element_size() for p in model.lm.parameters())
        weights += sum(p.numel() * 4 for p in model.mimi.parameters())  # Mimi runs float32
        per_slot = kv * PER_SLOT_OVERHEAD
        out["weights_bytes"] = weights
        out["slots_if_gpu_gib"] = {
            str(gib): int(max(0.0, gib * 2**30 - weights) * GPU_MEMORY_HEADROOM // per_slot) for gib in GPU_SIZES_GIB
        }
    return out


def print_memory(figures: dict) -> None:
    unit, scale = ("GiB", 2**30) if figures["kv_bytes_per_slot"] > 2**30 else ("MiB", 2**20)
    line = (
        f"memory per slot at context {figures['context_seconds']:.0f} s ({figures['context_steps']} steps): "
        f"KV ring {figures['kv_bytes_per_slot'] / scale:.3f} {unit}, all streaming state (measured at B=1) "
        f"{figures['state_bytes_per_slot_measured'] / scale:.3f} {unit}"
    )
    if "memory_slots" in figures:
        free = figures.get("free_bytes")
        line += f"; {figures['memory_slots']} slot(s) fit" + (f" ({free / 2**30:.1f} GiB free)" if free else "")
    print(line, flush=True)
    if "slots_if_gpu_gib" in figures:
        print(
            f"  weights {figures['weights_bytes'] / 2**30:.1f} GiB; the worker's memory bound (90 % of what is "
            "left / (KV x 1.15)): "
            + ", ".join(f"{n} slots on a {gib} GiB GPU" for gib, n in figures["slots_if_gpu_gib"].items()),
            flush=True,
        )


def time_batch(make_model, batch_size: int, steps: int, cuda_graphs: bool, filled_kv: bool = False) -> dict:
    from service.worker.engine import MoshiEngine

    engine = MoshiEngine(make_model(), batch_size, greedy=False, cuda_graphs=cuda_graphs, filled_kv=filled_kv)
    try:
        warm = engine.warm_up()
        engine.fill_rings()  # every call past its context: the worst case (matters with --filled-kv)
        rng = np.random.default_rng(batch_size)
        active = np.ones(batch_size, dtype=bool)
        fresh = np.zeros(batch_size, dtype=bool)
        frames = (rng.standard_normal((8, batch_size, FRAME_SAMPLES)) * 0.05).astype(np.float32)
        durations = []
        for i in range(steps):
            started = time.perf_counter()
            engine.step(frames[i % len(frames)], active, fresh)  # returns host arrays: synchronised
            durations.append((time.perf_counter() - started) * 1000)
    finally:
        engine.close()
    p50, p99 = percentile(durations, 50), percentile(durations, 99)
    return {
        "B": batch_size,
        "p50_ms": round(p50, 2),
        "p99_ms": round(p99, 2),
        "max_ms": round(max(durations), 2),
        "warm_up_s": round(warm, 2),
        "realtime": p99 < FRAME_MS,
        "per_call_ms": round(p50 / batch_size, 2),
    }


def bench_engine(
    make_model, batch_sizes: list[int], steps: int, cuda_graphs: bool, filled_kv: bool = False
) -> list[dict]:
    print(f"batched engine: {steps} steps per batch size after warm-up; real time = p99 < {FRAME_MS:.0f} ms")
    print(f"{'B':>5} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9} {'ms/call':>9}  real time")
    import torch

    rows = []
    for batch_size in batch_sizes:
        try:
            row = time_batch(make_model, batch_size, steps, cuda_graphs, filled_kv)
        except torch.OutOfMemoryError:
            print(f"{batch_size:>5}  out of device memory: larger batches skipped")
            break
        finally:
            if torch.cuda.is_available():
                import gc

                gc.collect()  # the engine's CUDA graph pools may sit in reference cycles
                torch.cuda.empty_cache()
        rows.append(row)
        print(
            f"{row['B']:>5} {row['p50_ms']:>9.1f} {row['p99_ms']:>9.1f} {row['max_ms']:>9.1f} "
            f"{row['per_call_ms']:>9.2f}  {'yes' if row['realtime'] else 'no'}",
            flush=True,
        )
        if row["p50_ms"] > 2 * FRAME_MS:
            print("  (p50 is past twice the frame: larger batches skipped)")
            break
    return rows


def context_ab(
    make_model, contexts: list[float], batch_sizes: list[int], steps: int, rounds: int, cuda_graphs: bool
) -> list[dict]:
    """The contexts side by side: alternating rounds at each B, so that both see the same machine."""
    from service.worker.engine import MoshiEngine

    print(f"\ncontexts side by side ({rounds} alternating rounds of {steps} steps, every ring full):")
    rows = []
    for batch_size in batch_sizes:
        times: dict[float, list[float]] = {c: [] for c in contexts}
        for round_ in range(rounds):
            for context in contexts if round_ % 2 == 0 else contexts[::-1]:
                model = make_model()
                set_context(model.lm, context)
                engine = MoshiEngine(model, batch_size, greedy=False, cuda_graphs=cuda_graphs)
                try:
                    engine.warm_up()
                    engine.fill_rings()
                    frames = (
                        np.random.default_rng(round_).standard_normal((4, batch_size, FRAME_SAMPLES)) * 0.05
                    ).astype(np.float32)
                    active, fresh = np.ones(batch_size, dtype=bool), np.zeros(batch_size, dtype=bool)
                    for i in range(steps):
                        started = time.perf_counter()
                        engine.step(frames[i % 4], active, fresh)
                        times[context].append((time.perf_counter() - started) * 1000)
                finally:
                    engine.close()
        row = {"B": batch_size}
        for context in contexts:
            row[f"p50_ms_{context:g}s"] = round(percentile(times[context], 50), 2)
            row[f"p99_ms_{context:g}s"] = round(percentile(times[context], 99), 2)
        rows.append(row)
        print(
            f"  B={batch_size:<4} "
            + "; ".join(
                f"context {c:g} s: p50 {row[f'p50_ms_{c:g}s']:.1f} ms, p99 {row[f'p99_ms_{c:g}s']:.1f} ms"
                for c in contexts
            ),
            flush=True,
        )
    set_context(make_model().lm, None)
    return rows


def chosen_batch(
    make_model,
    device: str,
    budget_ms: float,
    steps: int,
    cuda_graphs: bool,
    filled_kv: bool = False,
    max_slots: int | None = None,
) -> dict:
    """The worker's own choice: service.worker.sizing from the memory bound (or ``max_slots``)."""
    import torch

    from service.worker.engine import MoshiEngine
    from service.worker.sizing import LIMIT, MEMORY, size_batch

    model = make_model()
    bound = memory_slots(model.lm, device)
    upper, reason = (max_slots, LIMIT) if max_slots is not None and max_slots < bound.slots else (bound.slots, MEMORY)

    def build(batch_size: int):
        return MoshiEngine(model, batch_size, greedy=False, cuda_graphs=cuda_graphs, filled_kv=filled_kv)

    engine, sizing = size_batch(
        build, budget_ms=budget_ms, upper=upper, upper_reason=reason, memory_slots=bound.slots, steps=steps
    )
    engine.close()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(f"the worker's own choice: {sizing.describe()}", flush=True)
    print(
        "  timing runs: "
        + ", ".join(
            f"B={t.batch_size} "
            + (
                "out of memory"
                if t.out_of_memory
                else f"p99 {t.p99_ms:.1f}{' (stopped early)' if t.steps < steps else ''}"
            )
            for t in sizing.trials
        ),
        flush=True,
    )
    return sizing.to_dict()


# --- part 2: Kyutai's moshi.server ------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moshi_server_config(checkpoint: Path, out: Path) -> Path:
    """The checkpoint's config.json, with the Mimi config as a local file:// path."""
    config = json.loads((checkpoint / "config.json").read_text())
    if config.get("mimi_config_name"):
        config["mimi_config_name"] = "file://" + str(checkpoint / config["mimi_config_name"])
    out.write_text(json.dumps(config))
    return out


async def drive_moshi_server(port: int, seconds: float) -> dict:
    """Stream Opus at real time to moshi.server; count what comes back."""
    import aiohttp
    import sphn

    writer = sphn.OpusStreamWriter(24000)
    rng = np.random.default_rng(0)
    sent = received_audio = received_text = 0
    async with aiohttp.ClientSession() as session, session.ws_connect(f"http://127.0.0.1:{port}/api/chat") as ws:
        handshake = await ws.receive()
        assert handshake.data == b"\x00", handshake

        async def reader() -> None:
            nonlocal received_audio, received_text
            async for message in ws:
                if message.type != aiohttp.WSMsgType.BINARY:
                    break
                if message.data[:1] == b"\x01":
                    received_audio += 1
                elif message.data[:1] == b"\x02":
                    received_text += 1

        reading = asyncio.create_task(reader())
        frames = int(seconds / FRAME_SECONDS)
        start = time.monotonic()
        for i in range(frames):
            pcm = (rng.standard_normal(FRAME_SAMPLES) * 0.05).astype(np.float32)
            opus = writer.append_pcm(pcm)
            if opus:
                await ws.send_bytes(b"\x01" + opus)
            sent += 1
            await asyncio.sleep(max(0.0, start + (i + 1) * FRAME_SECONDS - time.monotonic()))
        await asyncio.sleep(1.0)  # let the last frames come back
        await ws.close()
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
    return {"frames_sent": sent, "audio_messages": received_audio, "text_messages": received_text}


def bench_moshi_server(checkpoint: Path, seconds: float, skip_frames: int, threads: int) -> dict:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="moshi-server-bench-") as tmp:
        config = moshi_server_config(checkpoint, Path(tmp) / "config.json")
        log_path = Path(tmp) / "moshi-server.log"
        env = dict(
            os.environ,
            PYTHONUNBUFFERED="1",
            NO_COLOR="1",
            PYTHONPATH=os.pathsep.join([str(SHIM_DIR), os.environ.get("PYTHONPATH", "")]),
            HF_HUB_OFFLINE="1",
            OMP_NUM_THREADS=str(threads),
        )
        cmd = [
            sys.executable,
            "-m",
            "moshi.server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--device",
            "cpu",
            "--static",
            "none",
            "--moshi-weight",
            str(checkpoint / "model.safetensors"),
            "--mimi-weight",
            str(checkpoint / "tokenizer-e351c8d8-checkpoint125.safetensors"),
            "--tokenizer",
            str(checkpoint / "tokenizer_spm_32k_3.model"),
            "--config-path",
            str(config),
        ]
        print(
            f"\nmoshi.server: {' '.join(cmd[1:3])} ... (one conversation per process, "
            f"{threads} torch thread(s), {seconds:.0f} s of Opus at real time)",
            flush=True,
        )
        with log_path.open("w") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while "Access the Web UI" not in log_path.read_text():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moshi.server did not start:\n" + log_path.read_text()[-3000:])
                time.sleep(0.2)
            client = asyncio.run(drive_moshi_server(port, seconds))
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        text = re.sub(r"\x1b\[[0-9;]*m", "", log_path.read_text())
    handled = [float(ms) for ms in re.findall(r"frame handled in ([0-9.]+)ms", text)]
    measured = handled[skip_frames:]
    if not measured:
        raise RuntimeError("moshi.server logged no frame timings:\n" + text[-3000:])
    p50, p99 = percentile(measured, 50), percentile(measured, 99)
    keeps_up = p99 < FRAME_MS
    result = {
        "frames_handled": len(handled),
        "p50_ms": round(p50, 2),
        "p99_ms": round(p99, 2),
        "max_ms": round(max(measured), 2),
        "keeps_up": keeps_up,
        "lm_dtype": "bfloat16",
        "realtime_calls_per_process": 1 if keeps_up else 0,
        **client,
    }
    print(
        f"  per-frame handling over {len(measured)} frames (first {skip_frames} skipped): "
        f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {max(measured):.1f} ms -> "
        f"{'keeps up' if keeps_up else 'does NOT keep up'} with real time"
    )
    print(
        f"  client: sent {client['frames_sent']} frames, got {client['audio_messages']} Opus "
        f"and {client['text_messages']} text messages"
    )
    return result


# --- main -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=["tiny", "7b"], default="tiny")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, or meta (7b: memory figures only)")
    parser.add_argument("--dtype", default="bfloat16", help="7B weights dtype (tiny runs float32)")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated (default: see above)")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per batch size")
    parser.add_argument(
        "--context-seconds",
        default="240,120",
        help="comma-separated contexts to measure, each a full part 1 (default: 240,120)",
    )
    parser.add_argument(
        "--step-budget-ms",
        type=float,
        default=70.0,
        help="the budget of the worker's own choice of B (its default: 70)",
    )
    parser.add_argument("--skip-choice", action="store_true", help="no search for the worker's own B")
    parser.add_argument(
        "--max-slots",
        type=int,
        default=None,
        help="where the worker's own search starts if below the memory bound (the worker's "
        "--max-slots; default: the memory bound on a GPU, 128 on CPU)",
    )
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument(
        "--filled-kv",
        action="store_true",
        help="the worker's --filled-kv attention (timed at full rings, as the worker "
        "sizes B; ops/bench/filled_kv.py times other call ages)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads on CPU (default: the worker's, half the cores)"
    )
    parser.add_argument("--moshi-server-seconds", type=float, default=20.0)
    parser.add_argument("--skip-moshi-server", action="store_true")
    args = parser.parse_args(argv)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.device == "meta" and args.size != "7b":
        parser.error("--device meta is for --size 7b (memory figures only)")
    if args.device == "cpu":
        from service.worker.main import default_cpu_threads

        torch.set_num_threads(args.threads or default_cpu_threads())
    default_sizes = [1, 2, 4, 8, 16, 32, 64, 96, 128] if args.size == "tiny" else [1, 8, 16, 24, 32, 48, 64]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else default_sizes
    contexts = [float(c) for c in args.context_seconds.split(",") if c.strip()]
    timed = args.device != "meta"

    device_name = (
        torch.cuda.get_device_name(0)
        if args.device.startswith("cuda")
        else (
            "meta device (shapes only)"
            if args.device == "meta"
            else f"CPU, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
        )
    )
    print(f"worker benchmark: {args.size} model on {args.device} ({device_name}), torch {torch.__version__}")

    tmp = tempfile.TemporaryDirectory(prefix="worker-bench-")
    checkpoint: Path | None = None
    if args.size == "tiny":
        checkpoint = build_tiny_checkpoint(Path(tmp.name) / "tiny", seed=0)
        make_model = tiny_model_factory(checkpoint, args.device)
    else:
        make_model = random_7b_factory(args.device, args.dtype)

    parts = []
    for context in contexts:
        set_context(make_model().lm, context)
        print(f"\n== context {context:g} s ==", flush=True)
        part: dict = {"context_seconds": context, "memory": memory_figures(make_model(), args.device)}
        print_memory(part["memory"])
        if timed:
            rows = bench_engine(
                make_model, batch_sizes, args.steps, cuda_graphs=not args.no_cuda_graphs, filled_kv=args.filled_kv
            )
            realtime = [row["B"] for row in rows if row["realtime"]]
            part["batches"] = rows
            part["max_realtime_batch"] = max(realtime) if realtime else 0
            print(f"largest batch holding real time (p99 < {FRAME_MS:.0f} ms): B = {part['max_realtime_batch']}")
            if not args.skip_choice:
                part["chosen"] = chosen_batch(
                    make_model,
                    args.device,
                    args.step_budget_ms,
                    args.steps,
                    cuda_graphs=not args.no_cuda_graphs,
                    filled_kv=args.filled_kv,
                    max_slots=args.max_slots or (128 if args.device == "cpu" else None),
                )
        parts.append(part)

    first = parts[0]
    best = first.get("max_realtime_batch", 0)
    side_by_side = None
    if timed and len(contexts) > 1 and args.device == "cpu":  # a shared CPU drifts between parts; a GPU does not
        ab_sizes = [b for b in (32, 64) if b in batch_sizes] or batch_sizes[-1:]
        side_by_side = context_ab(
            make_model,
            contexts,
            ab_sizes,
            steps=max(20, args.steps // 2),
            rounds=4,
            cuda_graphs=not args.no_cuda_graphs,
        )
    if timed:
        print_summary(parts, batch_sizes)

    server: dict | None = None
    if args.size == "tiny" and not args.skip_moshi_server and args.device == "cpu":
        assert checkpoint is not None
        try:
            server = bench_moshi_server(
                checkpoint, args.moshi_server_seconds, skip_frames=5, threads=torch.get_num_threads()
            )
        except Exception as exc:  # report it, keep the engine figures
            print(f"  moshi.server run failed: {exc}")
            server = {"error": str(exc)[-500:]}
    elif args.size != "tiny":
        print("\nmoshi.server comparison skipped: the random 7B has no checkpoint files to give it")

    ratio = None
    if server and "realtime_calls_per_process" in server:
        theirs = server["realtime_calls_per_process"]
        ratio = (best / theirs) if theirs else None
        print(
            f"\nreal-time calls per process: worker {best}, moshi.server {theirs}"
            + (f" -> {ratio:.0f}x" if ratio else " (moshi.server does not keep up: ratio undefined)")
        )
    tmp.cleanup()
    print(
        json.dumps(
            {
                "bench": "worker",
                "size": args.size,
                "device": args.device,
                "device_name": device_name,
                "torch": torch.__version__,
                "steps": args.steps,
                "step_budget_ms": args.step_budget_ms,
                "filled_kv": args.filled_kv,
                "contexts": parts,
                "contexts_side_by_side": side_by_side,
                "batches": first.get("batches"),
                "max_realtime_batch": best,
                "realtime_calls_per_process": best,
                "moshi_server": server,
                "ratio_vs_moshi_server": ratio,
            }
        )
    )
    return 0


def print_summary(parts: list[dict], batch_sizes: list[int]) -> None:
    """One table: step p50/p99 per B, a column pair per context, and the worker's choice."""
    print("\nsummary (step ms, p50/p99; '-' not run):")
    titles = ["ctx {:g} s".format(part["context_seconds"]) for part in parts]
    header = f"{'B':>5}" + "".join(f" {title:>17}" for title in titles)
    print(header)
    for batch_size in batch_sizes:
        cells = []
        for part in parts:
            row = next((r for r in part.get("batches", []) if r["B"] == batch_size), None)
            cells.append(f"{row['p50_ms']:7.1f}/{row['p99_ms']:<7.1f}" if row else f"{'-':>15}")
        print(f"{batch_size:>5}" + "".join(f" {c:>17}" for c in cells))
    chosen = []
    for part in parts:
        c = part.get("chosen")
        chosen.append(f"B={c['slots']} ({c['reason']})" if c else "-")
    print(f"{'own':>5}" + "".join(f" {c:>17}" for c in chosen))
    mem = [f"{p['memory']['kv_bytes_per_slot'] / 2**20:.1f} MiB" for p in parts]
    print(f"{'KV':>5}" + "".join(f" {m:>17}" for m in mem) + "  per slot")


if __name__ == "__main__":
    raise SystemExit(main())
