"""Packet loss concealment for 8 kHz PCM16 frames, after ITU-T G.711 Appendix I (simplified).

On a lost frame, :meth:`PacketLossConcealer.conceal` repeats the last pitch period of the
audio played so far (widening to two and three periods as the loss goes on, which sounds
less buzzy), at full level for the first 10 ms, then fading linearly to silence at 60 ms.
When real audio resumes, :meth:`PacketLossConcealer.good` cross-fades from the synthetic
signal into it, so neither edge of a gap clicks. Unlike Appendix I there is no algorithmic
delay: the last real samples were already played when the loss is noticed, so the start of
the repetition is not overlap-added. The pitch search runs once per loss event (about 13 k
multiply-adds); a good frame costs one copy into the history.
"""

from __future__ import annotations

import numpy as np

HISTORY_MS = 48.75  # 390 samples at 8 kHz: 3 periods of the lowest pitch searched, plus margin
PITCH_MIN_HZ = 66.7
PITCH_MAX_HZ = 200.0
CORRELATION_MS = 20.0


class PacketLossConcealer:
    """Conceals lost frames of one audio stream; feed it every frame in play order."""

    def __init__(self, sample_rate: int = 8000, *, full_level_ms: float = 10.0, silent_after_ms: float = 60.0) -> None:
        if silent_after_ms <= full_level_ms:
            raise ValueError("silent_after_ms must be greater than full_level_ms")
        self.sample_rate = sample_rate
        self._history = np.zeros(int(sample_rate * HISTORY_MS / 1000), dtype=np.float32)
        self._min_lag = int(sample_rate / PITCH_MAX_HZ)
        self._max_lag = int(sample_rate / PITCH_MIN_HZ)
        self._window = int(sample_rate * CORRELATION_MS / 1000)
        self._full_level = int(sample_rate * full_level_ms / 1000)
        self._silent_after = int(sample_rate * silent_after_ms / 1000)
        self._widen_every = max(1, int(sample_rate * 0.010))
        self._pitch = self._min_lag
        self._lost_samples = 0  # samples concealed in the current loss, 0 when not in a loss
        self._position = 0  # read position in the repeated pitch buffer
        self._buffer = self._history[-3 * self._pitch :].copy()
        # gain per sample since the loss began: 1, then a linear fade to 0 at silent_after
        at = np.arange(self._silent_after, dtype=np.float32)
        self._envelope = np.clip(1.0 - (at - self._full_level) / (self._silent_after - self._full_level), 0.0, 1.0)
        self._counting = np.arange(2048)
        self.frames_concealed = 0

    @property
    def in_loss(self) -> bool:
        return self._lost_samples > 0

    def good(self, frame: np.ndarray) -> np.ndarray:
        """Pass a received frame through; after a loss, its start is cross-faded from the concealment."""
        if self._lost_samples:
            frame = self._fade_in(frame)
            self._lost_samples = 0
        self._remember(frame)
        return frame

    def conceal(self, samples: int) -> np.ndarray:
        """A replacement for ``samples`` lost samples (int16)."""
        if not self._lost_samples:
            self._pitch = self._find_pitch()
            self._position = 0
            # frozen for the whole loss: what we synthesise must not feed back into it
            self._buffer = self._history[-3 * self._pitch :].copy()
        out = self._synthesize(samples)
        self.frames_concealed += 1
        self._remember(out)
        return out

    def _remember(self, frame: np.ndarray) -> None:
        history = self._history
        n = len(frame)
        if n >= len(history):
            history[:] = frame[-len(history) :]
        else:
            history[:-n] = history[n:]
            history[-n:] = frame

    def _find_pitch(self) -> int:
        """The lag in [min_lag, max_lag] at which the signal best resembles itself."""
        history = self._history
        window = self._window
        reference = history[-window:]
        if not reference.any():
            return self._min_lag
        # candidates[k:k + window] lies max_lag - k samples before the reference
        candidates = history[len(history) - window - self._max_lag : len(history) - self._min_lag]
        products = np.correlate(candidates, reference, mode="valid")
        squares = np.concatenate(([0.0], np.cumsum(candidates.astype(np.float64) ** 2)))
        energies = squares[window:] - squares[:-window] + 1e-3
        best = int(np.argmax(products / np.sqrt(energies)))
        return self._max_lag - best

    def _synthesize(self, samples: int, advance: bool = True) -> np.ndarray:
        """The next ``samples`` of the repeated, fading pitch buffer (int16)."""
        out = np.zeros(samples, dtype=np.float32)
        lost = self._lost_samples
        position = self._position
        buffer = self._buffer
        counting = self._counting
        audible = max(0, min(samples, self._silent_after - lost))
        done = 0
        # piecewise: within a piece the repeated span (1, 2 or 3 pitch periods) is constant
        while done < audible:
            periods = min(3, 1 + (lost + done) // self._widen_every)
            piece_end = audible if periods == 3 else min(audible, periods * self._widen_every - lost)
            count = piece_end - done
            span = periods * self._pitch
            # the buffer is the last `span` samples; widening it keeps the phase
            indices = position + (counting[:count] if count <= len(counting) else np.arange(count))
            indices %= span
            out[done:piece_end] = buffer[len(buffer) - span + indices]
            position = (position + count) % span
            done = piece_end
        if audible:
            out[:audible] *= self._envelope[lost : lost + audible]
        if advance:
            self._lost_samples = lost + samples
            self._position = position
        # gains are at most 1, so the result stays within int16
        return out.astype(np.int16)

    def _fade_in(self, frame: np.ndarray) -> np.ndarray:
        lost_ms = self._lost_samples * 1000 / self.sample_rate
        overlap_ms = min(10.0, 4.0 + 4.0 * max(0.0, lost_ms - 10.0) / 10.0)
        overlap = min(len(frame), int(self.sample_rate * overlap_ms / 1000))
        if overlap == 0:
            return frame
        tail = self._synthesize(overlap, advance=False)
        ramp = (self._counting[1 : overlap + 1] if overlap < len(self._counting) else np.arange(1, overlap + 1)).astype(
            np.float32
        ) / (overlap + 1)
        out = np.array(frame, dtype=np.int16, copy=True)
        # a convex mix of two int16 signals stays within int16
        out[:overlap] = (tail + (frame[:overlap] - tail.astype(np.float32)) * ramp).astype(np.int16)
        return out
