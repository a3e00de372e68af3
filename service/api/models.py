"""The API's documents (pydantic models: they are the OpenAPI schema).

A call is shown from its one record type (``CallRecord``) and quality type (``CallQuality``,
``service/call_record.py``) by :meth:`CallInfo.of`, the caller's privacy honoured.
"""

from __future__ import annotations

import typing as tp

from pydantic import BaseModel, Field

from service.call_record import ENDED, CallPhase, CallQuality, CallRecord, TransferAttempt
from service.privacy import masked_caller
from sip.identity import ANONYMOUS_URI, CallerIdentity


class CallerId(BaseModel):
    """Who called, with the caller's privacy honoured (RFC 3323, RFC 3325): when the caller
    asked for it (``Privacy: id``, ``user`` or ``header``, or a Remote-Party-ID with
    ``privacy=full|uri``) ``withheld`` is true and ``number``, ``name`` and ``uri`` are
    null, for every token scope. Only the stored record (Redis) keeps them."""

    number: str | None = Field(None, description="the caller's number (the user part of the identity's URI)")
    name: str | None = Field(None, description="the display name")
    uri: str | None = None
    source: str = Field("from", description="p-asserted-identity, remote-party-id or from")
    withheld: bool = Field(False, description="the caller asked that the identity not be shown")
    privacy: list[str] = Field([], description="the values of the INVITE's Privacy header")


class Redirect(BaseModel):
    """A redirection the call went through before it reached us (Diversion, History-Info)."""

    header: str = Field(description="diversion or history-info")
    number: str | None = None
    uri: str | None = None
    reason: str | None = Field(None, description="Diversion's reason parameter")


class RecordingPause(BaseModel):
    start: float = Field(description="seconds since the answer: silence from here")
    end: float | None = Field(None, description="where recording resumed (null while paused)")


class RecordingInfo(BaseModel):
    """A call's recording: stereo, the caller on the left (as the model heard them), the
    agent on the right (as sent to the caller), sample-aligned on the call's clock."""

    format: str = Field(description="wav (PCM16) or ogg (Opus in Ogg), 16 kHz stereo")
    state: str = Field(
        description="recording, paused, storing (the call ended; being written out), stored "
        "(GET /v1/calls/{id}/recording, recordings scope) or failed"
    )
    pauses: list[RecordingPause] = Field([], description="spans recorded as silence (POST …/recording/pause)")
    location: str | None = Field(None, description="where it is kept: s3://bucket/key or file:///path")
    bytes: int | None = None
    duration_s: float | None = Field(None, description="equals the call's duration")
    dropped_s: float | None = Field(
        None, description="audio the gateway could not write in time (silence in its place); 0 normally"
    )
    error: str | None = Field(None, description="why it failed")


class RecordingControl(BaseModel):
    call_id: str
    state: str = Field(description="paused or recording (requested: the call is on another gateway replica)")
    at: float | None = Field(
        None,
        description="seconds since the answer where the pause or resume took "
        "effect (null when another replica carries it out)",
    )
    on_this_gateway: bool


class CallInfo(BaseModel):
    """One call: where it runs, who called, how it went."""

    id: str = Field(description="the gateway's call id (X-Moshimoshi-Call-Id of the 200 OK)")
    state: str = Field(description="ringing, queued (waiting for a slot), active or ended")
    ingress: str = Field("", description="sip or webrtc")
    from_uri: str = Field(
        "",
        description="the caller (the From header); sip:anonymous@anonymous.invalid "
        "when the caller's identity is withheld",
    )
    to_uri: str = ""
    dialled: str = Field(
        "",
        description="SIP: the number dialled, the Request-URI's user part (behind a "
        "proxy or trunk it differs from to_uri)",
    )
    caller: CallerId | None = Field(
        None, description="SIP: who called (P-Asserted-Identity, Remote-Party-ID or From), privacy honoured"
    )
    redirects: list[Redirect] = Field(
        [],
        description="SIP: Diversion and History-Info entries, oldest first "
        "(empty when the caller's privacy withholds them)",
    )
    caller_masked: str = Field(
        "",
        description="the caller's number masked but for its last four digits, as "
        "the logs and the dashboard show it; withheld or unknown",
    )
    codec: str = ""
    sip_transport: str = Field("", description="how the call's SIP signalling came: UDP, TCP or TLS (empty for WebRTC)")
    media_encryption: str = Field(
        "",
        description="none, SDES-SRTP (SIP with a=crypto keys over TLS) or "
        "DTLS-SRTP (WebRTC); empty until the media is agreed",
    )
    route: str = Field("", description="the route the call took (routes file; default without one)")
    worker_id: str = ""
    slot: int | None = None
    model: str = ""
    license: str = ""
    sampling: dict[str, float | int | bool] | None = Field(
        None,
        description="what the worker samples the model with for this call: greedy, temp, temp_text, top_k, top_k_text",
    )
    gateway_id: str = Field("", description="the gateway replica that answered the call")
    started_at: float = Field(description="arrival of the INVITE, epoch seconds")
    answered_at: float | None = None
    ended_at: float | None = None
    end_reason: str = Field("", description="remote-bye, api-hangup, rtp-timeout, rejected-busy, cancelled, ...")
    end_detail: str = Field(
        "",
        description="the end reason in words, when it alone does not say what went "
        "wrong (e.g. why the answer in an ACK was unusable)",
    )
    duration_s: float = Field(0.0, description="seconds since (or until the end from) the answer")
    on_this_gateway: bool = Field(False, description="the answering gateway is the one serving this request")
    recording: RecordingInfo | None = Field(None, description="the call's recording, when its route records")
    quality: CallQuality | None = None
    phases: list[CallPhase] = Field(
        [],
        description="who the caller talked to: the AI (ai: start, end, worker), "
        "then after a transfer a person (human: target, mode, start, "
        "end; a bridged leg's quality)",
    )
    transfers: list[TransferAttempt] = Field(
        [], description="every transfer asked for: target, by, mode, outcome, SIP status, reason, seconds"
    )

    @classmethod
    def of(cls, record: CallRecord, *, on_this_gateway: bool = False) -> CallInfo:
        """The record as the API shows it: the caller's privacy honoured (see ``CallerId``)."""
        shared = {name: getattr(record, name) for name in _SHARED_FIELDS}
        return cls(
            id=record.call_id,
            **shared,
            duration_s=record.duration_s(),
            on_this_gateway=on_this_gateway,
            **shown_identity(record.identity, record.from_uri),
        )

    @property
    def active(self) -> bool:
        return self.state != ENDED


def shown_identity(identity: CallerIdentity | dict[str, tp.Any] | None, from_uri: str) -> dict[str, tp.Any]:
    """The identity fields of a CallInfo, the caller's privacy honoured: a withheld caller
    shows no number, name or URI (and an anonymous ``from_uri``), for every token scope."""
    if identity is None:
        return {"from_uri": from_uri, "caller_masked": masked_caller(None, from_uri)}
    if isinstance(identity, dict):
        identity = CallerIdentity.from_dict(identity)
    withheld = identity.withheld
    party = identity.caller
    caller = CallerId(
        number=None if withheld else party.number or None,
        name=None if identity.name_withheld else party.name or None,
        uri=None if withheld else party.uri or None,
        source=identity.caller_source,
        withheld=withheld,
        privacy=list(identity.privacy),
    )
    redirects: list[Redirect] = []
    if not identity.redirects_withheld:
        for header, parties in (("diversion", identity.diversion), ("history-info", identity.history_info)):
            for entry in parties:
                redirects.append(
                    Redirect(
                        header=header,
                        number=entry.number or None,
                        uri=entry.uri or None,
                        reason=entry.params.get("reason"),
                    )
                )
    return {
        "from_uri": ANONYMOUS_URI if withheld else from_uri,
        "dialled": identity.dialled,
        "caller": caller,
        "redirects": redirects,
        "caller_masked": masked_caller(identity),
    }


# the record's fields the API shows as they are (identity, from_uri and the id are shown above)
_SHARED_FIELDS = tuple(
    name
    for name in CallRecord.__dataclass_fields__
    if name in CallInfo.model_fields and name not in ("from_uri", "identity")
)


class CallList(BaseModel):
    calls: list[CallInfo]
    partial: bool = Field(False, description="true when Redis could not be read: only this gateway's calls")


class RefusedCallInfo(BaseModel):
    """A call that ended before its answer: refused (488, 503, 500...) or left by its caller
    (CANCEL). Nothing of it is stored beyond the record of refusals (an hour at most)."""

    id: str = Field(description="the gateway's call id")
    ended_at: float = Field(description="when it was refused, epoch seconds")
    started_at: float = Field(description="arrival of the INVITE (or offer), epoch seconds")
    reason: str = Field(
        description="why: the call's end reason (rejected-busy, rejected-codec, rejected-sdp, "
        "rejected-srtp, rejected-unready, rejected-draining, cancelled, error, ...)"
    )
    status: int | None = Field(None, description="the status the caller got (SIP; WebRTC: HTTP), null if none")
    detail: str = Field("", description="the reason in words, as the caller was told")
    ingress: str = Field("", description="sip or webrtc")
    sip_transport: str = ""
    caller: str = Field(
        "", description="the caller's number masked but for its last four digits (empty when withheld or unknown)"
    )
    dialled: str = Field("", description="SIP: the number dialled")
    source: str = Field("", description="SIP: the address the INVITE came from (the trunk)")
    gateway_id: str = Field("", description="the gateway replica that refused it")


class RefusalList(BaseModel):
    """Calls refused within the window (an hour): how many by reason, and the latest."""

    window_seconds: float = Field(description="how far back this looks")
    total: int = Field(description="calls refused within the window, every gateway")
    by_reason: dict[str, int] = Field(description="those calls by reason")
    refusals: list[RefusedCallInfo] = Field(
        description="the latest of them, newest first (the record keeps the last 1000 at most)"
    )
    partial: bool = Field(False, description="true when Redis could not be read: only this gateway's")


class Readiness(BaseModel):
    ready: bool
    draining: bool
    redis: bool | None
    workers_ready: int
    calls: int


class PlacedCall(BaseModel):
    """An outbound call, its slot held and its INVITE on the way."""

    call_id: str = Field(description="the call's id: follow it with GET /v1/calls/{id}")
    route: str = Field(description="the route it runs on")
    state: str = Field("ringing", description="ringing: the INVITE is on its way to the callee")


class HangupResult(BaseModel):
    call_id: str
    status: str = Field(description="hanging-up: the call ends with a BYE from its gateway")
    on_this_gateway: bool


class TransferOutcome(BaseModel):
    """How a transfer to a human went (``POST /v1/calls/{id}/transfer``)."""

    call_id: str
    target: str = Field(description="where the call was to go, as used (sip:, sips: or tel: URI)")
    outcome: str = Field(description="transferred, or failed: the caller stays with the AI")
    mode: str = Field(
        description="refer (the caller's side took the call elsewhere) or bridge (the gateway "
        "called the target and relays the audio); for a failure, the last tried"
    )
    status: int | None = Field(
        None,
        description="the SIP status that decided it: the REFER's answer, the final "
        "NOTIFY's, the target's answer; 408 nobody answered in time",
    )
    reason: str = Field("", description="how it went, in words (the reason it failed)")
    seconds: float = Field(description="from the request to the hand-over (or the failure)")
    by: str = Field("api", description="who asked: api, dtmf or overflow")
    on_this_gateway: bool = Field(True, description="the call runs on the gateway that served this request")
    detail: str | None = Field(None, description="for a failure: the same as reason (as in every error answer)")


class TranscriptPiece(BaseModel):
    seq: int = Field(
        description="index of the piece in the call's transcript (the order pieces came in: a "
        "caller's words come once the utterance ended, so sort by t for time order)"
    )
    t: float = Field(description="seconds since the call was answered (caller: where the speech began)")
    kind: str = Field(
        description="agent (the model's words), caller (the caller's words, from ASR), dtmf (a "
        "key the caller pressed: '*' unless the route stores digits in clear), transfer "
        "(a transfer to a human: where, how, and whether it worked) or note (the "
        "caller's transcript unavailable or resumed, the recording paused or resumed, "
        "the consent announcement played)"
    )
    text: str
    duration_ms: float | None = Field(None, description="for dtmf: how long the key was held")
    start: float | None = Field(None, description="for caller: where the utterance began (= t)")
    end: float | None = Field(None, description="for caller: where the utterance ended")


class Transcript(BaseModel):
    """A call's transcript, both sides; agent pieces concatenate to the agent's words."""

    call_id: str
    complete: bool = Field(description="the call has ended and every piece is here")
    end_reason: str = ""
    events: list[TranscriptPiece]
    text: str = Field(description="the agent's words, all pieces joined")
    caller_text: str = Field("", description="the caller's utterances in time order, one a line")


class SlotState(BaseModel):
    slot: int
    state: str = Field(description="free or leased")
    call_id: str | None = Field(None, description="the call holding the lease")
    token: int | None = Field(None, description="the lease's fencing token")
    ttl_ms: int | None = Field(None, description="time left on the lease (renewed every third of its TTL)")


class WorkerState(BaseModel):
    worker_id: str
    url: str = Field("", description="WebSocket URL gateways stream to")
    http_url: str = Field("", description="the worker's own HTTP API (health, metrics, drain)")
    model: str = ""
    license: str = ""
    version: str = ""
    state: str = Field(
        "",
        description="ready, draining, or overloaded (its step p99 over the last minute "
        "exceeds its budget: it takes no new calls until it recovers); empty "
        "when no longer alive",
    )
    alive: bool = Field(description="its registration has not expired (it heartbeats)")
    capacity: int = Field(0, description="B: the slots it serves")
    busy_slots: int = 0
    free_slots: int = 0
    last_seen: float | None = None
    started_at: float | None = None
    slots_reason: str = Field(
        "",
        description="why B is what it is: memory (what fits), limit (--max-slots), "
        "time (lowered until the step p99 held the budget) or forced "
        "(--slots)",
    )
    memory_slots: int | None = Field(None, description="slots that fit its memory")
    step_budget_ms: float | None = Field(None, description="the step time budget B is sized for")
    warmup_p50_ms: float | None = Field(None, description="step time p50 measured at warm-up at B")
    warmup_p99_ms: float | None = Field(None, description="step time p99 measured at warm-up at B")
    step_p99_ms: float | None = Field(None, description="step time p99 over its last minute of serving")
    context_seconds: float | None = Field(None, description="seconds of call its model keeps in mind")
    slots: list[SlotState] = []
    role: str = Field(
        "model", description="model (B slots, leased to calls) or asr (transcribes callers' utterances; no slots)"
    )
    sessions: int = Field(0, description="an ASR worker's concurrent call sessions (0 for model workers)")
    free_sessions: int = Field(0, description="an ASR worker's sessions free, as it last reported")


class PoolState(BaseModel):
    mode: str = Field(
        description="pool (workers in Redis), single-worker (MOSHIMOSHI_WORKER_URL) or "
        "loopback (--worker-url echo:, calls echoed in the gateway; no slot limit)"
    )
    workers: list[WorkerState]
    workers_ready: int = Field(description="model workers ready for calls (ASR workers not counted)")
    slots_total: int = Field(description="capacity of ready workers")
    slots_busy: int = Field(description="slots holding a lease")
    slots_free: int


class PoolSample(BaseModel):
    t: float = Field(description="the start of the sample's interval, epoch seconds")
    calls: int = Field(description="the most calls holding a worker slot during the interval (every gateway's)")
    capacity: int = Field(description="the slots of ready workers then")


class PoolHistory(BaseModel):
    """Concurrent calls over the last hour, one sample per interval (the dashboard's sparkline)."""

    interval_seconds: float
    samples: list[PoolSample] = Field(description="oldest first; a gateway that started recently has fewer")


class TokenInfo(BaseModel):
    scope: str = Field(description="read, call, recordings or admin: what the presented token may do")


class DrainResult(BaseModel):
    worker_id: str
    status: int = Field(description="the worker's HTTP status")
    answer: dict = Field(description="the worker's own answer (state, sessions)")


class Problem(BaseModel):
    detail: str
