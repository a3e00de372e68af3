"""Process settings for real-time audio: keep the garbage collector out of the media path."""

from __future__ import annotations

import gc


def quiet_gc() -> None:
    """Freeze what is alive now (modules, settings, the model: never garbage) out of every
    future collection, and collect the young generation less often: a full collection over
    a large heap stops the event loop for tens of milliseconds, which a caller hears."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 50)
