"""The session protocol (PROTOCOL.md v1) over real WebSockets, on the echo engine."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from websockets.asyncio.client import connect

from service.worker.echo import EchoEngine
from tests.support.worker import collect, pcm_frames, running_worker, start_message, worker_settings

SLOTS = 3


def echo_worker(slots: int = SLOTS, *, clocked: bool = False, validator=None, **settings):
    config = worker_settings(model="echo", slots=slots, **settings)
    return running_worker(config, lambda: EchoEngine(slots, clocked=clocked), validator=validator)


async def open_session(worker, **start_fields):
    ws = await connect(worker.url)
    await ws.send(start_message(**start_fields))
    started = json.loads(await ws.recv())
    assert started["type"] == "started", started
    return ws, started


async def refused(worker, *messages: str | bytes):
    """Send ``messages`` on a new socket; return (error event, close code, reason)."""
    async with connect(worker.url) as ws:
        for message in messages:
            await ws.send(message)
        result = await collect(ws)
    errors = [e for e in result.events if e["type"] == "error"]
    assert len(errors) == 1, result
    assert errors[0]["code"] == result.close_code
    return errors[0], result.close_code, result.close_reason


async def test_started_message_and_echo():
    async with echo_worker() as worker:
        ws, started = await open_session(worker, slot=2, call_id="c-1")
        assert started == {
            "type": "started",
            "version": 1,
            "slot": 2,
            "sample_rate": 24000,
            "frame_samples": 1920,
            "frame_ms": 80,
            "model": "echo",
            "license": "n/a (no model: echoes the caller)",
            "research_only": False,
            "max_call_seconds": 1800.0,
            "context_seconds": None,
            "sampling": None,
        }
        frames = pcm_frames(1, 5)
        for frame in frames:
            await ws.send(frame)
        echoed = [await ws.recv() for _ in frames]
        assert echoed == frames
        await ws.send(json.dumps({"type": "stop"}))
        result = await collect(ws)
        assert (result.close_code, result.close_reason) == (1000, "stop")
        await worker.wait_free(SLOTS)
        assert await worker.metric("moshimoshi_worker_sessions_total", outcome="completed") == 1


@pytest.mark.parametrize(
    ("messages", "code", "reason"),
    [
        ([b"\x00" * 3840], 4000, "media before start"),
        (["{not json"], 4000, "bad JSON"),
        (['"start"'], 4000, "must be a JSON object"),
        ([json.dumps({"type": "hello"})], 4000, "expected a start message"),
        ([start_message(version=2)], 4001, "unsupported protocol version 2"),
        ([start_message(version="1")], 4001, "unsupported protocol version"),
        ([start_message(call_id=None)], 4000, "'call_id' must be a non-empty string"),
        ([start_message(slot="one")], 4000, "'slot' must be an integer"),
        ([start_message(slot=SLOTS)], 4009, f"slot {SLOTS} is out of range"),
        ([start_message(model="llm-jp/llm-jp-moshi-v1")], 4004, "this worker serves echo"),
        ([start_message(sampling={"temp": "hot"})], 4000, "'sampling': bad 'temp'"),
        ([start_message(sampling={"top_k": 0})], 4000, "'sampling': bad 'top_k'"),
        ([start_message(sampling={"top_k": 2.5})], 4000, "'sampling': bad 'top_k'"),
        ([start_message(sampling={"seed": 1})], 4000, "'sampling': bad 'seed'"),
        ([start_message(sampling=[0.5])], 4000, "'sampling' must be an object"),
    ],
)
async def test_handshake_violations_close_with_the_documented_code(messages, code, reason):
    async with echo_worker() as worker:
        error, close_code, close_reason = await refused(worker, *messages)
        assert close_code == code
        assert reason in close_reason and reason in error["message"]
        assert await worker.metric("moshimoshi_worker_protocol_errors_total", code=str(code)) == 1
        await worker.wait_free(SLOTS)


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (b"\x00" * 1000, "binary frame of 1000 bytes"),
        ("[1,", "bad JSON"),
        (json.dumps({"type": "dance"}), "unknown message type 'dance'"),
        (start_message(), "duplicate start"),
    ],
)
async def test_violation_during_a_call_closes_only_that_session(message, reason):
    async with echo_worker() as worker:
        bystander, _ = await open_session(worker, slot=0, call_id="bystander")
        offender, started = await open_session(worker, slot=1, call_id="offender")
        await offender.send(message)
        result = await collect(offender)
        assert result.close_code == 4000 and reason in result.close_reason
        assert result.events == [{"type": "error", "code": 4000, "message": result.close_reason}]
        await worker.wait_free(SLOTS - 1)  # the offender's slot is free again, the bystander's not
        frame = pcm_frames(2, 1)[0]
        await bystander.send(frame)
        assert await bystander.recv() == frame
        await bystander.close()
        await worker.wait_free(SLOTS)


async def test_busy_slot_and_no_free_slot():
    async with echo_worker(slots=2) as worker:
        first, _ = await open_session(worker, slot=1, call_id="first")
        error, code, reason = await refused(worker, start_message(slot=1))
        assert (code, reason) == (4009, "slot 1 is busy")
        second, started = await open_session(worker, call_id="second")  # slot null: any free one
        assert started["slot"] == 0
        error, code, reason = await refused(worker, start_message())
        assert (code, reason) == (4029, "all 2 slots are busy")
        for ws in (first, second):
            await ws.close()
        await worker.wait_free(2)


async def test_fencing_token_goes_through_the_validator():
    async def validator(slot, token, call_id):
        await asyncio.sleep(0)
        return token == 7

    async with echo_worker(validator=validator) as worker:
        error, code, reason = await refused(worker, start_message(slot=0, token=6))
        assert code == 4003 and "refused" in reason
        ws, started = await open_session(worker, slot=0, token=7)
        assert started["slot"] == 0
        await ws.close()
        await worker.wait_free(SLOTS)


async def test_a_dropped_socket_frees_the_slot_at_once():
    async with echo_worker() as worker:
        ws, started = await open_session(worker, slot=1)
        await ws.send(pcm_frames(3, 1)[0])
        assert (await worker.info())["free"] == SLOTS - 1
        ws.transport.abort()  # no close handshake: the TCP connection just goes away
        await worker.wait_free(SLOTS)
        assert await worker.metric("moshimoshi_worker_sessions_total", outcome="disconnected") == 1
        again, started = await open_session(worker, slot=1)  # and it can be taken again
        await again.close()


@pytest.mark.parametrize("clocked", [False, True])
async def test_max_call_seconds_ends_the_session_cleanly(clocked):
    async with echo_worker(max_call_seconds=1.0, clocked=clocked) as worker:
        ws, started = await open_session(worker)
        assert started["max_call_seconds"] == 1.0
        for frame in pcm_frames(4, 20):
            await ws.send(frame)
        result = await collect(ws, started=started)
        assert len(result.frames) == round(1.0 / 0.08)
        assert result.events == [{"type": "end", "reason": "max_duration"}]
        assert (result.close_code, result.close_reason) == (1000, "max_duration")
        await worker.wait_free(SLOTS)
        assert await worker.metric("moshimoshi_worker_sessions_total", outcome="max_duration") == 1


async def test_underruns_are_counted_when_the_caller_sends_nothing():
    async with echo_worker(clocked=True) as worker:
        ws, started = await open_session(worker, slot=2)
        await ws.send(pcm_frames(5, 1)[0])  # one frame, then silence from the caller
        frames = [await ws.recv() for _ in range(5)]  # the clock keeps stepping the slot
        assert frames[0] == pcm_frames(5, 1)[0] and frames[1:] == [bytes(3840)] * 4
        assert await worker.metric("moshimoshi_worker_slot_underruns_total", slot="2") >= 4
        assert await worker.metric("moshimoshi_worker_slot_underruns_total", slot="0") == 0
        await ws.close()
        # A caller that never sends anything is stepped after a grace of 2 s, on silence.
        quiet, _ = await open_session(worker, slot=0)
        assert await asyncio.wait_for(quiet.recv(), 10) == bytes(3840)
        assert await worker.metric("moshimoshi_worker_slot_underruns_total", slot="0") >= 1
        await quiet.close()
        await worker.wait_free(SLOTS)


async def test_draining_refuses_new_sessions_and_ends_the_rest():
    async with echo_worker() as worker:
        ws, started = await open_session(worker)
        drain = asyncio.create_task(worker.runtime.drain(0.0))
        result = await collect(ws, started=started)
        assert result.events == [{"type": "end", "reason": "shutdown"}]
        assert result.close_code == 1000
        await drain
        status, _ = await worker.get("/readyz")
        assert status == 503
        error, code, reason = await refused(worker, start_message())
        assert (code, reason) == (4029, "the worker is draining")
        info = await worker.info()
        assert info["state"] == "draining" and info["free"] == 0


async def test_health_readiness_and_refusal_while_loading():
    release = threading.Event()

    def slow_factory():
        release.wait(30)
        return EchoEngine(SLOTS)

    async with running_worker(worker_settings(model="echo", slots=SLOTS), slow_factory, wait_ready=False) as worker:
        assert (await worker.get("/healthz"))[0] == 200
        assert (await worker.get("/readyz"))[0] == 503
        error, code, reason = await refused(worker, start_message())
        assert (code, reason) == (4029, "the worker is loading its model")
        release.set()
        await asyncio.wait_for(worker.runtime.wait_ready(), 30)
        assert (await worker.get("/readyz"))[0] == 200
        info = await worker.info()
        assert (info["model"], info["slots"], info["free"], info["state"]) == ("echo", SLOTS, SLOTS, "ready")


async def test_metrics_expose_the_documented_names():
    async with echo_worker(clocked=True) as worker:
        _, text = await worker.get("/metrics")
        for name in (
            "moshimoshi_worker_step_duration_seconds_bucket",
            "moshimoshi_worker_slots ",
            "moshimoshi_worker_slots_busy ",
            "moshimoshi_worker_input_dropped_total",
            "moshimoshi_worker_step_overruns_total",
        ):
            assert name in text, name
        assert await worker.metric("moshimoshi_worker_slots") == SLOTS
        ws, _ = await open_session(worker)
        assert await worker.metric("moshimoshi_worker_slots_busy") == 1
        await ws.close()


async def test_closing_while_loading_never_starts_the_clock():
    release = threading.Event()
    engines = []

    def slow_factory():
        release.wait(30)
        engines.append(EchoEngine(SLOTS, clocked=True))
        return engines[-1]

    async with running_worker(worker_settings(model="echo", slots=SLOTS), slow_factory, wait_ready=False) as worker:
        runtime = worker.runtime
        closing = asyncio.create_task(runtime.close())
        await asyncio.sleep(0)  # close() runs up to its wait for the thread
        assert runtime._closing.is_set()
        release.set()  # the model finishes loading after the worker began to close
        await asyncio.wait_for(closing, 30)
    assert runtime._thread_done.is_set()
    assert len(engines) == 1 and runtime._thread_clock is not None
    assert runtime._thread_clock.ticks == 0 and runtime.state == "stopped"
