"""Transfer to a human: hand an answered call from the AI to a person, by REFER or by bridging.

``CallLifecycle.transfer(call, target, mode=, by=, ring_seconds=)`` is the one entry point
(the API, a route's DTMF action and its overflow rule all use it); the lifecycle checks
the call and runs one :class:`TransferDesk` procedure at a time per call:

* **refer** (a blind transfer, SIP only): the call's leg sends REFER (``Refer-To`` the
  target, ``Referred-By`` us) and the peer places the call; its NOTIFYs report progress.
  On the final ``SIP/2.0 2xx`` the model's slot is released and the gateway hangs up its
  leg (end reason ``transferred``); on a refusal, a NOTIFY with a final error or no final
  NOTIFY within the ring time, the caller stays with the AI and the failure is recorded.
* **bridge** (a B2BUA): the gateway places a call to the target itself (``Dialer``, SIP
  ingress: a second RTP leg with its own codec, jitter buffer and pacer) while the caller
  goes on talking to the AI. When the person answers, the model's slot is released and
  the pipeline is bridged (``MediaPipeline.bridge``): the caller's audio goes to the
  person, the person's to the caller (and to the ``agent`` tap), packet by packet when
  both legs are SIP with the same rate and packet time (``CallMedia.start_relay``), else in
  the pipeline's 80 ms frames (a WebRTC caller, different rates). Nobody answering
  within the ring time leaves the caller with the AI. Then either side hanging up ends
  both: the person's BYE ends the call (``human-bye``) and the caller gets a BYE; the
  caller's BYE ends the call and the person gets one.
* **auto** (the default): REFER when the leg can send one and the peer's ``Allow`` does not
  rule it out; a peer that will not take it (403, 405, 420, 501, 603) is bridged instead.

Each attempt is a :class:`~service.call_record.TransferAttempt` in the record and a
``transfer`` piece in the transcript; a hand-over closes the ``ai`` phase and opens a
``human`` one. A transfer refused before anything was tried (the call unknown, not
answered yet, ended, already being transferred; a target that is no URI) raises
:class:`TransferError` and records nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import typing as tp
from dataclasses import dataclass

from service.call_record import CallPhase, CallQuality, TransferAttempt
from service.gateway import metrics
from service.gateway.calls.transcript import TranscriptEvent
from sip.errors import SipParseError
from sip.uri import AbsoluteUri, SipUri, parse_uri

if tp.TYPE_CHECKING:
    from service.gateway.calls.call import Call
    from service.gateway.calls.recorder import CallRecorder
    from service.gateway.routing.router import WorkerSession
    from sip.refer import Referral

log = logging.getLogger(__name__)

MODES = ("auto", "refer", "bridge")
NO_REFER_STATUSES = frozenset({403, 405, 420, 501, 603})  # the peer will not take a REFER: bridge instead
TRANSFERRED, FAILED = "transferred", "failed"
MAX_TARGET_CHARS = 256
TEL_VISUAL_SEPARATORS = str.maketrans("", "", "-.() ")
HUMAN_BYE = "human-bye"  # the end reason when the person hangs up a bridged call


class TransferError(Exception):
    """A transfer refused before anything was tried: ``status`` as HTTP says it (404
    unknown call, 409 not possible in the call's state, 422 a bad target or mode)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass
class TransferResult:
    """How a transfer went: ``outcome`` transferred or failed (the caller stayed with the
    AI), ``mode`` how it was last tried (refer, bridge), the SIP ``status`` that decided it
    and ``reason`` in words, ``seconds`` from the request to the hand-over or failure."""

    call_id: str
    target: str
    outcome: str
    mode: str
    status: int | None
    reason: str
    seconds: float
    by: str = "api"

    @property
    def transferred(self) -> bool:
        return self.outcome == TRANSFERRED

    def to_dict(self) -> dict[str, tp.Any]:
        return {
            "call_id": self.call_id,
            "target": self.target,
            "outcome": self.outcome,
            "mode": self.mode,
            "status": self.status,
            "reason": self.reason,
            "seconds": self.seconds,
            "by": self.by,
        }

    @classmethod
    def from_dict(cls, values: dict[str, tp.Any]) -> TransferResult:
        return cls(
            call_id=str(values["call_id"]),
            target=str(values["target"]),
            outcome=str(values["outcome"]),
            mode=str(values["mode"]),
            status=values.get("status"),
            reason=str(values.get("reason", "")),
            seconds=float(values.get("seconds", 0.0)),
            by=str(values.get("by", "api")),
        )


def check_target(text: str) -> str:
    """A transfer target as it will be used: a ``sip:``/``sips:`` URI, or a ``tel:`` number
    (``+`` and digits; visual separators dropped). Raises TransferError 422."""
    if not isinstance(text, str) or not text or len(text) > MAX_TARGET_CHARS:
        raise TransferError(422, f"target: a sip:, sips: or tel: URI of at most {MAX_TARGET_CHARS} characters")
    try:
        uri = parse_uri(text.strip(), "target")
    except SipParseError as exc:
        raise TransferError(422, f"target: {exc}") from None
    if isinstance(uri, SipUri):
        if uri.headers:
            raise TransferError(422, "target: URI headers (?...) are not allowed")
        return str(uri)
    if isinstance(uri, AbsoluteUri) and uri.scheme.lower() == "tel":
        number, _, params = uri.opaque.partition(";")
        number = number.translate(TEL_VISUAL_SEPARATORS)
        digits = number.removeprefix("+")
        if not digits.isdigit() or not 3 <= len(digits) <= 20 or params:
            raise TransferError(422, "target: a tel: URI is tel:+<digits> (or a national number), without parameters")
        return f"tel:{number}"
    raise TransferError(422, "target: a sip:, sips: or tel: URI")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise TransferError(422, f"mode: one of {', '.join(MODES)}")
    return mode


# -- what the transfer needs of the call's legs ------------------------------------------


@tp.runtime_checkable
class ReferringLeg(tp.Protocol):
    """A leg whose peer can be asked to transfer the call itself (SIP: REFER)."""

    def refer_allowed(self) -> bool:
        """False when the peer said it does not take REFER (its Allow header)."""

    async def refer(self, target: str) -> Referral:
        """Send the REFER (``sip.refer``); raises RuntimeError when the leg has no dialog."""


class HumanLeg(tp.Protocol):
    """The bridged transfer's second leg: the call the gateway placed to the person, up.

    ``on_frame`` gets the person's audio, 80 ms frames at 24 kHz; ``send_frame`` takes the
    caller's; ``ended`` resolves with why the leg ended (``remote-bye``: the person hung up);
    ``hang_up`` says goodbye (BYE); ``close`` releases its media, never raises."""

    on_frame: tp.Callable[[bytes], None] | None
    ended: asyncio.Future[str]

    def send_frame(self, frame: bytes) -> None: ...
    def relay_with(self, edge: object) -> bool:
        """Carry the audio packet by packet between this leg and the caller's media ``edge``
        when both allow it (same rate and packet time); False: the 80 ms frames carry it."""

    def quality(self) -> CallQuality: ...
    async def hang_up(self) -> None: ...
    async def close(self) -> None: ...


class DialFailed(Exception):
    """The call to the person did not come up: its SIP ``status`` and ``reason``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


class Dialer(tp.Protocol):
    """Places the bridged transfer's call (``ingress/sip_dialer.py``)."""

    async def dial(self, call: Call, target: str, *, ring_seconds: float) -> HumanLeg:
        """The person's answered leg; DialFailed when nobody answered (408 after
        ``ring_seconds``), they refused, or the target cannot be reached. Cancelling it
        cancels the call attempt (CANCEL)."""


# -- the procedure ---------------------------------------------------------------------------


class TransferDesk:
    """Runs transfers and owns the human legs of bridged calls (see the module docstring)."""

    def __init__(self, *, recorder: CallRecorder, dialer: Dialer | None, ring_seconds: float) -> None:
        self.recorder = recorder
        self.dialer = dialer
        self.ring_seconds = ring_seconds
        self.humans: dict[str, HumanLeg] = {}  # call id → its bridged human leg
        self._closing: set[asyncio.Future[None]] = set()  # released model sessions being closed

    def plan(self, leg: object, mode: str) -> str:
        """The first way to try: refer or bridge. Raises TransferError 409 when ``mode`` cannot work."""
        can_refer = isinstance(leg, ReferringLeg)
        if mode == "refer":
            if not can_refer:
                raise TransferError(409, "this call's ingress cannot send a REFER (mode refer needs SIP)")
            return "refer"
        if mode == "bridge" or not can_refer:
            if self.dialer is None:
                raise TransferError(409, "bridged transfers need the gateway's SIP user agent")
            return "bridge"
        assert isinstance(leg, ReferringLeg)
        if leg.refer_allowed() or self.dialer is None:
            return "refer"
        return "bridge"  # the peer's Allow says it takes no REFER: do not ask

    async def run(
        self, call: Call, leg: object, target: str, *, mode: str, by: str, ring_seconds: float | None
    ) -> TransferResult:
        ring = self.ring_seconds if ring_seconds is None else ring_seconds
        first = self.plan(leg, mode)
        started = time.monotonic()
        attempt = TransferAttempt(target=target, by=by, mode=first, requested_at=time.time())
        call.record.transfers.append(attempt)
        self.recorder.update(call, "transfers")
        log.info("call %s: transfer to %s (%s, by %s)", call.id, target, first, by)
        try:
            if first == "refer":
                assert isinstance(leg, ReferringLeg)
                status, reason = await self._refer(call, leg, target, ring)
                if 200 <= status < 300:
                    result = self._handed_over(call, attempt, "refer", status, reason, started)
                    await self._release(call.detach_model())
                    call.end("transferred")  # the leg hangs up (BYE): the peer has the caller now
                    return result
                if mode == "refer" or status not in NO_REFER_STATUSES or self.dialer is None:
                    return self._failed(call, attempt, status, reason, started)
                log.info("call %s: the peer will not take a REFER (%d %s): bridging", call.id, status, reason)
                attempt.mode = "bridge"
                attempt.reason = f"the REFER was refused ({status} {reason}); bridging"
                self.recorder.update(call, "transfers")
            return await self._bridge(call, target, attempt, ring, started)
        except asyncio.CancelledError:
            if attempt.outcome == "pending":
                self._failed(call, attempt, 487, f"the call ended ({call.end_reason or 'cancelled'})", started)
            raise

    # -- REFER -------------------------------------------------------------------------

    async def _refer(self, call: Call, leg: ReferringLeg, target: str, ring: float) -> tuple[int, str]:
        try:
            referral = await leg.refer(target)
        except RuntimeError as exc:
            return 481, str(exc)
        if referral.accepted:
            log.info(
                "call %s: REFER accepted (%d); waiting for the transfer's outcome",
                call.id,
                referral.response.status if referral.response is not None else 0,
            )
        outcome = await referral.outcome(ring + 5.0)  # the peer's own ring time, and a margin
        return outcome.status, outcome.reason

    # -- bridge ------------------------------------------------------------------------

    async def _bridge(
        self, call: Call, target: str, attempt: TransferAttempt, ring: float, started: float
    ) -> TransferResult:
        assert self.dialer is not None
        dialing = asyncio.ensure_future(self.dialer.dial(call, target, ring_seconds=ring))
        ended = asyncio.ensure_future(call.ended.wait())
        try:
            await asyncio.wait({dialing, ended}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            await self._abandon(dialing)
            raise
        finally:
            ended.cancel()
        if not dialing.done():
            await self._abandon(dialing)  # the caller left first: the person's phone stops ringing
        if dialing.cancelled():
            return self._failed(call, attempt, 487, f"the caller hung up first ({call.end_reason})", started)
        try:
            human = dialing.result()
        except DialFailed as exc:
            return self._failed(call, attempt, exc.status, exc.reason, started)
        if call.ended.is_set():
            await human.hang_up()
            await human.close()
            return self._failed(call, attempt, 487, f"the caller hung up first ({call.end_reason})", started)
        # The person answered: the caller is theirs from now on, the model's slot goes back.
        self.humans[call.id] = human
        session = call.detach_model()
        if human.relay_with(call.pipeline.edge):
            human.on_frame = call.pipeline.taps.agent.emit  # the frames only feed the tap: the relay plays
            log.info("call %s: the caller and the person are relayed packet by packet", call.id)
        else:
            human.on_frame = call.pipeline.from_model
            log.info(
                "call %s: the caller and the person are relayed in 80 ms frames (rates or packet times "
                "differ, or the caller is not on SIP)",
                call.id,
            )
        call.pipeline.bridge(human)
        if call.recording is not None and not call.policy.recording_transfer:
            # the recording's right channel would carry the person from now: the route says no
            call.recording.hold(round(call.call_seconds, 3))
            call.add_transcript(
                TranscriptEvent(
                    t=call.call_seconds, kind="note", text="recording stopped: the part with a person is not recorded"
                )
            )
            self.recorder.update(call, "recording")

        def human_ended(future: asyncio.Future[str]) -> None:
            reason = future.result() if not future.cancelled() and future.exception() is None else "error"
            call.end(
                HUMAN_BYE if reason == "remote-bye" else "human-lost",
                "" if reason == "remote-bye" else f"the person's leg ended: {reason}",
            )

        human.ended.add_done_callback(human_ended)
        refused = attempt.reason.partition(";")[0]
        result = self._handed_over(
            call, attempt, "bridge", 200, f"answered ({refused})" if refused else "answered", started
        )
        await self._release(session)
        return result

    async def _release(self, session: WorkerSession | None) -> None:
        """Close a detached model session (its lease goes back), to the end even when the
        transfer is cancelled meanwhile (the call ended)."""
        if session is None:
            return
        closing = asyncio.ensure_future(session.close())
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)
        await asyncio.shield(closing)

    @staticmethod
    async def _abandon(dialing: asyncio.Future[HumanLeg]) -> None:
        """Give up a call to the person: CANCEL while it rings; hang up one that answered."""
        if not dialing.done():
            dialing.cancel()
        with contextlib.suppress(asyncio.CancelledError, DialFailed):
            human = await asyncio.shield(dialing) if not dialing.done() else dialing.result()
            await human.hang_up()
            await human.close()

    async def close(self, call: Call) -> None:
        """The call is over: the person (if any) gets a BYE and the leg's media stops."""
        human = self.humans.pop(call.id, None)
        if human is None:
            return
        phase = call.phase
        if phase is not None and phase.kind == "human":
            phase.quality = human.quality()
        await human.hang_up()
        await human.close()

    def quality(self, call: Call) -> CallQuality | None:
        """The bridged human leg's quality now (None when the call has none)."""
        human = self.humans.get(call.id)
        return human.quality() if human is not None else None

    # -- outcomes ----------------------------------------------------------------------

    def _handed_over(
        self, call: Call, attempt: TransferAttempt, mode: str, status: int, reason: str, started: float
    ) -> TransferResult:
        seconds = round(time.monotonic() - started, 3)
        now = time.time()
        call.begin_phase(CallPhase("human", start=now, target=attempt.target, mode=mode))
        attempt.mode, attempt.outcome, attempt.status, attempt.reason, attempt.seconds = (
            mode,
            TRANSFERRED,
            status,
            reason,
            seconds,
        )
        metrics.TRANSFERS.labels(mode, TRANSFERRED).inc()
        metrics.TRANSFER_SECONDS.labels(mode).observe(seconds)
        call.add_transcript(
            TranscriptEvent(t=call.call_seconds, kind="transfer", text=f"transferred to {attempt.target} ({mode})")
        )
        self.recorder.update(call, "transfers", "phases")
        log.info("call %s: transferred to %s by %s in %.2fs", call.id, attempt.target, mode, seconds)
        return TransferResult(call.id, attempt.target, TRANSFERRED, mode, status, reason, seconds, attempt.by)

    def _failed(self, call: Call, attempt: TransferAttempt, status: int, reason: str, started: float) -> TransferResult:
        seconds = round(time.monotonic() - started, 3)
        attempt.outcome, attempt.status, attempt.reason, attempt.seconds = FAILED, status, reason, seconds
        metrics.TRANSFERS.labels(attempt.mode, FAILED).inc()
        call.add_transcript(
            TranscriptEvent(
                t=call.call_seconds,
                kind="transfer",
                text=f"transfer to {attempt.target} failed ({attempt.mode}): {status} {reason}".rstrip(),
            )
        )
        self.recorder.update(call, "transfers")
        log.info(
            "call %s: transfer to %s failed (%s): %d %s; the caller stays with the AI",
            call.id,
            attempt.target,
            attempt.mode,
            status,
            reason,
        )
        return TransferResult(call.id, attempt.target, FAILED, attempt.mode, status, reason, seconds, attempt.by)
