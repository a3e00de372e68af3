"""An audio jitter buffer with a playout deadline and an adaptive delay.

The call's media clock calls :meth:`JitterBuffer.pop` once per frame (every ptime). Each call
plays the next frame slot: its payload if the packet is there, :data:`CONCEAL` if it is not
(the caller runs packet loss concealment), or ``None`` while there is no stream to play. It
never waits: a lost packet costs exactly one concealed frame, and a packet that turns up
after its slot was played is dropped and counted as late.

Timing model. Every packet has a *transit* ``arrival - timestamp / clock_rate`` (seconds,
up to a constant). A frame slot with timestamp ``ts`` popped at ``now`` has the *playout
offset* ``now - ts / clock_rate``: its packet was on time iff its transit is at most that
offset. The buffer keeps the minimum and a high quantile of the transits of the last
``window`` packets (give or take a tenth: :class:`TransitWindow`), and aims the playout
offset at::

    target = max(fastest + min_delay, quantile(transit) + frame / 2),  capped at fastest + max_delay

so on a clean line a frame plays ``min_delay`` after the fastest possible arrival, and under
jitter the delay follows a high quantile of the recent transit spread (grows within a few
hundred ms of jitter appearing, shrinks back once the jitter has left the window). The
actual offset moves by whole frames only, and only where it costs nothing or little:

* grow (hold the slot one frame, returning :data:`CONCEAL`) when the slot's packet is
  missing anyway, when the frame is silent, or when the offset is over 1.5 frames short;
* shrink (skip a slot) when the slot's packet is missing and the next one is here, when the
  frame is silent, or otherwise by dropping one frame per ``shrink_patience`` divided by the
  whole frames of excess (2 s for one frame too many, 0.25 s for eight);
* while the stream is idle (before the first frame, after ``idle_after`` of nothing) the
  offset is set freely, so a new talkspurt starts exactly at the target.

Resync: a new SSRC restarts the buffer at once (packets of the SSRC it replaced are
discarded); a timestamp jump restarts it when the next packet confirms the jump, so one
corrupt packet cannot derail a call. A jump is a timestamp off the frame grid, or a transit
off the fastest recent one by more than ``resync_after`` (default: the buffer's span,
``max_depth``) and by more than twice the current jitter spread: a packet that far ahead could not be held, one that far behind is older than
anything the buffer still waits for. (A network stall longer than that, followed by a burst,
also resyncs; the stale part of the burst is then discarded, just as it would be as late.) Each packet holds one frame of ``frame_samples`` samples (the
negotiated ptime); the buffer never looks inside payloads. Depth is bounded: beyond
``max_depth`` frames the oldest is dropped and counted as overflow.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from sip.rtp import RtpPacket


class Conceal:
    """The type of :data:`CONCEAL`: the slot's packet did not arrive in time."""

    _instance: Conceal | None = None

    def __new__(cls) -> Conceal:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "CONCEAL"

    def __bool__(self) -> bool:
        return False


CONCEAL = Conceal()


@dataclass(slots=True)
class JitterBufferStats:
    """Counters and the current delay of a :class:`JitterBuffer`."""

    packets_received: int
    frames_played: int
    frames_concealed: int
    frames_idle: int
    packets_late: int
    packets_duplicate: int
    packets_discarded: int
    packets_overflow: int
    frames_inserted: int
    frames_dropped: int
    slots_skipped: int
    resyncs: int
    depth: int
    delay_ms: float
    target_delay_ms: float


class TransitWindow:
    """The transits of a stream's recent packets: their minimum and a high quantile, exact,
    for O(1) work per packet (this runs for every packet of every call).

    The window moves a block (a tenth of it) at a time: it holds the block being filled and
    the whole blocks of ``block`` packets before it, up to ``blocks × block`` packets in all
    (``size`` rounded down to whole blocks; at least a block fewer plus one once full). Each whole block keeps its minimum and its largest few
    values (as many as the quantile can reach down to); the window's are merged from those
    when a block leaves, and a new packet only updates them if it goes below the minimum or
    among the largest. A high quantile of the window is the k-th largest value for a small k,
    which the merged largest values of the blocks always contain.
    """

    __slots__ = ("quantile", "block", "blocks", "_reach", "_full", "_current", "fastest", "_top", "count")

    def __init__(self, size: int, quantile: float) -> None:
        self.quantile = quantile
        self.block = max(1, size // 10)
        self.blocks = size // self.block  # the block being filled included
        most = self.blocks * self.block
        self._reach = most - int(quantile * most) + 1  # the most largest values a lookup can need
        self._full: deque[tuple[int, float, list[float]]] = deque()  # (count, minimum, largest ascending)
        self._current: list[float] = []
        self.fastest = math.inf  # the smallest transit in the window
        self._top: list[float] = []  # the window's largest values, ascending
        self.count = 0

    def add(self, transit: float) -> None:
        current = self._current
        if len(current) == self.block:
            self._roll()
            current = self._current
        current.append(transit)
        self.count += 1
        if transit < self.fastest:
            self.fastest = transit
        top = self._top
        if len(top) < self._reach:
            bisect.insort(top, transit)
        elif transit > top[0]:
            bisect.insort(top, transit)
            del top[0]

    def _roll(self) -> None:
        """The block being filled is whole: it joins the window, and the oldest may leave."""
        current = self._current
        ordered = sorted(current)
        full = self._full
        full.append((len(current), ordered[0], ordered[-self._reach :]))
        self._current = []
        if len(full) >= self.blocks:
            self.count -= full.popleft()[0]
            self.fastest = min((entry[1] for entry in full), default=math.inf)
            self._top = sorted(value for entry in full for value in entry[2])[-self._reach :]

    def high(self) -> float:
        """The window's ``quantile``: the value at index ``int(quantile * count)`` (at most the
        last) of the window sorted."""
        count = self.count
        return self._top[min(count - 1, int(self.quantile * count)) - count]


class JitterBuffer:
    """Reorders, de-duplicates and times one RTP audio stream; see the module docstring."""

    def __init__(
        self,
        *,
        clock_rate: int = 8000,
        ptime_ms: float = 20.0,
        min_delay_ms: float = 20.0,
        max_delay_ms: float = 200.0,
        max_depth_ms: float | None = None,
        quantile: float = 0.99,
        window: int = 500,
        resync_after_ms: float | None = None,
        shrink_patience_ms: float = 2000.0,
        idle_after_ms: float = 400.0,
        is_silent: Callable[[bytes], bool] | None = None,
    ) -> None:
        if clock_rate <= 0:
            raise ValueError(f"clock_rate must be positive, got {clock_rate}")
        frame_samples = clock_rate * ptime_ms / 1000
        if frame_samples < 1 or frame_samples != int(frame_samples):
            raise ValueError(f"ptime {ptime_ms} ms is not a whole number of samples at {clock_rate} Hz")
        if not 0 <= min_delay_ms <= max_delay_ms:
            raise ValueError(f"need 0 <= min_delay_ms ({min_delay_ms}) <= max_delay_ms ({max_delay_ms})")
        if not 0.5 <= quantile <= 1.0:
            raise ValueError(f"quantile must be in [0.5, 1], got {quantile}")
        if window < 1:
            raise ValueError("window must hold at least one packet")
        max_depth_ms = max(max_delay_ms + 100.0, 2 * ptime_ms) if max_depth_ms is None else max_depth_ms
        self.clock_rate = clock_rate
        self.frame_samples = int(frame_samples)
        self.frame_seconds = ptime_ms / 1000
        self.min_delay = min_delay_ms / 1000
        self.max_delay = max_delay_ms / 1000
        self.max_depth = max(2, math.ceil(max_depth_ms / ptime_ms))
        self.quantile = quantile
        self.window = window
        self.resync_after = (self.max_depth * ptime_ms if resync_after_ms is None else resync_after_ms) / 1000
        self.shrink_patience = shrink_patience_ms / 1000
        self.idle_frames = max(1, math.ceil(idle_after_ms / ptime_ms))
        self.is_silent = is_silent
        self._seen_limit = 4 * self.max_depth
        self._half_frame = self.frame_seconds / 2
        self._stale_ssrcs: deque[int] = deque(maxlen=4)
        self.packets_received = 0
        self.frames_played = 0
        self.frames_concealed = 0
        self.frames_idle = 0
        self.packets_late = 0
        self.packets_duplicate = 0
        self.packets_discarded = 0
        self.packets_overflow = 0
        self.frames_inserted = 0
        self.frames_dropped = 0
        self.slots_skipped = 0
        self.resyncs = 0
        self._delay = 0.0
        self._restart(None)

    # -- state ---------------------------------------------------------------------------------

    def _restart(self, ssrc: int | None) -> None:
        self._ssrc = ssrc
        self._slots: dict[int, bytes] = {}  # extended timestamp -> payload
        # the timestamps of the last frames stored or found late, by frame number modulo the
        # ring's size: a duplicate is a packet whose timestamp its frame's entry still holds
        self._seen: list[int | None] = [None] * self._seen_limit
        self._transits = TransitWindow(self.window, self.quantile)
        self._cursor: int | None = None  # extended timestamp of the next slot to play
        self._last_ts = 0
        self._last_ext = 0
        self._talking = False  # a frame was played and the stream has not gone idle since
        self._stream_played = False  # a frame of this stream was played
        self._misses = 0
        self._last_shrink = -math.inf
        self._candidate: tuple[int, bytes, float] | None = None  # timestamp, payload, arrival

    def reset(self) -> None:
        """Forget the stream; what it held counts as discarded."""
        self._discard_held()
        if self._candidate is not None:
            self.packets_discarded += 1
        self._restart(None)

    def _begin(self, ssrc: int, timestamp: int, payload: bytes, arrival: float) -> None:
        self._restart(ssrc)
        self._last_ts = self._last_ext = timestamp
        self._cursor = timestamp
        self._store(timestamp, payload)
        self._transits.add(arrival - timestamp / self.clock_rate)

    # -- input ---------------------------------------------------------------------------------

    def put(self, packet: RtpPacket, arrival: float) -> None:
        """Accept one RTP packet of this stream that arrived at ``arrival`` (seconds, pop's clock)."""
        self.put_payload(packet.ssrc, packet.timestamp, packet.payload, arrival)

    def put_payload(self, ssrc: int, timestamp: int, payload: bytes, arrival: float) -> None:
        """:meth:`put` for the fields the buffer uses: what the RTP session's fast path hands
        over without building a packet object."""
        self.packets_received += 1
        if ssrc != self._ssrc:
            if ssrc in self._stale_ssrcs:
                self.packets_discarded += 1
                return
            if self._ssrc is not None:
                self._stale_ssrcs.append(self._ssrc)
                self.resyncs += 1
                self._discard_held()
                if self._candidate is not None:
                    self.packets_discarded += 1
            self._begin(ssrc, timestamp, payload, arrival)
            return
        ext = self._last_ext + (((timestamp - self._last_ts + 0x80000000) & 0xFFFFFFFF) - 0x80000000)
        transit = arrival - ext / self.clock_rate
        cursor = self._cursor
        assert cursor is not None
        transits = self._transits
        fastest = transits.fastest
        off = abs(transit - fastest)
        # under extreme jitter a jump must also stand out from the jitter itself (the spread
        # is only looked up for a packet off by more than resync_after: rarely)
        if (off > self.resync_after and off > 2 * (transits.high() - fastest)) or (ext - cursor) % self.frame_samples:
            self._on_jump(timestamp, payload, arrival)
            return
        if self._candidate is not None:
            # the stream went on as before: the jump was a one-off
            self._candidate = None
            self.packets_discarded += 1
        if ext > self._last_ext:
            self._last_ext = ext
            self._last_ts = timestamp
        seen = self._seen
        entry = (ext // self.frame_samples) % self._seen_limit
        if seen[entry] == ext:
            self.packets_duplicate += 1
            return
        seen[entry] = ext
        transits.add(transit)
        if ext < cursor:
            if not self._stream_played:
                # nothing played yet: an earlier packet overtaken at the start moves the start back
                self._cursor = ext
            else:
                self.packets_late += 1
                return
        slots = self._slots
        slots[ext] = payload
        if len(slots) > self.max_depth:
            self._overflow()

    def _store(self, ext: int, payload: bytes) -> None:
        slots = self._slots
        slots[ext] = payload
        self._seen[(ext // self.frame_samples) % self._seen_limit] = ext
        if len(slots) > self.max_depth:
            self._overflow()

    def _overflow(self) -> None:
        """More frames held than ``max_depth``: the oldest goes."""
        slots = self._slots
        oldest = min(slots)
        del slots[oldest]
        self.packets_overflow += 1
        assert self._cursor is not None
        if oldest >= self._cursor:
            self._cursor = oldest + self.frame_samples

    def _on_jump(self, timestamp: int, payload: bytes, arrival: float) -> None:
        """A packet off the current timeline: resync if it is the second in a row that agrees."""
        candidate = self._candidate
        if candidate is not None:
            first_timestamp, first_payload, first_arrival = candidate
            step = ((timestamp - first_timestamp + 0x80000000) & 0xFFFFFFFF) - 0x80000000
            drift = (arrival - first_arrival) - step / self.clock_rate
            if step and step % self.frame_samples == 0 and abs(drift) < self.resync_after / 2:
                self.resyncs += 1
                self._discard_held()
                ssrc = self._ssrc
                assert ssrc is not None
                self._begin(ssrc, first_timestamp, first_payload, first_arrival)
                self.packets_received -= 1  # put_payload() counts this packet again
                self.put_payload(ssrc, timestamp, payload, arrival)
                return
            self.packets_discarded += 1
        self._candidate = (timestamp, payload, arrival)

    def _discard_held(self) -> None:
        self.packets_discarded += len(self._slots)
        self._slots.clear()

    # -- output --------------------------------------------------------------------------------

    def target_offset(self) -> float:
        """The playout offset (seconds, transit domain) the buffer is steering towards."""
        transits = self._transits
        fastest = transits.fastest
        return min(max(fastest + self.min_delay, transits.high() + self._half_frame), fastest + self.max_delay)

    def pop(self, now: float) -> bytes | Conceal | None:
        """The payload for the next frame slot, :data:`CONCEAL`, or None when idle. Never waits."""
        cursor = self._cursor
        if cursor is None:
            return None
        half = self._half_frame
        error = now - cursor / self.clock_rate - self.target_offset()
        if not self._talking:
            return self._pop_idle(now, cursor, error)
        step = self.frame_samples
        frame_s = self.frame_seconds
        slots = self._slots
        payload = slots.get(cursor)
        if error < -half:
            if payload is None or error < -3 * half or self._silent(payload):
                # hold this slot one more frame: the delay grows by one frame
                self.frames_inserted += 1
                self.frames_concealed += 1
                self._delay = now - cursor / self.clock_rate - self._transits.fastest
                return CONCEAL
        elif error >= half:
            following = slots.get(cursor + step)
            if following is not None:
                if payload is None:
                    # the slot is lost or late anyway: skip it instead of concealing it
                    self.slots_skipped += 1
                    cursor += step
                    payload = following
                    self._last_shrink = now
                elif (
                    self._silent(payload)
                    or (now - self._last_shrink) * max(1.0, error // frame_s) >= self.shrink_patience
                ):
                    del slots[cursor]
                    self.frames_dropped += 1
                    cursor += step
                    payload = following
                    self._last_shrink = now
        self._delay = now - cursor / self.clock_rate - self._transits.fastest
        self._cursor = cursor + step
        if payload is None:
            self._misses += 1
            if self._misses >= self.idle_frames:
                self._talking = False
                self.frames_idle += 1
                return None
            self.frames_concealed += 1
            return CONCEAL
        del slots[cursor]
        self._misses = 0
        self.frames_played += 1
        return payload

    def _pop_idle(self, now: float, cursor: int, error: float) -> bytes | None:
        """Nothing audible is playing: move the offset to the target freely, then play if we can."""
        step = self.frame_samples
        slots = self._slots
        if error < -self._half_frame:
            self.frames_idle += 1
            return None  # too early: hold (the offset grows by one frame)
        frame = self.frame_seconds
        skip = int((error + self._half_frame) // frame)
        if skip > 0 and slots:
            # skip empty slots freely, but audio only when over 1.5 frames late: a frame just
            # confirmed by a resync plays, and the talking state trims the rest later
            last = max(slots)
            while skip > 0 and cursor <= last:
                if cursor in slots:
                    if error < frame + self._half_frame:
                        skip = 0
                        break
                    del slots[cursor]
                    self.packets_discarded += 1
                cursor += step
                error -= frame
                skip -= 1
        cursor += skip * step
        self._delay = now - cursor / self.clock_rate - self._transits.fastest
        payload = slots.pop(cursor, None)
        self._cursor = cursor + step
        if payload is None:
            self.frames_idle += 1
            return None
        self._talking = True
        self._stream_played = True
        self._misses = 0
        self._last_shrink = now
        self.frames_played += 1
        return payload

    def _silent(self, payload: bytes) -> bool:
        return self.is_silent is not None and self.is_silent(payload)

    # -- reporting -----------------------------------------------------------------------------

    @property
    def delay(self) -> float:
        """Playout delay of the last popped slot beyond the fastest recent transit (seconds)."""
        return self._delay

    @property
    def depth(self) -> int:
        """Packets held: frames waiting for their slot, plus an unconfirmed jump."""
        return len(self._slots) + (self._candidate is not None)

    def stats(self) -> JitterBufferStats:
        target = self.target_offset() - self._transits.fastest if self._transits.count else self.min_delay
        return JitterBufferStats(
            packets_received=self.packets_received,
            frames_played=self.frames_played,
            frames_concealed=self.frames_concealed,
            frames_idle=self.frames_idle,
            packets_late=self.packets_late,
            packets_duplicate=self.packets_duplicate,
            packets_discarded=self.packets_discarded,
            packets_overflow=self.packets_overflow,
            frames_inserted=self.frames_inserted,
            frames_dropped=self.frames_dropped,
            slots_skipped=self.slots_skipped,
            resyncs=self.resyncs,
            depth=self.depth,
            delay_ms=self._delay * 1000,
            target_delay_ms=target * 1000,
        )
