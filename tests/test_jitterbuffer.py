"""Jitter buffer scenarios, on simulated packet traces and on a real capture."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sip.jitterbuffer import CONCEAL, JitterBuffer, TransitWindow
from sip.rtp import RtpPacket
from tests.support.pcap import read_udp

PTIME = 0.020
STEP = 160


def packet(index: int, ssrc: int = 0x1234, ts0: int = 1000, seq0: int = 0) -> RtpPacket:
    """The packet for frame ``index``; its payload names the frame so playout order is visible."""
    return RtpPacket(
        0, (seq0 + index) & 0xFFFF, (ts0 + index * STEP) & 0xFFFFFFFF, ssrc, index.to_bytes(4, "big") + bytes(156)
    )


def frame_of(payload: bytes) -> int:
    return int.from_bytes(payload[:4], "big")


@dataclass
class Run:
    """The outcome of feeding a trace: what each pop returned, and when."""

    pops: list[tuple[float, object]] = field(default_factory=list)
    arrivals: dict[int, float] = field(default_factory=dict)

    @property
    def played(self) -> list[int]:
        return [frame_of(r) for _, r in self.pops if isinstance(r, bytes)]

    def play_time(self, frame: int) -> float:
        return next(t for t, r in self.pops if isinstance(r, bytes) and frame_of(r) == frame)

    def results_after_start(self) -> list[object]:
        first = next(i for i, (_, r) in enumerate(self.pops) if isinstance(r, bytes))
        return [r for _, r in self.pops[first:]]

    def concealed_until(self, frame: int) -> int:
        """CONCEAL results from the first played frame up to the one that played ``frame``."""
        results = self.results_after_start()
        last = max(i for i, r in enumerate(results) if isinstance(r, bytes) and frame_of(r) == frame)
        return sum(r is CONCEAL for r in results[:last])


def simulate(jb: JitterBuffer, arrivals: list[tuple[float, RtpPacket]], until: float, pop_phase: float = 0.007) -> Run:
    """Deliver packets at their arrival times and pop every 20 ms, in time order."""
    events = sorted(arrivals, key=lambda a: a[0])
    run = Run()
    pop_time = pop_phase
    i = 0
    while pop_time <= until:
        while i < len(events) and events[i][0] <= pop_time:
            arrival, pkt = events[i]
            jb.put(pkt, arrival)
            run.arrivals.setdefault(frame_of(pkt.payload), arrival)
            i += 1
        run.pops.append((pop_time, jb.pop(pop_time)))
        pop_time += PTIME
    return run


def steady(count: int, delay: float = 0.030, skip: frozenset[int] = frozenset(), **kw) -> list:
    return [(i * PTIME + delay, packet(i, **kw)) for i in range(count) if i not in skip]


def test_clean_line_plays_everything_in_order_at_the_floor_delay() -> None:
    jb = JitterBuffer()
    run = simulate(jb, steady(200), until=4.2)
    assert run.played == list(range(200))
    assert run.concealed_until(199) == 0 and jb.packets_late == 0
    holds = [run.play_time(i) - run.arrivals[i] for i in range(200)]
    # each frame plays 10-30 ms after it arrives (the 20 ms floor, rounded to the pop grid)
    assert all(0.010 - 1e-9 <= h < 0.030 + 1e-9 for h in holds)
    assert len(set(round(h, 6) for h in holds)) == 1  # and always the same: no drift, no steps
    stats = jb.stats()
    assert 10 <= stats.delay_ms <= 30 and stats.target_delay_ms == pytest.approx(20)


@pytest.mark.parametrize("phase", [0.0, 0.003, 0.011, 0.0199])
def test_playout_starts_within_a_frame_of_the_floor_whatever_the_pop_phase(phase: float) -> None:
    jb = JitterBuffer()
    run = simulate(jb, steady(20), until=0.6, pop_phase=phase)
    hold = run.play_time(0) - run.arrivals[0]
    assert 0.010 - 1e-9 <= hold < 0.030 + 1e-9


def test_a_lost_packet_is_one_concealed_frame_on_time_and_nothing_more() -> None:
    jb = JitterBuffer()
    lost = 50
    run = simulate(jb, steady(200, skip=frozenset({lost})), until=4.2)
    results = run.results_after_start()
    assert results[lost] is CONCEAL  # exactly in the lost frame's slot
    assert [frame_of(r) for r in results[lost + 1 : lost + 4]] == [51, 52, 53]  # no stall after it
    assert run.concealed_until(199) == 1 and jb.frames_played == 199
    # the frames after the loss play with the same delay as before it
    assert run.play_time(60) - run.arrivals[60] == pytest.approx(run.play_time(40) - run.arrivals[40])


def test_heavy_random_loss_costs_exactly_the_lost_frames() -> None:
    rng = random.Random(7)
    lost = frozenset(i for i in range(1000) if rng.random() < 0.2)
    jb = JitterBuffer()
    simulate(jb, steady(1000, skip=lost), until=20.2)
    assert jb.frames_played == 1000 - len(lost)
    assert jb.packets_late == jb.packets_discarded == jb.packets_overflow == jb.frames_dropped == 0
    assert jb.stats().delay_ms < 31  # the delay stays at the floor: loss is not jitter


def test_reordered_packets_are_absorbed() -> None:
    arrivals = steady(100)
    # frame 31 overtakes frame 30 by 8 ms; frame 61 is 15 ms early relative to 60
    arrivals[30] = (arrivals[30][0] + 0.008, arrivals[30][1])
    arrivals[60] = (arrivals[61][0] + 0.001, arrivals[60][1])
    jb = JitterBuffer(min_delay_ms=30)
    run = simulate(jb, arrivals, until=2.2)
    assert run.played == list(range(100))
    assert run.concealed_until(99) == 0 and jb.packets_late == 0


def test_reordering_at_the_very_start() -> None:
    arrivals = steady(30)
    arrivals[0], arrivals[1] = (arrivals[1][0] + 0.001, arrivals[0][1]), (arrivals[1][0], arrivals[1][1])
    jb = JitterBuffer()
    run = simulate(jb, arrivals, until=0.8)
    assert run.played == list(range(30))


def test_duplicates_are_dropped_and_counted() -> None:
    arrivals = steady(100)
    arrivals.append((arrivals[20][0] + 0.002, packet(20)))  # duplicated in the network, before playout
    arrivals.append((arrivals[40][0] + 0.200, packet(40)))  # a copy long after playout
    jb = JitterBuffer()
    run = simulate(jb, arrivals, until=2.5)
    assert run.played == list(range(100))
    assert jb.packets_duplicate == 2 and jb.packets_late == 0


def test_a_late_packet_is_concealed_on_time_then_dropped_as_late() -> None:
    arrivals = steady(400)
    arrivals[300] = (arrivals[300][0] + 0.150, arrivals[300][1])
    jb = JitterBuffer()
    run = simulate(jb, arrivals, until=8.5)
    results = run.results_after_start()
    assert results[300] is CONCEAL
    assert jb.packets_late == 1
    assert 300 not in run.played
    assert jb.frames_played == 399
    assert jb.stats().delay_ms < 31  # one outlier among hundreds does not raise the delay


def test_resync_on_ssrc_change() -> None:
    first = steady(100)
    second = [(2.0 + i * PTIME + 0.030, packet(1000 + i, ssrc=0x9999, ts0=777777, seq0=40000)) for i in range(100)]
    stale = [(2.1, packet(99, ssrc=0x1234))]  # an old-stream packet after the switch
    jb = JitterBuffer()
    run = simulate(jb, first + second + stale, until=4.2)
    assert run.played == list(range(100)) + list(range(1000, 1100))
    assert jb.resyncs == 1
    assert jb.packets_discarded == 1
    # the new stream starts at the floor delay again
    assert 0.010 - 1e-9 <= run.play_time(1000) - run.arrivals[1000] < 0.030 + 1e-9


def test_resync_on_a_confirmed_timestamp_jump() -> None:
    before = steady(100)
    # same SSRC, timestamps restart 10 s (80000 samples) ahead: e.g. a re-anchored media relay
    after = [(2.0 + i * PTIME + 0.030, packet(100 + i, ts0=1000 + 80000 + 100 * STEP)) for i in range(100)]
    jb = JitterBuffer()
    run = simulate(jb, before + after, until=4.2)
    assert jb.resyncs == 1
    assert run.played == list(range(200))


def test_a_single_wild_timestamp_does_not_derail_the_stream() -> None:
    arrivals = steady(200)
    wild = packet(100)
    wild.timestamp = (wild.timestamp + 5_000_000) & 0xFFFFFFFF
    arrivals[100] = (arrivals[100][0], wild)
    off_grid = packet(150)
    off_grid.timestamp += 7
    arrivals[150] = (arrivals[150][0], off_grid)
    jb = JitterBuffer()
    run = simulate(jb, arrivals, until=4.2)
    assert jb.resyncs == 0
    assert jb.packets_discarded == 2
    assert run.played == [i for i in range(200) if i not in (100, 150)]
    assert run.concealed_until(199) == 2


def test_timestamp_wrap_around_is_seamless() -> None:
    jb = JitterBuffer()
    run = simulate(jb, steady(100, ts0=0xFFFFFFFF - 50 * STEP + 1), until=2.2)
    assert run.played == list(range(100)) and jb.resyncs == 0


def test_depth_is_bounded_and_overflow_drops_the_oldest() -> None:
    # 2 s of audio arrive in one burst after a stall (e.g. a sender flushing its queue)
    burst = [(1.0 + i * 1e-5, packet(i)) for i in range(100)]
    jb = JitterBuffer(max_delay_ms=200)
    run = simulate(jb, burst, until=1.6)
    assert jb.depth <= jb.max_depth
    assert jb.packets_overflow == 100 - jb.max_depth
    # what is played is the newest audio, in order, without gaps; the rest is counted
    assert run.played == list(range(run.played[0], 100))
    assert run.played[0] >= 100 - jb.max_depth
    assert jb.packets_overflow + jb.packets_discarded + len(run.played) == 100


def test_stream_end_goes_idle_and_a_new_talkspurt_starts_at_the_floor() -> None:
    first = steady(50)
    # the sender pauses 3 s (DTX / hold) with its clock running, then talks again
    second = [(i * PTIME + 0.030, packet(i)) for i in range(200, 250)]
    jb = JitterBuffer()
    run = simulate(jb, first + second, until=5.5)
    assert run.played == list(range(50)) + list(range(200, 250))
    idle = [r for _, r in run.pops if r is None]
    assert len(idle) > 100
    # concealment only until the stream is declared idle (400 ms), then silence
    assert run.concealed_until(249) == jb.idle_frames - 1
    assert jb.resyncs == 0
    assert 0.010 - 1e-9 <= run.play_time(200) - run.arrivals[200] < 0.030 + 1e-9


def jittery(count: int, start: int, rng: random.Random, spread: float, base: float = 0.030) -> list:
    """Independent per-packet delays, uniform in [base, base + spread]: reordering happens."""
    return [(i * PTIME + base + rng.uniform(0, spread), packet(i)) for i in range(start, start + count)]


def test_delay_grows_when_jitter_appears_and_shrinks_slowly_when_it_goes() -> None:
    rng = random.Random(1)
    clean1 = jittery(250, 0, rng, 0.002)  # 5 s clean
    rough = jittery(1000, 250, rng, 0.080)  # 20 s with 0-80 ms jitter
    clean2 = jittery(2000, 1250, rng, 0.002)  # 40 s clean again
    jb = JitterBuffer()
    delays = []
    events = sorted(clean1 + rough + clean2, key=lambda a: a[0])
    pop_time, i = 0.005, 0
    late_at = {}
    while pop_time < 66:
        while i < len(events) and events[i][0] <= pop_time:
            jb.put(events[i][1], events[i][0])
            i += 1
        jb.pop(pop_time)
        delays.append((pop_time, jb.delay))
        late_at[round(pop_time, 3)] = jb.packets_late
        pop_time += PTIME

    def delay_at(t: float) -> float:
        return min(delays, key=lambda d: abs(d[0] - t))[1]

    assert delay_at(4.9) < 0.031
    assert delay_at(9.0) > 0.070  # grown to cover the jitter within a few seconds
    assert max(d for _, d in delays) <= 0.200 + PTIME  # never beyond the ceiling (plus the grid)
    # once adapted, hardly anything is late: 10 s to 25 s
    late_rough = (
        late_at[round(min(late_at, key=lambda t: abs(t - 25.0)), 3)]
        - late_at[round(min(late_at, key=lambda t: abs(t - 10.0)), 3)]
    )
    assert late_rough < 0.03 * 750
    assert delay_at(26.0) > 0.070  # still high right after the jitter stops: shrinking is slow
    assert delay_at(64.0) < 0.031  # and back to the floor in the end
    stats = jb.stats()
    assert stats.frames_inserted > 0 and (stats.frames_dropped + stats.slots_skipped) > 0
    # every packet is accounted for: played, late, or dropped one frame at a time to shrink
    assert (
        stats.frames_played
        + stats.packets_late
        + stats.frames_dropped
        + stats.packets_discarded
        + stats.packets_overflow
        + jb.depth
        == 3250
    )


def test_delay_never_exceeds_the_ceiling() -> None:
    rng = random.Random(3)
    jb = JitterBuffer(max_delay_ms=120)
    events = jittery(1500, 0, rng, 0.500)
    run = simulate(jb, events, until=31)
    assert jb.stats().target_delay_ms <= 120 + 1e-6
    holds = [run.play_time(f) - run.arrivals[f] for f in run.played[200:]]
    assert max(holds) <= 0.120 + PTIME + 1e-9


def test_silence_is_where_the_delay_shrinks() -> None:
    """With a silence detector, excess delay is removed in silent frames only."""
    rng = random.Random(5)
    silent_frames = set(range(1000, 3000, 10))

    def is_silent(payload: bytes) -> bool:
        return frame_of(payload) in silent_frames

    jb = JitterBuffer(is_silent=is_silent, shrink_patience_ms=60_000)
    rough = jittery(500, 0, rng, 0.080)
    clean = jittery(2500, 500, rng, 0.001)
    run = simulate(jb, rough + clean, until=60.5)
    missing = set(range(3000)) - set(run.played)
    dropped = {f for f in missing if f not in silent_frames and f >= 1000}
    assert not dropped  # no speech frame was dropped to shrink
    assert jb.frames_dropped > 0
    assert jb.stats().delay_ms < 31


def test_real_capture_with_30_ms_packets() -> None:
    """The sipp G.711 A-law capture (30 ms packets, real capture timing) plays out completely."""
    datagrams = read_udp(Path("/usr/share/sip-tester/g711a.pcap"))
    t0 = datagrams[0].time
    jb = JitterBuffer(ptime_ms=30)
    packets = [(d.time - t0, RtpPacket.parse(d.payload)) for d in datagrams]
    played, concealed_in_stream, pop_time, i = [], 0, 0.004, 0
    while pop_time < packets[-1][0] + 0.3:
        while i < len(packets) and packets[i][0] <= pop_time:
            jb.put(packets[i][1], packets[i][0])
            i += 1
        result = jb.pop(pop_time)
        if isinstance(result, bytes):
            played.append(result)
        elif result is CONCEAL and i < len(packets):
            concealed_in_stream += 1
        pop_time += 0.030
    assert played == [p.payload for _, p in packets]
    assert jb.packets_late == 0 and concealed_in_stream == 0


def test_invalid_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="ptime"):
        JitterBuffer(ptime_ms=0.01)
    with pytest.raises(ValueError, match="min_delay_ms"):
        JitterBuffer(min_delay_ms=300, max_delay_ms=200)
    with pytest.raises(ValueError, match="quantile"):
        JitterBuffer(quantile=0.1)


def test_pop_before_any_packet_is_idle() -> None:
    jb = JitterBuffer()
    assert jb.pop(0.0) is None
    assert jb.stats().frames_played == 0


def test_resync_when_timestamps_jump_backwards_beyond_the_window() -> None:
    before = steady(100)
    # the sender's timestamps go 600 ms back in time (a restarted encoder, same SSRC)
    after = [(i * PTIME + 0.030, packet(i, ts0=1000 - 4800)) for i in range(100, 200)]
    jb = JitterBuffer()
    run = simulate(jb, before + after, until=4.2)
    assert jb.resyncs == 1
    assert run.played[:100] == list(range(100))
    assert run.played[100:] == list(range(100, 200))  # the confirming pair plays too
    # playing the pair that confirmed the jump costs at most one frame of delay, for a while
    assert 0.010 - 1e-9 <= run.play_time(150) - run.arrivals[150] < 0.030 + PTIME + 1e-9


def test_a_network_stall_and_burst_raises_the_delay_for_a_while_only() -> None:
    arrivals = steady(1500)
    burst_at = 200 * PTIME + 0.030 + 0.500  # 500 ms of silence on the wire, then everything at once
    for i in range(200, 226):
        arrivals[i] = (max(arrivals[i][0], burst_at + (i - 200) * 1e-5), arrivals[i][1])
    jb = JitterBuffer()
    run = simulate(jb, arrivals, until=30.2)
    # after the burst frames play in order, never later than the ceiling allows; the only
    # ones missing were dropped one at a time to bring the delay back down
    tail = run.played[run.played.index(230) :]
    assert tail == sorted(tail) and tail[-1] == 1499
    assert 1270 - len(tail) <= jb.frames_dropped and jb.packets_late == 0
    assert all(run.play_time(f) - run.arrivals[f] <= 0.200 + PTIME for f in tail)
    # a stall is evidence of jitter: the delay stays up while it is in the window (10 s),
    # then comes back down to the floor
    assert run.play_time(400) - run.arrivals[400] > 0.100
    assert all(run.play_time(f) - run.arrivals[f] < 0.030 + 1e-9 for f in tail if f >= 1100)


@st.composite
def hostile_traces(draw):
    """Packets of up to two SSRCs with jitter, loss, duplicates, wild timestamps and bursts."""
    count = draw(st.integers(1, 150))
    arrivals = []
    for i in range(count):
        if draw(st.integers(0, 9)) == 0:
            continue  # lost
        ssrc = 0x1234 if i < count // 2 or not draw(st.booleans()) else 0x5678
        pkt = packet(i, ssrc=ssrc)
        kind = draw(st.integers(0, 19))
        if kind == 0:
            pkt.timestamp = draw(st.integers(0, 0xFFFFFFFF))
        elif kind == 1:
            pkt.timestamp = (pkt.timestamp + draw(st.integers(-3, 3))) & 0xFFFFFFFF
        at = i * PTIME + draw(st.floats(0, 0.6 if kind == 2 else 0.08))
        arrivals.append((at, pkt))
        if kind == 3:
            arrivals.append((at + draw(st.floats(0, 0.3)), pkt))  # duplicate
    return arrivals


@settings(max_examples=300, deadline=None)
@given(hostile_traces(), st.floats(0, PTIME))
def test_any_trace_is_played_in_order_and_every_packet_is_accounted_for(arrivals, phase) -> None:
    jb = JitterBuffer()
    run = simulate(jb, arrivals, until=4.5, pop_phase=phase)
    # without a resync, frames play strictly in order, each at most once
    if jb.resyncs == 0:
        assert run.played == sorted(set(run.played))
    stats = jb.stats()
    assert (
        stats.frames_played
        + stats.packets_late
        + stats.packets_duplicate
        + stats.packets_discarded
        + stats.packets_overflow
        + stats.frames_dropped
        + stats.depth
        == stats.packets_received
        == len(arrivals)
    )
    assert stats.depth <= jb.max_depth + 1
    assert 0 <= stats.target_delay_ms <= 200 + 1e-6


def test_a_duplicated_wild_packet_does_not_count_as_confirmation() -> None:
    arrivals = steady(200)
    wild = packet(100)
    wild.timestamp = (wild.timestamp + 5_000_000) & 0xFFFFFFFF
    arrivals[100] = (arrivals[100][0], wild)
    arrivals.append((arrivals[100][0] + 0.001, wild))
    jb = JitterBuffer()
    run = simulate(jb, arrivals, until=4.2)
    assert jb.resyncs == 0
    assert run.played == [i for i in range(200) if i != 100]


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 120),
    st.sampled_from([0.5, 0.9, 0.99, 1.0]),
    st.lists(st.floats(-1.0, 1.0, allow_nan=False), min_size=1, max_size=400),
)
def test_the_transit_window_is_exact_over_the_packets_it_holds(size, quantile, transits) -> None:
    window = TransitWindow(size, quantile)
    for seen, transit in enumerate(transits, 1):
        window.add(transit)
        held = transits[seen - window.count : seen]
        # the last packets, up to `size` rounded down to whole blocks, and at most a block
        # fewer once that many came
        most = window.blocks * window.block
        assert window.count == len(held) <= most <= size and most > size - window.block
        assert window.count >= min(seen, most - window.block + 1)
        ordered = sorted(held)
        assert window.fastest == ordered[0]
        assert window.high() == ordered[min(len(held) - 1, int(quantile * len(held)))]
