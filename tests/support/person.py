"""The person a call is transferred to: baresip as a SIP UAS playing a tone, and how to
read a caller's recording (which tone it heard, and how long it heard nothing).

baresip 1.0 answers by itself with the account parameter ``answermode=auto`` (``manual``:
it rings until the call is cancelled); its ``aufile`` source plays a WAV (a long tone
here); ``-t`` quits after that many seconds, hanging up (BYE) a call in progress.
"""

from __future__ import annotations

import asyncio
import socket
import time
import wave
from pathlib import Path

import numpy as np

from tests.support.baresip import write_baresip_config
from tests.support.procs import free_port_pair

RATE = 8000


def tone_wav(
    path: Path,
    hz: float,
    seconds: float,
    rate: int = RATE,
    level: float = 0.3,
    bursts: tuple[float, float] | None = None,
) -> Path:
    """A tone, steady or in ``bursts`` (seconds on, seconds off)."""
    t = np.arange(int(rate * seconds)) / rate
    pcm = level * np.sin(2 * np.pi * hz * t)
    if bursts is not None:
        on, off = bursts
        pcm *= (t % (on + off)) < on
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes((pcm * 32767).astype("<i2").tobytes())
    return path


class Person:
    """baresip on 127.0.0.1 answering ``uri`` (see the module docstring)."""

    def __init__(
        self,
        folder: Path,
        *,
        tone_hz: float = 1000.0,
        answer: bool = True,
        quit_after: float = 30.0,
        rtp_ports: tuple[int, int] = (36000, 36999),
        bursts: tuple[float, float] | None = None,
    ) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.port = free_port_pair()
        self.uri = f"sip:human@127.0.0.1:{self.port}"
        wav = tone_wav(folder / "person.wav", tone_hz, quit_after + 5, bursts=bursts)
        mode = "auto" if answer else "manual"
        config = write_baresip_config(
            folder / "baresip",
            port=self.port,
            source=wav,
            folder=folder,
            account=f"<sip:human@127.0.0.1>;regint=0;answermode={mode}",
            rtp_ports=rtp_ports,
            heard="heard.wav",
            dumps=False,
        )
        self.args = ["baresip", "-f", str(config), "-t", str(int(quit_after))]
        self.log = folder / "baresip.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> Person:
        with self.log.open("wb") as out:  # a local file: no real blocking
            self.proc = await asyncio.create_subprocess_exec(
                *self.args, stdout=out, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                try:
                    probe.bind(("127.0.0.1", self.port))
                except OSError:
                    return self  # bound by baresip
            if self.proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        raise AssertionError(f"baresip did not listen on {self.port}: {self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


# -- reading what the caller heard ------------------------------------------------------


def heard(recording: str | Path) -> np.ndarray:
    """The far end's side (right channel) of a ``moshimoshi call`` recording."""
    with wave.open(str(recording)) as rec:
        return np.frombuffer(rec.readframes(rec.getnframes()), "<i2").reshape(-1, 2)[:, 1].astype(np.float64)


def dominant_hz(pcm: np.ndarray, rate: int = RATE) -> float:
    """The strongest frequency of a stretch of audio."""
    window = pcm * np.hanning(len(pcm))
    spectrum = np.abs(np.fft.rfft(window))
    spectrum[0] = 0
    return float(np.fft.rfftfreq(len(pcm), 1 / rate)[int(np.argmax(spectrum))])


def tone_share(pcm: np.ndarray, hz: float, rate: int = RATE, block_ms: int = 20) -> np.ndarray:
    """Per block, the share of its energy within ±50 Hz of ``hz``."""
    size = rate * block_ms // 1000
    blocks = pcm[: len(pcm) // size * size].reshape(-1, size)
    spectra = np.abs(np.fft.rfft(blocks * np.hanning(size), axis=1)) ** 2
    freqs = np.fft.rfftfreq(size, 1 / rate)
    band = (freqs > hz - 60) & (freqs < hz + 60)
    total = spectra.sum(axis=1)
    return np.where(total > 0, spectra[:, band].sum(axis=1) / np.maximum(total, 1e-9), 0.0)


def first_heard(
    pcm: np.ndarray, hz: float, after_s: float = 0.0, rate: int = RATE, level: float = 300.0
) -> float | None:
    """When (seconds into the recording) ``hz`` is first heard, loud and dominant, for 60 ms."""
    size = rate // 50
    share = tone_share(pcm, hz, rate)
    blocks = pcm[: len(pcm) // size * size].reshape(-1, size)
    loud = np.sqrt((blocks**2).mean(axis=1)) > level
    hit = (share > 0.6) & loud
    start = int(after_s * 50)
    for i in range(start, len(hit) - 2):
        if hit[i] and hit[i + 1] and hit[i + 2]:
            return i / 50
    return None


def longest_silence_ms(
    pcm: np.ndarray, start_s: float, end_s: float | None = None, rate: int = RATE, level: float = 300.0
) -> float:
    """The longest run of 10 ms blocks quieter than ``level`` between ``start_s`` and ``end_s``."""
    part = pcm[int(start_s * rate) : None if end_s is None else int(end_s * rate)]
    size = rate // 100
    blocks = part[: len(part) // size * size].reshape(-1, size)
    quiet = np.sqrt((blocks**2).mean(axis=1)) <= level
    longest = run = 0
    for flag in quiet:
        run = run + 1 if flag else 0
        longest = max(longest, run)
    return longest * 10.0
