"""The worker's clock and per-slot queues, with the echo engine stepped under the clock."""

from __future__ import annotations

import asyncio

import numpy as np

from service.wire import FRAME_BYTES
from service.worker.echo import EchoEngine
from service.worker.engine_api import NO_TOKEN
from service.worker.metrics import WorkerMetrics
from service.worker.scheduler import BatchClock
from tests.support.worker import pcm_frames

SILENCE = bytes(FRAME_BYTES)


class Recorder:
    def __init__(self) -> None:
        self.outputs: list[tuple[int, bytes, int]] = []

    def __call__(self, step: int, pcm: bytes, token: int) -> None:
        self.outputs.append((step, pcm, token))


async def settle() -> None:
    """Let the clock's call_soon_threadsafe deliveries run."""
    for _ in range(3):
        await asyncio.sleep(0)


def make_clock(slots: int = 2, **kwargs) -> tuple[BatchClock, WorkerMetrics]:
    metrics = WorkerMetrics()
    engine = EchoEngine(slots, clocked=True)
    return BatchClock(engine, metrics, asyncio.get_running_loop(), **kwargs), metrics


def metric(metrics: WorkerMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_frames_come_back_in_order_one_per_tick():
    clock, _ = make_clock()
    out = Recorder()
    clock.attach(0, out)
    frames = pcm_frames(1, 3)
    for frame in frames:
        clock.push(0, frame)
    for _ in range(3):
        clock.tick()
    await settle()
    assert [(step, pcm) for step, pcm, _ in out.outputs] == list(enumerate(frames))
    assert all(token == NO_TOKEN for _, _, token in out.outputs)
    assert clock.underruns == 0


async def test_underruns_are_counted_per_slot_and_in_total():
    clock, metrics = make_clock(start_grace_ticks=2)
    quiet, talker = Recorder(), Recorder()
    clock.attach(0, quiet)
    clock.attach(1, talker)
    for frame in pcm_frames(2, 4):
        clock.push(1, frame)
    for _ in range(6):
        clock.tick()
    await settle()
    # Slot 0 never sent anything: it waits 2 ticks for a first frame, then steps on silence.
    assert len(quiet.outputs) == 4 and all(pcm == SILENCE for _, pcm, _ in quiet.outputs)
    # Slot 1 had 4 frames for 6 ticks: 2 underruns.
    assert len(talker.outputs) == 6
    assert clock.underruns == 6
    assert metric(metrics, "moshimoshi_worker_slot_underruns_total", slot="0") == 4
    assert metric(metrics, "moshimoshi_worker_slot_underruns_total", slot="1") == 2


async def test_a_stream_starts_at_its_first_frame():
    clock, _ = make_clock(start_grace_ticks=100)
    out = Recorder()
    clock.attach(0, out)
    clock.tick()
    clock.tick()
    frame = pcm_frames(3, 1)[0]
    clock.push(0, frame)
    clock.tick()
    await settle()
    assert out.outputs == [(0, frame, NO_TOKEN)]
    assert clock.underruns == 0


async def test_a_full_queue_drops_the_oldest_frame_and_counts_it():
    clock, metrics = make_clock(queue_frames=4)
    out = Recorder()
    clock.attach(0, out)
    frames = pcm_frames(4, 6)
    for frame in frames:
        clock.push(0, frame)
    for _ in range(4):
        clock.tick()
    await settle()
    assert [pcm for _, pcm, _ in out.outputs] == frames[2:]
    assert clock.dropped == 2
    assert metric(metrics, "moshimoshi_worker_input_dropped_total") == 2


async def test_detached_slot_gets_no_more_output_and_a_new_session_starts_fresh():
    clock, _ = make_clock()
    first, second = Recorder(), Recorder()
    clock.attach(0, first)
    clock.push(0, pcm_frames(5, 1)[0])
    clock.tick()
    await settle()
    clock.push(0, pcm_frames(6, 1)[0])
    clock.tick()
    clock.detach(0)  # the outputs of that tick are still on their way: they must not arrive
    await settle()
    assert [step for step, _, _ in first.outputs] == [0]
    binding = clock.attach(0, second)
    assert binding.fresh
    clock.push(0, pcm_frames(7, 1)[0])
    clock.tick()
    await settle()
    assert [step for step, _, _ in second.outputs] == [0]
    assert not binding.fresh


class VirtualTime:
    """A clock that only moves when the scheduler waits or the engine works."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.stop_after: float | None = None

    def __call__(self) -> float:
        return self.now

    def wait(self, seconds: float) -> bool:
        self.now += seconds
        return self.stop_after is not None and self.now >= self.stop_after


class TimedEcho(EchoEngine):
    """The echo engine, taking ``costs[i]`` virtual seconds for its i-th step."""

    def __init__(self, time: VirtualTime, costs: list[float]) -> None:
        super().__init__(1, clocked=True)
        self.time = time
        self.costs = costs
        self.started_at: list[float] = []

    def step(self, inputs, active, fresh):
        self.started_at.append(self.time.now)
        self.time.now += self.costs[len(self.started_at) - 1] if len(self.started_at) <= len(self.costs) else 0.01
        return super().step(inputs, active, fresh)


async def test_ticks_are_on_absolute_deadlines_and_overruns_skip_ahead():
    time = VirtualTime()
    # Steps of 30 ms, one of 200 ms (overruns 2 ticks), then 30 ms again.
    engine = TimedEcho(time, [0.03, 0.03, 0.2, 0.03, 0.03])
    metrics = WorkerMetrics()
    clock = BatchClock(
        engine, metrics, asyncio.get_running_loop(), period=0.08, start_grace_ticks=0, clock=time, wait=time.wait
    )
    clock.attach(0, Recorder())
    start = time.now
    time.stop_after = start + 0.08 * 6 + 0.001
    clock.run()
    offsets = [round((t - start) / 0.08, 6) for t in engine.started_at]
    # Ticks 0, 1, 2 on time; tick 2 ran until 0.36 s, past ticks 3 and 4: the next is tick 5.
    assert offsets == [0, 1, 2, 5, 6]
    assert clock.overruns == 1 and clock.skipped_ticks == 2
    assert metric(metrics, "moshimoshi_worker_step_overruns_total") == 1
    assert metric(metrics, "moshimoshi_worker_step_duration_seconds_count") == 5


async def test_clock_keeps_no_drift_over_many_ticks():
    time = VirtualTime()
    engine = TimedEcho(time, [0.0123] * 1000)
    clock = BatchClock(
        engine,
        WorkerMetrics(),
        asyncio.get_running_loop(),
        period=0.08,
        start_grace_ticks=0,
        clock=time,
        wait=time.wait,
    )
    clock.attach(0, Recorder())
    start = time.now
    time.stop_after = start + 0.08 * 999 + 0.001
    clock.run()
    assert len(engine.started_at) == 1000
    assert np.allclose(np.array(engine.started_at) - start, np.arange(1000) * 0.08, atol=1e-6)
    assert clock.overruns == 0
