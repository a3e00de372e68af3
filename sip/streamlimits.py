"""Limits on stream connections (SIP over TCP, and TLS over TCP): what a slowloris cannot hold.

``StreamLimits`` is the policy, shared by every stream transport:

- ``max_connections`` in all, ``max_per_source`` from one address (IPv6: one /64); a
  connection over either is refused at once (closed, counted);
- ``handshake_seconds``: a TLS handshake must finish within this (``start_handshake`` /
  ``handshake_done``; plain TCP has none);
- ``first_message_seconds``: an accepted connection must deliver its first whole message
  within this, or it is closed (Asterisk's ``tcpauthtimeout``);
- ``message_seconds``: a message, once its first byte arrived, must be complete within
  this: trickling bytes does not keep a connection alive;
- ``idle_seconds``: a connection with no whole message either way for this long is closed,
  unless a transaction or dialog holds it;
- ``max_header_bytes``: a header section still unfinished past this size is refused
  (513) and the connection closed.

``ConnectionClock`` applies the time limits to one connection. The idle timer is reset by
whole messages (received, or sent), never by single bytes; a CRLF keep-alive (RFC 5626)
is a whole message.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

HANDSHAKE = "handshake"
FIRST_MESSAGE = "first-message"
MESSAGE = "message"
IDLE = "idle"


@dataclass(frozen=True)
class StreamLimits:
    """See the module docstring."""

    max_connections: int = 1024
    max_per_source: int = 32
    handshake_seconds: float = 5.0
    first_message_seconds: float = 5.0
    message_seconds: float = 10.0
    idle_seconds: float = 120.0
    max_header_bytes: int = 32 * 1024

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.max_per_source < 1:
            raise ValueError("max_connections and max_per_source must be at least 1")
        if min(self.handshake_seconds, self.first_message_seconds, self.message_seconds, self.idle_seconds) <= 0:
            raise ValueError("stream time limits must be positive")
        if self.max_header_bytes < 1024:
            raise ValueError("max_header_bytes must be at least 1024")


class ConnectionClock:
    """The deadlines of one stream connection; calls ``on_expired(reason)`` once one passes
    (``handshake``, ``first-message``, ``message`` or ``idle``). One timer per connection,
    re-armed only when a deadline moves earlier or fires: bytes arriving cost no timer work.

    ``inbound``: the peer connected to us, so it must speak first (``first_message_seconds``);
    a connection we opened has no such deadline. ``held()``: whether something still needs
    the connection (it is then never closed for idleness).
    """

    def __init__(
        self,
        limits: StreamLimits,
        loop: asyncio.AbstractEventLoop,
        on_expired: Callable[[str], None],
        *,
        inbound: bool,
        held: Callable[[], bool] = lambda: False,
    ) -> None:
        self.limits = limits
        self._loop = loop
        self._on_expired = on_expired
        self._held = held
        now = loop.time()
        self.opened_at = now
        self._handshake_until: float | None = None
        self._first_until: float | None = now + limits.first_message_seconds if inbound else None
        self._message_until: float | None = None
        self.last_message_at = now
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self.expired: str | None = None
        self._arm()

    def start_handshake(self) -> None:
        """A TLS handshake begins: it must end within ``handshake_seconds``."""
        self._handshake_until = self._loop.time() + self.limits.handshake_seconds
        self._arm()

    def handshake_done(self) -> None:
        """The handshake ended: the first message is awaited from now on."""
        self._handshake_until = None
        if self._first_until is not None:
            self._first_until = self._loop.time() + self.limits.first_message_seconds
        self._arm()

    def received(self, messages: int, partial: bool) -> None:
        """After bytes arrived: ``messages`` whole ones were completed (keep-alives
        included), and a ``partial`` one is (still) under way."""
        now = self._loop.time()
        if messages:
            self._first_until = None
            self.last_message_at = now
            self._message_until = None
        if partial and self._message_until is None:
            self._message_until = now + self.limits.message_seconds
            self._arm()

    def sent(self) -> None:
        """A whole message went out on the connection (it is in use: not idle)."""
        self.last_message_at = self._loop.time()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = float("inf")

    def _deadline(self) -> tuple[float, str]:
        candidates = [
            (until, reason)
            for until, reason in (
                (self._handshake_until, HANDSHAKE),
                (self._first_until, FIRST_MESSAGE),
                (self._message_until, MESSAGE),
            )
            if until is not None
        ]
        if candidates:
            return min(candidates)
        return self.last_message_at + self.limits.idle_seconds, IDLE

    def _arm(self) -> None:
        at, _ = self._deadline()
        if at < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = at
            self._timer = self._loop.call_at(at, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        if self.expired is not None:
            return
        at, reason = self._deadline()
        now = self._loop.time()
        if now < at:
            self._arm()
            return
        if reason == IDLE and self._held():
            self.last_message_at = now  # still needed: look again an idle period later
            self._arm()
            return
        self.expired = reason
        self._on_expired(reason)
