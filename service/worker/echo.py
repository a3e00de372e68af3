"""``--model echo``: an engine that plays the caller's audio back, with no torch at all.

It measures the gateway path alone. It is unclocked: the worker answers each input frame
as it arrives, ``delay_ms`` later (0 = at once), instead of on the 80 ms batch clock.
Its :meth:`EchoEngine.step` also works under the clock (a per-slot delay line of whole
frames), so the clock can be exercised without a model.
"""

from __future__ import annotations

import collections
import math
import typing as tp

import numpy as np

from service.wire import FRAME_SAMPLES, FRAME_SECONDS
from service.worker.checkpoint import ModelInfo
from service.worker.engine_api import NO_TOKEN, StepOutput, TextTokenizer

if tp.TYPE_CHECKING:
    from service.worker.sizing import SlotSizing


class EchoEngine:
    """Each input frame comes back as output after ``delay_ms``."""

    clocked = False
    tokenizer: TextTokenizer | None = None
    sizing: SlotSizing | None = None
    text_padding_ids: frozenset[int] = frozenset()

    def __init__(self, batch_size: int, delay_ms: int = 0, *, clocked: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if delay_ms < 0:
            raise ValueError(f"delay_ms must not be negative, got {delay_ms}")
        self.batch_size = batch_size
        self.clocked = clocked  # True: stepped by the batch clock (tests the clock without a model)
        self.delay_seconds = delay_ms / 1000.0
        self.info = ModelInfo(model="echo", license="n/a (no model: echoes the caller)", source="echo")
        self._delay_frames = math.ceil(self.delay_seconds / FRAME_SECONDS - 1e-9)
        self._lines: list[collections.deque[np.ndarray]] = [collections.deque() for _ in range(batch_size)]

    def warm_up(self) -> float:
        return 0.0

    def set_slot_sampling(self, slot: int, overrides: dict[str, tp.Any] | None) -> dict[str, tp.Any] | None:
        return None  # nothing is sampled: the caller's audio comes back

    def step(self, inputs: np.ndarray, active: np.ndarray, fresh: np.ndarray) -> StepOutput:
        B = self.batch_size
        if inputs.shape != (B, FRAME_SAMPLES):
            raise ValueError(f"inputs must be [{B}, {FRAME_SAMPLES}], got {list(inputs.shape)}")
        out = np.zeros((B, FRAME_SAMPLES), dtype=np.float32)
        for slot in range(B):
            if not active[slot]:
                continue
            line = self._lines[slot]
            if fresh[slot]:
                line.clear()
            line.append(np.asarray(inputs[slot], dtype=np.float32))
            if len(line) > self._delay_frames:
                out[slot] = line.popleft()
        return StepOutput(pcm=out, text_tokens=np.full(B, NO_TOKEN, dtype=np.int64))

    def respond(self, frame: bytes) -> bytes:
        """Unclocked use: the reply to one PCM16 frame (sent ``delay_seconds`` later)."""
        return frame

    def close(self) -> None:
        self._lines = [collections.deque() for _ in range(self.batch_size)]
