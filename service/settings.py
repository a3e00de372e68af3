"""The settings of each role. Every field is ``MOSHIMOSHI_<NAME>`` and ``--<name>``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from service.config import ConfigError, setting
from service.worker.auth import INSECURE_ENV, SECRET_ENV, SECRET_FILE_ENV, resolve_secret
from sip.acl import PRIVATE_NETWORKS, AddressList
from sip.auth import DigestAuthenticator, parse_credentials
from sip.guard import SCANNER_USER_AGENTS, RequestGuard
from sip.ratelimit import SourceRateLimiter
from sip.streamlimits import StreamLimits

DEFAULT_MODEL = "llm-jp/llm-jp-moshi-v1"
DEFAULT_ASR_MODEL = "kotoba-tech/kotoba-whisper-v2.0-faster"
ASR_ENV = "MOSHIMOSHI_ASR_"


@dataclass
class WorkerSettings:
    """One inference worker: one model, B slots, one batched step every 80 ms."""

    model: str | None = setting(
        None,
        "Hugging Face repo id, local checkpoint directory, 'demo' or 'echo' "
        f"(default: {DEFAULT_MODEL} when CUDA is present, else demo)",
        group="model",
    )
    hf_revision: str | None = setting(None, "Hugging Face revision (branch, tag or commit) of --model", group="model")
    device: str | None = setting(None, "torch device (default: cuda when present, else cpu)", group="inference")
    dtype: str = setting(
        "bfloat16",
        "weights dtype on GPU (CPU always runs float32)",
        choices=["bfloat16", "float16", "float32"],
        group="inference",
    )
    slots: int | None = setting(
        None,
        "concurrent calls B, forced (default: measured at warm-up: the largest B that fits memory "
        "and whose step p99 holds --step-budget-ms)",
        min=1,
        max=1024,
        group="inference",
    )
    max_slots: int | None = setting(
        None,
        "upper bound for the measured B (default: what fits memory; on CPU 4: there the step shares "
        "the cores with the gateway)",
        min=1,
        max=1024,
        group="inference",
    )
    step_budget_ms: float = setting(
        70.0,
        "step time budget, ms of the 80 ms frame: B is sized so that the step p99 stays under it, "
        "and a worker whose p99 over the last minute exceeds it takes no new calls until it recovers",
        min=1.0,
        max=80.0,
        group="inference",
    )
    overload_window_seconds: float = setting(
        60.0, "the window of the serving-time step p99 check (--step-budget-ms)", min=2.0, max=3600.0, group="inference"
    )
    context_seconds: float | None = setting(
        None,
        "seconds of call the model keeps in mind (its KV ring; default: the checkpoint's, 240 s); "
        "shorter fits more slots in memory and forgets sooner",
        min=1.0,
        max=3600.0,
        group="model",
    )
    host: str = setting("0.0.0.0", "address the worker's HTTP/WebSocket server binds", group="worker")
    port: int = setting(
        8081, "port of the worker's HTTP/WebSocket server (0 picks a free one)", min=0, max=65535, group="worker"
    )
    advertise_url: str | None = setting(
        None, "ws:// URL gateways use to reach this worker (default: ws://<host ip>:<port>)", group="worker"
    )
    temp: float | None = setting(
        None, "audio sampling temperature (default: the checkpoint's or 0.8)", min=0.0, group="model"
    )
    temp_text: float | None = setting(
        None, "text sampling temperature (default: the checkpoint's or 0.7)", min=0.0, group="model"
    )
    top_k: int | None = setting(None, "audio top-k (default: the checkpoint's or 250)", min=1, group="model")
    top_k_text: int | None = setting(None, "text top-k (default: the checkpoint's or 25)", min=1, group="model")
    greedy: bool = setting(False, "greedy decoding (argmax) instead of sampling: reproducible output", group="model")
    seed: int = setting(42424242, "random seed for sampling", group="model")
    cuda_graphs: bool = setting(True, "capture the step in CUDA graphs on GPU", group="inference")
    filled_kv: bool = setting(
        False,
        "attend only over the part of each slot's KV ring its call has filled (exact; flex attention, "
        "compiled: seconds more warm-up per batch size; tested on CPU only)",
        group="inference",
    )
    cpu_threads: int | None = setting(
        None,
        "torch threads for inference on CPU (default: half the cores, at least 1: the rest "
        "serve the sockets; more threads than free cores gives long stalls)",
        min=1,
        max=1024,
        group="inference",
    )
    max_call_seconds: float = setting(
        1800.0, "a call that reaches this length is ended cleanly", min=1.0, group="model"
    )
    input_queue_frames: int = setting(
        4, "80 ms input frames a slot may queue before the oldest is dropped", min=1, max=1000, group="inference"
    )
    echo_delay_ms: int = setting(
        0, "with --model echo: how long the echo lags behind the caller", min=0, max=10_000, group="model"
    )
    worker_id: str | None = setting(None, "this worker's id in the pool (default: hostname-port)", group="worker")
    redis_url: str | None = setting(
        None,
        "Redis for the pool (default: none, the worker is reached by its URL only; serve: an embedded redis-server)",
        env="REDIS_URL",
        group="pool",
    )
    redis_connect_seconds: float = setting(
        10.0,
        "at start, how long to wait for Redis to answer before giving up (exit 1)",
        min=0.0,
        max=3600.0,
        group="pool",
    )
    heartbeat_seconds: float = setting(
        1.0, "registry heartbeat interval; the key's TTL is 3x this", min=0.1, max=60.0, group="worker"
    )
    drain_grace_seconds: float = setting(
        300.0, "on SIGTERM, how long calls may go on before exit", min=0.0, group="worker"
    )
    worker_secret: str | None = setting(
        None,
        "shared secret gateways must present to use this worker's /v1 API (sessions, drain, info); "
        "required unless --host is loopback or --insecure-no-worker-secret",
        secret=True,
        env=SECRET_ENV,
        group="secrets",
    )
    worker_secret_file: str | None = setting(
        None, "file holding the worker secret (e.g. a mounted Kubernetes Secret)", env=SECRET_FILE_ENV, group="secrets"
    )
    insecure_no_worker_secret: bool = setting(
        False,
        "serve /v1 without a worker secret on a non-loopback address (only where nothing but the "
        "gateways can reach the worker)",
        env=INSECURE_ENV,
        group="secrets",
    )
    log_level: str = setting("info", "log level", choices=["debug", "info", "warning", "error"], group="logging")

    def validate(self) -> None:
        self.worker_secret = resolve_secret(self.worker_secret, self.worker_secret_file)
        self.worker_secret_file = None  # read once: the secret itself is what is passed on


@dataclass
class AsrSettings:
    """One ASR worker: the callers' utterances of many calls, transcribed in batches."""

    backend: str = setting(
        "faster-whisper",
        "faster-whisper (a Whisper-family model here) or openai (an "
        "OpenAI-compatible /v1/audio/transcriptions endpoint)",
        choices=["faster-whisper", "openai"],
        env=ASR_ENV + "BACKEND",
        group="asr",
    )
    model: str | None = setting(
        None,
        "faster-whisper: a CTranslate2 Whisper repo id, a local directory or 'demo' (default: "
        f"{DEFAULT_ASR_MODEL} when CUDA is present, else demo); openai: the model name sent",
        env=ASR_ENV + "MODEL",
        group="asr",
    )
    hf_revision: str | None = setting(
        None, "Hugging Face revision of --model", env=ASR_ENV + "HF_REVISION", group="asr"
    )
    device: str | None = setting(
        None, "cpu or cuda (default: cuda when present)", choices=["cpu", "cuda"], env=ASR_ENV + "DEVICE", group="asr"
    )
    compute_type: str = setting(
        "default",
        "CTranslate2 compute type (default: the weights' own; int8, int8_float16, float16, float32...)",
        env=ASR_ENV + "COMPUTE_TYPE",
        group="asr",
    )
    cpu_threads: int | None = setting(
        None,
        "CTranslate2 threads on CPU (default: half the cores)",
        min=1,
        max=256,
        env=ASR_ENV + "CPU_THREADS",
        group="asr",
    )
    language: str = setting(
        "ja", "the callers' language (a Whisper language code)", env=ASR_ENV + "LANGUAGE", group="asr"
    )
    beam_size: int = setting(
        1, "beam size (1: greedy, the fastest)", min=1, max=10, env=ASR_ENV + "BEAM_SIZE", group="asr"
    )
    max_batch: int = setting(
        8, "utterances transcribed at once", min=1, max=256, env=ASR_ENV + "MAX_BATCH", group="asr"
    )
    batch_wait_ms: int = setting(
        20,
        "how long a batch waits for more utterances once one is queued",
        min=0,
        max=2000,
        env=ASR_ENV + "BATCH_WAIT_MS",
        group="asr",
    )
    max_queue: int = setting(
        256,
        "utterances that may wait; beyond that they fail at once (overloaded)",
        min=1,
        max=100_000,
        env=ASR_ENV + "MAX_QUEUE",
        group="asr",
    )
    max_sessions: int = setting(
        512, "concurrent call sessions", min=1, max=1024, env=ASR_ENV + "MAX_SESSIONS", group="asr"
    )
    openai_base_url: str | None = setting(
        None,
        "with --backend openai: the API base, e.g. http://asr.internal:8000/v1 (POSTs go to "
        "<base>/audio/transcriptions)",
        env=ASR_ENV + "OPENAI_BASE_URL",
        group="asr-openai",
    )
    openai_api_key: str | None = setting(
        None, "with --backend openai: bearer token", secret=True, env=ASR_ENV + "OPENAI_API_KEY", group="asr-openai"
    )
    openai_timeout_seconds: float = setting(
        30.0,
        "with --backend openai: timeout of one request",
        min=0.1,
        max=600.0,
        env=ASR_ENV + "OPENAI_TIMEOUT_SECONDS",
        group="asr-openai",
    )
    openai_concurrency: int = setting(
        8,
        "with --backend openai: requests in flight at once",
        min=1,
        max=256,
        env=ASR_ENV + "OPENAI_CONCURRENCY",
        group="asr-openai",
    )
    host: str = setting(
        "0.0.0.0", "address the ASR worker's HTTP/WebSocket server binds", env=ASR_ENV + "HOST", group="worker"
    )
    port: int = setting(
        8082,
        "port of the ASR worker's HTTP/WebSocket server (0 picks a free one)",
        min=0,
        max=65535,
        env=ASR_ENV + "PORT",
        group="worker",
    )
    advertise_url: str | None = setting(
        None,
        "ws:// URL gateways use to reach this ASR worker (default: ws://<host ip>:<port>)",
        env=ASR_ENV + "ADVERTISE_URL",
        group="worker",
    )
    worker_id: str | None = setting(
        None, "this ASR worker's id in the pool (default: asr-hostname-port)", env=ASR_ENV + "WORKER_ID", group="worker"
    )
    redis_url: str | None = setting(
        None, "Redis for the pool (default: none: reachable only by URL)", env="REDIS_URL", group="pool"
    )
    redis_connect_seconds: float = setting(
        10.0,
        "at start, how long to wait for Redis to answer before giving up (exit 1)",
        min=0.0,
        max=3600.0,
        group="pool",
    )
    heartbeat_seconds: float = setting(
        1.0,
        "registry heartbeat interval; the key's TTL is 3x this",
        min=0.1,
        max=60.0,
        env=ASR_ENV + "HEARTBEAT_SECONDS",
        group="worker",
    )
    drain_grace_seconds: float = setting(
        60.0,
        "on SIGTERM, how long sessions may go on before exit",
        min=0.0,
        env=ASR_ENV + "DRAIN_GRACE_SECONDS",
        group="worker",
    )
    worker_secret: str | None = setting(
        None,
        "shared secret gateways must present to use this ASR worker's /v1 API (the same as the model workers')",
        secret=True,
        env=SECRET_ENV,
        group="secrets",
    )
    worker_secret_file: str | None = setting(
        None, "file holding the worker secret (e.g. a mounted Kubernetes Secret)", env=SECRET_FILE_ENV, group="secrets"
    )
    insecure_no_worker_secret: bool = setting(
        False, "serve /v1 without a worker secret on a non-loopback address", env=INSECURE_ENV, group="secrets"
    )
    log_level: str = setting(
        "info", "log level", choices=["debug", "info", "warning", "error"], env=ASR_ENV + "LOG_LEVEL", group="logging"
    )

    def validate(self) -> None:
        self.worker_secret = resolve_secret(self.worker_secret, self.worker_secret_file)
        self.worker_secret_file = None
        if self.backend == "openai":
            if not self.openai_base_url:
                raise ConfigError("MOSHIMOSHI_ASR_BACKEND=openai needs MOSHIMOSHI_ASR_OPENAI_BASE_URL")
            if not self.openai_base_url.startswith(("http://", "https://")):
                raise ConfigError("MOSHIMOSHI_ASR_OPENAI_BASE_URL must be an http:// or https:// URL")
            if not self.model:
                raise ConfigError(
                    "MOSHIMOSHI_ASR_BACKEND=openai needs MOSHIMOSHI_ASR_MODEL (the model name "
                    "the endpoint serves, e.g. whisper-1)"
                )


@dataclass
class ServeSettings:
    """What only ``moshimoshi serve`` decides: which roles it starts beside the gateway."""

    asr: str = setting(
        "on", "start an ASR worker for the callers' transcript (on) or not (off)", choices=["on", "off"], group="asr"
    )
    asr_model: str | None = setting(
        None,
        "the ASR worker's model (default: kotoba-whisper-v2.0 with CUDA, else demo)",
        env=ASR_ENV + "MODEL",
        group="asr",
    )


@dataclass
class GatewaySettings:
    """The telephony edge and control plane: SIP/RTP (and WebRTC) in, workers out."""

    sip_host: str = setting("0.0.0.0", "address SIP binds (UDP, TCP and TLS); '::' for IPv6", group="sip")
    sip_port: int = setting(5060, "SIP port, UDP and TCP (0 picks a free one)", min=0, max=65535, group="sip")
    sip_tls_port: int = setting(
        5061,
        "SIP over TLS port (0 picks a free one); TLS is on with --sip-tls-cert and --sip-tls-key",
        min=0,
        max=65535,
        group="encryption",
    )
    sip_tls_cert: str | None = setting(
        None, "PEM file with the TLS certificate chain (leaf first); reloaded when it changes", group="encryption"
    )
    sip_tls_key: str | None = setting(None, "PEM file with the TLS certificate's private key", group="encryption")
    sip_tls_client_ca: str | None = setting(
        None,
        "PEM CA bundle: TLS clients must present a certificate it signed (mutual TLS); also "
        "trusted, beside the system's CAs, for TLS connections the gateway opens",
        group="encryption",
    )
    sip_tls_handshake_seconds: float = setting(
        10.0,
        "a TLS connection must finish its handshake this soon or is closed",
        min=0.5,
        max=120.0,
        group="encryption",
    )
    srtp: str = setting(
        "optional",
        "SRTP (SDES) policy: off; optional (RTP/SAVP offers get SRTP, "
        "RTP/AVP plain RTP); required (488 for plain offers). Keys travel only over TLS",
        choices=["off", "optional", "required"],
        group="encryption",
    )
    srtp_allow_plaintext_keys: bool = setting(
        False,
        "also exchange SRTP keys over UDP/TCP signalling, where anyone on the path reads them (tests only)",
        group="encryption",
    )
    public_host: str | None = setting(
        None, "address announced in Contact and SDP (default: the local address toward each peer)", group="sip"
    )
    rtp_port_min: int = setting(20000, "lowest RTP port (even)", min=1024, max=65534, group="media")
    rtp_port_max: int = setting(30000, "highest RTP port", min=1025, max=65535, group="media")
    codecs: list[str] = setting(
        [],
        "codecs to answer with, in order of preference (opus, G722, PCMU, PCMA); empty: the best "
        "audio the peer offers (Opus, then G.722, then G.711 in the offer's order)",
        group="media",
    )
    jitter_min_ms: int = setting(20, "jitter buffer playout delay floor", min=0, max=200, group="media")
    jitter_max_ms: int = setting(200, "jitter buffer playout delay ceiling", min=20, max=1000, group="media")
    resampler: str = setting(
        "fir",
        "codec rate ↔ 24 kHz resampler: fir (1-1.5 ms each way) or soxr-qq/lq/mq/hq/vhq",
        choices=["fir", "soxr-qq", "soxr-lq", "soxr-mq", "soxr-hq", "soxr-vhq"],
        group="media",
    )
    rtp_timeout_seconds: float = setting(
        30.0, "hang up when the caller's RTP stops this long (0: never)", min=0.0, group="media"
    )
    session_expires: int = setting(1800, "RFC 4028 session interval offered to peers, seconds", min=90, group="sip")
    # Who may talk to the SIP port, and how much (README "Security"; sip/guard.py).
    sip_allow: list[str] = setting(
        list(PRIVATE_NETWORKS),
        "CIDRs allowed to send SIP requests outside a dialog (INVITE and every other "
        "method; OPTIONS too with --sip-restrict-options); anyone else gets 403. Default: loopback and private "
        "ranges only. 0.0.0.0/0,::/0 allows anyone",
        group="sip-security",
    )
    sip_restrict_options: bool = setting(
        False,
        "answer out-of-dialog OPTIONS only from --sip-allow (default: from anyone, for load balancers)",
        group="sip-security",
    )
    sip_auth: list[str] = setting(
        [],
        "user:password pairs, comma-separated: INVITEs must then carry digest credentials (SHA-256 or MD5)",
        secret=True,
        group="sip-security",
    )
    sip_auth_file: str | None = setting(
        None,
        "a file of user:password lines for digest authentication (e.g. a mounted Kubernetes Secret)",
        group="sip-security",
    )
    sip_auth_realm: str = setting("moshimoshi", "the digest realm", group="sip-security")
    sip_auth_algorithms: list[str] = setting(
        ["MD5"],
        "digest algorithms challenged with, the preferred first (RFC 8760: SHA-256,MD5 for peers "
        "that pick the strongest); MD5 alone by default because many UAs fail on any SHA-256 challenge "
        "(sipp 3.6 answers only the first, baresip 1.0 gives up)",
        group="sip-security",
    )
    sip_auth_nonce_seconds: float = setting(
        300.0, "how long a digest nonce is good for (then stale=true)", min=1.0, max=86400.0, group="sip-security"
    )
    sip_rate_limit: int = setting(
        16,
        "SIP requests outside a dialog one source may send per --sip-rate-window-seconds before it is "
        "banned (0: no limit)",
        min=0,
        max=1_000_000,
        group="sip-security",
    )
    sip_rate_window_seconds: float = setting(
        2.0, "the window of --sip-rate-limit", min=0.1, max=3600.0, group="sip-security"
    )
    sip_rate_ban_seconds: float = setting(
        300.0, "how long a source over --sip-rate-limit is ignored", min=1.0, max=86400.0, group="sip-security"
    )
    sip_scanner_agents: list[str] = setting(
        list(SCANNER_USER_AGENTS),
        "User-Agent substrings (case-insensitive) whose requests are dropped unanswered; empty: none",
        group="sip-security",
    )
    sip_tcp_max_connections: int = setting(
        1024, "SIP TCP connections in all", min=1, max=1_000_000, group="sip-security"
    )
    sip_tcp_max_per_source: int = setting(
        32,
        "SIP TCP connections one address (IPv6: one /64) may hold that carry no call",
        min=1,
        max=1_000_000,
        group="sip-security",
    )
    sip_tcp_first_message_seconds: float = setting(
        5.0,
        "a new SIP TCP connection must deliver a whole first message within this",
        min=0.1,
        max=600.0,
        group="sip-security",
    )
    sip_tcp_message_seconds: float = setting(
        10.0,
        "every SIP message on TCP must be complete within this of its first byte",
        min=0.1,
        max=600.0,
        group="sip-security",
    )
    sip_tcp_idle_seconds: float = setting(
        120.0,
        "a SIP TCP connection carrying no call and no message for this long is closed",
        min=1.0,
        group="sip-security",
    )
    sip_tcp_max_header_bytes: int = setting(
        32768, "the largest SIP header section accepted on TCP", min=1024, max=65536, group="sip-security"
    )
    http_host: str = setting("0.0.0.0", "address of the HTTP API, metrics and dashboard", group="api")
    http_port: int = setting(
        8080, "port of the HTTP API, metrics and dashboard (0 picks one)", min=0, max=65535, group="api"
    )
    worker_url: str | None = setting(
        None,
        "ws:// URL of a worker to use without a pool; 'echo:' echoes calls inside the gateway "
        "(a line check that needs no worker)",
        group="pool",
    )
    echo_delay_ms: int = setting(
        0, "with --worker-url echo: how long the echo lags behind the caller", min=0, max=10_000, group="pool"
    )
    model: str | None = setting(None, "model id calls ask the pool for (default: any)", group="pool")
    gateway_id: str | None = setting(
        None, "this gateway's id in call records (default: hostname-sipport)", group="pool"
    )
    lease_ttl_seconds: float = setting(
        15.0, "slot lease TTL; renewed every third of it", min=1.0, max=300.0, group="pool"
    )
    call_retention_seconds: float = setting(
        7 * 24 * 3600.0, "how long call records and transcripts are kept after the call", min=60.0, group="pool"
    )
    redis_url: str | None = setting(
        None, "Redis for the pool (default: embedded redis-server)", env="REDIS_URL", group="pool"
    )
    redis_connect_seconds: float = setting(
        10.0,
        "at start, how long to wait for Redis to answer before giving up (exit 1)",
        min=0.0,
        max=3600.0,
        group="pool",
    )
    worker_stall_ms: int = setting(
        240,
        "a worker session that owes the call frames this long is stalled (a hung "
        "worker): the call moves to another worker at once",
        min=80,
        max=5000,
        group="pool",
    )
    queue_seconds: float = setting(
        5.0, "how long a call may wait (ringing) for a free slot before 503", min=0.0, max=120.0, group="pool"
    )
    retry_after_seconds: int = setting(30, "Retry-After sent with 503", min=1, group="pool")
    transfer_ring_seconds: float = setting(
        30.0,
        "a transfer to a human: how long the target may take to answer "
        "(bridge) or the peer to report success (REFER) before the caller "
        "stays with the AI",
        min=1.0,
        max=300.0,
        group="pool",
    )
    routes: str | None = setting(
        None,
        "routes file (YAML): which model, fallback, DTMF actions, queue announcement, overflow and limits "
        "each dialled number gets; reloaded on SIGHUP and when it changes (default: one route for every number)",
        group="routes",
    )
    outbound_trunk: str | None = setting(
        None,
        "SIP URI that outbound calls (POST /v1/calls) to a number go through: +81312345678 is called as "
        "sip:+81312345678@<its host:port;transport> (default: only sip: targets can be called)",
        group="routes",
    )
    outbound_auth: str | None = setting(
        None, "user:password answering the outbound trunk's digest challenges", secret=True, group="routes"
    )
    outbound_ring_seconds: float = setting(
        30.0, "how long an outbound call may ring before it is given up (no-answer)", min=1.0, max=300.0, group="routes"
    )
    drain_grace_seconds: float = setting(
        300.0, "on SIGTERM, how long calls may go on before exit", min=0.0, group="pool"
    )
    api_tokens: list[str] = setting(
        [],
        "API bearer tokens as token:scope pairs, comma-separated; scope read, call, recordings (read and the "
        "recordings) or admin",
        secret=True,
        group="api",
    )
    log_level: str = setting("info", "log level", choices=["debug", "info", "warning", "error"], group="logging")
    webrtc_ice_servers: list[str] = setting(
        [],
        "STUN/TURN servers for WebRTC calls, comma-separated URLs (stun:host:3478, "
        "turn:host:3478?transport=udp); empty: host candidates only",
        group="webrtc",
    )
    webrtc_turn_username: str | None = setting(
        None, "username for the TURN servers in --webrtc-ice-servers", group="webrtc"
    )
    webrtc_turn_password: str | None = setting(
        None, "password for the TURN servers in --webrtc-ice-servers", secret=True, group="webrtc"
    )
    webrtc_connect_seconds: float = setting(
        15.0,
        "a WebRTC peer whose ICE and DTLS are not up this long after its offer is dropped and its slot released",
        min=1.0,
        max=300.0,
        group="webrtc",
    )
    webhook_url: str | None = setting(
        None, "URL that gets a POST with the call's record, quality and transcript when a call ends", group="webhook"
    )
    webhook_secret: str | None = setting(
        None,
        "key of the HMAC-SHA256 signature of each webhook body (X-Moshimoshi-Signature header)",
        secret=True,
        group="webhook",
    )
    webhook_attempts: int = setting(5, "webhook delivery attempts before giving up", min=1, max=20, group="webhook")
    webhook_backoff_seconds: float = setting(
        1.0, "wait before the first webhook retry; doubles each time", min=0.01, max=300.0, group="webhook"
    )
    webhook_timeout_seconds: float = setting(5.0, "timeout of one webhook POST", min=0.1, max=120.0, group="webhook")
    worker_secret: str | None = setting(
        None,
        "shared secret presented to workers (their MOSHIMOSHI_WORKER_SECRET)",
        secret=True,
        env=SECRET_ENV,
        group="secrets",
    )
    worker_secret_file: str | None = setting(
        None, "file holding the worker secret (e.g. a mounted Kubernetes Secret)", env=SECRET_FILE_ENV, group="secrets"
    )
    # The call's record (README "Transcripts, recording and compliance"); a route will choose these per call.
    transcription: bool = setting(
        True,
        "transcribe the caller's side of each call on an ASR worker (from the pool, or --asr-url); with "
        "none up the call goes on and its transcript says so",
        group="record",
    )
    asr_url: str | None = setting(
        None, "ws:// URL of an ASR worker for the callers' transcript (default: the pool's ASR workers)", group="record"
    )
    recording: str = setting(
        "off",
        "record calls in stereo (the caller left, the agent right): off, wav, or ogg (Opus in Ogg, ~1/16 the size)",
        choices=["off", "wav", "ogg"],
        group="record",
    )
    recording_transfer: bool = setting(
        True,
        "record a bridged transfer's part with a person too, in the call's file (off: silence from the hand-over)",
        group="record",
    )
    recording_dir: str = setting(
        "recordings",
        "directory the recordings are kept in (with an S3 bucket: where they are written before the upload)",
        group="record",
    )
    recording_s3_bucket: str | None = setting(
        None,
        "keep recordings in this S3-compatible bucket (credentials: the usual AWS_* variables, a web "
        "identity or an instance profile)",
        group="record",
    )
    recording_s3_prefix: str = setting("recordings/", "key prefix of the recordings in the bucket", group="record")
    recording_s3_endpoint_url: str | None = setting(
        None, "the S3 API's URL for a bucket not on AWS (MinIO, Ceph, ...), e.g. http://minio:9000", group="record"
    )
    recording_s3_region: str | None = setting(
        None, "the bucket's region (default: the AWS_REGION variable)", group="record"
    )
    dtmf_clear: bool = setting(
        False,
        "keep DTMF digits as pressed in transcripts, the API and webhooks (default: each digit is "
        "stored as '*': digits may be card numbers or PINs)",
        group="record",
    )
    consent_announcement: str | None = setting(
        None,
        "WAV file played to every caller before the AI speaks (e.g. この通話は品質向上のため録音させていただきます)",
        group="record",
    )

    def validate(self) -> None:
        self.worker_secret = resolve_secret(self.worker_secret, self.worker_secret_file)
        self.worker_secret_file = None
        self._validate_webrtc()
        if self.asr_url is not None and not self.asr_url.startswith(("ws://", "wss://")):
            raise ConfigError(f"MOSHIMOSHI_ASR_URL={self.asr_url}: not a ws:// or wss:// URL")
        if self.recording_s3_endpoint_url is not None and not self.recording_s3_endpoint_url.startswith(
            ("http://", "https://")
        ):
            raise ConfigError(
                f"MOSHIMOSHI_RECORDING_S3_ENDPOINT_URL={self.recording_s3_endpoint_url}: not an http:// or https:// URL"
            )
        if self.rtp_port_min >= self.rtp_port_max:
            raise ConfigError(
                f"MOSHIMOSHI_RTP_PORT_MIN={self.rtp_port_min} must be below MOSHIMOSHI_RTP_PORT_MAX={self.rtp_port_max}"
            )
        if self.jitter_min_ms > self.jitter_max_ms:
            raise ConfigError("MOSHIMOSHI_JITTER_MIN_MS must not exceed MOSHIMOSHI_JITTER_MAX_MS")
        self.codecs = _codec_names("MOSHIMOSHI_CODECS", self.codecs)
        if bool(self.sip_tls_cert) != bool(self.sip_tls_key):
            raise ConfigError(
                "MOSHIMOSHI_SIP_TLS_CERT and MOSHIMOSHI_SIP_TLS_KEY go together: set both for SIP over TLS, or neither"
            )
        if self.sip_tls_client_ca and not self.sip_tls_cert:
            raise ConfigError(
                "MOSHIMOSHI_SIP_TLS_CLIENT_CA needs MOSHIMOSHI_SIP_TLS_CERT and "
                "MOSHIMOSHI_SIP_TLS_KEY (mutual TLS is a TLS setting)"
            )
        self.sip_guard()  # every SIP policy setting is read now, so a bad one stops the start
        self._validate_outbound()
        if self.routes:
            from service.gateway.routes.schema import RoutesError
            from service.gateway.routes.table import load_file

            try:
                load_file(self.routes, digest_users=bool(self.sip_credentials()))
            except RoutesError as exc:
                raise ConfigError(f"MOSHIMOSHI_ROUTES: {exc.where(self.routes)}") from None

    def _validate_outbound(self) -> None:
        if self.outbound_trunk:
            from sip.errors import SipParseError
            from sip.uri import SipUri

            try:
                SipUri.parse(self.outbound_trunk, "MOSHIMOSHI_OUTBOUND_TRUNK")
            except SipParseError as exc:
                raise ConfigError(f"MOSHIMOSHI_OUTBOUND_TRUNK: {exc}") from None
        if self.outbound_auth is not None and ":" not in self.outbound_auth:
            raise ConfigError("MOSHIMOSHI_OUTBOUND_AUTH must be user:password")

    def sip_guard(self) -> RequestGuard:
        """The SIP request guard these settings describe (raises ConfigError naming a bad setting)."""
        try:
            allow = AddressList.parse(self.sip_allow)
        except ValueError as exc:
            raise ConfigError(f"MOSHIMOSHI_SIP_ALLOW: {exc}") from None
        if not allow:
            raise ConfigError("MOSHIMOSHI_SIP_ALLOW is empty: nobody could call (0.0.0.0/0,::/0 allows anyone)")
        credentials = self.sip_credentials()
        authenticator = None
        if credentials:
            try:
                authenticator = DigestAuthenticator(
                    credentials,
                    realm=self.sip_auth_realm,
                    nonce_seconds=self.sip_auth_nonce_seconds,
                    algorithms=tuple(self.sip_auth_algorithms),
                )
            except ValueError as exc:
                raise ConfigError(f"MOSHIMOSHI_SIP_AUTH_ALGORITHMS: {exc}") from None
        rate = None
        if self.sip_rate_limit:
            rate = SourceRateLimiter(self.sip_rate_limit, self.sip_rate_window_seconds, self.sip_rate_ban_seconds)
        return RequestGuard(
            allow=allow,
            restrict_options=self.sip_restrict_options,
            authenticator=authenticator,
            rate=rate,
            scanner_agents=self.sip_scanner_agents,
        )

    def sip_credentials(self) -> dict[str, str]:
        """Digest users from --sip-auth and --sip-auth-file (never shown in an error)."""
        try:
            credentials = parse_credentials(",".join(self.sip_auth), "MOSHIMOSHI_SIP_AUTH")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.sip_auth_file:
            try:
                text = Path(self.sip_auth_file).read_text()
            except OSError as exc:
                raise ConfigError(f"MOSHIMOSHI_SIP_AUTH_FILE={self.sip_auth_file}: {exc.strerror}") from None
            try:
                from_file = parse_credentials(text, f"MOSHIMOSHI_SIP_AUTH_FILE={self.sip_auth_file}")
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            twice = sorted(from_file.keys() & credentials.keys())
            if twice:
                raise ConfigError(
                    f"digest user {twice[0]!r} is in both MOSHIMOSHI_SIP_AUTH and MOSHIMOSHI_SIP_AUTH_FILE"
                )
            credentials.update(from_file)
        return credentials

    def sip_stream_limits(self) -> StreamLimits:
        return StreamLimits(
            max_connections=self.sip_tcp_max_connections,
            max_per_source=self.sip_tcp_max_per_source,
            first_message_seconds=self.sip_tcp_first_message_seconds,
            message_seconds=self.sip_tcp_message_seconds,
            idle_seconds=self.sip_tcp_idle_seconds,
            max_header_bytes=self.sip_tcp_max_header_bytes,
            handshake_seconds=self.sip_tls_handshake_seconds,
        )

    @property
    def sip_tls(self) -> bool:
        """Whether SIP over TLS is on."""
        return bool(self.sip_tls_cert and self.sip_tls_key)

    def _validate_webrtc(self) -> None:
        for url in self.webrtc_ice_servers:
            scheme = url.split(":", 1)[0].lower()
            if scheme not in ("stun", "turn", "turns") or not url.split(":", 1)[1]:
                raise ConfigError(f"MOSHIMOSHI_WEBRTC_ICE_SERVERS: {url!r} is not a stun:, turn: or turns: URL")
            if scheme.startswith("turn") and not (self.webrtc_turn_username and self.webrtc_turn_password):
                raise ConfigError(
                    f"MOSHIMOSHI_WEBRTC_ICE_SERVERS: {url!r} needs MOSHIMOSHI_WEBRTC_TURN_USERNAME "
                    "and MOSHIMOSHI_WEBRTC_TURN_PASSWORD"
                )


def _codec_names(variable: str, names: list[str]) -> list[str]:
    """Codec names as SDP spells them, each one that can run here, no repeats."""
    from sip import codecs

    out: list[str] = []
    for name in names:
        try:
            spec = codecs.spec(name)
        except ValueError:
            raise ConfigError(
                f"{variable}={','.join(names)}: {name!r} is not a codec; supported are {', '.join(codecs.available())}"
            ) from None
        if spec.name not in codecs.available():
            raise ConfigError(f"{variable}: {spec.name} cannot run here (its package is not installed)")
        if spec.name not in out:
            out.append(spec.name)
    return out


@dataclass
class CallSettings:
    """``moshimoshi call``: a test call from the command line (UAC)."""

    uri: str = setting("", "SIP URI to call", group="call", positional=True)
    play: str | None = setting(None, "WAV file to play to the callee (any rate, mono or stereo)", group="call")
    record: str | None = setting(
        None, "stereo WAV to write: what we sent on the left, what came back on the right (8 kHz)", group="call"
    )
    transcript: str | None = setting(
        None, "file for the call's transcript, both sides (default: <record>.txt if --record)", group="call"
    )
    seconds: float = setting(10.0, "hang up after this many seconds of call", min=0.1, group="call")
    response_seconds: float = setting(
        5.0,
        "give up when the callee sends no SIP response at all (not even 100 Trying) within this",
        min=0.5,
        max=64.0,
        group="call",
    )
    dtmf: str | None = setting(None, "DTMF digits to send (RFC 4733) one second into the call", group="call")
    caller: str = setting("moshimoshi", "the user part of the From URI: the number (or name) to call as", group="call")
    username: str | None = setting(None, "digest auth user", group="call")
    password: str | None = setting(None, "digest auth password", secret=True, group="call")
    codec: str = setting(
        "PCMU",
        "codec to offer first (PCMU and PCMA follow it in the offer)",
        choices=["PCMU", "PCMA", "G722", "opus"],
        group="call-media",
    )
    ptime: int = setting(20, "packet time to offer, ms", min=10, max=40, group="call-media")
    local_host: str = setting(
        "0.0.0.0", "local address for SIP and RTP (0.0.0.0 becomes :: for an IPv6 URI)", group="call-media"
    )
    local_port: int = setting(0, "local SIP port (0 picks one)", min=0, max=65535, group="call-media")
    rtp_port_min: int = setting(40000, "lowest local RTP port", min=1024, max=65534, group="call-media")
    rtp_port_max: int = setting(49999, "highest local RTP port", min=1025, max=65535, group="call-media")
    transport: str = setting(
        "udp",
        "SIP transport (tls: to port 5061 unless the URI names one; a sips: URI is always TLS)",
        choices=["udp", "tcp", "tls"],
        group="call",
    )
    srtp: bool = setting(
        False,
        "offer SRTP (RTP/SAVP, SDES keys); the call fails if the callee does not "
        "take it. Use it with --transport tls: otherwise the keys travel in clear text",
        group="call-tls",
    )
    tls_ca: str | None = setting(
        None, "PEM CA file trusted for the callee's TLS certificate, besides the system's CAs", group="call-tls"
    )
    tls_insecure: bool = setting(
        False, "do not check the callee's TLS certificate (a test server only)", group="call-tls"
    )
    tls_cert: str | None = setting(
        None, "PEM certificate chain to present to a callee that wants mutual TLS", group="call-tls"
    )
    tls_key: str | None = setting(None, "the private key of --tls-cert", group="call-tls")
    api: str | None = setting(
        None,
        "the gateway's API, where the transcript is read after the call (default: http://<the URI's "
        "host>:8080). The transcript file is written either way: without a transcript it says why",
        group="call-api",
    )
    api_token: str | None = setting(
        None, "a read token for --api (moshimoshi serve prints one at start)", secret=True, group="call-api"
    )
    log_level: str = setting("warning", "log level", choices=["debug", "info", "warning", "error"], group="logging")

    def validate(self) -> None:
        first = self.rtp_port_min + (self.rtp_port_min & 1)  # RTP on an even port, RTCP above it
        if first >= self.rtp_port_max:
            raise ConfigError(
                f"MOSHIMOSHI_RTP_PORT_MIN={self.rtp_port_min}..MOSHIMOSHI_RTP_PORT_MAX="
                f"{self.rtp_port_max} holds no RTP/RTCP port pair"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("MOSHIMOSHI_TLS_CERT and MOSHIMOSHI_TLS_KEY go together")
