"""--filled-kv: attention over what each call has filled equals moshi's full-mask attention.

The tiny model, greedy, on a ring short enough to wrap (context 300 steps, blocks of 128:
full blocks, a partial one, and the wrap), with slots reset at different times and idle
now and then: the same text and audio tokens as stock moshi, logits within float tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.worker.capacity import set_context
from service.worker.checkpoint import load_checkpoint
from service.worker.engine import MoshiEngine
from service.worker.filled_kv import BLOCK, _attentions
from service.worker.main import build_engine
from service.worker.tinymodel import build_tiny_checkpoint
from tests.support.worker import worker_settings

pytestmark = pytest.mark.system  # torch.compile runs the C++ compiler for the flex attention kernel

SLOTS = 4
STEPS = 380
CONTEXT_SECONDS = 24.0  # 300 steps: two full blocks of 128 and a partial one of 44


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0)


def schedule(t: int) -> tuple[np.ndarray, np.ndarray]:
    """(active, fresh) at step t: slot 0 runs past the wrap, slot 1 idles now and then and is
    reset at 130 (a new call in a slot whose ring was 130 deep), slot 2 starts late, slot 3 is
    reset at 310, just after its ring wrapped."""
    active = np.array([True, t % 9 != 4, t >= 40, True])
    fresh = np.array([t == 0, t in (0, 130), t == 40, t in (0, 310)])
    return active, fresh


def run(path, filled_kv: bool) -> tuple[np.ndarray, np.ndarray, list[torch.Tensor]]:
    torch.set_num_threads(1)
    loaded = load_checkpoint(str(path), device="cpu")
    assert set_context(loaded.lm, CONTEXT_SECONDS) == 300
    engine = MoshiEngine(loaded, SLOTS, greedy=True, filled_kv=filled_kv)
    logits: list[torch.Tensor] = []
    engine.lm_gen.on_text_logits_hook = lambda x: logits.append(x.detach().float().clone())
    rng = np.random.default_rng(7)
    texts, pcms = [], []
    try:
        for t in range(STEPS):
            active, fresh = schedule(t)
            out = engine.step((rng.standard_normal((SLOTS, 1920)) * 0.1).astype(np.float32), active, fresh)
            texts.append(out.text_tokens.copy())
            pcms.append(out.pcm.copy())
        rings = [a._streaming_state.kv_cache for a in _attentions(loaded.lm)]
        offsets = rings[0].end_offset.tolist()
    finally:
        engine.close()
    assert offsets[0] > 300 and offsets[3] < 128, offsets  # wrapped; reset young (a partial block)
    assert all("forward" not in a.__dict__ for a in _attentions(loaded.lm))  # close() took the patch off
    return np.array(texts), np.array(pcms), logits


def test_filled_kv_attention_gives_the_same_tokens_as_full_mask_attention(tiny_dir):
    assert 300 % BLOCK and 300 > 2 * BLOCK
    full_text, full_pcm, full_logits = run(tiny_dir, filled_kv=False)
    filled_text, filled_pcm, filled_logits = run(tiny_dir, filled_kv=True)
    np.testing.assert_array_equal(filled_text, full_text)
    np.testing.assert_array_equal(filled_pcm, full_pcm)  # the same audio tokens decode to the same PCM
    assert len(filled_logits) == len(full_logits) == STEPS
    worst = max(
        float((a - b).abs().max()) for a, b in zip(full_logits, filled_logits, strict=True) if torch.isfinite(a).all()
    )
    assert worst < 1e-4, worst
    assert (full_text >= 0).sum() > STEPS  # the slots did speak: there was something to compare


def test_the_worker_setting_reaches_the_engine(tiny_dir):
    engine = build_engine(worker_settings(model=str(tiny_dir), slots=2, filled_kv=True))
    try:
        assert engine._filled_kv is not None
        assert all("forward" in a.__dict__ for a in _attentions(engine.lm))
        out = engine.step(np.zeros((2, 1920), np.float32), np.ones(2, bool), np.ones(2, bool))
        assert out.pcm.shape == (2, 1920)
    finally:
        engine.close()
