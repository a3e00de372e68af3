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
import itertools
import logging
import secrets
import time
import typing as tp

from service.call_record import ACTIVE, ENDED, QUEUED, CallPhase, CallQuality, CallRecord
from service.gateway import metrics
from service.gateway.calls.frame_watch import FrameWatch
from service.gateway.calls.policy import CallPolicy
from service.gateway.calls.transcript import TranscriptEvent
from service.gateway.media.pipeline import MediaPipeline
from service.gateway.routes.schema import Route
from service.gateway.routes.table import Trunk
from service.gateway.routing.router import (
    ANY,
    LinkCallbacks,
    NoCapacity,
    Router,
    RoutingUnavailable,
    SessionNeeds,
    WorkerSession,
)
from service.wire import CloseCode
from sip.identity import CallerIdentity

if tp.TYPE_CHECKING:
    from service.gateway.calls.caller_asr import CallerAsr
    from service.gateway.calls.recording import CallRecording

log = logging.getLogger(__name__)

STALL_LOG = "stalled: no frame for"  # how the log says it (tests look for it: tests/conftest.py)
MOVE_RETRY_SECONDS = 0.5  # a stalled session with no slot elsewhere: how often to look again
WORKER_LOST_SECONDS = 5.0  # ... and how long it may stay silent before the call ends

_closing: set[asyncio.Future[None]] = set()  # lost sessions being closed in the background


def new_call_id() -> str:
    return "c-" + secrets.token_hex(8)


class Call:
    """One call. ``record`` is kept current as the call goes (state, worker, times, end)."""

    def __init__(
        self,
        ingress: str,
        *,
        from_uri: str = "",
        to_uri: str = "",
        sip_call_id: str = "",
        source: str = "",
        codec: str = "",
        sip_transport: str = "",
        media_encryption: str = "",
        identity: CallerIdentity | None = None,
        gateway_id: str = "",
    ) -> None:
        self.record = CallRecord(
            call_id=new_call_id(),
            ingress=ingress,
            gateway_id=gateway_id,
            sip_call_id=sip_call_id,
            from_uri=from_uri,
            to_uri=to_uri,
            source=source,
            codec=codec,
            sip_transport=sip_transport,
            media_encryption=media_encryption,
            identity=identity.to_dict() if identity is not None else None,
        )
        self.identity = identity  # SIP: the identity headers and the dialled number, as received
        self.trunk = Trunk()  # SIP: the signalling source and digest user, which routes may match
        self.route: Route | None = None  # chosen by the lifecycle; kept for the call's whole life
        self.pipeline = MediaPipeline(to_model=self.send_to_model)
        self.session: WorkerSession | None = None
        self.failovers = 0
        self.refused_status: int | None = None  # ended before its answer: the status its caller got
        self.stored = False  # kept in Redis (from its answer; an outbound call from its admission)
        self.transcript: list[TranscriptEvent] = []
        self.on_transcript: tp.Callable[[Call, TranscriptEvent], None] | None = None
        self.policy = CallPolicy()  # the route's choices for the record (set by the lifecycle)
        self.capture_paused = False  # a compliance pause: nothing of the call is stored meanwhile
        self.caller_asr: CallerAsr | None = None
        self.recording: CallRecording | None = None
        self.ended = asyncio.Event()
        self.stalled = asyncio.Event()
        self.frame_watch = FrameWatch()  # the lifecycle sets the configured threshold
        self._answered_mono: float | None = None
        self._generations = itertools.count(1)
        self._session_generation = 0  # changed by release and failover: a left session's late callbacks are ignored
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

    @property
    def dialled(self) -> str:
        """The number dialled (SIP: the Request-URI's user part; empty for WebRTC)."""
        return self.identity.dialled if self.identity is not None else ""

    @property
    def needs(self) -> SessionNeeds:
        """What the call's worker session must be: its route's model and sampling."""
        route = self.route
        if route is None:
            return ANY
        return SessionNeeds(model=route.model, sampling=route.sampling or None)

    def take_route(self, route: Route) -> None:
        self.route = route
        self.record.route = route.name

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

    def mark_end_time(self) -> float:
        """The call is over (its media stopped): the time its duration runs to."""
        if self.record.ended_at is None:
            self.record.ended_at = time.time()
        return self.record.ended_at

    def mark_ended(self) -> None:
        self.record.state = ENDED
        self.end_phase(self.mark_end_time())

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

    def _callbacks(self, generation: int | None = None) -> LinkCallbacks:
        """Callbacks for one session, valid while the call's session generation is
        ``generation`` (the current one by default): what a session sends once the call has
        moved on from it (released, handed over, failed over) is ignored."""
        generation = self._session_generation if generation is None else generation

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
        self.frame_watch.received(time.monotonic())
        self.pipeline.from_model(frame)

    def _on_text(self, text: str, t: float) -> None:
        if not self.capture_paused:  # a compliance pause keeps the agent's words out too
            self.add_transcript(TranscriptEvent(t=self.call_seconds, kind="agent", text=text))

    def _on_worker_end(self, reason: str) -> None:
        self.end(reason or "worker-ended")

    def send_to_model(self, frame: bytes) -> None:
        if self.session is not None:
            self.session.link.send_frame(frame)
            self.frame_watch.sent(time.monotonic())

    @property
    def last_frame_at(self) -> float:
        """When the worker session last sent a frame (or was opened), monotonic seconds."""
        return self.frame_watch.last_frame_at

    def check_stall(self, now: float) -> bool:
        """Called every few tens of milliseconds by the lifecycle's watchdog: flags a session
        that owes frames past its threshold (``frame_watch.py``: a hung worker), so that
        ``supervise`` moves the call."""
        if self.session is None or self.stalled.is_set():
            return False
        silent = self.frame_watch.stalled(now)
        if silent is None:
            return False
        log.warning("call %s: worker %s %s %.0f ms", self.id, self.session.worker_id, STALL_LOG, silent * 1000)
        self.stalled.set()
        return True

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
        self.frame_watch.reset(time.monotonic())
        if self.phase is not None and self.phase.kind == "ai":
            self.phase.worker = session.worker_id

    async def connect(
        self, router: Router, *, wait: float, on_queued: tp.Callable[[], tp.Awaitable[None]] | None = None
    ) -> None:
        """Get a worker session (waiting up to ``wait`` for a slot). Raises NoCapacity or
        RoutingUnavailable."""

        async def queued() -> None:
            self.record.state = QUEUED
            if on_queued is not None:
                await on_queued()

        self._adopt(await router.open(self.id, self._callbacks(), wait=wait, on_queued=queued, needs=self.needs))

    async def supervise(self, router: Router) -> None:
        """Until the call ends: watch the worker session and move the call when it is lost.

        A session is lost when its socket closes without the call ending: the call gets a
        slot elsewhere with a fresh model context, or with none anywhere it ends
        ("worker-lost"). A session that is stalled (it owes frames: a hung worker) is left
        for a slot elsewhere at once, without waiting for its socket to close (it is closed
        in the background); with no slot elsewhere the call keeps it, tries again every
        ``MOVE_RETRY_SECONDS``, and ends ("worker-lost") once the worker has sent nothing
        for ``WORKER_LOST_SECONDS``.
        """
        retries = 0  # tries to move off the current stalled session
        previous: WorkerSession | None = None
        while not self.ended.is_set():
            session = self.session
            if session is None:
                return
            if session is not previous:
                retries, previous = 0, session
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
            if closed.done():
                code, reason = closed.result()
                if code == CloseCode.NORMAL and reason:
                    # A clean close from the worker is an end of session, not a failure.
                    self.end("worker-ended")
                    return
                retries = 0
                if not await self._move(router, session, f"{code} {reason}"):
                    metrics.FAILOVERS.labels("no-slot").inc()
                    self.end("worker-lost")
                    return
                continue
            first_try = retries == 0
            if await self._move(router, session, "stalled", quiet=not first_try):
                retries = 0
                continue
            retries += 1
            silent = time.monotonic() - self.last_frame_at
            if silent >= WORKER_LOST_SECONDS:
                metrics.FAILOVERS.labels("no-slot").inc()
                log.warning(
                    "call %s: worker %s sent nothing for %.1fs and no slot is free elsewhere; ending the call",
                    self.id,
                    session.worker_id,
                    silent,
                )
                self.end("worker-lost")
                return
            # keep the session: it may recover (a frame clears the stall); try again soon
            ended = asyncio.ensure_future(self.ended.wait())
            retry: set[asyncio.Future[tp.Any]] = {closed, ended}
            try:
                await asyncio.wait(retry, timeout=MOVE_RETRY_SECONDS, return_when=asyncio.FIRST_COMPLETED)
            finally:
                ended.cancel()
            self.stalled.clear()

    async def _move(self, router: Router, lost: WorkerSession, why: str, *, quiet: bool = False) -> bool:
        """Open a session on another worker and adopt it; the lost one is closed in the
        background (a hung worker's close handshake never ends: the call does not wait for
        it). False when no slot is free elsewhere (a stalled session is then kept).
        ``quiet``: a retry, logged only when it succeeds."""
        if not quiet:
            log.warning("call %s: leaving worker %s slot %s (%s)", self.id, lost.worker_id, lost.slot, why)
        started = time.monotonic()
        stalled = not lost.link.closed.done()
        generation = next(self._generations)  # the new session's, current once it is adopted
        try:
            session = await router.open(
                self.id, self._callbacks(generation), wait=0.0, exclude={lost.worker_id}, needs=self.needs
            )
        except (NoCapacity, RoutingUnavailable) as exc:
            if not quiet:
                log.warning(
                    "call %s: no slot to move to (%s)%s",
                    self.id,
                    exc,
                    "; keeping the stalled worker for now" if stalled else "",
                )
            if not stalled:
                self.session = None
                self._close_in_background(lost)
            return False
        if self.session is not lost or self.ended.is_set():  # released meanwhile (a transfer, the end)
            self._close_in_background(session)
            return True
        self._session_generation = generation  # from now on the lost session is not heard
        self.failovers += 1
        metrics.FAILOVERS.labels("moved").inc()
        self._adopt(session)
        self._close_in_background(lost)
        log.info(
            "call %s: moved to worker %s slot %s in %.0f ms",
            self.id,
            session.worker_id,
            session.slot,
            (time.monotonic() - started) * 1000,
        )
        return True

    def _close_in_background(self, session: WorkerSession) -> None:
        closing = asyncio.ensure_future(session.close())
        _closing.add(closing)
        closing.add_done_callback(_closing.discard)

    def detach_model(self) -> WorkerSession | None:
        """Stop listening to the worker session at once (its frames, words and end are
        ignored from now on) and hand it over, to be closed: ``release`` in two steps, for
        a hand-over that must not wait for the socket's close."""
        self._session_generation = next(self._generations)
        session, self.session = self.session, None
        self.stalled.clear()
        return session

    async def release(self) -> None:
        """Close the worker session and release its lease (idempotent)."""
        session = self.detach_model()
        if session is not None:
            with contextlib.suppress(Exception):
                await session.close()
