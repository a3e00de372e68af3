"""Runs under moshi 0.2.2 ONLY (the `.venv-moshi022` environment): the code the authors of
LLM-jp-Moshi-v1 and J-Moshi wrote their checkpoints with.

It imports nothing of this project (moshi 0.2.2, torch, numpy, safetensors, sentencepiece
and the standard library), so that what it writes and computes is 0.2.2's own work:

``build DIR SEED [--lm-only] [--no-text-padding-id]``
    A tiny random Moshi in the authors' file layout: ``model.safetensors`` (an LMModel of
    0.2.2 built from 0.2.2's own ``loaders._lm_kwargs`` with small dimensions, in bf16 as the
    released models are: its attention keeps the fused ``in_proj_weight``), the stock Mimi
    architecture with random weights (a legacy repo has no config to name any other) and
    codebooks spread for clear margins,
    ``moshi_lm_kwargs.json`` (the LM's kwargs, as the J-Moshi fine-tuning tools dump them)
    and no ``config.json``. DIR must already hold ``tokenizer_spm_32k_3.model``.
    ``--lm-only`` writes the LM and its kwargs only (DIR holds a Mimi already);
    ``--no-text-padding-id`` leaves ``existing_text_padding_id`` out of the kwargs, as 0.2.2's
    LMModel allowed (padding is then an extra text token after the vocabulary).

``reference DIR INPUT.npz OUTPUT.npz``
    0.2.2's own greedy inference on that checkpoint, the loop of 0.2.2's ``moshi.server``
    (Mimi encode -> LMGen step -> Mimi decode, the first input frame re-primed), run once per
    segment of INPUT from a fresh stream. OUTPUT holds, per segment, the LM's tokens
    ``[T, 1 + dep_q]`` (-1 where 0.2.2 returned None) and the decoded PCM ``[T, 1920]``.

``lm-kwargs``
    Prints 0.2.2's Moshi 7B ``_lm_kwargs`` as JSON (what a legacy repo without a config means).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")  # no inductor on CPU: nothing to gain here

import numpy as np  # noqa: E402
import torch  # noqa: E402

TOKENIZER_NAME = "tokenizer_spm_32k_3.model"
KWARGS_NAME = "moshi_lm_kwargs.json"


def _tiny_lm_kwargs(text_card: int) -> dict:
    """0.2.2's Moshi 7B kwargs, every key kept (``depformer_causal`` included), made small."""
    from moshi.models import loaders

    kwargs = dict(loaders._lm_kwargs)
    kwargs.update(
        {
            "dim": 64,
            "text_card": text_card,
            "num_heads": 4,
            "num_layers": 2,
            "depformer_dim": 32,
            "depformer_dim_feedforward": int(4.125 * 32),
            "depformer_num_heads": 2,
            "depformer_num_layers": 1,
        }
    )
    return kwargs


def _stock_mimi():
    """The stock Mimi of 0.2.2's ``loaders.get_mimi``, built without a weights file."""
    from moshi.models import loaders
    from moshi.models.compression import MimiModel
    from moshi.modules import SEANetDecoder, SEANetEncoder, transformer
    from moshi.quantization import SplitResidualVectorQuantizer

    encoder = SEANetEncoder(**loaders._seanet_kwargs)
    decoder = SEANetDecoder(**loaders._seanet_kwargs)
    return MimiModel(
        encoder,
        decoder,
        SplitResidualVectorQuantizer(**loaders._quantizer_kwargs),
        channels=1,
        sample_rate=loaders.SAMPLE_RATE,
        frame_rate=loaders.FRAME_RATE,
        encoder_frame_rate=loaders.SAMPLE_RATE / encoder.hop_length,
        causal=True,
        resample_method="conv",
        encoder_transformer=transformer.ProjectedTransformer(**loaders._transformer_kwargs),
        decoder_transformer=transformer.ProjectedTransformer(**loaders._transformer_kwargs),
    )


def _calibration_audio(generator: torch.Generator, seconds: float = 2.0) -> torch.Tensor:
    """[16, 1, T] clips of varied sound (noise, tones, chirps, bursts) at 24 kHz."""
    n = int(24000 * seconds)
    t = torch.arange(n) / 24000
    clips = []
    for i in range(16):
        amplitude = 0.02 * (2 ** (i % 4))
        noise = torch.randn(n, generator=generator) * amplitude
        tone = amplitude * torch.sin(2 * math.pi * (150 + 60 * i) * t * (1 + 0.5 * t * (i % 3)))
        gate = (torch.sin(2 * math.pi * (1.5 + i) * t) > 0).float()
        clips.append(noise * (i % 2) + tone * gate + noise * 0.2)
    return torch.stack(clips)[:, None, :]


def _spread_codebooks(mimi, generator: torch.Generator) -> None:
    """Give Mimi's quantizer codebooks that tell sounds apart, with clear margins.

    A fresh Mimi's codebooks are all zeros, and k-means on the few seconds of audio a test
    can afford leaves 2048-entry codebooks full of near-duplicates: the nearest code then
    flips with the last float bit of the latent (a batch of 4 and a batch of 1 would get
    different codes for the same sound). Instead each layer gets 2048 points on a sphere
    around the mean of what it quantizes (its residual over varied calibration audio), in
    random directions: a latent's code is the direction it leans to most, decided by a
    margin far above float noise, and different sounds lean differently.
    """
    audio = _calibration_audio(generator)
    with torch.no_grad():
        (latent,) = mimi.encoder_transformer(mimi.encoder(audio))
        latent = mimi._to_framerate(latent)
        for rvq in (mimi.quantizer.rvq_first, mimi.quantizer.rvq_rest):
            projected = rvq.input_proj(latent)  # [B, D, T]
            residual = projected.transpose(1, 2).reshape(-1, projected.shape[1])
            for layer in rvq.vq.layers:
                book = layer._codebook
                mean = residual.mean(dim=0)
                radius = (residual - mean).norm(dim=1).mean()
                directions = torch.randn(book.codebook_size, residual.shape[1], generator=generator)
                directions /= directions.norm(dim=1, keepdim=True)
                book.embedding_sum.copy_(mean + radius * directions)
                book.cluster_usage.fill_(1.0)
                book._initialized.fill_(1.0)
                book.register_buffer("_embedding", None, persistent=False)  # drop the cache
                residual = residual - book.decode(book.encode(residual))
    mimi.eval()


def build(directory: Path, seed: int, lm_only: bool = False, text_padding_id: bool = True) -> None:
    import sentencepiece
    from moshi.models import LMModel
    from safetensors.torch import save_file

    tokenizer = directory / TOKENIZER_NAME
    text_card = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer)).vocab_size()
    kwargs = _tiny_lm_kwargs(text_card)
    if not text_padding_id:
        del kwargs["existing_text_padding_id"]
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    mimi = None
    with torch.no_grad():
        if not lm_only:
            mimi = _stock_mimi()
            _spread_codebooks(mimi, generator)
        lm = LMModel(device="cpu", dtype=torch.float32, **kwargs)

    def tensors(module, dtype: torch.dtype | None) -> dict:
        out = {}
        for name, value in module.state_dict().items():
            value = value.detach()
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            out[name] = value.contiguous()
        return out

    save_file(tensors(lm, torch.bfloat16), str(directory / "model.safetensors"))
    if mimi is not None:
        save_file(tensors(mimi, None), str(directory / "tokenizer-e351c8d8-checkpoint125.safetensors"))
    with open(directory / KWARGS_NAME, "w") as f:
        json.dump(kwargs, f, indent=4)


def reference(directory: Path, inputs_path: Path, output_path: Path) -> None:
    from moshi.models import LMGen, loaders

    torch.set_num_threads(1)
    kwargs = json.loads((directory / KWARGS_NAME).read_text())
    mimi = loaders.get_mimi(directory / "tokenizer-e351c8d8-checkpoint125.safetensors", device="cpu")
    lm = loaders.get_moshi_lm(directory / "model.safetensors", lm_kwargs=kwargs, device="cpu", dtype=torch.float32)
    lm_gen = LMGen(lm, use_sampling=False)  # greedy; moshi's default temps and top-ks
    frame = int(mimi.sample_rate / mimi.frame_rate)
    data = np.load(inputs_path)
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        mimi.streaming_forever(1)
        lm_gen.streaming_forever(1)
        for key in sorted(data.files):
            segment = data[key]  # [T, 1920]
            assert segment.shape[1] == frame, segment.shape
            mimi.reset_streaming()
            lm_gen.reset_streaming()
            tokens = np.full((len(segment), 1 + lm.dep_q), -1, dtype=np.int64)
            pcm = np.zeros((len(segment), frame), dtype=np.float32)
            skip_frames = 1
            for t, chunk in enumerate(segment):
                codes = mimi.encode(torch.from_numpy(np.ascontiguousarray(chunk))[None, None])
                if skip_frames:  # as 0.2.2's server: the first frame only primes the encoder
                    mimi.reset_streaming()
                    skip_frames -= 1
                for c in range(codes.shape[-1]):
                    step = lm_gen.step(codes[:, :, c : c + 1])
                    if step is None:
                        continue
                    tokens[t] = step[0, :, 0].numpy()
                    pcm[t] = mimi.decode(step[:, 1:])[0, 0].numpy()
            out[f"{key}.tokens"] = tokens
            out[f"{key}.pcm"] = pcm
    np.savez(output_path, **out)


def main(argv: list[str]) -> int:
    import moshi

    if moshi.__version__ != "0.2.2":
        print(f"moshi022_legacy.py needs moshi 0.2.2, found {moshi.__version__}", file=sys.stderr)
        return 2
    command = argv[0] if argv else ""
    options = {"--lm-only", "--no-text-padding-id"}
    if command == "build" and len(argv) >= 3 and set(argv[3:]) <= options:
        build(
            Path(argv[1]), int(argv[2]), lm_only="--lm-only" in argv, text_padding_id="--no-text-padding-id" not in argv
        )
    elif command == "reference" and len(argv) == 4:
        reference(Path(argv[1]), Path(argv[2]), Path(argv[3]))
    elif command == "lm-kwargs" and len(argv) == 1:
        from moshi.models import loaders

        print(json.dumps(loaders._lm_kwargs))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
