"""Egress pacing: one packet every ptime on the monotonic clock, aligned to model frames.

The model delivers 80 ms frames on its own clock, with some jitter in when they arrive
(step time varies; on a GPU with CUDA graphs it barely does, on a CPU it does a lot). The
pacer treats the frames as a stream with a playout deadline, like a jitter buffer:

* it estimates the grid frames arrive on (the earliest arrivals; frame k is due at
  ``grid + k·80 ms``) and how late frames run behind it;
* each packet is due at ``grid + k·80 ms + j·ptime + cushion``, where the cushion follows
  the 95th percentile of lateness (up at once, down slowly) plus a margin, so a jittery
  worker causes no gaps and a steady one adds ~4 ms;
* its ticks slew toward that phase by at most a tenth of a ptime per tick, so the
  packet spacing never jumps (no bursts), and a packet whose slot has passed is dropped
  and counted rather than delaying everything after it;
* a tick with nothing due sends silence: the stream to the caller never stops.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import time
import typing as tp
from dataclasses import dataclass

from service.gateway.media.mediaclock import MediaClock, media_clock

WINDOW_FRAMES = 64
SEND_EARLY_LIMIT = 0.5  # a packet may go out up to half a ptime before its due time
# The least cushion. The gateway shares its core: the OS holds it off for a few milliseconds
# now and then (traced at 300 calls on one core: waits of 2.6-7 ms, each followed by a burst
# of underruns across every call), and a relayed packet comes from the other leg's playout
# tick within a millisecond or two of our ticks either way. A frame or packet that late must
# still make its tick: a miss costs 20 ms of silence and the packet, for 3 ms of latency.
MARGIN_MS = 4.0

PacketT = tp.TypeVar("PacketT")  # what a packet is to the caller: PCM, or a payload encoded ahead


@dataclass(slots=True)
class PacerStats:
    """What the pacer did, for metrics and the call record."""

    ticks: int = 0
    model_packets: int = 0
    silence_packets: int = 0
    late_dropped: int = 0
    skipped_ticks: int = 0
    frames: int = 0
    resyncs: int = 0
    max_lateness_s: float = 0.0


class EgressPacer(tp.Generic[PacketT]):
    """Sends a call's outbound packets on time; ``push`` model frames, it does the rest.

    ``send(packet, ticks)`` is called once per tick with a packet as ``push`` queued it (int16
    PCM, or a payload already encoded) or None for silence; ``ticks`` is 1 unless the event loop stalled and ticks were skipped, so the
    RTP timestamp can account for the gap. ``on_lateness(seconds)`` observes how far
    from its schedule each tick fired, early or late (the pacing error); ``on_frame_sent(seconds)`` how long each frame
    waited between its arrival and its first packet leaving.
    """

    def __init__(
        self,
        send: tp.Callable[[PacketT | None, int], None],
        packet_ms: float = 20.0,
        frame_ms: float = 80.0,
        *,
        margin_ms: float = MARGIN_MS,
        max_cushion_ms: float = 120.0,
        on_lateness: tp.Callable[[float], None] | None = None,
        on_frame_sent: tp.Callable[[float], None] | None = None,
        clock: tp.Callable[[], float] = time.monotonic,
    ) -> None:
        self._send = send
        self.packet_s = packet_ms / 1000
        self.frame_s = frame_ms / 1000
        self._margin = margin_ms / 1000
        self._max_cushion = max_cushion_ms / 1000
        self._on_lateness = on_lateness
        self._on_frame_sent = on_frame_sent
        self._clock = clock
        self._slew = self.packet_s / 10
        self._queue: collections.deque[tuple[int, int, PacketT, float]] = collections.deque()
        self._offsets: collections.deque[float] = collections.deque()
        self._sorted_offsets: list[float] = []
        self._grid: float | None = None
        self._frame_index = 0
        self.cushion = self._margin
        self._next_tick = 0.0
        self._last_tick: float | None = None
        self._timer: list | None = None  # our entry on the loop's shared media clock
        self._loop: asyncio.AbstractEventLoop | None = None
        self._media_clock: MediaClock | None = None
        self._tick_callback = self._tick  # bound once: scheduled 50 times a second
        self.stats = PacerStats()

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._media_clock = media_clock(self._loop)
        self._next_tick = self._clock()
        self._schedule()

    def stop(self) -> None:
        if self._timer is not None:
            MediaClock.cancel(self._timer)
            self._timer = None
        self._loop = None
        self._media_clock = None

    @property
    def running(self) -> bool:
        return self._loop is not None

    @property
    def queued_packets(self) -> int:
        return len(self._queue)

    def restart(self, frame_ms: float | None = None) -> None:
        """A new source (a human after a transfer): drop what is queued and learn the new
        stream's grid and cushion from scratch, as for a call's first frame. Silence goes
        out until its first frame; the tick cadence never breaks. ``frame_ms``: the new
        source's frames are this long (a relay pushes one packet at a time)."""
        if frame_ms is not None:
            self.frame_s = frame_ms / 1000
        self._queue.clear()
        self._offsets.clear()
        self._sorted_offsets.clear()
        self._grid = None
        self._frame_index = 0
        self.cushion = self._margin

    # -- input -------------------------------------------------------------------------

    def push(self, packets: tp.Sequence[PacketT], arrival: float | None = None) -> None:
        """Queue one model frame's packets, which arrived at ``arrival`` (default: now)."""
        now = self._clock() if arrival is None else arrival
        first = self._grid is None
        if first:
            self._grid = now
            self._frame_index = 0
        else:
            self._frame_index += 1
        self._track(now)
        for j, pcm in enumerate(packets):
            self._queue.append((self._frame_index, j, pcm, now))
        self.stats.frames += 1
        if first and self._last_tick is not None:
            # Only silence went out so far: bring the model's cadence forward at once, with
            # one interval shortened to no less than half a ptime.
            earliest = max(self._clock(), self._last_tick + self.packet_s / 2)
            self._next_tick = min(self._next_tick, max(earliest, self._due(0, 0) - self._slew))
            self._schedule()

    def _track(self, arrival: float) -> None:
        """Update the grid and the cushion with one frame's arrival, in O(log window).

        Frame k's offset ``arrival - k·frame`` would be constant on a perfect clock; the grid
        is the smallest offset in the window (the earliest frames were on time, so it moves
        earlier at once and later as old minima leave the window: it follows the worker's
        clock drift), and lateness is an offset's distance above it.
        """
        offset = arrival - self._frame_index * self.frame_s
        if self._offsets and offset - self._sorted_offsets[0] > self._max_cushion + self.frame_s:
            # A stall (worker hiccup, failover): start a new grid rather than carry the delay.
            self.stats.resyncs += 1
            self._offsets.clear()
            self._sorted_offsets.clear()
            self._queue.clear()
        if len(self._offsets) == WINDOW_FRAMES:
            old = self._offsets.popleft()
            del self._sorted_offsets[bisect.bisect_left(self._sorted_offsets, old)]
        self._offsets.append(offset)
        bisect.insort(self._sorted_offsets, offset)
        ordered = self._sorted_offsets
        self._grid = ordered[0]
        spread = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] - ordered[0]
        target = min(max(spread + self._margin, self._margin), self._max_cushion)
        if target > self.cushion:
            self.cushion = target
        else:
            self.cushion = max(target, self.cushion - 0.00025)

    def _due(self, frame_index: int, packet_index: int) -> float:
        assert self._grid is not None
        return self._grid + frame_index * self.frame_s + packet_index * self.packet_s + self.cushion

    # -- output ------------------------------------------------------------------------

    def _schedule(self) -> None:
        """Ticks run on the loop's shared media clock, ahead of any other media work."""
        clock = self._media_clock
        if clock is None:
            return
        if self._timer is not None:
            MediaClock.cancel(self._timer)
        self._timer = clock.call_urgent_at(self._next_tick, self._tick_callback)

    def _tick(self) -> None:
        """One packet (or silence) out; the next tick scheduled. Runs 50 times a second per
        call: the phase correction and the scheduling are inline."""
        self._timer = None
        now = self._clock()
        scheduled = self._next_tick
        lateness = now - scheduled
        packet_s = self.packet_s
        stats = self.stats
        ticks = 1
        if lateness >= packet_s:
            # The loop stalled past whole ticks: skip them instead of bursting.
            skipped = int(lateness // packet_s)
            ticks += skipped
            scheduled += skipped * packet_s
            stats.skipped_ticks += skipped
            lateness = now - scheduled
        stats.ticks += 1
        self._last_tick = scheduled
        # uvloop's timers run on a millisecond clock cached per loop iteration: they can fire
        # early as well as late, and an early packet is as much a pacing error as a late one
        error = lateness if lateness >= 0.0 else -lateness
        if error > stats.max_lateness_s:
            stats.max_lateness_s = error
        if self._on_lateness is not None:
            self._on_lateness(error)
        pcm = self._take(scheduled, now) if self._queue else None
        if pcm is None:
            stats.silence_packets += 1
        else:
            stats.model_packets += 1
        following = scheduled + packet_s
        grid = self._grid
        if grid is not None:  # _phase_correction(following), inline
            offset = (grid + self.cushion - following) % packet_s
            if offset > packet_s / 2:
                offset -= packet_s
            slew = self._slew
            following += slew if offset > slew else -slew if offset < -slew else offset
        self._next_tick = following
        clock = self._media_clock
        if clock is not None:  # _schedule(), inline (our entry has just run)
            self._timer = clock.call_urgent_at(following, self._tick_callback)
        self._send(pcm, ticks)

    def _take(self, tick: float, now: float) -> PacketT | None:
        queue = self._queue
        early = self.packet_s * SEND_EARLY_LIMIT
        grid, cushion = self._grid, self.cushion
        assert grid is not None  # called with frames queued, and frames come with a grid
        frame_s, packet_s = self.frame_s, self.packet_s
        while queue:
            frame_index, packet_index, pcm, arrival = queue[0]
            due = grid + frame_index * frame_s + packet_index * packet_s + cushion  # _due(), inline
            if due < tick - early:
                queue.popleft()
                self.stats.late_dropped += 1
                continue
            if due > tick + early:
                return None
            queue.popleft()
            if packet_index == 0 and self._on_frame_sent is not None:
                self._on_frame_sent(now - arrival)
            return pcm
        return None
