"""The tests' one polling helper: returns the first truthy value, or fails saying what it waited for."""

from __future__ import annotations

import pytest

from tests.support.polling import eventually, wait_until


async def test_eventually_returns_the_first_truthy_value_and_awaits_coroutines():
    seen = iter([0, None, "", "there"])
    assert await eventually(lambda: next(seen), 5) == "there"

    async def ready() -> int:
        return 7

    assert await eventually(ready, 5) == 7


async def test_eventually_fails_naming_what_and_the_detail():
    with pytest.raises(AssertionError, match=r"the door open: not within 0.05 s\nstill shut"):
        await eventually(lambda: False, 0.05, "the door open", lambda: "still shut")


def test_wait_until_fails_naming_what():
    assert wait_until(lambda: 3, 1) == 3
    with pytest.raises(AssertionError, match="the kettle: not within 0.05 s"):
        wait_until(lambda: None, 0.05, "the kettle", interval=0.01)
