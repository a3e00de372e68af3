"""The gateway's side of the callers' transcript against real ``moshimoshi asr`` processes and
a real redis-server: Japanese speech (espeak-ng) streamed in, caller events on the call clock
out; no ASR worker, and an ASR worker killed mid-call."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.asr import client as client_module
from service.asr.client import RESUMED, UNAVAILABLE, AsrWorkerFinder, CallerEvent, CallerTranscriber
from service.asr.tinywhisper import build_whisper
from service.pool import RegistryReader
from service.pool import connect as pool_connect
from tests.support.asr import AsrWorkerProcess
from tests.support.polling import eventually
from tests.support.procs import WORKER_SECRET
from tests.support.speech import Speech, chunks, sentences_with_silences

pytestmark = pytest.mark.system

RATE, CHUNK_MS = 8000, 20  # what a G.711 call's tap gives: 20 ms packets at 8 kHz
ANSWERED_AT = 1.0  # the caller's audio starts 1 s into the call


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_whisper(tmp_path_factory.mktemp("asr-model"))


@pytest.fixture(scope="module")
def speech() -> Speech:
    return sentences_with_silences(RATE)


class Feeder:
    """Feeds a call's audio to a transcriber at a multiple of real time."""

    def __init__(self, transcriber: CallerTranscriber, speech: Speech, speed: float = 4.0) -> None:
        self.transcriber = transcriber
        self.pieces = chunks(speech.audio, speech.rate, CHUNK_MS)
        self.position = 0
        self.speed = speed

    async def until(self, t: float) -> None:
        """Feed the audio up to ``t`` seconds from its start."""
        while self.position < len(self.pieces) and self.pieces[self.position][0] < t:
            start, samples = self.pieces[self.position]
            self.transcriber.feed((samples * 32767).astype("<i2").tobytes(), ANSWERED_AT + start)
            self.position += 1
            await asyncio.sleep(CHUNK_MS / 1000 / self.speed)

    async def rest(self) -> None:
        await self.until(float("inf"))


def finder(client) -> AsrWorkerFinder:
    return AsrWorkerFinder(RegistryReader(client), secret=WORKER_SECRET)


def within(event: CallerEvent, span: tuple[float, float], tolerance: float = 0.3) -> bool:
    return (
        abs(event.start - (ANSWERED_AT + span[0])) <= tolerance
        and abs(event.end - (ANSWERED_AT + span[1])) <= tolerance
    )


async def test_three_sentences_become_three_caller_events_on_the_call_clock(tmp_path, tiny_model, speech, redis_server):
    worker = AsrWorkerProcess(tmp_path, tiny_model, worker_id="asr-1", redis_url=redis_server.url)
    try:
        await worker.wait_ready()
        async with pool_connect(redis_server.url) as client:
            await worker.wait_registered(client)
            events: list[CallerEvent] = []
            transcriber = CallerTranscriber("c-e2e", finder(client), events.append, rate=RATE)
            await Feeder(transcriber, speech).rest()
            # live: the first two sentences' text came while the call went on
            assert len([e for e in events if e.kind == "caller"]) >= 2
            await transcriber.close()
        assert [e.kind for e in events] == ["caller"] * 3, events
        for event, span in zip(events, speech.spans, strict=True):
            assert within(event, span), (event, span)
            assert event.text  # gibberish from the random model, but text through the whole path
        assert (transcriber.transcribed, transcriber.lost_seconds, transcriber.sessions) == (3, 0, 1)
    finally:
        worker.stop()


async def test_without_an_asr_worker_the_transcript_says_so_and_the_call_goes_on(
    tmp_path, tiny_model, speech, redis_server
):
    """No ASR worker when the call starts: a note says so; a worker that comes up within
    RETAIN_SECONDS gets the audio kept meanwhile, so nothing the caller said is lost."""
    async with pool_connect(redis_server.url) as client:
        events: list[CallerEvent] = []
        transcriber = CallerTranscriber("c-none", finder(client), events.append, rate=RATE)
        feeder = Feeder(transcriber, speech, speed=8.0)
        await feeder.until(speech.spans[1][1] + 0.7)  # two sentences, nobody to transcribe them
        await eventually(lambda: len(events) == 1, what="the note")
        assert [(e.kind, e.text) for e in events] == [("caller-note", f"{UNAVAILABLE} (no ASR worker)")]
        assert events[0].start == pytest.approx(ANSWERED_AT, abs=0.05)  # from the call's first audio

        worker = AsrWorkerProcess(tmp_path, tiny_model, worker_id="asr-late", redis_url=redis_server.url)
        try:
            await worker.wait_ready()
            await worker.wait_registered(client)
            await asyncio.sleep(1.1)  # the finder's cached registry is a second old at most
            await feeder.rest()
            await transcriber.close()
        finally:
            worker.stop()
    assert [(e.kind, e.text) for e in events[1:2]] == [("caller-note", RESUMED)]
    assert [e.kind for e in events[2:]] == ["caller"] * 3
    assert all(within(e, span) for e, span in zip(events[2:], speech.spans, strict=True))
    assert (transcriber.transcribed, transcriber.lost_seconds) == (3, 0)


async def test_audio_no_worker_heard_within_the_retention_is_lost_and_counted(
    tmp_path, tiny_model, speech, redis_server, monkeypatch
):
    monkeypatch.setattr(client_module, "RETAIN_SECONDS", 0.5)
    fed = speech.spans[1][1] + 0.9  # the silence after the second sentence: what is kept holds no speech
    async with pool_connect(redis_server.url) as client:
        events: list[CallerEvent] = []
        transcriber = CallerTranscriber("c-lost", finder(client), events.append, rate=RATE)
        feeder = Feeder(transcriber, speech, speed=8.0)
        await feeder.until(fed)
        worker = AsrWorkerProcess(tmp_path, tiny_model, worker_id="asr-late", redis_url=redis_server.url)
        try:
            await worker.wait_ready()
            await worker.wait_registered(client)
            await asyncio.sleep(1.1)  # the finder's cached registry is a second old at most
            await feeder.rest()
            await transcriber.close()
        finally:
            worker.stop()
    assert [e.kind for e in events] == ["caller-note", "caller-note", "caller"], events
    assert within(events[2], speech.spans[2])
    assert transcriber.lost_seconds == pytest.approx(fed - 0.5, abs=0.15)


async def test_an_asr_worker_killed_mid_call_is_replaced_for_later_utterances(
    tmp_path, tiny_model, speech, redis_server
):
    first = AsrWorkerProcess(tmp_path, tiny_model, worker_id="asr-a", redis_url=redis_server.url)
    second: AsrWorkerProcess | None = None
    try:
        await first.wait_ready()
        async with pool_connect(redis_server.url) as client:
            await first.wait_registered(client)
            events: list[CallerEvent] = []
            transcriber = CallerTranscriber("c-kill", finder(client), events.append, rate=RATE)
            feeder = Feeder(transcriber, speech)
            await feeder.until(speech.spans[0][1] + 0.7)
            await eventually(lambda: transcriber.transcribed == 1, what="the first sentence transcribed")
            assert transcriber.worker_id == "asr-a"

            first.proc.kill9()  # mid-call
            await feeder.until(speech.spans[1][1] + 0.7)  # the second sentence finds no ASR worker
            await eventually(lambda: len(events) == 2, what="the note")

            second = AsrWorkerProcess(tmp_path, tiny_model, worker_id="asr-b", redis_url=redis_server.url)
            await second.wait_ready()
            await second.wait_registered(client)
            await asyncio.sleep(1.1)
            await feeder.rest()
            await eventually(lambda: transcriber.transcribed == 3, what="the later sentences transcribed")
            assert transcriber.worker_id == "asr-b"
            await transcriber.close()
    finally:
        first.stop()
        if second is not None:
            second.stop()
    assert [e.kind for e in events] == ["caller", "caller-note", "caller-note", "caller", "caller"], events
    assert within(events[0], speech.spans[0]) and within(events[3], speech.spans[1])
    assert within(events[4], speech.spans[2])
    assert events[1].text.startswith(UNAVAILABLE) and events[2].text == RESUMED
    assert speech.spans[0][1] + ANSWERED_AT < events[1].start <= speech.spans[1][1] + ANSWERED_AT + 0.8
    assert transcriber.sessions == 2 and transcriber.lost_seconds == 0


async def test_an_utterance_in_flight_when_its_worker_dies_goes_to_the_next_worker(
    tmp_path, tiny_model, speech, redis_server
):
    """Two ASR workers; the one serving the call is killed while an utterance waits for its
    text: the audio it had not settled goes to the other, and no text is lost or repeated."""
    slow = AsrWorkerProcess(
        tmp_path, tiny_model, worker_id="asr-0-slow", redis_url=redis_server.url, extra=["--batch-wait-ms", "2000"]
    )  # holds each utterance 2 s before its batch
    spare = AsrWorkerProcess(tmp_path, tiny_model, worker_id="asr-1-spare", redis_url=redis_server.url)
    try:
        await asyncio.gather(slow.wait_ready(), spare.wait_ready())
        async with pool_connect(redis_server.url) as client:
            await slow.wait_registered(client)
            await spare.wait_registered(client)
            events: list[CallerEvent] = []
            transcriber = CallerTranscriber("c-retry", finder(client), events.append, rate=RATE)
            feeder = Feeder(transcriber, speech)
            await feeder.until(speech.spans[0][1] + 0.7)
            await asyncio.sleep(0.3)  # the worker's VAD has ended the utterance: it waits for its batch
            assert transcriber.worker_id == "asr-0-slow"  # ties go to the smallest id
            assert transcriber.transcribed == 0
            slow.proc.kill9()
            await feeder.rest()
            await transcriber.close()
    finally:
        slow.stop()
        spare.stop()
    callers = [e for e in events if e.kind == "caller"]
    assert len(callers) == 3, events
    assert all(within(e, span) for e, span in zip(callers, speech.spans, strict=True))
    assert (transcriber.transcribed, transcriber.lost_seconds, transcriber.sessions) == (3, 0, 2)


async def test_a_fixed_url_finder_and_a_worker_that_refuses(tmp_path, tiny_model, speech):
    """No pool: one configured ASR worker; a full worker (4029): the call's audio is lost, counted."""
    worker = AsrWorkerProcess(tmp_path, tiny_model, worker_id="asr-fixed", extra=["--max-sessions", "1"])
    try:
        await worker.wait_ready()
        events: list[CallerEvent] = []
        first = CallerTranscriber(
            "c-1", AsrWorkerFinder(url=worker.url, secret=WORKER_SECRET), events.append, rate=RATE
        )
        await Feeder(first, speech, speed=8.0).until(speech.spans[0][1] + 0.7)
        await eventually(lambda: first.transcribed == 1, what="the first call's sentence transcribed")
        refused: list[CallerEvent] = []
        second = CallerTranscriber(
            "c-2", AsrWorkerFinder(url=worker.url, secret=WORKER_SECRET), refused.append, rate=RATE
        )
        await Feeder(second, speech, speed=8.0).until(speech.spans[0][1] + 0.7)
        await eventually(lambda: len(refused) == 1, what="the second call's note")
        await first.close()
        await second.close(timeout=1.0)
    finally:
        worker.stop()
    assert [e.kind for e in events] == ["caller"]
    assert [e.kind for e in refused] == ["caller-note"] and refused[0].text.startswith(UNAVAILABLE)
    assert second.lost_seconds == pytest.approx(speech.spans[0][1] + 0.7, abs=0.2)


def test_caller_events_serialise_rounded():
    event = CallerEvent("caller", 1.23456, 2.5, "はい")
    assert event.to_dict() == {"kind": "caller", "start": 1.235, "end": 2.5, "text": "はい"}
    assert np.isfinite(event.start)


async def test_a_server_that_is_not_an_asr_worker_loses_nothing_silently(speech):
    """A WebSocket server that answers the start with something else: the audio is lost and
    counted, the call's transcript says so, and the transcriber keeps working."""
    from websockets.asyncio.server import serve

    async def impostor(ws) -> None:
        await ws.recv()
        await ws.send("hello, I am a chat server")
        await ws.wait_closed()

    async with serve(impostor, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        events: list[CallerEvent] = []
        transcriber = CallerTranscriber(
            "c-impostor", AsrWorkerFinder(url=f"ws://127.0.0.1:{port}"), events.append, rate=RATE
        )
        feeder = Feeder(transcriber, speech, speed=8.0)
        await feeder.until(speech.spans[0][1] + 0.7)
        await eventually(lambda: len(events) == 1, what="the note")
        await feeder.rest()
        await transcriber.close(timeout=1.0)
    assert transcriber.transcribed == 0 and not transcriber._task.exception()
    assert transcriber.lost_seconds == pytest.approx(len(speech.audio) / RATE, abs=0.1)
    assert [e.kind for e in events] == ["caller-note"] and events[0].text.startswith(UNAVAILABLE)
