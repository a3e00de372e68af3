"""A call as the gateway records, stores and shows it: one record type, one quality type.

The gateway's live call (``gateway/calls/call.py``) keeps its :class:`CallRecord` current; the Redis store
(``service/pool/calls.py``) writes it field by field (:meth:`CallRecord.to_fields`); the API
shows it (``service/api/models.py`` ``CallInfo.of``, the caller's privacy honoured); the
webhook sends it when the call ends. Both media paths (SIP/RTP and WebRTC) fill one
:class:`CallQuality`. Adding a field is one line here.
"""

from __future__ import annotations

import dataclasses
import json
import time
import typing as tp
from dataclasses import dataclass, field

from pydantic import Field

RINGING = "ringing"  # arrived, not answered
QUEUED = "queued"  # waiting for a worker slot (the caller hears ringing)
ACTIVE = "active"  # answered; also: any state but ended, when listing calls
ENDED = "ended"
QUALITY_PREFIX = "q."  # quality fields are stored as q.<name>, each merged on its own


def _doc(text: str) -> tp.Any:
    return Field(description=text)


@dataclass
class GatewayLatency:
    """Latency the gateway adds over the call's recent frames (the model's frame and step
    excluded), in milliseconds."""

    p50: float | None = None
    p99: float | None = None
    jitter_buffer: tp.Annotated[float | None, _doc("current playout delay of the jitter buffer")] = None
    resampling: tp.Annotated[float | None, _doc("held back by the resamplers, both ways")] = None
    egress_cushion: tp.Annotated[float | None, _doc("model audio queued ahead of the pacer")] = None


@dataclass
class CallQuality:
    """A call's audio quality: live for a call on the answering gateway, else as last stored
    (gateways store it every few seconds during the call and once at its end). Fields a
    media path does not measure stay null."""

    codec: tp.Annotated[str | None, _doc("negotiated codec (opus, G722, PCMU, PCMA; WebRTC: opus/48000)")] = None
    sample_rate_hz: tp.Annotated[int | None, _doc("the codec's audio rate (8000, 16000, 48000)")] = None
    ptime_ms: tp.Annotated[float | None, _doc("packet time")] = None
    jitter_ms: tp.Annotated[float | None, _doc("interarrival jitter of the caller's RTP (RFC 3550)")] = None
    loss_fraction: tp.Annotated[float | None, _doc("fraction of the caller's packets lost")] = None
    packets_lost: int | None = None
    rtt_ms: tp.Annotated[float | None, _doc("round trip to the caller from RTCP (null until known)")] = None
    remote_loss_fraction: tp.Annotated[float | None, _doc("loss of our stream as the caller reports it")] = None
    remote_jitter_ms: tp.Annotated[float | None, _doc("jitter of our stream as the caller reports it")] = None
    packets_received: int | None = None
    packets_sent: int | None = None
    packets_stray: int | None = None
    packets_malformed: int | None = None
    decode_errors: int | None = None
    packets_late: int | None = None
    srtp_suite: tp.Annotated[str | None, _doc("the SRTP crypto suite (SDES-SRTP calls)")] = None
    packets_srtp_replayed: tp.Annotated[int | None, _doc("SRTP packets dropped as replays")] = None
    packets_srtp_auth_failed: tp.Annotated[
        int | None, _doc("SRTP packets dropped: authentication failed (forged or corrupted)")
    ] = None
    concealed_frames: tp.Annotated[int | None, _doc("inbound frames concealed (lost or late)")] = None
    jitter_buffer_ms: tp.Annotated[float | None, _doc("current playout delay of the jitter buffer")] = None
    jitter_buffer_target_ms: float | None = None
    egress_cushion_ms: float | None = None
    egress_underruns: tp.Annotated[int | None, _doc("20 ms ticks with no model audio while it talked")] = None
    egress_dropped: int | None = None
    gateway_latency_ms: tp.Annotated[
        GatewayLatency | None, _doc("latency the gateway adds: jitter buffer, resampling, framing, pacing")
    ] = None
    model_frames: int | None = None
    model_packets: int | None = None
    model_packets_late: int | None = None
    pacer_max_lateness_ms: float | None = None
    resampler: str | None = None
    failovers: tp.Annotated[int | None, _doc("times the call moved to another worker")] = None

    def measured(self) -> dict[str, tp.Any]:
        """The fields that hold a value (what the record stores)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, values: dict[str, tp.Any]) -> CallQuality:
        """Known fields only (a record written by another version may hold others)."""
        known = {k: v for k, v in values.items() if k in _QUALITY_FIELDS}
        latency = known.get("gateway_latency_ms")
        if isinstance(latency, dict):
            known["gateway_latency_ms"] = GatewayLatency(**{k: v for k, v in latency.items() if k in _LATENCY_FIELDS})
        elif latency is not None:
            del known["gateway_latency_ms"]
        return cls(**known)


@dataclass
class CallPhase:
    """One part of a call: with the AI (``kind`` ai, on ``worker``), or with a human after a
    transfer (``kind`` human: ``target``, ``mode`` refer or bridge). A bridged human part
    ends with the call and has its leg's ``quality``; after a REFER the human part goes on
    without us: its ``end`` stays null."""

    kind: tp.Annotated[str, _doc("ai (the model) or human (after a transfer)")]
    start: tp.Annotated[float, _doc("epoch seconds")]
    end: tp.Annotated[float | None, _doc("epoch seconds; null while it lasts, and for a REFER's human part")] = None
    worker: tp.Annotated[str | None, _doc("ai: the worker that served it (the last one, after failovers)")] = None
    target: tp.Annotated[str | None, _doc("human: where the call went (sip:, sips: or tel: URI)")] = None
    mode: tp.Annotated[
        str | None, _doc("human: refer (blind transfer by the peer) or bridge (the gateway relays the media)")
    ] = None
    quality: tp.Annotated[CallQuality | None, _doc("human, bridged: the human leg's media quality")] = None

    @classmethod
    def from_dict(cls, values: dict[str, tp.Any]) -> CallPhase:
        known = {k: v for k, v in values.items() if k in _PHASE_FIELDS}
        quality = known.get("quality")
        known["quality"] = CallQuality.from_dict(quality) if isinstance(quality, dict) else None
        return cls(**known)


@dataclass
class TransferAttempt:
    """One transfer asked for: by whom (``by``: api, dtmf, overflow), to where, how it went."""

    target: str
    by: str
    mode: tp.Annotated[
        str,
        _doc("refer or bridge: how it was tried (auto tries refer, then bridge when the peer will not take a REFER)"),
    ]
    requested_at: float
    outcome: tp.Annotated[str, _doc("pending, transferred or failed (the caller stayed with the AI)")] = "pending"
    status: tp.Annotated[
        int | None,
        _doc(
            "the SIP status that decided it (the REFER's, a NOTIFY's, the target's answer); 408 for no answer in time"
        ),
    ] = None
    reason: tp.Annotated[str, _doc("why it failed, or how it went, in words")] = ""
    seconds: tp.Annotated[float | None, _doc("from the request to the hand-over (or the failure)")] = None

    @classmethod
    def from_dict(cls, values: dict[str, tp.Any]) -> TransferAttempt:
        return cls(**{k: v for k, v in values.items() if k in _TRANSFER_FIELDS})


@dataclass
class CallRecord:
    """One call: where it runs, who called, how it went. ``identity`` keeps the SIP identity
    headers and the dialled number whole (``sip.identity.CallerIdentity.to_dict``); only
    what the API shows honours the caller's privacy."""

    call_id: str
    state: str = RINGING
    ingress: str = ""  # sip, webrtc
    gateway_id: str = ""  # the replica that answered
    sip_call_id: str = ""
    from_uri: str = ""
    to_uri: str = ""
    source: str = ""  # the signalling peer, host:port
    identity: dict[str, tp.Any] | None = None
    codec: str = ""
    sip_transport: tp.Annotated[str, _doc("how the call's SIP signalling came: UDP, TCP or TLS (empty for WebRTC)")] = (
        ""
    )
    media_encryption: tp.Annotated[
        str,
        _doc(
            "none, SDES-SRTP (SIP with a=crypto keys over TLS) or DTLS-SRTP (WebRTC); empty until the media is agreed"
        ),
    ] = ""
    route: tp.Annotated[str, _doc("the route the call took (routes file; 'default' without one)")] = ""
    worker_id: str = ""
    slot: int | None = None
    model: str = ""
    license: str = ""
    sampling: dict[str, tp.Any] | None = None  # what the worker samples this call with
    started_at: float = field(default_factory=time.time)
    answered_at: float | None = None
    ended_at: float | None = None
    end_reason: str = ""
    end_detail: str = ""  # the end reason in words, when the reason alone does not say what went wrong
    recording: dict[str, tp.Any] | None = None  # format, state, pauses; once stored: location, bytes, duration_s
    quality: CallQuality | None = None
    phases: tp.Annotated[
        list[CallPhase], _doc("the AI part and, after a transfer, the human part, with their times")
    ] = field(default_factory=list)
    transfers: tp.Annotated[list[TransferAttempt], _doc("every transfer asked for, and how it went")] = field(
        default_factory=list
    )

    @property
    def ended(self) -> bool:
        return self.state == ENDED

    def duration_s(self, now: float | None = None) -> float:
        """Seconds from the answer to the end (or to now, while the call goes on)."""
        if not self.answered_at:
            return 0.0
        end = self.ended_at if self.ended_at is not None else (time.time() if now is None else now)
        return round(max(0.0, end - self.answered_at), 3)

    def copy(self, **changes: tp.Any) -> CallRecord:
        changes.setdefault("phases", list(self.phases))
        changes.setdefault("transfers", list(self.transfers))
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, tp.Any]:
        return dataclasses.asdict(self)

    # -- stored form: a flat map of strings (a Redis hash) ----------------------------

    def to_fields(self, only: tp.Iterable[str] | None = None) -> dict[str, str]:
        """The record as strings: each field under its name (None left out), each measured
        quality field under ``q.<name>``."""
        names = _RECORD_FIELDS if only is None else only
        out: dict[str, str] = {}
        for name in names:
            value = getattr(self, name)
            if name == "quality":
                out.update(quality_fields(value))
            elif name in _LIST_FIELDS:
                if value or only is not None:
                    out[name] = json.dumps([_measured(dataclasses.asdict(item)) for item in value], ensure_ascii=False)
            elif value is not None:
                out[name] = _encode(value)
        return out

    @classmethod
    def from_fields(cls, raw: dict[str, str]) -> CallRecord:
        """A record from its stored form; unreadable or unknown fields are skipped."""
        values: dict[str, tp.Any] = {}
        quality: dict[str, tp.Any] = {}
        for name, text in raw.items():
            if name.startswith(QUALITY_PREFIX):
                try:
                    quality[name[len(QUALITY_PREFIX) :]] = json.loads(text)
                except ValueError:
                    continue
            elif name in _LIST_FIELDS:
                try:
                    values[name] = [
                        _LIST_FIELDS[name].from_dict(item) for item in json.loads(text) if isinstance(item, dict)
                    ]
                except (ValueError, TypeError):
                    continue
            elif name in _PARSERS:
                try:
                    values[name] = _PARSERS[name](text)
                except ValueError:
                    continue
        # records of earlier versions kept these three among the quality fields
        for name, old in (("ingress", "ingress"), ("gateway_id", "gateway"), ("sampling", "sampling")):
            if old in quality and name not in values:
                values[name] = quality[old]
        if "call_id" not in values:
            raise ValueError("a call record needs a call_id")
        return cls(**values, quality=CallQuality.from_dict(quality) if quality else None)


def quality_fields(quality: CallQuality | None) -> dict[str, str]:
    """A quality's measured fields in stored form (``q.<name>`` → JSON)."""
    if quality is None:
        return {}
    return {QUALITY_PREFIX + k: json.dumps(v, ensure_ascii=False) for k, v in quality.measured().items()}


def _measured(values: dict[str, tp.Any]) -> dict[str, tp.Any]:
    """A dataclass's dict without its null fields (nested dicts too)."""
    return {k: _measured(v) if isinstance(v, dict) else v for k, v in values.items() if v is not None}


def _encode(value: tp.Any) -> str:
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    return repr(value) if isinstance(value, float) else str(value)


def _json_object(text: str) -> dict[str, tp.Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _parser(hint: tp.Any) -> tp.Callable[[str], tp.Any]:
    args = set(tp.get_args(hint)) - {type(None)} or {hint}
    if args & {dict} or any(tp.get_origin(a) is dict for a in args):
        return _json_object
    for kind in (int, float):
        if kind in args:
            return kind
    return str


_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(CallRecord))
_QUALITY_FIELDS = frozenset(f.name for f in dataclasses.fields(CallQuality))
_LATENCY_FIELDS = frozenset(f.name for f in dataclasses.fields(GatewayLatency))
_PHASE_FIELDS = frozenset(f.name for f in dataclasses.fields(CallPhase))
_TRANSFER_FIELDS = frozenset(f.name for f in dataclasses.fields(TransferAttempt))
_LIST_FIELDS: dict[str, tp.Any] = {"phases": CallPhase, "transfers": TransferAttempt}
_PARSERS: dict[str, tp.Callable[[str], tp.Any]] = {
    name: _parser(hint)
    for name, hint in tp.get_type_hints(CallRecord).items()
    if name != "quality" and name not in _LIST_FIELDS
}
