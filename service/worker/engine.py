"""The batched Moshi engine: one Mimi and one LMGen stepping B independent calls at once.

Each step runs Mimi encode -> LMGen step -> Mimi decode for all B slots together. Slots
are independent streams (moshi >= 0.2.5):

- a new session resets ONLY its slot (``reset_streaming(reset_mask)`` on Mimi and LMGen);
- exec masks keep idle slots' states untouched, as if the step never happened for them;
- LMGen(support_out_of_sync=True) returns the ungenerated token (-2) for a slot whose
  stream has not produced audio yet (its first step) or is idle: such tokens are never
  decoded, the slot outputs silence and its Mimi decoder state does not advance;
- Kyutai's first-frame rule (moshi/server.py): a stream's first input frame is encoded,
  then the Mimi encoder state is reset again so that the second frame sees the same left
  padding; the LM never reads that first frame. Applied per slot.

On CUDA, moshi's ``CUDAGraphed`` wrappers inside Mimi and LMGen capture the graphs during
:meth:`MoshiEngine.warm_up`, which also runs a per-slot reset so that every code path of a
live step has run before the worker reports ready.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import typing as tp

import numpy as np
import torch

from service.wire import FRAME_SAMPLES
from service.worker.capacity import fill_rings, kv_bytes_per_slot
from service.worker.checkpoint import LoadedModel, ModelInfo, check_moshi_version
from service.worker.engine_api import NO_TOKEN, StepOutput, TextTokenizer
from service.worker.sampling import SlotSampling
from service.worker.sampling import install as install_slot_sampling

if tp.TYPE_CHECKING:
    from service.worker.sizing import SlotSizing

log = logging.getLogger(__name__)

MOSHI_VERSION = check_moshi_version()  # fail at import with a clear message on moshi < 0.2.5

DEFAULT_SAMPLING = {"temp": 0.8, "temp_text": 0.7, "top_k": 250, "top_k_text": 25}


class MoshiEngine:
    """B slots of one Moshi checkpoint; see the module docstring for the per-slot rules."""

    clocked = True
    sizing: SlotSizing | None = None

    def __init__(
        self,
        model: LoadedModel,
        batch_size: int,
        *,
        greedy: bool = False,
        temp: float | None = None,
        temp_text: float | None = None,
        top_k: int | None = None,
        top_k_text: int | None = None,
        seed: int = 42424242,
        cuda_graphs: bool = True,
        filled_kv: bool = False,
    ) -> None:
        from moshi.models.lm import LMGen

        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.info: ModelInfo = model.info
        self.batch_size = batch_size
        self.tokenizer: TextTokenizer | None = model.tokenizer
        self.text_padding_ids = model.text_padding_ids
        self.mimi = model.mimi
        self.lm = model.lm
        self.device = self.lm.device
        self.greedy = greedy
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        torch.manual_seed(seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed_all(seed)

        sampling: dict[str, tp.Any] = dict(DEFAULT_SAMPLING)  # LMGen's keyword arguments, some from JSON
        sampling.update({k: v for k, v in model.checkpoint.lm_gen_config.items() if k in sampling})
        overrides = {"temp": temp, "temp_text": temp_text, "top_k": top_k, "top_k_text": top_k_text}
        sampling.update({k: v for k, v in overrides.items() if v is not None})
        self.sampling = sampling
        # What each call is sampled with: in /v1/info and each session's "started" message.
        self.info = dataclasses.replace(self.info, sampling={"greedy": greedy, **sampling})
        self.lm_gen = LMGen(self.lm, use_sampling=not greedy, support_out_of_sync=True, **sampling)
        # each call may sample its own way (its route's settings): service/worker/sampling.py
        self.slot_sampling: SlotSampling | None = None
        if not greedy:
            install_slot_sampling()
            self.slot_sampling = SlotSampling(sampling, batch_size, self.device)
            self.lm_gen.temp = self.slot_sampling.audio  # type: ignore[assignment]
            self.lm_gen.temp_text = self.slot_sampling.text  # type: ignore[assignment]
        self._codebooks = self.lm.dep_q
        self.kv_bytes_per_slot = kv_bytes_per_slot(self.lm)
        # Streaming for the engine's whole life; close() leaves it so the modules can be reused.
        self._streaming = contextlib.ExitStack()
        try:
            with self._graphs(), torch.no_grad():
                self._streaming.enter_context(self.mimi.streaming(batch_size))
                self._streaming.enter_context(self.lm_gen.streaming(batch_size))
        except BaseException:  # out of device memory, say: leave the modules reusable
            self._streaming.close()
            _drop_streaming_states(self.mimi, self.lm_gen, self.lm)
            raise
        self._filled_kv = None
        if filled_kv:
            from service.worker.filled_kv import FilledKV

            try:
                self._filled_kv = FilledKV(self.lm, batch_size)
            except BaseException:
                self.close()
                raise
        # Slots whose next encoded frame is their stream's first (Kyutai's first-frame rule).
        self._first_frame = torch.zeros(batch_size, dtype=torch.bool, device=self.device)

    def _graphs(self) -> contextlib.AbstractContextManager:
        """CUDA graphs only where asked for; no torch.compile on CPU.

        moshi compiles a few small kernels lazily (RMS norm, RoPE); on CPU that buys nothing
        and costs seconds at the first step and again for every new batch size.
        """
        from moshi.utils.compile import no_compile, no_cuda_graph

        stack = contextlib.ExitStack()
        if not self.cuda_graphs:
            stack.enter_context(no_cuda_graph())
        if self.device.type == "cpu":
            stack.enter_context(no_compile())
        return stack

    def _mask(self, values: np.ndarray) -> torch.Tensor:
        mask = torch.from_numpy(np.ascontiguousarray(values, dtype=np.bool_))
        return mask.to(self.device, non_blocking=True)

    @torch.no_grad()
    def step(self, inputs: np.ndarray, active: np.ndarray, fresh: np.ndarray) -> StepOutput:
        B = self.batch_size
        if inputs.shape != (B, FRAME_SAMPLES):
            raise ValueError(f"inputs must be [{B}, {FRAME_SAMPLES}], got {list(inputs.shape)}")
        with self._graphs():
            return self._step(inputs, active, fresh)

    def set_slot_sampling(self, slot: int, overrides: dict[str, tp.Any] | None) -> dict[str, tp.Any] | None:
        """How ``slot`` samples from its next step on: the worker's settings with the call's
        ``overrides`` (a greedy worker samples every call greedily). Returns the settings."""
        if self.slot_sampling is None:
            return self.info.sampling
        return self.slot_sampling.set(slot, overrides)

    def _step(self, inputs: np.ndarray, active_np: np.ndarray, fresh_np: np.ndarray) -> StepOutput:
        if self.slot_sampling is not None:
            self.slot_sampling.apply()
        active = self._mask(active_np)
        fresh = self._mask(np.asarray(fresh_np) & np.asarray(active_np))
        if bool(np.any(fresh_np)):
            self.mimi.reset_streaming(fresh)
            self.lm_gen.reset_streaming(fresh)
            self._first_frame |= fresh

        x = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
        x = x.to(self.device, non_blocking=True)[:, None, :]
        self.mimi.set_exec_mask(active)
        codes = self.mimi.encode(x)  # [B, n_q_user, 1]
        first = self._first_frame & active
        if bool(first.any()):
            # Re-prime the encoder so the stream's second frame gets the same left padding as
            # its first (the LM never reads the first frame: it is in its past).
            self.mimi.reset_streaming(first)
            self._first_frame &= ~active

        self.lm_gen.set_exec_mask(active)
        tokens = self.lm_gen.step(codes)  # [B, 1 + dep_q, 1]; -2 where nothing was generated
        assert tokens is not None  # support_out_of_sync always returns tokens
        audio = tokens[:, 1 : 1 + self._codebooks, :]
        text = tokens[:, 0, 0]
        decodable = active & (audio >= 0).all(dim=2).all(dim=1)
        self.mimi.set_exec_mask(decodable)
        pcm = self.mimi.decode(audio.clamp(min=0))[:, 0, :]  # [B, 1920]
        pcm = torch.where(decodable[:, None], pcm, torch.zeros_like(pcm))
        text = torch.where(decodable & (text >= 0), text, torch.full_like(text, NO_TOKEN))
        return StepOutput(pcm=pcm.float().cpu().numpy(), text_tokens=text.cpu().numpy().astype(np.int64))

    def warm_up(self, steps: int = 6) -> float:
        """Run every code path of a live step (and capture CUDA graphs); return seconds taken.

        All slots run ``steps`` steps on noise, with a reset of half of them midway; the
        slots are left idle: each new session resets its own slot anyway.
        """
        start = time.monotonic()
        B = self.batch_size
        rng = np.random.default_rng(0)
        everyone = np.ones(B, dtype=bool)
        half = np.zeros(B, dtype=bool)
        half[::2] = True
        for i in range(max(steps, 4)):
            noise = (rng.standard_normal((B, FRAME_SAMPLES)) * 0.05).astype(np.float32)
            fresh = everyone if i == 0 else (half if i == steps // 2 else ~everyone)
            self.step(noise, everyone, fresh)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.monotonic() - start

    def fill_rings(self) -> None:
        """Before a timing run: every slot's KV ring full (the step's worst case)."""
        fill_rings(self.lm)

    def close(self) -> None:
        """Leave streaming mode (the models can then back another engine)."""
        if self._filled_kv is not None:
            self._filled_kv.close()
            self._filled_kv = None
        self._streaming.close()


def _drop_streaming_states(*modules: torch.nn.Module) -> None:
    """Take every submodule out of streaming, also those a failed ``streaming()`` left in it."""
    from moshi.modules.streaming import StreamingModule

    for module in modules:
        for sub in module.modules():
            if isinstance(sub, StreamingModule):
                sub._streaming_state = None
