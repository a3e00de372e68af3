"""The model's text tokens -> transcript pieces of the agent's words, with their time.

Moshi emits one text token per 80 ms step: mostly padding, sometimes a SentencePiece
piece. A Japanese character that the tokenizer spells with byte-fallback pieces arrives
over several steps (``<0xE9>``, ``<0xAC>``, ``<0xB1>`` = 鬱); decoding each piece alone
would give U+FFFD fragments. :class:`TextStream` therefore keeps the recent token list,
decodes it whole, and emits only the new suffix, holding back a trailing incomplete
character until its last byte arrives. Bytes that can never complete are dropped and
counted, never emitted as U+FFFD. Control characters (a babbling model can spell them
with byte pieces) are not transcript text and are removed.
"""

from __future__ import annotations

import dataclasses
import unicodedata

from service.wire import FRAME_SECONDS
from service.worker.engine_api import NO_TOKEN, TextTokenizer

REPLACEMENT = "\ufffd"
MAX_PENDING_BYTES = 3  # a UTF-8 character is at most 4 bytes: at most 3 can wait for the 4th
WINDOW_TOKENS = 64  # decode at most this many recent tokens (one is kept as context)


@dataclasses.dataclass(frozen=True)
class TextPiece:
    """A transcript piece and its time in the call (seconds since the slot's reset)."""

    text: str
    t: float


def skipped_ids(tokenizer: TextTokenizer, padding_ids: frozenset[int] | set[int]) -> frozenset[int]:
    """Ids never shown: the model's padding ids and the tokenizer's control/unknown pieces."""
    skip = set(padding_ids)
    is_control = getattr(tokenizer, "is_control", None)
    is_unknown = getattr(tokenizer, "is_unknown", None)
    if is_control is not None and is_unknown is not None:
        skip.update(i for i in range(tokenizer.vocab_size()) if is_control(i) or is_unknown(i))
    return frozenset(skip)


class TextStream:
    """One slot's text decoder; create a new one for each session."""

    def __init__(
        self, tokenizer: TextTokenizer, skip_ids: frozenset[int], frame_seconds: float = FRAME_SECONDS
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_ids
        self._vocab = tokenizer.vocab_size()
        self._frame_seconds = frame_seconds
        self._window: list[int] = []
        self._consumed = 0  # characters of decode(window) already emitted or dropped
        self.dropped_bytes = 0  # byte pieces that never formed a character
        self.invalid_tokens = 0  # ids the tokenizer does not know

    def push(self, token: int, step: int) -> TextPiece | None:
        """Feed the token of step ``step`` (0 = the session's first); maybe get a piece."""
        if token == NO_TOKEN or token in self._skip:
            return None
        if not 0 <= token < self._vocab:
            self.invalid_tokens += 1
            return None
        self._window.append(token)
        text = self._tokenizer.decode(self._window)
        new = text[self._consumed :]
        held = len(new) - len(new.rstrip(REPLACEMENT))
        held = min(held, MAX_PENDING_BYTES)
        ready = new[: len(new) - held]
        self._consumed += len(ready)
        clean = ready.replace(REPLACEMENT, "")
        self.dropped_bytes += len(ready) - len(clean)
        if any(unicodedata.category(ch) == "Cc" for ch in clean):
            clean = "".join(ch for ch in clean if unicodedata.category(ch) != "Cc")
        if held == 0 and len(self._window) > WINDOW_TOKENS:
            # Keep the last token as context: it decides whether the next piece's "▁" is a space.
            self._window = self._window[-1:]
            self._consumed = len(self._tokenizer.decode(self._window))
        if not clean:
            return None
        return TextPiece(clean, round(step * self._frame_seconds, 3))
