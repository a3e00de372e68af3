"""The audio codecs RTP calls can use, behind one small interface.

A :class:`CodecSpec` says how a codec looks in SDP and on the wire: its name, static payload
type, RTP clock rate, the rate its audio is sampled at (G.722: 16 kHz audio on an 8000 Hz
RTP clock), and its rank for a listener that hears 24 kHz audio. :func:`encoder` and
:func:`decoder` make the per-call objects that turn int16 PCM at ``sample_rate`` into
payloads and back. G.711 is always there; G.722 needs the ``G722`` package and Opus PyAV
(both come with the gateway): :func:`available` says which can run here.
"""

from __future__ import annotations

import functools
import typing as tp
from dataclasses import dataclass

import numpy as np

from sip import g711, g722, opus


class AudioEncoder(tp.Protocol):
    def encode(self, pcm: np.ndarray) -> bytes: ...


class AudioDecoder(tp.Protocol):
    def decode(self, payload: bytes) -> np.ndarray: ...


@dataclass(frozen=True)
class CodecSpec:
    """One codec as SDP and RTP see it. ``stateful``: its encoder carries state from packet
    to packet, so packets must be encoded in the order they are sent (ADPCM, Opus)."""

    name: str
    clock_rate: int
    sample_rate: int
    rank: int
    static_payload_type: int | None = None
    channels: int = 1
    stateful: bool = False
    ptimes: tuple[int, ...] = (10, 20, 30, 40)

    def matches(self, encoding: str, clock_rate: int, channels: int) -> bool:
        """Whether an ``a=rtpmap`` entry names this codec (RFC 7587 wants ``opus/48000/2``;
        ``opus/48000`` is taken too, as many stacks write it)."""
        return (
            encoding.lower() == self.name.lower()
            and clock_rate == self.clock_rate
            and (channels == self.channels or (self.name == "opus" and channels == 1))
        )

    def rtpmap(self, payload_type: int) -> str:
        suffix = f"/{self.channels}" if self.channels != 1 else ""
        return f"{payload_type} {self.name}/{self.clock_rate}{suffix}"

    def samples(self, ptime_ms: float) -> int:
        """PCM samples in one packet."""
        return int(self.sample_rate * ptime_ms / 1000)

    def timestamp_step(self, ptime_ms: float) -> int:
        """How far one packet advances the RTP timestamp."""
        return int(self.clock_rate * ptime_ms / 1000)


PCMU = CodecSpec("PCMU", 8000, 8000, rank=1, static_payload_type=0)
PCMA = CodecSpec("PCMA", 8000, 8000, rank=1, static_payload_type=8)
G722 = CodecSpec("G722", g722.RTP_CLOCK_RATE, g722.SAMPLE_RATE, rank=2, static_payload_type=9, stateful=True)
OPUS = CodecSpec("opus", opus.OPUS_RATE, opus.OPUS_RATE, rank=3, channels=2, stateful=True, ptimes=(10, 20, 40))

SPECS: dict[str, CodecSpec] = {spec.name.upper(): spec for spec in (OPUS, G722, PCMU, PCMA)}
NAMES = tuple(spec.name for spec in SPECS.values())  # best first

# what the answer asks of the peer's Opus (RFC 7587 §6.1): the model hears 24 kHz audio,
# mono; we send mono; our decoder does not use in-band FEC
OPUS_FMTP = "maxplaybackrate=24000;sprop-maxcapturerate=24000;stereo=0;sprop-stereo=0;useinbandfec=0"


def spec(name: str) -> CodecSpec:
    """The codec called ``name`` (any case); ``ValueError`` names the supported ones."""
    found = SPECS.get(name.upper())
    if found is None:
        raise ValueError(f"unknown codec {name!r}: supported are {', '.join(NAMES)}")
    return found


@functools.cache
def available() -> tuple[str, ...]:
    """The codecs that can run in this process, best first."""
    usable = {"PCMU", "PCMA"}
    if g722.available():
        usable.add("G722")
    try:
        import av  # noqa: F401
    except ImportError:
        pass
    else:
        usable.add("opus")
    return tuple(name for name in NAMES if name in usable)


def fmtp(codec: CodecSpec) -> str | None:
    """The ``a=fmtp`` parameters we put beside ``codec`` in an offer or answer."""
    return OPUS_FMTP if codec is OPUS else None


def encoder(codec: CodecSpec, ptime_ms: int, fmtp_params: str | None = None) -> AudioEncoder:
    """A fresh encoder for one call; ``fmtp_params`` are the peer's for this codec."""
    if codec.name in ("PCMU", "PCMA"):
        return g711.G711Encoder(codec.name)
    if codec is G722:
        return g722.G722Encoder()
    if codec is OPUS:
        return opus.OpusEncoder(ptime_ms, opus.OpusParams.parse(fmtp_params))
    raise ValueError(f"no encoder for {codec.name}")


def decoder(codec: CodecSpec) -> AudioDecoder:
    if codec.name in ("PCMU", "PCMA"):
        return g711.G711Decoder(codec.name)
    if codec is G722:
        return g722.G722Decoder()
    if codec is OPUS:
        return opus.OpusMonoDecoder()
    raise ValueError(f"no decoder for {codec.name}")


def quiet_detector(codec: CodecSpec) -> tp.Callable[[bytes], bool] | None:
    """A test for "this payload is quiet" that needs no decoding, where the codec allows one
    (the jitter buffer adapts its delay in quiet frames); None where it does not (G.722)."""
    if codec.name in ("PCMU", "PCMA"):
        return g711.quiet_detector(codec.name)
    if codec is OPUS:
        return opus.is_quiet_packet
    return None
