"""Helpers for the ASR tests: the demo model in a test cache, an OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import contextlib
import io
import typing as tp
import wave
from pathlib import Path

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
    async def transcriptions(
        file: UploadFile = File(...),
        model: str = Form(...),
        language: str | None = Form(None),
        response_format: str = Form("json"),
        authorization: str | None = Header(None),
    ) -> dict:
        if authorization != f"Bearer {api_key}":
            raise HTTPException(401, "bad key")
        if model == "broken":
            raise HTTPException(500, "model crashed")
        audio = wav_to_float(await file.read())
        app.state.requests.append(
            {"model": model, "language": language, "format": response_format, "samples": len(audio)}
        )
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


class AsrWorkerProcess:
    """``moshimoshi asr`` as a real child process on a free port."""

    def __init__(
        self,
        log_dir: Path,
        model: str | Path,
        *,
        worker_id: str = "asr-test",
        redis_url: str | None = None,
        extra: tp.Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        from tests.support.procs import free_port
        from tests.support.services import Process

        self.port = free_port()
        self.worker_id = worker_id
        environment = {"MOSHIMOSHI_ASR_LOG_LEVEL": "info", **(env or {})}
        if redis_url:
            environment["REDIS_URL"] = redis_url
        self.proc = Process(
            worker_id,
            [
                "asr",
                "--model",
                str(model),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--worker-id",
                worker_id,
                "--heartbeat-seconds",
                "0.5",
                "--cpu-threads",
                "1",
                *extra,
            ],
            log_dir,
            env=environment,
        )

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/asr"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def wait_ready(self, timeout: float = 90.0) -> None:
        import httpx

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with httpx.AsyncClient() as client:
            while loop.time() < deadline:
                if not self.proc.alive():
                    raise AssertionError(f"{self.worker_id} exited:\n{self.proc.log()[-3000:]}")
                try:
                    if (await client.get(self.http + "/readyz", timeout=2)).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError(f"{self.worker_id} not ready within {timeout} s:\n{self.proc.log()[-3000:]}")

    async def wait_registered(self, client: tp.Any, timeout: float = 30.0) -> None:
        from service.pool import RegistryReader
        from tests.support.pool import eventually

        async def registered() -> bool:
            return any(
                w.worker_id == self.worker_id and w.alive and w.state == "ready"
                for w in await RegistryReader(client).workers()
            )

        await eventually(registered, timeout=timeout, interval=0.1, what=f"{self.worker_id} registered")

    def stop(self) -> int | None:
        return self.proc.stop()
