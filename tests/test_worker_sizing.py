"""B from the measured step time, the context as a capacity lever, and overload while serving.

The real tiny model on this CPU. Where a test needs a known answer it adds an artificial
per-step delay that depends on B (``delayed_engine``): past 3 slots a step costs twice the
budget, as a GPU does past its memory bandwidth, so no B above 3 can be chosen on any
machine (a functional check); that B=3 itself holds the budget (a few ms of the tiny model's
step against 70) is a timing judgement, as is everything else that needs a fast step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil

import pytest
from websockets.asyncio.client import connect

from service.config import ConfigError, load
from service.pool import OVERLOADED, READY, RegistryReader, SlotLeases
from service.pool import connect as pool_connect
from service.settings import WorkerSettings
from service.worker.capacity import ContextError, kv_bytes_per_slot, streaming_state_bytes
from service.worker.main import build_engine
from service.worker.sizing import FORCED, LIMIT, TIME, certainly_over
from service.worker.stepwatch import StepWatch
from service.worker.tinymodel import build_tiny_checkpoint
from tests.support.pool import eventually
from tests.support.realtime import realtime_test
from tests.support.worker import (
    collect,
    delayed_engine,
    pcm_frames,
    running_worker,
    start_message,
    worker_settings,
)

BUDGET_MS = 70.0
CLIFF = 3


def cliff(batch_size: int) -> float:
    return 0.0 if batch_size <= CLIFF else 2 * BUDGET_MS


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0)


def verdicts(sizing) -> dict[int, bool]:
    """B -> held the budget in at least one timing run."""
    held: dict[int, bool] = {}
    for trial in sizing.trials:
        held[trial.batch_size] = held.get(trial.batch_size, False) or not trial.over_budget
    return held


@realtime_test()
def test_the_chosen_b_is_the_largest_whose_p99_holds_the_budget(tiny_dir, timing):
    settings = worker_settings(model=str(tiny_dir), max_slots=8, step_budget_ms=BUDGET_MS)
    engine = build_engine(settings, make_engine=delayed_engine(cliff))
    try:
        sizing = engine.sizing
        held = verdicts(sizing)
        assert engine.batch_size == sizing.slots <= CLIFF and sizing.reason == TIME
        assert sizing.memory_slots >= 8
        assert (held[8], held[4]) == (False, False)  # past the cliff: over on any machine
        # a B over the budget is timed twice, and stops as soon as its p99 is certainly over
        over = [t for t in sizing.trials if t.batch_size == 8]
        assert len(over) == 2 and all(t.steps == certainly_over(100) == 2 for t in over)
        timing.expect(
            sizing.slots == CLIFF and held == {8: False, 4: False, 2: True, 3: True},
            f"B=2 and B=3 of the tiny model hold 70 ms (8, halved to 4, to 2, bisected to 3): {held}",
        )
        timing.expect(sizing.p99_ms is not None and sizing.p99_ms < BUDGET_MS, f"p99 {sizing.p99_ms} ms")
    finally:
        engine.close()


@realtime_test()
def test_without_the_delay_the_same_search_keeps_more_slots(tiny_dir, timing):
    """The search on the real step time: the chosen B held the budget and B+1 did not (or B is
    the limit), whatever the load; the tiny model holding 70 ms past 3 slots is a timing
    judgement."""
    settings = worker_settings(model=str(tiny_dir), max_slots=8, step_budget_ms=BUDGET_MS)
    engine = build_engine(settings)
    try:
        sizing = engine.sizing
        held = verdicts(sizing)
        if held.get(sizing.slots):
            assert sizing.p99_ms < BUDGET_MS
            assert (sizing.slots == 8 and sizing.reason == LIMIT) or held.get(sizing.slots + 1) is False
        else:
            assert sizing.slots == 1 and sizing.over_budget  # not even one slot held: said so
        timing.expect(sizing.slots > CLIFF, f"more than {CLIFF} slots hold 70 ms: {held}")
    finally:
        engine.close()


@realtime_test()
def test_a_tight_budget_is_searched_by_bisection_on_the_real_step(tiny_dir, timing):
    settings = worker_settings(model=str(tiny_dir), max_slots=16, step_budget_ms=12.0)
    engine = build_engine(settings)
    try:
        sizing = engine.sizing
        held = verdicts(sizing)
        if held.get(sizing.slots):
            assert sizing.p99_ms < 12.0
            assert sizing.slots == 16 or held.get(sizing.slots + 1) is False
        else:
            assert sizing.slots == 1 and sizing.over_budget  # this machine cannot hold 12 ms at B=1: said so
        timing.expect(sizing.seconds < 60, f"the search took {sizing.seconds:.0f} s")
    finally:
        engine.close()


@realtime_test()
def test_a_b_that_runs_out_of_device_memory_is_ruled_out_and_memory_is_the_reason(tiny_dir, timing):
    """A GPU whose memory ends before the estimate does (activations, graph pools): the
    engine's allocation fails with torch's OutOfMemoryError (raised here in its place, as
    the CPU never runs out), and the search goes on below it."""
    import torch

    from service.worker.engine import MoshiEngine

    def make(loaded, batch_size, **kwargs):
        if batch_size > 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return MoshiEngine(loaded, batch_size, **kwargs)

    engine = build_engine(worker_settings(model=str(tiny_dir), max_slots=8, step_budget_ms=BUDGET_MS), make_engine=make)
    try:
        sizing = engine.sizing
        assert engine.batch_size <= 5
        assert [t.to_dict() for t in sizing.trials if t.out_of_memory][:1] == [
            {"B": 8, "steps": 0, "over_budget": True, "out_of_memory": True}
        ]
        timing.expect(
            (engine.batch_size, sizing.reason) == (5, "memory")
            and [t.batch_size for t in sizing.trials if t.out_of_memory] == [8, 6],
            f"B=4 and B=5 of the tiny model hold 70 ms: {[t.to_dict() for t in sizing.trials]}",
        )
    finally:
        engine.close()


def test_forced_slots_are_timed_and_warn_when_over_the_budget(tiny_dir, caplog):
    settings = worker_settings(model=str(tiny_dir), slots=4, step_budget_ms=1.0)
    with caplog.at_level(logging.WARNING, logger="service.worker.sizing"):
        engine = build_engine(settings)
    try:
        assert engine.batch_size == 4 and engine.sizing.reason == FORCED and engine.sizing.over_budget
        assert any("--slots 4" in r.message and "exceeds the 1 ms budget" in r.message for r in caplog.records)
    finally:
        engine.close()


def test_step_budget_and_context_settings_are_validated():
    for env, message in [
        ({"MOSHIMOSHI_STEP_BUDGET_MS": "90"}, "MOSHIMOSHI_STEP_BUDGET_MS=90.0: must be at most 80"),
        ({"MOSHIMOSHI_STEP_BUDGET_MS": "fast"}, "not a number"),
        ({"MOSHIMOSHI_CONTEXT_SECONDS": "0.5"}, "must be at least 1"),
        ({"MOSHIMOSHI_MAX_SLOTS": "0"}, "MOSHIMOSHI_MAX_SLOTS=0: must be at least 1"),
        ({"MOSHIMOSHI_OVERLOAD_WINDOW_SECONDS": "1"}, "must be at least 2"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load(WorkerSettings, environ=env)
    settings = load(WorkerSettings, environ={"MOSHIMOSHI_CONTEXT_SECONDS": "120", "MOSHIMOSHI_STEP_BUDGET_MS": "60"})
    assert (settings.context_seconds, settings.step_budget_ms) == (120.0, 60.0)


def test_context_seconds_sets_the_kv_ring_and_memory_per_slot(tiny_dir):
    full = build_engine(worker_settings(model=str(tiny_dir), slots=1, step_budget_ms=BUDGET_MS))
    try:
        assert full.info.context_steps == 3000 and full.info.context_seconds == 240
        full_bytes = kv_bytes_per_slot(full.lm)
    finally:
        full.close()
    half = build_engine(worker_settings(model=str(tiny_dir), slots=1, step_budget_ms=BUDGET_MS, context_seconds=120))
    try:
        assert half.info.context_steps == 1500 and half.info.context_seconds == 120
        assert kv_bytes_per_slot(half.lm) * 2 == full_bytes
        rings = [
            m._streaming_state.kv_cache
            for m in half.lm.transformer.modules()
            if getattr(m, "_streaming_state", None) is not None and hasattr(m._streaming_state, "kv_cache")
        ]
        assert rings and all(ring.capacity == 1500 for ring in rings)
    finally:
        half.close()
    # measured: what streaming really allocates per slot is the KV ring and a little more
    from moshi.models import LMGen

    measured = streaming_state_bytes(LMGen(half.lm, support_out_of_sync=True))
    assert full_bytes // 2 <= measured < full_bytes // 2 * 1.05


def test_a_context_longer_than_the_checkpoints_is_refused_naming_the_setting(tiny_dir):
    with pytest.raises(
        ContextError, match=r"MOSHIMOSHI_CONTEXT_SECONDS=300 exceeds this checkpoint's context of 240 s"
    ):
        build_engine(worker_settings(model=str(tiny_dir), slots=1, context_seconds=300))


def test_a_checkpoint_without_a_context_needs_the_setting(tiny_dir, tmp_path):
    # moshi streams only with a bounded KV ring: a config.json without "context" must name
    # the setting that bounds it, not fail later on the missing number
    bare = tmp_path / "no-context"
    shutil.copytree(tiny_dir, bare)
    config = json.loads((bare / "config.json").read_text())
    del config["context"]
    (bare / "config.json").write_text(json.dumps(config))
    with pytest.raises(ContextError, match=r"declares no context length.*MOSHIMOSHI_CONTEXT_SECONDS"):
        build_engine(worker_settings(model=str(bare), slots=1))
    engine = build_engine(worker_settings(model=str(bare), slots=1, context_seconds=10))
    try:
        assert engine.info.context_steps == 125
    finally:
        engine.close()


def test_step_watch_needs_three_slow_steps_and_forgets_after_the_window():
    watch = StepWatch(70.0, window_seconds=10.0, check_every=0.0)
    for i in range(50):
        watch.observe(i * 0.08, 0.010)
    watch.observe(4.0, 0.5)
    watch.observe(4.1, 0.5)
    assert watch.check(4.2) is None and not watch.overloaded  # two stalls: p99 over, not a trend
    watch.observe(4.3, 0.5)
    assert watch.check(4.4) is True and watch.p99_ms > 70
    assert watch.check(4.5) is None  # unchanged
    assert watch.check(13.95) is None  # the fast steps left the window: the three stalls remain
    assert watch.check(14.05) is False  # the first stall left: two are not a trend any more
    assert watch.check(14.35) is None and watch.p99_ms is None  # the window is empty


@realtime_test()
async def test_an_overloaded_worker_takes_no_new_calls_until_it_recovers(tiny_dir, redis_server, timing):
    settings = worker_settings(
        model=str(tiny_dir),
        slots=2,
        step_budget_ms=BUDGET_MS,
        overload_window_seconds=2.0,
        redis_url=redis_server.url,
        worker_id="ow",
        heartbeat_seconds=0.2,
    )
    async with (
        running_worker(settings, lambda: build_engine(settings, make_engine=delayed_engine(lambda b: 0.0))) as worker,
        pool_connect(redis_server.url) as pool,
    ):
        leases, reader = SlotLeases(pool), RegistryReader(pool)

        async def registered_state() -> str:
            workers = {w.worker_id: w for w in await reader.workers()}
            return workers["ow"].state if "ow" in workers else ""

        await eventually(lambda: _equals(registered_state(), READY), what="registered ready")
        [status] = await reader.workers()
        assert status.slots_reason == FORCED and status.step_budget_ms == BUDGET_MS
        assert status.warmup_p99_ms is not None and status.context_seconds == 240

        first = await leases.claim(ttl_ms=30_000, owner="call-1")
        assert first is not None
        async with connect(worker.url) as ws:
            await ws.send(start_message(call_id="call-1", slot=first.slot, token=first.token))
            assert json.loads(await ws.recv())["type"] == "started"
            feeding = asyncio.create_task(_feed(ws))
            try:
                worker.runtime.engine.extra_ms = 2 * BUDGET_MS  # the device got slower
                await eventually(lambda: worker.runtime.overloaded, timeout=20, what="overloaded")
                info = await worker.info()
                assert info["overloaded"] and not info["accepting"] and info["step_p99_ms"] > BUDGET_MS
                assert await worker.metric("moshimoshi_worker_overloaded") == 1
                await eventually(lambda: _equals(registered_state(), OVERLOADED), what="announced")
                assert await leases.claim(ttl_ms=30_000, owner="call-2") is None  # gateways skip it

                async with connect(worker.url) as refused:  # and a session that comes anyway is refused
                    await refused.send(start_message(call_id="call-x", slot=1 - first.slot, token=None))
                    result = await collect(refused)
                assert result.close_code == 4029 and "overloaded" in result.close_reason

                worker.runtime.engine.extra_ms = 0.0  # it recovers; the call went on all along
                try:  # the tiny model's own steps under 70 ms again: a timing judgement
                    await eventually(lambda: not worker.runtime.overloaded, timeout=20, what="recovered")
                except AssertionError:
                    timing.expect(False, f"recovered within 20 s: step p99 {worker.runtime.watch.p99_ms} ms")
                    return
                await eventually(lambda: _equals(registered_state(), READY), what="announced ready")
                second = await leases.claim(ttl_ms=30_000, owner="call-2")
                assert second is not None and second.worker_id == "ow"
                assert await worker.metric("moshimoshi_worker_overloads_total") >= 1
            finally:
                feeding.cancel()
                await asyncio.gather(feeding, return_exceptions=True)
            assert not ws.close_code  # the call in progress was never cut


@pytest.mark.system  # a real uvicorn worker and gateway control plane, in this process
async def test_without_a_pool_the_pool_view_reads_the_sizing_from_the_workers_info(tiny_dir):
    import httpx

    from tests.support.api import READ, api_gateway

    settings = worker_settings(model=str(tiny_dir), max_slots=2, step_budget_ms=BUDGET_MS, context_seconds=60)
    async with running_worker(settings) as worker, api_gateway(None, worker_url=worker.url) as api:
        async with httpx.AsyncClient() as client:
            pool = (await client.get(api.base + "/v1/pool", headers=READ)).json()
        [w] = pool["workers"]
        sizing = (await worker.info())["sizing"]
        assert (w["state"], w["capacity"], w["slots_reason"], w["step_budget_ms"], w["context_seconds"]) == (
            "ready",
            2,
            "limit",
            BUDGET_MS,
            60.0,
        )
        assert (w["warmup_p50_ms"], w["warmup_p99_ms"]) == (sizing["p50_ms"], sizing["p99_ms"])
        assert w["memory_slots"] == sizing["memory_slots"] >= 2


async def _equals(value, expected) -> bool:
    return (await value) == expected


async def _feed(ws) -> None:
    """A caller: one frame every 80 ms, the worker's answers read and dropped."""
    frames = pcm_frames(3, 25)

    async def drain() -> None:
        async for _ in ws:
            pass

    reading = asyncio.create_task(drain())
    try:
        i = 0
        while True:
            await ws.send(frames[i % len(frames)])
            i += 1
            await asyncio.sleep(0.08)
    finally:
        reading.cancel()
