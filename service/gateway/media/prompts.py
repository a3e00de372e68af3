"""Audio the gateway plays itself: announcements, messages and tones, as 80 ms model frames.

A :class:`Prompt` is ready-to-play audio at the model's rate (24 kHz, PCM16, cut into
``FRAME_BYTES`` frames), so it goes to the caller through the same edge, resampler and
pacer as the model's voice (:meth:`MediaPipeline.play`). Prompts are made once, when the
routes are loaded, never in the media path:

* :func:`tone` — built-in tones: ``ringback`` (Japan's: 400 Hz modulated at 16 Hz, one
  second on, two off) and ``ringback-us`` (440 + 480 Hz, two seconds on, four off);
* :func:`wav_prompt` — a WAV file (16-bit PCM, any rate, mono or stereo: the channels are
  mixed), resampled to 24 kHz; at most ``MAX_PROMPT_SECONDS``.

:class:`PromptPlayer` plays one on the loop's clock (a frame every 80 ms, no drift),
once or in a loop, until stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import typing as tp
import wave
from dataclasses import dataclass

import numpy as np

from service.wire import FRAME_BYTES, FRAME_SAMPLES, FRAME_SECONDS, SAMPLE_RATE

MAX_PROMPT_SECONDS = 600.0
MAX_WAV_BYTES = 64 * 1024 * 1024
TONE_LEVEL = 0.2  # of full scale: about -17 dBFS, a comfortable tone level on a phone


@dataclass(frozen=True)
class Prompt:
    """Audio to play: ``frames`` of ``FRAME_BYTES`` each; ``loop`` to repeat it until stopped."""

    name: str
    frames: tuple[bytes, ...]
    loop: bool = False

    @property
    def seconds(self) -> float:
        return len(self.frames) * FRAME_SECONDS


def _frames(samples: np.ndarray) -> tuple[bytes, ...]:
    """Float samples in [-1, 1] at 24 kHz → PCM16 frames (the last one padded with silence)."""
    count = max(1, -(-len(samples) // FRAME_SAMPLES))
    padded = np.zeros(count * FRAME_SAMPLES, dtype=np.float64)
    padded[: len(samples)] = samples
    pcm = (np.clip(padded, -1.0, 1.0) * 32767).astype("<i2").tobytes()
    return tuple(pcm[i : i + FRAME_BYTES] for i in range(0, len(pcm), FRAME_BYTES))


def _cadence(seconds_on: float, seconds_off: float, signal: tp.Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    t = np.arange(int(SAMPLE_RATE * (seconds_on + seconds_off))) / SAMPLE_RATE
    on = t < seconds_on
    ramp = np.minimum(1.0, np.minimum(t, seconds_on - t).clip(min=0) / 0.005)  # 5 ms edges: no clicks
    return np.where(on, signal(t) * ramp, 0.0)


TONE_SHAPES: dict[str, tp.Callable[[], np.ndarray]] = {
    # Japan (NTT): 400 Hz amplitude-modulated at 16 Hz, 1 s on, 2 s off
    "ringback": lambda: _cadence(
        1.0, 2.0, lambda t: TONE_LEVEL * np.sin(2 * np.pi * 400 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 16 * t))
    ),
    # North America: 440 + 480 Hz, 2 s on, 4 s off
    "ringback-us": lambda: _cadence(
        2.0, 4.0, lambda t: TONE_LEVEL / 2 * (np.sin(2 * np.pi * 440 * t) + np.sin(2 * np.pi * 480 * t))
    ),
}


def tone(name: str) -> Prompt:
    """A built-in tone (``TONE_SHAPES``), looping."""
    try:
        shape = TONE_SHAPES[name]
    except KeyError:
        raise ValueError(f"no tone {name!r} (tones: {', '.join(TONE_SHAPES)})") from None
    return Prompt(name=name, frames=_frames(shape()), loop=True)


def read_wav(path: str) -> tuple[np.ndarray, int]:
    """A WAV file's samples (mono, float in [-1, 1]) and rate; raises ValueError or OSError."""
    try:
        with wave.open(path, "rb") as wav:
            rate, width, channels, count = wav.getframerate(), wav.getsampwidth(), wav.getnchannels(), wav.getnframes()
            if width != 2:
                raise ValueError(f"{8 * width}-bit samples; a prompt must be 16-bit PCM")
            if not 8000 <= rate <= 192000 or not 1 <= channels <= 8:
                raise ValueError(f"{rate} Hz, {channels} channels: unusable")
            if count / rate > MAX_PROMPT_SECONDS or count * channels * width > MAX_WAV_BYTES:
                raise ValueError(f"{count / rate:.0f} s long; a prompt is at most {MAX_PROMPT_SECONDS:.0f} s")
            data = wav.readframes(count)
    except (wave.Error, EOFError) as exc:
        raise ValueError(f"not a PCM WAV file ({exc})") from None
    samples = np.frombuffer(data, "<i2").astype(np.float64) / 32768.0
    if channels > 1:
        samples = samples[: len(samples) // channels * channels].reshape(-1, channels).mean(axis=1)
    return samples, rate


def check_wav(path: str) -> None:
    """Raises ValueError or OSError when ``path`` is not a WAV file a prompt can be made of."""
    read_wav(path)


def wav_prompt(path: str, *, loop: bool = False) -> Prompt:
    """The WAV file at ``path`` as a prompt (see the module docstring)."""
    samples, rate = read_wav(path)
    if rate != SAMPLE_RATE:
        import soxr

        samples = soxr.resample(samples, rate, SAMPLE_RATE, quality="HQ")
    return Prompt(name=path, frames=_frames(samples), loop=loop)


class PromptPlayer:
    """Plays a prompt into ``sink`` one frame every 80 ms on the event loop's clock.

    ``done`` is set when a prompt that does not loop has played to its end, or when the
    player is stopped; ``keep_going()`` is asked before each frame (False stops it).
    """

    def __init__(
        self, prompt: Prompt, sink: tp.Callable[[bytes], None], keep_going: tp.Callable[[], bool] = lambda: True
    ) -> None:
        self.prompt = prompt
        self.sink = sink
        self.keep_going = keep_going
        self.done = asyncio.Event()
        self.frames_played = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None and not self.done.is_set():
            self._task = asyncio.create_task(self._run(), name=f"prompt-{self.prompt.name[-40:]}")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        frames = self.prompt.frames
        started = loop.time()
        try:
            index = 0
            while self.keep_going():
                if index == len(frames):
                    if not self.prompt.loop:
                        break
                    index = 0
                self.sink(frames[index])
                index += 1
                self.frames_played += 1
                await asyncio.sleep(max(0.0, started + self.frames_played * FRAME_SECONDS - loop.time()))
        finally:
            self.done.set()

    async def stop(self) -> None:
        """Stop playing (idempotent); frames already handed to the sink still play out."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.done.set()
