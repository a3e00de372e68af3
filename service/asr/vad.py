"""Silero VAD on onnxruntime: speech probabilities for 32 ms windows of 16 kHz audio.

The weights are the ONNX file the ``silero-vad`` pip package ships (``silero_vad/data``).
The package's own Python wrapper imports torch, which the gateway image does not have, so
the file is located without importing the package and run on onnxruntime directly: one
thread, CPU, about 0.06 ms per window (2 ms of CPU per second of a call).

One ``SileroVad`` (the loaded model) is shared by every call of a process; each call keeps
its own recurrent state in a ``VadStream``. The ASR worker runs the windows of all its
calls in batches (``batch_inputs``/``commit_batch``, ``service/asr/vad_batcher.py``): one
model run for many streams costs far less than one per stream.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
WINDOW_SAMPLES = 512  # 32 ms: the window the 16 kHz model is trained on
CONTEXT_SAMPLES = 64  # the tail of the previous window the model sees before each window
STATE_SHAPE = (2, 1, 128)
MODEL_FILE = "silero_vad.onnx"


class VadUnavailable(RuntimeError):
    """The silero-vad package (for its weights) or onnxruntime is not installed."""


def model_path() -> Path:
    """The ONNX file inside the installed silero-vad package (found without importing it)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise VadUnavailable("the silero-vad package is not installed (pip install --no-deps silero-vad)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / MODEL_FILE
    if not path.is_file():
        raise VadUnavailable(f"silero-vad is installed but {path} is missing")
    return path


class SileroVad:
    """The loaded model; thread-safe, shared by all streams of a process."""

    _shared: SileroVad | None = None
    _shared_lock = threading.Lock()

    def __init__(self, path: str | Path | None = None) -> None:
        try:
            import onnxruntime
        except ImportError as exc:
            raise VadUnavailable("onnxruntime is not installed") from exc
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(
            str(path or model_path()), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)

    @classmethod
    def shared(cls) -> SileroVad:
        """The process-wide instance, loaded on first use."""
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def run(self, windows: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities for a batch: ``windows`` is (B, CONTEXT + WINDOW) float32 in [-1, 1],
        ``state`` (2, B, 128). Returns (probabilities (B,), new state)."""
        out, new_state = self.session.run(None, {"input": windows, "state": state, "sr": self._sr})
        return out[:, 0], new_state

    def stream(self) -> VadStream:
        return VadStream(self)


class VadStream:
    """One audio stream's VAD: 16 kHz float32 samples in, one probability per 32 ms out.

    ``process(samples)`` runs the model at once (one stream); a worker batching many streams
    instead ``push``es samples, takes each stream's next window with :func:`run_batch`, and
    reads the probabilities back with ``take``.
    """

    def __init__(self, model: SileroVad) -> None:
        self.model = model
        self.state = np.zeros(STATE_SHAPE, dtype=np.float32)
        self._buffer = np.zeros(CONTEXT_SAMPLES, dtype=np.float32)  # context, then pending samples
        self._head = 0  # where the next window's context starts in ``_buffer``
        self._probabilities: list[float] = []
        self.windows = 0

    @property
    def pending(self) -> int:
        """Whole windows pushed and not run yet."""
        return (len(self._buffer) - self._head - CONTEXT_SAMPLES) // WINDOW_SAMPLES

    @property
    def pending_samples(self) -> int:
        return len(self._buffer) - self._head - CONTEXT_SAMPLES

    def push(self, samples: np.ndarray) -> None:
        """Queue samples for the VAD (no inference)."""
        if len(samples):
            self._buffer = np.concatenate([self._buffer[self._head :], samples.astype(np.float32, copy=False)])
            self._head = 0

    def window(self) -> np.ndarray:
        """The next window with its context (CONTEXT + WINDOW samples); needs ``pending``."""
        return self._buffer[self._head : self._head + CONTEXT_SAMPLES + WINDOW_SAMPLES]

    def commit(self, probability: float, state: np.ndarray) -> None:
        """The next window was run: its probability and the model's new state."""
        self.state = state
        self._head += WINDOW_SAMPLES
        self._probabilities.append(probability)
        self.windows += 1

    def take(self) -> list[float]:
        """The probabilities computed since the last ``take``, in order."""
        out, self._probabilities = self._probabilities, []
        return out

    def run_pending(self) -> None:
        """Run every pending window now, one at a time (one stream, no batching)."""
        while self.pending:
            prob, state = self.model.run(self.window()[np.newaxis, :], self.state)
            self.commit(float(prob[0]), state)

    def process(self, samples: np.ndarray) -> np.ndarray:
        """Probabilities of the windows completed by ``samples`` (in order; may be empty)."""
        self.push(samples)
        self.run_pending()
        return np.asarray(self.take(), dtype=np.float32)


def batch_inputs(streams: list[VadStream]) -> tuple[np.ndarray, np.ndarray]:
    """The next window of each stream (each must have one pending) and their states, stacked
    for one batched run: ``(B, CONTEXT + WINDOW)`` and ``(2, B, 128)``."""
    windows = np.stack([stream.window() for stream in streams])
    states = np.concatenate([stream.state for stream in streams], axis=1)
    return windows, states


def commit_batch(streams: list[VadStream], probabilities: np.ndarray, states: np.ndarray) -> None:
    """Hand each stream its window's result from a batched run."""
    for i, stream in enumerate(streams):
        stream.commit(float(probabilities[i]), np.ascontiguousarray(states[:, i : i + 1, :]))
