"""The latency a call's media edge adds, frame by frame: jitter buffer, resampling both ways
and the wait for the egress pacer (the model's frame and step excluded)."""

from __future__ import annotations

import collections

import numpy as np

from service.call_record import GatewayLatency
from service.gateway import metrics

WINDOW_FRAMES = 2000  # the call's recent frames the summary covers


class LatencyMeter:
    """Takes each frame's added latency (into the gateway's histogram too) and sums up the
    recent ones for the call's quality."""

    def __init__(self) -> None:
        self.samples: collections.deque[float] = collections.deque(maxlen=WINDOW_FRAMES)

    def frame_sent(self, jitter_delay: float, waited: float, held_back_ms: float) -> None:
        """A model frame's first packet left, ``waited`` seconds after the frame came."""
        added = max(0.0, jitter_delay + waited + held_back_ms / 1000)
        metrics.GATEWAY_LATENCY.observe(added)
        self.samples.append(added)

    def summary(self, jitter_delay: float, held_back_ms: float, cushion: float) -> GatewayLatency | None:
        """p50 and p99 over the recent frames, with the parts as they are now (None before a frame)."""
        if not self.samples:
            return None
        values = np.asarray(self.samples) * 1000
        return GatewayLatency(p50=round(float(np.percentile(values, 50)), 2),
                              p99=round(float(np.percentile(values, 99)), 2),
                              jitter_buffer=round(jitter_delay * 1000, 2), resampling=round(held_back_ms, 2),
                              egress_cushion=round(cushion * 1000, 2))
