"""Choosing B, the batch size, from the measured step time.

Memory gives an upper bound (:mod:`service.worker.capacity`); the step time decides. At
warm-up the worker builds the engine at a candidate B (CUDA graphs captured on GPU), times
``steps`` back-to-back steps with every slot active, and keeps the largest B whose p99
stays under the step budget (default 70 ms of the 80 ms frame): memory's bound first, then
a bisection below it. A B that measures over the budget is timed a second time before it
is ruled out, so that one stall of a loaded machine does not cost capacity for the life of
the process. ``--slots N`` forces B; it is timed all the same, with a warning when over.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import typing as tp

import numpy as np

from service.wire import FRAME_SAMPLES
from service.worker.engine_api import Engine

log = logging.getLogger(__name__)

DEFAULT_STEPS = 100
MEMORY = "memory"  # the memory bound holds the budget
LIMIT = "limit"  # --max-slots (or the CPU default) holds the budget
TIME = "time"  # lowered until the p99 held the budget
FORCED = "forced"  # --slots


@dataclasses.dataclass(frozen=True)
class StepTimes:
    """Step time at one batch size: p50/p99 over ``steps`` steps (fewer when it was
    certain early that p99 is over the budget)."""

    batch_size: int
    p50_ms: float
    p99_ms: float
    steps: int
    over_budget: bool
    out_of_memory: bool = False  # the engine could not be built or stepped at this B

    def to_dict(self) -> dict[str, tp.Any]:
        out: dict[str, tp.Any] = {"B": self.batch_size, "steps": self.steps, "over_budget": self.over_budget}
        if self.out_of_memory:
            out["out_of_memory"] = True
        else:
            out.update(p50_ms=round(self.p50_ms, 2), p99_ms=round(self.p99_ms, 2))
        return out


@dataclasses.dataclass(frozen=True)
class SlotSizing:
    """The chosen B and why: what /v1/info, the metrics and the pool show."""

    slots: int
    reason: str  # MEMORY, LIMIT, TIME or FORCED
    budget_ms: float
    memory_slots: int | None
    p50_ms: float | None
    p99_ms: float | None
    trials: tuple[StepTimes, ...] = ()
    seconds: float = 0.0

    @property
    def over_budget(self) -> bool:
        return self.p99_ms is not None and self.p99_ms > self.budget_ms

    def to_dict(self) -> dict[str, tp.Any]:
        return {
            "slots": self.slots,
            "reason": self.reason,
            "budget_ms": self.budget_ms,
            "memory_slots": self.memory_slots,
            "p50_ms": None if self.p50_ms is None else round(self.p50_ms, 2),
            "p99_ms": None if self.p99_ms is None else round(self.p99_ms, 2),
            "over_budget": self.over_budget,
            "seconds": round(self.seconds, 1),
            "trials": [t.to_dict() for t in self.trials],
        }

    def describe(self) -> str:
        timing = (
            f"step p50 {self.p50_ms:.1f} ms, p99 {self.p99_ms:.1f} ms"
            if self.p50_ms is not None and self.p99_ms is not None
            else "step not timed"
        )
        bound = f"memory allows {self.memory_slots}" if self.memory_slots is not None else "memory not bounded"
        return (
            f"B = {self.slots} ({self.reason}: {bound}; {timing} against a {self.budget_ms:g} ms budget; "
            f"{len(self.trials)} timing run(s) in {self.seconds:.1f} s)"
        )


def certainly_over(steps: int, quantile: float = 0.99) -> int:
    """How many of ``steps`` samples over a limit put the p99 over it whatever the rest
    (numpy's linear interpolation: the p99 lies between the order statistics at
    floor and ceil of ``quantile * (steps - 1)``; 2 of 100)."""
    return steps - math.floor(quantile * (steps - 1))


def time_steps(engine: Engine, budget_ms: float, steps: int = DEFAULT_STEPS, seed: int = 0) -> StepTimes:
    """Time ``steps`` steps of ``engine`` with every slot active, on noise, every KV ring
    full where the engine can say so (``fill_rings``: the worst case, calls past their context).

    Stops early once more steps exceeded the budget than a p99 under it allows.
    """
    B = engine.batch_size
    fill = getattr(engine, "fill_rings", None)
    if fill is not None:
        fill()
    rng = np.random.default_rng(seed)
    frames = (rng.standard_normal((4, B, FRAME_SAMPLES)) * 0.05).astype(np.float32)
    active = np.ones(B, dtype=bool)
    fresh = np.zeros(B, dtype=bool)
    enough = certainly_over(steps)
    durations: list[float] = []
    over = 0
    for i in range(steps):
        started = time.perf_counter()
        engine.step(frames[i % len(frames)], active, fresh)  # host arrays back: synchronised
        elapsed = (time.perf_counter() - started) * 1000
        durations.append(elapsed)
        if elapsed > budget_ms:
            over += 1
            if over >= enough:
                break
    p50, p99 = (float(q) for q in np.percentile(durations, [50, 99]))
    complete = len(durations) == steps
    return StepTimes(B, p50, p99, len(durations), over_budget=not complete or p99 > budget_ms)


class _Trials:
    """Builds engines, times them, keeps the most recent one open for reuse."""

    def __init__(self, build: tp.Callable[[int], Engine], budget_ms: float, steps: int) -> None:
        self.build = build
        self.budget_ms = budget_ms
        self.steps = steps
        self.done: list[StepTimes] = []
        self.engine: Engine | None = None

    def engine_for(self, batch_size: int) -> Engine:
        if self.engine is not None and self.engine.batch_size == batch_size:
            return self.engine
        self.close()
        self.engine = self.build(batch_size)
        self.engine.warm_up()  # CUDA graphs are captured here
        return self.engine

    def time(self, batch_size: int) -> StepTimes:
        """Time ``batch_size``; a result over the budget is timed once more, the better kept.
        A B whose engine runs out of device memory is over the budget too."""
        try:
            return self._time(batch_size)
        except Exception as exc:
            if type(exc).__name__ != "OutOfMemoryError":  # torch.OutOfMemoryError, without importing torch
                raise
            self.close()
            _release_device_memory()
            log.info("B=%d does not fit the device's memory (%s)", batch_size, str(exc).split("\n")[0][:200])
            result = StepTimes(batch_size, math.inf, math.inf, 0, over_budget=True, out_of_memory=True)
            self.done.append(result)
            return result

    def _time(self, batch_size: int) -> StepTimes:
        engine = self.engine_for(batch_size)
        result = time_steps(engine, self.budget_ms, self.steps)
        self.done.append(result)
        if result.over_budget:
            again = time_steps(engine, self.budget_ms, self.steps, seed=1)
            self.done.append(again)
            if not again.over_budget or again.p99_ms < result.p99_ms:
                result = again
        log.info(
            "step time at B=%d: p50 %.1f ms, p99 %.1f ms over %d steps (%s the %g ms budget)",
            batch_size,
            result.p50_ms,
            result.p99_ms,
            result.steps,
            "over" if result.over_budget else "under",
            self.budget_ms,
        )
        return result

    def close(self) -> None:
        if self.engine is not None:
            engine, self.engine = self.engine, None
            engine.close()
            _release_device_memory()


def _release_device_memory() -> None:
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        import gc

        gc.collect()  # the closed engine's CUDA graphs (and their memory pools) may sit in cycles
        torch.cuda.empty_cache()


def size_batch(
    build: tp.Callable[[int], Engine],
    *,
    budget_ms: float,
    upper: int,
    upper_reason: str = MEMORY,
    memory_slots: int | None = None,
    forced: int | None = None,
    steps: int = DEFAULT_STEPS,
) -> tuple[Engine, SlotSizing]:
    """The engine at the chosen B, and the sizing; see the module docstring.

    ``upper`` is where the search starts (memory's bound, or a lower limit: ``upper_reason``
    says which); ``forced`` skips the search and only times that B.
    """
    if upper < 1:
        raise ValueError("upper must be at least 1")
    started = time.monotonic()
    trials = _Trials(build, budget_ms, steps)
    try:
        if forced is not None:
            chosen, reason = forced, FORCED
            timing = trials.time(forced)
            if timing.out_of_memory:
                raise RuntimeError(f"--slots {forced}: the engine does not fit the device's memory")
        else:
            chosen, timing, reason = _search(trials, upper, upper_reason)
        engine = trials.engine_for(chosen)
        trials.engine = None  # handed over
    except BaseException:
        trials.close()
        raise
    sizing = SlotSizing(
        chosen,
        reason,
        budget_ms,
        memory_slots,
        _finite(timing.p50_ms),
        _finite(timing.p99_ms),
        tuple(trials.done),
        time.monotonic() - started,
    )
    if forced is not None and sizing.over_budget:
        log.warning(
            "--slots %d: the measured step p99 %.1f ms exceeds the %g ms budget: calls on this "
            "worker will stutter when the machine is busy; fewer slots would hold it",
            forced,
            timing.p99_ms,
            budget_ms,
        )
    elif reason == TIME and sizing.over_budget:
        log.warning(
            "even one slot takes %.1f ms at p99, over the %g ms budget: this device cannot serve a call in real time",
            timing.p99_ms,
            budget_ms,
        )
    return engine, sizing


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _search(trials: _Trials, upper: int, upper_reason: str) -> tuple[int, StepTimes, str]:
    """Largest B <= upper whose p99 holds the budget (B=1 when none does). The reason is
    MEMORY when the smallest B ruled out did not fit the device's memory after all."""
    top = trials.time(upper)
    if not top.over_budget:
        return upper, top, upper_reason
    if upper == 1:
        return 1, top, MEMORY if top.out_of_memory else TIME
    good: StepTimes | None = None
    low, high, high_oom = 0, upper, top.out_of_memory  # B <= low holds (0: none known), B >= high does not
    while high - low > 1:
        # halve towards 1 until one holds, then bisect between the two
        middle = max(1, high // 2) if good is None else (low + high) // 2
        timing = trials.time(middle)
        if timing.over_budget:
            high, high_oom = middle, timing.out_of_memory
            if middle == 1:
                if timing.out_of_memory:
                    raise RuntimeError("one slot does not fit the device's memory")
                return 1, timing, TIME
        else:
            low, good = middle, timing
    assert good is not None
    return low, good, MEMORY if high_oom else TIME
