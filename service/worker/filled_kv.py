"""Attend only over what each call has filled of its KV ring (a patch over moshi 0.2.13).

moshi's streaming attention reads each slot's whole ring (``context`` positions) on every
step and masks what is not filled yet; a call 30 s old has filled 375 of 3000 positions,
yet its slot costs as much as a 4-minute call's. This patch replaces the main
transformer's self-attention (LM only; not the depformer, not Mimi) with PyTorch's
``flex_attention`` under a block mask built from each slot's fill level: per slot, only the
``ceil(filled / BLOCK)`` blocks that hold positions are read. Shapes stay static (B x H x
context; the fill levels are tensor data updated in place on the device), so the step
remains capturable in a CUDA graph.

Why it is exact: moshi writes a slot's positions at ring index ``position % context`` and
rotates the keys (RoPE) before writing them, so attention does not care about the order in
the ring. Before the ring wraps, the filled positions are indexes ``[0, end_offset)``
(moshi masks the others as invalid); after it wraps every index is filled and each holds
one of the last ``context`` positions, exactly what moshi's mask keeps. A per-slot reset
sets that slot's ``end_offset`` to 0, so its old entries drop out of the block mask.

``flex_attention`` needs ``torch.compile`` (Inductor on CPU, Triton on GPU): compiling takes
seconds per batch size, which is why this is opt-in (``--filled-kv``).
"""

from __future__ import annotations

import logging
import types
import typing as tp

import torch

log = logging.getLogger(__name__)

BLOCK = 128  # key positions per block: the granularity of what is read
SUPPORTED_MOSHI = ("0.2.13",)

_compiled_flex: tp.Callable[..., torch.Tensor] | None = None


class FilledKVError(RuntimeError):
    """The installed moshi or the model's attention is not what this patch was written for."""


def _flex() -> tp.Callable[..., torch.Tensor]:
    global _compiled_flex
    if _compiled_flex is None:
        import torch._dynamo.config
        from torch.nn.attention.flex_attention import flex_attention

        # one compiled kernel per batch size and context: the sizing search tries a dozen
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def _attentions(lm: tp.Any) -> list[tp.Any]:
    from moshi.modules.transformer import StreamingMultiheadAttention

    return [m for m in lm.transformer.modules() if isinstance(m, StreamingMultiheadAttention) and not m.cross_attention]


def check_supported(lm: tp.Any) -> None:
    """Raise :class:`FilledKVError` unless moshi and the attention are the ones patched."""
    from importlib import metadata

    version = metadata.version("moshi")
    if version not in SUPPORTED_MOSHI:
        raise FilledKVError(
            f"--filled-kv patches moshi {', '.join(SUPPORTED_MOSHI)}'s attention; moshi {version} is installed"
        )
    for attention in _attentions(lm):
        if (
            attention.kv_repeat != 1
            or attention.weights_per_step
            or not attention.causal
            or attention.context is None
            or len(attention.in_projs) != 1
        ):
            raise FilledKVError(
                "--filled-kv: this model's attention has a layout the patch does not cover "
                "(grouped KV heads, weights per step, non-causal or no context)"
            )


class FilledBlocks:
    """The block mask of one attention layer's ring, rebuilt from its ``end_offset`` each step."""

    def __init__(self, batch_size: int, capacity: int, device: torch.device, block: int = BLOCK) -> None:
        self.capacity = capacity
        self.block = min(block, capacity)
        blocks = -(-capacity // self.block)
        self.filled = torch.zeros(batch_size, dtype=torch.long, device=device)
        indexes = torch.arange(blocks, dtype=torch.int32, device=device)
        self._full_indices = indexes.view(1, 1, 1, -1).expand(batch_size, 1, 1, blocks).contiguous()
        self._partial_indices = torch.zeros(batch_size, 1, 1, blocks, dtype=torch.int32, device=device)
        filled = self.filled

        def inside(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            return kv_idx < filled[b]

        self._mask_mod = inside

    def update(self, end_offset: torch.Tensor) -> tp.Any:
        """The BlockMask for the ring after this step's write (``end_offset`` already advanced)."""
        from torch.nn.attention.flex_attention import BlockMask

        self.filled.copy_(torch.clamp(end_offset, max=self.capacity))
        full = torch.div(self.filled, self.block, rounding_mode="floor")
        partial = (self.filled - full * self.block > 0).to(torch.int32)
        self._partial_indices[:, 0, 0, 0] = full.to(torch.int32).clamp(max=self._full_indices.shape[-1] - 1)
        return BlockMask.from_kv_blocks(
            partial.view(-1, 1, 1),
            self._partial_indices,
            full.to(torch.int32).view(-1, 1, 1),
            self._full_indices,
            BLOCK_SIZE=(self.block, self.block),
            mask_mod=self._mask_mod,
            seq_lengths=(1, self.capacity),
            compute_q_blocks=False,
        )


def _forward(self: tp.Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """moshi 0.2.13's StreamingMultiheadAttention.forward for the LM's self-attention while
    streaming one step at a time, with flex attention over the filled blocks."""
    from einops import rearrange

    state = self._streaming_state
    blocks: FilledBlocks | None = getattr(self, "_filled_blocks", None)
    if state is None or state.kv_cache is None or query.shape[1] != 1 or blocks is None:
        plain: torch.Tensor = type(self).forward(self, query, key, value)
        return plain
    offset = state.offset
    projected = self.in_projs[0](query)
    q, k, v = rearrange(projected, "b t (p h d) -> p b h t d", p=3, h=self.num_heads)
    if self.rope:
        q, k = self.rope(q, k, offset, time_before_heads=False)
    keys, values, _ = self._complete_kv(k, v)
    block_mask = blocks.update(state.kv_cache.end_offset)
    x: torch.Tensor = _flex()(q, keys, values, block_mask=block_mask)
    x = rearrange(x, "b h t d -> b t (h d)")
    x = self.out_projs[0](x)
    state.offset[:] = torch.where(state.exec_mask, state.offset + 1, state.offset)
    state.offset_cpu += 1
    return x


class FilledKV:
    """Patches the LM's self-attention for one streaming batch; ``close`` takes it off.

    Create after the LM entered streaming (the rings exist then).
    """

    def __init__(self, lm: tp.Any, batch_size: int) -> None:
        check_supported(lm)
        self._patched = []
        for attention in _attentions(lm):
            state = attention._streaming_state
            if state is None or state.kv_cache is None:
                raise FilledKVError("--filled-kv: the LM is not streaming yet")
            attention._filled_blocks = FilledBlocks(batch_size, state.kv_cache.capacity, state.kv_cache.cache.device)
            attention.forward = types.MethodType(_forward, attention)
            self._patched.append(attention)
        log.info(
            "filled-KV attention on %d layer(s): each slot reads only the blocks its call has filled",
            len(self._patched),
        )

    def close(self) -> None:
        for attention in self._patched:
            attention.__dict__.pop("forward", None)
            attention.__dict__.pop("_filled_blocks", None)
        self._patched.clear()
