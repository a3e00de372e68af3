"""Redis coordination of the worker pool: registry, fenced slot leases, call records.

Workers and gateways share one Redis (media never passes through it):

- a worker registers and heartbeats (``WorkerRegistration``), and admits a session only if
  its slot's lease carries the session's fencing token (``WorkerRegistration.admit``);
- a gateway claims a slot on the least loaded worker (``SlotLeases.claim``), keeps the lease
  alive for the call (``SlotLeases.hold``) and streams to the worker directly;
- the control plane lists workers and their leases (``RegistryReader``) and calls
  (``CallRecords``).

Every operation raises ``PoolUnavailable`` quickly when Redis is unreachable.
"""

from service.pool.calls import ACTIVE, ENDED, CallRecord, CallRecords
from service.pool.connection import PoolClient, PoolError, PoolUnavailable, StreamEntries, connect, redacted
from service.pool.embedded import EmbeddedRedis, EmbeddedRedisError
from service.pool.fencing import Admission, SlotFence
from service.pool.keys import DEFAULT_PREFIX, Keys
from service.pool.leases import DEFAULT_LEASE_TTL_MS, Lease, LeaseHolder, RenewResult, SlotLeases
from service.pool.registry import (
    ASR_ROLE,
    DRAINING,
    MODEL_ROLE,
    OVERLOADED,
    READY,
    LiveSession,
    RegistryReader,
    SlotLease,
    WorkerInfo,
    WorkerRegistration,
    WorkerStatus,
)
from service.pool.retry import Backoff, Retries

__all__ = [
    "ACTIVE",
    "ASR_ROLE",
    "DEFAULT_LEASE_TTL_MS",
    "DEFAULT_PREFIX",
    "DRAINING",
    "ENDED",
    "MODEL_ROLE",
    "OVERLOADED",
    "READY",
    "Admission",
    "Backoff",
    "CallRecord",
    "CallRecords",
    "EmbeddedRedis",
    "EmbeddedRedisError",
    "Keys",
    "Lease",
    "LiveSession",
    "Retries",
    "LeaseHolder",
    "PoolClient",
    "PoolError",
    "PoolUnavailable",
    "RegistryReader",
    "RenewResult",
    "SlotFence",
    "SlotLease",
    "SlotLeases",
    "StreamEntries",
    "WorkerInfo",
    "WorkerRegistration",
    "WorkerStatus",
    "connect",
    "redacted",
]
