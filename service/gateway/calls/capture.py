"""What a call's record captures beyond the agent's words: the caller's words, the recording,
the consent announcement, DTMF as the policy says. The lifecycle calls in at each step::

    begin     (the call's route chosen) its policy; the consent announcement queued on the
              pipeline
    answered  the caller's transcript (caller tap → ASR worker) and the recording
              (caller + agent taps → recording writer) start, on the call clock from now
    end       (media stopped, slot released) the caller's last words are awaited; the
              recording closes at the call's duration and goes to storage
    stored    (after the call's end) the record says where the recording is

Each piece is optional and independent: no ASR worker, or a recording that cannot be
stored, never affects the call. Pause and resume (PCI DSS: a card number read out must not
be kept) stop everything that stores the call for the paused span: the recording is
silence over it, the caller's audio goes to no ASR worker, the agent's words are left out
of the transcript and DTMF digits are masked even where the route keeps them in clear; the
transcript marks the span.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import typing as tp

from service.asr.client import WorkerPicker
from service.gateway.calls.caller_asr import CallerAsr
from service.gateway.calls.policy import CallPolicy
from service.gateway.calls.recording import CallRecording
from service.gateway.calls.transcript import DTMF_MASK, NOTE, TranscriptEvent
from service.gateway.media.pipeline import Digit
from service.gateway.recording.writer import RecordingWriter
from service.wire import FRAME_SECONDS

if tp.TYPE_CHECKING:
    from service.gateway.calls.call import Call

log = logging.getLogger(__name__)

STORE_SECONDS = 120.0  # how long the end of a call waits for its recording to be stored
PAUSED, RESUMED = "recording paused", "recording resumed"
CONSENT_PLAYED = "recording consent announcement played"


class CaptureError(Exception):
    """A pause or resume that cannot be done (``status``: 409)."""

    def __init__(self, detail: str, status: int = 409) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status


class CallCapture:
    """The caller's transcript, recording, consent and DTMF policy of every call (see above)."""

    def __init__(
        self,
        *,
        policy: tp.Callable[[Call], CallPolicy],
        asr: WorkerPicker | None = None,
        writer: RecordingWriter | None = None,
    ) -> None:
        self.policy = policy
        self.asr = asr
        self.writer = writer

    def begin(self, call: Call) -> None:
        """The call's route is known: its policy, and the consent announcement queued."""
        policy = call.policy = self.policy(call)
        frames = policy.consent_frames
        if frames:
            call.pipeline.announce(list(frames))
            seconds = len(frames) * FRAME_SECONDS

            def played() -> None:
                call.add_transcript(
                    TranscriptEvent(t=max(0.0, call.call_seconds - seconds), kind=NOTE, text=CONSENT_PLAYED)
                )

            call.pipeline.on_announced = played

    def answered(self, call: Call) -> None:
        policy = call.policy
        if policy.transcription and self.asr is not None:
            call.caller_asr = CallerAsr(call, self.asr)
        if policy.records:
            if self.writer is None:
                call.record.recording = {
                    "format": policy.recording,
                    "state": "failed",
                    "error": "no recording storage on this gateway",
                }
            else:
                call.recording = CallRecording(call, self.writer, policy.recording)

    def dtmf_text(self, call: Call, digit: Digit) -> str:
        """A digit as the transcript keeps it: masked unless the policy says clear (and the
        call is not paused)."""
        return digit.digit if call.policy.dtmf_clear and not call.capture_paused else DTMF_MASK

    # -- compliance --------------------------------------------------------------------

    def pause(self, call: Call) -> float:
        """Stop storing the call from now (see the module docstring); the call time.
        CaptureError when it cannot."""
        self._check_live(call)
        if call.capture_paused:
            raise CaptureError("the recording is paused already")
        t = round(call.call_seconds, 3)  # as the record shows it: the span is exactly what it says
        if call.recording is not None:
            call.recording.pause(t)
        call.add_transcript(TranscriptEvent(t=t, kind=NOTE, text=PAUSED))
        call.capture_paused = True
        return t

    def resume(self, call: Call) -> float:
        self._check_live(call)
        if not call.capture_paused:
            raise CaptureError("the recording is not paused")
        t = round(call.call_seconds, 3)
        call.capture_paused = False
        if call.recording is not None:
            call.recording.resume(t)
        call.add_transcript(TranscriptEvent(t=t, kind=NOTE, text=RESUMED))
        return t

    @staticmethod
    def _check_live(call: Call) -> None:
        if call.ended.is_set():
            raise CaptureError("the call has ended")
        if not call.answered:
            raise CaptureError("the call is not answered yet: nothing is recorded")

    # -- the end -----------------------------------------------------------------------

    async def end(self, call: Call) -> None:
        """The call's media stopped: the caller's last words, then the recording closes."""
        if call.recording is not None:
            call.recording.finish(call.record.duration_s())
        if call.caller_asr is not None:
            with contextlib.suppress(Exception):
                await call.caller_asr.close()

    async def stored(self, call: Call) -> bool:
        """Wait (up to ``STORE_SECONDS``) for the call's recording to be stored; the record
        then says where. False when there is nothing new to say."""
        recording = call.recording
        if recording is None or recording.done is None:
            return False
        try:
            async with asyncio.timeout(STORE_SECONDS):
                result = await asyncio.shield(recording.done)
        except TimeoutError:
            log.warning("call %s: the recording was not stored within %.0f s", call.id, STORE_SECONDS)
            return False
        recording.stored(result)
        if result.location is None:
            log.warning("call %s: recording failed: %s", call.id, result.error)
        return True
