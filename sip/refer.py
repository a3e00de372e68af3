"""Call transfer by REFER (RFC 3515), from the transferor's side.

``Dialog.refer(target)`` sends a REFER in an established dialog asking the peer (the
transferee) to call ``target`` (``Refer-To``), naming us in ``Referred-By`` (RFC 3892).
A 2xx accepts it and creates an implicit subscription: the peer reports how its call to
the target goes in NOTIFY requests (``Event: refer``) whose ``message/sipfrag`` body is
that call's status line (``SIP/2.0 100 Trying`` ... ``SIP/2.0 200 OK``). Each NOTIFY is
answered 200 and its status handed to the :class:`Referral`; the first final status (or
``Subscription-State: terminated``) ends it. What the transferor does next (hang up on
success, keep the call on a failure) is the application's business.

A NOTIFY that matches no referral of its dialog gets 481, one for another event package
489, one whose body is not a readable sipfrag 400 (RFC 6665 §4.1.3).
"""

from __future__ import annotations

import asyncio
import typing as tp
from dataclasses import dataclass

from sip.errors import SipParseError

if tp.TYPE_CHECKING:
    from sip.message import Response

SIPFRAG = "message/sipfrag"
MAX_REASON_CHARS = 120


@dataclass(frozen=True)
class ReferStatus:
    """How the transferee's call to the target goes: a SIP status and its reason phrase
    (from a NOTIFY's sipfrag, from the REFER's own failure, or made here: 408 when no
    final NOTIFY came in time, 487 when the dialog ended first)."""

    status: int
    reason: str
    local: bool = False  # made here, not reported by the peer

    @property
    def final(self) -> bool:
        return self.status >= 200

    @property
    def success(self) -> bool:
        return 200 <= self.status < 300

    def __str__(self) -> str:
        return f"{self.status} {self.reason}".strip()


def parse_sipfrag(body: bytes) -> ReferStatus:
    """The status line of a ``message/sipfrag`` body (RFC 3420), e.g. ``SIP/2.0 180 Ringing``;
    the headers that may follow it are ignored. Raises SipParseError."""
    first = body.split(b"\n", 1)[0].rstrip(b"\r")
    try:
        line = first.decode("utf-8")
    except UnicodeDecodeError:
        raise SipParseError("sipfrag: the status line is not UTF-8") from None
    parts = line.split(" ", 2)
    if len(parts) < 2 or parts[0].upper() != "SIP/2.0" or len(parts[1]) != 3 or not parts[1].isdigit():
        raise SipParseError(f"sipfrag: not a SIP status line: {line[:60]!r}")
    status = int(parts[1])
    if not 100 <= status <= 699:
        raise SipParseError(f"sipfrag: status {status} out of range")
    reason = parts[2] if len(parts) > 2 else ""
    reason = "".join(c for c in reason if c.isprintable())[:MAX_REASON_CHARS]
    return ReferStatus(status, reason)


def subscription_terminated(value: str | None) -> bool:
    """Whether a ``Subscription-State`` value says the subscription ended."""
    return value is not None and value.split(";", 1)[0].strip().lower() == "terminated"


def event_package(value: str | None) -> tuple[str, str | None]:
    """The package and ``id`` parameter of an ``Event`` header (``refer;id=93809824``)."""
    if value is None:
        return "", None
    package, *params = (p.strip() for p in value.split(";"))
    event_id = None
    for param in params:
        name, _, text = param.partition("=")
        if name.strip().lower() == "id":
            event_id = text.strip()
    return package.lower(), event_id


class Referral:
    """One REFER we sent and its implicit subscription (see the module docstring).

    ``response`` is the REFER's final response; ``accepted`` whether it was a 2xx.
    ``progress`` holds every status reported so far, in order; ``outcome()`` waits for the
    final one. Iterate (``async for status in referral``) to follow them as they come.
    """

    def __init__(self, event_id: str) -> None:
        self.event_id = event_id
        self.response: Response | None = None
        self.progress: list[ReferStatus] = []
        self._final: asyncio.Future[ReferStatus] = asyncio.get_running_loop().create_future()
        self._changed = asyncio.Event()

    @property
    def accepted(self) -> bool:
        return self.response is not None and self.response.is_success

    @property
    def done(self) -> bool:
        return self._final.done()

    def notified(self, status: ReferStatus, *, terminated: bool = False) -> None:
        """A NOTIFY reported ``status`` (``terminated``: its Subscription-State said so)."""
        if self._final.done():
            return
        self.progress.append(status)
        self._changed.set()
        if status.final:
            self._final.set_result(status)
        elif terminated:  # the subscription ended without saying how the call went
            self._final.set_result(ReferStatus(status.status, f"subscription ended at {status}", local=True))

    def finish(self, status: ReferStatus) -> None:
        """End the referral with ``status`` (a local outcome) unless it already has one."""
        if not self._final.done():
            self.progress.append(status)
            self._changed.set()
            self._final.set_result(status)

    async def outcome(self, timeout: float | None = None) -> ReferStatus:  # noqa: ASYNC109 - a subscription's life
        """The final status; after ``timeout`` seconds without one, a local 408 (and the
        referral is finished: later NOTIFYs get 481)."""
        try:
            return await asyncio.wait_for(asyncio.shield(self._final), timeout)
        except TimeoutError:
            self.finish(ReferStatus(408, f"no final NOTIFY within {timeout:g} s", local=True))
            return self._final.result()

    def __aiter__(self) -> tp.AsyncIterator[ReferStatus]:
        return self._follow()

    async def _follow(self) -> tp.AsyncIterator[ReferStatus]:
        seen = 0
        while True:
            while seen < len(self.progress):
                seen += 1
                yield self.progress[seen - 1]
            if self._final.done():
                return
            self._changed.clear()
            await self._changed.wait()
