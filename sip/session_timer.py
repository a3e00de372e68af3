"""SIP session timers (RFC 4028): Session-Expires / Min-SE negotiation.

A ``SessionTimer`` says who refreshes (``local`` or ``remote``) and how often. The
refresher sends a refresh (re-INVITE or UPDATE) at half the interval; the other side
ends the session with BYE when no refresh came ``interval - min(32, interval/3)``
seconds after the last one (§10).
"""

from __future__ import annotations

from dataclasses import dataclass

from sip.errors import SipError, SipParseError
from sip.grammar import Scanner
from sip.headers import parse_uint
from sip.message import Request, Response


@dataclass(frozen=True)
class SessionExpires:
    """The value of a Session-Expires header: ``1800;refresher=uac``."""

    interval: int
    refresher: str | None = None

    @classmethod
    def parse(cls, text: str) -> SessionExpires:
        sc = Scanner(text.strip(), "Session-Expires")
        number = sc.read_until("; \t")
        interval = parse_uint(number, "Session-Expires", 2**32 - 1)
        params = sc.params()
        sc.expect_end()
        refresher = params.get("refresher")
        if refresher is not None:
            refresher = refresher.lower()
            if refresher not in ("uac", "uas"):
                raise SipParseError(f"Session-Expires: refresher must be uac or uas, got {refresher!r}")
        if interval < 1:
            raise SipParseError("Session-Expires: interval must be at least 1 second")
        return cls(interval, refresher)

    def __str__(self) -> str:
        return str(self.interval) + (f";refresher={self.refresher}" if self.refresher else "")


@dataclass(frozen=True)
class SessionTimer:
    """A negotiated session timer: ``refresher`` is ``local`` or ``remote``."""

    interval: int
    refresher: str

    @property
    def refresh_after(self) -> float:
        return self.interval / 2

    @property
    def expire_after(self) -> float:
        """When the non-refresher gives up on the session (§10)."""
        return self.interval - min(32.0, self.interval / 3)


def _min_se(request: Request) -> int | None:
    value = request.headers.get("Min-SE")
    if value is None:
        return None
    return parse_uint(value.split(";")[0], "Min-SE", 2**32 - 1)


def supports_timer(message: Request | Response) -> bool:
    return "timer" in message.option_tags("Supported") or "timer" in message.option_tags("Require")


def answer_session_timer(
    request: Request, *, preferred: int, min_se: int
) -> tuple[SessionTimer | None, list[tuple[str, str]]]:
    """The UAS side (§9): the timer to run and the headers for the 2xx. Raises
    ``SipError(422)`` with our Min-SE when the requested interval is too small.
    ``preferred`` 0 means: no timer unless the UAC asks for one."""
    value = request.headers.get("Session-Expires")
    supported = supports_timer(request)
    floor = _min_se(request) or min_se
    if value is None:
        if preferred <= 0:
            return None, []
        interval = max(preferred, floor)
        refresher = "uac" if supported else "uas"
    else:
        requested = SessionExpires.parse(value)
        if requested.interval < min_se:
            raise SipError(422, headers={"Min-SE": str(min_se)})
        interval = requested.interval
        if preferred > 0:
            interval = max(min(interval, preferred), floor, min_se)
        refresher = requested.refresher or ("uac" if supported else "uas")
        if not supported:
            refresher = "uas"
    headers = [("Session-Expires", f"{interval};refresher={refresher}")]
    if supported:
        headers.append(("Require", "timer"))
    return SessionTimer(interval, "remote" if refresher == "uac" else "local"), headers


def timer_from_response(response: Response) -> SessionTimer | None:
    """The UAC side (§7.2): the timer the 2xx to our request set, if any."""
    value = response.headers.get("Session-Expires")
    if value is None:
        return None
    expires = SessionExpires.parse(value)
    return SessionTimer(expires.interval, "remote" if expires.refresher == "uas" else "local")


def min_se_of(response: Response) -> int | None:
    """The Min-SE a 422 demands."""
    value = response.headers.get("Min-SE")
    if value is None:
        return None
    try:
        return parse_uint(value.split(";")[0], "Min-SE", 2**32 - 1)
    except SipParseError:
        return None
