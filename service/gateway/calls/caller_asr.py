"""The caller's transcript of one call: the ``caller`` tap streamed to an ASR worker.

A subscriber of the call's ``caller`` tap (attached at the answer) hands each chunk, with
its time on the call clock, to a ``service.asr.client.CallerTranscriber``, which
resamples to 16 kHz and queues it for its own task: the media path never waits. The
worker's answers become transcript pieces of kind ``caller`` (``t`` where the utterance
began, ``end`` where it ended), and its notes (no ASR worker, one lost, back again) pieces
of kind ``note``. During a compliance pause the audio is not sent. Nothing here logs what
the caller said.
"""

from __future__ import annotations

import typing as tp

from service.asr.client import CallerEvent, CallerTranscriber, WorkerPicker
from service.gateway.calls.transcript import CALLER, NOTE, TranscriptEvent
from service.gateway.media.pipeline import CallerAudio

if tp.TYPE_CHECKING:
    from service.gateway.calls.call import Call

CLOSE_SECONDS = 5.0  # at the end of a call, the last utterance's text may take this long


class CallerAsr:
    """Streams one call's caller audio to an ASR worker; its text into the call's transcript."""

    def __init__(self, call: Call, finder: WorkerPicker) -> None:
        self.call = call
        self.finder = finder
        self.transcriber: CallerTranscriber | None = None  # made with the first chunk (its rate)
        self._retired: list[CallerTranscriber] = []
        self._detach = call.pipeline.taps.caller.attach(self._on_audio)

    def _on_audio(self, audio: CallerAudio) -> None:
        if self.call.capture_paused:  # a compliance pause: this audio goes to no ASR worker
            return
        transcriber = self.transcriber
        if transcriber is None or transcriber.rate != audio.rate:
            if transcriber is not None:  # the edge's rate changed (a new codec): a new stream
                self._retired.append(transcriber)
            transcriber = self.transcriber = CallerTranscriber(
                self.call.id, self.finder, self._on_event, rate=audio.rate, clock=lambda: self.call.call_seconds
            )
        # the chunk just played out: it ends now on the call clock
        transcriber.feed(audio.pcm, max(0.0, self.call.call_seconds - len(audio.pcm) / audio.rate))

    def _on_event(self, event: CallerEvent) -> None:
        if event.kind == "caller":
            self.call.add_transcript(TranscriptEvent(t=event.start, kind=CALLER, text=event.text, end=event.end))
        else:
            self.call.add_transcript(TranscriptEvent(t=event.start, kind=NOTE, text=event.text))

    async def close(self) -> None:
        """The call ended: the last utterance's text, then stop (within ``CLOSE_SECONDS``)."""
        self._detach()
        for transcriber in [*self._retired, *([self.transcriber] if self.transcriber is not None else [])]:
            await transcriber.close(CLOSE_SECONDS)
