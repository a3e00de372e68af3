"""Japanese speech from espeak-ng for the caller-transcript tests: sentences, silences, truth."""

from __future__ import annotations

import io
import shutil
import subprocess
import wave
from dataclasses import dataclass

import numpy as np

SENTENCES = (
    "おでんわ ありがとう ございます。",
    "きょうは いい てんき ですね。",
    "あしたの ごぜんちゅうに とどきます。",
)
LOUD = 0.01  # |x| above this is speech when finding where espeak's sentence starts and ends


def espeak(text: str, rate: int) -> np.ndarray:
    """``espeak-ng -v ja`` speaking ``text``, as float32 at ``rate``."""
    import soxr

    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed: run the tests through `make test`")
    out = subprocess.run(["espeak-ng", "-v", "ja", "--stdout", text], capture_output=True, check=True).stdout
    with wave.open(io.BytesIO(out)) as w:
        native = w.getframerate()
        samples = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
    return soxr.resample(samples, native, rate).astype(np.float32)


@dataclass
class Speech:
    """A caller's audio and where its sentences really are (seconds from its first sample)."""

    audio: np.ndarray
    rate: int
    spans: list[tuple[float, float]]


def sentences_with_silences(
    rate: int, sentences: tuple[str, ...] = SENTENCES, *, lead: float = 0.5, gap: float = 1.0, tail: float = 1.0
) -> Speech:
    """The sentences separated by ``gap`` seconds of silence (espeak's own trailing quiet is
    cut, so the gaps are exactly ``gap``)."""
    parts = [np.zeros(round(lead * rate), dtype=np.float32)]
    spans = []
    position = len(parts[0])
    for i, text in enumerate(sentences):
        voice = espeak(text, rate)
        loud = np.flatnonzero(np.abs(voice) > LOUD)
        voice = voice[loud[0] : loud[-1] + 1]
        spans.append((position / rate, (position + len(voice)) / rate))
        parts.append(voice)
        position += len(voice)
        silence = round((gap if i < len(sentences) - 1 else tail) * rate)
        parts.append(np.zeros(silence, dtype=np.float32))
        position += silence
    return Speech(np.concatenate(parts), rate, spans)


def chunks(audio: np.ndarray, rate: int, ms: int) -> list[tuple[float, np.ndarray]]:
    """(time of first sample, samples) for consecutive ``ms`` chunks (the last one whole)."""
    size = rate * ms // 1000
    padded = np.concatenate([audio, np.zeros(-len(audio) % size, dtype=np.float32)])
    return [(i / rate, padded[i : i + size]) for i in range(0, len(padded), size)]
