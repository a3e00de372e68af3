"""A tiny, randomly initialised Moshi written in the real checkpoint layout.

The files are exactly those of a Hugging Face Moshi repository (``model.safetensors``,
``tokenizer_spm_32k_3.model``, ``tokenizer-e351c8d8-checkpoint125.safetensors``,
``config.json``) plus a ``mimi_config.json`` that ``config.json`` names through
``mimi_config_name``, since this Mimi is not the stock one. It therefore loads through
the same :mod:`service.worker.checkpoint` code path as LLM-jp-Moshi or J-Moshi, and runs
faster than real time on two CPU cores. Its weights are random: it babbles.

Used by the tests and by ``--model demo``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import typing as tp
from pathlib import Path

if tp.TYPE_CHECKING:
    import torch
    from moshi.models.compression import MimiModel

log = logging.getLogger(__name__)

# Bump when the architecture or the training text changes: the demo cache is keyed on it.
TINY_VERSION = 2  # 2: built on one torch thread, so the bytes no longer depend on the caller

TEXT_PADDING_ID = 3  # the tokenizer's <pad>: the model's "no word this step"
END_OF_TEXT_PADDING_ID = 0  # the tokenizer's <unk>, never produced by encoding with byte fallback
VOCAB_SIZE = 400

# Moshi's real delay pattern: text, 8 generated audio codebooks, 8 user audio codebooks.
DELAYS = [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1]

# A small text in Japanese and English; enough for SentencePiece to learn a few hundred
# pieces. Characters it leaves out are spelt with byte-fallback pieces.
TRAINING_TEXT = """\
お電話ありがとうございます。カスタマーサポートセンターでございます。
はい、承知いたしました。少々お待ちください。
本日はどのようなご用件でしょうか。
ご注文の確認でございますね。お名前とお電話番号をお願いいたします。
申し訳ございません、もう一度おっしゃっていただけますか。
ええ、そうですね。なるほど、わかりました。
うん、うん。はい、はい。そうなんですか。
ご住所の変更ですね。新しいご住所を教えていただけますか。
配送は明日の午前中になります。よろしいでしょうか。
ほかに何かお困りのことはございますか。
お問い合わせいただき、ありがとうございました。失礼いたします。
今日はいい天気ですね。東京は晴れています。
会議は三時から始まります。資料を準備しておきます。
こんにちは。こんばんは。おはようございます。
Thank you for calling customer support. How can I help you today?
Yes, I understand. Please hold on for a moment.
Could you tell me your name and phone number, please?
I am sorry, could you say that again?
Your order will arrive tomorrow morning.
Is there anything else I can help you with?
Thank you for calling. Have a nice day.
The weather is nice today. The meeting starts at three.
"""


def mimi_config() -> dict:
    """A tiny Mimi with the stock frame size (1920 samples at 24 kHz, 12.5 Hz)."""
    seanet = {
        "channels": 1,
        "dimension": 32,
        "causal": True,
        "n_filters": 4,
        "n_residual_layers": 1,
        "activation": "ELU",
        "compress": 2,
        "dilation_base": 2,
        "disable_norm_outer_blocks": 0,
        "kernel_size": 7,
        "residual_kernel_size": 3,
        "last_kernel_size": 3,
        "norm": "none",
        "pad_mode": "constant",
        "ratios": [8, 6, 5, 4],
        "true_skip": True,
    }
    return {
        "sample_rate": 24000,
        "channels": 1,
        "frame_rate": 12.5,
        "seanet": seanet,
        "quantizer": {"dimension": 16, "n_q": 8, "bins": 64, "input_dimension": 32, "output_dimension": 32},
        "transformer": {
            "d_model": 32,
            "num_heads": 4,
            "num_layers": 1,
            "causal": True,
            "layer_scale": 0.01,
            "context": 250,
            "conv_layout": True,
            "max_period": 10000,
            "gating": "none",
            "norm": "layer_norm",
            "positional_embedding": "rope",
            "dim_feedforward": 128,
            "input_dimension": 32,
            "output_dimensions": [32],
        },
    }


def lm_config(text_card: int, context: int) -> dict:
    """A tiny LMModel with Moshi's stream layout (1 text + 8 model + 8 user codebooks)."""
    return {
        "dim": 64,
        "text_card": text_card,
        "existing_text_padding_id": TEXT_PADDING_ID,
        "existing_text_end_padding_id": END_OF_TEXT_PADDING_ID,
        "n_q": 16,
        "dep_q": 8,
        "card": 64,
        "num_heads": 4,
        "num_layers": 2,
        "hidden_scale": 4.125,
        "causal": True,
        "layer_scale": None,
        "context": context,
        "max_period": 10000,
        "gating": "silu",
        "norm": "rms_norm_f32",
        "positional_embedding": "rope",
        "depformer_dim": 32,
        "depformer_dim_feedforward": 132,
        "depformer_num_heads": 2,
        "depformer_num_layers": 1,
        "depformer_layer_scale": None,
        "depformer_multi_linear": True,
        "depformer_context": 8,
        "depformer_max_period": 10000,
        "depformer_gating": "silu",
        "depformer_pos_emb": "none",
        "depformer_weights_per_step": True,
        "delays": list(DELAYS),
    }


def train_tokenizer(out_file: Path, vocab_size: int = VOCAB_SIZE) -> None:
    """Train a small SentencePiece model with byte fallback (any text round-trips).

    Trained from an iterator into memory, so that no temporary path ends up in the model's
    trainer spec: the file is a pure function of the text and the options.
    """
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT.splitlines()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        byte_fallback=True,
        character_coverage=0.98,
        unk_id=END_OF_TEXT_PADDING_ID,
        bos_id=1,
        eos_id=2,
        pad_id=TEXT_PADDING_ID,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
        split_digits=True,
        remove_extra_whitespaces=False,
    )
    out_file.write_bytes(model.getvalue())


def _calibration_audio(generator: torch.Generator, seconds: float = 1.6) -> torch.Tensor:
    """[8, 1, T] clips of varied sound (noise, tones, chirps, bursts) at 24 kHz."""
    import math

    import torch

    n = int(24000 * seconds)
    t = torch.arange(n) / 24000
    clips = []
    for i in range(8):
        amplitude = 0.02 * (2 ** (i % 4))
        noise = torch.randn(n, generator=generator) * amplitude
        tone = amplitude * torch.sin(2 * math.pi * (150 + 90 * i) * t * (1 + 0.5 * t * (i % 3)))
        gate = (torch.sin(2 * math.pi * (1.5 + i) * t) > 0).float()
        clips.append(noise * (i % 2) + tone * gate + noise * 0.2)
    return torch.stack(clips)[:, None, :]


def _fit_codebooks(mimi: MimiModel, generator: torch.Generator) -> None:
    """Fit Mimi's random codebooks to what its random encoder outputs (moshi's own k-means).

    A fresh Mimi's codebooks are all zeros, and random ones do not match the scale of the
    latent: every frame would get the same codes and the LM would never hear the caller.
    In training mode each RVQ layer initialises itself by k-means on its first batch, one
    layer per pass; a few passes over the latents of varied audio fit all of them.
    """
    import torch

    audio = _calibration_audio(generator)
    assert mimi.encoder_transformer is not None  # mimi_config() has one
    with torch.no_grad():
        latent = mimi._to_framerate(mimi.encoder_transformer(mimi.encoder(audio))[0])
        mimi.quantizer.train()
        for _ in range(mimi.quantizer.total_codebooks + 2):
            mimi.quantizer(latent, mimi.frame_rate)
    mimi.eval()


def build_tiny_checkpoint(directory: str | os.PathLike, seed: int = 0, context: int = 3000) -> Path:
    """Write a tiny random Moshi checkpoint into ``directory`` and return its path.

    ``context`` is the LM's KV-cache length in steps (3000 = 240 s, as the real models).
    The result is a pure function of (``seed``, ``context``) and :data:`TINY_VERSION`.
    """
    import sentencepiece as spm
    import torch
    from moshi.models import loaders
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_file = out / loaders.TEXT_TOKENIZER_NAME
    train_tokenizer(tokenizer_file)
    text_card = spm.SentencePieceProcessor(model_file=str(tokenizer_file)).vocab_size()

    mimi_cfg = mimi_config()
    lm_cfg = lm_config(text_card, context)
    generator = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    # one thread: the k-means fit sums in an order that depends on the thread count, and
    # the file must not depend on what the process set it to before
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            mimi = loaders.get_mimi(None, mimi_cfg, device="cpu", num_codebooks=8)
            _fit_codebooks(mimi, generator)
            lm = loaders.get_moshi_lm(None, lm_kwargs=lm_cfg, device="cpu", dtype=torch.float32)
    finally:
        torch.set_num_threads(threads)

    def tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}

    save_file(tensors(mimi), str(out / loaders.MIMI_NAME))
    save_file(tensors(lm), str(out / loaders.MOSHI_NAME))
    (out / "mimi_config.json").write_text(json.dumps(mimi_cfg, indent=1))
    config = dict(lm_cfg)
    config.update(
        {
            "moshi_name": loaders.MOSHI_NAME,
            "mimi_name": loaders.MIMI_NAME,
            "tokenizer_name": loaders.TEXT_TOKENIZER_NAME,
            "mimi_config_name": "mimi_config.json",
            "model_type": "moshi",
            "model_id": {"name": "moshimoshi-tiny-random", "version": TINY_VERSION, "seed": seed},
        }
    )
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


def demo_checkpoint(cache_root: str | os.PathLike | None = None) -> Path:
    """The ``--model demo`` checkpoint, built once into the user's cache directory."""
    root = (
        Path(cache_root)
        if cache_root
        else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moshimoshi"
    )
    target = root / f"demo-v{TINY_VERSION}"
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so that a crash never leaves half a checkpoint.
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=root))
    log.info("building the demo checkpoint in %s", target)
    build_tiny_checkpoint(staging)
    try:
        staging.rename(target)
    except OSError:
        # Another process won the race: use its copy.
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return target
