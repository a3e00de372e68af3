"""Opus (RFC 6716) over RTP (RFC 7587): a packet's duration from its TOC byte, a mono
decoder and encoder at 48 kHz (libopus through PyAV), and the SDP format parameters.

RTP Opus always says ``opus/48000/2`` in SDP, whatever the audio's rate and channel count;
the ``a=fmtp`` parameters (RFC 7587 §6.1) say what each side wants to *receive*. The
decoder takes mono or stereo packets (libopus downmixes); the encoder sends mono.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OPUS_RATE = 48000
FRAME_MS = (10, 20, 40, 60)  # the packet times one Opus frame can fill (2.5 and 5 ms: too small for RTP)
DEFAULT_BITRATE = 32000
QUIET_PACKET_BYTES = 3  # a DTX or comfort-noise packet: the TOC byte and at most two more

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


def is_quiet_packet(payload: bytes) -> bool:
    """A packet that carries (next to) nothing: silence to a jitter buffer that adapts in pauses."""
    return len(payload) <= QUIET_PACKET_BYTES


class OpusMonoDecoder:
    """Decodes Opus packets to 48 kHz mono int16 (libopus through PyAV)."""

    def __init__(self) -> None:
        import av

        self._av = av
        self._codec = av.CodecContext.create("libopus", "r")
        self._codec.format = "s16"
        self._codec.layout = "mono"
        self._codec.sample_rate = OPUS_RATE

    def decode(self, payload: bytes) -> np.ndarray:
        """One packet's audio; raises OpusPacketError when libopus rejects it."""
        if not payload:  # to FFmpeg an empty packet means end of stream: the decoder would stop
            raise OpusPacketError("empty Opus packet")
        try:
            frames = self._codec.decode(self._av.Packet(payload))
        except self._av.FFmpegError as exc:
            raise OpusPacketError(f"Opus decode failed: {exc}") from None
        if not frames:
            return np.zeros(0, dtype=np.int16)
        chunks = [frame.to_ndarray().reshape(-1) for frame in frames]
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


@dataclass(frozen=True)
class OpusParams:
    """What an ``a=fmtp`` line for Opus asks of the sender (RFC 7587 §6.1); defaults where absent."""

    max_playback_rate: int = OPUS_RATE
    max_average_bitrate: int | None = None
    stereo: bool = False
    cbr: bool = False
    use_inband_fec: bool = False
    use_dtx: bool = False

    @classmethod
    def parse(cls, fmtp: str | None) -> OpusParams:
        """Parses leniently: unknown keys and values out of range are ignored, never raised."""
        values: dict[str, str] = {}
        for item in (fmtp or "").replace(",", ";").split(";"):
            key, _, value = item.strip().partition("=")
            if key:
                values[key.strip().lower()] = value.strip()

        def number(key: str, low: int, high: int) -> int | None:
            text = values.get(key, "")
            return int(text) if text.isdigit() and low <= int(text) <= high else None

        def flag(key: str) -> bool:
            return values.get(key) == "1"

        return cls(
            max_playback_rate=number("maxplaybackrate", 8000, 510000) or OPUS_RATE,
            max_average_bitrate=number("maxaveragebitrate", 6000, 510000),
            stereo=flag("stereo"),
            cbr=flag("cbr"),
            use_inband_fec=flag("useinbandfec"),
            use_dtx=flag("usedtx"),
        )


# encoder bandwidth (libopus "cutoff", Hz) for the receiver's highest useful playback rate
_CUTOFFS = ((8000, 4000), (12000, 6000), (16000, 8000), (24000, 12000))


class OpusEncoder:
    """48 kHz mono int16 → one Opus packet per call, of ``ptime_ms`` (libopus through PyAV).

    ``params`` are the peer's fmtp: its ``maxaveragebitrate`` caps ``bitrate``, its
    ``maxplaybackrate`` (and ours, ``max_bandwidth_hz``) bounds the coded bandwidth,
    ``useinbandfec`` turns on in-band FEC, ``cbr`` constant bitrate.
    """

    def __init__(
        self,
        ptime_ms: int = 20,
        params: OpusParams | None = None,
        *,
        bitrate: int = DEFAULT_BITRATE,
        max_bandwidth_hz: int = 12000,
    ) -> None:
        import av

        if ptime_ms not in FRAME_MS:
            raise ValueError(f"an Opus packet holds 10, 20, 40 or 60 ms, not {ptime_ms}")
        params = params or OpusParams()
        if params.max_average_bitrate is not None:
            bitrate = min(bitrate, params.max_average_bitrate)
        cutoff = next((c for rate, c in _CUTOFFS if params.max_playback_rate <= rate), 20000)
        cutoff = min(cutoff, max_bandwidth_hz)
        self._av = av
        self.samples = OPUS_RATE * ptime_ms // 1000
        codec = av.CodecContext.create("libopus", "w")
        codec.sample_rate = OPUS_RATE
        codec.layout = "mono"
        codec.format = "s16"
        codec.bit_rate = bitrate
        codec.options = {
            "application": "voip",
            "frame_duration": str(ptime_ms),
            "cutoff": str(cutoff),
            "vbr": "off" if params.cbr else "on",
            "fec": "1" if params.use_inband_fec else "0",
            "packet_loss": "5" if params.use_inband_fec else "0",
        }
        codec.open()
        self._codec = codec
        self._pts = 0
        self.bitrate = bitrate
        self.cutoff_hz = cutoff

    def encode(self, pcm: np.ndarray) -> bytes:
        """One packet time of audio (exactly ``samples``) → one Opus packet."""
        if len(pcm) != self.samples or pcm.dtype != np.int16:
            raise ValueError(f"Opus encodes {self.samples} int16 samples per packet, got {len(pcm)} {pcm.dtype}")
        frame = self._av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm).reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = OPUS_RATE
        frame.pts = self._pts
        self._pts += self.samples
        packets = self._codec.encode(frame)
        return b"".join(bytes(p) for p in packets)
