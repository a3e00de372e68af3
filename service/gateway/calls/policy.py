"""What a call's route says about its record: transcription, recording, DTMF, consent.

Each call gets it from its route (``routes/``: ``recording``, ``transcription``,
``dtmf_clear``, ``consent_announcement``); what the route leaves unsaid comes from the
gateway's settings of the same names (``for_call``). Without a routes file every call takes
the settings.
"""

from __future__ import annotations

import dataclasses
import typing as tp
from dataclasses import dataclass

if tp.TYPE_CHECKING:
    from service.gateway.media.prompts import Prompt
    from service.gateway.routes.schema import Route

RECORDING_FORMATS = ("off", "wav", "ogg")


@dataclass(frozen=True)
class CallPolicy:
    """Per-call choices for the call's record (see the settings of the same names)."""

    transcription: bool = True  # the caller's words through an ASR worker
    recording: str = "off"  # off, wav or ogg (Opus in Ogg)
    recording_transfer: bool = True  # a transferred call's human part is recorded too
    dtmf_clear: bool = False  # DTMF digits stored as pressed (else '*')
    consent_announcement: str | None = None  # a WAV played to the caller before the AI speaks
    consent_frames: tuple[bytes, ...] = ()  # that announcement, ready to play (80 ms frames at 24 kHz)

    @property
    def records(self) -> bool:
        return self.recording != "off"

    @classmethod
    def from_settings(cls, settings: tp.Any, consent_frames: tp.Sequence[bytes] = ()) -> CallPolicy:
        return cls(
            transcription=settings.transcription,
            recording=settings.recording,
            recording_transfer=settings.recording_transfer,
            dtmf_clear=settings.dtmf_clear,
            consent_announcement=settings.consent_announcement or None,
            consent_frames=tuple(consent_frames),
        )

    def for_route(self, route: Route | None, consent: Prompt | None = None) -> CallPolicy:
        """This (the gateway's) policy with what ``route`` says in its place; ``consent``:
        the prompt made for the route's consent announcement."""
        if route is None:
            return self
        recording = route.recording
        policy = dataclasses.replace(
            self,
            transcription=self.transcription if route.transcription is None else route.transcription,
            dtmf_clear=self.dtmf_clear if route.dtmf_clear is None else route.dtmf_clear,
            recording=self.recording if recording is None else recording.format,
            recording_transfer=(
                self.recording_transfer if recording is None or recording.human_part is None else recording.human_part
            ),
        )
        if route.consent_announcement is not None and consent is not None:
            policy = dataclasses.replace(
                policy, consent_announcement=route.consent_announcement.name, consent_frames=consent.frames
            )
        return policy
