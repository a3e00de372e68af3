"""RFC 4733 telephone-events (DTMF over RTP): the 4-byte payload, a receiver, a sender.

All packets of one event share the RTP timestamp of the event's start; the duration field
grows with each update, and the end of the event is sent (usually three times) with the E
bit set. :class:`DtmfReceiver` reports each digit exactly once, when its end packet arrives,
or, when every end packet is lost, when a new event begins or nothing has been heard of the
event for ``timeout``. :class:`DtmfSender` produces the packet sequence for a digit.
:func:`parse_info_dtmf` reads a digit sent in a SIP INFO body instead (Cisco's
``application/dtmf-relay``, or ``application/dtmf``).
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from sip.rtp import RtpPacket

EVENT_CODES = "0123456789*#ABCD"
EVENT_FLASH = 16
MAX_DURATION = 0xFFFF

_EVENT = struct.Struct("!BBH")


class DtmfParseError(ValueError):
    """The payload is not a telephone-event."""


@dataclass(frozen=True, slots=True)
class TelephoneEvent:
    """One telephone-event payload. ``duration`` is in RTP timestamp units; ``volume`` in -dBm0."""

    event: int
    end: bool = False
    volume: int = 10
    duration: int = 0

    @classmethod
    def parse(cls, payload: bytes) -> TelephoneEvent:
        if len(payload) < 4:
            raise DtmfParseError(f"telephone-event payload is {len(payload)} bytes, needs 4")
        event, flags, duration = _EVENT.unpack_from(payload)
        return cls(event, bool(flags & 0x80), flags & 0x3F, duration)

    def build(self) -> bytes:
        if not 0 <= self.event <= 255:
            raise ValueError(f"event {self.event} does not fit 8 bits")
        if not 0 <= self.volume <= 63:
            raise ValueError(f"volume {self.volume} is not in 0..63")
        if not 0 <= self.duration <= MAX_DURATION:
            raise ValueError(f"duration {self.duration} does not fit 16 bits")
        return _EVENT.pack(self.event, (0x80 if self.end else 0) | self.volume, self.duration)

    @property
    def digit(self) -> str:
        return event_name(self.event)


def event_code(digit: str) -> int:
    """The event number of a DTMF digit ("0"-"9", "*", "#", "A"-"D")."""
    code = EVENT_CODES.find(digit.upper()) if len(digit) == 1 else -1
    if code < 0:
        raise ValueError(f"{digit!r} is not a DTMF digit (0-9, *, #, A-D)")
    return code


def event_name(event: int) -> str:
    if 0 <= event < len(EVENT_CODES):
        return EVENT_CODES[event]
    if event == EVENT_FLASH:
        return "flash"
    return f"event-{event}"


@dataclass(frozen=True, slots=True)
class DtmfDigit:
    """A completed digit. ``ended_by`` is "end", "new-event" or "timeout"."""

    digit: str
    event: int
    duration_ms: float
    volume: int
    timestamp: int
    ended_by: str


class DtmfReceiver:
    """Turns received telephone-event packets into digits, each reported once."""

    def __init__(
        self, clock_rate: int = 8000, timeout_ms: float = 500.0, on_digit: Callable[[DtmfDigit], object] | None = None
    ) -> None:
        self.clock_rate = clock_rate
        self.timeout = timeout_ms / 1000
        self.on_digit = on_digit
        self.packets_malformed = 0
        self.digits_received = 0
        self._finished: deque[int] = deque(maxlen=16)  # timestamps of events already reported
        self._timestamp: int | None = None
        self._event = 0
        self._volume = 0
        self._duration = 0
        self._last_heard = 0.0

    def receive(self, packet: RtpPacket, arrival: float) -> list[DtmfDigit]:
        """Account one telephone-event packet; returns the digits it completes (usually none)."""
        try:
            event = TelephoneEvent.parse(packet.payload)
        except DtmfParseError:
            self.packets_malformed += 1
            return []
        timestamp = packet.timestamp
        if timestamp in self._finished:
            return []  # a repeated end packet, or a late update of a reported event
        done: list[DtmfDigit] = []
        if self._timestamp is not None and (timestamp != self._timestamp or event.event != self._event):
            done.append(self._finish("new-event"))
        if self._timestamp is None:
            self._timestamp = timestamp
            self._event = event.event
            self._duration = 0
        self._duration = max(self._duration, event.duration)
        self._volume = event.volume
        self._last_heard = arrival
        if event.end:
            done.append(self._finish("end"))
        return done

    def poll(self, now: float) -> list[DtmfDigit]:
        """Call now and then: completes an event whose end packets were all lost."""
        if self._timestamp is not None and now - self._last_heard >= self.timeout:
            return [self._finish("timeout")]
        return []

    @property
    def active(self) -> bool:
        """An event has begun and not yet been reported."""
        return self._timestamp is not None

    def _finish(self, ended_by: str) -> DtmfDigit:
        assert self._timestamp is not None
        digit = DtmfDigit(
            digit=event_name(self._event),
            event=self._event,
            duration_ms=self._duration * 1000 / self.clock_rate,
            volume=self._volume,
            timestamp=self._timestamp,
            ended_by=ended_by,
        )
        self._finished.append(self._timestamp)
        self._timestamp = None
        self.digits_received += 1
        if self.on_digit is not None:
            self.on_digit(digit)
        return digit


@dataclass(frozen=True, slots=True)
class DtmfPacket:
    """One packet of a digit: send it ``offset`` seconds after the first, with the event's timestamp."""

    offset: float
    payload: bytes
    marker: bool
    end: bool


class DtmfSender:
    """The RFC 4733 packet sequence for a digit: a start packet with the marker bit, an
    update every ``update_ms`` with the duration so far, and ``end_repeats`` end packets
    ``end_spacing_ms`` apart carrying the full duration."""

    def __init__(
        self,
        clock_rate: int = 8000,
        update_ms: float = 50.0,
        end_repeats: int = 3,
        end_spacing_ms: float = 20.0,
        volume: int = 10,
    ) -> None:
        if update_ms <= 0 or end_repeats < 1:
            raise ValueError("update_ms must be positive and end_repeats at least 1")
        self.clock_rate = clock_rate
        self.update_ms = update_ms
        self.end_repeats = end_repeats
        self.end_spacing_ms = end_spacing_ms
        self.volume = volume

    def packets(self, digit: str, duration_ms: float = 100.0) -> list[DtmfPacket]:
        code = event_code(digit)
        total = int(round(duration_ms * self.clock_rate / 1000))
        if not 0 < total <= MAX_DURATION:
            raise ValueError(f"duration {duration_ms} ms does not fit one event (1..{MAX_DURATION} samples)")
        step = self.update_ms * self.clock_rate / 1000
        packets: list[DtmfPacket] = []
        elapsed = 0.0
        while elapsed < total:
            event = TelephoneEvent(code, False, self.volume, int(elapsed))
            packets.append(DtmfPacket(elapsed / self.clock_rate, event.build(), not packets, False))
            elapsed += step
        end = TelephoneEvent(code, True, self.volume, total).build()
        for repeat in range(self.end_repeats):
            offset = total / self.clock_rate + repeat * self.end_spacing_ms / 1000
            packets.append(DtmfPacket(offset, end, False, True))
        return packets


# --- DTMF in SIP INFO ------------------------------------------------------------------

INFO_DTMF_TYPES = ("application/dtmf-relay", "application/dtmf")
MAX_INFO_BODY = 256
MAX_INFO_DURATION_MS = 60_000


@dataclass(frozen=True, slots=True)
class InfoDigit:
    """A digit from a SIP INFO body; ``duration_ms`` is None when the body gives none
    (``application/dtmf`` never does)."""

    digit: str
    duration_ms: float | None


def _info_signal(text: str) -> str:
    value = text.strip()
    if len(value) == 1 and value.upper() in EVENT_CODES:
        return value.upper()
    if value == "!":  # hook flash, as some gateways write it
        return event_name(EVENT_FLASH)
    if value.isascii() and value.isdigit() and int(value) <= EVENT_FLASH:
        return event_name(int(value))  # "10" is *, "11" is #, "16" a flash
    shown = value if len(value) <= 16 else value[:13] + "..."
    raise DtmfParseError(f"Signal {shown!r} is not a DTMF digit (0-9, *, #, A-D, or an event 0-16)")


def parse_info_dtmf(content_type: str, body: bytes) -> InfoDigit:
    """The digit in an INFO body: ``application/dtmf-relay`` (``Signal=5`` and an optional
    ``Duration=160`` in milliseconds, one per line; other keys ignored) or
    ``application/dtmf`` (the digit alone). Raises ``DtmfParseError`` saying what is wrong."""
    if content_type not in INFO_DTMF_TYPES:
        raise DtmfParseError(f"{content_type!r} is not a DTMF body type ({', '.join(INFO_DTMF_TYPES)})")
    if len(body) > MAX_INFO_BODY:
        raise DtmfParseError(f"the body is {len(body)} bytes; a DTMF body has at most {MAX_INFO_BODY}")
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        raise DtmfParseError("the body is not ASCII text") from None
    if not text.strip():
        raise DtmfParseError("the body is empty")
    if content_type == "application/dtmf" and "=" not in text:
        return InfoDigit(_info_signal(text), None)
    fields: dict[str, str] = {}
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        key, equals, value = line.partition("=")
        if not equals:
            raise DtmfParseError(f"line {line[:20]!r} is not 'Key=value'")
        fields.setdefault(key.strip().lower(), value.strip())
    if "signal" not in fields:
        raise DtmfParseError("no Signal= line")
    digit = _info_signal(fields["signal"])
    duration: float | None = None
    if "duration" in fields:
        value = fields["duration"]
        if not value.isascii() or not value.isdigit() or not 0 < int(value) <= MAX_INFO_DURATION_MS:
            raise DtmfParseError(
                f"Duration {value[:16]!r} is not a whole number of milliseconds (1-{MAX_INFO_DURATION_MS})"
            )
        duration = float(int(value))
    return InfoDigit(digit, duration)
