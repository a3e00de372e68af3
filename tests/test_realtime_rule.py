"""The rule for real-time tests: functional failures always fail; a timing miss fails on an
undisturbed machine, and on a disturbed one is retried, then fails in CI or is reported
INCONCLUSIVE elsewhere — never passed."""

from __future__ import annotations

import pytest

from tests.support import realtime
from tests.support.realtime import MachineMeter, Timing, realtime_test

CALM = {"steal": 0.0, "throttled_s": 0.0, "pressure": 0.01, "lag_s": 0.002}
STOLEN = {"steal": 0.5, "throttled_s": 0.0, "pressure": 0.01, "lag_s": 0.002}


@pytest.fixture
def machine(monkeypatch):
    def set_measures(measures: dict[str, float]) -> None:
        monkeypatch.setattr(MachineMeter, "measures", lambda self: dict(measures))

    return set_measures


def counting_test(calls: list, *, functional: bool = False, late: bool = True):
    @realtime_test(tries=3)
    def test(timing):
        calls.append(1)
        assert not functional, "the echo never came back"
        timing.expect(not late, "late packets")

    return test


def test_a_functional_failure_fails_at_once_even_on_a_disturbed_machine(machine):
    machine(STOLEN)
    calls: list = []
    with pytest.raises(AssertionError, match="the echo never came back"):
        counting_test(calls, functional=True)(timing=Timing())
    assert len(calls) == 1


def test_a_timing_miss_on_an_undisturbed_machine_fails_at_once(machine):
    machine(CALM)
    calls: list = []
    with pytest.raises(pytest.fail.Exception, match="undisturbed machine.*late packets"):
        counting_test(calls)(timing=Timing())
    assert len(calls) == 1


def test_a_timing_miss_on_a_disturbed_machine_fails_in_ci_after_its_tries(machine, monkeypatch):
    machine(STOLEN)
    monkeypatch.setenv("CI", "true")
    calls: list = []
    with pytest.raises(pytest.fail.Exception, match="INCONCLUSIVE after 3 tries.*stole 50%.*late packets"):
        counting_test(calls)(timing=Timing())
    assert len(calls) == 3


def test_a_timing_miss_on_a_disturbed_machine_is_reported_inconclusive_outside_ci(machine, monkeypatch):
    machine(STOLEN)
    monkeypatch.delenv("CI", raising=False)
    calls: list = []
    with pytest.raises(pytest.skip.Exception, match="INCONCLUSIVE after 3 tries"):
        counting_test(calls)(timing=Timing())
    assert len(calls) == 3


def test_a_retry_that_meets_its_budget_passes(machine):
    machine(STOLEN)
    timing = Timing()
    outcomes = iter([True, False])

    @realtime_test(tries=3)
    def test(timing):
        timing.expect(not next(outcomes), "late packets")
        return "passed"

    assert test(timing=timing) == "passed"


async def test_async_tests_are_measured_on_their_loop_and_return():
    @realtime_test()
    async def test(timing):
        return 7

    assert await test(timing=Timing()) == 7


def test_each_cause_is_named():
    causes = MachineMeter.causes({"steal": 0.1, "throttled_s": 0.2, "pressure": 0.5, "lag_s": 0.3})
    assert len(causes) == 4
    assert MachineMeter.causes(CALM) == []


def test_the_meter_reads_this_machine():
    measures = MachineMeter().start().measures()
    assert set(measures) == {"steal", "throttled_s", "pressure", "lag_s"}
    assert all(v >= 0 for v in measures.values())
    assert realtime.in_ci() in (True, False)
