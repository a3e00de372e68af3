"""One call on this gateway: its record, its media pipeline, its worker session, its end.

``Call`` holds what every ingress shares; the lifecycle (``lifecycle.py``) drives it.
The call owns its worker session: it opens one through the router, feeds it the
pipeline's frames, fails over to another worker when the session is lost, and closes it
in ``release`` (the lifecycle calls that on every exit path, and a transfer mid-call: the
call goes on without a model, and ``connect`` may give it one again). ``end(reason)`` may be
called from anywhere, once or more: the first reason stands.

The record's ``phases`` follow who the caller talks to: an ``ai`` phase from the answer
(``begin_phase``), a ``human`` one after a transfer; ``mark_ended`` closes the last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import typing as tp

from service.call_record import ACTIVE, ENDED, QUEUED, CallPhase, CallQuality, CallRecord
from service.gateway import metrics
from service.gateway.calls.transcript import TranscriptEvent
from service.gateway.media.pipeline import MediaPipeline
from service.gateway.routing.router import (
    LinkCallbacks,
    NoCapacity,
    Router,
    RoutingUnavailable,
    WorkerSession,
)
from service.wire import CloseCode
from sip.identity import CallerIdentity

log = logging.getLogger(__name__)

FRAME_WATCHDOG_SECONDS = 1.0  # no frame from the worker for this long: the worker is hung


def new_call_id() -> str:
    return "c-" + secrets.token_hex(8)


class Call:
    """One call. ``record`` is kept current as the call goes (state, worker, times, end)."""

    def __init__(self, ingress: str, *, from_uri: str = "", to_uri: str = "", sip_call_id: str = "",
                 source: str = "", codec: str = "", sip_transport: str = "", media_encryption: str = "",
                 identity: CallerIdentity | None = None, gateway_id: str = "") -> None:
        self.record = CallRecord(call_id=new_call_id(), ingress=ingress, gateway_id=gateway_id,
                                 sip_call_id=sip_call_id, from_uri=from_uri, to_uri=to_uri, source=source,
                                 codec=codec, sip_transport=sip_transport, media_encryption=media_encryption,
                                 identity=identity.to_dict() if identity is not None else None)
        self.identity = identity  # SIP: the identity headers and the dialled number, as received
        self.pipeline = MediaPipeline(to_model=self.send_to_model)
        self.session: WorkerSession | None = None
        self.failovers = 0
        self.refused_status: int | None = None  # ended before its answer: the status its caller got
        self.transcript: list[TranscriptEvent] = []
        self.on_transcript: tp.Callable[[Call, TranscriptEvent], None] | None = None
        self.ended = asyncio.Event()
        self.stalled = asyncio.Event()
        self.last_frame_at = time.monotonic()
        self._answered_mono: float | None = None
        self._session_generation = 0  # bumped by release: a released session's late callbacks are ignored
        self.phase: CallPhase | None = None  # the phase under way (the last of record.phases)

    @property
    def id(self) -> str:
        return self.record.call_id

    @property
    def ingress(self) -> str:
        return self.record.ingress

    @property
    def state(self) -> str:
        return self.record.state

    @property
    def end_reason(self) -> str:
        return self.record.end_reason

    # -- state -------------------------------------------------------------------------

    def end(self, reason: str, detail: str = "") -> None:
        if not self.ended.is_set():
            self.record.end_reason = reason
            if detail:
                self.record.end_detail = detail
            self.ended.set()

    def mark_answered(self) -> None:
        self.record.state = ACTIVE
        self.record.answered_at = time.time()
        self._answered_mono = time.monotonic()
        if self.session is not None:
            self.begin_phase(CallPhase("ai", start=self.record.answered_at, worker=self.session.worker_id))

    def mark_ended(self) -> None:
        self.record.state = ENDED
        self.record.ended_at = time.time()
        self.end_phase(self.record.ended_at)

    def begin_phase(self, phase: CallPhase) -> None:
        """Who the caller talks to changed: the phase under way ends when ``phase`` starts."""
        self.end_phase(phase.start)
        self.record.phases.append(phase)
        self.phase = phase

    def end_phase(self, at: float) -> None:
        """The phase under way ends at ``at`` (a REFER's human phase goes on without us: no end)."""
        phase, self.phase = self.phase, None
        if phase is not None and phase.end is None and phase.mode != "refer":
            phase.end = at

    @property
    def answered(self) -> bool:
        return self._answered_mono is not None

    @property
    def call_seconds(self) -> float:
        """Seconds since the call was answered (0 before)."""
        return 0.0 if self._answered_mono is None else time.monotonic() - self._answered_mono

    def quality(self) -> CallQuality:
        """The media's quality now (empty before there is media), with the call's failovers."""
        quality = self.pipeline.quality() or CallQuality()
        quality.failovers = self.failovers
        return quality

    def snapshot(self) -> CallRecord:
        """The record as of now, with live quality."""
        return self.record.copy(quality=self.quality())

    # -- transcript --------------------------------------------------------------------

    def add_transcript(self, event: TranscriptEvent) -> None:
        self.transcript.append(event)
        if self.on_transcript is not None:
            self.on_transcript(self, event)

    # -- worker session ----------------------------------------------------------------

    def _callbacks(self) -> LinkCallbacks:
        generation = self._session_generation

        def on_frame(frame: bytes) -> None:
            if generation == self._session_generation:
                self._on_frame(frame)

        def on_text(text: str, t: float) -> None:
            if generation == self._session_generation:
                self._on_text(text, t)

        def on_end(reason: str) -> None:
            if generation == self._session_generation:
                self._on_worker_end(reason)

        return LinkCallbacks(on_frame=on_frame, on_text=on_text, on_end=on_end)

    def _on_frame(self, frame: bytes) -> None:
        self.last_frame_at = time.monotonic()
        self.pipeline.from_model(frame)

    def _on_text(self, text: str, t: float) -> None:
        self.add_transcript(TranscriptEvent(t=self.call_seconds, kind="agent", text=text))

    def _on_worker_end(self, reason: str) -> None:
        self.end(reason or "worker-ended")

    def send_to_model(self, frame: bytes) -> None:
        if self.session is not None:
            self.session.link.send_frame(frame)

    def check_stall(self, now: float) -> bool:
        """Called now and then by the lifecycle's watchdog: flags a session from which no
        frame came for a second (a hung worker), so that ``supervise`` fails over."""
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
        record = self.record
        record.worker_id = session.worker_id
        record.slot = session.slot
        if session.link.info is not None:
            record.model = session.link.info.model
            record.license = session.link.info.license
            record.sampling = session.link.info.sampling
        self.last_frame_at = time.monotonic()
        if self.phase is not None and self.phase.kind == "ai":
            self.phase.worker = session.worker_id

    async def connect(self, router: Router, *, wait: float,
                      on_queued: tp.Callable[[], tp.Awaitable[None]] | None = None) -> None:
        """Get a worker session (waiting up to ``wait`` for a slot). Raises NoCapacity or
        RoutingUnavailable."""

        async def queued() -> None:
            self.record.state = QUEUED
            if on_queued is not None:
                await on_queued()

        self._adopt(await router.open(self.id, self._callbacks(), wait=wait, on_queued=queued))

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
            waits: set[asyncio.Future[tp.Any]] = {closed, ended, stalled}
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                ended.cancel()
                stalled.cancel()
            if self.ended.is_set():
                return
            if self.session is not session:
                continue  # released (a transfer) or replaced meanwhile: not a loss
            code, reason = closed.result() if closed.done() else (None, "stalled")
            if code == CloseCode.NORMAL and reason and not self.ended.is_set():
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

    def detach_model(self) -> WorkerSession | None:
        """Stop listening to the worker session at once (its frames, words and end are
        ignored from now on) and hand it over, to be closed: ``release`` in two steps, for
        a hand-over that must not wait for the socket's close."""
        self._session_generation += 1
        session, self.session = self.session, None
        self.stalled.clear()
        return session

    async def release(self) -> None:
        """Close the worker session and release its lease (idempotent)."""
        session = self.detach_model()
        if session is not None:
            with contextlib.suppress(Exception):
                await session.close()
