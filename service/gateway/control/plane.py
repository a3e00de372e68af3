"""The gateway's side of the control plane: what the API's ``CallControl`` asks, answered
from the call table, the Redis records and streams, the pool and the WebRTC ingress."""

from __future__ import annotations

import asyncio
import logging
import typing as tp

from service.api.control import (
    ControlError,
    IceServer,
    RecordingStream,
    TranscriptEnd,
    WebRtcAnswer,
    WebRtcConfig,
)
from service.api.models import (
    CallInfo,
    CallList,
    DrainResult,
    HangupResult,
    PlacedCall,
    PoolHistory,
    PoolSample,
    PoolState,
    Readiness,
    RecordingControl,
    RefusalList,
    RefusedCallInfo,
    Transcript,
    TranscriptPiece,
    TransferOutcome,
)
from service.gateway.calls.capture import CaptureError
from service.gateway.calls.lifecycle import CallLifecycle
from service.gateway.calls.transfer import TransferError, TransferResult, check_mode, check_target
from service.gateway.control.commands import HANGUP, CallCommands
from service.gateway.control.concurrency import ConcurrencyHistory
from service.gateway.control.directory import CallDirectory, redis_failed, refused_fields
from service.gateway.control.pool_view import PoolView
from service.gateway.control.transcript_reader import TranscriptReader
from service.gateway.control.transfers import NoGateway, TransferChannel
from service.gateway.ingress.outbound import OutboundCalls
from service.gateway.ingress.webrtc import OfferRejected, WebRtcIngress
from service.gateway.recording.storage import NotStored, Storage
from service.pool import ENDED, PoolError

log = logging.getLogger("moshimoshi.api")


class GatewayControl:
    """Implements ``service.api.control.CallControl`` for one gateway."""

    def __init__(
        self,
        *,
        lifecycle: CallLifecycle,
        directory: CallDirectory,
        transcripts: TranscriptReader,
        pool: PoolView,
        webrtc: WebRtcIngress,
        outbound: OutboundCalls,
        commands: CallCommands | None,
        readiness: tp.Callable[[], Readiness],
        retry_after_seconds: int,
        transfers: TransferChannel | None = None,
        recordings: Storage | None = None,
        concurrency: ConcurrencyHistory | None = None,
    ) -> None:
        self.lifecycle = lifecycle
        self.directory = directory
        self.transcripts = transcripts
        self.pool_view = pool
        self.webrtc = webrtc
        self.outbound = outbound
        self.commands = commands
        self.transfers = transfers
        self.recordings = recordings
        self._readiness = readiness
        self.retry_after_seconds = retry_after_seconds
        self.concurrency = concurrency or ConcurrencyHistory()

    def readiness(self) -> Readiness:
        return self._readiness()

    # -- calls -------------------------------------------------------------------------

    async def list_calls(
        self, *, state: str | None, since: float | None, worker_id: str | None, limit: int
    ) -> CallList:
        calls, partial = await self.directory.list(state=state, since=since, worker_id=worker_id, limit=limit)
        return CallList(calls=calls, partial=partial)

    async def get_call(self, call_id: str) -> CallInfo:
        """A call from any gateway: 404 if unknown (or past its retention), 503 if Redis is down."""
        try:
            found = await self.directory.get(call_id)
        except PoolError:
            redis_failed()
            raise ControlError(503, "call records unavailable (Redis unreachable)") from None
        if found is None:
            raise ControlError(404, f"no call {call_id!r} (unknown, or past its retention)")
        return found

    async def hang_up(self, call_id: str) -> HangupResult:
        if self.lifecycle.hang_up(call_id):
            log.info("call %s: hang-up requested through the API", call_id)
            return HangupResult(call_id=call_id, status="hanging-up", on_this_gateway=True)
        found = await self.get_call(call_id)
        if found.state == ENDED or self.commands is None:
            raise ControlError(409, f"call {call_id!r} has ended")
        try:
            await self.commands.publish(call_id, HANGUP)
        except PoolError:
            redis_failed()
            raise ControlError(503, "cannot reach the call's gateway (Redis unreachable)") from None
        log.info(
            "call %s: hang-up requested through the API, sent to gateway %s", call_id, found.gateway_id or "(unknown)"
        )
        return HangupResult(call_id=call_id, status="hanging-up", on_this_gateway=False)

    async def refusals(self, *, limit: int) -> RefusalList:
        summary = await self.directory.refusals.summary(limit=limit)
        if summary.partial:
            redis_failed()
        return RefusalList(
            window_seconds=summary.window_seconds,
            total=summary.total,
            by_reason=summary.by_reason,
            refusals=[RefusedCallInfo(id=r.call_id, **refused_fields(r)) for r in summary.latest],
            partial=summary.partial,
        )

    async def place_call(self, to: str, caller_id: str | None, route: str | None) -> PlacedCall:
        call = await self.outbound.place(to, caller_id, route)
        log.info("call %s: outbound call placed through the API (route %s)", call.id, call.record.route)
        return PlacedCall(call_id=call.id, route=call.record.route)

    async def transfer(self, call_id: str, target: str, mode: str) -> TransferOutcome:
        call = self.lifecycle.table.get(call_id)
        try:
            target, mode = check_target(target), check_mode(mode)  # 422 before anything is looked up
            if call is not None:
                return _outcome(await self.lifecycle.transfer(call, target, mode=mode, by="api"), True)
            found = await self.get_call(call_id)
            if found.state == ENDED:
                raise ControlError(409, f"call {call_id!r} has ended")
            if self.transfers is None:
                raise ControlError(409, f"call {call_id!r} is not on this gateway")
            try:
                result = await self.transfers.request(call_id, target, mode)
            except NoGateway as exc:
                raise ControlError(409, str(exc)) from None
            except PoolError:
                redis_failed()
                raise ControlError(503, "cannot reach the call's gateway (Redis unreachable)") from None
            return _outcome(result, False)
        except TransferError as exc:
            raise ControlError(exc.status, exc.detail) from None

    def start_transfer(self, call_id: str, target: str, mode: str) -> tuple[float, tp.Any] | None:
        """For another replica's API (``TransferChannel``): start transferring our call."""
        call = self.lifecycle.table.get(call_id)
        if call is None:
            return None
        task = self.lifecycle.start_transfer(call, target, mode=mode, by="api")
        return self.lifecycle.transfers.ring_seconds, task

    # -- transcripts -------------------------------------------------------------------

    async def transcript(self, call_id: str) -> Transcript:
        return await self.transcripts.load(call_id)

    def follow_transcript(self, call_id: str) -> tp.AsyncIterator[TranscriptPiece | TranscriptEnd]:
        return self.transcripts.follow(call_id)

    # -- recordings --------------------------------------------------------------------

    async def recording(self, call_id: str) -> RecordingStream:
        found = await self.get_call(call_id)
        info = found.recording
        if info is None:
            raise ControlError(404, f"call {call_id!r} was not recorded")
        if info.state in ("recording", "paused", "storing"):
            raise ControlError(
                409,
                f"the recording of call {call_id!r} is not stored yet ({info.state}); it is once the call has ended",
            )
        if info.state != "stored" or not info.location:
            raise ControlError(404, f"call {call_id!r} has no stored recording ({info.error or info.state})")
        storage = self.recordings
        if storage is None:
            raise ControlError(404, "this gateway has no recording storage configured")
        try:
            size, chunks = await asyncio.to_thread(storage.open, info.location)
        except NotStored as exc:
            raise ControlError(404, str(exc)) from None
        except Exception as exc:  # the bucket unreachable, credentials refused
            log.warning("call %s: recording unreadable: %s", call_id, type(exc).__name__)
            raise ControlError(503, f"the recording storage did not answer ({type(exc).__name__})") from None
        return RecordingStream(info=info, size=size, chunks=_in_threads(chunks))

    async def pause_recording(self, call_id: str) -> RecordingControl:
        return await self._recording_request(call_id, "pause")

    async def resume_recording(self, call_id: str) -> RecordingControl:
        return await self._recording_request(call_id, "resume")

    async def _recording_request(self, call_id: str, op: str) -> RecordingControl:
        state = "paused" if op == "pause" else "recording"
        call = self.lifecycle.table.get(call_id)
        if call is not None:
            try:
                at = self.lifecycle.capture.pause(call) if op == "pause" else self.lifecycle.capture.resume(call)
            except CaptureError as exc:
                raise ControlError(exc.status, exc.detail) from None
            self.lifecycle.recorder.update(call, "recording")
            log.info("call %s: recording %s through the API", call_id, state)
            return RecordingControl(call_id=call_id, state=state, at=round(at, 3), on_this_gateway=True)
        found = await self.get_call(call_id)
        if found.state == ENDED or self.commands is None:
            raise ControlError(409, f"call {call_id!r} has ended")
        try:
            await self.commands.publish(call_id, op)
        except PoolError:
            redis_failed()
            raise ControlError(503, "cannot reach the call's gateway (Redis unreachable)") from None
        log.info("call %s: recording %s requested, sent to gateway %s", call_id, op, found.gateway_id or "?")
        return RecordingControl(call_id=call_id, state=state, at=None, on_this_gateway=False)

    def on_request(self, op: str, call_id: str) -> bool:
        """A request from another replica's API (``CallCommands``): True when the call is here."""
        if op == HANGUP:
            return self.lifecycle.hang_up(call_id)
        call = self.lifecycle.table.get(call_id)
        if call is None:
            return False
        try:
            if op == "pause":
                self.lifecycle.capture.pause(call)
            else:
                self.lifecycle.capture.resume(call)
        except CaptureError as exc:
            log.info("call %s: recording %s requested by another gateway not done: %s", call_id, op, exc.detail)
            return True
        self.lifecycle.recorder.update(call, "recording")
        return True

    # -- the pool ----------------------------------------------------------------------

    async def pool(self) -> PoolState:
        return await self.pool_view.state()

    def pool_history(self) -> PoolHistory:
        return PoolHistory(
            interval_seconds=self.concurrency.bucket_seconds,
            samples=[PoolSample(t=s.t, calls=s.calls, capacity=s.capacity) for s in self.concurrency.samples()],
        )

    async def drain_worker(self, worker_id: str) -> DrainResult:
        return await self.pool_view.drain(worker_id)

    # -- WebRTC ------------------------------------------------------------------------

    async def webrtc_offer(self, sdp: str, source: str, owner: str = "") -> WebRtcAnswer:
        try:
            leg = await self.webrtc.offer(sdp, source, owner=owner)
        except OfferRejected as exc:
            raise ControlError(
                exc.status, exc.reason, retry_after=self.retry_after_seconds if exc.retry_after else None
            ) from None
        return WebRtcAnswer(session_id=leg.id, call_id=leg.call.id, sdp=leg.answer_sdp.result())

    def webrtc_hang_up(self, session_id: str, owner: str | None = None) -> bool:
        return self.webrtc.hangup(session_id, owner=owner)

    def webrtc_config(self) -> WebRtcConfig:
        servers = [
            IceServer(urls=s.urls, username=s.username, credential=s.credential) for s in self.webrtc.ice_servers
        ]
        return WebRtcConfig(ice_servers=servers, connect_seconds=self.webrtc.settings.webrtc_connect_seconds)


def _outcome(result: TransferResult, here: bool) -> TransferOutcome:
    return TransferOutcome(
        **result.to_dict(), on_this_gateway=here, detail=None if result.transferred else result.reason or result.outcome
    )


async def _in_threads(chunks: tp.Iterator[bytes]) -> tp.AsyncIterator[bytes]:
    """A blocking iterator (a file, an S3 body) read in threads, a chunk at a time."""
    done = object()
    try:
        while (chunk := await asyncio.to_thread(next, chunks, done)) is not done:
            yield tp.cast(bytes, chunk)
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            await asyncio.to_thread(close)
