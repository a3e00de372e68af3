"""The ASR worker's batching queue: utterances of every call, transcribed in batches.

``submit(audio)`` queues one utterance and returns its ``Transcription`` when its batch is
done. One runner forms batches: it waits for a first utterance, then up to ``max_wait``
seconds for more, and runs at most ``max_batch`` at once through the backend; utterances
that arrive meanwhile form the next batch. The queue holds at most ``max_queue``
utterances: beyond that ``submit`` answers at once with an error (counted), so a flood of
calls slows no one's answer past what the backend can do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from service.asr.backends import Backend, Transcription
from service.asr.metrics import AsrMetrics

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """The queue is full."""


@dataclass
class _Item:
    audio: np.ndarray
    future: asyncio.Future[Transcription]
    queued_at: float = field(default_factory=time.monotonic)


class UtteranceBatcher:
    """Collects up to ``max_batch`` utterances or ``max_wait`` seconds, then runs one batch."""

    def __init__(
        self,
        backend: Backend,
        *,
        max_batch: int = 8,
        max_wait: float = 0.02,
        max_queue: int = 256,
        metrics: AsrMetrics | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < max_batch or max_wait < 0:
            raise ValueError("need max_batch >= 1, max_queue >= max_batch and max_wait >= 0")
        self.backend = backend
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.max_queue = max_queue
        self.metrics = metrics or AsrMetrics()
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self.batches = 0

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="asr-batcher")

    async def submit(self, audio: np.ndarray) -> Transcription:
        """The utterance's transcription (an error Transcription when the backend failed).
        Raises Overloaded when the queue is full."""
        if self._queue.qsize() >= self.max_queue:
            self.metrics.utterances.labels("overloaded").inc()
            raise Overloaded(f"{self.max_queue} utterances waiting")
        item = _Item(audio, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(item)
        self.metrics.queue.set(self._queue.qsize())
        return await asyncio.shield(item.future)

    async def _collect(self) -> list[_Item]:
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                while len(batch) < self.max_batch and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            self.metrics.queue.set(self._queue.qsize())
            started = time.monotonic()
            try:
                results = await self.backend.transcribe([item.audio for item in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"backend returned {len(results)} results for {len(batch)}")
            except asyncio.CancelledError:
                for item in batch:
                    if not item.future.done():
                        item.future.cancel()
                raise
            except Exception as exc:  # the backend failed the whole batch: each gets the error
                log.error("ASR batch of %d failed: %s: %s", len(batch), type(exc).__name__, exc)
                results = [Transcription(error=f"ASR backend failed: {type(exc).__name__}")] * len(batch)
            elapsed = time.monotonic() - started
            audio_seconds = sum(len(item.audio) for item in batch) / 16000
            self.batches += 1
            self.metrics.batch_seconds.observe(elapsed)
            self.metrics.batch_size.observe(len(batch))
            if audio_seconds > 0:
                self.metrics.real_time_factor.observe(elapsed / audio_seconds)
            for item, result in zip(batch, results, strict=True):
                self.metrics.utterances.labels("failed" if result.error else "ok").inc()
                self.metrics.wait_seconds.observe(started - item.queued_at)
                if not item.future.done():
                    item.future.set_result(result)

    async def close(self) -> None:
        """Stop the runner; utterances still queued are answered with an error."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.set_result(Transcription(error="ASR worker stopping"))
