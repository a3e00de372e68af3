"""The gateway's Prometheus metrics. Every name carries its unit.

Per-packet RTP counts are not incremented packet by packet: each call keeps plain integer
counters, and ``CallStatsCollector`` adds up the live calls plus the totals of ended calls
at scrape time, so the hot path pays nothing for metrics.
"""

from __future__ import annotations

import bisect
import typing as tp

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import REGISTRY, Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)
PACING_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.02)
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600)

CALLS_ACTIVE = Gauge("moshimoshi_calls_active", "Calls in progress on this gateway.", ["ingress"])
CALLS_TOTAL = Counter("moshimoshi_calls_total", "Calls by outcome.", ["ingress", "outcome"])
CALL_DURATION = Histogram("moshimoshi_call_duration_seconds", "Answered call length.", buckets=DURATION_BUCKETS)
RTP_JITTER = Histogram(
    "moshimoshi_rtp_jitter_seconds",
    "Interarrival jitter of callers' RTP, sampled every few seconds per call.",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2),
)
RTP_LOSS = Histogram(
    "moshimoshi_rtp_loss_ratio",
    "Fraction of callers' RTP lost, sampled every few seconds per call.",
    buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5),
)


class LoopHistogram(Collector):
    """A histogram for the event loop's hottest path (one observation per packet sent):
    no lock and no label lookup, just a bucket count; exported like any histogram."""

    def __init__(self, name: str, documentation: str, buckets: tp.Sequence[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        REGISTRY.register(self)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def collect(self) -> tp.Iterator[HistogramMetricFamily]:
        cumulative, running = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            cumulative.append((bound, running))
        family = HistogramMetricFamily(self.name, self.documentation)
        family.add_metric([], cumulative, self.sum)
        yield family


PACER_LATENESS = LoopHistogram(
    "moshimoshi_rtp_pacer_lateness_seconds",
    "How far from its schedule each egress packet left (early or late).",
    PACING_BUCKETS,
)
GATEWAY_LATENCY = LoopHistogram(  # one observation per model frame sent, on the event loop
    "moshimoshi_gateway_added_latency_seconds",
    "Latency the gateway adds to the conversation: jitter buffer, resampling both ways, "
    "framing hand-off and egress pacing (the model's frame and step excluded).",
    LATENCY_BUCKETS,
)
CLAIM_LATENCY = Histogram(
    "moshimoshi_pool_claim_duration_seconds",
    "Time to claim a slot in Redis.",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0),
)
QUEUE_WAIT = Histogram(
    "moshimoshi_pool_queue_wait_seconds",
    "Time calls waited (ringing) for a free slot.",
    buckets=(0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60),
)
QUEUED_CALLS = Counter("moshimoshi_pool_queued_calls_total", "Calls that had to wait for a slot.")
REJECTED_CALLS = Counter(
    "moshimoshi_pool_rejected_calls_total", "Calls refused for want of a slot (503), by reason.", ["reason"]
)
ROUTE_CALLS = Counter("moshimoshi_route_calls_total", "Calls taken on each route (routes file).", ["route"])
ROUTE_CALLS_ACTIVE = Gauge("moshimoshi_route_calls_active", "Calls in progress on each route.", ["route"])
ROUTE_LIMITED = Counter(
    "moshimoshi_route_limited_calls_total",
    "Calls refused (or sent to the overflow) because their route was at max_calls.",
    ["route"],
)
ROUTE_UNMATCHED = Counter("moshimoshi_route_unmatched_calls_total", "Calls whose number no route matched (404).")
ROUTE_OVERFLOWS = Counter(
    "moshimoshi_route_overflows_total",
    "Calls that found no slot (or their route full) and took the route's overflow, by action.",
    ["route", "action"],
)
ROUTE_RELOADS = Counter("moshimoshi_routes_reloads_total", "Reloads of the routes file, by outcome.", ["outcome"])
OUTBOUND_CALLS = Counter(
    "moshimoshi_outbound_calls_total", "Calls placed through POST /v1/calls, by outcome.", ["outcome"]
)
WORKER_LINK_DROPPED = Counter(
    "moshimoshi_worker_link_frames_dropped", "Caller frames dropped because the WebSocket to the worker was backed up."
)
FAILOVERS = Counter(
    "moshimoshi_pool_failovers_total",
    "Calls moved to another worker mid-call "
    "(its socket closed, or it stalled: it owed frames past --worker-stall-ms), by outcome: "
    "moved, or no-slot (the call ended: worker-lost).",
    ["outcome"],
)
STALL_CHECKS_SKIPPED = Counter(
    "moshimoshi_worker_stall_checks_skipped_total",
    "Rounds of the hung-worker watchdog skipped because the gateway's own event loop woke them late "
    "(frames may have been waiting unread): no worker is blamed for the gateway's own lag.",
)
POOL_SLOTS = Gauge("moshimoshi_pool_slots", "Slots of ready workers in the pool (capacity), by model.", ["model"])
POOL_SLOTS_BUSY = Gauge("moshimoshi_pool_slots_busy", "Slots holding a lease, by model.", ["model"])
POOL_WORKERS = Gauge("moshimoshi_pool_workers", "Live workers in the pool, by state.", ["state"])
READY = Gauge("moshimoshi_gateway_ready", "1 when this gateway takes calls (Redis up, a worker ready, not draining).")
REDIS_ERRORS = Counter("moshimoshi_redis_errors_total", "Redis operations that failed.", ["operation"])
REDIS_WRITE_RETRIES = Counter(
    "moshimoshi_redis_write_retries_total",
    "Retries of must-happen Redis writes (call record ends, lease releases) after Redis refused them.",
    ["operation"],
)
REDIS_WRITES_ABANDONED = Counter(
    "moshimoshi_redis_writes_abandoned_total",
    "Must-happen Redis writes given up after retrying to their bound.",
    ["operation"],
)


def count_pool_retry(operation: str, event: str) -> None:
    """A listener for the pool client's retried writes (``PoolClient.retries``)."""
    if event == "retried":
        REDIS_WRITE_RETRIES.labels(operation).inc()
    elif event == "abandoned":
        REDIS_WRITES_ABANDONED.labels(operation).inc()


TRANSCRIPT_PIECES = Counter("moshimoshi_transcript_pieces_total", "Transcript pieces stored in Redis.")
TRANSCRIPT_PIECES_DROPPED = Counter(
    "moshimoshi_transcript_pieces_dropped_total",
    "Transcript pieces never stored: the in-memory queue overflowed during a Redis outage, or the "
    "gateway stopped before Redis answered; by reason.",
    ["reason"],
)
REFUSALS_NOT_STORED = Counter(
    "moshimoshi_refused_calls_not_stored_total",
    "Refused calls (ended before their answer) left out of the shared record of refusals: its queue "
    "overflowed while Redis refused writes, or the gateway stopped first; by reason. They are still "
    "counted in moshimoshi_calls_total.",
    ["reason"],
)
DTMF_DIGITS = Counter("moshimoshi_dtmf_digits_total", "DTMF digits received (RFC 4733 or SIP INFO).")
RECORDINGS = Counter("moshimoshi_recordings_total", "Calls' recordings by outcome: stored, failed.", ["outcome"])
RECORDING_DROPPED = Counter(
    "moshimoshi_recording_dropped_seconds_total",
    "Call audio the recording writer could not take in time (silence in its place).",
)
RECORDINGS_EXPIRED = Counter("moshimoshi_recordings_expired_total", "Recordings deleted at the end of the retention.")
SIP_INFO = Counter(
    "moshimoshi_sip_info_requests_total",
    "In-dialog SIP INFO requests by outcome: dtmf (a digit reported), empty (keep-alive), "
    "bad-body (400), unsupported-type (415).",
    ["outcome"],
)
TRANSFERS = Counter(
    "moshimoshi_transfers_total",
    "Transfers to a human by how they were tried (refer, bridge) and their outcome "
    "(transferred, failed: the caller stayed with the AI).",
    ["mode", "outcome"],
)
TRANSFER_SECONDS = Histogram(
    "moshimoshi_transfer_seconds",
    "From a transfer request to the hand-over (REFER: the final NOTIFY; bridge: the person's answer).",
    ["mode"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60),
)
ABANDONED_CALLS = Counter(
    "moshimoshi_pool_abandoned_calls_total", "Calls whose caller hung up (CANCEL) while they waited for a slot."
)
WEBHOOK_DELIVERIES = Counter("moshimoshi_webhook_deliveries_total", "Call-end webhook POSTs by outcome.", ["outcome"])

# Summed from per-call counters at scrape time (see CallStatsCollector).
RTP_COUNTERS = {
    "packets_received": ("moshimoshi_rtp_packets_received", "RTP packets received from callers."),
    "packets_sent": ("moshimoshi_rtp_packets_sent", "RTP packets sent to callers."),
    "packets_lost": ("moshimoshi_rtp_packets_lost", "Callers' RTP packets lost in the network."),
    "packets_late": ("moshimoshi_rtp_packets_late", "RTP packets that missed their playout deadline."),
    "packets_stray": ("moshimoshi_rtp_packets_stray", "RTP packets from other than the negotiated peer, dropped."),
    "packets_withheld": (
        "moshimoshi_rtp_packets_withheld",
        "RTP packets not sent: the peer's address was neither the call's signalling source "
        "nor where its media came from (yet).",
    ),
    "packets_malformed": ("moshimoshi_rtp_packets_malformed", "Malformed RTP/RTCP packets, dropped."),
    "packets_duplicate": ("moshimoshi_rtp_packets_duplicate", "Duplicate RTP packets, dropped."),
    "packets_srtp_replayed": (
        "moshimoshi_srtp_packets_replayed",
        "SRTP/SRTCP packets replayed (an index seen before or too old), dropped.",
    ),
    "packets_srtp_auth_failed": (
        "moshimoshi_srtp_packets_auth_failed",
        "SRTP/SRTCP packets whose authentication failed (forged, corrupted, plain), dropped.",
    ),
    "frames_concealed": ("moshimoshi_rtp_concealed_frames", "Inbound frames concealed (PLC)."),
    "model_frames_dropped": (
        "moshimoshi_model_frames_dropped",
        "Model frames dropped: worker link backed up or past their slot.",
    ),
    "egress_underruns": (
        "moshimoshi_egress_underruns",
        "Egress ticks with no model audio due while the model was talking.",
    ),
}


class CallStatsCollector(Collector):
    """Sums per-call integer counters (live calls + ended calls) into Prometheus counters."""

    def __init__(self, live: tp.Callable[[], tp.Iterable[dict[str, int]]]) -> None:
        self._live = live
        self.ended: dict[str, int] = dict.fromkeys(RTP_COUNTERS, 0)

    def add_ended(self, counts: dict[str, int]) -> None:
        for key in RTP_COUNTERS:
            self.ended[key] += counts.get(key, 0)

    def collect(self) -> tp.Iterator[CounterMetricFamily | GaugeMetricFamily]:
        totals = dict(self.ended)
        for counts in self._live():
            for key in RTP_COUNTERS:
                totals[key] += counts.get(key, 0)
        for key, (name, doc) in RTP_COUNTERS.items():
            family = CounterMetricFamily(name, doc)
            family.add_metric([], totals[key])
            yield family


_collector: CallStatsCollector | None = None


def install_call_stats(live: tp.Callable[[], tp.Iterable[dict[str, int]]]) -> CallStatsCollector:
    """Register (once per process) the collector over the live calls' counters."""
    global _collector
    if _collector is None:
        _collector = CallStatsCollector(live)
        REGISTRY.register(_collector)
    else:
        _collector._live = live
    return _collector


# WebRTC ingress
WEBRTC_OFFERS = Counter(
    "moshimoshi_webrtc_offers_total",
    "WebRTC offers by outcome: answered, bad-sdp, unavailable, busy, error.",
    ["outcome"],
)
WEBRTC_CONNECT = Histogram(
    "moshimoshi_webrtc_connect_seconds",
    "Time from the SDP answer to ICE and DTLS connected (slow: TURN or firewalls).",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)


class SipStatsCollector(Collector):
    """SIP responses by status code, SIP messages dropped, requests the guard refused and
    sources it banned, read from the SIP stack's own counters at scrape time (every
    response it sends, automatic ones included)."""

    def __init__(
        self,
        counters: tp.Callable[[], tp.Any],
        guard: tp.Callable[[], tp.Any] | None = None,
        certificates: tp.Callable[[], tp.Any] = lambda: None,
    ) -> None:
        self._counters = counters
        self._guard = guard
        self._certificates = certificates

    def collect(self) -> tp.Iterator[CounterMetricFamily | GaugeMetricFamily]:
        guard = self._guard() if self._guard is not None else None
        if guard is not None:
            refused = CounterMetricFamily(
                "moshimoshi_sip_requests_refused",
                "SIP requests refused before any state was created, by reason: "
                "not-allowed (403), auth-missing/-failed/-stale/-replayed/-malformed (401), rate-limited (503), "
                "banned and scanner (dropped), not-dialog-peer (403).",
                labels=["reason"],
            )
            for reason, count in sorted(guard.counters.refused.items()):
                refused.add_metric([reason], count)
            yield refused
            banned = GaugeMetricFamily(
                "moshimoshi_sip_banned_sources", "Sources (IPv6: /64s) banned now for going over the SIP rate limit."
            )
            banned.add_metric([], guard.rate.banned_sources() if guard.rate is not None else 0)
            yield banned
        counters = self._counters()
        responses = CounterMetricFamily(
            "moshimoshi_sip_responses",
            "SIP responses sent, by status code (retransmissions not counted).",
            labels=["code"],
        )
        for status, count in sorted(counters.responses_sent.items()):
            responses.add_metric([str(status)], count)
        yield responses
        dropped = CounterMetricFamily(
            "moshimoshi_sip_messages_dropped", "SIP messages dropped without an answer, by reason.", labels=["reason"]
        )
        dropped.add_metric(["malformed"], counters.dropped)
        dropped.add_metric(["oversized"], counters.oversized)
        dropped.add_metric(["tcp-refused"], counters.tcp_rejected)
        dropped.add_metric(["tcp-too-slow"], counters.tcp_slow_closed)
        dropped.add_metric(["banned-source"], counters.filtered)
        yield dropped
        handshakes = CounterMetricFamily(
            "moshimoshi_sip_tls_handshakes",
            "SIP over TLS handshakes by outcome: ok, failed (protocol version, "
            "ciphers, certificates, not TLS), timeout (not finished in time).",
            labels=["outcome"],
        )
        handshakes.add_metric(["ok"], counters.tls_handshakes)
        handshakes.add_metric(["failed"], counters.tls_handshake_failures)
        handshakes.add_metric(["timeout"], counters.tls_handshake_timeouts)
        yield handshakes
        certificates = self._certificates()
        if certificates is not None:
            reloads = CounterMetricFamily(
                "moshimoshi_sip_tls_certificate_reloads",
                "Reloads of the TLS certificate after its files "
                "changed, by outcome (failed: the previous certificate stays in use).",
                labels=["outcome"],
            )
            reloads.add_metric(["ok"], certificates.reloads)
            reloads.add_metric(["failed"], certificates.reload_failures)
            yield reloads


_sip_collector: SipStatsCollector | None = None


def install_sip_stats(
    counters: tp.Callable[[], tp.Any],
    guard: tp.Callable[[], tp.Any] | None = None,
    certificates: tp.Callable[[], tp.Any] = lambda: None,
) -> None:
    """Register (once per process) the collector over the SIP stack's counters, guard and
    TLS certificates."""
    global _sip_collector
    if _sip_collector is None:
        _sip_collector = SipStatsCollector(counters, guard, certificates)
        REGISTRY.register(_sip_collector)
    else:
        _sip_collector._counters = counters
        _sip_collector._guard = guard
        _sip_collector._certificates = certificates
