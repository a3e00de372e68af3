"""Per-source request rate limits, in the manner of Kamailio's ``pike`` module.

``SourceRateLimiter(limit=16, window=2.0, ban=300.0)``: a source that sends more than
``limit`` requests within one ``window`` (fixed windows, one counter per source) is banned
for ``ban`` seconds. ``hit(host)`` counts one request and says what to do with it:

- ``ALLOW``: within the limit;
- ``TRIPPED``: this request went over the limit; the source is banned from now on (the
  caller answers it once, e.g. 503 with Retry-After, so that a misconfigured peer learns why);
- ``BANNED``: the source is banned; the request is dropped unanswered, as pike does (an
  answer per flood packet would make the limiter a reflector).

``refund(host)`` takes one count back, for a request that turned out to carry valid
credentials: with digest authentication a trunk's calls are not what the limit is for.

IPv6 sources are counted per /64: one host there owns 2^64 addresses. The table holds at
most ``max_sources`` entries, the least recently seen evicted first, so an attacker spoofing
many source addresses cannot grow it without bound, and a source that keeps flooding keeps
its entry (it is always recently seen).
"""

from __future__ import annotations

import enum
import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable

from sip.acl import ip_of


class RateOutcome(enum.Enum):
    ALLOW = "allow"
    TRIPPED = "tripped"
    BANNED = "banned"


class _Entry:
    __slots__ = ("window_start", "count", "banned_until")

    def __init__(self, now: float) -> None:
        self.window_start = now
        self.count = 0
        self.banned_until = 0.0


def source_key(host: str) -> str:
    """What one source is: an IPv4 address, or the /64 of an IPv6 address."""
    address = ip_of(host)
    if address is None:
        return host
    if address.version == 6:
        return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))
    return str(address)


class SourceRateLimiter:
    """See the module docstring."""

    def __init__(
        self,
        limit: int = 16,
        window: float = 2.0,
        ban: float = 300.0,
        *,
        max_sources: int = 65536,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if limit < 1 or window <= 0 or ban <= 0 or max_sources < 1:
            raise ValueError("rate limit: limit and max_sources must be >= 1, window and ban > 0")
        self.limit = limit
        self.window = window
        self.ban = ban
        self.max_sources = max_sources
        self.clock = clock
        self.evictions = 0
        self.bans = 0
        self._table: OrderedDict[str, _Entry] = OrderedDict()

    def hit(self, host: str) -> RateOutcome:
        now = self.clock()
        key = source_key(host)
        table = self._table
        entry = table.get(key)
        if entry is None:
            if len(table) >= self.max_sources:
                table.popitem(last=False)
                self.evictions += 1
            entry = table[key] = _Entry(now)
        else:
            table.move_to_end(key)
        if entry.banned_until:
            if now < entry.banned_until:
                return RateOutcome.BANNED
            entry.banned_until = 0.0
            entry.window_start, entry.count = now, 0
        if now - entry.window_start >= self.window:
            entry.window_start, entry.count = now, 0
        entry.count += 1
        if entry.count > self.limit:
            entry.banned_until = now + self.ban
            self.bans += 1
            return RateOutcome.TRIPPED
        return RateOutcome.ALLOW

    def refund(self, host: str) -> None:
        """Take back the count of a request that proved itself (valid digest credentials): the
        limit is for requests nobody vouches for, not for a trunk's authenticated calls."""
        entry = self._table.get(source_key(host))
        if entry is not None and entry.count > 0 and not entry.banned_until:
            entry.count -= 1

    def banned(self, host: str) -> bool:
        entry = self._table.get(source_key(host))
        return entry is not None and self.clock() < entry.banned_until

    def ban_remaining(self, host: str) -> float:
        entry = self._table.get(source_key(host))
        return max(0.0, entry.banned_until - self.clock()) if entry is not None else 0.0

    @property
    def tracked(self) -> int:
        """Sources in the table."""
        return len(self._table)

    def banned_sources(self) -> int:
        """Sources banned now (a scan of the table: for metrics at scrape time)."""
        now = self.clock()
        return sum(1 for entry in self._table.values() if now < entry.banned_until)
