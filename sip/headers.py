"""The header collection of a SIP message and the typed values of the headers the stack
uses: name-addr/addr-spec (From, To, Contact, Route...), Via, CSeq, media types.

Header names are normalised on the way in: compact forms become full names (``i`` →
``Call-ID``) and known names get their canonical spelling; lookups ignore case.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from sip.errors import SipParseError
from sip.grammar import (
    HOSTNAME_CHARS,
    TOKEN_CHARS,
    Params,
    Scanner,
    is_token,
    quote,
    shown,
    split_list,
    unquote,
)
from sip.uri import AbsoluteUri, Uri, check_host, format_host, parse_port, parse_uri

COMPACT_FORMS = {
    "a": "Accept-Contact",
    "b": "Referred-By",
    "c": "Content-Type",
    "d": "Request-Disposition",
    "e": "Content-Encoding",
    "f": "From",
    "i": "Call-ID",
    "j": "Reject-Contact",
    "k": "Supported",
    "l": "Content-Length",
    "m": "Contact",
    "n": "Identity-Info",
    "o": "Event",
    "r": "Refer-To",
    "s": "Subject",
    "t": "To",
    "u": "Allow-Events",
    "v": "Via",
    "x": "Session-Expires",
    "y": "Identity",
}

_KNOWN_NAMES = [
    "Accept",
    "Accept-Contact",
    "Accept-Encoding",
    "Accept-Language",
    "Alert-Info",
    "Allow",
    "Allow-Events",
    "Authentication-Info",
    "Authorization",
    "Call-ID",
    "Call-Info",
    "Contact",
    "Content-Disposition",
    "Content-Encoding",
    "Content-Language",
    "Content-Length",
    "Content-Type",
    "CSeq",
    "Date",
    "Error-Info",
    "Event",
    "Expires",
    "From",
    "Identity",
    "Identity-Info",
    "In-Reply-To",
    "Max-Forwards",
    "MIME-Version",
    "Min-Expires",
    "Min-SE",
    "Organization",
    "P-Asserted-Identity",
    "P-Preferred-Identity",
    "Path",
    "Priority",
    "Privacy",
    "Proxy-Authenticate",
    "Proxy-Authorization",
    "Proxy-Require",
    "RAck",
    "Reason",
    "Record-Route",
    "Refer-To",
    "Referred-By",
    "Reject-Contact",
    "Reply-To",
    "Request-Disposition",
    "Require",
    "Retry-After",
    "Route",
    "RSeq",
    "Server",
    "Service-Route",
    "Session-Expires",
    "Subject",
    "Supported",
    "Timestamp",
    "To",
    "Unsupported",
    "User-Agent",
    "Via",
    "Warning",
    "WWW-Authenticate",
]
CANONICAL_NAMES = {name.lower(): name for name in _KNOWN_NAMES}

# Headers whose value is a comma-separated list (RFC 3261 §7.3.1): split into one entry
# per element on parsing. Authorization and friends contain commas but are not lists.
LIST_HEADERS = frozenset(
    n.lower()
    for n in (
        "Accept",
        "Accept-Encoding",
        "Accept-Language",
        "Alert-Info",
        "Allow",
        "Allow-Events",
        "Call-Info",
        "Contact",
        "Content-Encoding",
        "Content-Language",
        "Error-Info",
        "In-Reply-To",
        "P-Asserted-Identity",
        "P-Preferred-Identity",
        "Path",
        "Proxy-Require",
        "Record-Route",
        "Require",
        "Route",
        "Service-Route",
        "Supported",
        "Unsupported",
        "Via",
        "Warning",
    )
)
# List headers in which an empty element is an error rather than noise.
STRICT_LIST_HEADERS = frozenset(("via", "contact", "route", "record-route", "path", "service-route"))
# Headers that must not appear more than once in a message.
_T = TypeVar("_T")

SINGLE_HEADERS = frozenset(("call-id", "cseq", "from", "to", "max-forwards", "content-length", "content-type"))


@functools.lru_cache(maxsize=4096)
def canonical_name(name: str) -> str:
    """The full, canonically spelt form of a header name (unknown names unchanged)."""
    lowered = name.lower()
    if len(lowered) == 1:
        full = COMPACT_FORMS.get(lowered)
        if full is not None:
            return full
    return CANONICAL_NAMES.get(lowered, name)


class Headers:
    """An ordered, case-insensitive multi-map of header names to raw string values."""

    __slots__ = ("_items", "_cache")

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items: list[tuple[str, str, str]] = []
        self._cache: dict[str, Any] = {}
        for name, value in items:
            self.add(name, value)

    def add(self, name: str, value: str) -> None:
        """Append one value (an element of a list header, or a whole header line)."""
        canonical = canonical_name(name)
        self._items.append((canonical.lower(), canonical, str(value)))
        self._cache.clear()

    def get(self, name: str, default: str | None = None) -> str | None:
        lowered = canonical_name(name).lower()
        for key, _, value in self._items:
            if key == lowered:
                return value
        return default

    def get_all(self, name: str) -> list[str]:
        lowered = canonical_name(name).lower()
        return [value for key, _, value in self._items if key == lowered]

    def count(self, name: str) -> int:
        lowered = canonical_name(name).lower()
        return sum(1 for key, _, _ in self._items if key == lowered)

    def set(self, name: str, value: str) -> None:
        """Replace every value of ``name`` with ``value`` (at the first one's position)."""
        canonical = canonical_name(name)
        lowered = canonical.lower()
        out = []
        placed = False
        for item in self._items:
            if item[0] == lowered:
                if not placed:
                    out.append((lowered, canonical, str(value)))
                    placed = True
            else:
                out.append(item)
        if not placed:
            out.append((lowered, canonical, str(value)))
        self._items = out
        self._cache.clear()

    def replace_first(self, name: str, value: str) -> None:
        """Replace the first value of ``name`` only (e.g. the top Via)."""
        lowered = canonical_name(name).lower()
        for i, (key, canonical, _) in enumerate(self._items):
            if key == lowered:
                self._items[i] = (key, canonical, str(value))
                self._cache.clear()
                return
        raise KeyError(name)

    def remove(self, name: str) -> None:
        lowered = canonical_name(name).lower()
        self._items = [item for item in self._items if item[0] != lowered]
        self._cache.clear()

    def extend(self, items: Iterable[tuple[str, str]]) -> None:
        for name, value in items:
            self.add(name, value)

    def copy(self) -> Headers:
        clone = Headers()
        clone._items = list(self._items)
        return clone

    def cached(self, key: str, compute: Callable[[], _T]) -> _T:
        """A value derived from the headers, computed once until the headers change (``key``
        names what ``compute`` derives: one key, one type)."""
        try:
            return cast(_T, self._cache[key])
        except KeyError:
            value = self._cache[key] = compute()
            return value

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        lowered = canonical_name(name).lower()
        return any(key == lowered for key, _, _ in self._items)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return ((name, value) for _, name, value in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Headers({list(self)!r})"


# --- name-addr / addr-spec -------------------------------------------------------------


@dataclass
class Address:
    """A name-addr or addr-spec with header parameters: From, To, Contact, Route..."""

    uri: Uri
    display_name: str | None = None
    params: Params = field(default_factory=Params)

    @property
    def tag(self) -> str | None:
        return self.params.get("tag")

    @classmethod
    def parse(cls, text: str, where: str = "address") -> Address:
        sc = Scanner(text.strip(), where)
        display: str | None = None
        if sc.peek() == '"':
            display = unquote(sc.quoted())
            sc.skip_ws()
            if sc.peek() != "<":
                raise sc.error("a quoted display name must be followed by <URI>")
        elif 0 <= sc.text.find("<") and (sc.text.find(";") < 0 or sc.text.find("<") < sc.text.find(";")):
            words = sc.read_until("<").split()
            for word in words:
                if not is_token(word):
                    bad = next(c for c in word if c not in TOKEN_CHARS)
                    raise sc.error(f"character {bad!r} in an unquoted display name")
            display = " ".join(words) or None
        if sc.accept("<"):
            uri_text = sc.read_until(">")
            if not sc.accept(">"):
                raise sc.error("'<' without a closing '>'")
            if any(c in " \t" for c in uri_text):
                raise sc.error("whitespace inside <...>")
            uri = parse_uri(uri_text, where)
        else:
            uri_text = sc.read_until(";").strip()
            if not uri_text:
                raise sc.error("missing URI")
            for c in uri_text:
                if c in " \t,?":
                    raise sc.error(f"{c!r} in a URI that is not enclosed in <...>")
            uri = parse_uri(uri_text, where)
        params = sc.params()
        sc.expect_end()
        return cls(uri, display, params)

    def with_tag(self, tag: str) -> Address:
        params = self.params.copy()
        params.set("tag", tag)
        return Address(self.uri, self.display_name, params)

    def __str__(self) -> str:
        name = f"{quote(self.display_name)} " if self.display_name else ""
        return f"{name}<{self.uri}>{self.params}"


# --- Via -------------------------------------------------------------------------------

MAGIC_COOKIE = "z9hG4bK"


@dataclass
class Via:
    """One Via element: ``SIP/2.0/UDP host:port;branch=...;received=...;rport``."""

    transport: str
    host: str
    port: int | None = None
    params: Params = field(default_factory=Params)
    protocol: str = "SIP/2.0"

    @property
    def branch(self) -> str | None:
        return self.params.get("branch")

    @property
    def has_rfc3261_branch(self) -> bool:
        branch = self.branch
        return branch is not None and branch.startswith(MAGIC_COOKIE) and len(branch) > len(MAGIC_COOKIE)

    @property
    def received(self) -> str | None:
        return self.params.get("received")

    @property
    def has_rport(self) -> bool:
        return "rport" in self.params

    @property
    def rport(self) -> int | None:
        value = self.params.get("rport")
        return int(value) if value and value.isdigit() and int(value) <= 65535 else None

    @property
    def maddr(self) -> str | None:
        return self.params.get("maddr")

    @property
    def sent_by(self) -> str:
        return format_host(self.host) + (f":{self.port}" if self.port is not None else "")

    @property
    def sent_by_key(self) -> tuple[str, int]:
        return (self.host.lower(), self.port if self.port is not None else 5060)

    @classmethod
    def parse(cls, text: str, where: str = "Via") -> Via:
        sc = Scanner(text.strip(), where)
        name = sc.token("the protocol name")
        sc.skip_ws()
        sc.expect("/", "'/' in the sent-protocol")
        sc.skip_ws()
        version = sc.token("the protocol version")
        sc.skip_ws()
        sc.expect("/", "'/' in the sent-protocol")
        sc.skip_ws()
        transport = sc.token("the transport")
        if not sc.skip_ws():
            raise sc.error("expected whitespace before the sent-by")
        if sc.accept("["):
            host = sc.read_until("]")
            sc.expect("]")
            if ":" not in host:
                raise sc.error(f"{host!r} in brackets is not an IPv6 address")
        else:
            host = sc.read_while(HOSTNAME_CHARS)
        check_host(host, where)
        save = sc.pos
        sc.skip_ws()
        port = None
        if sc.accept(":"):
            sc.skip_ws()
            port = parse_port(sc.read_while(frozenset("0123456789")), where)
        else:
            sc.pos = save
        params = sc.params()
        sc.expect_end()
        rport = params.get("rport")
        if rport is not None and (not rport.isdigit() or int(rport) > 65535):
            raise sc.error(f"bad rport {rport!r}")
        branch = params.get("branch")
        if "branch" in params and branch is None:
            raise sc.error("branch without a value")
        return cls(transport.upper(), host, port, params, f"{name}/{version}")

    def __str__(self) -> str:
        return f"{self.protocol}/{self.transport} {self.sent_by}{self.params}"


_LENIENT_VIA = re.compile(
    r"\s*[^/\s]+\s*/\s*[^/\s]+\s*/\s*([A-Za-z0-9\-.!%*_+`'~]+)\s+(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._]+)"
    r"(?:\s*:\s*(\d{1,5}))?"
)


def lenient_via(text: str) -> Via | None:
    """Transport, sent-by and rport of a Via that may be otherwise malformed, for
    routing a 400; ``None`` when not even that can be read."""
    match = _LENIENT_VIA.match(text)
    if match is None:
        return None
    host = match.group(2).strip("[]")
    port = int(match.group(3)) if match.group(3) and int(match.group(3)) <= 65535 else None
    params = Params()
    if re.search(r";\s*rport\b", text[match.end() :], re.IGNORECASE):
        params.set("rport")
    return Via(match.group(1).upper(), host, port, params)


# --- CSeq, media types, dates, numbers -------------------------------------------------

MAX_CSEQ = 2**31 - 1


@dataclass(frozen=True)
class CSeq:
    seq: int
    method: str

    @classmethod
    def parse(cls, text: str) -> CSeq:
        parts = text.split()
        if len(parts) != 2:
            raise SipParseError(f"CSeq: expected 'number METHOD', got {shown(text)}")
        number, method = parts
        if not number.isascii() or not number.isdigit():
            raise SipParseError(f"CSeq: sequence number {shown(number)} is not a number")
        seq = int(number)
        if seq > MAX_CSEQ:
            raise SipParseError(f"CSeq: sequence number {number} exceeds 2**31-1")
        if not is_token(method):
            raise SipParseError(f"CSeq: method {shown(method)} is not a token")
        return cls(seq, method)

    def __str__(self) -> str:
        return f"{self.seq} {self.method}"


def parse_uint(text: str, where: str, maximum: int) -> int:
    value = text.strip()
    if not value or not value.isascii() or not value.isdigit():
        raise SipParseError(f"{where}: {shown(value)} is not a non-negative integer")
    number = int(value)
    if number > maximum:
        raise SipParseError(f"{where}: {value} exceeds the maximum of {maximum}")
    return number


def parse_media_type(text: str, where: str = "Content-Type") -> tuple[str, Params]:
    """``type/subtype;params`` → (lower-cased ``type/subtype``, params)."""
    sc = Scanner(text.strip(), where)
    kind = sc.token("a media type")
    sc.skip_ws()
    sc.expect("/", "'/' in the media type")
    sc.skip_ws()
    subtype = sc.token("a media subtype")
    params = sc.params()
    sc.expect_end()
    return f"{kind}/{subtype}".lower(), params


_DATE = re.compile(
    r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun),\s+\d{2}\s+(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
    r"\s+\d{4}\s+\d{2}:\d{2}:\d{2}\s+GMT"
)


def check_date(text: str) -> None:
    """RFC 3261 §20.17: an RFC 1123 date, always in GMT."""
    if not _DATE.fullmatch(text.strip()):
        raise SipParseError(f"Date: {shown(text)} is not an RFC 1123 date in GMT")


__all__ = [
    "AbsoluteUri",
    "Address",
    "CANONICAL_NAMES",
    "COMPACT_FORMS",
    "CSeq",
    "Headers",
    "LIST_HEADERS",
    "MAGIC_COOKIE",
    "SINGLE_HEADERS",
    "STRICT_LIST_HEADERS",
    "Via",
    "canonical_name",
    "check_date",
    "lenient_via",
    "parse_media_type",
    "parse_uint",
    "split_list",
]
