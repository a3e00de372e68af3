"""Waiting for a condition in tests, without fixed sleeps: ``eventually`` on the event
loop, ``wait_until`` in a thread. Both return the check's first truthy value and fail
with an AssertionError that says what was awaited (and ``detail()``, if given: the
state seen last, a process's log)."""

from __future__ import annotations

import asyncio
import inspect
import time
import typing as tp

T = tp.TypeVar("T")


def _failure(what: str, timeout: float, detail: tp.Callable[[], str] | None) -> AssertionError:
    return AssertionError(f"{what}: not within {timeout} s" + (f"\n{detail()[-4000:]}" if detail is not None else ""))


async def eventually(
    check: tp.Callable[[], T | tp.Awaitable[T]],
    timeout: float = 10.0,
    what: str = "the condition",
    detail: tp.Callable[[], str] | None = None,
    *,
    interval: float = 0.02,
) -> T:
    """Await until ``check()`` (awaited if it returns an awaitable) is truthy; return it."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        value = tp.cast(T, await result) if inspect.isawaitable(result) else result
        if value:
            return value
        if time.monotonic() > deadline:
            raise _failure(what, timeout, detail)
        await asyncio.sleep(interval)


def wait_until(
    check: tp.Callable[[], T],
    timeout: float = 10.0,
    what: str = "the condition",
    detail: tp.Callable[[], str] | None = None,
    *,
    interval: float = 0.1,
) -> T:
    """Block until ``check()`` is truthy; return it (for tests outside the event loop)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise _failure(what, timeout, detail)
        time.sleep(interval)
