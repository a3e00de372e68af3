"""SIP and SIPS URIs (RFC 3261 §19.1) and other absolute URIs (tel:, urn:, ...).

``SipUri`` keeps the text it was parsed from, so a URI is sent back exactly as the peer
wrote it; its fields hold the *unescaped* values (``sip:%75ser@h`` has ``user == "user"``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from typing import Any

from sip.errors import SipParseError
from sip.grammar import (
    HEADER_CHARS,
    HEX,
    HOSTNAME_CHARS,
    PARAM_CHARS,
    PASSWORD_CHARS,
    USER_CHARS,
    char_run,
    run_end,
    shown,
)

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):")
_FORBIDDEN = frozenset(' \t\r\n<>"') | frozenset(chr(c) for c in range(32)) | {"\x7f"}
_DEFAULT_PORTS = {"sip": 5060, "sips": 5061}
_DIGITS_AND_DOTS = re.compile(r"[0-9.]+")

ParamItems = Iterable[tuple[str, str | None]] | Mapping[str, str | None]


def format_host(host: str) -> str:
    """``host`` as it appears in a URI or Via: IPv6 addresses in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def escape(text: str, allowed: frozenset[str]) -> str:
    """Percent-encode every character of ``text`` outside ``allowed`` (UTF-8 bytes)."""
    if all(c in allowed for c in text):
        return text
    out = []
    for byte in text.encode("utf-8", "surrogateescape"):
        c = chr(byte)
        out.append(c if byte < 128 and c in allowed else f"%{byte:02X}")
    return "".join(out)


def unescape(text: str, where: str) -> str:
    """Resolve ``%HH`` escapes; a malformed escape is a ``SipParseError``."""
    if "%" not in text:
        return text
    raw = bytearray()
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c == "%":
            pair = text[i + 1 : i + 3]
            if len(pair) != 2 or not all(h in HEX for h in pair):
                raise SipParseError(f"{where}: bad escape {text[i : i + 3]!r} in {shown(text)}")
            raw.append(int(pair, 16))
            i += 3
        else:
            raw.extend(c.encode("utf-8", "surrogateescape"))
            i += 1
    return raw.decode("utf-8", "surrogateescape")


def _check_chars(text: str, allowed: frozenset[str], what: str, where: str) -> str:
    run = run_end(char_run(allowed | {"%"}), text)
    if run != len(text):
        raise SipParseError(f"{where}: character {text[run]!r} not allowed in the {what} of {shown(text)}")
    return unescape(text, where)


def check_host(host: str, where: str) -> str:
    """Validate a hostname, IPv4 address or bracket-less IPv6 address; returns it."""
    if not host:
        raise SipParseError(f"{where}: empty host")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise SipParseError(f"{where}: {host!r} is not an IPv6 address") from None
        return host
    if _DIGITS_AND_DOTS.fullmatch(host):
        parts = host.split(".")
        if len(parts) != 4 or not all(p and len(p) <= 3 and int(p) <= 255 for p in parts):
            raise SipParseError(f"{where}: {host!r} is not an IPv4 address")
        return host
    run = run_end(char_run(HOSTNAME_CHARS), host)
    if run != len(host):
        raise SipParseError(f"{where}: character {host[run]!r} not allowed in host {shown(host)}")
    if ".." in host or host.startswith("."):
        raise SipParseError(f"{where}: empty label in host {shown(host)}")
    return host


def parse_port(text: str, where: str) -> int:
    if not text or not text.isascii() or not text.isdigit() or len(text) > 5 or int(text) > 65535:
        raise SipParseError(f"{where}: bad port {text!r}")
    return int(text)


def _pairs(items: ParamItems | None) -> list[tuple[str, str | None]]:
    if items is None:
        return []
    if isinstance(items, Mapping):
        return list(items.items())
    return list(items)


class SipUri:
    """A ``sip:`` or ``sips:`` URI. Immutable: the ``with_*`` methods return new ones."""

    __slots__ = ("scheme", "user", "password", "host", "port", "_params", "_headers", "_text")

    def __init__(
        self,
        host: str,
        *,
        user: str | None = None,
        password: str | None = None,
        port: int | None = None,
        scheme: str = "sip",
        params: ParamItems | None = None,
        headers: ParamItems | None = None,
        text: str | None = None,
    ) -> None:
        self.scheme = scheme.lower()
        self.user = user
        self.password = password
        self.host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        self.port = port
        self._params: tuple[tuple[str, str | None], ...] = tuple(_pairs(params))
        self._headers: tuple[tuple[str, str | None], ...] = tuple(_pairs(headers))
        self._text = text if text is not None else self._build()

    def _build(self) -> str:
        out = [self.scheme, ":"]
        if self.user is not None:
            out.append(escape(self.user, USER_CHARS))
            if self.password is not None:
                out.append(":" + escape(self.password, PASSWORD_CHARS))
            out.append("@")
        out.append(format_host(self.host))
        if self.port is not None:
            out.append(f":{self.port}")
        for name, value in self._params:
            out.append(";" + escape(name, PARAM_CHARS))
            if value is not None:
                out.append("=" + escape(value, PARAM_CHARS))
        if self._headers:
            out.append(
                "?" + "&".join(f"{escape(k, HEADER_CHARS)}={escape(v or '', HEADER_CHARS)}" for k, v in self._headers)
            )
        return "".join(out)

    @classmethod
    def parse(cls, text: str, where: str = "URI") -> SipUri:
        uri = parse_uri(text, where)
        if not isinstance(uri, SipUri):
            raise SipParseError(f"{where}: {shown(text)} is not a sip: or sips: URI")
        return uri

    @property
    def params(self) -> list[tuple[str, str | None]]:
        return list(self._params)

    @property
    def headers(self) -> list[tuple[str, str | None]]:
        return list(self._headers)

    def has_param(self, name: str) -> bool:
        lowered = name.lower()
        return any(k.lower() == lowered for k, _ in self._params)

    def param(self, name: str) -> str | None:
        lowered = name.lower()
        for k, v in self._params:
            if k.lower() == lowered:
                return v
        return None

    @property
    def transport(self) -> str | None:
        value = self.param("transport")
        return value.upper() if value else None

    @property
    def wire_transport(self) -> str | None:
        """The transport a request to this URI takes: TLS for ``sips:`` (RFC 3261 §26.2.2)
        and ``transport=tls``, else the transport parameter, else None (the caller's default)."""
        if self.scheme == "sips":
            return "TLS"
        return self.transport

    def port_for(self, transport: str) -> int:
        """The port to reach this URI on over ``transport`` (5061 for TLS, else 5060, unless given)."""
        return self.port if self.port is not None else (5061 if transport == "TLS" else 5060)

    @property
    def host_port(self) -> str:
        return format_host(self.host) + (f":{self.port}" if self.port is not None else "")

    @property
    def default_port(self) -> int:
        return self.port if self.port is not None else _DEFAULT_PORTS[self.scheme]

    def with_params(self, **params: str | None) -> SipUri:
        items = [(k, v) for k, v in self._params if k.lower() not in {p.lower() for p in params}]
        items.extend(params.items())
        return self._copy(params=items)

    def without_params(self, *names: str) -> SipUri:
        lowered = {n.lower() for n in names}
        return self._copy(params=[(k, v) for k, v in self._params if k.lower() not in lowered])

    def without_headers(self) -> SipUri:
        return self if not self._headers else self._copy(headers=())

    def _copy(self, **changes: Any) -> SipUri:
        fields: dict[str, Any] = dict(
            host=self.host,
            user=self.user,
            password=self.password,
            port=self.port,
            scheme=self.scheme,
            params=self._params,
            headers=self._headers,
        )
        fields.update(changes)
        return SipUri(**fields)

    def _compare_key(self) -> tuple[str, str | None, str | None, str, int | None]:
        # RFC 3261 §19.1.4: user, password, headers exact; scheme, host and params
        # case-insensitive; user/ttl/method/maddr/transport must match when either has them.
        return (self.scheme, self.user, self.password, self.host.lower(), self.port)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SipUri):
            return NotImplemented
        if self._compare_key() != other._compare_key():
            return False
        mine = {k.lower(): (v.lower() if v else v) for k, v in self._params}
        theirs = {k.lower(): (v.lower() if v else v) for k, v in other._params}
        for name in set(mine) | set(theirs):
            if name in mine and name in theirs:
                if mine[name] != theirs[name]:
                    return False
            elif name in ("user", "ttl", "method", "maddr", "transport"):
                return False
        return sorted(self._headers) == sorted(other._headers)

    def __hash__(self) -> int:
        return hash(self._compare_key())

    def __str__(self) -> str:
        return self._text

    def __repr__(self) -> str:
        return f"SipUri({self._text!r})"


class AbsoluteUri:
    """A URI of another scheme (``tel:``, ``urn:``, ...), kept as opaque text."""

    __slots__ = ("scheme", "opaque")

    def __init__(self, scheme: str, opaque: str) -> None:
        self.scheme = scheme.lower()
        self.opaque = opaque

    @property
    def user(self) -> str | None:
        return self.opaque if self.scheme == "tel" else None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AbsoluteUri):
            return NotImplemented
        return (self.scheme, self.opaque) == (other.scheme, other.opaque)

    def __hash__(self) -> int:
        return hash((self.scheme, self.opaque))

    def __str__(self) -> str:
        return f"{self.scheme}:{self.opaque}"

    def __repr__(self) -> str:
        return f"AbsoluteUri({str(self)!r})"


Uri = SipUri | AbsoluteUri


def parse_uri(text: str, where: str = "URI") -> Uri:
    """Parse a URI: ``SipUri`` for sip/sips, ``AbsoluteUri`` for any other scheme."""
    match = _SCHEME.match(text)
    if match is None:
        raise SipParseError(f"{where}: {shown(text)} is not a URI (no scheme)")
    for c in text:
        if c in _FORBIDDEN:
            raise SipParseError(f"{where}: character {c!r} not allowed in URI {shown(text)}")
    scheme = match.group(1).lower()
    rest = text[match.end() :]
    if scheme not in ("sip", "sips"):
        if not rest:
            raise SipParseError(f"{where}: empty {scheme}: URI")
        return AbsoluteUri(scheme, rest)
    return _parse_sip(scheme, rest, text, where)


def _parse_sip(scheme: str, rest: str, text: str, where: str) -> SipUri:
    user = password = None
    at = rest.find("@")
    if at >= 0:
        userinfo, hostpart = rest[:at], rest[at + 1 :]
        user_text, colon, password_text = userinfo.partition(":")
        if not user_text:
            raise SipParseError(f"{where}: empty user part in {shown(text)}")
        user = _check_chars(user_text, USER_CHARS, "user part", where)
        if colon:
            password = _check_chars(password_text, PASSWORD_CHARS, "password", where)
    else:
        hostpart = rest
    if hostpart.startswith("["):
        end = hostpart.find("]")
        if end < 0:
            raise SipParseError(f"{where}: unterminated IPv6 reference in {shown(text)}")
        host = hostpart[1:end]
        if ":" not in host:
            raise SipParseError(f"{where}: {host!r} in brackets is not an IPv6 address")
        i = end + 1
    else:
        i = 0
        while i < len(hostpart) and hostpart[i] not in ":;?":
            i += 1
        host = hostpart[:i]
    check_host(host, where)
    port = None
    if hostpart[i : i + 1] == ":":
        j = i + 1
        while j < len(hostpart) and hostpart[j] not in ";?":
            j += 1
        port = parse_port(hostpart[i + 1 : j], where)
        i = j
    params: list[tuple[str, str | None]] = []
    headers: list[tuple[str, str | None]] = []
    tail = hostpart[i:]
    if tail and tail[0] not in ";?":
        raise SipParseError(f"{where}: unexpected {shown(tail, 20)} after the host in {shown(text)}")
    param_text, question, header_text = tail.partition("?")
    if param_text:
        for item in param_text[1:].split(";"):
            if not item:
                raise SipParseError(f"{where}: empty URI parameter in {shown(text)}")
            name, eq, value = item.partition("=")
            if not name:
                raise SipParseError(f"{where}: URI parameter without a name in {shown(text)}")
            params.append(
                (
                    _check_chars(name, PARAM_CHARS, "parameters", where),
                    _check_chars(value, PARAM_CHARS, "parameters", where) if eq else None,
                )
            )
    if question:
        for item in header_text.split("&"):
            name, eq, value = item.partition("=")
            if not name or not eq:
                raise SipParseError(f"{where}: URI header {item!r} is not name=value in {shown(text)}")
            headers.append(
                (
                    _check_chars(name, HEADER_CHARS, "headers", where),
                    _check_chars(value, HEADER_CHARS, "headers", where),
                )
            )
    return SipUri(
        host, user=user, password=password, port=port, scheme=scheme, params=params, headers=headers, text=text
    )
