"""Opus for the WebRTC ingress: a packet's duration from its TOC byte, and a mono decoder.

The inbound path decodes Opus itself, one packet per playout tick (aiortc's receiver
would otherwise decode in its own thread behind its own jitter buffer; see webrtc_media).
"""

from __future__ import annotations

import av
import numpy as np

OPUS_RATE = 48000

# Frame duration in units of 2.5 ms by TOC configuration number (RFC 6716 §3.1, table 2).
_FRAME_UNITS = (
    [4, 8, 16, 24] * 3  # 0..11 SILK-only: 10, 20, 40, 60 ms
    + [4, 8] * 2  # 12..15 hybrid: 10, 20 ms
    + [1, 2, 4, 8] * 4  # 16..31 CELT-only: 2.5, 5, 10, 20 ms
)
MAX_PACKET_MS = 120  # RFC 6716 §3.2.5: a packet holds at most 120 ms


class OpusPacketError(ValueError):
    """The payload is not a well-formed Opus packet."""


def opus_packet_samples(payload: bytes, rate: int = OPUS_RATE) -> int:
    """Samples (at ``rate``) one Opus packet decodes to, from its TOC byte and frame count."""
    if not payload:
        raise OpusPacketError("empty Opus packet")
    toc = payload[0]
    units = _FRAME_UNITS[toc >> 3]
    code = toc & 0x3
    if code == 0:
        frames = 1
    elif code in (1, 2):
        frames = 2
    else:
        if len(payload) < 2:
            raise OpusPacketError("code 3 Opus packet without its frame count byte")
        frames = payload[1] & 0x3F
        if frames == 0:
            raise OpusPacketError("code 3 Opus packet with zero frames")
    if frames * units * 2.5 > MAX_PACKET_MS:
        raise OpusPacketError(f"Opus packet of {frames * units * 2.5} ms exceeds {MAX_PACKET_MS} ms")
    return frames * units * rate // 400


class OpusMonoDecoder:
    """Decodes Opus packets to 48 kHz mono int16 (libopus through PyAV)."""

    def __init__(self) -> None:
        self._codec = av.CodecContext.create("libopus", "r")
        self._codec.format = "s16"
        self._codec.layout = "mono"
        self._codec.sample_rate = OPUS_RATE

    def decode(self, payload: bytes) -> np.ndarray:
        """One packet's audio; raises OpusPacketError when libopus rejects it."""
        try:
            frames = self._codec.decode(av.Packet(payload))
        except av.FFmpegError as exc:
            raise OpusPacketError(f"Opus decode failed: {exc}") from None
        if not frames:
            return np.zeros(0, dtype=np.int16)
        chunks = [frame.to_ndarray().reshape(-1) for frame in frames]
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
