"""Announcements played to callers (the recording consent): a WAV file as model frames.

The file (PCM 8/16/32-bit, any rate, mono or stereo) is read once at start-up and cut
into the 80 ms frames at 24 kHz that the pipeline plays in place of the model's
(``MediaPipeline.announce``). A file that cannot be used stops the start with a message
naming it.
"""

from __future__ import annotations

import typing as tp
import wave
from pathlib import Path

import numpy as np

from service.wire import FRAME_SAMPLES, SAMPLE_RATE

MAX_SECONDS = 60.0


def load_announcement(path: str | Path) -> list[bytes]:
    """The file's audio as 80 ms PCM16 frames at 24 kHz (the last one padded with silence).
    Raises ValueError saying what is wrong with it."""
    try:
        with wave.open(str(path), "rb") as wav:
            channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
            if wav.getnframes() > MAX_SECONDS * rate:
                raise ValueError(f"longer than {MAX_SECONDS:.0f} s")
            raw = wav.readframes(wav.getnframes())
    except (OSError, EOFError, wave.Error) as exc:
        raise ValueError(f"not a readable WAV file ({exc})") from None
    kinds: dict[int, tuple[tp.Any, float, float]] = {
        1: (np.uint8, 128.0, 128.0),
        2: ("<i2", 0.0, 32768.0),
        4: ("<i4", 0.0, 2.0**31),
    }
    if width not in kinds:
        raise ValueError(f"{8 * width}-bit samples (use 8, 16 or 32-bit PCM)")
    dtype, offset, scale = kinds[width]
    samples = (np.frombuffer(raw, dtype=dtype).astype(np.float32) - offset) / scale
    samples = samples[: len(samples) - len(samples) % channels].reshape(-1, channels).mean(axis=1)
    if not len(samples):
        raise ValueError("it holds no audio")
    if rate != SAMPLE_RATE:
        import soxr

        samples = soxr.resample(samples, rate, SAMPLE_RATE, quality="HQ")
    pcm = np.clip(np.rint(samples * 32767), -32768, 32767).astype("<i2")
    pcm = np.concatenate([pcm, np.zeros(-len(pcm) % FRAME_SAMPLES, dtype="<i2")])
    return [pcm[i : i + FRAME_SAMPLES].tobytes() for i in range(0, len(pcm), FRAME_SAMPLES)]
