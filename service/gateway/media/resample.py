"""Streaming resamplers between the codecs' rates (8, 16 and 48 kHz) and the model's 24 kHz.

The ratio is exactly 3, so the default is a short linear-phase polyphase FIR: a
Kaiser-windowed sinc, 4 kHz cutoff, ≥ 60 dB stopband from 4.6 kHz, flat to 3.4 kHz. It
holds back 1.5 ms each way where soxr's HQ holds back 43 ms on average and up to 73 ms
(measured: :mod:`service.gateway.media.resample_delay`, printed by ops/bench/latency.py);
the 24→8 kHz direction still gets a real anti-aliasing filter. soxr's ``ResampleStream``
stays selectable by name for comparison.

Each resampler takes and returns float32 mono arrays, keeps its own state between chunks
(one instance per call per direction) and says what it holds back.
"""

from __future__ import annotations

import typing as tp

import numpy as np

from service.wire import SAMPLE_RATE

TELEPHONE_RATE = 8000
MODEL_RATE = SAMPLE_RATE  # the model's rate (service.wire)
RATIO = MODEL_RATE // TELEPHONE_RATE


class StreamResampler(tp.Protocol):
    name: str
    held_back_ms: float

    def process(self, samples: np.ndarray) -> np.ndarray: ...


def lowpass_taps(
    num_taps: int = 73, cutoff_hz: float = 4000.0, rate: int = MODEL_RATE, beta: float = 5.65
) -> np.ndarray:
    """Kaiser-windowed sinc low-pass, unity DC gain (beta 5.65 ≈ 60 dB stopband)."""
    n = np.arange(num_taps) - (num_taps - 1) / 2
    taps: np.ndarray = np.sinc(2 * cutoff_hz / rate * n) * np.kaiser(num_taps, beta)
    unity: np.ndarray = (taps / taps.sum()).astype(np.float32)
    return unity


def sliding_windows(samples: np.ndarray, width: int, step: int = 1, *, copy: bool = True) -> np.ndarray:
    """Every ``step``-th run of ``width`` consecutive samples of a contiguous float32 array,
    as the rows of a matrix: a FIR filter is then one BLAS product (np.convolve is a plain
    loop). The strided view is built with the ndarray constructor (numpy's as_strided costs
    several times more); ``copy`` makes it contiguous, which pays when the rows are long."""
    count = max(0, (len(samples) - width) // step + 1)
    itemsize = samples.itemsize
    view: np.ndarray = np.ndarray((count, width), samples.dtype, buffer=samples, strides=(step * itemsize, itemsize))
    return np.ascontiguousarray(view) if copy else view


class _StreamingFir:
    """The filter state both directions keep: the input samples the next chunk's first
    outputs still need. They live at the front of a buffer that is reused while the chunk
    size stays the same (it does: one 80 ms frame at a time), so joining them to a chunk
    costs one conversion into place rather than two new arrays."""

    def __init__(self, history: int) -> None:
        self._kept = history
        self._buffer = np.zeros(history, dtype=np.float32)

    def _join(self, samples: np.ndarray) -> np.ndarray:
        """The kept history followed by ``samples``; keeps the new history for next time.
        The result is valid until the next call."""
        kept, buffer = self._kept, self._buffer
        if len(buffer) != kept + len(samples):
            grown = np.empty(kept + len(samples), dtype=np.float32)
            grown[:kept] = buffer[:kept]
            buffer = self._buffer = grown
            self._resized()
        buffer[kept:] = samples
        return buffer

    def _keep_tail(self) -> None:
        """After the chunk was filtered: its last samples become the history."""
        buffer = self._buffer
        buffer[: self._kept] = buffer[len(buffer) - self._kept :]

    def _resized(self) -> None:
        """The buffer changed; views of it must be rebuilt."""


class FirUpsampler(_StreamingFir):
    """Up by an integer ``ratio``: zero-stuffing and a low-pass, as ``ratio`` polyphase
    branches (default: 8 → 24 kHz with the telephone filter)."""

    def __init__(self, taps: np.ndarray | None = None, *, ratio: int = RATIO, rate: int = MODEL_RATE) -> None:
        taps = lowpass_taps() if taps is None else taps
        padded = np.zeros(-(-len(taps) // ratio) * ratio, dtype=np.float32)
        padded[: len(taps)] = taps * ratio  # zero-stuffing loses a factor ``ratio`` of energy
        # column p holds branch p (taps p, p+ratio, ...) reversed, to meet oldest-first windows
        self._branches = np.ascontiguousarray(padded.reshape(-1, ratio)[::-1])
        super().__init__(len(self._branches) - 1)
        self.name = f"fir{len(taps)}"
        self.held_back_ms = (len(taps) - 1) / 2 / rate * 1000

        self._windows: np.ndarray | None = None

    def _resized(self) -> None:
        self._windows = None

    def process(self, samples: np.ndarray) -> np.ndarray:
        if len(samples) == 0:
            return np.zeros(0, dtype=np.float32)
        joined = self._join(samples)
        windows = self._windows
        if windows is None:  # a view of the reused buffer: built once per chunk size
            windows = self._windows = sliding_windows(joined, len(self._branches), copy=False)
        # short rows: a product on the strided view beats copying it first
        out: np.ndarray = np.dot(windows, self._branches)
        self._keep_tail()
        return out.reshape(-1)


class FirDownsampler(_StreamingFir):
    """Down by an integer ``ratio``: the anti-aliasing low-pass, evaluated at every
    ``ratio``-th sample only (default: 24 → 8 kHz with the telephone filter)."""

    def __init__(self, taps: np.ndarray | None = None, *, ratio: int = RATIO, rate: int = MODEL_RATE) -> None:
        taps = lowpass_taps() if taps is None else taps
        self._taps = np.ascontiguousarray(taps[::-1])
        self._ratio = ratio
        super().__init__(len(taps) - 1)
        self._phase = 0  # input samples to skip before the next output sample
        self._windows: dict[int, np.ndarray] = {}
        self.name = f"fir{len(taps)}"
        self.held_back_ms = (len(taps) - 1) / 2 / rate * 1000

    def _resized(self) -> None:
        self._windows.clear()

    def process(self, samples: np.ndarray) -> np.ndarray:
        if len(samples) == 0:
            return np.zeros(0, dtype=np.float32)
        joined = self._join(samples)
        windows = self._windows.get(self._phase)
        if windows is None:  # views of the reused buffer, one per phase
            usable = joined[self._phase :] if self._phase else joined
            windows = self._windows[self._phase] = sliding_windows(usable, len(self._taps), self._ratio, copy=False)
        # on the strided view: a contiguous copy of the windows would be 73 times the
        # input (190 kB a frame, a fresh mapping every time) for the same result
        out: np.ndarray = np.dot(windows, self._taps)
        self._keep_tail()
        self._phase = (self._phase - len(samples)) % self._ratio
        return out


class SoxrResampler:
    """soxr's streaming resampler at a given quality (QQ, LQ, MQ, HQ, VHQ)."""

    def __init__(self, in_rate: int, out_rate: int, quality: str = "HQ") -> None:
        import soxr

        self._stream = soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality=quality)
        self.name = f"soxr-{quality.lower()}"
        self.held_back_ms = SOXR_HELD_BACK_MS.get(quality.upper(), float("nan"))

    def process(self, samples: np.ndarray) -> np.ndarray:
        resampled: np.ndarray = self._stream.resample_chunk(samples.astype(np.float32, copy=False))
        return resampled


# Mean delay of soxr's stream at 8↔24 kHz in the gateway's 80 ms frames, either way (the
# same both ways): by Little's law on what it holds after each frame, plus the impulse's
# shift (~0: soxr withholds output instead). Its output comes in bursts, so the worst case
# is about twice the mean (VHQ 17.5-152.5 ms). Measured by service.gateway.media.resample_delay;
# tests/test_gateway_media.py checks this table against it.
SOXR_HELD_BACK_MS = {"QQ": 0.2, "LQ": 22.3, "MQ": 43.7, "HQ": 42.7, "VHQ": 84.8}

RESAMPLERS = ("fir", "soxr-qq", "soxr-lq", "soxr-mq", "soxr-hq", "soxr-vhq")


# G.722's 16 kHz ↔ 24 kHz is 3/2: through 48 kHz, where one low-pass serves as both the
# anti-imaging and the anti-aliasing filter. Flat to 7 kHz (G.722's band), ≥ 60 dB down
# from 8.6 kHz, so what the model says above 8 kHz cannot fold back into G.722's band.
WIDEBAND_RATE = 16000
INTERMEDIATE_RATE = 48000


def wideband_16k_taps() -> np.ndarray:
    # 121 taps: a 60-sample delay at 48 kHz is whole at 24 kHz and at 16 kHz both, so a round
    # trip shifts the audio by whole samples (40 at 16 kHz) and an echo lines up exactly
    return lowpass_taps(121, 7750.0, INTERMEDIATE_RATE)


class Decimate:
    """Keeps every ``ratio``-th sample of an already band-limited stream (chunks of any size)."""

    def __init__(self, ratio: int) -> None:
        self._ratio = ratio
        self._phase = 0  # samples to skip before the next kept one
        self.name = f"every{ratio}"
        self.held_back_ms = 0.0

    def process(self, samples: np.ndarray) -> np.ndarray:
        out = samples[self._phase :: self._ratio]
        self._phase = (self._phase - len(samples)) % self._ratio
        return out


class ZeroStuff:
    """Inserts ``ratio - 1`` zeros after each sample (gain ``ratio``, keeping the level after
    the low-pass that must follow)."""

    def __init__(self, ratio: int) -> None:
        self._ratio = ratio
        self.name = f"stuff{ratio}"
        self.held_back_ms = 0.0

    def process(self, samples: np.ndarray) -> np.ndarray:
        out = np.zeros(len(samples) * self._ratio, dtype=np.float32)
        out[:: self._ratio] = samples
        out *= self._ratio
        return out


class Cascade:
    """Resampling stages run one after the other (a rational ratio via an intermediate rate)."""

    def __init__(self, *stages: StreamResampler) -> None:
        self._stages = stages
        self.name = "+".join(stage.name for stage in stages if not isinstance(stage, Decimate | ZeroStuff))
        self.held_back_ms = sum(stage.held_back_ms for stage in stages)

    def process(self, samples: np.ndarray) -> np.ndarray:
        for stage in self._stages:
            samples = stage.process(samples)
        return samples


# -- WebRTC: 48 kHz ↔ 24 kHz -------------------------------------------------------------
# Opus runs at 48 kHz, the model at 24: the ratio is exactly 2, so each direction is one
# short linear-phase FIR (a Kaiser-windowed sinc: flat to 10 kHz, ≥ 60 dB down from 12 kHz,
# the model's Nyquist frequency): the decimator filters and keeps every second sample, the
# interpolator zero-stuffs and filters as two polyphase branches, each a matrix product.
# 95 taps at 48 kHz hold back 0.98 ms each way, where soxr's HQ holds back several ms.

WEBRTC_RATE = 48000
WEBRTC_TAPS = 95
WEBRTC_CUTOFF_HZ = 11000.0


def wideband_taps() -> np.ndarray:
    return lowpass_taps(WEBRTC_TAPS, WEBRTC_CUTOFF_HZ, WEBRTC_RATE)


def Decimator48to24() -> FirDownsampler:  # noqa: N802 - a constructor by its role
    """48 → 24 kHz: the wideband anti-aliasing low-pass, keeping every second sample."""
    return FirDownsampler(wideband_taps(), ratio=WEBRTC_RATE // MODEL_RATE, rate=WEBRTC_RATE)


def Interpolator24to48() -> FirUpsampler:  # noqa: N802
    """24 → 48 kHz: zero-stuffing by 2 and the wideband low-pass (2 polyphase branches)."""
    return FirUpsampler(wideband_taps(), ratio=WEBRTC_RATE // MODEL_RATE, rate=WEBRTC_RATE)


def _fir_pair(rate: int) -> tuple[StreamResampler, StreamResampler]:
    if rate == TELEPHONE_RATE:
        return FirUpsampler(), FirDownsampler()
    if rate == WIDEBAND_RATE:
        taps = wideband_16k_taps()
        return (
            Cascade(FirUpsampler(taps, ratio=3, rate=INTERMEDIATE_RATE), Decimate(2)),
            Cascade(ZeroStuff(2), FirDownsampler(taps, ratio=3, rate=INTERMEDIATE_RATE)),
        )
    if rate == WEBRTC_RATE:
        return Decimator48to24(), Interpolator24to48()
    raise ValueError(f"no resampler between {rate} Hz and the model's {MODEL_RATE} Hz")


def make_pair(kind: str = "fir", rate: int = TELEPHONE_RATE) -> tuple[StreamResampler, StreamResampler]:
    """(``rate`` → 24 kHz, 24 kHz → ``rate``) resamplers of the named kind, for one call;
    ``rate`` is the codec's audio rate (8, 16 or 48 kHz)."""
    if kind == "fir":
        return _fir_pair(rate)
    if kind.startswith("soxr-"):
        quality = kind.removeprefix("soxr-").upper()
        return SoxrResampler(rate, MODEL_RATE, quality), SoxrResampler(MODEL_RATE, rate, quality)
    raise ValueError(f"unknown resampler {kind!r}; choose one of {', '.join(RESAMPLERS)}")
