"""One call's recording: its taps into the recording writer, pauses, and its end.

Attached at the answer when the call's policy records it: the ``caller`` tap (the caller
as the model heard it, after concealment) is the left channel, the ``agent`` tap (the
model's frames as they go to the caller's pacer, the consent announcement included) the
right. Chunks are gathered per channel into half-second batches (fewer queue items for the
writer thread) and stamped on the call clock. A pause detaches both taps (the paused audio
never reaches memory beyond the jitter buffer) and tells the writer to write silence from
that time on; resuming attaches them again. The record's ``recording`` field says where it
stands: ``recording``, ``paused``, ``storing``, then ``stored`` (with its location, size
and duration) or ``failed``.
"""

from __future__ import annotations

import asyncio
import time
import typing as tp

import numpy as np

from service.gateway.media.pipeline import CallerAudio
from service.gateway.recording.timeline import LEFT, RIGHT
from service.gateway.recording.writer import RecordingHandle, RecordingResult, RecordingWriter
from service.wire import SAMPLE_RATE as MODEL_RATE

if tp.TYPE_CHECKING:
    from service.gateway.calls.call import Call

BATCH_SECONDS = 0.5
CONTIGUOUS_SECONDS = 0.05  # a chunk this far from where the batch ends starts a new batch


class _Batch:
    """One channel's chunks on their way to the writer."""

    __slots__ = ("chunks", "samples", "t", "rate")

    def __init__(self) -> None:
        self.chunks: list[np.ndarray] = []
        self.samples = 0
        self.t = 0.0
        self.rate = 0

    def fits(self, t: float, rate: int) -> bool:
        return not self.chunks or (rate == self.rate and abs(t - (self.t + self.samples / rate)) <= CONTIGUOUS_SECONDS)

    def add(self, t: float, pcm: np.ndarray, rate: int) -> None:
        if not self.chunks:
            self.t, self.rate = t, rate
        self.chunks.append(pcm)
        self.samples += len(pcm)

    def take(self) -> tuple[float, np.ndarray, int]:
        pcm = np.concatenate(self.chunks) if len(self.chunks) > 1 else self.chunks[0].copy()
        out = (self.t, pcm, self.rate)
        self.chunks, self.samples = [], 0
        return out


class CallRecording:
    """Records one call (see the module docstring)."""

    def __init__(self, call: Call, writer: RecordingWriter, fmt: str) -> None:
        self.call = call
        self.fmt = fmt
        self.handle: RecordingHandle = writer.open(call.id, fmt, time.time())
        self.pauses: list[list[float | None]] = []
        self.held = False  # silent to the end (``hold``): a resume does not undo it
        self._batches = (_Batch(), _Batch())
        self._detach: list[tp.Callable[[], None]] = []
        self.result: RecordingResult | None = None
        self.done: asyncio.Future[RecordingResult] | None = None
        call.record.recording = {"format": fmt, "state": "recording", "pauses": []}
        self._attach()

    @property
    def paused(self) -> bool:
        return bool(self.pauses) and self.pauses[-1][1] is None

    # -- taps (media path: return at once) ---------------------------------------------

    def _attach(self) -> None:
        taps = self.call.pipeline.taps
        self._detach = [taps.caller.attach(self._on_caller), taps.agent.attach(self._on_agent)]

    def _detach_taps(self) -> None:
        for detach in self._detach:
            detach()
        self._detach = []

    def _on_caller(self, audio: CallerAudio) -> None:
        # the chunk was just played out to the model: it ends now on the call clock
        self._add(LEFT, self.call.call_seconds - len(audio.pcm) / audio.rate, audio.pcm, audio.rate)

    def _on_agent(self, frame: bytes) -> None:
        # the frame goes to the pacer now: it starts playing now (plus the pacer's cushion)
        self._add(RIGHT, self.call.call_seconds, np.frombuffer(frame, dtype="<i2"), MODEL_RATE)

    def _add(self, channel: int, t: float, pcm: np.ndarray, rate: int) -> None:
        batch = self._batches[channel]
        if not batch.fits(t, rate):
            self._flush(channel)
        batch.add(t, pcm, rate)
        if batch.samples >= BATCH_SECONDS * rate:
            self._flush(channel)

    def _flush(self, channel: int) -> None:
        batch = self._batches[channel]
        if batch.chunks:
            t, pcm, rate = batch.take()
            self.handle.audio(channel, t, pcm, rate, now=self.call.call_seconds)

    def _flush_all(self) -> None:
        self._flush(LEFT)
        self._flush(RIGHT)

    # -- compliance --------------------------------------------------------------------

    def pause(self, t: float) -> None:
        """Silence from call time ``t`` (now) on, until ``resume``."""
        if self.paused or self.done is not None:
            return
        self._flush_all()
        self._detach_taps()
        self.handle.pause(t)
        self.pauses.append([t, None])
        self._update("paused")

    def hold(self, t: float) -> None:
        """Silence from call time ``t`` to the end, with no resume (a transferred call's
        part with a person, where the route keeps it out of the recording)."""
        self.pause(t)
        self.held = True

    def resume(self, t: float) -> None:
        """Record again from call time ``t`` (now)."""
        if not self.paused or self.done is not None or self.held:
            return
        self.handle.resume(t)
        self.pauses[-1][1] = t
        self._attach()
        self._update("recording")

    def _update(self, state: str) -> None:
        recording = dict(self.call.record.recording or {})
        recording["state"] = state
        recording["pauses"] = [
            {"start": round(tp.cast(float, start), 3), "end": None if end is None else round(end, 3)}
            for start, end in self.pauses
        ]
        self.call.record.recording = recording

    # -- the end -----------------------------------------------------------------------

    def finish(self, duration: float) -> asyncio.Future[RecordingResult]:
        """The call ended after ``duration`` seconds: close the file and store it."""
        self._detach_taps()
        self._flush_all()
        if self.paused:
            self.pauses[-1][1] = duration
        self._update("storing")
        self.done = self.handle.finish(duration)
        return self.done

    def stored(self, result: RecordingResult) -> None:
        """The writer's answer: the record says where the recording is (or why it is not)."""
        self.result = result
        recording = dict(self.call.record.recording or {})
        if result.location is None:
            recording.update(state="failed", error=result.error or "not stored")
        else:
            recording.update(
                state="stored",
                location=result.location,
                bytes=result.bytes,
                duration_s=result.duration_s,
                dropped_s=round(result.dropped_seconds + self.handle.dropped_seconds, 3),
            )
        self.call.record.recording = recording

    def abort(self) -> None:
        self._detach_taps()
        self.handle.abort()
