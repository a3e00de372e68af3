"""The worker's own memory of fencing tokens: the highest one admitted per slot.

A gateway that lost its lease (it expired, or Redis failed over and lost it) may still try
to start a session with its old token after another gateway got the slot with a newer
one. Redis alone cannot refuse it once the lease key is gone, so the worker keeps, per
slot, the highest token it admitted and refuses any lower one. The highest token over
all slots goes out with every heartbeat; registration lifts the Redis counter to at least
that, so tokens stay monotonic even after Redis restarts empty.
"""

from __future__ import annotations

import enum


class Admission(enum.Enum):
    """The worker's answer to a session's (slot, token)."""

    ADMITTED = "admitted"
    STALE = "stale"  # lower than a token this slot already admitted: close 4003
    NOT_LEASED = "not_leased"  # the slot's current lease does not carry this token: close 4003
    BAD_SLOT = "bad_slot"  # no such slot on this worker: close 4009


class SlotFence:
    """Per slot, the highest token admitted; ``highest`` over all slots and all tokens seen."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._admitted = [0] * capacity
        self.highest = 0
        self.refused_stale = 0

    def has_slot(self, slot: int) -> bool:
        return isinstance(slot, int) and 0 <= slot < self.capacity

    def admitted(self, slot: int) -> int:
        """The highest token this slot admitted (0: none yet)."""
        return self._admitted[slot]

    def is_stale(self, slot: int, token: int) -> bool:
        """True if ``token`` is below one this slot already admitted (the same one is not stale:
        a gateway may reconnect with its lease)."""
        return token < self._admitted[slot]

    def observe(self, token: int) -> None:
        """Remember a token seen anywhere (it will be reported with the next heartbeat)."""
        self.highest = max(self.highest, token)

    def admit(self, slot: int, token: int) -> bool:
        """Record ``token`` for ``slot`` unless it is stale; False (and counted) when stale."""
        self.observe(token)
        if self.is_stale(slot, token):
            self.refused_stale += 1
            return False
        self._admitted[slot] = token
        return True
