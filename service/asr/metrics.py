"""The ASR worker's Prometheus metrics, in a registry of their own (one per worker)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BATCH_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
RTF_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0)


class AsrMetrics:
    """Counters, gauges and histograms of one ASR worker."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.utterances = Counter(
            "moshimoshi_asr_utterances_total",
            "Utterances by outcome (ok, failed, overloaded, rejected)",
            ["outcome"],
            registry=r,
        )
        self.queue = Gauge("moshimoshi_asr_queue_utterances", "Utterances waiting for a batch", registry=r)
        self.batch_seconds = Histogram(
            "moshimoshi_asr_batch_duration_seconds", "Time to transcribe one batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "moshimoshi_asr_batch_size", "Utterances per batch", buckets=SIZE_BUCKETS, registry=r
        )
        self.real_time_factor = Histogram(
            "moshimoshi_asr_real_time_factor",
            "Batch time over the batch's audio duration",
            buckets=RTF_BUCKETS,
            registry=r,
        )
        self.wait_seconds = Histogram(
            "moshimoshi_asr_queue_wait_seconds",
            "Time an utterance waited for its batch to start",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.sessions = Gauge("moshimoshi_asr_sessions_open", "Open call sessions", registry=r)
        self.sessions_total = Counter(
            "moshimoshi_asr_sessions_total", "Sessions by how they ended", ["outcome"], registry=r
        )
        self.protocol_errors = Counter(
            "moshimoshi_asr_protocol_errors_total",
            "Sessions closed for a protocol violation or refusal, by close code",
            ["code"],
            registry=r,
        )
        self.vad_batch_windows = Histogram(
            "moshimoshi_asr_vad_batch_windows",
            "32 ms windows (one per call) in each batched VAD run",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self.vad_cpu_seconds = Counter(
            "moshimoshi_asr_vad_cpu_seconds_total",
            "CPU time of the VAD's thread (every call's voice activity detection)",
            registry=r,
        )
        self.vad_dropped_seconds = Counter(
            "moshimoshi_asr_vad_dropped_seconds_total", "Caller audio dropped because the VAD fell behind", registry=r
        )
        self.ready = Gauge("moshimoshi_asr_ready", "1 when the model is loaded and not draining", registry=r)
        self.auth_refused = Counter(
            "moshimoshi_asr_auth_refused_total",
            "Requests to /v1 refused for a missing or wrong worker secret, by endpoint",
            ["endpoint"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
