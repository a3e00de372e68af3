"""Every call's recording written off the event loop: one writer thread, a bounded queue.

The event loop only queues (``RecordingHandle.audio`` copies nothing it does not own and
never waits). The writer thread resamples each channel to the recording's rate, places it
on the call clock (``timeline.py``), encodes (``encoders.py``) into a file in the storage's
spool directory, and at the call's end hands the finished file to the storage (a local
rename, or an upload in a thread of its own so a slow bucket never holds up live calls).

Memory is bounded: queued audio is at most ``max_queued_bytes``; beyond that a chunk is
dropped and counted (``moshimoshi_recording_dropped_seconds_total``; the timeline writes
silence in its place, so the recording keeps its length and alignment). Control messages
(open, pause, resume, finish) are never dropped. Recordings are personal data: nothing
here logs their content.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import threading
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.gateway.recording.encoders import EXTENSIONS, Encoder, open_encoder
from service.gateway.recording.storage import Storage
from service.gateway.recording.timeline import StereoTimeline

log = logging.getLogger(__name__)

RECORDING_RATE = 16000  # wideband: both sides' speech whole; Opus and WAV take it
MAX_QUEUED_BYTES = 64 * 1024 * 1024
UPLOAD_THREADS = 2


@dataclass
class RecordingResult:
    """A finished recording: where it is, or why it is not."""

    location: str | None
    bytes: int = 0
    duration_s: float = 0.0
    dropped_seconds: float = 0.0
    error: str | None = None


@dataclass
class _Job:
    """One call's recording, as the writer thread keeps it."""

    call_id: str
    fmt: str
    key: str
    path: Path
    timeline: StereoTimeline
    encoder: Encoder | None = None
    resamplers: dict[int, tuple[int, tp.Any]] = field(default_factory=dict)
    error: str | None = None
    dropped_samples: int = 0


class RecordingWriter:
    """The writer thread and its queue (see the module docstring)."""

    def __init__(
        self,
        storage: Storage,
        *,
        rate: int = RECORDING_RATE,
        max_queued_bytes: int = MAX_QUEUED_BYTES,
        on_dropped: tp.Callable[[float], None] | None = None,
    ) -> None:
        self.storage = storage
        self.rate = rate
        self.max_queued_bytes = max_queued_bytes
        self.on_dropped = on_dropped
        self._items: collections.deque[tuple[tp.Any, ...]] = collections.deque()
        self._queued_bytes = 0
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._uploads = concurrent.futures.ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="recording-upload")
        self._stopping = False
        self.written = 0
        self.failed = 0

    # -- the event loop's side ---------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="recording-writer", daemon=True)
            self._thread.start()

    def open(self, call_id: str, fmt: str, when: float) -> RecordingHandle:
        """A new recording of ``call_id`` in ``fmt`` (wav, ogg); ``when`` dates its key."""
        key = self.storage.key(call_id, EXTENSIONS[fmt], when)
        job = _Job(call_id, fmt, key, self.storage.spool / f"{call_id}.{EXTENSIONS[fmt]}", StereoTimeline(self.rate))
        self._put(("open", job))
        return RecordingHandle(self, job)

    def _put(self, item: tuple[tp.Any, ...], size: int = 0) -> bool:
        with self._lock:
            if size and self._queued_bytes + size > self.max_queued_bytes:
                return False
            self._items.append(item)
            self._queued_bytes += size
            self._lock.notify()
        return True

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    async def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (for up to ``timeout``), then stop the thread."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout)
        await asyncio.to_thread(self._uploads.shutdown, True)

    # -- the thread --------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._items and not self._stopping:
                    self._lock.wait()
                if not self._items:
                    return
                item = self._items.popleft()
                if item[0] == "audio":
                    self._queued_bytes -= item[5].nbytes
            try:
                self._handle(item)
            except Exception:  # one recording's failure must not stop the others
                job = item[1]
                log.exception("call %s: recording failed", job.call_id)
                self._fail(job, "the recording could not be written")

    def _handle(self, item: tuple[tp.Any, ...]) -> None:
        kind, job = item[0], item[1]
        if kind == "open":
            job.encoder = open_encoder(job.fmt, job.path, self.rate)
        elif job.error is not None:
            if kind == "finish":
                self._deliver(item[3], item[4], RecordingResult(None, error=job.error))
        elif kind == "audio":
            _, _, channel, t, rate, pcm, now = item
            samples = self._resample(job, channel, rate, pcm, t)
            before = job.timeline.dropped_samples
            job.timeline.add(channel, t, samples, len(pcm) / rate)
            job.dropped_samples += job.timeline.dropped_samples - before
            if now is not None:
                job.timeline.reached(now)
            self._write(job, job.timeline.blocks())
        elif kind == "pause":
            self._end_stretches(job)
            job.timeline.pause(item[2])
        elif kind == "resume":
            job.timeline.resume(item[2])
        elif kind == "finish":
            _, _, duration, loop, future = item
            self._end_stretches(job)
            self._write(job, job.timeline.finish(duration))
            assert job.encoder is not None
            job.encoder.close()
            job.encoder = None
            dropped = job.dropped_samples / self.rate
            self._uploads.submit(self._store, job, duration, dropped, loop, future)
        elif kind == "abort":
            self._discard(job)

    def _resample(self, job: _Job, channel: int, rate: int, pcm: np.ndarray, t: float) -> np.ndarray:
        """``pcm`` at the recording's rate. The resampler hands its output out in bursts (it
        holds back up to ~90 ms), which is harmless inside a stretch of contiguous audio:
        what it holds back is flushed into its place when the stretch ends (a gap, a pause,
        the end of the call)."""
        current = job.resamplers.get(channel)
        if current is not None and (current[0] != rate or not job.timeline.continues(channel, t)):
            self._end_stretch(job, channel)
            current = None
        if rate == self.rate:
            return pcm
        if current is None:
            import soxr

            current = (rate, soxr.ResampleStream(rate, self.rate, 1, dtype="int16", quality="HQ"))
            job.resamplers[channel] = current
        return tp.cast(np.ndarray, current[1].resample_chunk(pcm))

    def _end_stretch(self, job: _Job, channel: int) -> None:
        """What the channel's resampler still holds, to the end of its stretch."""
        current = job.resamplers.pop(channel, None)
        clock = job.timeline.channels[channel].clock
        if current is not None and clock is not None:
            tail = current[1].resample_chunk(np.zeros(0, dtype=np.int16), last=True)
            if len(tail):
                job.timeline.add(channel, clock, tail, 0.0)

    def _end_stretches(self, job: _Job) -> None:
        for channel in list(job.resamplers):
            self._end_stretch(job, channel)

    def _write(self, job: _Job, frames: np.ndarray) -> None:
        if len(frames) and job.encoder is not None:
            job.encoder.write(frames)

    def _store(
        self,
        job: _Job,
        duration: float,
        dropped: float,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[RecordingResult],
    ) -> None:
        try:
            stored = self.storage.put(job.path, job.key)
        except Exception as exc:
            log.error("call %s: the recording could not be stored: %s", job.call_id, type(exc).__name__)
            self.failed += 1
            with contextlib.suppress(FileNotFoundError):
                job.path.unlink()
            self._deliver(loop, future, RecordingResult(None, error=f"not stored: {type(exc).__name__}"))
            return
        self.written += 1
        self._deliver(
            loop, future, RecordingResult(stored.location, stored.bytes, round(duration, 3), round(dropped, 3))
        )

    def _fail(self, job: _Job, why: str) -> None:
        self.failed += 1
        job.error = why
        self._discard(job)

    def _discard(self, job: _Job) -> None:
        if job.encoder is not None:
            with contextlib.suppress(Exception):
                job.encoder.abort()
            job.encoder = None
        with contextlib.suppress(FileNotFoundError):
            job.path.unlink()

    @staticmethod
    def _deliver(
        loop: asyncio.AbstractEventLoop, future: asyncio.Future[RecordingResult], result: RecordingResult
    ) -> None:
        def settle() -> None:
            if not future.done():
                future.set_result(result)

        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle)


class RecordingHandle:
    """One call's recording, as the event loop drives it (every method returns at once)."""

    def __init__(self, writer: RecordingWriter, job: _Job) -> None:
        self.writer = writer
        self._job = job
        self.dropped_seconds = 0.0
        self._finished = False

    def audio(self, channel: int, t: float, pcm: np.ndarray, rate: int, now: float | None = None) -> bool:
        """``pcm`` (int16 at ``rate``; the writer owns it from now) for ``channel`` (0 caller,
        1 agent), its first sample at call time ``t``; ``now``: the call time it is handed
        over at (nothing past it is written before what comes next). False when dropped
        (queue full)."""
        if self._finished:
            return False
        if not self.writer._put(("audio", self._job, channel, t, rate, pcm, now), pcm.nbytes):
            seconds = len(pcm) / rate
            self.dropped_seconds += seconds
            if self.writer.on_dropped is not None:
                self.writer.on_dropped(seconds)
            return False
        return True

    def pause(self, t: float) -> None:
        self.writer._put(("pause", self._job, t))

    def resume(self, t: float) -> None:
        self.writer._put(("resume", self._job, t))

    def finish(self, duration: float) -> asyncio.Future[RecordingResult]:
        """End the recording at ``duration`` seconds of call; the future gets where it is."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[RecordingResult] = loop.create_future()
        self._finished = True
        self.writer._put(("finish", self._job, duration, loop, future))
        return future

    def abort(self) -> None:
        """Drop the recording (the call was never answered)."""
        self._finished = True
        self.writer._put(("abort", self._job))
