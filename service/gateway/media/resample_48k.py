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

from service.gateway.media.resample import FirDownsampler, FirUpsampler, lowpass_taps
from service.wire import SAMPLE_RATE

WEBRTC_RATE = 48000
MODEL_RATE = SAMPLE_RATE  # the model's rate (service.wire)
RATIO = WEBRTC_RATE // MODEL_RATE
TAPS = 95
CUTOFF_HZ = 11000.0


def wideband_taps() -> np.ndarray:
    return lowpass_taps(TAPS, CUTOFF_HZ, WEBRTC_RATE)


def Decimator48to24() -> FirDownsampler:  # noqa: N802 - a constructor by its role
    """48 → 24 kHz: the wideband anti-aliasing low-pass, keeping every second sample."""
    return FirDownsampler(wideband_taps(), ratio=RATIO, rate=WEBRTC_RATE)


def Interpolator24to48() -> FirUpsampler:  # noqa: N802
    """24 → 48 kHz: zero-stuffing by 2 and the wideband low-pass (2 polyphase branches)."""
    return FirUpsampler(wideband_taps(), ratio=RATIO, rate=WEBRTC_RATE)
