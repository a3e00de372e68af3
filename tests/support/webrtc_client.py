"""A WHIP-style WebRTC test client on aiortc: plays PCM, records what comes back."""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import time
import typing as tp
import wave
from pathlib import Path

import httpx
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame

RATE = 48000
PACKET = 960  # 20 ms


def speech_like(seconds: float, seed: int = 5) -> np.ndarray:
    """Syllables of voiced harmonics, each with its own length, pitch glide and timbre, with
    pauses between: survives Opus, and no half second of it resembles another."""
    rate = RATE
    rng = np.random.default_rng(seed)
    out = np.zeros(int(seconds * rate))
    at = 0
    while at < len(out):
        length = int(rng.uniform(0.12, 0.3) * rate)
        t = np.arange(length) / rate
        pitch = np.linspace(rng.uniform(90, 220), rng.uniform(90, 220), length)
        phase = 2 * np.pi * np.cumsum(pitch) / rate
        syllable = sum(rng.uniform(0.1, 1) * np.sin(k * phase + rng.uniform(0, 6)) / k for k in range(1, 10))
        syllable *= np.sqrt(np.clip(np.sin(np.pi * t / t[-1]), 0, 1))  # no clicks at the edges
        out[at : at + length] = syllable[: len(out) - at]
        at += length + int(rng.uniform(0.03, 0.12) * rate)
    return (out / np.max(np.abs(out)) * 14000).astype(np.int16)


def write_wav(path: Path, pcm: np.ndarray, rate: int = RATE) -> Path:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(pcm.astype("<i2").tobytes())
    return path


class PcmTrack(MediaStreamTrack):
    """Plays int16 mono 48 kHz PCM in real time (20 ms frames), then silence (or, with
    ``loop``, the PCM again and again)."""

    kind = "audio"

    def __init__(self, pcm: np.ndarray | None = None, *, loop: bool = False) -> None:
        super().__init__()
        self.pcm = np.zeros(0, dtype=np.int16) if pcm is None else pcm.astype(np.int16)
        self.loop = loop and len(self.pcm) > 0
        self.sent = 0
        self.started_at: float | None = None

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self.started_at is None:
            self.started_at = time.monotonic()
        due = self.started_at + self.sent / RATE
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        start = self.sent % len(self.pcm) if self.loop else self.sent
        chunk = self.pcm[start : start + PACKET]
        if len(chunk) < PACKET:
            chunk = np.concatenate((chunk, np.zeros(PACKET - len(chunk), dtype=np.int16)))
        frame = AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.time_base = fractions.Fraction(1, RATE)
        frame.pts = self.sent
        self.sent += PACKET
        return frame


class WebRtcClient:
    """One call to the gateway's /v1/webrtc/offer; ``received`` is the decoded audio (48 kHz mono)."""

    def __init__(
        self, base_url: str, *, token: str | None = None, pcm: np.ndarray | None = None, data_channel: bool = True
    ) -> None:
        self.base_url = base_url
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.track = PcmTrack(pcm)
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pc.addTransceiver(self.track, direction="sendrecv")
        self.channel = self.pc.createDataChannel("events") if data_channel else None
        self.messages: list[dict[str, tp.Any]] = []
        if self.channel is not None:
            self.channel.on("message", lambda m: self.messages.append(json.loads(m)))
        self.received: list[np.ndarray] = []
        self.location: str | None = None
        self.call_id: str | None = None
        self._reader: asyncio.Task | None = None
        self.pc.on("track", self._on_track)

    def _on_track(self, track: MediaStreamTrack) -> None:
        self._reader = asyncio.ensure_future(self._read(track))

    async def _read(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                pcm = (
                    frame.to_ndarray().reshape(-1, len(frame.layout.channels))[:, 0]
                    if frame.format.is_packed
                    else frame.to_ndarray()[0]
                )
                self.received.append(pcm.astype(np.int16))

    async def offer_sdp(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def post_offer(self, sdp: str) -> httpx.Response:
        async with httpx.AsyncClient() as http:
            return await http.post(
                self.base_url + "/v1/webrtc/offer",
                content=sdp.encode(),
                headers={**self.headers, "Content-Type": "application/sdp"},
                timeout=30,
            )

    async def call(self) -> httpx.Response:
        """Offer, and on 201 apply the answer (the connection then comes up by itself)."""
        response = await self.post_offer(await self.offer_sdp())
        if response.status_code == 201:
            self.location = response.headers["location"]
            self.call_id = response.headers.get("x-moshimoshi-call-id")
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=response.text, type="answer"))
        return response

    async def wait_connected(self, within: float = 20.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while self.pc.connectionState != "connected":
            if loop.time() > deadline:
                raise AssertionError(f"not connected after {within}s: {self.pc.connectionState}")
            await asyncio.sleep(0.05)

    async def hang_up(self) -> httpx.Response:
        assert self.location is not None
        async with httpx.AsyncClient() as http:
            return await http.delete(self.base_url + self.location, headers=self.headers, timeout=10)

    def audio(self) -> np.ndarray:
        return np.concatenate(self.received) if self.received else np.zeros(0, dtype=np.int16)

    async def close(self) -> None:
        self.track.stop()
        await self.pc.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
