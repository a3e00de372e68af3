"""HTTP Digest authentication for SIP (RFC 3261 §22, RFC 2617, RFC 8760), both sides.

Client: ``DigestChallenge.parse`` reads a WWW-Authenticate / Proxy-Authenticate value;
``authorization`` answers it. MD5, MD5-sess, SHA-256 and SHA-256-sess; qop ``auth``
(preferred) or ``auth-int``, or none for RFC 2069-style challenges.

Server: ``DigestAuthenticator`` challenges (SHA-256 and MD5, qop=auth) and verifies, with
stateless nonces bound to the client, expiry (``stale=true``) and ``nc`` replay refusal.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from sip.errors import SipParseError
from sip.grammar import Scanner, quote, unquote
from sip.uri import SipUri

_HASHES = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256, "SHA-512-256": lambda: hashlib.new("sha512_256")}


def parse_auth_params(text: str, where: str) -> tuple[str, dict[str, str]]:
    """``Scheme name=value, name="value", ...`` → (scheme, {lower name: unquoted value})."""
    sc = Scanner(text.strip(), where)
    scheme = sc.token("an authentication scheme")
    params: dict[str, str] = {}
    while True:
        sc.skip_ws()
        if sc.at_end():
            return scheme, params
        name = sc.token("a parameter name").lower()
        sc.skip_ws()
        sc.expect("=")
        sc.skip_ws()
        if sc.peek() == '"':
            value = unquote(sc.quoted())
        else:
            value = sc.read_until(", \t")
        params[name] = value
        sc.skip_ws()
        if not sc.accept(","):
            sc.expect_end()
            return scheme, params


@dataclass
class DigestChallenge:
    realm: str
    nonce: str
    algorithm: str = "MD5"
    qop: list[str] = field(default_factory=list)
    opaque: str | None = None
    stale: bool = False

    @classmethod
    def parse(cls, value: str, where: str = "WWW-Authenticate") -> DigestChallenge:
        scheme, params = parse_auth_params(value, where)
        if scheme.lower() != "digest":
            raise SipParseError(f"{where}: scheme {scheme!r} is not Digest")
        if "realm" not in params or "nonce" not in params:
            raise SipParseError(f"{where}: a Digest challenge needs realm and nonce")
        qop = [q.strip().lower() for q in params.get("qop", "").split(",") if q.strip()]
        return cls(
            params["realm"],
            params["nonce"],
            params.get("algorithm", "MD5").upper(),
            qop,
            params.get("opaque"),
            params.get("stale", "").lower() == "true",
        )

    @property
    def supported(self) -> bool:
        base = self.algorithm.removesuffix("-SESS")
        return base in _HASHES and (not self.qop or "auth" in self.qop or "auth-int" in self.qop)


def _hash(algorithm: str, text: str) -> str:
    digest = _HASHES[algorithm.upper().removesuffix("-SESS")]()
    digest.update(text.encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def digest_response(
    challenge: DigestChallenge,
    *,
    method: str,
    uri: str,
    username: str,
    password: str,
    nc: int = 1,
    cnonce: str | None = None,
    body: bytes = b"",
    qop: str | None = None,
) -> str:
    """The ``response`` value (RFC 2617 §3.2.2.1)."""
    algorithm = challenge.algorithm
    ha1 = _hash(algorithm, f"{username}:{challenge.realm}:{password}")
    if algorithm.upper().endswith("-SESS"):
        ha1 = _hash(algorithm, f"{ha1}:{challenge.nonce}:{cnonce}")
    if qop == "auth-int":
        ha2 = _hash(algorithm, f"{method}:{uri}:{_hash(algorithm, body.decode('utf-8', 'surrogateescape'))}")
    else:
        ha2 = _hash(algorithm, f"{method}:{uri}")
    if qop:
        return _hash(algorithm, f"{ha1}:{challenge.nonce}:{nc:08x}:{cnonce}:{qop}:{ha2}")
    return _hash(algorithm, f"{ha1}:{challenge.nonce}:{ha2}")


def authorization(
    challenge: DigestChallenge,
    *,
    method: str,
    uri: str,
    username: str,
    password: str,
    nc: int = 1,
    cnonce: str | None = None,
    body: bytes = b"",
) -> str:
    """The Authorization / Proxy-Authorization value answering ``challenge``."""
    if not challenge.supported:
        raise SipParseError(f"Digest algorithm {challenge.algorithm} / qop {challenge.qop} not supported")
    qop = None
    if challenge.qop:
        qop = "auth" if "auth" in challenge.qop else "auth-int"
    if qop or challenge.algorithm.upper().endswith("-SESS"):
        cnonce = cnonce or secrets.token_hex(8)
    response = digest_response(
        challenge,
        method=method,
        uri=uri,
        username=username,
        password=password,
        nc=nc,
        cnonce=cnonce,
        body=body,
        qop=qop,
    )
    parts = [
        f"username={quote(username)}",
        f"realm={quote(challenge.realm)}",
        f"nonce={quote(challenge.nonce)}",
        f"uri={quote(uri)}",
        f"response={quote(response)}",
        f"algorithm={challenge.algorithm}",
    ]
    if qop:
        parts += [f"qop={qop}", f"nc={nc:08x}", f"cnonce={quote(cnonce or '')}"]
    if challenge.opaque is not None:
        parts.append(f"opaque={quote(challenge.opaque)}")
    return "Digest " + ", ".join(parts)


# --- the server side ---------------------------------------------------------------------

CHALLENGE_ALGORITHMS = ("SHA-256", "MD5")  # RFC 8760: one challenge each, the preferred first
_NONCE = struct.Struct("!Q8s")  # issue time (ms since the epoch), random
_NONCE_MAC_BYTES = 16


def parse_credentials(text: str, where: str = "credentials") -> dict[str, str]:
    """``user:password`` entries, comma- or newline-separated (a password may hold ':'
    but not ','). Raises ValueError naming the bad entry, never showing a password."""
    out: dict[str, str] = {}
    for number, entry in enumerate(text.replace("\n", ",").split(","), 1):
        entry = entry.strip()
        if not entry or entry.startswith("#"):
            continue
        user, colon, password = entry.partition(":")
        user = user.strip()
        if not colon or not user or not password:
            raise ValueError(f"{where}: entry {number} is not user:password")
        if any(c in user for c in '"\\ \t') or not user.isprintable():
            raise ValueError(f"{where}: user {user[:32]!r} holds a quote, backslash, space or control character")
        if user in out:
            raise ValueError(f"{where}: user {user!r} is listed twice")
        out[user] = password
    return out


@dataclass(frozen=True)
class AuthResult:
    """What ``DigestAuthenticator.verify`` found: ``ok`` with ``username``, or the reason
    it failed (``missing``, ``malformed``, ``failed``, ``stale``, ``replayed``) and whether the
    fresh challenge says ``stale=true`` (the credentials were right, the nonce too old)."""

    ok: bool
    reason: str
    username: str | None = None
    stale: bool = False


class DigestAuthenticator:
    """Digest authentication of requests we receive (RFC 3261 §22, RFC 8760), qop=auth.

    ``challenge(source)`` gives the WWW-Authenticate values of a 401 (one per algorithm of
    ``algorithms``, by default SHA-256 then MD5) with a fresh nonce; ``verify(request, source)`` checks a request's Authorization.

    Nonces carry their issue time and are bound to the client: an HMAC (with a key made
    per process) over the time, a random part and the source address. So a nonce needs no
    state until it is used; once a request authenticates with it, its highest ``nc`` is kept
    (a bounded table) and a request that repeats an ``nc`` is refused as a replay. A nonce
    older than ``nonce_seconds`` is stale: a correct answer to it gets a new challenge with
    ``stale=true``. Passwords are turned into their HA1 hashes at once and never kept or
    shown; an unknown user costs the same hashing as a known one and gets the same answer.
    """

    def __init__(
        self,
        credentials: Mapping[str, str],
        *,
        realm: str = "moshimoshi",
        nonce_seconds: float = 300.0,
        algorithms: tuple[str, ...] = CHALLENGE_ALGORITHMS,
        key: bytes | None = None,
        max_tracked_nonces: int = 65536,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not credentials:
            raise ValueError("digest authentication needs at least one user:password")
        algorithms = tuple(dict.fromkeys(a.strip().upper() for a in algorithms if a.strip()))
        unknown = [a for a in algorithms if a not in CHALLENGE_ALGORITHMS]
        if unknown or not algorithms:
            raise ValueError(
                f"digest algorithms must be among {', '.join(CHALLENGE_ALGORITHMS)}, not {', '.join(unknown) or 'none'}"
            )
        self.algorithms = algorithms
        if nonce_seconds <= 0 or max_tracked_nonces < 1:
            raise ValueError("nonce_seconds and max_tracked_nonces must be positive")
        self.realm = realm
        self.nonce_seconds = nonce_seconds
        self.max_tracked_nonces = max_tracked_nonces
        self.clock = clock
        self._key = key or secrets.token_bytes(32)
        self._ha1 = {
            user: {algorithm: _hash(algorithm, f"{user}:{realm}:{password}") for algorithm in algorithms}
            for user, password in credentials.items()
        }
        self._decoy = {algorithm: secrets.token_hex(32) for algorithm in algorithms}
        self._used: OrderedDict[str, tuple[float, int]] = OrderedDict()  # nonce → (issued, highest nc)
        self._forgotten_before = 0.0  # nonces issued before this and no longer tracked count as stale

    def __repr__(self) -> str:
        return f"<DigestAuthenticator realm={self.realm!r} users={len(self._ha1)}>"

    @property
    def users(self) -> int:
        return len(self._ha1)

    # -- nonces ---------------------------------------------------------------------------

    def _mac(self, body: bytes, source: str) -> bytes:
        return hmac.new(self._key, body + source.encode(), hashlib.sha256).digest()[:_NONCE_MAC_BYTES]

    def new_nonce(self, source: str) -> str:
        body = _NONCE.pack(int(self.clock() * 1000), secrets.token_bytes(8))
        return base64.urlsafe_b64encode(body + self._mac(body, source)).rstrip(b"=").decode()

    def _nonce_issued(self, nonce: str, source: str) -> float | None:
        """When ``nonce`` was issued to ``source``, or None when we did not issue it to it."""
        try:
            raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
        except (ValueError, TypeError):
            return None
        if len(raw) != _NONCE.size + _NONCE_MAC_BYTES:
            return None
        body, mac = raw[: _NONCE.size], raw[_NONCE.size :]
        if not hmac.compare_digest(mac, self._mac(body, source)):
            return None
        issued_ms: int = _NONCE.unpack(body)[0]
        return issued_ms / 1000

    def challenge(self, source: str, *, stale: bool = False) -> list[str]:
        """WWW-Authenticate values for a 401 to ``source``: one per algorithm, in the order
        given (RFC 8760: the preferred first; a client takes the first it supports)."""
        nonce = self.new_nonce(source)
        suffix = ", stale=true" if stale else ""
        return [
            f'Digest realm={quote(self.realm)}, nonce="{nonce}", algorithm={algorithm}, qop="auth"{suffix}'
            for algorithm in self.algorithms
        ]

    # -- verification ---------------------------------------------------------------------

    def verify(self, method: str, uri: str, authorizations: list[str], source: str) -> AuthResult:
        """Check the Authorization values of a request (``method``, Request-URI ``uri``)
        from ``source`` (its IP address)."""
        params: dict[str, str] | None = None
        for value in authorizations:
            try:
                scheme, candidate = parse_auth_params(value, "Authorization")
            except SipParseError:
                return AuthResult(False, "malformed")
            if scheme.lower() == "digest" and candidate.get("realm") == self.realm:
                params = candidate
                break
        if params is None:
            return AuthResult(False, "missing")
        try:
            username, nonce, digest_uri, response = (params[k] for k in ("username", "nonce", "uri", "response"))
            qop, nc_text, cnonce = params["qop"].lower(), params["nc"], params["cnonce"]
        except KeyError:
            return AuthResult(False, "malformed")
        algorithm = params.get("algorithm", "MD5").upper()
        if algorithm not in self.algorithms or qop != "auth" or len(nc_text) != 8:
            return AuthResult(False, "malformed")
        try:
            nc = int(nc_text, 16)
        except ValueError:
            return AuthResult(False, "malformed")
        issued = self._nonce_issued(nonce, source)
        if issued is None or nc < 1:
            return AuthResult(False, "failed")
        if not _same_uri(digest_uri, uri):
            return AuthResult(False, "failed")
        ha1 = self._ha1.get(username, self._decoy)[algorithm]
        ha2 = _hash(algorithm, f"{method}:{digest_uri}")
        expected = _hash(algorithm, f"{ha1}:{nonce}:{nc_text}:{cnonce}:auth:{ha2}")
        if not hmac.compare_digest(expected.encode(), response.lower().encode()) or username not in self._ha1:
            return AuthResult(False, "failed")
        now = self.clock()
        if now - issued > self.nonce_seconds:
            return AuthResult(False, "stale", username, stale=True)
        used = self._used.get(nonce)
        if used is None:
            if issued < self._forgotten_before:
                return AuthResult(False, "stale", username, stale=True)
            self._remember(nonce, issued, nc, now)
        elif nc <= used[1]:
            return AuthResult(False, "replayed", username)
        else:
            self._used[nonce] = (issued, nc)
        return AuthResult(True, "ok", username)

    def username_in(self, authorizations: list[str]) -> str | None:
        """The user named by the Digest credentials for this realm among a request's
        Authorization values (as ``verify`` picks them), unverified: only a request that
        ``verify`` accepted has proved it is that user."""
        for value in authorizations:
            try:
                scheme, params = parse_auth_params(value, "Authorization")
            except SipParseError:
                return None
            if scheme.lower() == "digest" and params.get("realm") == self.realm:
                return params.get("username")
        return None

    def _remember(self, nonce: str, issued: float, nc: int, now: float) -> None:
        used = self._used
        while used:
            oldest_nonce, (oldest_issued, _) = next(iter(used.items()))
            if now - oldest_issued <= self.nonce_seconds and len(used) < self.max_tracked_nonces:
                break
            used.popitem(last=False)
            if now - oldest_issued <= self.nonce_seconds:
                # Forgotten while still fresh: refuse what it would have allowed (a replay).
                self._forgotten_before = max(self._forgotten_before, oldest_issued + 0.001)
        used[nonce] = (issued, nc)

    @property
    def tracked_nonces(self) -> int:
        return len(self._used)


def _same_uri(digest_uri: str, request_uri: str) -> bool:
    """Whether an Authorization's digest-uri names the request's target: the same URI, or
    the same host and port (clients such as sipp leave the user part out)."""
    if digest_uri == request_uri:
        return True
    try:
        ours, theirs = SipUri.parse(request_uri), SipUri.parse(digest_uri)
    except SipParseError:
        return False
    return (
        ours.host.lower() == theirs.host.lower()
        and (ours.port or 5060) == (theirs.port or 5060)
        and theirs.user in (None, ours.user)
    )
