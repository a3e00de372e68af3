"""The latency a call's media edge adds, frame by frame: jitter buffer, resampling both ways
and the wait for the egress pacer (the model's frame and step excluded)."""

from __future__ import annotations

import math

import numpy as np

from service.call_record import GatewayLatency
from service.gateway import metrics

WINDOW_FRAMES = 2000  # the call's recent frames the summary covers


def percentiles(values: np.ndarray, qs: tuple[float, ...]) -> list[float]:
    """``np.percentile(values, q)`` for each q (its default, linear interpolation), from one
    partial sort: np.percentile costs ten times more for a few thousand values."""
    last = len(values) - 1
    positions = [q / 100 * last for q in qs]
    below = [math.floor(p) for p in positions]
    ordered = np.partition(values, sorted({i for b in below for i in (b, min(b + 1, last))}))
    out = []
    for position, low in zip(positions, below, strict=True):
        lower, upper = float(ordered[low]), float(ordered[min(low + 1, last)])
        out.append(lower + (upper - lower) * (position - low))
    return out


class LatencyMeter:
    """Takes each frame's added latency (into the gateway's histogram too) and sums up the
    recent ones for the call's quality. The recent ones are kept in a ring, so that the
    summary (every few seconds per call, from the sampler) needs no conversion."""

    def __init__(self) -> None:
        self._ring = np.zeros(WINDOW_FRAMES)
        self._next = 0
        self._count = 0

    def frame_sent(self, jitter_delay: float, waited: float, held_back_ms: float) -> None:
        """A model frame's first packet left, ``waited`` seconds after the frame came."""
        added = jitter_delay + waited + held_back_ms / 1000
        if added < 0.0:
            added = 0.0
        metrics.GATEWAY_LATENCY.observe(added)
        position = self._next
        self._ring[position] = added
        self._next = 0 if position == WINDOW_FRAMES - 1 else position + 1
        if self._count < WINDOW_FRAMES:
            self._count += 1

    @property
    def samples(self) -> np.ndarray:
        """The recent frames' added latency in seconds (in no particular order)."""
        return self._ring[: self._count]

    def summary(self, jitter_delay: float, held_back_ms: float, cushion: float) -> GatewayLatency | None:
        """p50 and p99 over the recent frames, with the parts as they are now (None before a frame)."""
        if not self._count:
            return None
        p50, p99 = percentiles(self.samples, (50, 99))
        return GatewayLatency(
            p50=round(p50 * 1000, 2),
            p99=round(p99 * 1000, 2),
            jitter_buffer=round(jitter_delay * 1000, 2),
            resampling=round(held_back_ms, 2),
            egress_cushion=round(cushion * 1000, 2),
        )
