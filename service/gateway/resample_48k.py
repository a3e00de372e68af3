"""Streaming 48 kHz ↔ 24 kHz resampling for WebRTC audio (Opus runs at 48 kHz, the model at 24).

The ratio is exactly 2, so each direction is one short linear-phase FIR (a Kaiser-windowed
sinc: flat to 10 kHz, ≥ 60 dB down from 12 kHz, the model's Nyquist frequency): the
decimator filters and keeps every second sample, the interpolator zero-stuffs and filters
as two polyphase branches, each a matrix product. 95 taps at 48 kHz hold back 0.98 ms each way, where soxr's HQ
holds back several milliseconds. Each instance keeps its filter state between chunks (one
per call per direction); input and output are float32 mono arrays.
"""

from __future__ import annotations

import numpy as np

from service.gateway.resample import lowpass_taps

WEBRTC_RATE = 48000
MODEL_RATE = 24000
RATIO = WEBRTC_RATE // MODEL_RATE
TAPS = 95
CUTOFF_HZ = 11000.0


def wideband_taps() -> np.ndarray:
    return lowpass_taps(TAPS, CUTOFF_HZ, WEBRTC_RATE)


def sliding_windows(samples: np.ndarray, width: int, step: int = 1) -> np.ndarray:
    """Every ``step``-th run of ``width`` consecutive samples as the rows of one contiguous
    matrix, so that a FIR filter is a single BLAS matrix product (np.convolve is a plain loop)."""
    count = max(0, (len(samples) - width) // step + 1)
    view = np.lib.stride_tricks.as_strided(samples, (count, width), (step * samples.strides[0], samples.strides[0]),
                                           writeable=False)
    return np.ascontiguousarray(view)


class Decimator48to24:
    """48 → 24 kHz: the anti-aliasing low-pass, evaluated at every second sample only."""

    name = f"fir{TAPS}"

    def __init__(self) -> None:
        taps = wideband_taps()
        self._taps = np.ascontiguousarray(taps[::-1])  # reversed to meet oldest-first windows
        self._history = np.zeros(len(taps) - 1, dtype=np.float32)
        self._phase = 0  # input samples to skip before the next output sample
        self.held_back_ms = (len(taps) - 1) / 2 / WEBRTC_RATE * 1000

    def process(self, samples: np.ndarray) -> np.ndarray:
        if len(samples) == 0:
            return np.zeros(0, dtype=np.float32)
        joined = np.concatenate((self._history, samples.astype(np.float32, copy=False)))
        out = sliding_windows(joined[self._phase:], len(self._taps), RATIO) @ self._taps
        self._phase = (self._phase - len(samples)) % RATIO
        self._history = joined[len(samples):]
        return out


class Interpolator24to48:
    """24 → 48 kHz: zero-stuffing by 2 and the low-pass, computed as 2 polyphase branches."""

    name = f"fir{TAPS}"

    def __init__(self) -> None:
        taps = wideband_taps()
        padded = np.zeros(-(-len(taps) // RATIO) * RATIO, dtype=np.float32)
        padded[: len(taps)] = taps * RATIO  # zero-stuffing loses a factor RATIO of energy
        # column p holds branch p (taps p, p+2, ...) reversed, to meet oldest-first windows
        self._branches = np.ascontiguousarray(padded.reshape(-1, RATIO)[::-1])
        self._history = np.zeros(len(self._branches) - 1, dtype=np.float32)
        self.held_back_ms = (len(taps) - 1) / 2 / WEBRTC_RATE * 1000

    def process(self, samples: np.ndarray) -> np.ndarray:
        if len(samples) == 0:
            return np.zeros(0, dtype=np.float32)
        joined = np.concatenate((self._history, samples.astype(np.float32, copy=False)))
        out = sliding_windows(joined, len(self._branches)) @ self._branches  # [input sample, phase]
        self._history = joined[len(samples):]
        return out.reshape(-1)
