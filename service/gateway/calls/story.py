"""The story of a call in the log: one line when it arrives, one when it ends.

    call c-4b29… arrived: SIP/UDP from 203.0.113.5:5060, dialled 0501234567, caller ********5678
    call c-4b29… ended: remote-bye after 62.4 s; PCMU, loss 0.2 %, jitter 3.1 ms, RTT 24 ms,
        gateway latency p50 21 ms, 3 frames concealed

The caller's number is personal data: it is masked but for its last four digits
(service/privacy.py), ``withheld`` when the caller asked for privacy. Transcripts never
reach the log.
"""

from __future__ import annotations

import typing as tp

from service.call_record import CallQuality
from service.privacy import masked_caller

if tp.TYPE_CHECKING:
    from service.gateway.calls.call import Call


def arrived(call: Call) -> str:
    record = call.record
    how = f"SIP/{record.sip_transport}" if record.ingress == "sip" and record.sip_transport else record.ingress
    parts = [f"{how} from {record.source or 'unknown'}"]
    dialled = call.identity.dialled if call.identity is not None else ""
    if dialled:
        parts.append(f"dialled {dialled}")
    parts.append(f"caller {masked_caller(record.identity, record.from_uri)}")
    return f"call {call.id} arrived: " + ", ".join(parts)


def quality_summary(quality: CallQuality | None) -> str:
    """``PCMU, loss 0.2 %, jitter 3.1 ms, …``: what says whether the line was good."""
    if quality is None or quality.codec is None:
        return "no media"
    parts = [quality.codec]
    if quality.loss_fraction is not None:
        parts.append(f"loss {quality.loss_fraction * 100:.1f} %")
    if quality.jitter_ms is not None:
        parts.append(f"jitter {quality.jitter_ms:.1f} ms")
    if quality.rtt_ms is not None:
        parts.append(f"RTT {quality.rtt_ms:.0f} ms")
    latency = quality.gateway_latency_ms
    if latency is not None and latency.p50 is not None:
        parts.append(f"gateway latency p50 {latency.p50:.0f} ms")
    if quality.concealed_frames is not None:
        parts.append(f"{quality.concealed_frames} frames concealed")
    if quality.failovers:
        parts.append(f"{quality.failovers} failover{'s' if quality.failovers != 1 else ''}")
    return ", ".join(parts)


def ended(call: Call) -> str:
    record = call.record
    reason = record.end_reason or "unknown"
    if record.answered_at is None:
        return f"call {call.id} ended: {reason} before the answer"
    detail = f" ({record.end_detail})" if record.end_detail else ""
    return (
        f"call {call.id} ended: {reason}{detail} after {record.duration_s():.1f} s; {quality_summary(record.quality)}"
    )
