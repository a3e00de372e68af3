"""Per-call audio bridge: telephone packets at 8 kHz ↔ model frames at 24 kHz.

Inbound, decoded caller audio (one packet's worth at a time) is upsampled and cut into
80 ms model frames of 1920 samples. Outbound, a model frame is downsampled and cut into
packet-sized pieces for the pacer. One resampler per direction per call keeps its
filter state across frames, so there are no clicks at frame joints.
"""

from __future__ import annotations

import numpy as np

from service.gateway.resample import RATIO, make_pair

MODEL_FRAME_SAMPLES = 1920  # 80 ms at 24 kHz
MODEL_FRAME_BYTES = MODEL_FRAME_SAMPLES * 2
TELEPHONE_FRAME_SAMPLES = MODEL_FRAME_SAMPLES // RATIO  # 640: 80 ms at 8 kHz


def pcm16_to_float(pcm: np.ndarray) -> np.ndarray:
    return pcm.astype(np.float32) * (1.0 / 32768.0)


def float_to_pcm16(samples: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(samples * 32768.0), -32768, 32767).astype(np.int16)


class MediaBridge:
    """Resampling and framing for one call, both directions."""

    def __init__(self, resampler: str = "fir", packet_samples: int = 160) -> None:
        self._up, self._down = make_pair(resampler)
        self.resampler = self._up.name
        self.packet_samples = packet_samples
        self._caller_pending: list[np.ndarray] = []
        self._caller_pending_len = 0
        self._model_pending = np.zeros(0, dtype=np.int16)
        self.held_back_ms = self._up.held_back_ms + self._down.held_back_ms

    def caller_audio(self, pcm8k: np.ndarray) -> bytes | None:
        """Add caller audio (int16, 8 kHz); returns a 3840-byte model frame once 80 ms are in.

        Upsampling waits for the whole 80 ms so the resampler runs once per model frame.
        """
        self._caller_pending.append(pcm8k)
        self._caller_pending_len += len(pcm8k)
        if self._caller_pending_len < TELEPHONE_FRAME_SAMPLES:
            return None
        joined = np.concatenate(self._caller_pending)
        frame8k, rest = joined[:TELEPHONE_FRAME_SAMPLES], joined[TELEPHONE_FRAME_SAMPLES:]
        self._caller_pending = [rest] if len(rest) else []
        self._caller_pending_len = len(rest)
        return float_to_pcm16(self._up.process(pcm16_to_float(frame8k))).tobytes()

    def model_audio(self, frame: bytes) -> list[np.ndarray]:
        """One 80 ms model frame → the packets (int16, 8 kHz) it fills, in order.

        With a ptime that does not divide 80 ms (30 ms), the remainder waits for the next
        frame, so the packet cadence never breaks.
        """
        pcm24k = np.frombuffer(frame, dtype="<i2")
        pcm8k = float_to_pcm16(self._down.process(pcm16_to_float(pcm24k)))
        pending = np.concatenate((self._model_pending, pcm8k)) if len(self._model_pending) else pcm8k
        count = len(pending) // self.packet_samples
        packets = [pending[i * self.packet_samples:(i + 1) * self.packet_samples] for i in range(count)]
        self._model_pending = pending[count * self.packet_samples:]
        return packets
