"""Receiver and sender statistics: RFC 3550 A.1 sequence validation, A.3 loss, A.8 jitter, LSR/DLSR."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sip.rtcp import (
    ReceiverReport,
    SenderReport,
    build_compound,
    ntp_middle,
    ntp_timestamp,
    parse_compound,
    round_trip_time,
)
from sip.rtpstats import MAX_DROPOUT, ReceiverStatistics, SenderStatistics, SourceStatistics


def feed(stats: SourceStatistics, sequences) -> list[bool]:
    return [stats.update_sequence(seq & 0xFFFF) for seq in sequences]


def test_probation_needs_two_sequential_packets() -> None:
    stats = SourceStatistics(1, 1000, 8000)
    assert feed(stats, [1000, 1001, 1002]) == [False, True, True]
    # the source is valid from its second packet, which is where counting starts
    assert stats.base_seq == 1001
    assert stats.received == 2
    assert stats.expected == 2
    assert stats.cumulative_lost == 0


def test_probation_restarts_on_a_gap() -> None:
    stats = SourceStatistics(1, 10, 8000)
    assert feed(stats, [10, 12, 13, 14]) == [False, False, True, True]
    assert stats.base_seq == 13


def test_wrap_around_counts_cycles() -> None:
    stats = SourceStatistics(1, 65533, 8000)
    feed(stats, [65533, 65534, 65535, 0, 1, 2])
    assert stats.cycles == 1 << 16
    assert stats.extended_max == (1 << 16) + 2
    assert stats.expected == 5
    assert stats.cumulative_lost == 0


def test_loss_across_wrap_around() -> None:
    stats = SourceStatistics(1, 65530, 8000)
    feed(stats, [65530, 65531, 65532, 65535, 1, 2])  # 65533, 65534 and 0 lost
    assert stats.extended_max == (1 << 16) + 2
    assert stats.cumulative_lost == 3


def test_misordered_and_duplicate_packets_are_counted_not_jumps() -> None:
    stats = SourceStatistics(1, 100, 8000)
    feed(stats, [100, 101, 103, 102, 104, 104])
    assert stats.max_seq == 104 and stats.cycles == 0
    assert stats.received == 5  # 101..104 plus the duplicate
    assert stats.cumulative_lost == -1  # A.3: duplicates can make loss negative


def test_large_jump_is_accepted_only_when_the_next_packet_confirms_it() -> None:
    stats = SourceStatistics(1, 10, 8000)
    feed(stats, [10, 11, 12])
    jump = 12 + MAX_DROPOUT + 500
    assert stats.update_sequence(jump) is False  # one odd packet: ignored
    assert stats.update_sequence(13) is True  # stream goes on as before
    assert stats.max_seq == 13
    assert feed(stats, [jump, jump + 1, jump + 2]) == [False, True, True]  # confirmed: resync
    assert stats.base_seq == jump + 1
    assert stats.received == 2
    assert stats.cumulative_lost == 0


def test_a_big_step_back_beyond_misorder_is_treated_as_a_jump() -> None:
    stats = SourceStatistics(1, 5000, 8000)
    feed(stats, [5000, 5001, 5002])
    assert feed(stats, [1000, 1001]) == [False, True]
    assert stats.max_seq == 1001 and stats.cycles == 0


def test_interval_loss_fraction_and_report_block() -> None:
    stats = SourceStatistics(0xABC, 0, 8000)
    feed(stats, [0] + [s for s in range(1, 101) if s % 10 != 5])  # 10 of 100 lost
    block = stats.report_block(now=1.0)
    assert block.ssrc == 0xABC
    assert block.cumulative_lost == 10
    assert block.highest_sequence == 100
    assert block.fraction_lost == (10 << 8) // 100
    feed(stats, range(101, 201))  # a clean interval
    block = stats.report_block(now=2.0)
    assert block.fraction_lost == 0
    assert block.cumulative_lost == 10
    assert block.lsr == 0 and block.dlsr == 0


def test_jitter_is_zero_for_steady_arrival_and_tracks_variation() -> None:
    steady = SourceStatistics(1, 0, 8000)
    for i in range(100):
        steady.update_jitter(i * 160, 5.0 + i * 0.020)
    assert steady.jitter == pytest.approx(0.0, abs=1e-6)
    varying = SourceStatistics(1, 0, 8000)
    for i in range(500):
        varying.update_jitter(i * 160, 5.0 + i * 0.020 + (0.010 if i % 2 else 0.0))
    # |D| is 80 samples (10 ms) every packet, so J converges to 80 (A.8)
    assert varying.jitter == pytest.approx(80.0, rel=1e-3)
    assert varying.jitter_seconds == pytest.approx(0.010, rel=1e-3)


def test_jitter_survives_timestamp_wrap_around() -> None:
    stats = SourceStatistics(1, 0, 8000)
    start = 0xFFFFFFFF - 800
    for i in range(40):
        stats.update_jitter((start + i * 160) & 0xFFFFFFFF, 100.0 + i * 0.020)
    assert stats.jitter == pytest.approx(0.0, abs=1e-3)


def test_lsr_and_dlsr_from_a_received_sender_report() -> None:
    stats = SourceStatistics(7, 0, 8000)
    ntp = ntp_timestamp(1_700_000_000.0)
    stats.on_sender_report(ntp, arrival=10.0)
    block = stats.report_block(now=10.5)
    assert block.lsr == ntp_middle(ntp)
    assert block.dlsr == 32768  # 0.5 s in 1/65536 s


def test_round_trip_from_a_constructed_sr_rr_exchange_over_the_wire() -> None:
    """Alice sends an SR; Bob answers 0.3 s later with an RR; the network takes 40 ms each way."""
    one_way = 0.040
    alice_wall = 1_700_000_000.0  # Alice's clock when she sends the SR
    bob_clock = 500.0  # Bob's own, unrelated monotonic clock
    sr = SenderReport(0xA11CE, ntp_timestamp(alice_wall), 1234, 10, 1600)
    bob = ReceiverStatistics(8000)
    for i in range(10):
        bob.update(0xA11CE, 100 + i, i * 160, bob_clock - 1 + i * 0.02, 160)
    (received_sr,) = parse_compound(build_compound([sr]))
    bob.on_sender_report(received_sr.ssrc, received_sr.ntp_timestamp, bob_clock + one_way)
    rr = ReceiverReport(0xB0B, bob.report_blocks(bob_clock + one_way + 0.3))
    (received_rr,) = parse_compound(build_compound([rr]))
    block = received_rr.reports[0]
    arrival = ntp_middle(ntp_timestamp(alice_wall + one_way + 0.3 + one_way))
    assert round_trip_time(arrival, block.lsr, block.dlsr) == pytest.approx(2 * one_way, abs=1e-4)


def test_receiver_statistics_restart_on_ssrc_change_and_keep_losses() -> None:
    receiver = ReceiverStatistics(8000)
    for seq in [0, 1, 2, 4, 5]:  # 3 lost
        receiver.update(1, seq, seq * 160, seq * 0.02, 160)
    assert receiver.packets_lost == 1
    for seq in [900, 901, 902, 904]:  # new source, 903 lost
        receiver.update(2, seq, seq * 160, 1 + seq * 0.02, 160)
    assert receiver.ssrc_changes == 1
    assert receiver.source is not None and receiver.source.ssrc == 2
    assert receiver.packets_lost == 2
    assert receiver.octets == 9 * 160
    # an SR from the old source is no longer ours to answer
    receiver.on_sender_report(1, ntp_timestamp(0.0), 5.0)
    assert receiver.source.last_sr == 0


def test_dtmf_packets_do_not_disturb_jitter() -> None:
    receiver = ReceiverStatistics(8000)
    for i in range(50):
        receiver.update(1, i, i * 160, i * 0.02, 160)
        # an event repeats one timestamp while time moves on
        receiver.update(1, 1000 + i, 4000, i * 0.02, 4, measure_jitter=False)
    assert receiver.jitter_seconds == pytest.approx(0.0, abs=1e-6)


def test_sender_statistics_extrapolate_the_media_clock() -> None:
    sender = SenderStatistics(8000)
    assert sender.rtp_timestamp_at(1.0) == 0
    sender.on_sent(160, now=10.0, rtp_timestamp=0xFFFFFF00)
    sender.on_sent(4, now=10.01)  # an event packet: counted, not a clock reference
    assert sender.packet_count == 2 and sender.octet_count == 164
    assert sender.rtp_timestamp_at(10.1) == (0xFFFFFF00 + 800) & 0xFFFFFFFF


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(st.integers(0xFFF8, 0xFFFF), st.integers(0, 0xFFFF)),
    st.lists(
        st.tuples(
            st.sampled_from([1, 1, 1, 1, 1, 0, 2, -1, 3, -3]), st.integers(0, 19), st.booleans(), st.floats(0.0, 0.05)
        ),
        max_size=150,
    ),
)
def test_the_receivers_inline_path_keeps_the_reference_accounting(first, steps) -> None:
    """ReceiverStatistics counts the usual packet (the next in sequence) inline: whatever
    comes, its state stays what A.1's update_seq and A.8's jitter make of the same packets."""
    stats = ReceiverStatistics(8000)
    reference: SourceStatistics | None = None
    sequence, timestamp, arrival = first, 1000, 0.0
    for step, jump, jitter, delay in steps:
        if jump == 0:
            step += 4000  # beyond MAX_DROPOUT: a jump to be confirmed
        sequence = (sequence + step) & 0xFFFF
        timestamp = (timestamp + 160 * step) & 0xFFFFFFFF
        arrival += 0.02 * max(step, 0) + delay
        valid = stats.update(7, sequence, timestamp, arrival, 160, measure_jitter=jitter)
        if reference is None:  # the receiver starts a source at its first packet
            reference = SourceStatistics(7, sequence, 8000)
        assert valid == reference.update_sequence(sequence)
        if jitter:
            reference.update_jitter(timestamp, arrival)
        source = stats.source
        assert source is not None
        assert [getattr(source, name) for name in SourceStatistics.__slots__] == [
            getattr(reference, name) for name in SourceStatistics.__slots__
        ]
