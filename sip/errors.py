"""Exceptions of the sip package.

``SipParseError`` is the only exception the parsers raise: its message names the fault
(which header, what is wrong) and ``status`` is the response a server should answer
with (400, 505 for a wrong version, 513 for an oversized message).
"""

from __future__ import annotations

import typing as tp
from collections.abc import Mapping

from sip.status import reason_phrase

if tp.TYPE_CHECKING:
    from sip.message import Response


class SipParseError(ValueError):
    """A SIP message, header or URI is malformed; the message says where and how."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class SipError(Exception):
    """Answer the request at hand with ``status``: raise it from an application callback
    (``on_reoffer``) to reject, e.g. ``SipError(488, "Not Acceptable Here")``."""

    def __init__(self, status: int, reason: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        self.status = status
        self.reason = reason or reason_phrase(status)
        self.headers = dict(headers or {})
        super().__init__(f"{status} {self.reason}")


class CallFailed(SipError):
    """An outgoing INVITE ended without a dialog: a final non-2xx, a timeout (408) or a
    transport failure (503). ``response`` is the final response when one arrived."""

    def __init__(self, status: int, reason: str | None = None, response: Response | None = None) -> None:
        super().__init__(status, reason)
        self.response = response


class CallCancelled(Exception):
    """The caller cancelled (CANCEL) before the call was answered; the UA already sent
    200 to the CANCEL and 487 to the INVITE."""


class CallAborted(Exception):
    """An incoming call ended before it was answered for a reason other than CANCEL:
    ``reason`` is a short token (``no-prack``: a reliable provisional response was never
    acknowledged, and the UA rejected the INVITE with 500)."""

    def __init__(self, reason: str, message: str | None = None) -> None:
        super().__init__(message or reason)
        self.reason = reason


class TransportError(OSError):
    """A message could not be sent (no route, connection refused or closed)."""
