"""Process settings for real-time audio: the event loop every role runs on, and the garbage
collector kept out of the media path.

The production event loop is uvloop (pulled in by ``uvicorn[standard]``): the media path
runs thousands of timers a second. ``MOSHIMOSHI_EVENT_LOOP=asyncio`` selects the standard
library's loop instead (a diagnosis aid; the test suite runs the SIP, RTP and end-to-end
tests on both).
"""

from __future__ import annotations

import asyncio
import gc
import os
import typing as tp
from collections.abc import Callable, Coroutine

from service.config import ConfigError

EVENT_LOOP_ENV = "MOSHIMOSHI_EVENT_LOOP"
EVENT_LOOPS = ("uvloop", "asyncio")

T = tp.TypeVar("T")


def event_loop_name(environ: tp.Mapping[str, str] | None = None) -> str:
    """The event loop this process runs on: ``MOSHIMOSHI_EVENT_LOOP``, uvloop by default."""
    name = (os.environ if environ is None else environ).get(EVENT_LOOP_ENV, "uvloop").strip().lower()
    if name not in EVENT_LOOPS:
        raise ConfigError(f"{EVENT_LOOP_ENV}={name!r}: must be one of {', '.join(EVENT_LOOPS)}")
    return name


def loop_factory(name: str | None = None) -> Callable[[], asyncio.AbstractEventLoop]:
    """A factory of new event loops of kind ``name`` (default: ``event_loop_name()``)."""
    name = name or event_loop_name()
    if name == "uvloop":
        try:
            import uvloop
        except ImportError as exc:
            raise ConfigError(
                f"{EVENT_LOOP_ENV}=uvloop but uvloop is not installed (install uvicorn[standard], or set it to asyncio)"
            ) from exc
        return uvloop.new_event_loop
    if name == "asyncio":
        return asyncio.new_event_loop
    raise ConfigError(f"{EVENT_LOOP_ENV}={name!r}: must be one of {', '.join(EVENT_LOOPS)}")


def run(main: Coroutine[tp.Any, tp.Any, T]) -> T:
    """``asyncio.run(main)`` on the production event loop (see the module docstring)."""
    try:
        factory = loop_factory()
    except ConfigError:
        main.close()
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def running_loop_name() -> str:
    """``uvloop`` or ``asyncio``: the kind of the event loop running now (for the logs)."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"


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
