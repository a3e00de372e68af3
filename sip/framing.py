"""Cutting a SIP byte stream (TCP) into messages (RFC 3261 §18.3).

On a stream, Content-Length is mandatory: it is the only way to know where a message
ends. CRLFs between messages are skipped; a double CRLF is a keep-alive ping (RFC 5626
§4.4.1) which the transport answers with a single CRLF.
"""

from __future__ import annotations

import re

from sip.errors import SipParseError
from sip.message import DEFAULT_MAX_MESSAGE_SIZE

_HEAD_END = re.compile(rb"\r?\n\r?\n")
_CONTENT_LENGTH = re.compile(rb"^(?:content-length|l)[ \t]*:[ \t]*(.*?)[ \t]*$", re.IGNORECASE | re.MULTILINE)


class StreamFramer:
    """Feed bytes in, get whole messages out. After a ``SipParseError`` the stream cannot
    be resynchronised: the connection must be closed. ``error_head`` then holds the header
    section of the offending message (when it was complete) so that a 400 can be formed.
    A header section longer than ``max_header_bytes`` (finished or not) is refused with 513,
    so a peer cannot make us buffer more than that while it trickles a header."""

    def __init__(self, max_size: int = DEFAULT_MAX_MESSAGE_SIZE, max_header_bytes: int | None = None) -> None:
        self.max_size = max_size
        self.max_header_bytes = min(max_size, max_header_bytes or max_size)
        self.keepalives = 0
        self.error_head: bytes | None = None
        self._buffer = bytearray()
        self._scanned = 0  # how much of the buffered header was searched for its end already
        self._total: int | None = None  # the length of the message under way, once its header is read

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """The whole messages completed by ``data``. Each byte is scanned once (a header
        trickled byte by byte costs linear, not quadratic, time)."""
        buffer = self._buffer
        buffer.extend(data)
        messages: list[bytes] = []
        while True:
            if self._total is None:
                if self._scanned == 0:
                    skipped = 0
                    while skipped < len(buffer) and buffer[skipped] in (0x0D, 0x0A):
                        skipped += 1
                    if skipped:
                        crlfs = bytes(buffer[:skipped])
                        self.keepalives += crlfs.count(b"\r\n\r\n") + crlfs.count(b"\n\n")
                        del buffer[:skipped]
                    if not buffer:
                        return messages
                match = _HEAD_END.search(buffer, max(0, self._scanned - 3), self.max_header_bytes + 4)
                if match is None:
                    if len(buffer) > self.max_header_bytes:
                        self.error_head = bytes(buffer[: self.max_header_bytes])  # enough to route a 513
                        raise SipParseError(f"header section exceeds {self.max_header_bytes} bytes", status=513)
                    self._scanned = len(buffer)
                    return messages
                self._total = self._message_length(bytes(buffer[: match.start()]), match.end())
            total = self._total
            if len(buffer) < total:
                return messages
            messages.append(bytes(buffer[:total]))
            del buffer[:total]
            self._total = None
            self._scanned = 0

    def _message_length(self, head: bytes, body_start: int) -> int:
        lengths = _CONTENT_LENGTH.findall(head)
        if not lengths:
            self.error_head = head
            raise SipParseError("missing Content-Length (required on stream transports)")
        if len(lengths) > 1:
            self.error_head = head
            raise SipParseError("Content-Length appears more than once")
        text = lengths[0].strip()
        if not text.isdigit():
            self.error_head = head
            raise SipParseError(f"Content-Length: {text.decode('latin-1')!r} is not a non-negative integer")
        total = body_start + int(text)
        if total > self.max_size:
            self.error_head = head
            raise SipParseError(f"message of {total} bytes exceeds the limit of {self.max_size}", status=513)
        return total
