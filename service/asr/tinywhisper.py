"""Random-weight Whisper models written in faster-whisper's real file layout.

A CTranslate2 Whisper directory, as ``ct2-transformers-converter`` writes it and as
``kotoba-tech/kotoba-whisper-v2.0-faster`` ships it: ``model.bin`` and ``config.json``
(written by CTranslate2's own ``WhisperSpec``), ``vocabulary.json``, the Hugging Face
``tokenizer.json`` and ``preprocessor_config.json``. It loads through the same
``faster_whisper.WhisperModel`` path as the real model; its weights are random, so what it
"hears" is gibberish.

Two shapes: ``TINY`` (runs faster than real time on one CPU core: the tests and ``--model
demo``) and ``KOTOBA_V2`` (kotoba-whisper-v2.0's: Whisper large-v3's encoder, two decoder
layers; for benchmarking on a GPU without downloading the weights). The tokenizer is a
byte-level BPE trained here on a little Japanese, followed by Whisper's special tokens in
Whisper's order (``<|endoftext|>``, ``<|startoftranscript|>``, the languages, the tasks,
``<|notimestamps|>``, then the 1501 timestamps), so prompts are built exactly as for the
real model. ``tests/test_asr_backends.py`` checks the layout against the one
CTranslate2's converter writes from a Hugging Face ``WhisperForConditionalGeneration``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import typing as tp
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# Bump when the layout, the shapes or the tokenizer's text change: the demo cache is keyed on it.
TINY_WHISPER_VERSION = 1
TIMESTAMPS = 1501  # <|0.00|> .. <|30.00|>
TASK_TOKENS = [
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nospeech|>",
    "<|notimestamps|>",
]
# Whisper's languages, in its token order (large-v3 adds "yue" last).
LANGUAGES = (
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th ur hr "
    "bg lt la mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr pa si km sn "
    "yo so af oc ka be tg sd gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt haw ln ha ba jw su "
    "yue"
).split()

TRAINING_TEXT = """\
おでんわ ありがとう ございます。 カスタマーサポート センターで ございます。
はい、しょうちいたしました。 しょうしょう おまち ください。
ほんじつは どのような ごようけん でしょうか。
ごちゅうもんの かくにん ですね。 おなまえと おでんわばんごうを おねがいします。
もうしわけ ございません、 もういちど おっしゃって いただけますか。
きょうは いい てんき ですね。 あしたの ごぜんちゅうに とどきます。
お電話ありがとうございます。本日はどのようなご用件でしょうか。
ご住所の変更ですね。新しいご住所を教えていただけますか。
"""


@dataclass(frozen=True)
class WhisperShape:
    """The architecture's sizes (those of a Hugging Face ``WhisperConfig``)."""

    d_model: int
    encoder_layers: int
    encoder_heads: int
    decoder_layers: int
    decoder_heads: int
    n_mels: int
    vocab_size: int  # text tokens + special tokens + timestamps
    max_source_positions: int = 1500
    max_target_positions: int = 448

    @property
    def ffn_dim(self) -> int:
        return 4 * self.d_model


TINY = WhisperShape(
    d_model=64, encoder_layers=2, encoder_heads=4, decoder_layers=2, decoder_heads=4, n_mels=80, vocab_size=2109
)
KOTOBA_V2 = WhisperShape(
    d_model=1280, encoder_layers=32, encoder_heads=20, decoder_layers=2, decoder_heads=20, n_mels=128, vocab_size=51866
)
SHAPES = {"tiny": TINY, "kotoba-v2": KOTOBA_V2}


def special_tokens() -> list[str]:
    return (
        ["<|endoftext|>", "<|startoftranscript|>"]
        + [f"<|{code}|>" for code in LANGUAGES]
        + TASK_TOKENS
        + [f"<|{i * 0.02:.2f}|>" for i in range(TIMESTAMPS)]
    )


def build_tokenizer(vocab_size: int) -> tp.Any:  # a tokenizers.Tokenizer (untyped)
    """A Whisper-style tokenizer: byte-level BPE over the text tokens, then the specials.

    Returns a ``tokenizers.Tokenizer`` with exactly ``vocab_size`` tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = special_tokens()
    text_tokens = vocab_size - len(specials)
    if text_tokens < 300:
        raise ValueError(f"vocab_size {vocab_size} leaves fewer than 300 text tokens")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=text_tokens, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(TRAINING_TEXT.splitlines(), trainer)
    learned = tokenizer.get_vocab_size()
    if learned < text_tokens:  # the text is small: fill the text range as a large vocabulary would be
        tokenizer.add_tokens([f"<|unused{i}|>" for i in range(text_tokens - learned)])
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    if tokenizer.get_vocab_size() != vocab_size:
        raise AssertionError(f"tokenizer has {tokenizer.get_vocab_size()} tokens, wanted {vocab_size}")
    return tokenizer


def _sinusoids(length: int, channels: int) -> np.ndarray:
    """Whisper's encoder position embedding."""
    increment = np.log(10000) / (channels // 2 - 1)
    inv = np.exp(-increment * np.arange(channels // 2))
    scaled = np.arange(length)[:, None] * inv[None, :]
    table: np.ndarray = np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1).astype(np.float32)
    return table


class _Init:
    """Random tensors as Hugging Face initialises Whisper (normal, std 0.02; norms at 1, 0)."""

    def __init__(self, seed: int, dtype: str) -> None:
        self.rng = np.random.default_rng(seed)
        self.dtype = np.dtype(dtype)

    def normal(self, *shape: int) -> np.ndarray:
        return (self.rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(self.dtype)

    def zeros(self, *shape: int) -> np.ndarray:
        return np.zeros(shape, dtype=self.dtype)

    def ones(self, *shape: int) -> np.ndarray:
        return np.ones(shape, dtype=self.dtype)


def _layer_norm(spec: tp.Any, init: _Init, d: int) -> None:  # specs: CTranslate2's (untyped)
    spec.gamma = init.ones(d)
    spec.beta = init.zeros(d)


def _linear(spec: tp.Any, init: _Init, out_dim: int, in_dim: int, *, zero_bias_rows: slice | None = None) -> None:
    spec.weight = init.normal(out_dim, in_dim)
    bias = init.normal(out_dim)
    if zero_bias_rows is not None:  # Whisper's key projections have no bias: the converter fuses zeros
        bias[zero_bias_rows] = 0
    spec.bias = bias


def _attention(spec: tp.Any, init: _Init, d: int, *, cross: bool) -> None:
    _layer_norm(spec.layer_norm, init, d)
    if cross:  # query alone, then keys and values fused
        _linear(spec.linear[0], init, d, d)
        _linear(spec.linear[1], init, 2 * d, d, zero_bias_rows=slice(0, d))
    else:  # queries, keys and values fused
        _linear(spec.linear[0], init, 3 * d, d, zero_bias_rows=slice(d, 2 * d))
    _linear(spec.linear[-1], init, d, d)


def _ffn(spec: tp.Any, init: _Init, shape: WhisperShape) -> None:
    _layer_norm(spec.layer_norm, init, shape.d_model)
    _linear(spec.linear_0, init, shape.ffn_dim, shape.d_model)
    _linear(spec.linear_1, init, shape.d_model, shape.ffn_dim)


def whisper_spec(shape: WhisperShape, tokens: list[str], *, seed: int = 0, dtype: str = "float32") -> tp.Any:
    """CTranslate2's ``WhisperSpec`` filled with random weights (what the converter fills
    from a Hugging Face model), its vocabulary and its config."""
    from ctranslate2.specs import whisper_spec as ct2_whisper

    if len(tokens) != shape.vocab_size:
        raise ValueError(f"{len(tokens)} tokens for a vocabulary of {shape.vocab_size}")
    init = _Init(seed, dtype)
    d = shape.d_model
    spec = ct2_whisper.WhisperSpec(shape.encoder_layers, shape.encoder_heads, shape.decoder_layers, shape.decoder_heads)
    encoder = spec.encoder
    encoder.conv1.weight = init.normal(d, shape.n_mels, 3)
    encoder.conv1.bias = init.normal(d)
    encoder.conv2.weight = init.normal(d, d, 3)
    encoder.conv2.bias = init.normal(d)
    encoder.position_encodings.encodings = _sinusoids(shape.max_source_positions, d).astype(init.dtype)
    _layer_norm(encoder.layer_norm, init, d)
    for layer in encoder.layer:
        _attention(layer.self_attention, init, d, cross=False)
        _ffn(layer.ffn, init, shape)

    decoder = spec.decoder
    embeddings = init.normal(shape.vocab_size, d)
    decoder.embeddings.weight = embeddings
    decoder.position_encodings.encodings = init.normal(shape.max_target_positions, d)
    _layer_norm(decoder.layer_norm, init, d)
    for layer in decoder.layer:
        _attention(layer.self_attention, init, d, cross=False)
        _attention(layer.attention, init, d, cross=True)
        _ffn(layer.ffn, init, shape)
    decoder.projection.weight = embeddings  # tied, as in Whisper

    spec.register_vocabulary(tokens)
    ids = {token: i for i, token in enumerate(tokens)}
    # Random weights put most of the mass on the special tokens (three quarters of a small
    # vocabulary); suppressing them, as real checkpoints suppress non-speech symbols, makes
    # the model say (random) words rather than nothing.
    spec.config.suppress_ids = list(range(ids["<|endoftext|>"] + 1, shape.vocab_size))
    spec.config.suppress_ids_begin = [ids["<|endoftext|>"]]
    spec.config.lang_ids = [ids[f"<|{code}|>"] for code in LANGUAGES]
    spec.config.alignment_heads = [
        [layer, head]
        for layer in range(shape.decoder_layers // 2, shape.decoder_layers)
        for head in range(shape.decoder_heads)
    ]
    spec.validate()
    return spec


def preprocessor_config(shape: WhisperShape) -> dict:
    return {
        "chunk_length": 30,
        "feature_extractor_type": "WhisperFeatureExtractor",
        "feature_size": shape.n_mels,
        "hop_length": 160,
        "n_fft": 400,
        "n_samples": 480000,
        "nb_max_frames": 3000,
        "padding_side": "right",
        "padding_value": 0.0,
        "processor_class": "WhisperProcessor",
        "return_attention_mask": False,
        "sampling_rate": 16000,
    }


MARKER = "moshimoshi_random_whisper.json"


def build_whisper(
    directory: str | os.PathLike, shape: WhisperShape = TINY, *, seed: int = 0, dtype: str = "float32"
) -> Path:
    """Write a random-weight Whisper of ``shape`` into ``directory``; return its path.

    ``dtype`` is the stored weights' type (``float16`` halves a large model's file). The
    result depends only on (``shape``, ``seed``, ``dtype``) and the version."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(shape.vocab_size)
    tokens = [tokenizer.id_to_token(i) for i in range(shape.vocab_size)]
    spec = whisper_spec(shape, tokens, seed=seed, dtype=dtype)
    spec.save(str(out))
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(shape), indent=1))
    (out / MARKER).write_text(
        json.dumps(
            {
                "name": "moshimoshi-random-whisper",
                "version": TINY_WHISPER_VERSION,
                "shape": asdict(shape),
                "seed": seed,
                "dtype": dtype,
            },
            indent=1,
        )
    )
    return out


def random_weights(path: str | os.PathLike) -> bool:
    """Whether a model directory is one of these random-weight models."""
    return (Path(path) / MARKER).is_file()


def demo_whisper(cache_root: str | os.PathLike | None = None) -> Path:
    """The ``demo`` ASR model, built once into the user's cache directory."""
    root = (
        Path(cache_root)
        if cache_root
        else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moshimoshi"
    )
    target = root / f"demo-whisper-v{TINY_WHISPER_VERSION}"
    if (target / MARKER).exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed, so that a crash never leaves half a model.
    staging = Path(tempfile.mkdtemp(prefix=".demo-whisper-", dir=root))
    log.info("building the demo ASR model in %s", target)
    build_whisper(staging)
    try:
        staging.rename(target)
    except OSError:  # another process won the race: use its copy
        shutil.rmtree(staging, ignore_errors=True)
    return target
