"""Benchmark: attending only over what each call has filled of its KV ring (--filled-kv).

    python ops/bench/filled_kv.py                 # tiny random Moshi on this CPU, B = 16 and 32
    python ops/bench/filled_kv.py --device cuda --size 7b   # the same on a GPU (untested here)

For each B, the real MoshiEngine step is timed with moshi's full-mask attention and with
the filled-KV patch (service/worker/filled_kv.py), alternating rounds so that both see the
same machine, at three sets of call ages (each slot's ring set to its call's age):

- young: every call under 60 s (a worker just started, or a quiet hour);
- realistic: ages of calls in progress when call lengths are exponential with a mean of
  3 minutes (a call center's handling time; the age of a call in progress is then
  exponential with the same mean): about half of each ring is filled on average;
- old: every call past the 240 s context (every ring full).

First, the outputs: the same greedy stream (resets, idle steps, the ring wrapping) with
both attentions must give the same tokens, the text logits within float tolerance.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from service.wire import FRAME_SAMPLES  # noqa: E402
from service.worker.capacity import FRAME_RATE, set_context  # noqa: E402
from service.worker.checkpoint import load_checkpoint  # noqa: E402
from service.worker.engine import MoshiEngine  # noqa: E402
from service.worker.filled_kv import _attentions  # noqa: E402
from service.worker.tinymodel import build_tiny_checkpoint  # noqa: E402

MEAN_CALL_SECONDS = 180.0


def call_ages(kind: str, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """Steps since each slot's call began."""
    if kind == "young":
        seconds = rng.uniform(0, 60, batch_size)
    elif kind == "realistic":
        seconds = rng.exponential(MEAN_CALL_SECONDS, batch_size)
    else:
        seconds = rng.uniform(240, 720, batch_size)
    return np.round(seconds * FRAME_RATE).astype(np.int64)


def set_ages(lm, ages: np.ndarray) -> None:
    """Each slot's ring as deep as its call is old (the contents: whatever warm-up left)."""
    import torch

    for attention in _attentions(lm):
        state = attention._streaming_state
        state.kv_cache.end_offset.copy_(torch.as_tensor(ages, device=state.kv_cache.end_offset.device))
        state.offset.copy_(torch.as_tensor(ages, device=state.offset.device))


def timed_steps(engine: MoshiEngine, steps: int, seed: int) -> list[float]:
    B = engine.batch_size
    frames = (np.random.default_rng(seed).standard_normal((4, B, FRAME_SAMPLES)) * 0.05).astype(np.float32)
    active, fresh = np.ones(B, dtype=bool), np.zeros(B, dtype=bool)
    out = []
    for i in range(steps):
        started = time.perf_counter()
        engine.step(frames[i % 4], active, fresh)
        out.append((time.perf_counter() - started) * 1000)
    return out


def compare_outputs(make_model, steps: int = 380) -> dict:
    """Greedy, B=4, context 300 steps: the same stream through both attentions."""
    import torch

    results = []
    for filled in (False, True):
        model = make_model()
        set_context(model.lm, 300 / FRAME_RATE)
        engine = MoshiEngine(model, 4, greedy=True, filled_kv=filled)
        logits: list = []
        engine.lm_gen.on_text_logits_hook = lambda x, logits=logits: logits.append(x.detach().float().cpu().clone())
        rng = np.random.default_rng(7)
        tokens = []
        try:
            for t in range(steps):
                active = np.array([True, t % 9 != 4, t >= 40, True])
                fresh = np.array([t == 0, t in (0, 130), t == 40, t in (0, 310)])
                x = (rng.standard_normal((4, FRAME_SAMPLES)) * 0.1).astype(np.float32)
                out = engine.step(x, active, fresh)
                tokens.append(out.text_tokens.copy())
        finally:
            engine.close()
            set_context(model.lm, None)
        results.append((np.array(tokens), logits))
    (full_tokens, full_logits), (filled_tokens, filled_logits) = results
    diff = max(
        float((a - b).abs().max()) for a, b in zip(full_logits, filled_logits, strict=True) if torch.isfinite(a).all()
    )
    return {"steps": steps, "tokens_identical": bool((full_tokens == filled_tokens).all()), "max_logit_diff": diff}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=["tiny", "7b"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", default="16,32")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds per attention")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    import torch

    if args.device == "cpu":
        from service.worker.main import default_cpu_threads

        torch.set_num_threads(args.threads or default_cpu_threads())
    if args.size == "tiny":
        import tempfile

        tmp = tempfile.TemporaryDirectory(prefix="filled-kv-bench-")
        checkpoint = build_tiny_checkpoint(Path(tmp.name) / "tiny", seed=0)
        loaded = load_checkpoint(str(checkpoint), device=args.device)

        def make_model():
            return loaded
    else:
        from ops.bench.worker import random_7b_factory

        make_model = random_7b_factory(args.device, "bfloat16")
    lm = make_model().lm
    print(
        f"filled-KV attention vs moshi's full mask: {args.size} model on {args.device}, "
        f"context {lm.context} steps, torch threads {torch.get_num_threads()}"
    )

    check = compare_outputs(make_model)
    print(
        f"outputs over {check['steps']} greedy steps (resets, idle steps, the ring wrapping): tokens "
        f"{'identical' if check['tokens_identical'] else 'DIFFERENT'}, text logits within "
        f"{check['max_logit_diff']:.1e}"
    )

    rng = np.random.default_rng(1)
    rows = []
    print(
        f"\n{'B':>4} {'call ages':>10} {'mean fill':>10} {'full mask p50/p99 ms':>22} "
        f"{'filled-KV p50/p99 ms':>22} {'p50 change':>11}"
    )
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        ages = {kind: call_ages(kind, batch_size, rng) for kind in ("young", "realistic", "old")}
        times: dict[tuple[str, bool], list[float]] = {(k, f): [] for k in ages for f in (False, True)}
        for round_ in range(args.rounds):
            for filled in (False, True) if round_ % 2 == 0 else (True, False):
                engine = MoshiEngine(make_model(), batch_size, filled_kv=filled)
                try:
                    engine.warm_up()
                    for kind, age in ages.items():
                        set_ages(engine.lm, age)
                        timed_steps(engine, 3, round_)  # compiled kernels and caches warm
                        times[(kind, filled)] += timed_steps(engine, args.steps, round_)
                finally:
                    engine.close()
        for kind, age in ages.items():
            full, filled = np.asarray(times[(kind, False)]), np.asarray(times[(kind, True)])
            fill = float(np.minimum(age, lm.context).mean() / lm.context)
            row = {
                "B": batch_size,
                "ages": kind,
                "mean_fill": round(fill, 3),
                "full_p50_ms": round(float(np.median(full)), 2),
                "full_p99_ms": round(float(np.percentile(full, 99)), 2),
                "filled_p50_ms": round(float(np.median(filled)), 2),
                "filled_p99_ms": round(float(np.percentile(filled, 99)), 2),
            }
            row["p50_change"] = round(row["filled_p50_ms"] / row["full_p50_ms"] - 1, 3)
            rows.append(row)
            print(
                f"{batch_size:>4} {kind:>10} {fill:>9.0%} {row['full_p50_ms']:>11.1f}/{row['full_p99_ms']:<10.1f}"
                f" {row['filled_p50_ms']:>11.1f}/{row['filled_p99_ms']:<10.1f} {row['p50_change']:>+10.0%}",
                flush=True,
            )
    print(
        json.dumps(
            {
                "bench": "filled_kv",
                "size": args.size,
                "device": args.device,
                "threads": torch.get_num_threads(),
                "context_steps": lm.context,
                "mean_call_seconds": MEAN_CALL_SECONDS,
                "outputs": check,
                "rows": rows,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
