"""The batched engine on the tiny model: per-slot reset, exec masks, ungenerated tokens, long calls.

Exactness, and why it is asserted against an engine of the same batch size: on CPU, MKL
multiplies a 1-row and a 3-row batch with different kernels, so the same stream in a batch
of 1 and a batch of 3 differs by ~1e-7 in float (rows of one batch never influence each
other). Every slot behaviour is therefore checked bit for bit against a fresh engine of
the same size, and the B=1 comparison checks the same text tokens with PCM within 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest

from service.worker.checkpoint import load_checkpoint
from service.worker.engine import MoshiEngine
from service.worker.engine_api import NO_TOKEN, StepOutput
from service.worker.tinymodel import build_tiny_checkpoint

STEPS = 14
RESET_AT = 6


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0)


def engine(path, batch_size: int) -> MoshiEngine:
    return MoshiEngine(load_checkpoint(str(path), device="cpu"), batch_size, greedy=True)


def noise(seed: int, steps: int, slots: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((steps, slots, 1920)) * 0.1).astype(np.float32)


def run(eng: MoshiEngine, inputs: np.ndarray, active: np.ndarray, fresh: np.ndarray) -> list[StepOutput]:
    """Step ``eng`` over [T, B, 1920] inputs with [T, B] active/fresh masks."""
    return [eng.step(inputs[t], active[t], fresh[t]) for t in range(len(inputs))]


def masks(steps: int, slots: int) -> tuple[np.ndarray, np.ndarray]:
    active = np.ones((steps, slots), dtype=bool)
    fresh = np.zeros((steps, slots), dtype=bool)
    fresh[0] = True
    return active, fresh


def test_reset_of_one_slot_reproduces_a_fresh_stream_and_leaves_the_others_alone(tiny_dir):
    inputs = noise(1, STEPS, 3)
    # A: slot 1 is reset mid-stream (a new call takes the slot).
    active, fresh = masks(STEPS, 3)
    fresh[RESET_AT, 1] = True
    with_reset = run(engine(tiny_dir, 3), inputs, active, fresh)
    # B: slot 1 is idle until RESET_AT, then starts fresh: the reference for the new call.
    active_b, fresh_b = masks(STEPS, 3)
    active_b[:RESET_AT, 1] = False
    fresh_b[0, 1] = False
    fresh_b[RESET_AT, 1] = True
    fresh_start = run(engine(tiny_dir, 3), inputs, active_b, fresh_b)
    # C: no reset at all: the reference for the other calls.
    no_reset = run(engine(tiny_dir, 3), inputs, *masks(STEPS, 3))

    for t in range(RESET_AT, STEPS):
        assert np.array_equal(with_reset[t].pcm[1], fresh_start[t].pcm[1]), t
        assert with_reset[t].text_tokens[1] == fresh_start[t].text_tokens[1], t
    for t in range(STEPS):
        for slot in (0, 2):
            assert np.array_equal(with_reset[t].pcm[slot], no_reset[t].pcm[slot]), (t, slot)
            assert with_reset[t].text_tokens[slot] == no_reset[t].text_tokens[slot], (t, slot)
    # The reset did change slot 1 (else this test could not fail).
    assert not np.array_equal(with_reset[RESET_AT + 2].pcm[1], no_reset[RESET_AT + 2].pcm[1])

    # Against a single-stream engine started fresh on the same input: same tokens, same audio
    # up to float rounding (see the module docstring).
    single = run(engine(tiny_dir, 1), inputs[RESET_AT:, 1:2], *masks(STEPS - RESET_AT, 1))
    for t in range(RESET_AT, STEPS):
        ref = single[t - RESET_AT]
        assert with_reset[t].text_tokens[1] == ref.text_tokens[0], t
        assert np.abs(with_reset[t].pcm[1] - ref.pcm[0]).max() < 1e-4, t


def test_an_idle_slot_resumes_exactly_where_it_stopped(tiny_dir):
    inputs = noise(2, STEPS, 2)
    continuous = run(engine(tiny_dir, 2), inputs, *masks(STEPS, 2))
    # Slot 0 plays the same stream but pauses for 4 steps in the middle, fed garbage meanwhile.
    pause = range(5, 9)
    paused = noise(3, STEPS + len(pause), 2)
    kept = [t for t in range(STEPS + len(pause)) if t not in pause]
    paused[kept, 0] = inputs[:, 0]
    active, fresh = masks(STEPS + len(pause), 2)
    active[list(pause), 0] = False
    outputs = run(engine(tiny_dir, 2), paused, active, fresh)
    for t, out in zip(kept, continuous, strict=True):
        assert np.array_equal(outputs[t].pcm[0], out.pcm[0]), t
        assert outputs[t].text_tokens[0] == out.text_tokens[0], t
    for t in pause:
        assert not outputs[t].pcm[0].any() and outputs[t].text_tokens[0] == NO_TOKEN


def test_the_first_step_of_a_stream_is_silent_and_then_it_speaks(tiny_dir):
    outputs = run(engine(tiny_dir, 2), noise(4, 4, 2), *masks(4, 2))
    assert not outputs[0].pcm.any()
    assert list(outputs[0].text_tokens) == [NO_TOKEN, NO_TOKEN]
    for out in outputs[1:]:
        assert np.abs(out.pcm).max() > 0
        assert (out.text_tokens >= 0).all()


def test_idle_engine_outputs_silence(tiny_dir):
    eng = engine(tiny_dir, 2)
    out = eng.step(noise(5, 1, 2)[0], np.zeros(2, dtype=bool), np.zeros(2, dtype=bool))
    assert not out.pcm.any() and list(out.text_tokens) == [NO_TOKEN, NO_TOKEN]


def test_a_call_runs_past_the_context_on_the_ring_cache(tmp_path):
    """Context 20 steps; 150 steps (past Mimi's 250-frame transformer context too)."""
    path = build_tiny_checkpoint(tmp_path / "short", seed=1, context=20)
    eng = engine(path, 2)
    assert eng.info.context_steps == 20
    rng = np.random.default_rng(6)
    active, fresh = np.ones(2, dtype=bool), np.array([True, True])
    for step in range(150):
        out = eng.step((rng.standard_normal((2, 1920)) * 0.1).astype(np.float32), active, fresh)
        fresh = np.zeros(2, dtype=bool)
        assert np.isfinite(out.pcm).all(), step
        if step > 0:
            assert (out.text_tokens >= 0).all() and np.abs(out.pcm).max() > 0, step
    # A slot reset after the cache wrapped starts over like a fresh one.
    eng.step(np.zeros((2, 1920), np.float32), active, np.array([True, False]))


def test_warm_up_leaves_every_slot_idle_and_ready(tiny_dir):
    eng = engine(tiny_dir, 3)
    assert eng.warm_up() > 0
    inputs = noise(7, 6, 3)
    active, fresh = masks(6, 3)
    after_warm_up = run(eng, inputs, active, fresh)
    reference = run(engine(tiny_dir, 3), inputs, *masks(6, 3))
    for a, b in zip(after_warm_up, reference, strict=True):
        assert np.array_equal(a.pcm, b.pcm) and np.array_equal(a.text_tokens, b.text_tokens)
