"""Admission: which session holds which of the worker's B slots.

The seam for the pool: a :data:`TokenValidator` decides whether a lease's fencing token is
current (the Redis pool plugs its check in here); the default accepts every token, which
is right for a single gateway without a pool.
"""

from __future__ import annotations

import inspect
import typing as tp

from service.wire import CloseCode

# (slot, token, call_id) -> accepted? May be a coroutine function.
TokenValidator = tp.Callable[[int, "int | None", str], "bool | tp.Awaitable[bool]"]


class AdmissionError(Exception):
    """A session cannot have a slot; ``code`` is the close code of PROTOCOL.md."""

    code: int = CloseCode.NO_SLOT

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SlotBusy(AdmissionError):
    code = CloseCode.SLOT_BUSY


class SlotOutOfRange(AdmissionError):
    code = CloseCode.SLOT_BUSY


class NoFreeSlot(AdmissionError):
    code = CloseCode.NO_SLOT


class NotAccepting(AdmissionError):
    """The worker is loading, or draining before shutdown."""

    code = CloseCode.NO_SLOT


class LeaseRefused(AdmissionError):
    code = CloseCode.FENCED


def accept_any_token(slot: int, token: int | None, call_id: str) -> bool:
    return True


class SlotTable:
    """B slots, each free or bound to one call; all methods run on the event loop."""

    def __init__(self, size: int, validator: TokenValidator | None = None) -> None:
        if size < 1:
            raise ValueError(f"a worker needs at least one slot, got {size}")
        self.size = size
        self.validator: TokenValidator = validator or accept_any_token
        self.accepting = False
        self.not_accepting_reason = "the worker is loading its model"
        self._calls: list[str | None] = [None] * size
        self._owners: list[object | None] = [None] * size
        self._tokens: list[int | None] = [None] * size
        # With a pool: a session presenting a newer valid lease for a busy slot takes it over;
        # this is told the slot and the old owner, which must end its session.
        self.on_preempt: tp.Callable[[int, object | None], None] | None = None
        self.preempted = 0

    @property
    def busy(self) -> int:
        return sum(call is not None for call in self._calls)

    @property
    def free(self) -> int:
        return self.size - self.busy

    def holder(self, slot: int) -> str | None:
        return self._calls[slot]

    def stop_accepting(self, reason: str) -> None:
        self.accepting = False
        self.not_accepting_reason = reason

    async def bind(self, slot: int | None, token: int | None, call_id: str = "", owner: object | None = None) -> int:
        """Claim ``slot`` (or any free one when None) for ``call_id``; return the slot.

        ``owner`` (the session) is what :meth:`release` may be given to make sure that only
        the holder frees a slot. Raises an :class:`AdmissionError` whose ``code`` is the
        close code to use.
        """
        if not self.accepting:
            raise NotAccepting(self.not_accepting_reason)
        if slot is None:
            free = [i for i, call in enumerate(self._calls) if call is None]
            if not free:
                raise NoFreeSlot(f"all {self.size} slots are busy")
            slot = free[0]
        elif not 0 <= slot < self.size:
            raise SlotOutOfRange(f"slot {slot} is out of range (this worker has slots 0..{self.size - 1})")
        elif self._calls[slot] is not None:
            await self._preempt(slot, token, call_id)
        # Reserve before awaiting the validator, so that two sessions never share a slot.
        self._calls[slot] = call_id or f"slot-{slot}"
        self._owners[slot] = owner
        self._tokens[slot] = token
        try:
            verdict = self.validator(slot, token, call_id)
            if inspect.isawaitable(verdict):
                verdict = await verdict
        except BaseException:
            self._free(slot)
            raise
        if not verdict:
            self._free(slot)
            raise LeaseRefused(f"lease for slot {slot} refused: missing, unknown or stale token {token!r}")
        return slot

    async def _preempt(self, slot: int, token: int | None, call_id: str) -> None:
        """A busy slot: refuse, unless ``token`` is a newer lease than the holder's and the
        validator confirms it is the slot's current one (the holder was fenced out)."""
        held, owner = self._tokens[slot], self._owners[slot]
        if token is None or held is None or token <= held or self.on_preempt is None:
            raise SlotBusy(f"slot {slot} is busy")
        verdict = self.validator(slot, token, call_id)
        if inspect.isawaitable(verdict):
            verdict = await verdict
        if not verdict:
            raise LeaseRefused(f"lease for slot {slot} refused: token {token!r} is not the current lease")
        if self._owners[slot] is owner and self._calls[slot] is not None:
            self._free(slot)
            self.preempted += 1
            self.on_preempt(slot, owner)
        elif self._calls[slot] is not None:
            raise SlotBusy(f"slot {slot} is busy")

    def token(self, slot: int) -> int | None:
        return self._tokens[slot] if 0 <= slot < self.size else None

    def release(self, slot: int, owner: object | None = None) -> None:
        """Free ``slot`` (only if ``owner`` holds it, when given); freeing a free slot is harmless."""
        if not 0 <= slot < self.size:
            return
        if owner is not None and self._owners[slot] is not owner:
            return
        self._free(slot)

    def _free(self, slot: int) -> None:
        self._calls[slot] = None
        self._owners[slot] = None
        self._tokens[slot] = None
