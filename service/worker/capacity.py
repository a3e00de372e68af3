"""Memory per slot, the context that sets it, and how many slots memory allows.

Each slot holds its own copy of the streaming state; the main transformer's KV ring is
almost all of it: 2 (k, v) x layers x context x kv dim x bytes, 1.46 GiB for the 7B at
context 3000 in bf16. The ring holds ``context`` steps (3000 = 240 s at 12.5 Hz); a
shorter context (``--context-seconds``) shrinks it in proportion, so more slots fit, and
the model keeps less of the call in mind (it attends over the last ``context`` steps only).
"""

from __future__ import annotations

import dataclasses
import logging
import typing as tp

log = logging.getLogger(__name__)

FRAME_RATE = 12.5  # model steps per second
GPU_MEMORY_HEADROOM = 0.9  # keep 10% of free memory for activations, graphs and the allocator
PER_SLOT_OVERHEAD = 1.15  # KV cache plus Mimi, depformer and activation buffers per slot
CPU_MEMORY_SHARE = 0.5  # on CPU: at most half the available memory goes to slot state
MAX_SLOTS = 1024


class ContextError(ValueError):
    """--context-seconds does not fit the checkpoint."""


def context_steps(seconds: float) -> int:
    """Model steps in ``seconds`` of call (at least one)."""
    return max(1, round(seconds * FRAME_RATE))


def _attentions(lm: tp.Any) -> list[tp.Any]:
    """The main transformer's self-attention modules (not the depformer's)."""
    from moshi.modules.transformer import StreamingMultiheadAttention

    return [m for m in lm.transformer.modules() if isinstance(m, StreamingMultiheadAttention) and not m.cross_attention]


def set_context(lm: tp.Any, seconds: float | None) -> int:
    """Give the LM's KV ring ``seconds`` of context (None: the checkpoint's own); return the steps.

    Call before any engine enters streaming: the ring is sized when streaming starts.
    Raises :class:`ContextError` past the checkpoint's own context: the model never
    attended further than that in training; and without ``seconds`` for a checkpoint that
    declares none: moshi streams only with a bounded KV ring.
    """
    trained = getattr(lm, "_moshimoshi_trained_context", lm.context)
    lm._moshimoshi_trained_context = trained  # what the checkpoint came with, across calls
    steps = trained if seconds is None else context_steps(seconds)
    if steps is None:
        raise ContextError(
            'this checkpoint declares no context length (no "context" in its config.json): '
            "set MOSHIMOSHI_CONTEXT_SECONDS"
        )
    if trained is not None and steps > trained:
        raise ContextError(
            f"MOSHIMOSHI_CONTEXT_SECONDS={seconds:g} exceeds this checkpoint's context of "
            f"{trained / FRAME_RATE:g} s ({trained} steps); choose at most that"
        )
    for attention in _attentions(lm):
        attention.context = steps
    lm.context = steps
    return steps


def fill_rings(lm: tp.Any) -> None:
    """Mark every slot's KV ring full, as after a call past its context: the step then reads
    whole rings, its worst case (what the contents are does not matter for timing). For
    timing runs only: a session's first step resets its slot."""
    for attention in _attentions(lm):
        state = attention._streaming_state
        if state is not None and state.kv_cache is not None:
            capacity = state.kv_cache.capacity
            state.kv_cache.end_offset.fill_(capacity)
            state.offset.fill_(capacity)


def kv_bytes_per_slot(lm: tp.Any) -> int:
    """Bytes of the main transformer's KV ring for one slot at the LM's current context."""
    import torch

    total = 0
    for attention in _attentions(lm):
        weight = attention.in_projs[0].weight
        itemsize = torch.finfo(weight.dtype).bits // 8 if weight.dtype.is_floating_point else 2
        kv_heads = attention.num_heads // attention.kv_repeat
        total += 2 * kv_heads * (attention.embed_dim // attention.num_heads) * (attention.context or 0) * itemsize
    return total


def streaming_state_bytes(*modules: tp.Any, batch_size: int = 1) -> int:
    """Measured: bytes of every tensor in the streaming state of ``modules`` at ``batch_size``.

    Enters streaming, sums, leaves. On the meta device nothing is allocated, so the 7B's
    figure is read without a GPU.
    """
    import contextlib

    import torch
    from moshi.modules.streaming import StreamingModule

    def tensors(value: tp.Any, seen: set[int]) -> int:
        if isinstance(value, torch.Tensor):
            if id(value) in seen:
                return 0
            seen.add(id(value))
            return value.numel() * value.element_size()
        if dataclasses.is_dataclass(value) or hasattr(value, "__dict__"):
            return sum(tensors(v, seen) for v in vars(value).values())
        if isinstance(value, (list, tuple)):
            return sum(tensors(v, seen) for v in value)
        return 0

    seen: set[int] = set()
    with contextlib.ExitStack() as stack, torch.no_grad():
        for module in modules:
            stack.enter_context(module.streaming(batch_size))
        total = 0
        for module in modules:
            for sub in module.modules():
                if isinstance(sub, StreamingModule) and sub._streaming_state is not None:
                    total += tensors(sub._streaming_state, seen)
        return total


@dataclasses.dataclass(frozen=True)
class MemoryBound:
    """How many slots memory allows, and why."""

    slots: int
    per_slot_bytes: int  # KV ring x PER_SLOT_OVERHEAD
    free_bytes: int | None
    where: str  # "gpu" or "cpu"

    def describe(self) -> str:
        free = f"{self.free_bytes / 2**30:.1f} GiB free" if self.free_bytes is not None else "free memory unknown"
        return (
            f"{self.where.upper()}: {free}, {self.per_slot_bytes / 2**20:.1f} MiB per slot -> {self.slots} slot(s) fit"
        )


def _cpu_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_slots(lm: tp.Any, device: str) -> MemoryBound:
    """Slots that fit the device's free memory, the weights being loaded already."""
    per_slot = max(1, int(kv_bytes_per_slot(lm) * PER_SLOT_OVERHEAD))
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        slots = int(free * GPU_MEMORY_HEADROOM // per_slot)
        return MemoryBound(max(1, min(MAX_SLOTS, slots)), per_slot, free, "gpu")
    available = _cpu_available_bytes()
    slots = MAX_SLOTS if available is None else int(available * CPU_MEMORY_SHARE // per_slot)
    return MemoryBound(max(1, min(MAX_SLOTS, slots)), per_slot, available, "cpu")
