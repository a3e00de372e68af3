"""What the API needs of the gateway it serves: the control-plane interface.

The routes of this package depend on :class:`CallControl` only, never on the gateway's
parts; the gateway implements it (``service/gateway/control/plane.py``) and hands it to
``create_app``. A request the control plane cannot serve raises :class:`ControlError`,
which the routes answer with its status.
"""

from __future__ import annotations

import typing as tp
from dataclasses import dataclass, field

if tp.TYPE_CHECKING:
    from service.api.models import (
        CallInfo,
        CallList,
        DrainResult,
        HangupResult,
        PlacedCall,
        PoolHistory,
        PoolState,
        Readiness,
        RecordingControl,
        RecordingInfo,
        RefusalList,
        Transcript,
        TranscriptPiece,
        TransferOutcome,
    )

CALL_ID_HEADER = "X-Moshimoshi-Call-Id"  # the gateway's call id, in a SIP 200 OK and a WebRTC answer
MAX_OFFER_BYTES = 64 * 1024  # a WebRTC offer with every candidate in it is a few kB


class ControlError(Exception):
    """A request the control plane refuses: the HTTP ``status`` and why; ``retry_after``
    (seconds) when asking again later may work."""

    def __init__(self, status: int, detail: str, *, retry_after: int | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.retry_after = retry_after


@dataclass(frozen=True)
class TranscriptEnd:
    """The last item of a followed transcript: the call ended (``gone``: its record or
    stream expired, or its gateway went away without ending it)."""

    reason: str


@dataclass
class RecordingStream:
    """A stored recording being read: its description, size and content."""

    info: RecordingInfo
    size: int
    chunks: tp.AsyncIterator[bytes]


@dataclass
class IceServer:
    urls: str | list[str]
    username: str | None = None
    credential: str | None = None


@dataclass
class WebRtcConfig:
    ice_servers: list[IceServer] = field(default_factory=list)
    connect_seconds: float = 0.0


@dataclass
class WebRtcAnswer:
    session_id: str
    call_id: str
    sdp: str


class CallControl(tp.Protocol):
    """The gateway as the control plane sees it."""

    def readiness(self) -> Readiness:
        """Whether new calls are taken, and why not."""

    # -- calls -------------------------------------------------------------------------

    async def list_calls(
        self, *, state: str | None, since: float | None, worker_id: str | None, limit: int
    ) -> CallList:
        """Calls of every gateway replica, newest first (partial when Redis is down)."""

    async def get_call(self, call_id: str) -> CallInfo:
        """One call with its quality; ControlError 404 (unknown) or 503 (Redis down)."""

    async def hang_up(self, call_id: str) -> HangupResult:
        """End a call on whichever replica runs it; ControlError 404, 409 (ended) or 503."""

    async def place_call(self, to: str, caller_id: str | None, route: str | None) -> PlacedCall:
        """Have the AI call ``to`` (a sip: URI or a number) from ``caller_id`` on ``route``;
        ControlError 422 (a target it cannot call), 404 (no such route) or 503 (no slot)."""

    async def transfer(self, call_id: str, target: str, mode: str) -> TransferOutcome:
        """Hand a call to a human at ``target`` (``mode`` auto, refer or bridge) on whichever
        replica runs it and say how it went (a failure leaves the caller with the AI);
        ControlError 404 (unknown), 409 (not answered, ended, already with a person or
        being transferred; no gateway has it), 422 (a bad target), 503 (Redis down)."""

    async def refusals(self, *, limit: int) -> RefusalList:
        """Calls refused within the last hour on every replica: counts by reason and the
        latest ``limit`` (partial when Redis is down)."""

    # -- transcripts -------------------------------------------------------------------

    async def transcript(self, call_id: str) -> Transcript:
        """A live or ended call's transcript; ControlError 404 or 503."""

    def follow_transcript(self, call_id: str) -> tp.AsyncIterator[TranscriptPiece | TranscriptEnd]:
        """The pieces so far, then new ones as they come, then the end; ControlError 404 or
        503 (raised by the iteration)."""

    # -- recordings --------------------------------------------------------------------

    async def recording(self, call_id: str) -> RecordingStream:
        """A call's stored recording; ControlError 404 (unknown call, not recorded, or
        expired), 409 (not stored yet) or 503."""

    async def pause_recording(self, call_id: str) -> RecordingControl:
        """Silence in the call's recording from now; ControlError 404, 409 (not recorded,
        paused already, ended) or 503."""

    async def resume_recording(self, call_id: str) -> RecordingControl:
        """Record again from now; ControlError 404, 409 or 503."""

    # -- the pool ----------------------------------------------------------------------

    async def pool(self) -> PoolState:
        """Workers, their slots and leases; ControlError 503 when Redis is down."""

    def pool_history(self) -> PoolHistory:
        """Concurrent calls and capacity over the last hour (one sample per interval)."""

    async def drain_worker(self, worker_id: str) -> DrainResult:
        """Ask a worker to drain; ControlError 404, 502 (it did not answer) or 503."""

    # -- WebRTC ------------------------------------------------------------------------

    async def webrtc_offer(self, sdp: str, source: str, owner: str = "") -> WebRtcAnswer:
        """Answer a WebRTC offer; ControlError 400 (unusable offer), 503 (no agent) or 500.
        ``owner`` names who placed it (a fingerprint of the token)."""

    def webrtc_hang_up(self, session_id: str, owner: str | None = None) -> bool:
        """End a WebRTC session (only ``owner``'s, unless None: any); False when there is no
        such session (of that owner)."""

    def webrtc_config(self) -> WebRtcConfig:
        """The ICE servers browser peers use, and how long they have to connect."""
