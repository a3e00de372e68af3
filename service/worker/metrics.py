"""The worker's Prometheus metrics, in a registry of their own (one per worker instance)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST as PROMETHEUS_CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["PROMETHEUS_CONTENT_TYPE", "WorkerMetrics"]

STEP_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.1, 0.15, 0.2, 0.5, 1.0)


class WorkerMetrics:
    """Counters and gauges of one worker; safe to update from the inference thread."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.step_duration = Histogram(
            "moshimoshi_worker_step_duration_seconds",
            "Duration of one batched model step (encode + LM + decode for all slots)",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.slots = Gauge("moshimoshi_worker_slots", "Concurrent call capacity B of this worker", registry=r)
        self.memory_slots = Gauge(
            "moshimoshi_worker_memory_slots", "Slots that fit this worker's memory (the upper bound of B)", registry=r
        )
        self.slots_reason = Gauge(
            "moshimoshi_worker_slots_reason",
            "Why B is what it is (value 1): memory, limit (--max-slots), time (lowered for the step "
            "budget) or forced (--slots)",
            ["reason"],
            registry=r,
        )
        self.step_budget = Gauge(
            "moshimoshi_worker_step_budget_seconds",
            "Step time budget: B is sized so that the step p99 stays under it",
            registry=r,
        )
        self.warmup_step = Gauge(
            "moshimoshi_worker_warmup_step_seconds",
            "Step time measured at warm-up at the chosen B, by quantile",
            ["quantile"],
            registry=r,
        )
        self.step_p99 = Gauge(
            "moshimoshi_worker_step_p99_seconds",
            "Step time p99 over the last minute while serving (0 without steps)",
            registry=r,
        )
        self.overloaded = Gauge(
            "moshimoshi_worker_overloaded",
            "1 while the step p99 over the last minute exceeds the budget: no new calls are taken",
            registry=r,
        )
        self.overloads = Counter(
            "moshimoshi_worker_overloads_total", "Times the step p99 went over the budget while serving", registry=r
        )
        self.context = Gauge(
            "moshimoshi_worker_context_seconds", "Seconds of call the model keeps in mind (its KV ring)", registry=r
        )
        self.slot_kv_bytes = Gauge(
            "moshimoshi_worker_slot_kv_bytes", "Bytes of KV ring per slot (the bulk of a slot's memory)", registry=r
        )
        self.slots_busy = Gauge(
            "moshimoshi_worker_slots_busy", "Slots bound to a session (batch occupancy)", registry=r
        )
        self.ready = Gauge("moshimoshi_worker_ready", "1 when the model is loaded, warm and not draining", registry=r)
        self.info = Gauge(
            "moshimoshi_worker_model_info", "The model this worker serves (value 1)", ["model", "license"], registry=r
        )
        self.underruns = Counter(
            "moshimoshi_worker_slot_underruns_total",
            "Steps at which a busy slot had no input frame and was fed silence",
            ["slot"],
            registry=r,
        )
        self.input_dropped = Counter(
            "moshimoshi_worker_input_dropped_total",
            "Input frames dropped because a slot's queue was full (oldest first)",
            registry=r,
        )
        self.output_dropped = Counter(
            "moshimoshi_worker_output_dropped_total",
            "Output messages dropped because a gateway did not read them fast enough",
            registry=r,
        )
        self.step_overruns = Counter(
            "moshimoshi_worker_step_overruns_total",
            "Steps that ended after the next 80 ms tick (the clock then skips ahead)",
            registry=r,
        )
        self.skipped_ticks = Counter(
            "moshimoshi_worker_skipped_ticks_total", "80 ms ticks skipped after overruns", registry=r
        )
        self.sessions = Counter(
            "moshimoshi_worker_sessions_total", "Sessions by how they ended", ["outcome"], registry=r
        )
        self.protocol_errors = Counter(
            "moshimoshi_worker_protocol_errors_total",
            "Sessions closed for a protocol violation or refusal, by close code",
            ["code"],
            registry=r,
        )
        self.text_pieces = Counter("moshimoshi_worker_text_pieces_total", "Transcript pieces sent", registry=r)
        self.text_bytes_dropped = Counter(
            "moshimoshi_worker_text_bytes_dropped_total",
            "Byte-fallback text pieces that never formed a character (dropped, not sent)",
            registry=r,
        )

        self.redis_write_retries = Counter(
            "moshimoshi_worker_redis_write_retries_total",
            "Retries of must-happen Redis writes (lease releases) after Redis refused them",
            ["operation"],
            registry=r,
        )
        self.redis_writes_abandoned = Counter(
            "moshimoshi_worker_redis_writes_abandoned_total",
            "Must-happen Redis writes given up after retrying to their bound",
            ["operation"],
            registry=r,
        )
        self.auth_refused = Counter(
            "moshimoshi_worker_auth_refused_total",
            "Requests to /v1 refused for a missing or wrong worker secret, by endpoint",
            ["endpoint"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
