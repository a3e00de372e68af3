"""Character classes, quoting and a small scanner for SIP's header grammar (RFC 3261 §25.1).

The scanner raises ``SipParseError`` naming the header (``where``) and showing the text.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Iterator

from sip.errors import SipParseError

ALPHANUM = frozenset(string.ascii_letters + string.digits)
TOKEN_CHARS = ALPHANUM | frozenset("-.!%*_+`'~")
MARK = frozenset("-_.!~*'()")
UNRESERVED = ALPHANUM | MARK
USER_CHARS = UNRESERVED | frozenset("&=+$,;?/")
PASSWORD_CHARS = UNRESERVED | frozenset("&=+$,")
PARAM_CHARS = UNRESERVED | frozenset("[]/:&+$")
HEADER_CHARS = UNRESERVED | frozenset("[]/?:+$")
# gen-value = token / host / quoted-string; a host may be an IPv6 reference.
GEN_VALUE_CHARS = TOKEN_CHARS | frozenset(":[]")
HOSTNAME_CHARS = ALPHANUM | frozenset("-._")
WS = " \t"
HEX = frozenset(string.hexdigits)


_CLASS_PATTERNS: dict[tuple[frozenset[str], bool], re.Pattern[str]] = {}


def char_run(chars: frozenset[str], negate: bool = False) -> re.Pattern[str]:
    """A compiled ``[chars]*`` (``[^chars]*`` when ``negate``), cached: scanning with
    regular expressions is an order of magnitude faster than a Python loop per character."""
    key = (chars, negate)
    pattern = _CLASS_PATTERNS.get(key)
    if pattern is None:
        body = "".join(re.escape(c) for c in sorted(chars))
        pattern = _CLASS_PATTERNS[key] = re.compile(f"[{'^' if negate else ''}{body}]*")
    return pattern


def run_end(pattern: re.Pattern[str], text: str, start: int = 0) -> int:
    """Where the run that ``pattern`` (a :func:`char_run`) matches at ``start`` ends."""
    match = pattern.match(text, start)
    assert match is not None  # a [chars]* pattern matches every text, if only emptily
    return match.end()


_TOKEN = char_run(TOKEN_CHARS)
_WS = char_run(frozenset(WS))


def is_token(text: str) -> bool:
    return bool(text) and _TOKEN.fullmatch(text) is not None


def shown(text: str, limit: int = 80) -> str:
    """``text`` for an error message: repr'd and cut to ``limit`` characters."""
    if len(text) > limit:
        text = text[:limit] + "..."
    return repr(text)


def quote(text: str) -> str:
    """``text`` as a quoted-string, escaping backslash and double quote."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def unquote(text: str) -> str:
    """The content of a quoted-string (quoted-pairs resolved); other text as it is."""
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        out = []
        it = iter(text[1:-1])
        for c in it:
            if c == "\\":
                c = next(it, "")
            out.append(c)
        return "".join(out)
    return text


def split_list(value: str, where: str) -> list[str]:
    """Split a comma-separated header value at top-level commas: commas inside quoted
    strings and ``<...>`` do not split. Elements are stripped; empty ones are kept so that
    the caller can decide whether they are an error."""
    if '"' not in value:
        if "," not in value:
            return [value.strip()]
        if "<" not in value:
            return [part.strip() for part in value.split(",")]
    parts: list[str] = []
    start = 0
    in_quote = False
    in_angle = False
    i = 0
    n = len(value)
    while i < n:
        c = value[i]
        if in_quote:
            if c == "\\":
                i += 1
            elif c == '"':
                in_quote = False
        elif c == '"':
            in_quote = True
        elif c == "<":
            in_angle = True
        elif c == ">":
            in_angle = False
        elif c == "," and not in_angle:
            parts.append(value[start:i].strip())
            start = i + 1
        i += 1
    if in_quote:
        raise SipParseError(f"{where}: unterminated quoted string in {shown(value)}")
    parts.append(value[start:].strip())
    return parts


class Params:
    """Ordered ``;name=value`` parameters; names compare case-insensitively.

    Values are kept as written (a quoted value keeps its quotes; ``get_unquoted`` strips
    them); a parameter without a value has ``None``.
    """

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[str, str | None]] = ()) -> None:
        self._items: list[tuple[str, str | None]] = list(items)

    def _index(self, name: str) -> int:
        lowered = name.lower()
        for i, (key, _) in enumerate(self._items):
            if key.lower() == lowered:
                return i
        return -1

    def get(self, name: str, default: str | None = None) -> str | None:
        i = self._index(name)
        return default if i < 0 else self._items[i][1]

    def get_unquoted(self, name: str) -> str | None:
        value = self.get(name)
        return None if value is None else unquote(value)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._index(name) >= 0

    def set(self, name: str, value: str | None = None) -> None:
        i = self._index(name)
        if i < 0:
            self._items.append((name, value))
        else:
            self._items[i] = (self._items[i][0], value)

    def remove(self, name: str) -> None:
        lowered = name.lower()
        self._items = [(k, v) for k, v in self._items if k.lower() != lowered]

    def items(self) -> list[tuple[str, str | None]]:
        return list(self._items)

    def copy(self) -> Params:
        return Params(self._items)

    def __iter__(self) -> Iterator[tuple[str, str | None]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Params):
            return NotImplemented
        return sorted((k.lower(), v) for k, v in self._items) == sorted((k.lower(), v) for k, v in other._items)

    def __str__(self) -> str:
        return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in self._items)

    def __repr__(self) -> str:
        return f"Params({self._items!r})"


class Scanner:
    """A cursor over one header value; every error names ``where`` and shows the text."""

    __slots__ = ("text", "pos", "where")

    def __init__(self, text: str, where: str) -> None:
        self.text = text
        self.pos = 0
        self.where = where

    def error(self, what: str) -> SipParseError:
        return SipParseError(f"{self.where}: {what} in {shown(self.text)}")

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_ws(self) -> bool:
        start = self.pos
        self.pos = run_end(_WS, self.text, start)
        return self.pos > start

    def accept(self, char: str) -> bool:
        if self.peek() == char:
            self.pos += 1
            return True
        return False

    def expect(self, char: str, what: str | None = None) -> None:
        if not self.accept(char):
            found = self.peek()
            raise self.error(f"expected {what or repr(char)}, found {repr(found) if found else 'end of value'}")

    def read_while(self, chars: frozenset[str]) -> str:
        start = self.pos
        self.pos = run_end(char_run(chars), self.text, start)
        return self.text[start : self.pos]

    def read_until(self, stops: str) -> str:
        start = self.pos
        self.pos = run_end(char_run(frozenset(stops), negate=True), self.text, start)
        return self.text[start : self.pos]

    def token(self, what: str = "a token") -> str:
        value = self.read_while(TOKEN_CHARS)
        if not value:
            found = self.peek()
            raise self.error(f"expected {what}, found {repr(found) if found else 'end of value'}")
        return value

    def quoted(self) -> str:
        """A quoted-string; returns it as written, quotes included."""
        start = self.pos
        self.expect('"')
        text = self.text
        while True:
            if self.pos >= len(text):
                raise self.error("unterminated quoted string")
            c = text[self.pos]
            self.pos += 1
            if c == "\\":
                if self.pos >= len(text) or text[self.pos] in "\r\n":
                    raise self.error("backslash at the end of a quoted string")
                self.pos += 1
            elif c == '"':
                return text[start : self.pos]
            elif c in "\r\n":
                raise self.error("line break inside a quoted string")

    def params(self, value_chars: frozenset[str] = GEN_VALUE_CHARS) -> Params:
        """``*( SEMI generic-param )``, with the LWS the grammar allows around ``;`` and ``=``."""
        params = Params()
        while True:
            save = self.pos
            self.skip_ws()
            if not self.accept(";"):
                self.pos = save
                return params
            self.skip_ws()
            if self.peek() in (";", ",", ""):
                raise self.error("empty parameter")
            name = self.token("a parameter name")
            save = self.pos
            self.skip_ws()
            value: str | None = None
            if self.accept("="):
                self.skip_ws()
                if self.peek() == '"':
                    value = self.quoted()
                else:
                    value = self.read_while(value_chars)
                    if not value:
                        raise self.error(f"parameter {name!r} has an empty value")
            else:
                self.pos = save
            params._items.append((name, value))

    def expect_end(self) -> None:
        self.skip_ws()
        if not self.at_end():
            raise self.error(f"unexpected {shown(self.text[self.pos :], 30)}")
