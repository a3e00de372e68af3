"""What a streaming resampler holds back, measured rather than quoted.

Two effects add up:

- **shift**: where an impulse comes out in the output stream relative to where it went in
  (a linear-phase FIR shifts by half its length; soxr compensates its filter's delay by
  withholding output instead, so its shift is ~0);
- **lag**: input consumed but not yet given back, read right after each chunk. By Little's
  law its mean over the stream is the mean time a sample waits inside the resampler;
  its maximum is what a paced consumer downstream must cushion.

A sample's delay is shift + lag: ``mean_ms`` on average, ``max_ms`` at worst.
"""

from __future__ import annotations

import dataclasses
import typing as tp

import numpy as np

from service.gateway.media.resample import MODEL_RATE, TELEPHONE_RATE, StreamResampler, make_pair


@dataclasses.dataclass(frozen=True)
class ResamplerDelay:
    """One direction of one resampler, streamed in fixed chunks."""

    resampler: str
    in_rate: int
    out_rate: int
    chunk_ms: float
    shift_ms: float  # impulse in the output stream vs in the input stream
    lag_min_ms: float  # input held back right after a chunk: least, mean (Little's law), most
    lag_mean_ms: float
    lag_max_ms: float

    @property
    def mean_ms(self) -> float:
        return self.shift_ms + self.lag_mean_ms

    @property
    def max_ms(self) -> float:
        return self.shift_ms + self.lag_max_ms

    def to_dict(self) -> dict[str, tp.Any]:
        out = {k: round(v, 2) if isinstance(v, float) else v for k, v in dataclasses.asdict(self).items()}
        out.update(mean_ms=round(self.mean_ms, 2), max_ms=round(self.max_ms, 2))
        return out


def band_limited_click(rate: int, at: int, length: int, cutoff_hz: float = 3000.0) -> np.ndarray:
    """A Hann-windowed sinc pulse centred on sample ``at``: an impulse that survives 24 → 8 kHz."""
    n = np.arange(length) - at
    width = int(rate * 0.004)
    pulse: np.ndarray = np.sinc(2 * cutoff_hz / rate * n) * np.where(
        np.abs(n) <= width, np.hanning(2 * width + 1)[np.clip(n + width, 0, 2 * width)], 0.0
    )
    return (0.5 * pulse).astype(np.float32)


def _peak_seconds(signal: np.ndarray, rate: int) -> float:
    """Time of the largest sample, refined by a parabola through its neighbours."""
    k = int(np.argmax(np.abs(signal)))
    if 0 < k < len(signal) - 1:
        a, b, c = np.abs(signal[k - 1 : k + 2]).astype(np.float64)
        denominator = a - 2 * b + c
        if denominator != 0:
            return float((k + 0.5 * (a - c) / denominator) / rate)
    return k / rate


def measure_delay(
    resampler: StreamResampler, in_rate: int, out_rate: int, *, chunk_ms: float = 20.0, seconds: float = 4.0
) -> ResamplerDelay:
    """Stream ``seconds`` of a click train through ``resampler`` in ``chunk_ms`` chunks."""
    chunk = round(in_rate * chunk_ms / 1000)
    chunks = max(20, round(seconds * 1000 / chunk_ms))
    total = chunk * chunks
    click_at = total // 2 + chunk // 3  # mid-stream and mid-chunk: no start-up transient
    signal = band_limited_click(in_rate, click_at, total)
    out: list[np.ndarray] = []
    lags: list[float] = []
    consumed = emitted = 0
    for i in range(chunks):
        produced = resampler.process(signal[i * chunk : (i + 1) * chunk])
        out.append(np.asarray(produced, dtype=np.float32))
        consumed += chunk
        emitted += len(produced)
        if i >= chunks // 4:  # past the start-up, where soxr first fills its buffers
            lags.append(consumed / in_rate - emitted / out_rate)
    shift = _peak_seconds(np.concatenate(out), out_rate) - _peak_seconds(signal, in_rate)
    lag = np.asarray(lags) * 1000
    return ResamplerDelay(
        getattr(resampler, "name", type(resampler).__name__),
        in_rate,
        out_rate,
        float(chunk_ms),
        float(shift * 1000),
        float(lag.min()),
        float(lag.mean()),
        float(lag.max()),
    )


def measure_pair(kind: str, chunk_ms: float = 20.0) -> tuple[ResamplerDelay, ResamplerDelay]:
    """(8 → 24 kHz, 24 → 8 kHz) delays of the named resampler (fresh instances)."""
    up, down = make_pair(kind)
    return (
        measure_delay(up, TELEPHONE_RATE, MODEL_RATE, chunk_ms=chunk_ms),
        measure_delay(down, MODEL_RATE, TELEPHONE_RATE, chunk_ms=chunk_ms),
    )
