"""Sampling per slot: each call may bring its own temperatures and top-k (its route's).

moshi's ``LMGen`` samples every slot of the batch with one temperature and one top-k
(``sample_token(logits, use_sampling, temp, top_k)``). :class:`SlotSampling` gives each slot
its own: ``LMGen.temp``/``temp_text`` are set to :class:`PerSlot` objects holding one value
per slot on the device, and moshi's ``sample_token`` (looked up in ``moshi.models.lm`` at
each call) is wrapped so that a :class:`PerSlot` temperature samples slot by slot; any
other call goes to moshi's own function. The values live in device tensors updated in
place before a step (never during one), so CUDA graphs captured once keep reading them.

Top-k per slot: the worker's own top-k (its ``--top-k``/``--top-k-text`` or the
checkpoint's) is the ceiling: the candidates are the ``ceiling`` most likely tokens as
before, and a slot with a smaller top-k keeps only its first ones. With no override the
arithmetic and the random draws are exactly moshi's (same ``topk``, same exponential
draws), so a worker's calls sample as before. A slot may also be greedy (argmax).
"""

from __future__ import annotations

import threading
import typing as tp

import numpy as np
import torch

OVERRIDABLE = ("temp", "temp_text", "top_k", "top_k_text", "greedy")


class PerSlot:
    """One stream's (text or audio) temperatures and top-k for every slot, on the device."""

    def __init__(self, temp: float, top_k: float, batch_size: int, device: torch.device) -> None:
        self.ceiling = int(top_k)
        self.temp = torch.full((batch_size,), float(temp), dtype=torch.float32, device=device)
        self.top_k = torch.full((batch_size,), self.ceiling, dtype=torch.int64, device=device)
        self.greedy = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.ranks = torch.arange(self.ceiling, device=device)

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` [B, ..., card] → tokens [B, ...], each slot with its own settings."""
        shape = (logits.shape[0],) + (1,) * (logits.dim() - 1)
        temp = self.temp.view(shape)
        probs = torch.softmax(logits / temp.clamp(min=1e-6), dim=-1)
        k = min(self.ceiling, logits.shape[-1])
        top, indices = torch.topk(probs, k, dim=-1)
        top = top * (self.ranks[:k] < self.top_k.view(shape))
        # moshi's multinomial for one sample: argmax of p / Exp(1), no host synchronisation
        draws = torch.empty_like(top).exponential_(1)
        sampled = indices.gather(-1, (top / draws).argmax(dim=-1, keepdim=True))
        best = torch.argmax(logits, dim=-1, keepdim=True)
        greedy = self.greedy.view(shape) | (temp <= 0)
        return torch.where(greedy, best, sampled)[..., 0]


class SlotSampling:
    """The sampling settings of every slot: the worker's defaults, and each call's overrides.

    ``set(slot, overrides)`` (the event loop, when a session starts) records a slot's
    settings and returns them whole; ``apply()`` (the inference thread, before a step)
    copies what changed to the device.
    """

    def __init__(self, defaults: dict[str, tp.Any], batch_size: int, device: torch.device) -> None:
        self.defaults = {
            "temp": float(defaults["temp"]),
            "temp_text": float(defaults["temp_text"]),
            "top_k": int(defaults["top_k"]),
            "top_k_text": int(defaults["top_k_text"]),
            "greedy": False,
        }
        self.audio = PerSlot(self.defaults["temp"], self.defaults["top_k"], batch_size, device)
        self.text = PerSlot(self.defaults["temp_text"], self.defaults["top_k_text"], batch_size, device)
        self._host = {name: np.full(batch_size, value) for name, value in self.defaults.items()}
        self._lock = threading.Lock()
        self._dirty = False

    def set(self, slot: int, overrides: tp.Mapping[str, tp.Any] | None) -> dict[str, tp.Any]:
        """The settings ``slot`` samples with from its next step: the defaults with
        ``overrides``, top-k no higher than the worker's own (see the module docstring)."""
        settings = dict(self.defaults)
        for name, value in (overrides or {}).items():
            if name in OVERRIDABLE and value is not None:
                settings[name] = value
        settings["top_k"] = max(1, min(int(settings["top_k"]), self.audio.ceiling))
        settings["top_k_text"] = max(1, min(int(settings["top_k_text"]), self.text.ceiling))
        settings["temp"], settings["temp_text"] = float(settings["temp"]), float(settings["temp_text"])
        settings["greedy"] = bool(settings["greedy"])
        with self._lock:
            for name, value in settings.items():
                self._host[name][slot] = value
            self._dirty = True
        return settings

    def apply(self) -> None:
        """Copy the settings changed since the last step to the device (inference thread)."""
        if not self._dirty:
            return
        with self._lock:
            host = {name: values.copy() for name, values in self._host.items()}
            self._dirty = False
        device = self.audio.temp.device
        self.audio.temp.copy_(torch.from_numpy(host["temp"].astype(np.float32)).to(device))
        self.audio.top_k.copy_(torch.from_numpy(host["top_k"].astype(np.int64)).to(device))
        self.text.temp.copy_(torch.from_numpy(host["temp_text"].astype(np.float32)).to(device))
        self.text.top_k.copy_(torch.from_numpy(host["top_k_text"].astype(np.int64)).to(device))
        greedy = torch.from_numpy(host["greedy"].astype(np.bool_)).to(device)
        self.audio.greedy.copy_(greedy)
        self.text.greedy.copy_(greedy)


_installed = False


def install() -> None:
    """Wrap ``moshi.models.lm.sample_token`` once so that a :class:`PerSlot` temperature
    samples per slot (every other call is moshi's own)."""
    global _installed
    if _installed:
        return
    from moshi.models import lm

    original = lm.sample_token  # type: ignore[attr-defined]  # imported there from moshi.utils.sampling

    def sample_token(
        logits: torch.Tensor, use_sampling: bool = False, temp: tp.Any = 1.0, top_k: int = 0, top_p: float = 0.0
    ) -> torch.Tensor:
        if isinstance(temp, PerSlot) and use_sampling:
            return temp.sample(logits)
        return original(logits, use_sampling, temp, top_k, top_p)

    lm.sample_token = sample_token  # type: ignore[attr-defined]
    _installed = True
