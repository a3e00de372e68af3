"""Loading checkpoints: the tiny model through the same loader as a real one, and clear errors."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import time
import typing as tp
from pathlib import Path

import pytest

from service.worker import checkpoint
from service.worker.checkpoint import (
    APACHE,
    CC_BY_NC,
    UNKNOWN_LICENSE,
    CheckpointError,
    MoshiVersionError,
    check_moshi_version,
    license_for,
    load_checkpoint,
    require_moshi_version,
)
from service.worker.tinymodel import build_tiny_checkpoint
from tests.support.worker import lay_out_hf_cache

LAYOUT = [
    "model.safetensors",
    "tokenizer_spm_32k_3.model",
    "tokenizer-e351c8d8-checkpoint125.safetensors",
    "config.json",
    "mimi_config.json",
]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture
def tiny_copy(tiny_dir, tmp_path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, target)
    return target


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, offline: nothing is ever fetched from the network."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_tiny_checkpoint_has_the_real_layout(tiny_dir):
    assert sorted(p.name for p in tiny_dir.iterdir()) == sorted(LAYOUT)
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["mimi_config_name"] == "mimi_config.json"
    assert config["delays"] == [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1]


def test_tiny_checkpoint_is_reproducible(tiny_dir, tmp_path):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(3 if threads != 3 else 2)  # whatever the process set, the same bytes
    try:
        again = build_tiny_checkpoint(tmp_path / "again", seed=0)
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    for name in LAYOUT:
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes(), name


def test_local_directory_loads(tiny_dir):
    loaded = load_checkpoint(str(tiny_dir), device="cpu")
    assert loaded.info.source == "local"
    assert loaded.info.license == UNKNOWN_LICENSE
    assert loaded.info.context_steps == 3000 and loaded.info.context_seconds == 240.0
    assert loaded.mimi.frame_size == 1920
    assert loaded.lm.text_card == loaded.tokenizer.vocab_size()
    assert loaded.text_padding_ids == {0, 3}
    assert loaded.tokenizer.pad_id() == 3


def test_hub_repo_loads_from_the_cache_with_its_licence(tiny_dir, offline_hub):
    # (a J-Moshi repo without published sizes: the tiny files would not pass j-moshi-ext's)
    lay_out_hf_cache(offline_hub, "nu-dialogue/j-moshi-tiny", [tiny_dir / n for n in LAYOUT])
    loaded = load_checkpoint("nu-dialogue/j-moshi-tiny", device="cpu")
    assert loaded.info.model == "nu-dialogue/j-moshi-tiny"
    assert loaded.info.architecture == "config.json"
    assert loaded.info.source == "huggingface"
    assert loaded.info.license == CC_BY_NC
    assert loaded.info.research_only
    assert "RESEARCH USE ONLY" in loaded.info.banner()
    assert loaded.info.to_dict()["license"] == CC_BY_NC


@pytest.fixture
def unreachable_hub(tmp_path, monkeypatch) -> tp.Callable[[str], None]:
    """An empty cache and a Hub at ``endpoint`` (not offline mode: the loader must find out)."""
    from huggingface_hub import constants

    from service.worker import checkpoint

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(checkpoint, "_hub_probes", {})

    def point_at(endpoint: str) -> None:
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)

    return point_at


@pytest.mark.parametrize("hub", ["refusing", "silent"])
def test_an_unreachable_hub_fails_fast_once_without_retries(unreachable_hub, hub, caplog):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        if hub == "silent":
            listener.listen(1)  # accepts the connection, never answers
        else:
            listener.close()  # nothing listens: refused
        unreachable_hub(f"http://127.0.0.1:{port}")
        started = time.monotonic()
        with (
            caplog.at_level(logging.WARNING),
            pytest.raises(
                CheckpointError,
                match=rf"nobody/nothing-here: cannot fetch config\.json: Hugging Face is "
                rf"unreachable \(http://127\.0\.0\.1:{port}: \w+\)",
            ),
        ):
            load_checkpoint("nobody/nothing-here", device="cpu")
    took = time.monotonic() - started
    assert took < checkpoint.HUB_PROBE_SECONDS + 3, took  # not huggingface_hub's ~26 s of retries
    assert not [r for r in caplog.records if "Retry" in r.getMessage()]


def test_hub_repo_not_cached_offline_is_a_clear_error(offline_hub):
    with pytest.raises(
        CheckpointError, match=r"llm-jp/llm-jp-moshi-v1: cannot fetch config\.json: Hugging Face is unreachable"
    ):
        load_checkpoint("llm-jp/llm-jp-moshi-v1", device="cpu")


@pytest.mark.parametrize(
    "name",
    [
        "model.safetensors",
        "tokenizer_spm_32k_3.model",
        "tokenizer-e351c8d8-checkpoint125.safetensors",
        "mimi_config.json",
    ],
)
def test_missing_file_is_named(tiny_copy, name):
    (tiny_copy / name).unlink()
    with pytest.raises(CheckpointError, match=rf"checkpoint {tiny_copy}: missing {name}"):
        load_checkpoint(str(tiny_copy), device="cpu")


def test_missing_file_in_the_hub_cache_is_named(tiny_dir, offline_hub):
    files = [tiny_dir / n for n in LAYOUT if n != "tokenizer_spm_32k_3.model"]
    lay_out_hf_cache(offline_hub, "llm-jp/llm-jp-moshi-v1", files)
    with pytest.raises(CheckpointError, match=r"llm-jp/llm-jp-moshi-v1: cannot fetch tokenizer_spm_32k_3\.model"):
        load_checkpoint("llm-jp/llm-jp-moshi-v1", device="cpu")


def test_garbage_config_is_a_clear_error(tiny_copy):
    (tiny_copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        load_checkpoint(str(tiny_copy), device="cpu")


def test_config_that_is_not_an_object_is_a_clear_error(tiny_copy):
    (tiny_copy / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config\.json must hold a JSON object"):
        load_checkpoint(str(tiny_copy), device="cpu")


def test_weights_of_the_wrong_shape_are_a_clear_error(tiny_copy):
    config = json.loads((tiny_copy / "config.json").read_text())
    config["dim"] = 128
    (tiny_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors does not fit the LM of its config\.json: "
        r"tensors \d+ of another shape \(emb\.0\.weight \[65, 64\] in the file, \[65, 128\]",
    ):
        load_checkpoint(str(tiny_copy), device="cpu")


def test_corrupt_weights_are_a_clear_error(tiny_copy):
    (tiny_copy / "tokenizer-e351c8d8-checkpoint125.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(
        CheckpointError,
        match=r"tokenizer-e351c8d8-checkpoint125\.safetensors is not a "
        r"safetensors file",
    ):
        load_checkpoint(str(tiny_copy), device="cpu")


def test_corrupt_tokenizer_is_a_clear_error(tiny_copy):
    (tiny_copy / "tokenizer_spm_32k_3.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(CheckpointError, match=r"tokenizer_spm_32k_3\.model is not a SentencePiece model"):
        load_checkpoint(str(tiny_copy), device="cpu")


def test_neither_directory_nor_repo_id(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory and not a Hugging Face repo id"):
        load_checkpoint(str(tmp_path / "nowhere" / "deep"), device="cpu")


def test_licence_table():
    assert license_for("llm-jp/llm-jp-moshi-v1") == APACHE
    assert license_for("nu-dialogue/j-moshi") == CC_BY_NC
    assert license_for("nu-dialogue/j-moshi-ext") == CC_BY_NC
    assert license_for("kyutai/moshiko-pytorch-bf16") == UNKNOWN_LICENSE


def test_moshi_version_check():
    assert check_moshi_version()  # the installed one is new enough
    assert require_moshi_version("0.2.5") == "0.2.5"
    assert require_moshi_version("0.10.0") == "0.10.0"
    for old in ("0.2.4", "0.1.0", "0.2.4rc1"):
        with pytest.raises(MoshiVersionError, match=r"needs moshi >= 0\.2\.5"):
            require_moshi_version(old)


def test_repo_without_config_is_read_as_moshi_7b(tiny_dir, offline_hub):
    """Like J-Moshi and LLM-jp-Moshi: no config.json (and no moshi_lm_kwargs.json) means the
    stock 7B Moshi and stock Mimi (tests/test_worker_legacy_checkpoints.py has the real
    format; this is the Hub path)."""
    files = [tiny_dir / n for n in LAYOUT if n not in ("config.json", "mimi_config.json")]
    lay_out_hf_cache(offline_hub, "someone/legacy-moshi", files)
    # The tiny weights do not fit the stock architecture: proof that it was the one built.
    with pytest.raises(
        CheckpointError,
        match=r"^checkpoint someone/legacy-moshi: tokenizer-e351c8d8-checkpoint125"
        r"\.safetensors does not fit the stock Mimi: tensors \d+ missing \(.*\); \d+ of another shape",
    ):
        load_checkpoint("someone/legacy-moshi", device="cpu")


def test_sampling_is_moshis_unless_the_checkpoint_or_a_flag_says_otherwise(tiny_dir, tmp_path):
    from service.worker.engine import MoshiEngine

    moshi_defaults = {"greedy": False, "temp": 0.8, "temp_text": 0.7, "top_k": 250, "top_k_text": 25}
    loaded = load_checkpoint(str(tiny_dir), device="cpu")
    engine = MoshiEngine(loaded, 1)
    assert engine.info.sampling == moshi_defaults
    assert engine.info.to_dict()["sampling"] == moshi_defaults  # /v1/info's model_info
    assert loaded.info.sampling is None  # the loader's info is not the engine's
    engine.close()
    engine = MoshiEngine(loaded, 1, greedy=True, temp=0.5, top_k_text=10)
    assert engine.info.sampling == {**moshi_defaults, "greedy": True, "temp": 0.5, "top_k_text": 10}
    assert (engine.lm_gen.temp, engine.lm_gen.top_k_text, engine.lm_gen.use_sampling) == (0.5, 10, False)
    engine.close()
    # A checkpoint's own lm_gen_config (config.json) comes before moshi's defaults, flags before it.
    ckpt = shutil.copytree(tiny_dir, tmp_path / "tuned")
    config = json.loads((ckpt / "config.json").read_text())
    config["lm_gen_config"] = {"temp": 0.6, "top_k": 100}
    (ckpt / "config.json").write_text(json.dumps(config))
    engine = MoshiEngine(load_checkpoint(str(ckpt), device="cpu"), 1, top_k=50)
    assert engine.info.sampling == {**moshi_defaults, "temp": 0.6, "top_k": 50}
    engine.close()


def test_legacy_kwargs_are_translated_to_the_installed_moshis():
    from service.worker.architecture import MOSHI_7B_LM_KWARGS, ArchitectureError, lm_kwargs_from_legacy

    written = {**MOSHI_7B_LM_KWARGS, "depformer_causal": True, "llama_name_or_path": None}
    kwargs, notes = lm_kwargs_from_legacy(written)
    assert kwargs == MOSHI_7B_LM_KWARGS and notes == ["ignored 'llama_name_or_path' (not a Moshi LM argument)"]
    kwargs, notes = lm_kwargs_from_legacy(
        {k: v for k, v in MOSHI_7B_LM_KWARGS.items() if k != "existing_text_padding_id"}
    )
    assert (kwargs["existing_text_padding_id"], kwargs["text_card_out"]) == (32000, 32001)
    with pytest.raises(ArchitectureError, match="depformer_causal=False"):
        lm_kwargs_from_legacy({**MOSHI_7B_LM_KWARGS, "depformer_causal": False})
