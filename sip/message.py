"""SIP requests and responses (RFC 3261 §7, §20, §25): parsing, validation, serialisation.

``parse_message`` turns one datagram (or one message cut from a stream by
``sip.framing.StreamFramer``) into a ``Request`` or ``Response`` and validates what the
stack relies on: the start line, the mandatory headers, Via, From, To, Contact, CSeq,
Max-Forwards, Content-Length. Every fault raises ``SipParseError`` naming the header.
``to_bytes`` always writes a Content-Length that matches the body.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Mapping

from sip.errors import SipParseError
from sip.grammar import is_token, shown, split_list
from sip.headers import (
    LIST_HEADERS,
    SINGLE_HEADERS,
    STRICT_LIST_HEADERS,
    Address,
    CSeq,
    Headers,
    Via,
    canonical_name,
    check_date,
    lenient_via,
    parse_media_type,
    parse_uint,
)
from sip.status import reason_phrase
from sip.uri import SipUri, Uri, parse_uri

DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024
SIP_VERSION = "SIP/2.0"
_VERSION = re.compile(r"SIP/(\d+)\.(\d+)", re.IGNORECASE)
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_LINE_BREAK = re.compile(r"\r?\n")
MANDATORY_REQUEST_HEADERS = ("Via", "To", "From", "Call-ID", "CSeq")
MANDATORY_RESPONSE_HEADERS = ("Via", "To", "From", "Call-ID", "CSeq")

HeaderItems = Mapping[str, str] | Iterable[tuple[str, str]]


def new_tag() -> str:
    """A fresh From/To tag (RFC 3261 §19.3: at least 32 bits of randomness)."""
    return secrets.token_hex(6)


class Message:
    """What requests and responses share: headers, a body and typed header accessors.

    The accessors parse on first use and cache until the headers change; they raise
    ``SipParseError`` for a malformed or missing header.
    """

    def __init__(self, headers: Headers | HeaderItems | None = None, body: bytes | str = b"") -> None:
        if isinstance(headers, Headers):
            self.headers = headers
        else:
            self.headers = Headers()
            if headers is not None:
                items = headers.items() if isinstance(headers, Mapping) else headers
                for name, value in items:
                    self.headers.add(name, value)
        self.body = body.encode() if isinstance(body, str) else bytes(body)

    # -- typed accessors --------------------------------------------------------------

    def _required(self, name: str) -> str:
        value = self.headers.get(name)
        if value is None:
            raise SipParseError(f"missing {name} header")
        return value

    @property
    def vias(self) -> list[Via]:
        return self.headers.cached("vias", lambda: [Via.parse(v) for v in self.headers.get_all("Via")])

    @property
    def top_via(self) -> Via:
        vias = self.vias
        if not vias:
            raise SipParseError("missing Via header")
        return vias[0]

    @property
    def call_id(self) -> str:
        def compute() -> str:
            value = self._required("Call-ID").strip()
            if not value or any(c in " \t" for c in value):
                raise SipParseError(f"Call-ID: {shown(value)} is empty or contains whitespace")
            return value

        return self.headers.cached("call-id", compute)

    @property
    def cseq(self) -> CSeq:
        return self.headers.cached("cseq", lambda: CSeq.parse(self._required("CSeq")))

    @property
    def from_addr(self) -> Address:
        return self.headers.cached("from", lambda: Address.parse(self._required("From"), "From"))

    @property
    def to_addr(self) -> Address:
        return self.headers.cached("to", lambda: Address.parse(self._required("To"), "To"))

    @property
    def contacts(self) -> list[Address]:
        def compute() -> list[Address]:
            values = self.headers.get_all("Contact")
            if values == ["*"]:
                return []
            return [Address.parse(v, "Contact") for v in values]

        return self.headers.cached("contact", compute)

    @property
    def record_routes(self) -> list[Address]:
        return self.headers.cached(
            "record-route", lambda: [Address.parse(v, "Record-Route") for v in self.headers.get_all("Record-Route")]
        )

    @property
    def routes(self) -> list[Address]:
        return self.headers.cached("route", lambda: [Address.parse(v, "Route") for v in self.headers.get_all("Route")])

    @property
    def content_type(self) -> str | None:
        """The lower-cased ``type/subtype`` of the body, or None."""
        value = self.headers.get("Content-Type")
        if value is None:
            return None
        return self.headers.cached("content-type", lambda: parse_media_type(value)[0])

    def values(self, name: str) -> list[str]:
        """The elements of a list header such as Supported or Allow, stripped, non-empty."""
        return [v.strip() for v in self.headers.get_all(name) if v.strip()]

    def option_tags(self, name: str) -> set[str]:
        return {v.lower() for v in self.values(name)}

    # -- serialisation ----------------------------------------------------------------

    def start_line(self) -> str:
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        lines = [self.start_line()]
        for name, value in self.headers:
            if name != "Content-Length":
                lines.append(f"{name}: {value}")
        lines.append(f"Content-Length: {len(self.body)}")
        head = "\r\n".join(lines) + "\r\n\r\n"
        return head.encode("utf-8", "surrogateescape") + self.body

    def __bytes__(self) -> bytes:
        return self.to_bytes()


class Request(Message):
    """A SIP request: ``method``, Request-URI ``uri``, headers and body."""

    def __init__(
        self,
        method: str,
        uri: Uri | str,
        headers: Headers | HeaderItems | None = None,
        body: bytes | str = b"",
        version: str = SIP_VERSION,
    ) -> None:
        super().__init__(headers, body)
        self.method = method
        self.uri: Uri = parse_uri(uri, "Request-URI") if isinstance(uri, str) else uri
        self.version = version

    def start_line(self) -> str:
        return f"{self.method} {self.uri} {self.version}"

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.uri}>"


class Response(Message):
    """A SIP response. ``local`` marks one the stack made up itself (a 408 for a timeout,
    a 503 for a transport failure) rather than one that came from the network."""

    def __init__(
        self,
        status: int,
        reason: str | None = None,
        headers: Headers | HeaderItems | None = None,
        body: bytes | str = b"",
        version: str = SIP_VERSION,
    ) -> None:
        super().__init__(headers, body)
        self.status = status
        self.reason = reason if reason is not None else reason_phrase(status)
        self.version = version
        self.local = False

    @property
    def is_provisional(self) -> bool:
        return self.status < 200

    @property
    def is_success(self) -> bool:
        return 200 <= self.status < 300

    def start_line(self) -> str:
        return f"{self.version} {self.status} {self.reason}"

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason}>"


# --- parsing ---------------------------------------------------------------------------


def split_head(data: bytes) -> tuple[bytes, bytes] | None:
    """(header section, rest) of a message, or None when the blank line is missing."""
    match = _HEAD_END.search(data)
    if match is None:
        return None
    return data[: match.start()], data[match.end() :]


def _header_lines(head: str) -> list[tuple[str, str]]:
    """Unfold continuation lines and split ``name: value``; validates the names."""
    lines = _LINE_BREAK.split(head)
    fields: list[list[str]] = []
    for number, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        if line[0] in " \t":
            if not fields:
                raise SipParseError(f"line {number}: continuation line before any header")
            fields[-1][1] += " " + line.strip()
            continue
        name, colon, value = line.partition(":")
        name = name.rstrip(" \t")
        if not colon:
            raise SipParseError(f"line {number}: {shown(line, 40)} is not a header (no colon)")
        if not is_token(name):
            raise SipParseError(f"line {number}: {shown(name, 40)} is not a valid header name")
        fields.append([name, value.strip(" \t")])
    return [(name, value.strip(" \t")) for name, value in fields]


def _fill_headers(headers: Headers, fields: list[tuple[str, str]]) -> None:
    for name, value in fields:
        canonical = canonical_name(name)
        lowered = canonical.lower()
        if lowered in LIST_HEADERS and value:
            elements = split_list(value, canonical)
            for element in elements:
                if not element:
                    if lowered in STRICT_LIST_HEADERS:
                        raise SipParseError(f"{canonical}: empty element in {shown(value)}")
                    continue
                headers.add(canonical, element)
        else:
            if not value and lowered in STRICT_LIST_HEADERS:
                raise SipParseError(f"{canonical}: empty value")
            headers.add(canonical, value)


def parse_message(data: bytes, *, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> Request | Response:
    """Parse and validate one SIP message (a whole datagram, or one framed stream message).

    A body longer than Content-Length is cut to it (RFC 3261 §18.3); a shorter one is an
    error; without Content-Length the body is the rest of the data.
    """
    if len(data) > max_size:
        raise SipParseError(f"message of {len(data)} bytes exceeds the limit of {max_size}", status=513)
    data = data.lstrip(b"\r\n")
    parts = split_head(data)
    if parts is None:
        if not data.endswith(b"\n"):
            raise SipParseError("no blank line after the headers (truncated message?)")
        parts = (data.rstrip(b"\r\n"), b"")  # a datagram that ends right after its last header
    head_bytes, rest = parts
    head = head_bytes.decode("utf-8", "surrogateescape")
    first, _, _ = head.partition("\n")
    first = first.rstrip("\r")
    headers = Headers()
    _fill_headers(headers, _header_lines(head))

    for name in SINGLE_HEADERS:
        if headers.count(name) > 1:
            raise SipParseError(f"{canonical_name(name)} appears {headers.count(name)} times")

    length_text = headers.get("Content-Length")
    if length_text is not None:
        length = parse_uint(length_text, "Content-Length", max_size)
        if length > len(rest):
            raise SipParseError(f"Content-Length: {length} exceeds the {len(rest)} bytes of body received")
        body = rest[:length]
    else:
        body = rest

    message: Request | Response
    if first.startswith("SIP/"):
        message = _parse_status_line(first, headers, body)
        mandatory = MANDATORY_RESPONSE_HEADERS
    else:
        message = _parse_request_line(first, headers, body)
        mandatory = MANDATORY_REQUEST_HEADERS
    for name in mandatory:
        if name not in headers:
            raise SipParseError(f"missing {name} header")
    _validate(message)
    return message


def _check_version(version: str) -> None:
    match = _VERSION.fullmatch(version)
    if match is None:
        raise SipParseError(f"start line: {shown(version)} is not a SIP version")
    if (match.group(1), match.group(2)) != ("2", "0"):
        raise SipParseError(f"start line: version {version} is not supported", status=505)


def _parse_request_line(line: str, headers: Headers, body: bytes) -> Request:
    parts = line.split(" ")
    if len(parts) != 3 or not all(parts):
        raise SipParseError(
            f"request line: expected 'METHOD URI SIP/2.0' separated by single spaces, got {shown(line)}"
        )
    method, uri_text, version = parts
    if not is_token(method):
        raise SipParseError(f"request line: method {shown(method)} is not a token")
    _check_version(version)
    uri = parse_uri(uri_text, "Request-URI")
    if isinstance(uri, SipUri) and uri.headers:
        raise SipParseError("Request-URI: must not contain headers ('?...')")
    return Request(method, uri, headers, body, version.upper())


def _parse_status_line(line: str, headers: Headers, body: bytes) -> Response:
    version, _, rest = line.partition(" ")
    _check_version(version)
    code, _, reason = rest.partition(" ")
    if len(code) != 3 or not code.isascii() or not code.isdigit() or not 100 <= int(code) <= 699:
        raise SipParseError(f"status line: {shown(code)} is not a status code (100-699)")
    return Response(int(code), reason.strip(), headers, body, version.upper())


def _validate(message: Request | Response) -> None:
    message.vias  # noqa: B018 - parses every Via
    message.from_addr  # noqa: B018
    message.to_addr  # noqa: B018
    message.call_id  # noqa: B018
    cseq = message.cseq
    message.contacts  # noqa: B018
    message.record_routes  # noqa: B018
    message.routes  # noqa: B018
    headers = message.headers
    if isinstance(message, Request):
        if cseq.method != message.method:
            raise SipParseError(f"CSeq: method {cseq.method} does not match the request method {message.method}")
    max_forwards = headers.get("Max-Forwards")
    if max_forwards is not None:
        parse_uint(max_forwards, "Max-Forwards", 255)
    expires = headers.get("Expires")
    if expires is not None:
        parse_uint(expires, "Expires", 2**32 - 1)
    for contact in message.contacts:
        value = contact.params.get("expires")
        if value is not None:
            parse_uint(value, "Contact: expires", 2**32 - 1)
    date = headers.get("Date")
    if date is not None:
        check_date(date)
    if headers.get("Content-Type") is not None:
        message.content_type  # noqa: B018
    if message.body and headers.get("Content-Type") is None:
        if message.body.strip(b"\r\n\t "):
            raise SipParseError("a body without Content-Type")
        message.body = b""


# --- building responses ----------------------------------------------------------------


def make_response(
    request: Request,
    status: int,
    reason: str | None = None,
    *,
    to_tag: str | None = None,
    headers: HeaderItems | None = None,
    body: bytes | str = b"",
) -> Response:
    """A response to ``request`` (RFC 3261 §8.2.6.2): Via, From, To, Call-ID and CSeq
    copied; ``to_tag`` added to To when it has none (never on a 100)."""
    out = Headers()
    for via in request.headers.get_all("Via"):
        out.add("Via", via)
    for name in ("From", "To", "Call-ID", "CSeq"):
        value = request.headers.get(name)
        if value is None:
            continue
        if name == "To" and to_tag and status != 100 and not _has_tag(request, value):
            value = f"{value};tag={to_tag}"
        out.add(name, value)
    if status == 100 and "Timestamp" in request.headers:
        out.add("Timestamp", request.headers.get("Timestamp") or "")
    response = Response(status, reason, out, body)
    if headers:
        items = headers.items() if isinstance(headers, Mapping) else headers
        for name, value in items:
            response.headers.add(name, value)
    return response


def _has_tag(request: Request, to_value: str) -> bool:
    try:
        return request.to_addr.tag is not None
    except SipParseError:
        return ";tag=" in to_value.replace(" ", "").lower()


def stateless_response(data: bytes, status: int, reason: str) -> tuple[Response, Via] | None:
    """A response to a request that failed to parse, from whatever could be read, with
    the top Via (read leniently) to route it; None when the data is not recognisably a
    request with a Via, or is an ACK (never answered)."""
    parts = split_head(data.lstrip(b"\r\n"))
    head_bytes = parts[0] if parts is not None else data
    head = head_bytes.decode("utf-8", "surrogateescape")
    lines = _LINE_BREAK.split(head)
    first = lines[0].split(" ")
    if not first or not is_token(first[0]) or first[0].startswith("SIP/") or first[0] == "ACK":
        return None
    collected: dict[str, list[str]] = {}
    last: list[str] | None = None
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and last is not None:
            last[-1] += " " + line.strip()
            continue
        name, colon, value = line.partition(":")
        if not colon:
            last = None
            continue
        last = collected.setdefault(canonical_name(name.strip()), [])
        last.append(value.strip())
    via_values: list[str] = []
    for value in collected.get("Via", []):
        try:
            via_values.extend(v for v in split_list(value, "Via") if v)
        except SipParseError:
            via_values.append(value)
    if not via_values:
        return None
    top = lenient_via(via_values[0])
    if top is None:
        return None
    out = Headers()
    for via in via_values:
        out.add("Via", via)
    for name in ("From", "To", "Call-ID", "CSeq"):
        values = collected.get(name)
        if values:
            value = values[0]
            if name == "To" and ";tag=" not in value.replace(" ", "").lower():
                value += f";tag={new_tag()}"
            out.add(name, value)
    return Response(status, reason, out), top
