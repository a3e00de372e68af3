"""Helpers for the ASR tests: the demo model in a test cache, an OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import contextlib
import io
import typing as tp
import wave

import numpy as np
from fastapi import FastAPI, File, Form, Header, HTTPException, UploadFile

from service.asr.backends import FasterWhisperBackend


def wav_to_float(data: bytes) -> np.ndarray:
    with wave.open(io.BytesIO(data)) as w:
        if (w.getnchannels(), w.getsampwidth(), w.getframerate()) != (1, 2, 16000):
            raise ValueError("not mono PCM16 at 16 kHz")
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0


def transcription_app(backend: FasterWhisperBackend, api_key: str):
    """A real OpenAI-compatible ``/v1/audio/transcriptions`` server with faster-whisper behind it."""
    app = FastAPI()
    app.state.requests = []

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(file: UploadFile = File(...), model: str = Form(...),  # noqa: B008
                             language: str | None = Form(None), response_format: str = Form("json"),
                             authorization: str | None = Header(None)) -> dict:
        if authorization != f"Bearer {api_key}":
            raise HTTPException(401, "bad key")
        if model == "broken":
            raise HTTPException(500, "model crashed")
        audio = wav_to_float(await file.read())
        app.state.requests.append({"model": model, "language": language, "format": response_format,
                                   "samples": len(audio)})
        [result] = await backend.transcribe([audio])
        return {"text": result.text}

    return app


@contextlib.asynccontextmanager
async def serving(app: tp.Any) -> tp.AsyncIterator[int]:
    """Serve an ASGI app with uvicorn on a free loopback port in this event loop."""
    import uvicorn

    from service.worker.main import UvicornServer, listen_socket

    sock = listen_socket("127.0.0.1", 0)
    server = UvicornServer(uvicorn.Config(app, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield sock.getsockname()[1]  # the socket listens already: connections wait for the server
    finally:
        server.should_exit = True
        await asyncio.gather(task, return_exceptions=True)
        sock.close()
