"""Concurrent calls on one worker running the tiny model, over real WebSockets.

Each session's audio and transcript must equal its single-stream reference: the same
checkpoint stepped alone, in the same slot of an engine of the same batch size, greedy, on
as many torch threads. (Same batch size and threads: see tests/test_worker_engine.py for
why a batch of 1 differs in the last float bits on CPU; the thread count splits GEMMs too.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import typing as tp

import numpy as np
import pytest
import torch
from websockets.asyncio.client import connect

from service.worker.checkpoint import load_checkpoint
from service.worker.engine import MoshiEngine
from service.worker.engine_api import float_to_pcm16, pcm16_to_float
from service.worker.text import TextStream, skipped_ids
from service.worker.tinymodel import build_tiny_checkpoint
from tests.support.worker import collect, pcm_frames, running_worker, start_message, worker_settings

SLOTS = 4
FRAMES = 25  # 2 s of caller audio per session
THREADS = 1


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0)


@contextlib.contextmanager
def torch_threads(count: int) -> tp.Iterator[None]:
    """Run with the worker's thread count: float results depend on how GEMMs are split."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def reference(path, slot: int, frames: list[bytes]) -> tuple[list[bytes], list[dict]]:
    """The session's output when its stream runs alone in ``slot`` of a fresh engine."""
    with torch_threads(THREADS):
        return _reference(path, slot, frames)


def _reference(path, slot: int, frames: list[bytes]) -> tuple[list[bytes], list[dict]]:
    loaded = load_checkpoint(str(path), device="cpu")
    engine = MoshiEngine(loaded, SLOTS, greedy=True)
    text = TextStream(loaded.tokenizer, skipped_ids(loaded.tokenizer, loaded.text_padding_ids))
    active = np.zeros(SLOTS, dtype=bool)
    active[slot] = True
    audio, events = [], []
    for step, frame in enumerate(frames):
        inputs = np.zeros((SLOTS, 1920), dtype=np.float32)
        inputs[slot] = pcm16_to_float(frame)
        out = engine.step(inputs, active, active if step == 0 else np.zeros(SLOTS, dtype=bool))
        audio.append(float_to_pcm16(out.pcm[slot]))
        piece = text.push(int(out.text_tokens[slot]), step)
        if piece is not None:
            events.append({"type": "text", "text": piece.text, "t": piece.t})
    return audio, events


async def call(url: str, frames: list[bytes], bound: asyncio.Event, go: asyncio.Event, call_id: str):
    async with connect(url) as ws:
        await ws.send(start_message(call_id=call_id))
        started = json.loads(await ws.recv())
        bound.set()
        await go.wait()  # every session is bound before any audio flows
        for frame in frames:  # a burst: the slot's queue holds it all
            await ws.send(frame)
        audio, events = [], []
        # Each step sends its audio, then its text: read one frame past the input to have
        # the last input step's text too.
        while len(audio) <= len(frames):
            message = await ws.recv()
            if isinstance(message, bytes):
                audio.append(message)
            else:
                events.append(json.loads(message))
        await ws.send(json.dumps({"type": "stop"}))
        rest = await collect(ws)
    last = (len(frames) - 1) * 0.08 + 1e-6
    return started, audio[: len(frames)], [e for e in events if e["t"] <= last], rest


async def test_concurrent_sessions_are_independent(tiny_dir):
    settings = worker_settings(
        model=str(tiny_dir), slots=SLOTS, greedy=True, input_queue_frames=64, cpu_threads=THREADS
    )
    inputs = {f"call-{i}": pcm_frames(100 + i, FRAMES, amplitude=0.05 * (i + 1)) for i in range(3)}
    async with running_worker(settings) as worker:
        go = asyncio.Event()
        bound = [asyncio.Event() for _ in inputs]
        tasks = [
            asyncio.create_task(call(worker.url, frames, flag, go, call_id))
            for (call_id, frames), flag in zip(inputs.items(), bound, strict=True)
        ]
        await asyncio.wait_for(asyncio.gather(*(flag.wait() for flag in bound)), 60)
        assert (await worker.info())["busy"] == len(tasks)
        go.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 120)
        await worker.wait_free(SLOTS)
        assert await worker.metric("moshimoshi_worker_input_dropped_total") == 0

    slots = sorted(started["slot"] for started, *_ in results)
    assert slots == [0, 1, 2]
    outputs = []
    for (call_id, frames), (started, audio, events, rest) in zip(inputs.items(), results, strict=True):
        assert started["model"] == str(tiny_dir)
        assert rest.close_code == 1000
        expected_audio, expected_events = reference(tiny_dir, started["slot"], frames)
        assert audio == expected_audio, call_id
        assert events == expected_events, call_id
        assert len(events) > 0  # the tiny model babbles: there is text to compare
        outputs.append(audio)
    # Different callers, different answers (the comparison above is not vacuous).
    assert outputs[0] != outputs[1] != outputs[2]


async def test_a_call_runs_past_the_context_until_max_call_seconds(tmp_path):
    """Context 20 steps (1.6 s); the call goes on past it and ends cleanly at 3 s."""
    path = build_tiny_checkpoint(tmp_path / "short", seed=3, context=20)
    settings = worker_settings(model=str(path), slots=2, greedy=True, input_queue_frames=64, max_call_seconds=3.0)
    async with running_worker(settings) as worker:
        async with connect(worker.url) as ws:
            await ws.send(start_message(call_id="long"))
            started = json.loads(await ws.recv())
            assert started["context_seconds"] == 1.6
            for frame in pcm_frames(9, 45):
                await ws.send(frame)
            result = await collect(ws, started=started)
        assert len(result.frames) == round(3.0 / 0.08)
        assert any(np.frombuffer(frame, "<i2").any() for frame in result.frames[-5:])
        assert result.events[-1] == {"type": "end", "reason": "max_duration"}
        assert all(e["type"] == "text" for e in result.events[:-1])
        assert (result.close_code, result.close_reason) == (1000, "max_duration")
        await worker.wait_free(2)
