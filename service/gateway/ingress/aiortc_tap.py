"""Taking RTP packets from an aiortc receiver before its jitter buffer.

aiortc's audio receiver keeps packets in a jitter buffer of 16 slots that releases a frame
only once the four after it are there (80 ms of delay on a clean line) and has no clock:
after a lost packet it releases nothing until 16 more have arrived (a stall of about
300 ms), then throws away the packets queued before the gap undecoded, and from then on
runs about 300 ms behind. ops/bench/webrtc_jitter.py measures it on this path: at 5 %
loss a quarter of the audio never comes out and the delay settles near 280 ms. So the
WebRTC ingress takes each packet straight from the receiver (after SRTP, RTCP statistics
and depayloading, which stay aiortc's) and plays it out with the project's own jitter
buffer and a playout clock that conceals a missing packet on time instead of waiting.

The hook replaces the receiver's private jitter buffer object with a tap that has the
same ``add(packet) -> (pli_flag, frame)`` interface. That is an aiortc internal (kept
through the 1.x releases this project allows, 1.9 to 1.16 at least); ``tap_receiver``
fails loudly if it is ever missing, and tests/test_webrtc_media.py checks it.
"""

from __future__ import annotations

import typing as tp

from aiortc import RTCRtpReceiver
from aiortc.rtp import RtpPacket

_JITTER_BUFFER_ATTRIBUTE = "_RTCRtpReceiver__jitter_buffer"


class ReceiverTap:
    """Stands in for a receiver's jitter buffer: every packet goes to ``on_packet(packet, arrival)``.

    Nothing reaches aiortc's decoder unless ``passthrough`` (the receiver's own jitter
    buffer, kept for measuring it side by side) is given.
    """

    def __init__(
        self,
        on_packet: tp.Callable[[RtpPacket, float], None],
        clock: tp.Callable[[], float],
        passthrough: tp.Any = None,
    ) -> None:
        self._on_packet = on_packet
        self._clock = clock
        self.passthrough = passthrough
        self.packets = 0

    def add(self, packet: RtpPacket) -> tuple[bool, tp.Any]:
        self.packets += 1
        self._on_packet(packet, self._clock())
        if self.passthrough is not None:
            passed: tuple[bool, tp.Any] = self.passthrough.add(packet)
            return passed
        return False, None


def tap_receiver(
    receiver: RTCRtpReceiver,
    on_packet: tp.Callable[[RtpPacket, float], None],
    clock: tp.Callable[[], float],
    *,
    keep_stock: bool = False,
) -> ReceiverTap:
    """Route ``receiver``'s packets to ``on_packet`` instead of aiortc's jitter buffer and decoder."""
    if not hasattr(receiver, _JITTER_BUFFER_ATTRIBUTE):
        raise RuntimeError(
            "this aiortc version has no RTCRtpReceiver jitter buffer to replace; "
            "the WebRTC ingress needs aiortc 1.x with that internal"
        )
    stock = getattr(receiver, _JITTER_BUFFER_ATTRIBUTE)
    tap = ReceiverTap(on_packet, clock, passthrough=stock if keep_stock else None)
    setattr(receiver, _JITTER_BUFFER_ATTRIBUTE, tap)
    return tap
