"""The ASR worker's voice activity detection: every call's audio through one batched Silero VAD.

Each session (a call) hands its audio to ``feed``; one runner takes what every session
sent since its last turn (a turn starts ``GATHER_SECONDS`` after audio arrives: calls send
their audio at different moments, and a turn should hold many), pushes it into each call's
segmenter, runs the pending 32 ms
windows of all calls together (one model run per round holds one window of each call:
far cheaper than a run per call), then lets each segmenter step through its probabilities
and hands the utterances that ended to the session (``on_vad``). All segmenter work happens in the
runner's turn (the model runs in a thread meanwhile, so the event loop never waits on it;
sessions only append to their inbox), so no state is shared between threads.

A session's inbox holds at most ``MAX_INBOX_SECONDS`` of audio: when the runner falls that
far behind, the oldest audio is dropped (counted; the segmenter's clock fills the gap with
silence).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
import typing as tp

import numpy as np

from service.asr.segmenter import SegmenterConfig, Utterance, UtteranceSegmenter
from service.asr.vad import SAMPLE_RATE, SileroVad, VadStream, batch_inputs, commit_batch

log = logging.getLogger(__name__)

MAX_INBOX_SECONDS = 10.0
MAX_BATCH = 512  # windows per model run
GATHER_SECONDS = 0.04  # a turn waits this long after audio arrives, so that it holds many calls' audio


class VadClient(tp.Protocol):
    """A session as the batcher sees it."""

    def on_vad(self, utterances: list[Utterance], *, final: bool) -> None:
        """After each turn that took this session's audio: the utterances that ended (often
        none); ``final``: the stream's end was reached, this is the last call."""


class _Stream:
    """One session's audio on its way through the VAD."""

    __slots__ = ("client", "segmenter", "inbox", "inbox_samples", "ending", "finished")

    def __init__(self, client: VadClient, segmenter: UtteranceSegmenter) -> None:
        self.client = client
        self.segmenter = segmenter
        self.inbox: collections.deque[tuple[np.ndarray, float]] = collections.deque()
        self.inbox_samples = 0
        self.ending = False
        self.finished = False


class VadBatcher:
    """Runs the VAD of every session of one ASR worker (see the module docstring)."""

    def __init__(
        self,
        model: SileroVad,
        *,
        config: SegmenterConfig | None = None,
        max_batch: int = MAX_BATCH,
        gather: float = GATHER_SECONDS,
        on_dropped: tp.Callable[[float], None] | None = None,
        on_round: tp.Callable[[int], None] | None = None,
        on_cpu: tp.Callable[[float], None] | None = None,
    ) -> None:
        self.model = model
        self.config = config or SegmenterConfig()
        self.max_batch = max_batch
        self.gather = gather
        self.on_dropped = on_dropped  # seconds of audio dropped from an inbox
        self.on_round = on_round  # the windows of each model run
        self.on_cpu = on_cpu  # CPU seconds the VAD's thread spent, after each turn
        self._streams: dict[int, _Stream] = {}
        self._dirty: dict[int, _Stream] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="asr-vad")
        self.windows = 0
        self.runs = 0
        self.cpu_seconds = 0.0  # the model's thread time

    # -- sessions (on the event loop; never block) -------------------------------------

    def open(self, client: VadClient) -> None:
        self._streams[id(client)] = _Stream(client, UtteranceSegmenter(SAMPLE_RATE, self.config, self.model))

    def segmenter(self, client: VadClient) -> UtteranceSegmenter:
        return self._streams[id(client)].segmenter

    def feed(self, client: VadClient, samples: np.ndarray, t: float) -> None:
        """16 kHz float32 audio whose first sample is at call time ``t``."""
        stream = self._streams.get(id(client))
        if stream is None or stream.ending:
            return
        stream.inbox.append((samples, t))
        stream.inbox_samples += len(samples)
        limit = int(MAX_INBOX_SECONDS * SAMPLE_RATE)
        while stream.inbox_samples > limit and len(stream.inbox) > 1:
            dropped, _ = stream.inbox.popleft()
            stream.inbox_samples -= len(dropped)
            if self.on_dropped is not None:
                self.on_dropped(len(dropped) / SAMPLE_RATE)
        self._mark(stream)

    def finish(self, client: VadClient) -> None:
        """No more audio: the utterance in progress ends; ``on_utterances(final=True)`` follows."""
        stream = self._streams.get(id(client))
        if stream is not None and not stream.ending:
            stream.ending = True
            self._mark(stream)

    def close(self, client: VadClient) -> None:
        """Forget the session (whatever it had pending)."""
        stream = self._streams.pop(id(client), None)
        if stream is not None:
            stream.finished = True
            self._dirty.pop(id(client), None)

    def _mark(self, stream: _Stream) -> None:
        self._dirty[id(stream.client)] = stream
        self._wake.set()

    # -- the runner --------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="asr-vad")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            if self.gather:
                await asyncio.sleep(self.gather)
            self._wake.clear()
            turn, self._dirty = list(self._dirty.values()), {}
            delivered: list[tuple[_Stream, list[Utterance]]] = []
            for stream in turn:
                delivered.append((stream, self._ingest(stream)))
            vads = [stream.segmenter.vad for stream in turn if stream.segmenter.vad.pending]
            if vads:
                await loop.run_in_executor(self._executor, self._rounds, vads)
            for stream, early in delivered:
                if stream.finished:
                    continue
                try:
                    utterances = early + stream.segmenter.advance()
                    final = stream.ending and not stream.inbox
                    if final:
                        utterances += stream.segmenter.flush()
                        stream.finished = True
                    stream.client.on_vad(utterances, final=final)
                except Exception:  # one session's bug must not stop every call's VAD
                    log.exception("VAD of a session failed")

    def _ingest(self, stream: _Stream) -> list[Utterance]:
        done: list[Utterance] = []
        while stream.inbox:
            samples, t = stream.inbox.popleft()
            stream.inbox_samples -= len(samples)
            done += stream.segmenter.push(samples, t)
        return done

    def _rounds(self, vads: list[VadStream]) -> None:
        """Every pending window of these streams, one window of each stream per model run
        (in the VAD thread; the runner waits, so nothing else touches these streams)."""
        started = time.thread_time()
        while vads:
            for first in range(0, len(vads), self.max_batch):
                batch = vads[first : first + self.max_batch]
                windows, states = batch_inputs(batch)
                probabilities, new_states = self.model.run(windows, states)
                commit_batch(batch, probabilities, new_states)
                self.windows += len(batch)
                self.runs += 1
                if self.on_round is not None:
                    self.on_round(len(batch))
            vads = [vad for vad in vads if vad.pending]
        spent = time.thread_time() - started
        self.cpu_seconds += spent
        if self.on_cpu is not None:
            self.on_cpu(spent)
