"""Stereo PCM16 into a file: WAV, or Opus in Ogg (PyAV's libopus; about 1/16 the size)."""

from __future__ import annotations

import typing as tp
import wave
from pathlib import Path

import numpy as np

OPUS_BITRATE = 32000  # stereo speech: both voices clear, ~240 kB a minute
OPUS_FRAME_SAMPLES = {8000: 160, 12000: 240, 16000: 320, 24000: 480, 48000: 960}  # 20 ms
EXTENSIONS = {"wav": "wav", "ogg": "ogg"}
CONTENT_TYPES = {"wav": "audio/wav", "ogg": "audio/ogg"}


class Encoder(tp.Protocol):
    def write(self, frames: np.ndarray) -> None:
        """Stereo frames (n, 2) of int16."""

    def close(self) -> None: ...

    def abort(self) -> None:
        """Stop without finishing the file (it is deleted by the caller)."""


class WavEncoder:
    """A stereo PCM16 WAV file, written as it goes (the header is completed on close)."""

    def __init__(self, path: Path, rate: int) -> None:
        self._wav = wave.open(str(path), "wb")  # noqa: SIM115 - closed in close()/abort()
        self._wav.setnchannels(2)
        self._wav.setsampwidth(2)
        self._wav.setframerate(rate)

    def write(self, frames: np.ndarray) -> None:
        if len(frames):
            self._wav.writeframesraw(np.ascontiguousarray(frames, dtype="<i2").tobytes())

    def close(self) -> None:
        self._wav.close()

    def abort(self) -> None:
        self._wav.close()


class OggOpusEncoder:
    """Opus in Ogg, stereo, through PyAV (libopus). Frames are encoded 20 ms at a time."""

    def __init__(self, path: Path, rate: int, bitrate: int = OPUS_BITRATE) -> None:
        import av

        if rate not in OPUS_FRAME_SAMPLES:
            raise ValueError(f"Opus takes 8, 12, 16, 24 or 48 kHz, not {rate}")
        self.rate = rate
        self._frame = OPUS_FRAME_SAMPLES[rate]
        self._container = av.open(str(path), "w", format="ogg")
        self._stream = self._container.add_stream("libopus", rate=rate, layout="stereo")
        self._stream.bit_rate = bitrate
        self._pending: np.ndarray = np.zeros((0, 2), dtype=np.int16)
        self._pts = 0

    def write(self, frames: np.ndarray) -> None:
        pending = np.concatenate([self._pending, frames]) if len(self._pending) else frames
        whole = len(pending) - len(pending) % self._frame
        if whole:
            self._encode(pending[:whole])
        self._pending = pending[whole:]

    def _encode(self, frames: np.ndarray) -> None:
        import av

        for first in range(0, len(frames), self._frame):
            block = np.ascontiguousarray(frames[first : first + self._frame], dtype=np.int16).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(block, format="s16", layout="stereo")
            frame.sample_rate = self.rate
            frame.pts = self._pts
            self._pts += self._frame
            for packet in self._stream.encode(frame):
                self._container.mux(packet)

    def close(self) -> None:
        if len(self._pending):  # a short last frame: libopus pads it, the Ogg granule keeps the true end
            self._encode(self._pending)
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()

    def abort(self) -> None:
        self._container.close()


def open_encoder(fmt: str, path: Path, rate: int) -> Encoder:
    if fmt == "wav":
        return WavEncoder(path, rate)
    if fmt == "ogg":
        return OggOpusEncoder(path, rate)
    raise ValueError(f"unknown recording format {fmt!r} (wav or ogg)")
