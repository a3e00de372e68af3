"""Cutting a caller's audio into utterances with Silero VAD (pure: no I/O, no clock).

Fed the caller's audio as it comes (PCM16 or float32 at any rate, each chunk with the
call-clock time of its first sample: seconds since the call was answered, the clock of the
agent's transcript pieces), the segmenter resamples it to 16 kHz, asks the VAD for one
speech probability per 32 ms window and returns each finished utterance: its speech start
and end on the same clock, and its 16 kHz PCM16 audio with ``pad_ms`` of context on both
sides (what ASR models want).

Rules (Silero's own, made streaming):

- speech starts at the first window whose probability reaches ``threshold``;
- it ends where the probability fell below ``threshold - 0.15`` and stayed there for
  ``min_silence_ms``; an utterance shorter than ``min_speech_ms`` is dropped (a cough, a
  click) and counted in ``dropped_short``;
- an utterance reaching ``max_utterance_s`` is cut at its last pause of at least
  ``split_silence_ms`` (the next one starts where speech resumed), or, with no pause, hard
  at the limit (``forced``).

Audio is kept only for the utterance in progress plus the padding before it, so memory is
bounded by ``max_utterance_s``. A gap in the chunks' times (audio that never came) is
filled with silence so that the clock stays right; audio arriving earlier than expected is
taken as contiguous (the taps the gateway feeds are continuous after concealment).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import numpy as np

from service.asr.vad import SAMPLE_RATE, WINDOW_SAMPLES, SileroVad, VadStream

GAP_TOLERANCE_S = 0.1  # later than expected by more than this: the missing audio is silence
MAX_GAP_S = 5.0  # a bigger jump restarts the clock at the new time instead of filling it


@dataclass(frozen=True)
class SegmenterConfig:
    """Where utterances begin and end. Times in ms unless named ``_s``."""

    threshold: float = 0.5
    min_speech_ms: int = 250
    min_silence_ms: int = 400
    max_utterance_s: float = 20.0
    pad_ms: int = 200
    split_silence_ms: int = 100

    def __post_init__(self) -> None:
        if not 0.15 < self.threshold < 1.0:
            raise ValueError("threshold must be between 0.15 and 1")
        if self.pad_ms < 0 or self.pad_ms > self.min_silence_ms:
            raise ValueError(
                "pad_ms must be between 0 and min_silence_ms (the end padding is the silence that ended the utterance)"
            )
        if self.min_speech_ms < 0 or self.min_silence_ms < 32 or self.split_silence_ms < 32:
            raise ValueError("min_speech_ms must be >= 0, min_silence_ms and split_silence_ms >= 32")
        if self.max_utterance_s < 1.0 or self.max_utterance_s > 30.0:
            raise ValueError("max_utterance_s must be between 1 and 30 (Whisper hears 30 s at most)")

    @property
    def neg_threshold(self) -> float:
        return self.threshold - 0.15


@dataclass
class Utterance:
    """One stretch of the caller's speech."""

    start: float  # speech start, seconds on the call clock
    end: float  # speech end
    audio_start: float  # the time of ``pcm``'s first sample (``start`` minus the padding)
    pcm: bytes = field(repr=False)  # PCM16 little-endian mono at 16 kHz, padding included
    forced: bool = False  # cut at ``max_utterance_s`` without a pause

    @property
    def audio_seconds(self) -> float:
        return len(self.pcm) / 2 / SAMPLE_RATE


def to_float(chunk: bytes | np.ndarray) -> np.ndarray:
    """PCM16 bytes, an int16 array or a float array (in [-1, 1]) as float32."""
    if isinstance(chunk, bytes | bytearray | memoryview):
        if len(chunk) % 2:
            raise ValueError("PCM16 audio must have an even number of bytes")
        return np.frombuffer(chunk, dtype="<i2").astype(np.float32) / 32768.0
    array = np.asarray(chunk)
    if array.ndim != 1:
        raise ValueError("audio must be mono (one dimension)")
    if array.dtype == np.int16:
        return array.astype(np.float32) / 32768.0
    if array.dtype.kind == "f":
        return array.astype(np.float32, copy=False)
    raise ValueError(f"audio must be PCM16 or float, got {array.dtype}")


class _Audio:
    """The 16 kHz samples still needed, as chunks, addressed by absolute sample index."""

    def __init__(self) -> None:
        self.chunks: collections.deque[np.ndarray] = collections.deque()
        self.start = 0  # absolute index of the first kept sample
        self.end = 0  # absolute index after the last sample

    def append(self, samples: np.ndarray) -> None:
        if len(samples):
            self.chunks.append(samples)
            self.end += len(samples)

    def drop_before(self, index: int) -> None:
        while self.chunks and self.start + len(self.chunks[0]) <= index:
            self.start += len(self.chunks.popleft())

    def slice(self, begin: int, end: int) -> np.ndarray:
        begin, end = max(begin, self.start), min(end, self.end)
        if end <= begin:
            return np.zeros(0, dtype=np.float32)
        joined = np.concatenate(self.chunks) if len(self.chunks) > 1 else self.chunks[0]
        if len(self.chunks) > 1:
            self.chunks = collections.deque([joined])
        return joined[begin - self.start : end - self.start]


class UtteranceSegmenter:
    """Per call: ``feed(chunk, t)`` returns the utterances that chunk finished; ``flush()``
    at the end of the call returns the one in progress (if long enough). A worker that
    batches the VAD of many calls uses ``push``, runs ``vad``'s windows, then ``advance``."""

    # the stream's clock and the utterance in progress, (re)set by _reset_stream
    _t0: float | None
    _in_samples: int
    _vad_samples: int
    _triggered: bool
    _speech_start: int

    def __init__(self, rate: int, config: SegmenterConfig | None = None, vad: SileroVad | None = None) -> None:
        if rate < 8000 or rate > 192000:
            raise ValueError(f"unsupported sample rate {rate}")
        self.rate = rate
        self.config = config or SegmenterConfig()
        self._model = vad or SileroVad.shared()
        self._ms = SAMPLE_RATE // 1000
        self._reset_stream()
        self.utterances = 0
        self.dropped_short = 0
        self.gaps_filled = 0

    # -- input -------------------------------------------------------------------------

    def feed(self, chunk: bytes | np.ndarray, t: float) -> list[Utterance]:
        """Take one chunk whose first sample is at call time ``t``; the utterances it ended
        (the VAD runs at once, on this stream alone)."""
        done = self.push(chunk, t)
        self._vad.run_pending()
        return done + self.advance()

    def push(self, chunk: bytes | np.ndarray, t: float) -> list[Utterance]:
        """Take one chunk without running the VAD: whoever batches the VAD of many streams
        runs ``self.vad``'s pending windows, then calls :meth:`advance`. Returns what a jump
        in time closed (usually nothing)."""
        samples = to_float(chunk)
        if self._t0 is None:
            self._t0 = t
        else:
            expected = self._t0 + self._in_samples / self.rate
            gap = t - expected
            if GAP_TOLERANCE_S < gap <= MAX_GAP_S:
                self.gaps_filled += 1
                samples = np.concatenate([np.zeros(round(gap * self.rate), dtype=np.float32), samples])
            elif gap > MAX_GAP_S:
                return self._restart(samples, t)
        self._in_samples += len(samples)
        resampled = samples if self._resampler is None else self._resampler.resample_chunk(samples)
        self._audio.append(resampled)
        self._vad.push(resampled)
        return []

    @property
    def vad(self) -> VadStream:
        """This stream's VAD (its pending windows are run by ``feed`` or by a batcher)."""
        return self._vad

    def flush(self) -> list[Utterance]:
        """The call ended: the utterance in progress, if it is long enough (after the
        windows already run)."""
        done = self.advance()
        if self._triggered:
            end = self._silence_start if self._silence_start is not None else self._vad_samples
            self._emit(done, self._speech_start, end, forced=False)
            self._triggered = False
        return done

    @property
    def needed_from(self) -> float | None:
        """The call time from which this stream's audio is still needed (the utterance in
        progress and its padding, or the audio the VAD has not judged yet); None before any
        audio. A segmenter started afresh at this time finds every utterance not yet ended."""
        if self._t0 is None:
            return None
        start = self._speech_start if self._triggered else self._vad_samples
        return self._t0 + max(0, start - self.config.pad_ms * self._ms) / SAMPLE_RATE

    def _reset_stream(self) -> None:
        """A new stream: no audio, no clock, fresh VAD and resampler state."""
        self._vad = self._model.stream()
        self._resampler = None
        if self.rate != SAMPLE_RATE:
            import soxr

            self._resampler = soxr.ResampleStream(self.rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        self._audio = _Audio()
        self._t0 = None  # the call-clock time of 16 kHz sample 0
        self._in_samples = 0  # input samples taken (at ``rate``), gaps included
        self._vad_samples = 0  # 16 kHz samples given to the VAD
        # the utterance in progress (sample indices at 16 kHz)
        self._triggered = False
        self._speech_start = 0
        self._silence_start: int | None = None
        self._split: tuple[int, int] | None = None  # the last long-enough pause: (start, resume)

    def _restart(self, samples: np.ndarray, t: float) -> list[Utterance]:
        """A jump in time too big to fill: close what is open, restart the clock at ``t``.
        The windows not run yet are run first, here (this stream alone)."""
        self._vad.run_pending()
        done = self.flush()
        self.gaps_filled += 1
        self._reset_stream()
        return done + self.push(samples, t)

    # -- segmentation ------------------------------------------------------------------

    def advance(self) -> list[Utterance]:
        """Step through the probabilities the VAD computed since the last call; the
        utterances they ended."""
        done: list[Utterance] = []
        for prob in self._vad.take():
            begin = self._vad_samples
            self._vad_samples += WINDOW_SAMPLES
            self._step(prob, begin, self._vad_samples, done)
        keep_from = (self._speech_start if self._triggered else self._vad_samples) - self.config.pad_ms * self._ms
        self._audio.drop_before(keep_from)
        return done

    def _step(self, prob: float, begin: int, end: int, done: list[Utterance]) -> None:
        config, ms = self.config, self._ms
        if not self._triggered:
            if prob >= config.threshold:
                self._triggered = True
                self._speech_start = begin
                self._silence_start = None
                self._split = None
            return
        if prob >= config.threshold:
            if self._silence_start is not None:
                if begin - self._silence_start >= config.split_silence_ms * ms:
                    self._split = (self._silence_start, begin)
                self._silence_start = None
        elif prob < config.neg_threshold:
            if self._silence_start is None:
                self._silence_start = begin
            if end - self._silence_start >= config.min_silence_ms * ms:
                self._emit(done, self._speech_start, self._silence_start, forced=False)
                self._triggered = False
                return
        if end - self._speech_start >= config.max_utterance_s * SAMPLE_RATE:
            split = self._split
            if split is not None and split[0] - self._speech_start >= config.min_speech_ms * ms:
                self._emit(done, self._speech_start, split[0], forced=False)
                self._speech_start = split[1]
            else:
                self._emit(done, self._speech_start, end, forced=True)
                self._speech_start = end
            self._split = None
            if self._silence_start is not None and self._silence_start < self._speech_start:
                self._silence_start = self._speech_start

    def _emit(self, done: list[Utterance], start: int, end: int, *, forced: bool) -> None:
        if end - start < self.config.min_speech_ms * self._ms:
            self.dropped_short += 1
            return
        pad = self.config.pad_ms * self._ms
        audio_begin = max(start - pad, self._audio.start, 0)
        audio = self._audio.slice(audio_begin, end + pad)
        pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
        t0 = self._t0 or 0.0
        self.utterances += 1
        done.append(
            Utterance(
                start=t0 + start / SAMPLE_RATE,
                end=t0 + end / SAMPLE_RATE,
                audio_start=t0 + audio_begin / SAMPLE_RATE,
                pcm=pcm,
                forced=forced,
            )
        )
