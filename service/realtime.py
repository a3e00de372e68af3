"""Process settings for real-time audio: keep the garbage collector out of the media path."""

from __future__ import annotations

import gc


def quiet_gc() -> None:
    """For an event loop that paces packets: move what is alive now (modules, settings:
    never garbage) out of every future collection, and collect the young generation less
    often. A collection over a large heap stops the loop for tens of milliseconds, which a
    caller hears; per-packet objects die by reference count anyway.

    Not for the model worker: on the CPU demo, freezing or raising the thresholds there
    made the steps jitter more (ops/bench/latency.py: egress cushion 70–110 ms against
    17–19 ms with the defaults)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 50)
