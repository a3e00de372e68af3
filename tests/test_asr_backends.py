"""ASR backends: the tiny random Whisper in the real layout through faster-whisper's loader,
batched; the OpenAI-compatible backend against a real HTTP server."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from service.asr.backends import FasterWhisperBackend, OpenAIBackend, clean_text, max_new_tokens
from service.asr.tinywhisper import MARKER, TINY, build_tokenizer, build_whisper, demo_whisper
from tests.support.asr import serving, transcription_app


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_whisper(tmp_path_factory.mktemp("tiny-whisper"))


@pytest.fixture(scope="module")
def backend(tiny_model) -> FasterWhisperBackend:
    return FasterWhisperBackend(str(tiny_model), cpu_threads=1)


def utterances(count: int, seed: int = 3) -> list[np.ndarray]:
    """Distinct noise bursts of 0.6-2.4 s (the random model's text depends on its input)."""
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 0.1, int(16000 * (0.6 + 0.6 * i))).astype(np.float32) for i in range(count)]


def read_ct2(path: Path) -> tuple[str, int, dict[str, tuple[tuple[int, ...], int]]]:
    """A CTranslate2 model.bin's spec name, revision and variables (name -> shape, dtype),
    aliases resolved (the writer stores equal tensors once)."""
    data = path.read_bytes()
    position = 0

    def unpack(fmt: str):
        nonlocal position
        (value,) = struct.unpack_from(fmt, data, position)
        position += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal position
        size = unpack("H")
        value = data[position : position + size - 1].decode()
        position += size
        return value

    unpack("I")
    name, revision = string(), unpack("I")
    variables = {}
    for _ in range(unpack("I")):
        key = string()
        shape = tuple(unpack("I") for _ in range(unpack("B")))
        dtype = unpack("B")
        size = unpack("I")
        position += size
        variables[key] = (shape, dtype)
    for _ in range(unpack("I")):
        alias = string()
        variables[alias] = variables[string()]
    return name, revision, variables


@pytest.mark.system  # builds and converts a Hugging Face model
def test_tiny_whisper_has_exactly_the_layout_ctranslate2s_converter_writes(tmp_path, tiny_model):
    """The same architecture as a Hugging Face WhisperForConditionalGeneration, converted by
    ct2-transformers-converter's code, gives the same variables, shapes, types and config."""
    import ctranslate2
    import transformers

    config = transformers.WhisperConfig(
        vocab_size=TINY.vocab_size,
        num_mel_bins=TINY.n_mels,
        d_model=TINY.d_model,
        encoder_layers=TINY.encoder_layers,
        encoder_attention_heads=TINY.encoder_heads,
        decoder_layers=TINY.decoder_layers,
        decoder_attention_heads=TINY.decoder_heads,
        encoder_ffn_dim=TINY.ffn_dim,
        decoder_ffn_dim=TINY.ffn_dim,
        max_source_positions=TINY.max_source_positions,
        max_target_positions=TINY.max_target_positions,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
        decoder_start_token_id=0,
    )
    hf_dir, converted = tmp_path / "hf", tmp_path / "ct2"
    transformers.WhisperForConditionalGeneration(config).save_pretrained(hf_dir)
    build_tokenizer(TINY.vocab_size).save(str(tmp_path / "tokenizer.json"))
    transformers.WhisperTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json")).save_pretrained(hf_dir)
    ctranslate2.converters.TransformersConverter(str(hf_dir)).convert(str(converted))

    theirs, ours = read_ct2(converted / "model.bin"), read_ct2(tiny_model / "model.bin")
    assert theirs[:2] == ours[:2] == ("WhisperSpec", 3)
    assert ours[2] == theirs[2]
    assert set(json.loads((tiny_model / "config.json").read_text())) == set(
        json.loads((converted / "config.json").read_text())
    )
    assert json.loads((tiny_model / "vocabulary.json").read_text()) == json.loads(
        (converted / "vocabulary.json").read_text()
    )


def test_tiny_whisper_files_are_those_of_a_faster_whisper_repo(tiny_model):
    names = {p.name for p in tiny_model.iterdir()}
    assert names == {
        "model.bin",
        "config.json",
        "vocabulary.json",
        "tokenizer.json",
        "preprocessor_config.json",
        MARKER,
    }
    assert json.loads((tiny_model / "preprocessor_config.json").read_text())["feature_size"] == TINY.n_mels


def test_a_batch_gives_each_utterance_its_own_text(backend):
    assert backend.random_weights
    batch = utterances(4)
    together = backend.transcribe_sync(batch)
    alone = [backend.transcribe_sync([audio])[0] for audio in batch]
    assert [r.error for r in together] == [None] * 4
    assert all(r.text for r in together), together  # gibberish, but text
    assert [r.text for r in together] == [r.text for r in alone]
    swapped = backend.transcribe_sync(batch[::-1])
    assert [r.text for r in swapped] == [r.text for r in together][::-1]
    assert backend.transcribe_sync([]) == []


def test_generation_is_bounded_by_the_audio_length():
    assert max_new_tokens(1.0) == 28
    assert max_new_tokens(30.0) == 376
    assert max_new_tokens(1000.0) == 440


def test_text_is_cleaned_of_control_and_replacement_characters():
    assert clean_text(" \x04こん\ufffdにちは\x11 ") == "こんにちは"


def test_the_demo_model_is_built_once_into_the_cache(tmp_path, monkeypatch):
    first = demo_whisper(tmp_path)
    stamp = (first / "model.bin").stat().st_mtime_ns
    assert demo_whisper(tmp_path) == first and (first / "model.bin").stat().st_mtime_ns == stamp
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path.parent / "xdg"))
    demo = FasterWhisperBackend("demo")
    assert demo.name == "demo" and demo.random_weights


def test_a_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(Exception, match="model.bin|Unable to open|not found|does not exist"):
        FasterWhisperBackend(str(tmp_path))


async def test_openai_backend_sends_each_utterance_to_a_real_server(backend):
    app = transcription_app(backend, api_key="k-123")
    batch = utterances(3, seed=9)
    async with serving(app) as port:
        client = OpenAIBackend(f"http://127.0.0.1:{port}/v1", "kotoba-whisper", api_key="k-123", concurrency=2)
        try:
            results = await client.transcribe(batch)
        finally:
            await client.close()
        # the same model behind the endpoint: the same text as locally, so the audio got through whole
        assert [r.text for r in results] == [r.text for r in backend.transcribe_sync(batch)]
        assert sorted(r["samples"] for r in app.state.requests) == sorted(len(a) for a in batch)
        assert {(r["model"], r["language"], r["format"]) for r in app.state.requests} == {
            ("kotoba-whisper", "ja", "json")
        }

        wrong_key = OpenAIBackend(f"http://127.0.0.1:{port}/v1", "kotoba-whisper", api_key="nope")
        broken = OpenAIBackend(f"http://127.0.0.1:{port}/v1", "broken", api_key="k-123")
        try:
            assert [r.error for r in await wrong_key.transcribe(batch[:1])] == ["transcription endpoint answered 401"]
            assert [r.error for r in await broken.transcribe(batch[:1])] == ["transcription endpoint answered 500"]
        finally:
            await wrong_key.close()
            await broken.close()
    gone = OpenAIBackend(f"http://127.0.0.1:{port}/v1", "kotoba-whisper", timeout=2)
    try:
        [result] = await gone.transcribe(batch[:1])
        assert result.error is not None and result.error.startswith("transcription endpoint unreachable")
    finally:
        await gone.close()


def test_openai_backend_refuses_a_non_http_url():
    with pytest.raises(ValueError, match="http"):
        OpenAIBackend("ftp://x/v1", "m")
