"""Which LM architecture a checkpoint holds, when its repo says it (config.json), when its
authors' tools said it (moshi_lm_kwargs.json), and when nothing says it (the Moshi 7B).

LLM-jp-Moshi-v1 and J-Moshi were saved with moshi 0.2.2 and ship no ``config.json``: 0.2.2
then built the Moshi 7B, and moshi 0.2.13 still does but warns that this fallback may be
removed. The worker therefore applies the 7B defaults itself (:data:`MOSHI_7B_LM_KWARGS`) and
says so. A ``moshi_lm_kwargs.json`` (the LMModel kwargs as the J-Moshi fine-tuning tools dump
them; LLM-jp-Moshi-v1's repo has one) is read when present, translated from 0.2.2's
conventions to the installed moshi's (:func:`lm_kwargs_from_legacy`).
"""

from __future__ import annotations

import dataclasses
import typing as tp

CONFIG_NAME = "config.json"
LEGACY_KWARGS_NAME = "moshi_lm_kwargs.json"

FROM_CONFIG = "config.json"
FROM_LEGACY_KWARGS = LEGACY_KWARGS_NAME
FROM_7B_DEFAULTS = "moshi-7b-defaults"

# moshi 0.2.2's ``loaders._lm_kwargs``: the architecture of every Moshi 7B release, the one a
# repo without config.json was always built with (a test compares this with 0.2.2's own).
# 0.2.2's dict also has "depformer_causal": True, which later releases dropped (the depformer
# follows "causal"); it is left out here for the same reason.
MOSHI_7B_LM_KWARGS: dict[str, tp.Any] = {
    "dim": 4096,
    "text_card": 32000,
    "existing_text_padding_id": 3,
    "n_q": 16,
    "dep_q": 8,
    "card": 2048,
    "num_heads": 32,
    "num_layers": 32,
    "hidden_scale": 4.125,
    "causal": True,
    "layer_scale": None,
    "context": 3000,
    "max_period": 10000,
    "gating": "silu",
    "norm": "rms_norm_f32",
    "positional_embedding": "rope",
    "depformer_dim": 1024,
    "depformer_dim_feedforward": 4224,
    "depformer_num_heads": 16,
    "depformer_num_layers": 6,
    "depformer_layer_scale": None,
    "depformer_multi_linear": True,
    "depformer_context": 8,
    "depformer_max_period": 10000,
    "depformer_gating": "silu",
    "depformer_pos_emb": "none",
    "depformer_weights_per_step": True,
    "delays": [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1],
}

# Keys the fine-tuning tools write that are not LMModel arguments (they drop them too).
IGNORED_LEGACY_KEYS = frozenset({"llama_name_or_path"})
# What the worker cannot serve, whatever moshi accepts.
UNSERVABLE_LEGACY_KEYS = frozenset({"conditioners", "fuser"})


class ArchitectureError(ValueError):
    """A moshi_lm_kwargs.json the installed moshi cannot build the same model from."""


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The LM kwargs a checkpoint is built with and where they came from."""

    source: str  # FROM_CONFIG, FROM_LEGACY_KWARGS or FROM_7B_DEFAULTS
    lm_kwargs: dict[str, tp.Any] | None  # None: the repo's config.json, as moshi reads it

    def describe(self) -> str:
        if self.source == FROM_CONFIG:
            return "its config.json"
        if self.source == FROM_LEGACY_KWARGS:
            return f"its {LEGACY_KWARGS_NAME} (no {CONFIG_NAME})"
        return f"the Moshi 7B defaults (no {CONFIG_NAME}, no {LEGACY_KWARGS_NAME})"


def moshi_7b() -> Architecture:
    return Architecture(FROM_7B_DEFAULTS, dict(MOSHI_7B_LM_KWARGS))


def lm_kwargs_from_legacy(raw: dict[str, tp.Any]) -> tuple[dict[str, tp.Any], list[str]]:
    """0.2.2-era LMModel kwargs -> kwargs that build the same model under the installed moshi.

    Returns the kwargs and a note per translation made. Raises :class:`ArchitectureError`
    for what cannot be translated.
    """
    kwargs = dict(raw)
    notes: list[str] = []
    for key in sorted(IGNORED_LEGACY_KEYS & kwargs.keys()):
        kwargs.pop(key)
        notes.append(f"ignored {key!r} (not a Moshi LM argument)")
    unservable = sorted(UNSERVABLE_LEGACY_KEYS & kwargs.keys())
    if unservable:
        raise ArchitectureError(
            f"{', '.join(unservable)}: a conditioned model, not a dialogue model the worker can serve"
        )
    if "depformer_causal" in kwargs:
        # 0.2.2 passed it to the depformer; later moshi drops it and gives the depformer the
        # main "causal". The same model only when both agree.
        depformer_causal = kwargs.pop("depformer_causal")
        if depformer_causal != kwargs.get("causal", True):
            raise ArchitectureError(
                f"depformer_causal={depformer_causal!r} with causal="
                f"{kwargs.get('causal', True)!r}: the installed moshi builds "
                "the depformer with the main model's causality"
            )
    if kwargs.get("existing_text_padding_id", "absent") in (None, "absent"):
        # 0.2.2 without it: padding is an extra text token after the vocabulary, and the
        # text head has text_card + 1 outputs. Later moshi spells this out.
        text_card = kwargs.get("text_card", 32000)
        if not isinstance(text_card, int):
            raise ArchitectureError(f"text_card must be an integer, got {text_card!r}")
        kwargs["existing_text_padding_id"] = text_card
        kwargs["text_card_out"] = text_card + 1
        notes.append(f"no existing_text_padding_id: padding is the extra token {text_card}, as in 0.2.2")
    return kwargs, notes


def differences(kwargs: dict[str, tp.Any], reference: dict[str, tp.Any]) -> list[str]:
    """``key: reference -> value`` for each key that differs (for the log)."""
    keys = sorted(set(kwargs) | set(reference))
    return [
        f"{k}: {reference.get(k, '-')!r} -> {kwargs.get(k, '-')!r}"
        for k in keys
        if kwargs.get(k, "-") != reference.get(k, "-")
    ]
