"""Per-call audio bridge: codec audio (8, 16 or 48 kHz) ↔ model frames at 24 kHz.

Inbound, decoded caller audio (one packet's worth at a time) is resampled to 24 kHz and
cut into 80 ms model frames of 1920 samples. Outbound, a model frame is resampled to the
codec's rate and cut into packet-sized pieces for the pacer. One resampler per direction per call keeps its
filter state across frames, so there are no clicks at frame joints.
"""

from __future__ import annotations

import numpy as np

from service.gateway.media.resample import TELEPHONE_RATE, make_pair
from service.wire import FRAME_BYTES, FRAME_MS, FRAME_SAMPLES

MODEL_FRAME_SAMPLES = FRAME_SAMPLES
MODEL_FRAME_BYTES = FRAME_BYTES
MODEL_FRAME_MS = FRAME_MS


# the clip ufunc itself: np.clip's Python wrapper costs more than clipping 2000 samples
_clip = getattr(getattr(getattr(np, "_core", None), "umath", None), "clip", None) or np.clip


def to_pcm16(samples: np.ndarray) -> np.ndarray:
    """Float samples on the int16 scale → int16, saturating (clips in place)."""
    return _clip(samples, -32768.0, 32767.0, out=samples).astype(np.int16)


class MediaBridge:
    """Resampling and framing for one call, both directions.

    Samples stay on the int16 scale as float32 throughout (the filters are linear), so
    each direction costs one conversion in and one out per 80 ms frame.
    """

    def __init__(self, resampler: str = "fir", packet_samples: int = 160, rate: int = TELEPHONE_RATE) -> None:
        self._up, self._down = make_pair(resampler, rate)
        self.resampler = self._up.name
        self.rate = rate
        self.packet_samples = packet_samples
        self.frame_samples = rate * MODEL_FRAME_MS // 1000  # one model frame at the codec's rate
        # room for one frame plus what a packet size that does not divide 80 ms leaves over
        self._caller: np.ndarray = np.zeros(self.frame_samples + packet_samples, dtype=np.float32)
        self._caller_fill = 0
        self._model_pending: np.ndarray = np.zeros(0, dtype=np.int16)
        self.held_back_ms = self._up.held_back_ms + self._down.held_back_ms

    def caller_audio(self, pcm: np.ndarray) -> bytes | None:
        """Add caller audio (int16 at the codec's rate); returns a 3840-byte model frame
        once 80 ms are in.

        Resampling waits for the whole 80 ms so the resampler runs once per model frame.
        """
        fill, frame_samples = self._caller_fill, self.frame_samples
        if fill == 0 and len(pcm) == frame_samples:  # a whole frame at once
            return to_pcm16(self._up.process(pcm)).tobytes()
        end = fill + len(pcm)
        if end > len(self._caller):
            self._caller = np.concatenate((self._caller, np.zeros(end - len(self._caller), np.float32)))
        self._caller[fill:end] = pcm
        if end < frame_samples:
            self._caller_fill = end
            return None
        frame = self._up.process(self._caller[:frame_samples])
        rest = end - frame_samples
        if rest:
            self._caller[:rest] = self._caller[frame_samples:end]
        self._caller_fill = rest
        return to_pcm16(frame).tobytes()

    def model_audio(self, frame: bytes) -> list[np.ndarray]:
        """One 80 ms model frame → the packets (int16, codec rate) it fills, in order.

        With a ptime that does not divide 80 ms (30 ms), the remainder waits for the next
        frame, so the packet cadence never breaks.
        """
        pcm = self.model_audio_pcm(frame)
        size = self.packet_samples
        return [pcm[i : i + size] for i in range(0, len(pcm), size)]

    def model_audio_pcm(self, frame: bytes) -> np.ndarray:
        """Like :meth:`model_audio`, as one array of the packets' samples back to back (a
        whole number of packets; the remainder waits for the next frame)."""
        pcm = to_pcm16(self._down.process(np.frombuffer(frame, dtype="<i2")))
        pending = np.concatenate((self._model_pending, pcm)) if len(self._model_pending) else pcm
        whole = len(pending) - len(pending) % self.packet_samples
        self._model_pending = pending[whole:]
        return pending[:whole]
