"""Two channels of a call placed on the call clock, out as sample-aligned stereo (pure).

Each channel's audio comes in chunks stamped with the call time of their first sample
(seconds since the answer) and their length in seconds as it was captured (a resampler in
between hands out samples in bursts, so the count of samples is not the clock). A chunk
that follows the one before within ``tolerance`` is taken as contiguous (taps deliver continuous audio, but their chunks are stamped when the
event loop gets to them, a few ms off); a chunk later than that starts after a gap of
silence; a chunk earlier than the channel's end by more than ``late_limit`` comes too
late for its place and is dropped (counted). So sample ``n`` of either channel is call
time ``n / rate``, within ``tolerance``, and the two channels stay aligned however their
sources jitter.

Stereo blocks go out as far as both channels reach, and no further than the call time last
told (``reached``), so that a pause always comes before the samples past it; a channel more than ``max_skew``
behind the other (a model that sent nothing for a while) is filled with silence up to
there, so memory stays bounded. ``finish(duration)`` fills both to the call's duration
and cuts anything beyond it: the recording is exactly as long as the call.

Pauses (compliance: a card number must not be recorded) are spans of the call clock that
are written as silence, whatever audio arrives for them: duration and alignment are kept.
"""

from __future__ import annotations

import numpy as np

LEFT, RIGHT = 0, 1


class _Channel:
    """One channel's samples not emitted yet; ``end`` is the absolute index after them."""

    __slots__ = ("chunks", "length", "end", "clock")

    def __init__(self) -> None:
        self.chunks: list[np.ndarray] = []
        self.length = 0
        self.end = 0
        self.clock: float | None = None  # the call time the next chunk is expected at

    def append(self, samples: np.ndarray) -> None:
        if len(samples):
            self.chunks.append(samples)
            self.length += len(samples)
            self.end += len(samples)

    def silence(self, count: int) -> None:
        if count > 0:
            self.append(np.zeros(count, dtype=np.int16))

    def take(self, count: int) -> np.ndarray:
        """The first ``count`` pending samples (there are at least that many)."""
        joined = (
            np.concatenate(self.chunks)
            if len(self.chunks) > 1
            else (self.chunks[0] if self.chunks else np.zeros(0, dtype=np.int16))
        )
        out, rest = joined[:count], joined[count:]
        self.chunks = [rest] if len(rest) else []
        self.length = len(rest)
        return out


class StereoTimeline:
    """Left and right channels at ``rate`` on the call clock (see the module docstring)."""

    def __init__(self, rate: int, *, tolerance: float = 0.1, late_limit: float = 0.5, max_skew: float = 1.0) -> None:
        self.rate = rate
        self.tolerance = tolerance
        self.late_limit = late_limit
        self.max_skew = round(max_skew * rate)
        self.out = 0  # stereo frames emitted so far
        self.channels = (_Channel(), _Channel())
        self.pauses: list[list[int | None]] = []  # [start, end or None] in samples
        self.dropped_samples = 0
        self.gaps = 0
        self.horizon: int | None = None  # the latest call time told (reached), in samples

    # -- input -------------------------------------------------------------------------

    def continues(self, channel: int, t: float) -> bool:
        """Whether a chunk at call time ``t`` goes on from the channel's last one (or is late);
        False when it starts a new stretch: the first chunk, or after a gap."""
        clock = self.channels[channel].clock
        return clock is not None and t - clock <= self.tolerance

    def add(self, channel: int, t: float, samples: np.ndarray, seconds: float | None = None) -> None:
        """``samples`` (int16 at ``rate``) of ``channel``: ``seconds`` of audio (default:
        as many as the samples make) whose first sample is at call time ``t``."""
        ch = self.channels[channel]
        seconds = len(samples) / self.rate if seconds is None else seconds
        if not self.continues(channel, t):
            if ch.clock is not None:
                self.gaps += 1
            start = max(0, round(t * self.rate))
            ch.clock = t
            if start < ch.end:  # already filled (with silence): what is left of the chunk goes on
                samples = samples[ch.end - start :]
                start = ch.end
            ch.silence(start - ch.end)
        elif ch.clock is not None and ch.clock - t > self.late_limit:
            self.dropped_samples += len(samples)
            return
        ch.clock = (t if ch.clock is None else ch.clock) + seconds
        ch.append(samples)

    def reached(self, now: float) -> None:
        """The call clock has reached ``now``: :meth:`blocks` writes no further than that.
        Chunks that came in a burst are laid end to end past the present; held back, they
        still fall under a pause that comes next."""
        self.horizon = max(self.horizon or 0, round(now * self.rate))

    def pause(self, t: float) -> None:
        """From call time ``t`` on, silence (until ``resume``)."""
        if not self.pauses or self.pauses[-1][1] is not None:
            self.pauses.append([max(0, round(t * self.rate)), None])

    def resume(self, t: float) -> None:
        if self.pauses and self.pauses[-1][1] is None:
            start = self.pauses[-1][0]
            assert start is not None
            self.pauses[-1][1] = max(start, round(t * self.rate))

    @property
    def paused(self) -> bool:
        return bool(self.pauses) and self.pauses[-1][1] is None

    # -- output ------------------------------------------------------------------------

    def blocks(self) -> np.ndarray:
        """The stereo frames (n, 2) both channels have reached (or one, past ``max_skew``)."""
        left, right = self.channels
        ahead = max(left.end, right.end)
        for ch in self.channels:
            if ahead - ch.end > self.max_skew:
                ch.silence(ahead - self.max_skew - ch.end)
        reach = min(left.end, right.end)
        if self.horizon is not None:
            reach = min(reach, self.horizon)
        return self._emit(reach - self.out)

    def finish(self, duration: float) -> np.ndarray:
        """The rest, the recording ending at exactly ``duration`` seconds of call."""
        total = max(0, round(duration * self.rate))
        for ch in self.channels:
            ch.silence(total - ch.end)
        if self.paused:
            self.resume(duration)
        return self._emit(total - self.out)

    def _emit(self, count: int) -> np.ndarray:
        if count <= 0:
            return np.zeros((0, 2), dtype=np.int16)
        frames = np.empty((count, 2), dtype=np.int16)
        for index, ch in enumerate(self.channels):
            pending = ch.take(count)
            frames[:, index] = pending
        begin, end = self.out, self.out + count
        for start, stop in self.pauses:
            assert start is not None
            stop = end if stop is None else stop
            lo, hi = max(start, begin), min(stop, end)
            if lo < hi:
                frames[lo - begin : hi - begin] = 0
        self.out = end
        return frames

    def pause_spans(self) -> list[tuple[float, float | None]]:
        """The pauses in seconds of call (an open one's end is None)."""
        return [
            (start / self.rate, None if stop is None else stop / self.rate)  # type: ignore[operator]
            for start, stop in self.pauses
        ]
