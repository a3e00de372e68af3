"""G.711 μ-law (PCMU, payload type 0) and A-law (PCMA, payload type 8) for 8 kHz PCM16.

Encoding and decoding go through ``audioop`` (the stdlib module on Python 3.11/3.12, the
``audioop-lts`` package with the same import name on 3.13+), which runs in C. PCM is
native-endian int16, as numpy arrays or bytes.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

PcmLike = np.ndarray | bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class G711Codec:
    """A G.711 variant: its SDP name, static payload type and the byte that encodes silence."""

    name: str
    payload_type: int
    silence_byte: int
    clock_rate: int = 8000


PCMU = G711Codec("PCMU", 0, 0xFF)
PCMA = G711Codec("PCMA", 8, 0xD5)
CODECS: dict[str, G711Codec] = {PCMU.name: PCMU, PCMA.name: PCMA}
CODECS_BY_PAYLOAD_TYPE: dict[int, G711Codec] = {PCMU.payload_type: PCMU, PCMA.payload_type: PCMA}

_ENCODE: dict[str, Callable[[bytes | bytearray | memoryview, int], bytes]] = {
    "PCMU": audioop.lin2ulaw,
    "PCMA": audioop.lin2alaw,
}
_DECODE: dict[str, Callable[[bytes, int], bytes]] = {"PCMU": audioop.ulaw2lin, "PCMA": audioop.alaw2lin}


def codec(name: str) -> G711Codec:
    """The codec named ``name`` ("PCMU"/"PCMA", case-insensitive); ``ValueError`` otherwise."""
    found = CODECS.get(name.upper())
    if found is None:
        raise ValueError(f"unknown G.711 codec {name!r}: expected PCMU or PCMA")
    return found


def codec_for_payload_type(payload_type: int) -> G711Codec:
    found = CODECS_BY_PAYLOAD_TYPE.get(payload_type)
    if found is None:
        raise ValueError(f"payload type {payload_type} is not a static G.711 type (0 PCMU, 8 PCMA)")
    return found


def _pcm_buffer(pcm: PcmLike) -> bytes | bytearray | memoryview:
    if isinstance(pcm, np.ndarray):
        if pcm.dtype != np.int16:
            raise TypeError(f"PCM must be int16, got {pcm.dtype}")
        if pcm.ndim != 1:
            raise ValueError(f"PCM must be mono (1-D), got shape {pcm.shape}")
        return np.ascontiguousarray(pcm).data
    if len(pcm) % 2:
        raise ValueError(f"PCM16 bytes must have an even length, got {len(pcm)}")
    return pcm


class G711Encoder:
    """PCM16 → G.711 payload bytes (one byte per sample)."""

    __slots__ = ("codec", "_encode")

    def __init__(self, name: str = "PCMU") -> None:
        self.codec = codec(name)
        self._encode = _ENCODE[self.codec.name]

    def encode(self, pcm: PcmLike) -> bytes:
        return self._encode(_pcm_buffer(pcm), 2)


class G711Decoder:
    """G.711 payload bytes → PCM16 (numpy int16 array, or bytes with :meth:`decode_bytes`)."""

    __slots__ = ("codec", "_decode")

    def __init__(self, name: str = "PCMU") -> None:
        self.codec = codec(name)
        self._decode = _DECODE[self.codec.name]

    def decode(self, payload: bytes) -> np.ndarray:
        """A read-only int16 array of ``len(payload)`` samples."""
        return np.frombuffer(self._decode(payload, 2), dtype=np.int16)

    def decode_bytes(self, payload: bytes) -> bytes:
        return self._decode(payload, 2)


def encode(name: str, pcm: PcmLike) -> bytes:
    return G711Encoder(name).encode(pcm)


def decode(name: str, payload: bytes) -> np.ndarray:
    return G711Decoder(name).decode(payload)


def silence(name: str, samples: int) -> bytes:
    """``samples`` of encoded digital silence."""
    return bytes((codec(name).silence_byte,)) * samples


def quiet_detector(name: str, threshold: int = 64) -> Callable[[bytes], bool]:
    """A cheap test for "this payload is quiet": every sample's magnitude below ``threshold``.

    Suitable as the jitter buffer's ``is_silent``: it runs on the encoded bytes (no decode)
    through one ``bytes.translate`` call. The default threshold, 64 of 32768, is about -54 dBov.
    """
    decode_one = _DECODE[codec(name).name]
    quiet = bytes(
        code
        for code in range(256)
        if abs(int.from_bytes(decode_one(bytes((code,)), 2), sys.byteorder, signed=True)) < threshold
    )

    def is_quiet(payload: bytes) -> bool:
        return not payload.translate(None, quiet)

    return is_quiet
