"""The dashboard's hour of concurrent calls: the busiest moment of each interval, capped."""

from __future__ import annotations

from service.gateway.control.concurrency import ConcurrencyHistory


def test_each_interval_keeps_its_busiest_moment_and_the_hour_is_capped():
    history = ConcurrencyHistory(bucket_seconds=10, span_seconds=3600)
    start = 1_000_000.0
    history.add(2, 8, now=start + 1)
    history.add(5, 8, now=start + 4)
    history.add(3, 8, now=start + 9)
    history.add(1, 8, now=start + 12)
    samples = history.samples(now=start + 20)
    assert [(s.t, s.calls, s.capacity) for s in samples] == [(start, 5, 8), (start + 10, 1, 8)]
    for second in range(0, 7200, 5):  # two hours of checks
        history.add(second % 7, 8, now=start + second)
    kept = history.samples(now=start + 7200)
    assert len(kept) <= 360 and kept[0].t >= start + 7200 - 3600
