"""LLM-jp-Moshi-v1 and J-Moshi as their authors saved them: checkpoints written by moshi 0.2.2,
loaded by the worker under moshi 0.2.13, behaving as 0.2.2 behaved on them.

The checkpoints are written by the real moshi 0.2.2 (a separate environment, see
tests/support/legacy.py): the fused attention weights, bf16 LM, the stock Mimi, no
config.json, and a ``moshi_lm_kwargs.json`` as LLM-jp-Moshi-v1's repo has. The reference is
0.2.2's own greedy inference (the loop of its ``moshi.server``), run in that environment;
the worker's side is the real engine (service/worker/engine.py) through the real loader.

Why the tokens can be compared exactly: both sides run the same float32 arithmetic on the
same weights (bf16 in the file). The engine's batch of 4 differs from 0.2.2's batch of 1 in
the last float bits (MKL picks kernels by batch size, see test_worker_engine.py), which
moves the audio by ~1e-6 but no greedy pick of this model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import typing as tp
from pathlib import Path

import numpy as np
import pytest
import torch

from service.worker import architecture
from service.worker.checkpoint import CheckpointError, load_checkpoint
from service.worker.engine import MoshiEngine
from service.worker.weights_check import read_header
from tests.support.legacy import LEGACY_FILES, Reference, build_legacy_checkpoint, link_copy, reference

pytestmark = pytest.mark.system  # moshi 0.2.2 runs in its own environment, in a child process

STEPS = 60
SLOTS = 4
UNGENERATED = -2  # LMGen(support_out_of_sync=True) before a stream's first output


@pytest.fixture(scope="module")
def legacy_dir(tmp_path_factory) -> Path:
    return build_legacy_checkpoint(tmp_path_factory.mktemp("legacy"), seed=0)


@contextlib.contextmanager
def one_thread() -> tp.Iterator[None]:
    """As the 0.2.2 side runs: float sums split the same way."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def caller_audio(seed: int, steps: int) -> np.ndarray:
    """[steps, 1920] of varied sound (noise, tones, pauses) so that Mimi's codes vary."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps * 1920) / 24000
    tone = np.sin(2 * np.pi * (180 + 40 * seed) * t * (1 + 0.3 * np.sin(2 * np.pi * 0.5 * t)))
    gate = (np.sin(2 * np.pi * (0.7 + 0.1 * seed) * t) > -0.2).astype(np.float64)
    audio = (0.15 * tone * gate + 0.05 * rng.standard_normal(t.size)) * (0.5 + 0.5 * gate)
    return audio.reshape(steps, 1920).astype(np.float32)


def tap_tokens(engine: MoshiEngine) -> list[np.ndarray]:
    """Record what the engine's LMGen returns each step ([B, 1 + dep_q, 1]), unchanged."""
    seen: list[np.ndarray] = []
    step = engine.lm_gen.step

    def tapped(codes, *args, **kwargs):
        out = step(codes, *args, **kwargs)
        seen.append(out[:, :, 0].cpu().numpy().copy())
        return out

    engine.lm_gen.step = tapped
    return seen


def first_difference(ours: np.ndarray, theirs: np.ndarray) -> str:
    bad = np.argwhere(ours != theirs)
    if len(bad) == 0:
        return "none"
    step, k = bad[0]
    return f"step {step}, stream {k}: ours {ours[step]}, 0.2.2 {theirs[step]}"


def assert_same_call(tokens: np.ndarray, pcm: np.ndarray, text: np.ndarray, ref: Reference, what: str) -> None:
    """One call's tokens [T, 9], audio [T, 1920] and text [T] against 0.2.2's."""
    assert (ref.tokens[0] == -1).all() and (tokens[0] == UNGENERATED).all(), what  # 1st step: nothing
    assert not pcm[0].any() and text[0] < 0, what
    assert np.array_equal(tokens[1:], ref.tokens[1:]), (
        f"{what}: first difference {first_difference(tokens, ref.tokens)}"
    )
    assert np.array_equal(text[1:], ref.tokens[1:, 0]), what
    assert np.abs(pcm - ref.pcm).max() < 1e-4, f"{what}: audio differs by {np.abs(pcm - ref.pcm).max()}"


def test_the_checkpoint_is_in_the_authors_format(legacy_dir):
    assert sorted(p.name for p in legacy_dir.iterdir()) == sorted(LEGACY_FILES)  # no config.json
    lm = read_header(legacy_dir / "model.safetensors").tensors
    # 0.2.2's attention: q, k and v fused in one in_proj_weight, the depformer's 8 steps too.
    assert lm["transformer.layers.0.self_attn.in_proj_weight"].shape == (3 * 64, 64)
    assert lm["depformer.layers.0.self_attn.in_proj_weight"].shape == (8 * 3 * 32, 32)
    assert lm["depformer.layers.0.self_attn.out_proj.weight"].shape == (8 * 32, 32)
    assert not any("in_projs" in name for name in lm)
    assert {entry.dtype for entry in lm.values()} == {"BF16"}  # as the releases are
    kwargs = json.loads((legacy_dir / "moshi_lm_kwargs.json").read_text())
    assert kwargs["depformer_causal"] is True  # 0.2.2's key, which 0.2.13 no longer takes
    # The stock Mimi's tensors as 0.2.2 saves them: byte for byte the size of Kyutai's file.
    assert (legacy_dir / "tokenizer-e351c8d8-checkpoint125.safetensors").stat().st_size == 384_644_900


def test_one_call_gives_the_tokens_moshi_022_gives(legacy_dir):
    audio = caller_audio(1, STEPS)
    ref = reference(legacy_dir, {"call": audio})["call"]
    with one_thread():
        loaded = load_checkpoint(str(legacy_dir), device="cpu")
        assert loaded.info.architecture == architecture.FROM_LEGACY_KWARGS
        engine = MoshiEngine(loaded, 1, greedy=True)
        seen = tap_tokens(engine)
        outputs = [engine.step(audio[t][None], np.ones(1, bool), np.array([t == 0])) for t in range(STEPS)]
    tokens = np.stack(seen)[:, 0]
    pcm = np.stack([out.pcm[0] for out in outputs])
    text = np.array([out.text_tokens[0] for out in outputs])
    assert_same_call(tokens, pcm, text, ref, "the call")
    # Not vacuous: the model hears its caller and answers with varied tokens.
    assert len(set(tokens[1:, 1].tolist())) > 10 and len(set(text[1:].tolist())) > 3


# Calls per slot: (first step, steps). Slot 1's second call takes the slot at once (a reset
# of a running slot); slot 2 has idle gaps; slot 3 starts late and ends early.
SCHEDULE: dict[int, list[tuple[int, int]]] = {
    0: [(0, 64)],
    1: [(0, 20), (20, 44)],
    2: [(5, 33), (42, 22)],
    3: [(3, 53)],
}
BATCH_STEPS = 64


def test_four_slots_with_resets_give_each_call_moshi_022s_tokens(legacy_dir):
    calls = {
        f"slot{slot}-{start}": (slot, start, caller_audio(10 + 7 * slot + start, length))
        for slot, plan in SCHEDULE.items()
        for start, length in plan
    }
    refs = reference(legacy_dir, {name: audio for name, (_, _, audio) in calls.items()})

    inputs = np.random.default_rng(5).standard_normal((BATCH_STEPS, SLOTS, 1920)).astype(np.float32)
    active = np.zeros((BATCH_STEPS, SLOTS), dtype=bool)
    fresh = np.zeros((BATCH_STEPS, SLOTS), dtype=bool)
    for slot, start, audio in calls.values():
        inputs[start : start + len(audio), slot] = audio  # idle steps get noise: never heard
        active[start : start + len(audio), slot] = True
        fresh[start, slot] = True
    with one_thread():
        engine = MoshiEngine(load_checkpoint(str(legacy_dir), device="cpu"), SLOTS, greedy=True)
        seen = tap_tokens(engine)
        outputs = [engine.step(inputs[t], active[t], fresh[t]) for t in range(BATCH_STEPS)]
    tokens = np.stack(seen)  # [T, B, 9]
    pcm = np.stack([out.pcm for out in outputs])
    text = np.stack([out.text_tokens for out in outputs])

    for name, (slot, start, audio) in calls.items():
        span = slice(start, start + len(audio))
        assert_same_call(tokens[span, slot], pcm[span, slot], text[span, slot], refs[name], name)
    idle = ~active
    assert (tokens[idle] == UNGENERATED).all() and not pcm[idle].any()
    assert max(length for plan in SCHEDULE.values() for _, length in plan) >= 50


def test_without_moshi_lm_kwargs_the_7b_defaults_apply_and_the_mismatch_is_named(legacy_dir, tmp_path, caplog):
    """A repo with neither config.json nor moshi_lm_kwargs.json is a Moshi 7B: these tiny
    weights are then a wrong model, and the message names its tensors, in one line."""
    ckpt = link_copy(legacy_dir, tmp_path / "no-kwargs", [n for n in LEGACY_FILES if n != "moshi_lm_kwargs.json"])
    with caplog.at_level(logging.INFO, logger="service.worker.checkpoint"):
        with pytest.raises(CheckpointError) as caught:
            load_checkpoint(str(ckpt), device="cpu")
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message and "state_dict" not in message
    assert message.startswith(
        f"checkpoint {ckpt}: model.safetensors does not fit the LM of the Moshi 7B "
        "defaults (no config.json, no moshi_lm_kwargs.json): tensors "
    )
    assert "missing (depformer.layers.1." in message  # the 7B's depformer has 6 layers, this one 1
    assert "of another shape (emb.0.weight [2049, 64] in the file, [2049, 4096] in the model" in message
    assert "applying the Moshi 7B defaults" in caplog.text


def test_the_7b_defaults_are_moshi_022s_and_the_published_size(legacy_dir):
    from moshi.models import loaders

    from service.worker.known_repos import MOSHI_7B_BF16, MOSHI_7B_BF16_TENSOR_BYTES
    from tests.support.legacy import moshi022_lm_kwargs

    theirs = moshi022_lm_kwargs()
    assert theirs.pop("depformer_causal") is True
    assert architecture.MOSHI_7B_LM_KWARGS == theirs
    with torch.device("meta"):
        lm = loaders.get_moshi_lm(None, lm_kwargs=architecture.MOSHI_7B_LM_KWARGS, device="meta", dtype=torch.bfloat16)
    tensor_bytes = sum(v.numel() * v.element_size() for v in lm.state_dict().values())
    assert tensor_bytes == MOSHI_7B_BF16_TENSOR_BYTES
    # J-Moshi's page says 15.4 GB: the bf16 tensors plus a header of tens of kB.
    assert not MOSHI_7B_BF16.too_small(tensor_bytes + 30_000)
    assert not MOSHI_7B_BF16.too_large(tensor_bytes + 30_000)


def test_a_checkpoint_without_text_padding_id_gets_0_2_2s_padding(legacy_dir, tmp_path):
    """0.2.2's LMModel took a missing existing_text_padding_id as "padding is the extra token
    text_card" (and a text head of text_card + 1); 0.2.13 would default to 3 instead."""
    ckpt = link_copy(
        legacy_dir,
        tmp_path / "no-padding-id",
        ["tokenizer_spm_32k_3.model", "tokenizer-e351c8d8-checkpoint125.safetensors"],
    )
    build_legacy_checkpoint(ckpt, 1, "--lm-only", "--no-text-padding-id")
    assert "existing_text_padding_id" not in json.loads((ckpt / "moshi_lm_kwargs.json").read_text())
    steps = 30
    audio = caller_audio(2, steps)
    ref = reference(ckpt, {"call": audio})["call"]
    with one_thread():
        loaded = load_checkpoint(str(ckpt), device="cpu")
        assert loaded.lm.text_padding_token_id == loaded.lm.text_card == 400
        assert loaded.text_padding_ids == {400, 0}
        engine = MoshiEngine(loaded, 1, greedy=True)
        seen = tap_tokens(engine)
        outputs = [engine.step(audio[t][None], np.ones(1, bool), np.array([t == 0])) for t in range(steps)]
    assert_same_call(
        np.stack(seen)[:, 0],
        np.stack([o.pcm[0] for o in outputs]),
        np.array([o.text_tokens[0] for o in outputs]),
        ref,
        "no text padding id",
    )


async def test_the_worker_serves_the_authors_checkpoint_as_moshi_022_does(legacy_dir):
    """The real worker over its WebSocket: /v1/info says where the architecture came from and
    how it samples, and a call's audio and words are 0.2.2's for the same caller."""
    from websockets.asyncio.client import connect

    from service.worker.engine_api import float_to_pcm16, pcm16_to_float
    from service.worker.text import TextStream, skipped_ids
    from tests.support.worker import collect, running_worker, start_message, worker_settings

    steps = 40
    frames = [float_to_pcm16(frame) for frame in caller_audio(3, steps)]
    heard = np.stack([pcm16_to_float(frame) for frame in frames])  # what the worker decodes
    ref = reference(legacy_dir, {"call": heard})["call"]

    settings = worker_settings(model=str(legacy_dir), slots=2, greedy=True, input_queue_frames=64, cpu_threads=1)
    async with running_worker(settings) as worker:
        info = await worker.info()
        assert info["model_info"]["architecture"] == "moshi_lm_kwargs.json"
        assert info["model_info"]["sampling"] == {
            "greedy": True,
            "temp": 0.8,
            "temp_text": 0.7,
            "top_k": 250,
            "top_k_text": 25,
        }
        async with connect(worker.url) as ws:
            await ws.send(start_message(call_id="legacy"))
            started = json.loads(await ws.recv())
            assert started["sampling"] == info["model_info"]["sampling"]
            for frame in frames:
                await ws.send(frame)
            audio, events = [], []
            while len(audio) <= steps:  # one frame past the input: the last step's text too
                message = await ws.recv()
                if isinstance(message, bytes):
                    audio.append(message)
                else:
                    events.append(json.loads(message))
            await ws.send(json.dumps({"type": "stop"}))
            await collect(ws)

    got = np.stack([np.frombuffer(frame, "<i2") for frame in audio[:steps]]).astype(np.int32)
    want = np.stack([np.frombuffer(float_to_pcm16(pcm), "<i2") for pcm in ref.pcm]).astype(np.int32)
    assert np.abs(got - want).max() <= 2  # PCM16 rounding of audio equal within 1e-4
    import sentencepiece

    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(legacy_dir / "tokenizer_spm_32k_3.model"))
    text = TextStream(tokenizer, skipped_ids(tokenizer, frozenset({3, 0})))  # the kwargs' padding ids
    expected = []
    for step, token in enumerate(ref.tokens[:, 0]):  # -1 (nothing yet) is the worker's NO_TOKEN too
        piece = text.push(int(token), step)
        if piece is not None:
            expected.append({"type": "text", "text": piece.text, "t": piece.t})
    last = (steps - 1) * 0.08 + 1e-6
    assert [e for e in events if e["type"] == "text" and e["t"] <= last] == expected
    assert len(expected) > 3


def truncated_copy(legacy_dir: Path, target: Path, name: str, keep: int) -> Path:
    """The checkpoint with ``name`` cut after ``keep`` bytes (the others hard-linked)."""
    link_copy(legacy_dir, target, [n for n in LEGACY_FILES if n != name])
    with (legacy_dir / name).open("rb") as f:
        (target / name).write_bytes(f.read(keep))
    return target


@pytest.mark.parametrize(
    ("name", "keep", "expected"),
    [
        (
            "model.safetensors",
            3_000_000,
            r"model\.safetensors is truncated: 3,000,000 bytes on disk, its header "
            r"describes [\d,]+ \(3\.0 MB of 6\.\d MB\): a partial download, download it again",
        ),
        (
            "tokenizer-e351c8d8-checkpoint125.safetensors",
            200_000_000,
            r"tokenizer-e351c8d8-checkpoint125\.safetensors is truncated: 200,000,000 bytes on disk, its header "
            r"describes 384,644,900 \(200\.0 MB of 384\.6 MB\): a partial download",
        ),
        (
            "model.safetensors",
            1000,
            r"model\.safetensors is truncated: 1,000 bytes, shorter than its own "
            r"[\d,]+-byte header \(a partial download",
        ),
        ("model.safetensors", 5, r"model\.safetensors is truncated: 5 bytes, not even a safetensors header"),
    ],
)
def test_a_partial_download_is_reported_as_such(legacy_dir, tmp_path, name, keep, expected):
    ckpt = truncated_copy(legacy_dir, tmp_path / "partial", name, keep)
    with pytest.raises(CheckpointError, match=rf"^checkpoint {ckpt}: {expected}") as caught:
        load_checkpoint(str(ckpt), device="cpu")
    assert "\n" not in str(caught.value)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_a_known_repo_is_checked_against_its_published_sizes(legacy_dir, offline_hub):
    """In the Hugging Face cache under a known repo id, files smaller than the published ones
    are a partial download, named before anything is loaded."""
    from tests.support.worker import lay_out_hf_cache

    lay_out_hf_cache(offline_hub, "llm-jp/llm-jp-moshi-v1", [legacy_dir / n for n in LEGACY_FILES])
    with pytest.raises(
        CheckpointError,
        match=r"^checkpoint llm-jp/llm-jp-moshi-v1: model\.safetensors is "
        r"[\d,]+ bytes but llm-jp/llm-jp-moshi-v1's is 15\.4 GB: a partial download \(delete it "
        r"from the Hugging Face cache and download it again\)$",
    ):
        load_checkpoint("llm-jp/llm-jp-moshi-v1", device="cpu")
    # J-Moshi's page also gives its tokenizer's size. With a weights file of the right size (a
    # sparse one: no disk used), the tokenizer a third of that size is the partial download.
    snapshot = lay_out_hf_cache(offline_hub, "nu-dialogue/j-moshi", [legacy_dir / n for n in LEGACY_FILES])
    os.truncate(snapshot / "model.safetensors", 15_400_000_000)
    with pytest.raises(
        CheckpointError,
        match=r"^checkpoint nu-dialogue/j-moshi: tokenizer_spm_32k_3\.model is "
        r"[\d,]+ bytes but nu-dialogue/j-moshi's is 806 kB: a partial download",
    ):
        load_checkpoint("nu-dialogue/j-moshi", device="cpu")


def test_missing_and_unexpected_tensors_are_named(legacy_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = link_copy(legacy_dir, tmp_path / "edited", [n for n in LEGACY_FILES if n != "model.safetensors"])
    tensors = load_file(legacy_dir / "model.safetensors")
    del tensors["out_norm.alpha"]
    tensors["extra_heads.0.weight"] = torch.zeros(6, 64, dtype=torch.bfloat16)
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(str(ckpt), device="cpu")
    assert str(caught.value) == (
        f"checkpoint {ckpt}: model.safetensors does not fit the LM of its moshi_lm_kwargs.json (no config.json): "
        "tensors 1 missing (out_norm.alpha); 1 unexpected (extra_heads.0.weight)"
    )


def test_the_wrong_model_in_a_legacy_layout_is_named(legacy_dir, tmp_path):
    """The modern tiny model's weights where the authors' ones should be."""
    from service.worker.tinymodel import build_tiny_checkpoint

    modern = build_tiny_checkpoint(tmp_path / "modern", seed=0)
    ckpt = link_copy(legacy_dir, tmp_path / "mixed", [n for n in LEGACY_FILES if n != "model.safetensors"])
    link_copy(modern, ckpt, ["model.safetensors"])
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors does not fit the LM of its moshi_lm_kwargs\.json "
        r"\(no config\.json\): tensors 31 of another shape \(emb\.0\.weight \[65, 64\] in the file, "
        r"\[2049, 64\] in the model",
    ):  # its codebooks have 64 entries, the stock Mimi's 2048
        load_checkpoint(str(ckpt), device="cpu")
    # and a modern Mimi where the stock one should be
    ckpt = link_copy(
        legacy_dir,
        tmp_path / "mixed-mimi",
        [n for n in LEGACY_FILES if n != "tokenizer-e351c8d8-checkpoint125.safetensors"],
    )
    link_copy(modern, ckpt, ["tokenizer-e351c8d8-checkpoint125.safetensors"])
    with pytest.raises(
        CheckpointError,
        match=r"tokenizer-e351c8d8-checkpoint125\.safetensors does not fit the "
        r"stock Mimi: tensors .* of another shape",
    ):
        load_checkpoint(str(ckpt), device="cpu")


@pytest.mark.parametrize(
    ("kwargs_text", "expected"),
    [
        ("{not json", r"moshi_lm_kwargs\.json is not valid JSON"),
        ("[1, 2]", r"moshi_lm_kwargs\.json must hold a JSON object"),
        (
            '{"depformer_causal": false}',
            r"moshi_lm_kwargs\.json: depformer_causal=False with causal=True: the "
            r"installed moshi builds the depformer with the main model's causality",
        ),
        ('{"conditioners": {}}', r"moshi_lm_kwargs\.json: conditioners: a conditioned model"),
        (
            '{"bogus_argument": 1}',
            r"moshi cannot build the LM that its moshi_lm_kwargs\.json \(no config\.json\) "
            r"describes: .*bogus_argument",
        ),
    ],
)
def test_a_bad_moshi_lm_kwargs_is_a_clear_error(legacy_dir, tmp_path, kwargs_text, expected):
    ckpt = link_copy(legacy_dir, tmp_path / "bad-kwargs", [n for n in LEGACY_FILES if n != "moshi_lm_kwargs.json"])
    good = json.loads((legacy_dir / "moshi_lm_kwargs.json").read_text())
    try:
        edit = json.loads(kwargs_text)
        text = json.dumps({**good, **edit}) if isinstance(edit, dict) else kwargs_text
    except json.JSONDecodeError:
        text = kwargs_text
    (ckpt / "moshi_lm_kwargs.json").write_text(text)
    with pytest.raises(CheckpointError, match=rf"^checkpoint {ckpt}: {expected}") as caught:
        load_checkpoint(str(ckpt), device="cpu")
    assert "\n" not in str(caught.value)
