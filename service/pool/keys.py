"""Redis key names of the pool, all under one configurable prefix.

The Lua scripts in ``lua/`` build the same names from the prefix they are given (they
must, since a claim looks at keys it only learns while running); this module is the one
place both follow:

| key | type | holds |
| --- | --- | --- |
| ``{p}workers`` | zset | worker id → last heartbeat (ms, Redis clock); dead ones kept a while for display |
| ``{p}worker:{id}`` | hash | the worker's registration (``role`` model or asr); PX = 3 heartbeats, so it vanishes with the worker |
| ``{p}lease:{id}:{slot}`` | string | ``"<token>|<owner>"`` with PX = lease TTL; the slot is free iff absent |
| ``{p}held:{id}`` | zset | slot → its lease's expiry (ms): an index to count a worker's free slots fast |
| ``{p}issued:{id}`` | hash | slot → newest token ever issued for it (renew never resurrects an older one) |
| ``{p}fence`` | string | the fencing counter (INCR) |
| ``{p}call:{call_id}`` | hash | one call's record, PX = retention |
| ``{p}calls`` | zset | call id → start time (ms): the time-ordered index of call records |
| ``{p}probe:{name}`` | string | a gateway's write probe (readiness), PX 10 s |
"""

from __future__ import annotations

DEFAULT_PREFIX = "mm:"
MAX_ID_LENGTH = 200


def check_id(kind: str, value: str) -> str:
    """An id that is safe inside a key name: non-empty, short, no whitespace or control characters."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{kind} must be a non-empty string")
    if len(value) > MAX_ID_LENGTH:
        raise ValueError(f"{kind} is longer than {MAX_ID_LENGTH} characters")
    if any(ch.isspace() or not ch.isprintable() for ch in value):
        raise ValueError(f"{kind} {value!r} contains whitespace or control characters")
    return value


def check_model(value: str) -> str:
    """A model id (a repo id or a local path; it never goes into a key name)."""
    if not isinstance(value, str) or not value or len(value) > 1000:
        raise ValueError("model must be a non-empty string of at most 1000 characters")
    return value


class Keys:
    """Key names under ``prefix``."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        if any(ch.isspace() for ch in prefix):
            raise ValueError(f"key prefix {prefix!r} contains whitespace")
        self.prefix = prefix
        self.workers = prefix + "workers"
        self.fence = prefix + "fence"
        self.calls = prefix + "calls"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}worker:{worker_id}"

    def lease(self, worker_id: str, slot: int) -> str:
        return f"{self.prefix}lease:{worker_id}:{slot}"

    def held(self, worker_id: str) -> str:
        return f"{self.prefix}held:{worker_id}"

    def issued(self, worker_id: str) -> str:
        return f"{self.prefix}issued:{worker_id}"

    def call(self, call_id: str) -> str:
        return f"{self.prefix}call:{call_id}"

    def probe(self, name: str) -> str:
        return f"{self.prefix}probe:{name}"
