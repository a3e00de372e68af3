"""The VAD segmenter on real Japanese speech (espeak-ng) at the rates the gateway feeds it."""

from __future__ import annotations

import numpy as np
import pytest

from service.asr.segmenter import SegmenterConfig, UtteranceSegmenter, to_float
from service.asr.vad import SAMPLE_RATE, SileroVad, model_path
from sip import g711
from tests.support.speech import chunks, espeak, sentences_with_silences

CALL_CLOCK_OFFSET = 2.5  # the caller's audio starts 2.5 s after answer on the call clock


def segment(
    audio: np.ndarray, rate: int, ms: int, config: SegmenterConfig | None = None, as_bytes: bool = True
) -> tuple[UtteranceSegmenter, list]:
    segmenter = UtteranceSegmenter(rate, config)
    found = []
    for t, chunk in chunks(audio, rate, ms):
        pcm = (np.clip(chunk, -1, 1) * 32767).astype("<i2")
        found += segmenter.feed(pcm.tobytes() if as_bytes else chunk, CALL_CLOCK_OFFSET + t)
    found += segmenter.flush()
    return segmenter, found


def g711_round_trip(audio: np.ndarray) -> np.ndarray:
    """What the gateway hears from a G.711 caller: μ-law encoded and decoded."""
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    return np.asarray(g711.decode("PCMU", g711.encode("PCMU", pcm))).astype(np.float32) / 32768.0


@pytest.mark.system  # espeak-ng runs as a process
@pytest.mark.parametrize(
    ("rate", "ms", "codec"),
    [(8000, 20, "PCMU"), (24000, 80, None), (16000, 20, None), (48000, 20, None)],
    ids=["8k-20ms-g711", "24k-80ms-model-rate", "16k-20ms-g722-rate", "48k-20ms-opus-rate"],
)
def test_three_sentences_make_three_utterances_on_the_call_clock(rate, ms, codec):
    speech = sentences_with_silences(rate)
    audio = g711_round_trip(speech.audio) if codec == "PCMU" else speech.audio
    segmenter, found = segment(audio, rate, ms)
    assert len(found) == 3, [(u.start, u.end) for u in found]
    for utterance, (start, end) in zip(found, speech.spans, strict=True):
        assert abs(utterance.start - (CALL_CLOCK_OFFSET + start)) <= 0.3, (utterance.start, start)
        assert abs(utterance.end - (CALL_CLOCK_OFFSET + end)) <= 0.3, (utterance.end, end)
        pad = segmenter.config.pad_ms / 1000
        assert utterance.audio_start == pytest.approx(utterance.start - pad, abs=1e-6)
        assert utterance.audio_seconds == pytest.approx(utterance.end - utterance.start + 2 * pad, abs=0.002)
        assert not utterance.forced
    assert segmenter.dropped_short == 0


@pytest.mark.system
def test_utterance_audio_is_the_callers_speech_at_16k():
    speech = sentences_with_silences(16000, lead=1.0)
    _, found = segment(speech.audio, 16000, 20)
    first = found[0]
    offset = round((first.audio_start - CALL_CLOCK_OFFSET) * SAMPLE_RATE)
    got = np.frombuffer(first.pcm, dtype="<i2").astype(np.float32) / 32768.0
    want = speech.audio[offset : offset + len(got)]
    assert np.max(np.abs(got - want)) < 4 / 32768  # the same samples, to two PCM16 roundings


@pytest.mark.system
def test_a_long_stretch_of_speech_is_cut_at_its_pauses_within_the_limit():
    rate = 16000
    text = "。".join(["おでんわ ありがとう ございます", "きょうは いい てんき ですね"] * 3)
    voice = espeak(text, rate)
    audio = np.concatenate([np.zeros(rate // 2, np.float32), voice, np.zeros(rate, np.float32)])
    config = SegmenterConfig(max_utterance_s=3.0, min_silence_ms=2000, pad_ms=100)
    _, found = segment(audio, rate, 20, config)
    assert len(found) >= 3
    for utterance in found:
        assert utterance.end - utterance.start <= 3.0 + 1e-6
    # consecutive pieces follow each other: nothing is lost between them
    for before, after in zip(found, found[1:], strict=False):
        assert after.start >= before.end - 1e-6
        assert after.start - before.end < 0.6


def test_silence_and_noise_make_no_utterance():
    rate = 8000
    rng = np.random.default_rng(1)
    audio = np.concatenate([np.zeros(rate * 2, np.float32), rng.normal(0, 0.003, rate * 3).astype(np.float32)])
    segmenter, found = segment(audio, rate, 20)
    assert found == []
    assert segmenter._audio.end - segmenter._audio.start < rate  # idle: only the padding is kept


def test_a_gap_in_the_times_is_filled_and_the_clock_kept():
    segmenter = UtteranceSegmenter(16000)
    silence = np.zeros(320, np.int16)
    segmenter.feed(silence, 1.0)
    segmenter.feed(silence, 1.02)
    segmenter.feed(silence, 1.54)  # 0.5 s of audio never came
    assert segmenter.gaps_filled == 1
    assert segmenter._in_samples == 320 * 3 + 8000
    segmenter.feed(silence, 60.0)  # too far: the clock restarts there
    assert segmenter.gaps_filled == 2 and segmenter._t0 == 60.0


def test_bad_input_is_refused_clearly():
    with pytest.raises(ValueError, match="even"):
        to_float(b"\x00\x01\x02")
    with pytest.raises(ValueError, match="mono"):
        to_float(np.zeros((2, 10), np.float32))
    with pytest.raises(ValueError, match="PCM16 or float"):
        to_float(np.zeros(10, np.int32))
    with pytest.raises(ValueError, match="rate"):
        UtteranceSegmenter(4000)
    with pytest.raises(ValueError, match="pad_ms"):
        SegmenterConfig(pad_ms=600, min_silence_ms=400)
    with pytest.raises(ValueError, match="max_utterance_s"):
        SegmenterConfig(max_utterance_s=40)


def test_the_vad_weights_come_from_the_silero_vad_package():
    path = model_path()
    assert path.name == "silero_vad.onnx" and "silero_vad" in path.parts
    stream = SileroVad.shared().stream()
    assert len(stream.process(np.zeros(512 * 3 + 100, np.float32))) == 3
    assert len(stream.process(np.zeros(412, np.float32))) == 1
