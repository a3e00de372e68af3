"""RFC 4733 telephone-events: payload format, receiver (each digit once), sender, real captures."""

from __future__ import annotations

from pathlib import Path

import pytest

from sip.dtmf import (
    DtmfParseError,
    DtmfReceiver,
    DtmfSender,
    TelephoneEvent,
    event_code,
    event_name,
)
from sip.rtp import RtpPacket
from tests.support.pcap import read_udp

CAPTURES = Path("/usr/share/sip-tester")


def test_payload_round_trip_and_layout() -> None:
    event = TelephoneEvent(event=11, end=True, volume=10, duration=800)
    data = event.build()
    assert data == bytes([11, 0x80 | 10, 0x03, 0x20])
    assert TelephoneEvent.parse(data) == event
    assert TelephoneEvent.parse(bytes([5, 0x4A, 0, 0])) == TelephoneEvent(5, False, 10, 0)  # R bit ignored
    assert event.digit == "#"


def test_payload_errors() -> None:
    with pytest.raises(DtmfParseError, match="needs 4"):
        TelephoneEvent.parse(b"\x01\x0a")
    with pytest.raises(ValueError):
        TelephoneEvent(1, volume=64).build()
    with pytest.raises(ValueError):
        TelephoneEvent(1, duration=70000).build()


def test_event_names() -> None:
    assert [event_code(d) for d in "0123456789*#ABCD"] == list(range(16))
    assert event_code("a") == 12
    assert event_name(16) == "flash" and event_name(200) == "event-200"
    with pytest.raises(ValueError):
        event_code("E")


def packets_for(digit: str, duration_ms: float, timestamp: int, seq0: int = 0, **sender_kw) -> list[tuple]:
    """(arrival, RtpPacket) as a sender would put them on the wire, starting at time 10 s."""
    out = []
    for i, p in enumerate(DtmfSender(**sender_kw).packets(digit, duration_ms)):
        rtp = RtpPacket(101, seq0 + i, timestamp, 0x42, p.payload, marker=p.marker)
        out.append((10.0 + timestamp / 8000 + p.offset, rtp))
    return out


def test_sender_produces_start_updates_and_three_ends() -> None:
    sequence = DtmfSender().packets("5", 160)
    events = [TelephoneEvent.parse(p.payload) for p in sequence]
    assert sequence[0].marker and not any(p.marker for p in sequence[1:])
    assert [p.offset for p in sequence] == pytest.approx([0, 0.05, 0.10, 0.15, 0.16, 0.18, 0.20])
    assert [e.duration for e in events] == [0, 400, 800, 1200, 1280, 1280, 1280]
    assert [e.end for e in events] == [False] * 4 + [True] * 3
    assert {e.event for e in events} == {5}
    with pytest.raises(ValueError):
        DtmfSender().packets("5", 9000)


def test_receiver_reports_each_digit_once_with_its_duration() -> None:
    seen = []
    receiver = DtmfReceiver(on_digit=seen.append)
    digits = []
    for arrival, rtp in packets_for("7", 120, timestamp=1600) + packets_for("#", 200, timestamp=8000, seq0=50):
        digits += receiver.receive(rtp, arrival)
    assert [(d.digit, d.duration_ms, d.ended_by) for d in digits] == [("7", 120.0, "end"), ("#", 200.0, "end")]
    assert seen == digits
    assert receiver.digits_received == 2 and not receiver.active


def test_lost_end_packets_end_the_digit_at_the_next_event() -> None:
    receiver = DtmfReceiver()
    first = [(a, p) for a, p in packets_for("1", 150, timestamp=0) if not TelephoneEvent.parse(p.payload).end]
    digits = []
    for arrival, rtp in first + packets_for("2", 100, timestamp=4000, seq0=20):
        digits += receiver.receive(rtp, arrival)
    assert [(d.digit, d.ended_by) for d in digits] == [("1", "new-event"), ("2", "end")]
    assert digits[0].duration_ms == pytest.approx(100.0)  # the last update heard said 100 ms


def test_lost_end_packets_end_the_digit_after_a_timeout() -> None:
    receiver = DtmfReceiver(timeout_ms=500)
    last_arrival = 0.0
    for arrival, rtp in packets_for("9", 200, timestamp=0):
        if not TelephoneEvent.parse(rtp.payload).end:
            assert receiver.receive(rtp, arrival) == []
            last_arrival = arrival
    assert receiver.poll(last_arrival + 0.4) == []
    (digit,) = receiver.poll(last_arrival + 0.5)
    assert (digit.digit, digit.ended_by) == ("9", "timeout")
    assert receiver.poll(last_arrival + 5) == []


def test_repeated_and_reordered_packets_do_not_repeat_a_digit() -> None:
    receiver = DtmfReceiver()
    sequence = packets_for("4", 100, timestamp=0)
    # the network duplicates everything and delivers one update after the ends
    shuffled = [x for pair in zip(sequence, sequence, strict=True) for x in pair]
    shuffled.append(sequence[1])
    digits = [d for arrival, rtp in shuffled for d in receiver.receive(rtp, arrival)]
    assert [d.digit for d in digits] == ["4"]


def test_only_end_packets_received_still_give_the_digit() -> None:
    receiver = DtmfReceiver()
    ends = [(a, p) for a, p in packets_for("0", 80, timestamp=0) if TelephoneEvent.parse(p.payload).end]
    digits = [d for arrival, rtp in ends for d in receiver.receive(rtp, arrival)]
    assert [(d.digit, d.duration_ms) for d in digits] == [("0", 80.0)]


def test_malformed_event_payload_is_counted() -> None:
    receiver = DtmfReceiver()
    assert receiver.receive(RtpPacket(101, 1, 0, 1, b"\x01"), 0.0) == []
    assert receiver.packets_malformed == 1


def capture_digits(name: str) -> list:
    receiver = DtmfReceiver()
    digits = []
    for datagram in read_udp(CAPTURES / name):
        digits += receiver.receive(RtpPacket.parse(datagram.payload), datagram.time)
    return digits + receiver.poll(float("inf"))


def test_real_capture_dtmf_2833_1_yields_exactly_one_digit_1() -> None:
    (digit,) = capture_digits("dtmf_2833_1.pcap")
    assert digit.digit == "1" and digit.ended_by == "end"
    assert 40 <= digit.duration_ms <= 2000
    assert digit.duration_ms == pytest.approx(280.0)  # 2240 samples in the end packets


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        *[(f"dtmf_2833_{d}.pcap", str(d)) for d in range(10)],
        ("dtmf_2833_star.pcap", "*"),
        ("dtmf_2833_pound.pcap", "#"),
    ],
)
def test_every_capture_gives_its_digit_once(name: str, expected: str) -> None:
    assert [d.digit for d in capture_digits(name)] == [expected]


# --- DTMF in SIP INFO ------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type, body, digit, duration",
    [
        ("application/dtmf-relay", b"Signal=5\r\nDuration=160\r\n", "5", 160.0),
        ("application/dtmf-relay", b"signal= *\nduration = 250", "*", 250.0),
        ("application/dtmf-relay", b"Signal=11\r\nDuration=100", "#", 100.0),
        ("application/dtmf-relay", b"Signal=d\r\n", "D", None),
        ("application/dtmf-relay", b"Signal=16\r\nDuration=500\r\nVolume=10", "flash", 500.0),
        ("application/dtmf", b"7", "7", None),
        ("application/dtmf", b" #\r\n", "#", None),
    ],
)
def test_info_dtmf_bodies_give_their_digit(content_type, body, digit, duration):
    from sip.dtmf import InfoDigit, parse_info_dtmf

    assert parse_info_dtmf(content_type, body) == InfoDigit(digit, duration)


@pytest.mark.parametrize(
    "content_type, body, problem",
    [
        ("application/dtmf-relay", b"", "empty"),
        ("application/dtmf-relay", b"Duration=160", "no Signal"),
        ("application/dtmf-relay", b"Signal=Z\r\nDuration=160", "not a DTMF digit"),
        ("application/dtmf-relay", b"Signal=17", "not a DTMF digit"),
        ("application/dtmf-relay", b"Signal=5\r\nDuration=-3", "Duration"),
        ("application/dtmf-relay", b"Signal=5\r\nDuration=99999999", "Duration"),
        ("application/dtmf-relay", b"Signal=5\r\ngarbage", "Key=value"),
        ("application/dtmf-relay", "Signal=５".encode(), "ASCII"),
        ("application/dtmf-relay", b"Signal=5\r\n" + b"X=" + b"y" * 300, "at most"),
        ("application/dtmf", b"55", "not a DTMF digit"),
        ("text/plain", b"5", "not a DTMF body type"),
    ],
)
def test_bad_info_dtmf_bodies_are_refused_with_the_reason(content_type, body, problem):
    from sip.dtmf import DtmfParseError, parse_info_dtmf

    with pytest.raises(DtmfParseError, match=problem):
        parse_info_dtmf(content_type, body)
