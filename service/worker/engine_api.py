"""The interface every inference engine gives the worker's clock and server (no torch here)."""

from __future__ import annotations

import dataclasses
import typing as tp

import numpy as np

from service.worker.checkpoint import ModelInfo

if tp.TYPE_CHECKING:
    from service.worker.sizing import SlotSizing

NO_TOKEN = -1  # text token of a slot that produced none this step (idle, or not yet generating)


@dataclasses.dataclass
class StepOutput:
    """What one batched step produced for every slot."""

    pcm: np.ndarray  # [B, FRAME_SAMPLES] float32 in [-1, 1]; silence for idle slots
    text_tokens: np.ndarray  # [B] int64; NO_TOKEN where nothing was generated


class TextTokenizer(tp.Protocol):
    """The part of a SentencePiece processor the text decoder uses."""

    def vocab_size(self) -> int: ...

    def decode(self, ids: list[int]) -> str: ...


class Engine(tp.Protocol):
    """B slots stepped together, one 80 ms frame per slot per step.

    ``step`` is called from one thread only (the worker's inference thread).
    ``clocked`` engines are stepped by the worker's 80 ms clock; an unclocked one (echo)
    answers each input frame as it arrives.
    """

    info: ModelInfo
    batch_size: int
    clocked: bool
    tokenizer: TextTokenizer | None
    text_padding_ids: frozenset[int]
    sizing: SlotSizing | None  # how B was chosen, when it was measured (set by build_engine)

    def warm_up(self) -> float:
        """Run every code path once before the first call; the seconds it took."""
        ...

    def step(self, inputs: np.ndarray, active: np.ndarray, fresh: np.ndarray) -> StepOutput:
        """Step every slot: ``inputs`` [B, 1920] float32, ``active`` [B] bool (slots with a
        session: only these advance), ``fresh`` [B] bool (slots whose state is reset before
        this step: a new session's first step)."""
        ...

    def close(self) -> None: ...

    def set_slot_sampling(self, slot: int, overrides: dict[str, tp.Any] | None) -> dict[str, tp.Any] | None:
        """A new session on ``slot`` samples with the worker's settings and ``overrides``
        (its route's); returns what it samples with (None: the engine does not sample)."""
        ...


def pcm16_to_float(frame: bytes) -> np.ndarray:
    """3840 bytes of PCM16 LE -> 1920 float32 samples in [-1, 1)."""
    return np.frombuffer(frame, dtype="<i2").astype(np.float32) / 32768.0


def float_to_pcm16(samples: np.ndarray) -> bytes:
    """Float samples -> PCM16 LE bytes, clipped (the model can overshoot 1.0)."""
    scaled = np.clip(np.rint(samples * 32768.0), -32768, 32767)
    return scaled.astype("<i2").tobytes()
