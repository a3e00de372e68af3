"""G.722 (ITU-T, 64 kbit/s sub-band ADPCM, 16 kHz audio) through the ``G722`` package.

The codec itself is libg722 (C, bit-exact with the ITU reference) in its Python binding;
this module only adapts it to the project's int16 numpy arrays. Audio is sampled at
16 kHz, but RTP timestamps and SDP say 8000 (RFC 3551 §4.5.2 keeps the clock rate of the
first G.722 RTP profile): a 20 ms packet is 160 bytes, 320 samples, and advances the RTP
timestamp by 160. Encoder and decoder are ADPCM: each keeps state from packet to packet,
so one instance per direction per call, fed in order.
"""

from __future__ import annotations

import typing as tp

import numpy as np

SAMPLE_RATE = 16000
RTP_CLOCK_RATE = 8000
BIT_RATE = 64000


def available() -> bool:
    """Whether the G722 package (an optional dependency of the gateway) is installed."""
    try:
        import G722  # noqa: F401
    except ImportError:
        return False
    return True


def _codec() -> tp.Any:  # the binding has no type information
    try:
        import G722
    except ImportError:
        raise RuntimeError("G.722 needs the G722 package (pip install G722)") from None
    return G722.G722(SAMPLE_RATE, BIT_RATE)


class G722Encoder:
    """16 kHz PCM16 → G.722 payload bytes (one byte per two samples)."""

    def __init__(self) -> None:
        self._state = _codec()

    def encode(self, pcm: np.ndarray) -> bytes:
        if pcm.dtype != np.int16 or pcm.ndim != 1:
            raise ValueError(f"G.722 encodes mono int16 PCM, got {pcm.dtype} {pcm.shape}")
        if len(pcm) % 2:
            raise ValueError(f"G.722 encodes pairs of samples, got {len(pcm)}")
        encoded: bytes = self._state.encode(np.ascontiguousarray(pcm))
        return encoded


class G722Decoder:
    """G.722 payload bytes → 16 kHz PCM16 (two samples per byte)."""

    def __init__(self) -> None:
        self._state = _codec()

    def decode(self, payload: bytes) -> np.ndarray:
        return np.asarray(self._state.decode(payload), dtype=np.int16)
