"""Bearer-token auth of the ``/v1`` API: read, call, recordings and admin scopes.

Tokens come from ``MOSHIMOSHI_API_TOKENS`` as ``token:scope`` pairs:

* ``read``: list and read calls, transcripts, the pool, refusals (an operator's view:
  callers' numbers and transcripts are personal data);
* ``call``: place and end WebRTC calls (the softphone), and nothing else: a token for
  people who test the agent from a browser, that reads no one else's calls;
* ``recordings``: what read may, and download calls' recordings (QA, compliance); a read
  token never gets a recording;
* ``admin``: everything the others may, and hang up any call, pause recordings, drain
  workers.

HTTP clients send ``Authorization: Bearer <token>``. Browsers cannot set headers on a WebSocket, so the live transcript socket takes
the token in its ``token`` query parameter instead (the header works there too).

With no token configured the API is closed, not open: every ``/v1`` request gets 401 with
a message that says how to configure one. Tokens are compared in constant time and never
logged; errors never echo a presented token.
"""

from __future__ import annotations

import enum
import hmac
import typing as tp
from dataclasses import dataclass

from fastapi import Depends, HTTPException, Request, WebSocket
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.config import ConfigError

SETTING = "MOSHIMOSHI_API_TOKENS"
NO_TOKENS_MESSAGE = (
    f"the API has no tokens configured: set {SETTING}=<token>:admin (or <token>:read, "
    "<token>:call, <token>:recordings), comma-separated for several"
)
WEAK_TOKEN_LENGTH = 16


class Scope(enum.IntEnum):
    """What a token may do: a scope allows what ``GRANTS`` says (admin: every other scope's)."""

    READ = 1
    CALL = 2
    RECORDINGS = 3
    ADMIN = 4  # the widest: a token listed with several scopes counts as its widest

    def allows(self, needed: Scope) -> bool:
        return needed in GRANTS[self]


GRANTS: dict[Scope, frozenset[Scope]] = {
    Scope.READ: frozenset({Scope.READ}),
    Scope.CALL: frozenset({Scope.CALL}),
    Scope.RECORDINGS: frozenset({Scope.READ, Scope.RECORDINGS}),
    Scope.ADMIN: frozenset(Scope),
}
SCOPE_NAMES = ", ".join(scope.name.lower() for scope in Scope)


class AuthError(Exception):
    """A request is refused: ``status`` 401 (no or unknown token) or 403 (scope too low)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ApiTokens:
    """The configured tokens and their scopes."""

    tokens: tuple[tuple[bytes, Scope], ...] = ()

    @classmethod
    def parse(cls, entries: tp.Iterable[str]) -> ApiTokens:
        """``["s3cret:admin", "viewer-token:read"]`` → ApiTokens. Raises ConfigError naming
        the bad entry by position (never by its value: it is a secret)."""
        tokens: list[tuple[bytes, Scope]] = []
        for position, entry in enumerate(entries, start=1):
            token, sep, scope = entry.strip().rpartition(":")
            where = f"{SETTING} entry {position}"
            if not sep or not token:
                raise ConfigError(f"{where}: expected token:scope (scope {SCOPE_NAMES})")
            try:
                parsed = Scope[scope.strip().upper()]
            except KeyError:
                raise ConfigError(f"{where}: scope must be one of {SCOPE_NAMES}") from None
            if any(ch.isspace() for ch in token):
                raise ConfigError(f"{where}: the token must not contain whitespace")
            tokens.append((token.encode(), parsed))
        return cls(tuple(tokens))

    def __bool__(self) -> bool:
        return bool(self.tokens)

    def weak_entries(self) -> list[int]:
        """Positions (from 1) of tokens short enough to guess: worth a warning at start-up."""
        return [i for i, (token, _) in enumerate(self.tokens, start=1) if len(token) < WEAK_TOKEN_LENGTH]

    def scopes_of(self, presented: str) -> list[Scope]:
        """The scopes of a presented token (one token may be listed with several), empty if
        unknown. Every configured token is compared (in constant time), so timing tells
        nothing about which one nearly matched."""
        candidate = presented.encode()
        return [scope for token, scope in self.tokens if hmac.compare_digest(token, candidate)]

    def scope_of(self, presented: str) -> Scope | None:
        """The widest scope of a presented token, or None."""
        return max(self.scopes_of(presented), default=None)

    def check(self, presented: str | None, needed: Scope) -> Scope:
        """The presented token's scope that allows ``needed``; raises AuthError otherwise."""
        if not self.tokens:
            raise AuthError(401, NO_TOKENS_MESSAGE)
        if not presented:
            raise AuthError(401, "missing bearer token: send Authorization: Bearer <token>")
        scopes = self.scopes_of(presented)
        if not scopes:
            raise AuthError(401, "invalid bearer token")
        allowing = [scope for scope in scopes if scope.allows(needed)]
        if not allowing:
            names = " and ".join(sorted(scope.name.lower() for scope in set(scopes)))
            raise AuthError(403, f"this token has the {names} scope; this operation needs {needed.name.lower()}")
        return max(allowing)


bearer = HTTPBearer(auto_error=False, description="An API token: `Authorization: Bearer <token>`")


def _tokens(request: Request) -> ApiTokens:
    tokens: ApiTokens = request.app.state.api_tokens
    return tokens


def _require(needed: Scope) -> tp.Callable[..., tp.Awaitable[Scope]]:
    async def dependency(
        request: Request, credentials: tp.Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
    ) -> Scope:
        try:
            return _tokens(request).check(credentials.credentials if credentials else None, needed)
        except AuthError as exc:
            headers = {"WWW-Authenticate": "Bearer" if exc.status == 401 else 'Bearer error="insufficient_scope"'}
            raise HTTPException(exc.status, exc.message, headers=headers) from None

    return dependency


require_read = _require(Scope.READ)
require_call = _require(Scope.CALL)
require_recordings = _require(Scope.RECORDINGS)
require_admin = _require(Scope.ADMIN)


def websocket_token(ws: WebSocket) -> str | None:
    """The token a WebSocket client presents: ``?token=`` or an Authorization header."""
    token = ws.query_params.get("token")
    if token:
        return token
    header = ws.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def check_websocket(ws: WebSocket, needed: Scope) -> Scope:
    """Raises AuthError when the socket's token does not allow ``needed``."""
    return tp.cast(ApiTokens, ws.app.state.api_tokens).check(websocket_token(ws), needed)
