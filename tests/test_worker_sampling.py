"""Sampling per slot (service/worker/sampling.py) on the tiny model: without overrides a
worker samples exactly as moshi does; a slot's overrides change that slot only."""

from __future__ import annotations

import numpy as np
import pytest

from service.worker.checkpoint import load_checkpoint
from service.worker.engine import MoshiEngine
from service.worker.tinymodel import build_tiny_checkpoint
from tests.test_worker_engine import masks, noise, run

STEPS = 10


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-sampling"), seed=0)


def sampling_engine(path, batch_size: int, **kwargs) -> MoshiEngine:
    return MoshiEngine(load_checkpoint(str(path), device="cpu"), batch_size, **kwargs)


def moshi_own(path, batch_size: int) -> MoshiEngine:
    """The same engine sampling with moshi's own scalar settings (no per-slot objects)."""
    engine = sampling_engine(path, batch_size)
    engine.lm_gen.temp = engine.sampling["temp"]
    engine.lm_gen.temp_text = engine.sampling["temp_text"]
    engine.slot_sampling = None
    return engine


def tokens(outputs) -> np.ndarray:
    return np.stack([out.text_tokens for out in outputs])


def test_without_overrides_every_slot_samples_exactly_as_moshi_does(tiny_dir):
    inputs = noise(5, STEPS, 2)
    per_slot = run(sampling_engine(tiny_dir, 2), inputs, *masks(STEPS, 2))
    own = run(moshi_own(tiny_dir, 2), inputs, *masks(STEPS, 2))
    assert np.array_equal(tokens(per_slot), tokens(own))
    for a, b in zip(per_slot, own, strict=True):
        assert np.array_equal(a.pcm, b.pcm)


def test_a_slots_overrides_change_that_slot_only(tiny_dir):
    inputs = noise(6, STEPS, 2)
    greedy = run(sampling_engine(tiny_dir, 2, greedy=True), inputs, *masks(STEPS, 2))
    engine = sampling_engine(tiny_dir, 2)
    settings = engine.set_slot_sampling(1, {"greedy": True})
    assert settings == {**engine.sampling, "greedy": True}
    mixed = run(engine, inputs, *masks(STEPS, 2))
    sampled = run(sampling_engine(tiny_dir, 2), inputs, *masks(STEPS, 2))
    # slot 1 is greedy: the greedy engine's tokens and audio, bit for bit
    assert np.array_equal(tokens(mixed)[:, 1], tokens(greedy)[:, 1])
    assert all(np.array_equal(m.pcm[1], g.pcm[1]) for m, g in zip(mixed, greedy, strict=True))
    # slot 0 still samples (not the greedy stream)
    assert not np.array_equal(tokens(mixed)[:, 0], tokens(greedy)[:, 0])
    assert not np.array_equal(tokens(sampled)[:, 1], tokens(greedy)[:, 1])  # else this could not fail


def test_top_k_of_one_is_greedy_and_a_higher_top_k_is_capped(tiny_dir):
    inputs = noise(7, STEPS, 1)
    greedy = run(sampling_engine(tiny_dir, 1, greedy=True), inputs, *masks(STEPS, 1))
    engine = sampling_engine(tiny_dir, 1)
    settings = engine.set_slot_sampling(0, {"top_k": 1, "top_k_text": 1, "temp": 0.5})
    assert settings["top_k"] == 1 and settings["temp"] == 0.5
    top1 = run(engine, inputs, *masks(STEPS, 1))
    assert np.array_equal(tokens(top1), tokens(greedy))
    capped = engine.set_slot_sampling(0, {"top_k": 100_000})
    assert capped["top_k"] == engine.sampling["top_k"]  # the worker's own top-k is the ceiling


def test_a_greedy_worker_reports_greedy_whatever_the_call_asks(tiny_dir):
    engine = sampling_engine(tiny_dir, 1, greedy=True)
    assert engine.set_slot_sampling(0, {"temp": 1.5})["greedy"] is True
