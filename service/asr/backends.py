"""ASR backends: a batch of utterances (16 kHz float32) in, one text each out.

- ``FasterWhisperBackend``: a Whisper-family model in CTranslate2 format through
  faster-whisper's loader (a Hugging Face repo id such as
  ``kotoba-tech/kotoba-whisper-v2.0-faster``, a local directory, or ``demo``: a tiny
  random-weight model built locally). A batch is one ``generate`` call: every utterance's
  log-mel features stacked, one Japanese transcription prompt each, greedy or beam search.
- ``OpenAIBackend``: an OpenAI-compatible ``POST {base}/audio/transcriptions`` (vLLM and
  others serve Whisper models this way): one multipart request per utterance, a batch's
  requests concurrently.

Both are async (``transcribe``); the model runs in its own thread, never on the event loop.
A failure of one utterance is that utterance's ``error``; the others are unaffected.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import logging
import math
import os
import typing as tp
import unicodedata
import wave
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
KOTOBA_MODEL = "kotoba-tech/kotoba-whisper-v2.0-faster"
DEMO_BANNER = (
    "ASR model 'demo': a TINY RANDOM-WEIGHT Whisper built locally for trying the pipeline; "
    "its text is MEANINGLESS. Use --model kotoba-tech/kotoba-whisper-v2.0-faster (with a GPU) "
    "for real transcripts."
)
MAX_NEW_TOKENS_BASE = 16
MAX_NEW_TOKENS_PER_SECOND = 12  # Japanese speech is about 8 characters a second; more is a loop
MAX_DECODER_POSITIONS = 448
NO_SPEECH_PROBABILITY = 0.6
NO_SPEECH_LOGPROB = -1.0


@dataclass
class Transcription:
    """One utterance's result: its text, or why there is none."""

    text: str = ""
    error: str | None = None


class Backend(tp.Protocol):
    name: str  # what the worker registers as its model
    random_weights: bool

    async def transcribe(self, batch: list[np.ndarray]) -> list[Transcription]: ...

    async def close(self) -> None: ...


def clean_text(text: str) -> str:
    """Plain text: no control characters or replacement characters (a byte-level BPE split
    inside a character decodes to U+FFFD), whitespace trimmed."""
    kept = (ch for ch in text if ch != "\ufffd" and unicodedata.category(ch)[0] != "C")
    return "".join(kept).strip()


def max_new_tokens(seconds: float) -> int:
    return min(440, MAX_NEW_TOKENS_BASE + math.ceil(MAX_NEW_TOKENS_PER_SECOND * seconds))


class FasterWhisperBackend:
    """A Whisper-family model on CTranslate2, batched."""

    def __init__(
        self,
        model: str,
        *,
        device: str = "cpu",
        compute_type: str = "default",
        cpu_threads: int = 1,
        language: str = "ja",
        beam_size: int = 1,
        revision: str | None = None,
        download_root: str | None = None,
    ) -> None:
        from faster_whisper import WhisperModel

        from service.asr.tinywhisper import demo_whisper, random_weights

        self.name = model
        path = str(demo_whisper()) if model == "demo" else model
        self.random_weights = os.path.isdir(path) and random_weights(path)
        if model == "demo":
            log.warning(DEMO_BANNER)
        elif self.random_weights:
            log.warning("ASR model %s has RANDOM WEIGHTS: its text is meaningless", model)
        self.device = device
        self.whisper = WhisperModel(
            path,
            device=device,
            compute_type=compute_type,
            cpu_threads=cpu_threads,
            revision=revision,
            download_root=download_root,
        )
        self.beam_size = beam_size
        tokenizer = self.whisper.hf_tokenizer
        self.eot = tokenizer.token_to_id("<|endoftext|>")
        prompt = [
            tokenizer.token_to_id("<|startoftranscript|>"),
            tokenizer.token_to_id(f"<|{language}|>"),
            tokenizer.token_to_id("<|transcribe|>"),
            tokenizer.token_to_id("<|notimestamps|>"),
        ]
        if prompt[0] is None or self.eot is None:
            raise ValueError(f"{model}: not a Whisper tokenizer (no <|startoftranscript|> or <|endoftext|>)")
        if prompt[1] is None and self.whisper.model.is_multilingual:
            raise ValueError(f"{model}: no language token <|{language}|>")
        self.prompt = [token for token in prompt if token is not None]
        self.n_mels = self.whisper.model.n_mels
        self.frames = self.whisper.feature_extractor.nb_max_frames
        # One thread: CTranslate2 runs one batch at a time; the batcher forms the batches.
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="asr-model")

    def features(self, audio: np.ndarray) -> np.ndarray:
        from faster_whisper.audio import pad_or_trim

        features: np.ndarray = pad_or_trim(self.whisper.feature_extractor(audio), self.frames)
        return features

    def _max_length(self, seconds: float) -> int:
        # CTranslate2's Whisper stops at about half of ``max_length`` new tokens (measured on
        # 4.8: 2 tokens at 5, 202 at 404), so the bound asked for is twice the one wanted,
        # within the decoder's 448 positions; each result is then cut to its own bound.
        return min(MAX_DECODER_POSITIONS, 2 * (len(self.prompt) + max_new_tokens(seconds)))

    def transcribe_sync(self, batch: list[np.ndarray]) -> list[Transcription]:
        """One batch through the model (blocking; the model's thread)."""
        import ctranslate2

        if not batch:
            return []
        features = np.ascontiguousarray(np.stack([self.features(audio) for audio in batch]))
        longest = max(len(audio) for audio in batch) / SAMPLE_RATE
        results = self.whisper.model.generate(
            ctranslate2.StorageView.from_array(features),
            [self.prompt] * len(batch),
            beam_size=self.beam_size,
            max_length=self._max_length(longest),
            return_scores=True,
            return_no_speech_prob=True,
            suppress_blank=True,
            suppress_tokens=[-1],
        )
        out = []
        for audio, result in zip(batch, results, strict=True):
            # each utterance's own bound, whatever the longest in its batch allowed
            tokens = result.sequences_ids[0][: max_new_tokens(len(audio) / SAMPLE_RATE)]
            tokens = [token for token in tokens if token < self.eot]
            avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1) if result.scores else 0.0
            if result.no_speech_prob > NO_SPEECH_PROBABILITY and avg_logprob < NO_SPEECH_LOGPROB:
                out.append(Transcription(""))  # Whisper's own rule: this was not speech
                continue
            out.append(Transcription(clean_text(self.whisper.hf_tokenizer.decode(tokens))))
        return out

    async def transcribe(self, batch: list[np.ndarray]) -> list[Transcription]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.transcribe_sync, batch)

    async def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def wav_bytes(audio: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    """A mono PCM16 WAV file of float audio in [-1, 1]."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes())
    return buffer.getvalue()


class OpenAIBackend:
    """An OpenAI-compatible transcription endpoint (``{base_url}/audio/transcriptions``)."""

    random_weights = False

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        language: str = "ja",
        timeout: float = 30.0,
        concurrency: int = 8,
    ) -> None:
        import httpx

        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base URL {base_url!r} is not http:// or https://")
        self.url = base_url.rstrip("/") + "/audio/transcriptions"
        self.name = model
        self.model = model
        self.language = language
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(timeout=timeout, headers=headers)
        self._limit = asyncio.Semaphore(concurrency)

    async def _one(self, audio: np.ndarray) -> Transcription:
        import httpx

        async with self._limit:
            try:
                response = await self._client.post(
                    self.url,
                    files={"file": ("utterance.wav", wav_bytes(audio), "audio/wav")},
                    data={"model": self.model, "language": self.language, "response_format": "json"},
                )
            except httpx.HTTPError as exc:
                return Transcription(error=f"transcription endpoint unreachable: {type(exc).__name__}")
        if response.status_code != 200:
            return Transcription(error=f"transcription endpoint answered {response.status_code}")
        try:
            text = response.json()["text"]
        except (ValueError, KeyError, TypeError):
            return Transcription(error="transcription endpoint answered without a text")
        if not isinstance(text, str):
            return Transcription(error="transcription endpoint answered without a text")
        return Transcription(clean_text(text))

    async def transcribe(self, batch: list[np.ndarray]) -> list[Transcription]:
        return list(await asyncio.gather(*(self._one(audio) for audio in batch)))

    async def close(self) -> None:
        await self._client.aclose()
