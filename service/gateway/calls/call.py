"""A call from arrival to hang-up: its record, its worker session, failover, and its end.

``Call`` is what every ingress (SIP, WebRTC) shares: it owns the worker session and
decides when the call ends. An ingress supplies the media side (something with
``from_model(frame)``, ``start()``, ``stop()``, ``quality()`` and ``counters()``) and the
hang-up (BYE, or closing a peer connection). Every resource has one owner that releases
it on every exit path: the call releases its worker session; the ingress its media.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import typing as tp
from dataclasses import dataclass, field

from service.gateway import metrics
from service.gateway.routing.router import (
    LinkCallbacks,
    NoCapacity,
    Router,
    RoutingUnavailable,
    WorkerSession,
)
from sip.identity import CallerIdentity

log = logging.getLogger(__name__)

FRAME_WATCHDOG_SECONDS = 1.0  # no frame from the worker for this long: the worker is gone
WATCHDOG_PERIOD = 0.2  # how often the gateway's watchdog looks at every call
PLAYOUT_GRACE_SECONDS = 0.5  # let queued model audio go out before hanging up


class MediaSide(tp.Protocol):
    def from_model(self, frame: bytes) -> None: ...
    def quality(self) -> dict[str, tp.Any]: ...
    def counters(self) -> dict[str, int]: ...


def new_call_id() -> str:
    return "c-" + secrets.token_hex(8)


@dataclass
class TranscriptEvent:
    """One line of a call's transcript: the agent's words, or a DTMF digit from the caller."""

    t: float  # seconds since the call was answered
    kind: str  # "agent" or "dtmf"
    text: str
    duration_ms: float | None = None

    def to_dict(self) -> dict[str, tp.Any]:
        out: dict[str, tp.Any] = {"t": round(self.t, 3), "kind": self.kind, "text": self.text}
        if self.duration_ms is not None:
            out["duration_ms"] = round(self.duration_ms, 1)
        return out


@dataclass
class Call:
    """One call on this gateway. ``end(reason)`` may be called from anywhere, once or more."""

    ingress: str
    from_uri: str = ""
    to_uri: str = ""
    sip_call_id: str = ""
    source: str = ""
    identity: CallerIdentity | None = None  # SIP: identity headers and the dialled number, as received
    id: str = field(default_factory=new_call_id)
    state: str = "ringing"  # ringing → queued → active → ended
    started_at: float = field(default_factory=time.time)
    answered_at: float | None = None
    ended_at: float | None = None
    end_reason: str = ""
    end_detail: str = ""  # the end reason in words, when the reason alone does not say what went wrong
    codec: str = ""
    sip_transport: str = ""  # UDP, TCP or TLS: how the call's signalling came (SIP calls)
    media_encryption: str = ""  # none, SDES-SRTP or DTLS-SRTP (WebRTC), once the media is agreed
    worker_id: str = ""
    slot: int | None = None
    model: str = ""
    license: str = ""
    sampling: dict[str, tp.Any] | None = None  # what the worker samples this call with
    failovers: int = 0
    media: MediaSide | None = None
    session: WorkerSession | None = None
    transcript: list[TranscriptEvent] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    on_transcript: tp.Callable[[Call, TranscriptEvent], None] | None = None
    last_frame_at: float = field(default_factory=time.monotonic)
    stalled: asyncio.Event = field(default_factory=asyncio.Event)
    _answered_mono: float | None = None

    # -- state -------------------------------------------------------------------------

    def end(self, reason: str) -> None:
        if not self.ended.is_set():
            self.end_reason = reason
            self.ended.set()

    def mark_answered(self) -> None:
        self.state = "active"
        self.answered_at = time.time()
        self._answered_mono = time.monotonic()

    @property
    def call_seconds(self) -> float:
        """Seconds since the call was answered (0 before)."""
        return 0.0 if self._answered_mono is None else time.monotonic() - self._answered_mono

    def record(self) -> dict[str, tp.Any]:
        """The call as the API shows it."""
        end = self.ended_at or time.time()
        return {
            "id": self.id, "ingress": self.ingress, "state": self.state, "from": self.from_uri,
            "to": self.to_uri, "sip_call_id": self.sip_call_id, "source": self.source, "codec": self.codec,
            "sip_transport": self.sip_transport, "media_encryption": self.media_encryption,
            "worker_id": self.worker_id, "slot": self.slot, "model": self.model, "license": self.license,
            "sampling": self.sampling,
            "started_at": self.started_at, "answered_at": self.answered_at, "ended_at": self.ended_at,
            "end_reason": self.end_reason, "end_detail": self.end_detail, "failovers": self.failovers,
            "duration_s": round(end - self.answered_at, 3) if self.answered_at else 0.0,
            "identity": self.identity.to_dict() if self.identity is not None else None,
        }

    # -- transcript --------------------------------------------------------------------

    def add_transcript(self, event: TranscriptEvent) -> None:
        self.transcript.append(event)
        if self.on_transcript is not None:
            self.on_transcript(self, event)

    # -- worker session ----------------------------------------------------------------

    def _callbacks(self) -> LinkCallbacks:
        return LinkCallbacks(on_frame=self._on_frame, on_text=self._on_text, on_end=self._on_worker_end)

    def _on_frame(self, frame: bytes) -> None:
        self.last_frame_at = time.monotonic()
        if self.media is not None:
            self.media.from_model(frame)

    def _on_text(self, text: str, t: float) -> None:
        self.add_transcript(TranscriptEvent(t=self.call_seconds, kind="agent", text=text))

    def _on_worker_end(self, reason: str) -> None:
        self.end(reason or "worker-ended")

    def check_stall(self, now: float) -> bool:
        """Called now and then by the gateway's watchdog: flags a session from which no frame
        came for a second (a hung worker), so that ``supervise`` fails over."""
        stale = now - self.last_frame_at > FRAME_WATCHDOG_SECONDS
        if self.session is not None and stale and not self.stalled.is_set():
            log.warning("call %s: no audio from worker %s for %.1fs", self.id, self.session.worker_id,
                        now - self.last_frame_at)
            self.stalled.set()
            return True
        return False

    def _adopt(self, session: WorkerSession) -> None:
        self.stalled.clear()
        self.session = session
        self.worker_id = session.worker_id
        self.slot = session.slot
        if session.link.info is not None:
            self.model = session.link.info.model
            self.license = session.link.info.license
            self.sampling = session.link.info.sampling
        self.last_frame_at = time.monotonic()

    async def connect(self, router: Router, *, wait: float,
                      on_queued: tp.Callable[[], tp.Awaitable[None]] | None = None) -> None:
        """Get a worker session (waiting up to ``wait`` for a slot). Raises NoCapacity or
        RoutingUnavailable."""

        async def queued() -> None:
            self.state = "queued"
            if on_queued is not None:
                await on_queued()

        self._adopt(await router.open(self.id, self._callbacks(), wait=wait, on_queued=queued))

    def send_to_model(self, frame: bytes) -> None:
        if self.session is not None:
            self.session.link.send_frame(frame)

    async def supervise(self, router: Router) -> None:
        """Until the call ends: watch the worker session and fail over when it is lost.

        A session is lost when its socket closes without the call ending, or when no frame
        arrived for a second (a hung worker). The call then gets a slot elsewhere with a
        fresh model context; with none anywhere, it ends ("worker-lost").
        """
        while not self.ended.is_set():
            session = self.session
            if session is None:
                return
            closed = session.link.closed  # the link's own future: waited on, never cancelled here
            ended = asyncio.ensure_future(self.ended.wait())
            stalled = asyncio.ensure_future(self.stalled.wait())
            try:
                await asyncio.wait({closed, ended, stalled}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                ended.cancel()
                stalled.cancel()
            if self.ended.is_set():
                return
            code, reason = closed.result() if closed.done() else (None, "stalled")
            if code == 1000 and reason and not self.ended.is_set():
                # A clean close from the worker is an end of session, not a failure.
                self.end("worker-ended")
                return
            await self._fail_over(router, session, code, reason)

    async def _fail_over(self, router: Router, lost: WorkerSession, code: int | None, reason: str) -> None:
        log.warning("call %s: lost worker %s slot %s (%s %s); failing over", self.id, lost.worker_id,
                    lost.slot, code, reason)
        started = time.monotonic()
        await lost.close()
        self.session = None
        try:
            session = await router.open(self.id, self._callbacks(), wait=0.0, exclude={lost.worker_id})
        except (NoCapacity, RoutingUnavailable) as exc:
            metrics.FAILOVERS.labels("no-slot").inc()
            log.warning("call %s: no slot to fail over to (%s); ending the call", self.id, exc)
            self.end("worker-lost")
            return
        self.failovers += 1
        metrics.FAILOVERS.labels("moved").inc()
        self._adopt(session)
        log.info("call %s: moved to worker %s slot %s in %.0f ms", self.id, session.worker_id, session.slot,
                 (time.monotonic() - started) * 1000)

    async def release(self) -> None:
        """Close the worker session and release its lease (idempotent)."""
        session, self.session = self.session, None
        if session is not None:
            with contextlib.suppress(Exception):
                await session.close()
