"""The worker's clock: one batched step every 80 ms, and the per-slot frame queues.

:class:`BatchClock` runs in the inference thread. Its monotonic clock has absolute
deadlines (tick n is at start + n x 80 ms: no drift). At each tick, every bound slot
takes its oldest queued input frame, or silence when none arrived (an underrun, counted
per slot); the engine steps all slots at once; each slot's output frame and text token go
back to its session on the event loop, in order. A step that ends after the next tick is
an overrun: the clock skips the missed ticks rather than running them back to back, and
counts both.

Every step's duration also goes to a :class:`~service.worker.stepwatch.StepWatch`, checked
about once a second on this thread; when its verdict (step p99 over the last minute above
the budget) changes, ``on_overload(overloaded, p99_ms)`` is called on the event loop.

A slot's stream starts at its first input frame, so that the model's time 0 is the
caller's first audio and a session is not charged an underrun for the moments between
``started`` and its first frame; a slot that gets no frame at all starts anyway after
``start_grace_ticks`` (then every tick without a frame is an underrun).

:class:`ImmediateDriver` serves unclocked engines (echo): each input frame is answered as
it arrives. Both expose the same ``attach`` / ``detach`` / ``push`` to the sessions.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
import typing as tp

import numpy as np

from service.wire import FRAME_BYTES, FRAME_SAMPLES, FRAME_SECONDS
from service.worker.engine_api import NO_TOKEN, Engine, float_to_pcm16, pcm16_to_float
from service.worker.metrics import WorkerMetrics
from service.worker.stepwatch import StepWatch

log = logging.getLogger(__name__)

DEFAULT_QUEUE_FRAMES = 4  # 320 ms of caller audio may wait for the clock; older frames are dropped
DEFAULT_START_GRACE_TICKS = 25  # a bound slot waits up to 2 s for its first frame before stepping

# Called on the event loop with (step index since the slot's reset, PCM16 frame, text token).
OutputSink = tp.Callable[[int, bytes, int], None]


@dataclasses.dataclass(eq=False)
class SlotBinding:
    """One session's hold on a slot, as the clock sees it."""

    slot: int
    sink: OutputSink
    queue: collections.deque[bytes]
    fresh: bool = True
    started: bool = False
    waited: int = 0
    steps: int = 0
    underruns: int = 0
    dropped: int = 0
    closed: bool = False


class Driver(tp.Protocol):
    """What a session needs from the clock."""

    def attach(self, slot: int, sink: OutputSink) -> SlotBinding: ...

    def detach(self, slot: int) -> None: ...

    def push(self, slot: int, frame: bytes) -> None: ...


class BatchClock:
    """Steps a clocked engine every ``period`` seconds; see the module docstring."""

    def __init__(
        self,
        engine: Engine,
        metrics: WorkerMetrics,
        loop: asyncio.AbstractEventLoop,
        *,
        period: float = FRAME_SECONDS,
        queue_frames: int = DEFAULT_QUEUE_FRAMES,
        start_grace_ticks: int = DEFAULT_START_GRACE_TICKS,
        clock: tp.Callable[[], float] = time.monotonic,
        wait: tp.Callable[[float], bool] | None = None,
        watch: StepWatch | None = None,
        on_overload: tp.Callable[[bool, float | None], None] | None = None,
    ) -> None:
        if queue_frames < 1:
            raise ValueError("queue_frames must be at least 1")
        self.start_grace_ticks = start_grace_ticks
        self.engine = engine
        self.metrics = metrics
        self.loop = loop
        self.period = period
        self.queue_frames = queue_frames
        self._clock = clock
        self._lock = threading.Lock()
        self._bindings: list[SlotBinding | None] = [None] * engine.batch_size
        self._stop = threading.Event()
        # Sleeps up to the given seconds; True when stopped. Injectable to test on virtual time.
        self._wait = wait or self._stop.wait
        self.steps = 0
        self.ticks = 0
        self.overruns = 0
        self.skipped_ticks = 0
        self.underruns = 0
        self.dropped = 0
        self._slot_labels = [str(i) for i in range(engine.batch_size)]
        self.watch = watch
        self.on_overload = on_overload

    # --- called on the event loop -------------------------------------------------------
    def attach(self, slot: int, sink: OutputSink) -> SlotBinding:
        binding = SlotBinding(slot, sink, collections.deque())
        with self._lock:
            if self._bindings[slot] is not None:
                raise RuntimeError(f"slot {slot} is already attached")
            self._bindings[slot] = binding
        return binding

    def detach(self, slot: int) -> None:
        with self._lock:
            binding = self._bindings[slot]
            self._bindings[slot] = None
        if binding is not None:
            binding.closed = True

    def push(self, slot: int, frame: bytes) -> None:
        if len(frame) != FRAME_BYTES:
            raise ValueError(f"a frame is {FRAME_BYTES} bytes, got {len(frame)}")
        with self._lock:
            binding = self._bindings[slot]
            if binding is None:
                return
            if len(binding.queue) >= self.queue_frames:
                binding.queue.popleft()
                binding.dropped += 1
                self.dropped += 1
                self.metrics.input_dropped.inc()
            binding.queue.append(frame)

    # --- the inference thread -----------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        """Tick until :meth:`stop`; call from the thread that owns the engine."""
        next_tick = self._clock()
        while not self._stop.is_set():
            delay = next_tick - self._clock()
            if delay > 0 and self._wait(delay):
                break
            if self._stop.is_set():
                break
            self.ticks += 1
            self.tick()
            self._check_steps()
            next_tick += self.period
            late = self._clock() - next_tick
            if late >= 0:
                skipped = int(late // self.period) + 1
                self.overruns += 1
                self.skipped_ticks += skipped
                self.metrics.step_overruns.inc()
                self.metrics.skipped_ticks.inc(skipped)
                next_tick += skipped * self.period

    def _check_steps(self) -> None:
        watch = self.watch
        if watch is None:
            return
        verdict = watch.check(self._clock())
        self.metrics.step_p99.set((watch.p99_ms or 0.0) / 1000)
        if verdict is None:
            return
        self.metrics.overloaded.set(int(verdict))
        if verdict:
            self.metrics.overloads.inc()
        if self.on_overload is not None:
            self.loop.call_soon_threadsafe(self.on_overload, verdict, watch.p99_ms)

    def tick(self) -> None:
        """One step: gather inputs, step the engine, hand the outputs to the sessions."""
        B = self.engine.batch_size
        inputs = np.zeros((B, FRAME_SAMPLES), dtype=np.float32)
        active = np.zeros(B, dtype=bool)
        fresh = np.zeros(B, dtype=bool)
        stepped: list[SlotBinding] = []
        with self._lock:
            for slot, binding in enumerate(self._bindings):
                if binding is None:
                    continue
                if not binding.started:
                    if not binding.queue and binding.waited < self.start_grace_ticks:
                        binding.waited += 1
                        continue
                    binding.started = True
                active[slot] = True
                fresh[slot] = binding.fresh
                binding.fresh = False
                if binding.queue:
                    inputs[slot] = pcm16_to_float(binding.queue.popleft())
                else:
                    binding.underruns += 1
                    self.underruns += 1
                    self.metrics.underruns.labels(self._slot_labels[slot]).inc()
                stepped.append(binding)
        if not stepped:
            return
        started = time.perf_counter()
        output = self.engine.step(inputs, active, fresh)
        elapsed = time.perf_counter() - started
        self.metrics.step_duration.observe(elapsed)
        if self.watch is not None:
            self.watch.observe(self._clock(), elapsed)
        self.steps += 1
        deliveries = []
        for binding in stepped:
            token = int(output.text_tokens[binding.slot])
            deliveries.append((binding, binding.steps, float_to_pcm16(output.pcm[binding.slot]), token))
            binding.steps += 1
        self.loop.call_soon_threadsafe(_deliver, deliveries)


def _deliver(deliveries: list[tuple[SlotBinding, int, bytes, int]]) -> None:
    for binding, step, pcm, token in deliveries:
        if not binding.closed:
            binding.sink(step, pcm, token)


class ImmediateDriver:
    """Answers each frame as it arrives (``engine.respond``), ``engine.delay_seconds`` later."""

    def __init__(self, engine: tp.Any, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.loop = loop
        self._bindings: list[SlotBinding | None] = [None] * engine.batch_size

    def attach(self, slot: int, sink: OutputSink) -> SlotBinding:
        if self._bindings[slot] is not None:
            raise RuntimeError(f"slot {slot} is already attached")
        binding = SlotBinding(slot, sink, collections.deque(), fresh=False)
        self._bindings[slot] = binding
        return binding

    def detach(self, slot: int) -> None:
        binding = self._bindings[slot]
        self._bindings[slot] = None
        if binding is not None:
            binding.closed = True

    def push(self, slot: int, frame: bytes) -> None:
        binding = self._bindings[slot]
        if binding is None:
            return
        step = binding.steps
        binding.steps += 1
        reply = self.engine.respond(frame)
        delay = self.engine.delay_seconds
        if delay <= 0:
            binding.sink(step, reply, NO_TOKEN)
        else:
            self.loop.call_later(delay, _deliver, [(binding, step, reply, NO_TOKEN)])
