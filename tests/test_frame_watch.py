"""The hung-worker judgement from the frame stream (service/gateway/calls/frame_watch.py), in
virtual time: a worker that owes frames past the threshold is stalled; one that is sent
nothing, or is merely slow, is not."""

from __future__ import annotations

import pytest

from service.gateway.calls.frame_watch import FIRST_FRAME_SECONDS, FrameWatch

FRAME = 0.08


def steady(watch: FrameWatch, start: float, seconds: float, latency: float = 0.03, gap: float = FRAME) -> float:
    """A frame sent every 80 ms, each answered ``latency`` later (every ``gap``): the time at the end."""
    t = start
    while t < start + seconds:
        watch.sent(t)
        watch.received(t + latency)
        assert watch.stalled(t + latency) is None
        t += gap
    return t


def test_a_worker_that_answers_every_frame_is_never_stalled():
    watch = FrameWatch(0.24)
    watch.reset(0.0)
    steady(watch, 0.1, 30.0)
    assert watch.threshold(30.0) == pytest.approx(0.24)


def test_a_worker_that_stops_answering_is_stalled_three_frame_periods_after_it_first_owed():
    watch = FrameWatch(0.24)
    watch.reset(0.0)
    t = steady(watch, 0.1, 5.0)
    last = t - FRAME + 0.03
    for n in range(10):  # the gateway goes on sending; nothing comes back
        watch.sent(t + n * FRAME)
    assert watch.stalled(t + 0.23) is None
    silent = watch.stalled(t + 0.25)
    assert silent == pytest.approx(t + 0.25 - last)


def test_nothing_sent_is_nothing_owed():
    """Before the media starts, or while the gateway's own loop is held up, no worker is blamed."""
    watch = FrameWatch(0.24)
    watch.reset(0.0)
    assert watch.stalled(60.0) is None
    t = steady(watch, 0.1, 1.0)
    assert watch.stalled(t + 10.0) is None  # the gateway stopped sending: nothing owed
    watch.sent(t + 10.0)
    assert watch.stalled(t + 10.2) is None and watch.stalled(t + 10.25) is not None


def test_a_session_gets_longer_for_its_first_frame():
    watch = FrameWatch(0.24)
    watch.reset(0.0)
    watch.sent(0.5)
    assert watch.stalled(0.5 + FIRST_FRAME_SECONDS) is None
    assert watch.stalled(0.5 + FIRST_FRAME_SECONDS + 0.01) is not None
    watch.received(0.9)
    assert watch.stalled(0.9) is None and watch.threshold(0.9) == pytest.approx(0.24)


def test_a_slow_worker_earns_patience_for_the_gaps_it_had_up_to_the_cap_and_loses_it_when_steady():
    watch = FrameWatch(0.24)
    watch.reset(0.0)
    t = steady(watch, 0.1, 2.0)
    watch.sent(t)
    watch.received(t + 0.2)  # one step took 200 ms (a loaded machine): a 250 ms gap
    assert watch.threshold(t + 0.2) == pytest.approx(2 * (t + 0.2 - (t - FRAME + 0.03)))
    watch.sent(t + 0.21)
    assert watch.stalled(t + 0.21 + 0.4) is None  # 400 ms owed: patient now
    watch.received(t + 0.21 + 0.45)  # a 450 ms gap: the threshold would be 900 ms, capped at 720
    assert watch.threshold(t + 1.0) == pytest.approx(0.72)
    t = steady(watch, t + 1.0, 12.0)  # ten seconds steady again: back to the base
    assert watch.threshold(t) == pytest.approx(0.24)
