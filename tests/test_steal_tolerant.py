"""The rerun rule for real-time tests: again only when the hypervisor stole the cores."""

from __future__ import annotations

import pytest

from ops.bench.machine import StealMeter
from tests.support.realtime import steal_tolerant


def failing_test(calls: list):
    @steal_tolerant(tries=3)
    def test():
        calls.append(1)
        raise AssertionError("late packets")
    return test


def test_a_failure_on_an_unstolen_machine_stands_at_once(monkeypatch):
    monkeypatch.setattr(StealMeter, "share", lambda self: 0.0)
    calls: list = []
    with pytest.raises(AssertionError, match="late packets"):
        failing_test(calls)()
    assert len(calls) == 1


def test_a_failure_while_stolen_is_tried_again_then_reported_skipped(monkeypatch):
    monkeypatch.setattr(StealMeter, "share", lambda self: 0.5)
    calls: list = []
    with pytest.raises(pytest.skip.Exception, match="stole 50% of the cores.*late packets"):
        failing_test(calls)()
    assert len(calls) == 3


async def test_async_tests_pass_through_and_return():
    @steal_tolerant()
    async def test():
        return 7
    assert await test() == 7
