"""Text tokens -> transcript pieces, with the tiny model's real SentencePiece tokenizer."""

from __future__ import annotations

import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from service.worker.engine_api import NO_TOKEN
from service.worker.text import TextStream, skipped_ids
from service.worker.tinymodel import TEXT_PADDING_ID, train_tokenizer

PADDING = frozenset({0, 3})


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> spm.SentencePieceProcessor:
    path = tmp_path_factory.mktemp("spm") / "tokenizer_spm_32k_3.model"
    train_tokenizer(path)
    return spm.SentencePieceProcessor(model_file=str(path))


def stream_for(tokenizer) -> TextStream:
    return TextStream(tokenizer, skipped_ids(tokenizer, PADDING))


def feed(stream: TextStream, tokens: list[int]) -> list[tuple[str, float]]:
    pieces = []
    for step, token in enumerate(tokens):
        piece = stream.push(token, step)
        if piece is not None:
            pieces.append((piece.text, piece.t))
    return pieces


def test_padding_and_ungenerated_steps_are_skipped(tokenizer):
    ids = tokenizer.encode("はい")
    tokens = [NO_TOKEN, 3, 3, 0, *ids, 3, 0, 3]
    pieces = feed(stream_for(tokenizer), tokens)
    assert "".join(text for text, _ in pieces) == "はい"
    assert all(text for text, _ in pieces)


def test_multi_piece_character_is_emitted_once_and_whole(tokenizer):
    ids = tokenizer.encode("鬱")
    pieces = [tokenizer.id_to_piece(i) for i in ids]
    byte_ids = [i for i in ids if tokenizer.is_byte(i)]
    assert len(byte_ids) == 3, pieces  # the tiny vocabulary spells 鬱 with byte fallback
    stream = stream_for(tokenizer)
    # One byte piece per step, with padding between them, as the model would produce.
    tokens = [3, byte_ids[0], 3, byte_ids[1], 0, 3, byte_ids[2], 3]
    emitted = feed(stream, tokens)
    assert emitted == [("鬱", 0.48)]  # at the step of its last byte: 6 x 0.08 s
    assert stream.dropped_bytes == 0


def test_time_is_the_step_index_times_80_ms(tokenizer):
    stream = stream_for(tokenizer)
    (token,) = [i for i in tokenizer.encode("お") if tokenizer.id_to_piece(i) == "お"]
    piece = stream.push(token, 125)
    assert piece is not None and piece.t == 10.0


def test_bytes_that_never_form_a_character_are_dropped_not_sent(tokenizer):
    stream = stream_for(tokenizer)
    lead_byte = tokenizer.piece_to_id("<0xE9>")
    (o,) = [i for i in tokenizer.encode("お") if tokenizer.id_to_piece(i) == "お"]
    pieces = feed(stream, [lead_byte, o])
    assert [text for text, _ in pieces] == ["お"]
    assert stream.dropped_bytes == 1


def test_control_and_out_of_range_tokens_are_ignored(tokenizer):
    stream = stream_for(tokenizer)
    bell = tokenizer.piece_to_id("<0x07>")
    assert feed(stream, [bell, 1, 2, tokenizer.vocab_size() + 5]) == []
    assert stream.invalid_tokens == 1


def test_word_spacing_survives_the_window_reset(tokenizer):
    text = " ".join(["hello"] * 40)
    ids = tokenizer.encode(text)
    pieces = feed(stream_for(tokenizer), ids)
    assert "".join(t for t, _ in pieces) == text


@settings(max_examples=150, deadline=None)
@given(
    text=st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Co", "Cn")), max_size=40),
    pads=st.lists(st.integers(min_value=0, max_value=2), max_size=200),
)
def test_any_text_comes_back_whole(tokenizer, text, pads):
    """Pieces concatenate to what the tokenizer decodes, never with U+FFFD, however padded."""
    ids = tokenizer.encode(text)
    tokens: list[int] = []
    for i, token in enumerate(ids):
        tokens.extend([TEXT_PADDING_ID] * (pads[i] if i < len(pads) else 0))
        tokens.append(token)
    stream = stream_for(tokenizer)
    out = "".join(t for t, _ in feed(stream, tokens))
    expected = tokenizer.decode(ids)
    assert "\ufffd" not in out
    assert out == expected
    assert stream.dropped_bytes == 0
