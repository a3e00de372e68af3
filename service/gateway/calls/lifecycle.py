"""The life of a call, from arrival to release: the one owner of every call on this gateway.

An ingress (``ingress/sip.py``, ``ingress/webrtc.py``) turns its signalling into a
:class:`Leg` and hands it, with a new :class:`Call`, to :meth:`CallLifecycle.run`::

    begin ─▶ admission ─▶ route ─▶ leg.prepare ─▶ route limit ─▶ slot claim ─▶ leg.answer ─▶ answered ─▶ converse
    (table,   (503 when    (404     (offer, media    (max_calls:    (queue; leg.queued:  (200 OK, or     (record and   (supervision,
     taps,    draining or  when     resources:       overflow)      the announcement;    SDP answer      transcript    failover,
     transcript) unready)  none)    488/400, 503)                   caller may leave;    and ICE)        in Redis)     leg.watch,
                                                                    no slot: overflow)                               max length)
                                                                                                                          │
    finish ◀── call.release ◀── leg.close ◀─────── (every exit path) ◀────────────── leg.hang_up ◀── play out ◀───────────┘
    (stored: record end, transcript end; else: the record of refusals; metrics, on_end hooks)

A slot is claimed before the call is answered (the caller hears ringing while queued), so
a call is never answered only to be dropped. Whatever ends the call (a refusal, the
caller leaving, an error, the gateway stopping, cancellation) the leg's resources, the
worker session with its lease, and the call's record and transcript are released and
closed, in that order, once.

Only an answered call is stored: its record and transcript go to Redis from its answer on
(they live for the retention); an outbound call from its admission, when the API hands out
its id. A call that ends before its answer (refused, or left by
its caller) creates nothing there: it is counted and kept, bounded and short-lived, in the
record of refusals (``refusals.py``), which ``GET /v1/refusals`` and ``GET /v1/calls`` show.

Where the next features attach (none of them touches an ingress's signalling code):

* **Transfer to a human** (``calls/transfer.py``): :meth:`CallLifecycle.transfer` (or
  :meth:`~CallLifecycle.start_transfer` from a synchronous callback such as a DTMF tap
  subscriber) is the one entry point: the API (``CallControl.transfer``), a route's DTMF
  action and its overflow rule all call it. By REFER, the leg's peer takes the call and
  ours ends; bridged, a second leg (``ingress/sip_dialer.py``, placed by the gateway's
  UAC) is joined to this call's pipeline (``MediaPipeline.bridge``) and the model's slot
  is given back mid-call (``call.detach_model``) while the call goes on; the human leg is
  closed here with the call. Going back to the AI would be ``call.connect`` again (a
  fresh slot) and ``pipeline.unbridge``.
* **Outbound calls** (``POST /v1/calls``, ``ingress/outbound.py``): a leg that *places*
  the call (``UserAgent.invite``) in ``answer``, once the slot is held; ``run(...,
  outbound=True)``: no queue and no overflow (503 at once), stored from its admission.
* **Queue announcements as early media**: ``Leg.queued(call, prompt)`` (SIP: a 183 with
  SDP and the route's prompt played into the edge's pacer, ``media/prompts.py``) until the
  claim succeeds; the model's first frame ends the prompt on the same stream.
* **Recording** and **caller ASR** (``capture.py``): subscribers of the pipeline's taps
  attached at the answer (as the call's policy says), the recording detached for a pause
  and attached again to resume; both closed after the media stopped (``capture.end``),
  before the record is final. The call's policy (its route's choices, the gateway's
  settings for the rest) and the consent announcement are set in ``routed``.
* **Hung workers** are found from the frame stream (``frame_watch.py``: a session that
  owes frames for ``--worker-stall-ms``); the watchdog here (``watch_stalls``, one for
  every call, a few times per threshold) flags them and ``call.supervise`` moves the call
  to another worker at once, closing the hung session in the background.
* **Per-route policy** (``routes/``): the call's route is chosen before anything else
  (``RouteTable.resolve``: the dialled number and the trunk; 404 when none matches) and
  kept for the call's life. It gives the claim its model and sampling (``call.needs``), the
  queue time and what a queued caller hears (``Leg.queued``: early media), the per-route
  limit (``RouteTable.admit``), the overflow when no slot frees (503, a message then BYE,
  or a transfer), the maximum length, and DTMF actions. Recording and the caller's
  transcript read ``call.route`` (``recording``, ``transcription``, ``dtmf_clear``,
  ``consent_announcement``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import typing as tp
from dataclasses import dataclass

from service.call_record import CallRecord
from service.gateway import metrics
from service.gateway.calls import story
from service.gateway.calls.call import Call, new_call_id
from service.gateway.calls.capture import CallCapture
from service.gateway.calls.frame_watch import DEFAULT_STALL_SECONDS, FrameWatch
from service.gateway.calls.policy import CallPolicy
from service.gateway.calls.recorder import CallRecorder
from service.gateway.calls.refusals import RefusalLog, RefusedCall
from service.gateway.calls.table import CallTable
from service.gateway.calls.transcript import DTMF, TranscriptEvent, TranscriptFeed
from service.gateway.calls.transfer import (
    Dialer,
    TransferDesk,
    TransferError,
    TransferResult,
    check_mode,
    check_target,
)
from service.gateway.media.pipeline import Digit
from service.gateway.media.prompts import Prompt, PromptPlayer
from service.gateway.routes.schema import Overflow, Route
from service.gateway.routes.table import RouteTable
from service.gateway.routing.router import NoCapacity, Router, RoutingUnavailable

log = logging.getLogger(__name__)

WATCHDOG_CHECKS = 4  # the stall watchdog looks at every call this many times per stall threshold
RTP_TIMEOUT_CHECK_SECONDS = 1.0
PLAYOUT_GRACE_SECONDS = 0.5  # queued model audio goes out before a hang-up of ours, for at most this long
PLAY_OUT_REASONS = frozenset({"max_duration", "worker-ended"})  # ends whose last words are worth hearing


@dataclass(frozen=True)
class Refusal:
    """A call refused before its answer: ``status`` (SIP 488/503/500; the WebRTC ingress
    answers the same codes in HTTP, 400 for an offer it cannot use), ``detail`` for the
    peer, ``outcome`` the call's end reason, ``retry_after`` whether to ask for a retry."""

    status: int
    detail: str
    outcome: str
    retry_after: bool = False


INTERNAL_ERROR = Refusal(500, "internal error", "error")


class Refused(Exception):
    """Raised by a leg that cannot take the call (its refusal is answered by the lifecycle)."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.detail)
        self.refusal = refusal


class PeerLeft(Exception):
    """Raised by a leg when the caller went away (CANCEL, a dialog that could not start)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Leg(tp.Protocol):
    """An ingress's side of one call: its signalling and its media edge. The lifecycle
    calls these in order (``refuse`` instead of the rest when the call is refused), and
    ``close`` last, on every path."""

    async def prepare(self, call: Call) -> None:
        """Check the offer and take media resources; raise :class:`Refused`."""

    async def queued(self, call: Call, prompt: Prompt | None) -> None:
        """The call waits for a slot: the caller hears ``prompt`` as early media (SIP: a 183
        with SDP, then the prompt on the call's RTP stream), or ringing (a 180) without
        one. Must return at once."""

    async def left(self) -> str:
        """Returns (with the end reason) when the caller leaves before the answer."""

    async def answer(self, call: Call) -> bool:
        """A slot is held: answer and start the media. False when the call ended meanwhile
        (the leg has said why, with ``call.end``); :class:`PeerLeft` when the caller left."""

    async def watch(self, call: Call) -> None:
        """While the call is up: end it (``call.end``) when the peer hangs up. Cancelled
        when the call ends."""

    async def hang_up(self, call: Call) -> None:
        """The call ended on our side: tell the peer (BYE, an end message)."""

    async def refuse(self, refusal: Refusal) -> None:
        """Answer the offer with an error."""

    async def close(self, call: Call) -> None:
        """Stop the media and release the leg's resources. Never raises."""


class CallLifecycle:
    """Runs every call of this gateway (see the module docstring)."""

    def __init__(
        self,
        *,
        router: Router,
        table: CallTable,
        recorder: CallRecorder,
        transcripts: TranscriptFeed,
        queue_seconds: float,
        rtp_timeout_seconds: float,
        admission: tp.Callable[[], str | None],
        refusals: RefusalLog | None = None,
        transfer_ring_seconds: float = 30.0,
        dialer: Dialer | None = None,
        stall_seconds: float = DEFAULT_STALL_SECONDS,
        routes: RouteTable | None = None,
        capture: CallCapture | None = None,
    ) -> None:
        self.router = router
        self.routes = routes if routes is not None else RouteTable.open(None)
        self.table = table
        self.recorder = recorder
        self.transcripts = transcripts
        self.refusals = refusals if refusals is not None else RefusalLog()
        self.stall_seconds = stall_seconds  # a worker session owing frames this long is stalled
        self.queue_seconds = queue_seconds
        self.rtp_timeout_seconds = rtp_timeout_seconds  # 0: never hang up on a silent caller
        self.admission = admission  # None when new calls are taken, else why not (draining, unready)
        self.capture = capture or CallCapture(policy=lambda call: CallPolicy(transcription=False))
        self.on_end: list[tp.Callable[[Call], None]] = []  # after a call's record is final
        # transfers: the desk runs them and owns bridged human legs (dialer: set once the UA exists)
        self.transfers = TransferDesk(recorder=recorder, dialer=dialer, ring_seconds=transfer_ring_seconds)
        self._legs: dict[str, Leg] = {}
        self._transferring: dict[str, asyncio.Task[TransferResult]] = {}

    # -- the whole life ----------------------------------------------------------------

    def refusal(self) -> Refusal | None:
        """Why a new call would be refused now (503), or None."""
        reason = self.admission()
        if reason is None:
            return None
        return Refusal(503, reason, f"rejected-{reason}", retry_after=True)

    def refused_before_call(self, ingress: str, refusal: Refusal, *, gateway_id: str = "") -> None:
        """An ingress refused an offer before making a call of it (``refusal()`` said no):
        counted, and kept in the record of refusals like a refused call."""
        now = time.time()
        record = CallRecord(
            call_id=new_call_id(),
            ingress=ingress,
            gateway_id=gateway_id,
            started_at=now,
            ended_at=now,
            end_reason=refusal.outcome,
            end_detail=refusal.detail,
        )
        metrics.CALLS_TOTAL.labels(ingress, refusal.outcome).inc()
        self.refusals.add(RefusedCall.of(record, refusal.status))

    async def run(self, call: Call, leg: Leg, *, route: Route | None = None, outbound: bool = False) -> None:
        """The call from arrival to release (returns when everything is released). ``route``:
        the call's route when it was chosen for it (an outbound call), else it is resolved
        here. ``outbound``: the gateway places the call, so no slot means 503 at once (no
        queue, no overflow)."""
        self.begin(call)
        self._legs[call.id] = leg
        counted: Route | None = None
        try:
            refusal = self.refusal()
            if refusal is not None:
                metrics.REJECTED_CALLS.labels(refusal.outcome.removeprefix("rejected-")).inc()
                raise Refused(refusal)
            route = route or self.route_of(call)
            self.routed(call, route)
            await leg.prepare(call)
            if not self.routes.admit(route):
                log.info("call %s: route %s is at its limit of %s calls", call.id, route.name, route.max_calls)
                await self._overflow(call, leg, route, "rejected-route-limit", outbound)
                return
            counted = route
            wait = 0.0 if outbound else self.queue_seconds if route.queue_seconds is None else route.queue_seconds
            if not await self._claim(call, leg, wait):
                if not call.ended.is_set():
                    await self._overflow(call, leg, route, "rejected-busy", outbound)
                return
            if outbound:
                self.store(call)
            if not await leg.answer(call):
                return
            self.answered(call)
            await self._converse(call, leg)
        except Refused as exc:
            refusal = exc.refusal
            with contextlib.suppress(PeerLeft):
                await leg.refuse(refusal)
                call.refused_status = refusal.status
            call.end(refusal.outcome, refusal.detail)
        except PeerLeft as exc:
            if exc.reason == "cancelled":
                call.refused_status = 487  # the SIP stack's answer to a CANCEL
            call.end(exc.reason)
        except asyncio.CancelledError:
            call.end("gateway-stopped")
            raise
        except Exception:
            log.exception("call %s failed", call.id)
            call.end("error")
            with contextlib.suppress(Exception):
                await leg.refuse(INTERNAL_ERROR)
                call.refused_status = INTERNAL_ERROR.status
        finally:
            await self._stop_transfer(call)
            self._legs.pop(call.id, None)
            await leg.close(call)
            await call.release()
            if counted is not None:
                self.routes.release(counted)
            call.mark_end_time()
            with contextlib.suppress(Exception):
                await self.capture.end(call)
            self.finish(call)

    # -- steps -------------------------------------------------------------------------

    def begin(self, call: Call) -> None:
        """A new call: in the table, its transcript to the feed, its DTMF into the transcript."""
        self.table.add(call)
        log.info("%s", story.arrived(call))
        call.frame_watch = FrameWatch(self.stall_seconds)
        call.on_transcript = self._on_transcript
        call.pipeline.taps.dtmf.attach(lambda digit: self._on_dtmf(call, digit))
        metrics.CALLS_ACTIVE.labels(call.ingress).inc()

    def routed(self, call: Call, route: Route) -> None:
        """The call's route is chosen: what its record holds (``capture.begin``) follows it."""
        call.take_route(route)
        self.capture.begin(call)

    def route_of(self, call: Call) -> Route:
        """The call's route (browsers take the ``webrtc`` route); Refused 404 when none fits."""
        routes = self.routes
        route = routes.for_webrtc() if call.ingress == "webrtc" else routes.resolve(call.dialled, call.trunk)
        if route is None:
            metrics.ROUTE_UNMATCHED.inc()
            log.info("call %s: no route for the number dialled", call.id)
            raise Refused(Refusal(404, "no route for this number", "rejected-no-route"))
        return route

    async def _claim(self, call: Call, leg: Leg, wait: float) -> bool:
        """A worker slot, waiting in the queue for up to ``wait`` seconds (the caller hears
        the route's announcement meanwhile). False when no slot came (NoCapacity), or the
        call ended first (it left the queue at once and holds no slot: ``call.ended`` set)."""
        prompt = self.routes.prompt(call.route.announcement) if call.route is not None else None
        claim = asyncio.create_task(
            call.connect(self.router, wait=wait, on_queued=lambda: leg.queued(call, prompt)), name=f"claim-{call.id}"
        )
        left = asyncio.ensure_future(leg.left())
        ended = asyncio.ensure_future(call.ended.wait())
        try:
            await asyncio.wait({claim, left, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            left.cancel()
            ended.cancel()
            if not claim.done():
                claim.cancel()  # leaves the queue; a claim under way is released (routing/router.py)
                await asyncio.gather(claim, return_exceptions=True)
        if left.done() and not left.cancelled() and left.exception() is None:
            call.end(left.result())
            if claim.cancelled():
                metrics.ABANDONED_CALLS.inc()
                log.info("call %s: the caller hung up while waiting for a slot", call.id)
        if claim.cancelled():
            return False
        try:
            claim.result()
        except NoCapacity as exc:
            metrics.REJECTED_CALLS.labels("no-slot").inc()
            log.info("call %s: no capacity: %s", call.id, exc)
            return False
        except RoutingUnavailable as exc:
            metrics.REJECTED_CALLS.labels("pool-unavailable").inc()
            log.warning("call %s: pool unavailable: %s", call.id, exc)
            raise Refused(Refusal(503, "pool unavailable", "rejected-pool", retry_after=True)) from None
        return not call.ended.is_set()

    async def _overflow(self, call: Call, leg: Leg, route: Route, outcome: str, outbound: bool = False) -> None:
        """No slot for the call (``outcome``: rejected-busy, or rejected-route-limit): the
        route's overflow. ``reject`` (and a transfer that cannot be made, and any outbound
        call) answers 503."""
        overflow = route.overflow
        if outbound:
            overflow = Overflow()
        metrics.ROUTE_OVERFLOWS.labels(route.name, overflow.action).inc()
        if overflow.action == "message":
            await self._play_message(call, leg, self.routes.prompt(overflow.message), "overflow-message")
            return
        target = route.transfer_target(overflow.target) if overflow.action == "transfer" else None
        if target is not None:
            await self._overflow_transfer(call, leg, route, target)
            return
        detail = "all agents busy" if outcome == "rejected-busy" else "too many calls on this line"
        raise Refused(Refusal(503, detail, outcome, retry_after=True))

    async def _overflow_transfer(self, call: Call, leg: Leg, route: Route, target: str) -> None:
        """No AI for the caller: answer, and hand the call to the humans (the transfer's one
        entry point, ``by="overflow"``) while the route's announcement plays. Bridged, the
        call goes on with the person; if nobody takes it, the caller hears the route's
        message, if it has one, and the call ends (``overflow-transfer-failed``)."""
        if not await leg.answer(call):
            return
        self.answered(call)
        prompt = self.routes.prompt(route.announcement)
        player = (
            PromptPlayer(prompt, call.pipeline.play, keep_going=lambda: not call.pipeline.model_frames)
            if prompt is not None
            else None
        )
        if player is not None:
            player.start()
        watch = asyncio.create_task(leg.watch(call), name=f"watch-{call.id}")
        ended = asyncio.ensure_future(call.ended.wait())
        try:
            task = self.start_transfer(call, target, by="overflow")
            await asyncio.wait({task, ended}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():  # the caller hung up: the transfer stops with the call (run's finally)
                return
            result = task.result()
            problem = "" if result.transferred else f"{result.status or ''} {result.reason}".strip()
        except TransferError as exc:
            problem = exc.detail
        finally:
            ended.cancel()
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
            if player is not None:
                await player.stop()
        if not problem:
            call.pipeline.stop_prompt()
            await self._converse(call, leg)  # with the person now (or handed over by REFER: it ends)
            return
        log.info("call %s: the overflow transfer to %s failed: %s", call.id, target, problem)
        call.pipeline.stop_prompt()
        message = self.routes.prompt(route.overflow.message)
        if message is not None and not call.ended.is_set():
            await self._play_prompt(call, message)
        call.end("overflow-transfer-failed", problem)
        await leg.hang_up(call)

    async def _play_message(self, call: Call, leg: Leg, prompt: Prompt | None, reason: str) -> None:
        """Answer without an AI, play ``prompt`` to its end, hang up (end reason ``reason``)."""
        if not await leg.answer(call):
            return
        self.answered(call)
        watch = asyncio.create_task(leg.watch(call), name=f"watch-{call.id}")
        try:
            if prompt is not None:
                await self._play_prompt(call, prompt)
            call.end(reason)
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        await leg.hang_up(call)

    async def _play_prompt(self, call: Call, prompt: Prompt) -> None:
        """Play ``prompt`` to the caller to its end (and let it play out), or until the call ends."""
        player = PromptPlayer(prompt, call.pipeline.play)
        player.start()
        done = asyncio.ensure_future(player.done.wait())
        ended = asyncio.ensure_future(call.ended.wait())
        try:
            await asyncio.wait({done, ended}, return_when=asyncio.FIRST_COMPLETED)
            if not call.ended.is_set():
                await asyncio.sleep(min(PLAYOUT_GRACE_SECONDS, 0.02 * call.pipeline.queued_packets + 0.1))
        finally:
            done.cancel()
            ended.cancel()
            await player.stop()

    def answered(self, call: Call) -> None:
        """The call is answered: from now on it is stored (its record, and its transcript
        with the pieces that came before the answer)."""
        call.mark_answered()
        self.capture.answered(call)  # the recording's entry is in the record from its creation
        self.store(call)

    def store(self, call: Call) -> None:
        """From now on the call is kept (Redis): its record, and the transcript so far. An
        inbound call from its answer; an outbound call from its admission, when the API
        hands out its id (so a callee that is busy or does not answer is on record)."""
        if call.stored:
            return
        call.stored = True
        self.recorder.create(call)
        for seq, event in enumerate(list(call.transcript)):
            self.transcripts.store(call.id, seq, event)

    def media_changed(self, call: Call) -> None:
        """The call's media was agreed after the answer (SIP: the answer came in the ACK)."""
        self.recorder.update(call, "codec", "media_encryption")

    async def _converse(self, call: Call, leg: Leg) -> None:
        tasks = [
            asyncio.create_task(call.supervise(self.router), name=f"supervise-{call.id}"),
            asyncio.create_task(leg.watch(call), name=f"watch-{call.id}"),
            asyncio.create_task(self._watch_rtp(call), name=f"rtp-watch-{call.id}"),
        ]
        limit = call.route.max_call_seconds if call.route is not None else None
        if limit is not None:
            tasks.append(asyncio.create_task(self._limit_length(call, limit), name=f"max-length-{call.id}"))
        try:
            await call.ended.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if call.end_reason in PLAY_OUT_REASONS:
            await asyncio.sleep(min(PLAYOUT_GRACE_SECONDS, 0.02 * call.pipeline.queued_packets))
        await leg.hang_up(call)

    async def _limit_length(self, call: Call, seconds: float) -> None:
        """End the call cleanly at its route's maximum length."""
        await asyncio.sleep(max(0.0, seconds - call.call_seconds))
        log.info("call %s: reached its route's maximum length (%.0f s)", call.id, seconds)
        call.end("max_duration")

    async def _watch_rtp(self, call: Call) -> None:
        """Hang up on a caller whose packets stopped coming for the RTP timeout."""
        timeout = self.rtp_timeout_seconds
        if timeout <= 0:
            return
        while True:
            await asyncio.sleep(RTP_TIMEOUT_CHECK_SECONDS)
            silent = call.pipeline.silent_seconds()
            if silent is not None and silent > timeout:
                log.warning("call %s: no RTP for %.0fs, hanging up", call.id, timeout)
                call.end("rtp-timeout")
                return

    def finish(self, call: Call) -> None:
        """The call is over and released: its final record and transcript, metrics, hooks."""
        if self.table.get(call.id) is not call:
            return
        call.mark_ended()
        call.record.quality = call.quality()
        self.table.remove(call, keep=call.stored)
        record = call.record
        metrics.CALLS_ACTIVE.labels(call.ingress).dec()
        metrics.CALLS_TOTAL.labels(call.ingress, record.end_reason or "unknown").inc()
        if call.stored:
            if record.answered_at is not None and record.ended_at is not None:
                metrics.CALL_DURATION.observe(record.ended_at - record.answered_at)
            if record.recording is not None:
                self.recorder.update(call, "recording")
            self.recorder.end(call)
            self.transcripts.end(call.id, record.end_reason or "unknown")
        else:  # never a call the center had: nothing stored, a short-lived entry at most
            self.refusals.add(RefusedCall.of(record, call.refused_status, call.identity))
            self.transcripts.end(call.id, record.end_reason or "unknown", store=False)
        for hook in self.on_end:
            try:
                hook(call)
            except Exception:
                log.exception("call %s: an end hook failed", call.id)
        log.info("%s", story.ended(call))

    # -- while calls run ---------------------------------------------------------------

    def _on_transcript(self, call: Call, event: TranscriptEvent) -> None:
        # stored from the answer on (``answered`` stores what came before)
        self.transcripts.publish(call.id, len(call.transcript) - 1, event, store=call.stored)

    def _on_dtmf(self, call: Call, digit: Digit) -> None:
        metrics.DTMF_DIGITS.inc()
        call.add_transcript(
            TranscriptEvent(
                t=call.call_seconds, kind=DTMF, text=self.capture.dtmf_text(call, digit), duration_ms=digit.duration_ms
            )
        )
        route = call.route
        action = route.dtmf.get(digit.digit.upper()) if route is not None else None
        if action is None or route is None or not call.answered or call.ended.is_set():
            return
        if action.action == "hangup":
            log.info("call %s: the caller pressed %s: hang up", call.id, digit.digit)
            call.end("dtmf-hangup")
            return
        target = route.transfer_target(action.target)
        if target is not None:
            log.info("call %s: the caller pressed %s: transfer", call.id, digit.digit)
            try:
                self.start_transfer(call, target, by="dtmf")
            except TransferError as exc:  # under way already, with a person already: the key does nothing
                log.info("call %s: no transfer: %s", call.id, exc.detail)

    async def watch_stalls(self) -> None:
        """One watchdog for every call (not a timer per call): flags stalled worker sessions.
        A round that wakes late skips its judgement: the gateway's own loop was held up,
        and frames the workers sent meanwhile may still wait unread in the sockets."""
        period = self.stall_seconds / WATCHDOG_CHECKS
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + period
            await asyncio.sleep(period)
            if loop.time() - due > period:
                metrics.STALL_CHECKS_SKIPPED.inc()
                continue
            now = time.monotonic()
            for call in list(self.table.live.values()):
                call.check_stall(now)

    # -- transfer to a human (calls/transfer.py) -----------------------------------------

    def start_transfer(
        self, call: Call, target: str, *, mode: str = "auto", by: str = "api", ring_seconds: float | None = None
    ) -> asyncio.Task[TransferResult]:
        """Start handing ``call`` to a person at ``target`` (``sip:``, ``sips:`` or ``tel:``);
        ``mode`` auto, refer or bridge; ``by`` who asked (api, dtmf, overflow: recorded);
        ``ring_seconds`` how long the person may take to answer (default: the gateway's
        ``--transfer-ring-seconds``; a route's own time). Returns the running transfer,
        whose result says how it went (:class:`TransferResult`; a failure leaves the caller
        with the AI). Raises :class:`TransferError` at once, with nothing recorded, when it
        cannot be tried: 422 a bad target or mode, 409 the call is not answered, has ended,
        is with a human already or is being transferred."""
        target, mode = check_target(target), check_mode(mode)
        if self.table.get(call.id) is not call or call.ended.is_set():
            raise TransferError(409, f"call {call.id} has ended")
        if not call.answered:
            raise TransferError(409, f"call {call.id} is not answered yet")
        if call.phase is not None and call.phase.kind == "human":
            raise TransferError(409, f"call {call.id} is with a person already")
        running = self._transferring.get(call.id)
        if running is not None and not running.done():
            raise TransferError(409, f"a transfer of call {call.id} is under way")
        leg = self._legs.get(call.id)
        if leg is None:
            raise TransferError(409, f"call {call.id} has no leg to transfer")
        self.transfers.plan(leg, mode)  # a mode this call cannot use is refused now (409)
        task = asyncio.create_task(
            self.transfers.run(call, leg, target, mode=mode, by=by, ring_seconds=ring_seconds),
            name=f"transfer-{call.id}",
        )
        self._transferring[call.id] = task
        task.add_done_callback(lambda done: self._transfer_done(call.id, done))
        return task

    async def transfer(
        self, call: Call, target: str, *, mode: str = "auto", by: str = "api", ring_seconds: float | None = None
    ) -> TransferResult:
        """:meth:`start_transfer`, awaited: the transfer's result. Cancelling the caller of
        this does not stop the transfer (the call owns it)."""
        task = self.start_transfer(call, target, mode=mode, by=by, ring_seconds=ring_seconds)
        return await asyncio.shield(task)

    def _transfer_done(self, call_id: str, task: asyncio.Task[TransferResult]) -> None:
        if self._transferring.get(call_id) is task:
            del self._transferring[call_id]
        if not task.cancelled() and task.exception() is not None:
            log.error("call %s: the transfer failed", call_id, exc_info=task.exception())

    async def _stop_transfer(self, call: Call) -> None:
        """The call is over: a transfer under way stops (a ringing person's call is
        cancelled) and a bridged person gets a BYE."""
        task = self._transferring.get(call.id)
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self.transfers.close(call)

    def hang_up(self, call_id: str, reason: str = "api-hangup") -> bool:
        """End a call of this gateway (its leg hangs up); False when it is not here."""
        call = self.table.get(call_id)
        if call is None:
            return False
        call.end(reason)
        return True
