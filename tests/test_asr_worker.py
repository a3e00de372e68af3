"""The ASR worker: its session protocol (PROTOCOL.md), refusals, draining, and its place in
the pool; served in-process with the tiny random Whisper, and as a real process."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import typing as tp

import httpx
import numpy as np
import pytest
import websockets
from websockets.asyncio.client import connect

from service.asr.main import serve_asr
from service.asr.tinywhisper import build_whisper
from service.pool import ASR_ROLE, RegistryReader, SlotLeases
from service.pool import connect as pool_connect
from service.settings import AsrSettings
from tests.support.asr import AsrWorkerProcess
from tests.support.procs import worker_headers
from tests.support.speech import Speech, chunks, sentences_with_silences

SECOND = np.zeros(16000, dtype="<i2")


def audio_message(t: float, samples: np.ndarray) -> bytes:
    """A version-2 audio message: the call time of the first sample, then PCM16."""
    return np.float64(t).astype("<f8").tobytes() + np.asarray(samples).astype("<i2").tobytes()


@pytest.fixture(scope="module")
def speech() -> Speech:
    return sentences_with_silences(16000)


async def send_speech(ws, speech: Speech, *, at: float = 1.0, ms: int = 100) -> None:
    """The call's audio as the gateway streams it: ``ms`` per message, from call time ``at``."""
    for start, samples in chunks(speech.audio, speech.rate, ms):
        await ws.send(audio_message(at + start, samples * 32767))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_whisper(tmp_path_factory.mktemp("asr-model"))


def settings(model, **overrides: tp.Any) -> AsrSettings:
    values: dict[str, tp.Any] = {
        "model": str(model),
        "host": "127.0.0.1",
        "port": 0,
        "cpu_threads": 1,
        "log_level": "warning",
        "drain_grace_seconds": 30.0,
    }
    values.update(overrides)
    return AsrSettings(**values)


@contextlib.asynccontextmanager
async def asr_worker(config: AsrSettings) -> tp.AsyncIterator[str]:
    """An ASR worker served in this event loop; yields its http://127.0.0.1:port base."""
    listening: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve_asr(config, on_listening=listening.set_result))
    await asyncio.wait({task, listening}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        raise AssertionError(f"the ASR worker exited: {task.result()}")
    port = listening.result()
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient() as client:
        for _ in range(600):
            if (await client.get(base + "/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.05)
    try:
        yield base
    finally:
        if not task.done():
            with contextlib.suppress(httpx.HTTPError):  # a drained worker may be stopping already
                async with httpx.AsyncClient() as client:
                    await client.post(base + "/v1/drain")
        await asyncio.wait_for(task, 30)


def ws_url(base: str) -> str:
    return base.replace("http://", "ws://") + "/v1/asr"


async def events_until_close(ws) -> tuple[list[dict], int | None, str]:
    events = []
    with contextlib.suppress(websockets.ConnectionClosed):
        async for message in ws:
            events.append(json.loads(message))
    return events, ws.close_code, ws.close_reason


async def start(ws, **fields: tp.Any) -> dict:
    await ws.send(json.dumps({"type": "start", "version": 2, "call_id": "c-test", **fields}))
    return json.loads(await ws.recv())


@pytest.mark.system  # espeak-ng runs as a process
async def test_the_worker_cuts_the_callers_audio_into_utterances_on_the_call_clock(tiny_model, speech):
    """Three espeak-ng sentences streamed as a gateway does: three caller events whose times
    are the sentences' (±300 ms) on the call clock, text from the whole path; settled
    messages follow the conversation; ``end`` closes after the last answer."""
    async with asr_worker(settings(tiny_model)) as base, connect(ws_url(base)) as ws:
        started = await start(ws)
        assert started == {
            "type": "started",
            "version": 2,
            "model": str(tiny_model),
            "backend": "faster-whisper",
            "language": "ja",
            "sample_rate": 16000,
            "max_utterance_seconds": 20.0,
            "min_silence_ms": 400,
            "pad_ms": 200,
            "random_weights": True,
        }
        await send_speech(ws, speech, at=1.0)
        await ws.send(json.dumps({"type": "end"}))
        events, code, reason = await events_until_close(ws)
    assert (code, reason) == (1000, "done")
    callers = [e for e in events if e["type"] == "caller"]
    assert [e["id"] for e in callers] == [0, 1, 2]
    for event, (begin, end) in zip(callers, speech.spans, strict=True):
        assert abs(event["start"] - (1.0 + begin)) <= 0.3 and abs(event["end"] - (1.0 + end)) <= 0.3, event
        assert isinstance(event["text"], str) and event["text"]  # the random model's gibberish
    settled = [e["t"] for e in events if e["type"] == "settled"]
    assert settled == sorted(settled) and settled, events
    # nothing is settled while its utterance waits for text: each utterance's start comes
    # after every settled time sent before its answer
    for event in callers:
        before = [e["t"] for e in events[: events.index(event)] if e["type"] == "settled"]
        assert all(t <= event["start"] for t in before), (event, before)


@pytest.mark.system  # espeak-ng runs as a process
async def test_the_utterance_in_progress_at_the_end_is_answered(tiny_model, speech):
    """The call ends in the middle of the last sentence: ``end`` makes it an utterance."""
    async with asr_worker(settings(tiny_model)) as base, connect(ws_url(base)) as ws:
        await start(ws)
        cut = round((speech.spans[0][0] + 0.8) * 16000)
        await ws.send(audio_message(0.0, speech.audio[:cut] * 32767))
        await ws.send(json.dumps({"type": "end"}))
        events, code, _ = await events_until_close(ws)
    callers = [e for e in events if e["type"] == "caller"]
    assert code == 1000 and len(callers) == 1
    assert abs(callers[0]["start"] - speech.spans[0][0]) <= 0.3 and callers[0]["end"] <= cut / 16000 + 0.05


@pytest.mark.system  # espeak-ng runs as a process
async def test_the_vad_runs_the_calls_in_batches(tiny_model, speech):
    """Four calls at once: the VAD runs one window of each call per model run."""
    async with asr_worker(settings(tiny_model)) as base:
        sockets = [await connect(ws_url(base)).__aenter__() for _ in range(4)]
        try:
            for ws in sockets:
                await start(ws)
            for first, samples in chunks(speech.audio[: 16000 * 3], 16000, 100):
                for ws in sockets:
                    await ws.send(audio_message(first, samples * 32767))
            for ws in sockets:
                await ws.send(json.dumps({"type": "end"}))
            for ws in sockets:
                _, code, _ = await events_until_close(ws)
                assert code == 1000
        finally:
            for ws in sockets:
                await ws.close()
        async with httpx.AsyncClient() as client:
            metrics = (await client.get(base + "/metrics")).text
    count = float(
        next(
            line.split()[-1]
            for line in metrics.splitlines()
            if line.startswith("moshimoshi_asr_vad_batch_windows_count")
        )
    )
    total = float(
        next(
            line.split()[-1] for line in metrics.splitlines() if line.startswith("moshimoshi_asr_vad_batch_windows_sum")
        )
    )
    assert total >= 4 * 90  # 3 s of four calls: 4 x 93 windows
    assert total / count > 2.0  # most runs held several calls' windows


@pytest.mark.parametrize(
    ("messages", "code", "fragment"),
    [
        ([b"\x00\x00"], 4000, "audio before start"),
        (["not json"], 4000, "bad JSON"),
        ([{"type": "start", "version": 1, "call_id": "c"}], 4001, "version"),
        ([{"type": "start", "version": 2, "call_id": ""}], 4000, "call_id"),
        ([{"type": "start", "version": 2, "call_id": "c"}, b"\x00\x00\x00"], 4000, "audio message of 3 bytes"),
        (
            [{"type": "start", "version": 2, "call_id": "c"}, audio_message(0.0, SECOND[:3]) + b"\x00"],
            4000,
            "even count",
        ),
        (
            [{"type": "start", "version": 2, "call_id": "c"}, audio_message(float("nan"), SECOND[:160])],
            4000,
            "time must be",
        ),
        ([{"type": "start", "version": 2, "call_id": "c"}, audio_message(-1.0, SECOND[:160])], 4000, "time must be"),
        (
            [{"type": "start", "version": 2, "call_id": "c"}, {"type": "utterance", "id": 1, "start": 0, "end": 1}],
            4000,
            "unknown message type 'utterance'",
        ),
        (
            [{"type": "start", "version": 2, "call_id": "c"}, {"type": "start", "version": 2, "call_id": "c"}],
            4000,
            "duplicate start",
        ),
        ([{"type": "start", "version": 2, "call_id": "c"}, {"type": "hello"}], 4000, "unknown message type"),
    ],
    ids=[
        "audio-first",
        "bad-json",
        "version-1",
        "call-id",
        "short-audio",
        "odd-audio",
        "nan-time",
        "negative-time",
        "v1-utterance",
        "second-start",
        "unknown",
    ],
)
async def test_violations_close_the_session_with_a_clear_error(tiny_model, messages, code, fragment):
    async with asr_worker(settings(tiny_model)) as base:
        async with connect(ws_url(base)) as ws:
            for message in messages:
                await ws.send(message if isinstance(message, bytes | str) else json.dumps(message))
            events, close_code, _ = await events_until_close(ws)
        errors = [e for e in events if e["type"] == "error"]
        assert close_code == code and errors and errors[-1]["code"] == code
        assert fragment in errors[-1]["message"]
        async with httpx.AsyncClient() as client:  # the worker serves on
            assert (await client.get(base + "/v1/info")).json()["sessions"] == 0
            metrics = (await client.get(base + "/metrics")).text
        assert f'moshimoshi_asr_protocol_errors_total{{code="{code}"}} 1.0' in metrics


async def test_oversized_audio_is_refused(tiny_model):
    async with asr_worker(settings(tiny_model)) as base:
        async with connect(ws_url(base), max_size=None) as ws:
            await start(ws)
            await ws.send(audio_message(0.0, np.zeros(16000 * 2 + 2, "<i2")))  # over 2 s
            events, code, _ = await events_until_close(ws)
        assert code == 4000 and "64008 bytes" in events[-1]["message"]
        async with connect(ws_url(base), max_size=None) as ws:
            await start(ws)
            await ws.send(audio_message(0.0, np.zeros(16000 * 31, "<i2")))  # 31 s
            events, code, _ = await events_until_close(ws)
        assert code == 1009  # the WebSocket's own message limit


@pytest.mark.system  # espeak-ng runs as a process
async def test_sessions_beyond_max_sessions_are_refused_and_draining_takes_no_new_ones(tiny_model, speech):
    async with asr_worker(settings(tiny_model, max_sessions=1)) as base:
        async with connect(ws_url(base)) as first:
            assert (await start(first))["type"] == "started"
            async with connect(ws_url(base)) as second:
                await second.send(json.dumps({"type": "start", "version": 2, "call_id": "c2"}))
                events, code, _ = await events_until_close(second)
            assert code == 4029 and "sessions are in use" in events[0]["message"]
            async with httpx.AsyncClient() as client:
                assert (await client.post(base + "/v1/drain")).status_code == 202
                assert (await client.get(base + "/readyz")).status_code == 503
            async with connect(ws_url(base)) as late:
                await late.send(json.dumps({"type": "start", "version": 2, "call_id": "c3"}))
                events, code, _ = await events_until_close(late)
            assert code == 4029 and "draining" in events[0]["message"]
            # the session in progress goes on
            await send_speech(first, speech, at=0.0)
            await first.send(json.dumps({"type": "end"}))
            events, code, _ = await events_until_close(first)
            assert code == 1000 and [e["type"] for e in events if e["type"] != "settled"] == ["caller"] * 3


async def test_a_model_that_does_not_load_fails_the_worker(tmp_path):
    status = await asyncio.wait_for(serve_asr(settings(tmp_path / "nowhere")), 60)
    assert status == 2


@pytest.mark.system
async def test_the_asr_process_registers_as_an_asr_worker_that_no_call_is_routed_to(tmp_path, tiny_model, redis_server):
    worker = AsrWorkerProcess(tmp_path, tiny_model, worker_id="asr-1", redis_url=redis_server.url)
    try:
        await worker.wait_ready()
        async with pool_connect(redis_server.url) as client:
            await worker.wait_registered(client)
            [status] = await RegistryReader(client).workers()
            assert (status.role, status.capacity, status.sessions, status.url) == (ASR_ROLE, 0, 512, worker.url[:-7])
            assert await SlotLeases(client).claim(None) is None
            async with connect(worker.url, additional_headers=worker_headers()) as ws:
                assert (await start(ws))["type"] == "started"
                await asyncio.sleep(1.2)  # two heartbeats
                [status] = await RegistryReader(client).workers()
                assert status.reported_free == 511
        assert worker.proc.stop() in (0, -2, 130)
        async with pool_connect(redis_server.url) as client:
            assert await RegistryReader(client).workers() == []  # deregistered on a clean stop
        assert "RANDOM WEIGHTS" in worker.proc.log_path.read_text()
    finally:
        worker.stop()


def test_openai_backend_needs_its_url_and_model():
    from service.config import ConfigError, load

    with pytest.raises(ConfigError, match="OPENAI_BASE_URL"):
        load(AsrSettings, environ={"MOSHIMOSHI_ASR_BACKEND": "openai", "MOSHIMOSHI_ASR_MODEL": "m"})
    with pytest.raises(ConfigError, match="MOSHIMOSHI_ASR_MODEL"):
        load(AsrSettings, environ={"MOSHIMOSHI_ASR_BACKEND": "openai", "MOSHIMOSHI_ASR_OPENAI_BASE_URL": "http://x/v1"})
    loaded = load(
        AsrSettings,
        environ={
            "MOSHIMOSHI_ASR_BACKEND": "openai",
            "MOSHIMOSHI_ASR_MODEL": "whisper-1",
            "MOSHIMOSHI_ASR_OPENAI_BASE_URL": "http://x/v1",
            "MOSHIMOSHI_ASR_OPENAI_API_KEY": "s3cret",
        },
    )
    assert dataclasses.asdict(loaded)["openai_api_key"] == "s3cret"
