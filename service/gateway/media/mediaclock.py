"""One media clock per event loop: a single timer that runs every call's media ticks.

Every call needs two periodic ticks: the egress pacer's (one packet every ptime, where
lateness is audible and measured) and the inbound playout (one model frame's worth of
jitter-buffer slots every 80 ms, which takes longer but only has to happen in time).
With one loop timer per tick, a gateway carrying hundreds of calls creates and cancels
thousands of loop timers a second, and runs due callbacks in whatever order they
happen to be due: a pacer tick can wait behind a whole cluster of playout work.

:class:`MediaClock` keeps the ticks of all calls in two heaps on the monotonic clock
and holds one loop timer, armed for the earliest entry. When it fires it sends every
egress tick that is due, then runs due *work* (playout) entries one at a time, looking
at the egress heap again after each, so an egress packet never waits for more than one
unit of other work. Work that is overdue (the process was held off its core) runs a
slice at a time, and the loop reads its sockets in between: a packet that arrived in
time must reach its jitter buffer before the playout tick that would pop its slot. Entries run at most ``EARLY_S`` before their time: the loop's timers
have a millisecond resolution, so a tick may run a little early as well as late, and
each pacer measures and reports that error itself, as before.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
import typing as tp
import weakref

log = logging.getLogger(__name__)

EARLY_S = 0.0005  # run an entry at most half a millisecond before it is due
PHASE_RESOLUTION_S = 0.001  # new periodic work is spread over phases this far apart
WORK_SLICE_S = 0.001  # overdue work runs this long at most before the loop reads its sockets again

Callback = tp.Callable[[], object]


class MediaClock:
    """Runs scheduled media callbacks for one event loop; get it with :func:`media_clock`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, clock: tp.Callable[[], float] = time.monotonic) -> None:
        self._loop = loop
        self._clock = clock
        self._urgent: list[list] = []  # [when, seq, callback or None when cancelled]
        self._work: list[list] = []
        self._seq = 0
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at = float("inf")
        self._running = False

    def __len__(self) -> int:
        return len(self._urgent) + len(self._work)

    def call_at(self, when: float, callback: Callback, *, urgent: bool = False) -> list:
        """Run ``callback()`` at ``when`` (monotonic seconds); returns an entry for :meth:`cancel`.
        ``urgent`` entries (egress) run before any due work entry."""
        if urgent:
            return self.call_urgent_at(when, callback)
        self._seq += 1
        entry = [when, self._seq, callback]
        heapq.heappush(self._work, entry)
        if not self._running and when < self._armed_at:
            self._arm(when)
        return entry

    def call_urgent_at(self, when: float, callback: Callback) -> list:
        """``call_at(when, callback, urgent=True)``: the egress pacers' way, once per packet."""
        self._seq += 1
        entry = [when, self._seq, callback]
        heapq.heappush(self._urgent, entry)
        if not self._running and when < self._armed_at:
            self._arm(when)
        return entry

    def quiet_phase(self, earliest: float, period: float, resolution: float = PHASE_RESOLUTION_S) -> float:
        """The first time at or after ``earliest`` whose phase (modulo ``period``) the fewest
        pending work entries share, to ``resolution``: where a new periodic tick should start.

        A tick's phase is free (the jitter buffer and the pacer follow it), but calls set up
        together would otherwise all start one period after the same moment, and their
        playout runs back to back every period, the last ones milliseconds late (the egress
        frames they produce then underrun, and the datagrams waiting behind them look late)."""
        bins = max(1, round(period / resolution))
        width = period / bins
        counts = [0] * bins  # by phase: bin i holds the times t with i·width <= t mod period < (i+1)·width
        for when, _, callback in self._work:
            if callback is not None:
                counts[int((when % period) / width + 1e-6) % bins] += 1  # a bin's start is in it, rounding aside
        base = earliest - earliest % period
        best = (len(self._work) + 1, earliest)
        for i, count in enumerate(counts):
            start = base + i * width
            if start + width <= earliest:
                start += period
            best = min(best, (count, max(start, earliest)))  # the soonest of the quietest
        return best[1]

    @staticmethod
    def cancel(entry: list) -> None:
        entry[2] = None

    def run_due(self) -> None:
        """Run the egress ticks due now, from between other pieces of work (an inbound
        packet): a burst of those, processed in one go by the loop, would otherwise hold
        back every packet that falls due meanwhile. The loop timer stays armed; if what it
        was armed for has run, it finds the next entry when it fires."""
        urgent = self._urgent
        if not urgent or self._running or urgent[0][0] > self._clock() + EARLY_S:
            return
        self._running = True
        try:
            self._run_urgent(self._clock() + EARLY_S)
        finally:
            self._running = False
            self._arm_for_next()

    def _run_urgent(self, horizon: float) -> None:
        urgent, heappop = self._urgent, heapq.heappop
        while urgent and urgent[0][0] <= horizon:
            callback = heappop(urgent)[2]
            if callback is not None:  # None: cancelled (_call, inline)
                try:
                    callback()
                except Exception as exc:
                    self._failed(callback, exc)

    def _call(self, callback: tp.Callable[[], None] | None) -> None:
        if callback is not None:  # None: cancelled
            try:
                callback()
            except Exception as exc:
                self._failed(callback, exc)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed_at = when
        self._timer = self._loop.call_later(max(0.0, when - self._clock()), self._run)

    def _run(self) -> None:
        self._timer = None
        self._armed_at = float("inf")
        self._running = True
        urgent, work, clock = self._urgent, self._work, self._clock
        heappop = heapq.heappop
        read_first = False
        try:
            slice_end = clock() + WORK_SLICE_S
            while True:
                now = clock()
                horizon = now + EARLY_S
                self._run_urgent(horizon)
                if work and work[0][0] <= horizon:
                    if now >= slice_end:
                        read_first = True
                        break
                    self._call(heappop(work)[2])
                    continue
                break
        finally:
            self._running = False
            # drop cancelled entries at the top so they do not wake the loop
            while urgent and urgent[0][2] is None:
                heappop(urgent)
            while work and work[0][2] is None:
                heappop(work)
            if read_first:
                self._resume_after_reading()
            else:
                self._arm_for_next()

    def _resume_after_reading(self) -> None:
        """Run again once the loop has polled its sockets. A packet waiting there may be
        due in the next piece of work (its playout slot), and must not be read after it.
        Two hops because neither loop polls between a callback and one it schedules:
        uvloop runs ready callbacks before its poll, asyncio the ones queued before it."""
        self._armed_at = -float("inf")  # nothing else arms the timer meanwhile
        self._loop.call_soon(self._loop.call_soon, self._run)

    def _arm_for_next(self) -> None:
        urgent, work = self._urgent, self._work
        nxt = min(urgent[0][0] if urgent else float("inf"), work[0][0] if work else float("inf"))
        if nxt < self._armed_at:
            self._arm(nxt)

    def _failed(self, callback: Callback, exc: Exception) -> None:
        # one call's failure must not stop every other call's media
        self._loop.call_exception_handler(
            {"message": "media clock callback failed", "exception": exc, "callback": callback}
        )


_clocks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, MediaClock] = weakref.WeakKeyDictionary()


def media_clock(loop: asyncio.AbstractEventLoop | None = None) -> MediaClock:
    """The running (or given) loop's media clock, created on first use."""
    loop = loop or asyncio.get_running_loop()
    found = _clocks.get(loop)
    if found is None:
        found = _clocks[loop] = MediaClock(loop)
    return found
