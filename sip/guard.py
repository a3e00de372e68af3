"""Who may talk to a user agent, and how much: the policy a ``UserAgent`` applies to every
request before it creates any state for it.

``RequestGuard`` holds the pieces (each optional):

- ``scanner_agents``: User-Agent substrings of known SIP scanners (``friendly-scanner``,
  ``sipvicious``...); their requests are dropped without an answer.
- ``rate``: a ``SourceRateLimiter`` (Kamailio ``pike``): a source over its limit gets one
  503 with Retry-After, then nothing until its ban ends. Every request outside a dialog
  counts, except an INVITE with valid digest credentials (its count is refunded).
- ``allow``: an ``AddressList`` of sources that may send requests outside a dialog
  (INVITE and every other method; OPTIONS too with ``restrict_options``). Anyone else gets
  403 ``Forbidden``, the same answer whatever the user or the method, so nothing can be
  enumerated.
- ``authenticator``: a ``DigestAuthenticator``; an INVITE that creates a dialog without
  valid credentials gets 401 with a fresh challenge.

Requests within a dialog (or a transaction) are accepted only from that dialog's peer: the
address its requests came from, its first Record-Route hop, its Contact (IP literals). A
forged BYE, re-INVITE or CANCEL from elsewhere gets 403 and ends nothing (an ACK, never
answered, is dropped). A dialog's own peer is never rate limited or refused by ``allow``
within its dialog, so a busy trunk's calls in progress end cleanly even while it is banned.

Every refusal is stateless: the UA answers (or drops) before the transaction layer sees
the request, so a flood of refused INVITEs builds no transaction, dialog or call; the ACK
of a stateless 403/401 matches nothing and is absorbed. ``counters`` counts each refusal
by reason.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from sip.acl import AddressList
from sip.auth import DigestAuthenticator
from sip.message import Request
from sip.ratelimit import RateOutcome, SourceRateLimiter

SCANNER_USER_AGENTS = (
    "friendly-scanner",
    "sipvicious",
    "sipcli",
    "vaxsipuseragent",
    "pplsip",
    "iwar",
    "sip-scan",
    "sundayddr",
)

# Refusal reasons (the label of the refusal counter).
SCANNER = "scanner"
RATE_LIMITED = "rate-limited"  # the request that tripped the limit (answered 503)
BANNED = "banned"  # requests from a banned source (dropped)
NOT_ALLOWED = "not-allowed"  # source not in the allow list (403)
NOT_PEER = "not-dialog-peer"  # in-dialog request from other than the dialog's peer (403 or dropped)
AUTH_REASONS = ("missing", "malformed", "failed", "stale", "replayed")  # 401, as "auth-<reason>"


@dataclass(frozen=True)
class Refusal:
    """What to do with a refused request: answer ``status`` (with ``headers``) statelessly,
    or drop it when ``status`` is None; ``reason`` is what it is counted as."""

    reason: str
    status: int | None = None
    headers: tuple[tuple[str, str], ...] = ()


@dataclass
class GuardCounters:
    """Refusals by reason (answered and dropped alike)."""

    refused: dict[str, int] = field(default_factory=dict)

    def count(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1


class RequestGuard:
    """See the module docstring."""

    def __init__(
        self,
        *,
        allow: AddressList | None = None,
        restrict_options: bool = False,
        authenticator: DigestAuthenticator | None = None,
        rate: SourceRateLimiter | None = None,
        scanner_agents: Iterable[str] = SCANNER_USER_AGENTS,
    ) -> None:
        self.allow = allow
        self.restrict_options = restrict_options
        self.authenticator = authenticator
        self.rate = rate
        self.scanner_agents = tuple(agent.lower() for agent in scanner_agents if agent.strip())
        self.counters = GuardCounters()

    def __repr__(self) -> str:
        return (
            f"<RequestGuard allow={self.allow!s} auth={self.authenticator is not None} "
            f"rate={'off' if self.rate is None else f'{self.rate.limit}/{self.rate.window:g}s'}>"
        )

    def is_scanner(self, request: Request) -> bool:
        if not self.scanner_agents:
            return False
        agent = request.headers.get("User-Agent")
        if not agent:
            return False
        agent = agent.lower()
        return any(marker in agent for marker in self.scanner_agents)

    def screen(self, request: Request, source: str) -> Refusal | None:
        """The refusal of a request that belongs to no dialog or transaction of ours (an
        INVITE, OPTIONS, REGISTER..., or a stray), from ``source`` (an IP); None to let it in."""
        rate = self.rate
        if rate is not None:
            outcome = rate.hit(source)
            if outcome is RateOutcome.BANNED:
                return Refusal(BANNED)
            if outcome is RateOutcome.TRIPPED:
                return Refusal(RATE_LIMITED, 503, (("Retry-After", str(int(rate.ban))),))
        method = request.method
        if self.allow is not None and source not in self.allow and (method != "OPTIONS" or self.restrict_options):
            return Refusal(NOT_ALLOWED, 403)
        if method == "INVITE" and self.authenticator is not None and request.to_addr.tag is None:
            authenticator = self.authenticator
            result = authenticator.verify(method, str(request.uri), request.headers.get_all("Authorization"), source)
            if not result.ok:
                challenges = authenticator.challenge(source, stale=result.stale)
                return Refusal(f"auth-{result.reason}", 401, tuple(("WWW-Authenticate", value) for value in challenges))
            if rate is not None:
                rate.refund(source)  # an authenticated INVITE does not count against the limit
        return None
