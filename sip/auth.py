"""HTTP Digest authentication for SIP clients (RFC 3261 §22, RFC 2617, RFC 8760).

``DigestChallenge.parse`` reads a WWW-Authenticate / Proxy-Authenticate value;
``authorization`` answers it. MD5, MD5-sess, SHA-256 and SHA-256-sess; qop ``auth``
(preferred) or ``auth-int``, or none for RFC 2069-style challenges.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field

from sip.errors import SipParseError
from sip.grammar import Scanner, quote, unquote

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
        return cls(params["realm"], params["nonce"], params.get("algorithm", "MD5").upper(), qop,
                   params.get("opaque"), params.get("stale", "").lower() == "true")

    @property
    def supported(self) -> bool:
        base = self.algorithm.removesuffix("-SESS")
        return base in _HASHES and (not self.qop or "auth" in self.qop or "auth-int" in self.qop)


def _hash(algorithm: str, text: str) -> str:
    digest = _HASHES[algorithm.upper().removesuffix("-SESS")]()
    digest.update(text.encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def digest_response(challenge: DigestChallenge, *, method: str, uri: str, username: str, password: str,
                    nc: int = 1, cnonce: str | None = None, body: bytes = b"", qop: str | None = None) -> str:
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


def authorization(challenge: DigestChallenge, *, method: str, uri: str, username: str, password: str,
                  nc: int = 1, cnonce: str | None = None, body: bytes = b"") -> str:
    """The Authorization / Proxy-Authorization value answering ``challenge``."""
    if not challenge.supported:
        raise SipParseError(f"Digest algorithm {challenge.algorithm} / qop {challenge.qop} not supported")
    qop = None
    if challenge.qop:
        qop = "auth" if "auth" in challenge.qop else "auth-int"
    if qop or challenge.algorithm.upper().endswith("-SESS"):
        cnonce = cnonce or secrets.token_hex(8)
    response = digest_response(challenge, method=method, uri=uri, username=username, password=password,
                               nc=nc, cnonce=cnonce, body=body, qop=qop)
    parts = [f"username={quote(username)}", f"realm={quote(challenge.realm)}", f"nonce={quote(challenge.nonce)}",
             f"uri={quote(uri)}", f"response={quote(response)}", f"algorithm={challenge.algorithm}"]
    if qop:
        parts += [f"qop={qop}", f"nc={nc:08x}", f"cnonce={quote(cnonce or '')}"]
    if challenge.opaque is not None:
        parts.append(f"opaque={quote(challenge.opaque)}")
    return "Digest " + ", ".join(parts)
