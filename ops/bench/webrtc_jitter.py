"""WebRTC receive path under loss and jitter: aiortc's own receiver against the ingress's playout.

Two aiortc peers in this process over loopback: the "browser" sends 20 ms Opus packets of
a speech-like signal (voiced harmonics, syllable-rate envelope), the "gateway" receives.
Between them, the gateway's DTLS transport is wrapped so that each decrypted RTP packet is
dropped or delayed before the receiver sees it (seeded, so every run impairs the same way):

* clean: nothing added;
* loss N %: independent (Bernoulli) losses;
* burst: 3 packets in a row lost every 2 s;
* jitter J ms: each packet delayed uniformly in [0, J] ms, independently (packets overtake);
* loss + jitter.

The gateway's receiver is tapped (service.gateway.ingress.aiortc_tap with ``keep_stock``) so both
receive paths see the very same packets at the same instants:

* **aiortc**: its jitter buffer (``JitterBuffer(capacity=16, prefetch=4)``), its decoder
  thread and the remote track's queue, read by a task as an application would. It has no
  playout clock: frames come out when packets let them. A *stall* is a gap between two
  frames coming out of the track of more than 50 ms (twice the packet time plus slack); the
  stall time is the sum of those gaps minus the 20 ms each would have taken anyway.
* **ingress**: ``WebRtcMedia`` as a call runs it — the project's jitter buffer (adaptive,
  20 ms floor), a 20 ms playout clock that conceals a missing packet on time, Opus decoded
  per tick, 48→24 kHz, 80 ms model frames. It never stalls by construction; what loss costs
  it is concealed frames.

For both: *missing* is the share of sent packets whose audio never came out (network loss
plus anything the buffer threw away), and the *added latency* of a frame is when it came out
(aiortc) or was played (ingress) minus the earliest its packet could have — the packet's RTP
time plus the fastest transit seen (p50 / p95 / max over frames, ms).

The last line of output is one JSON object with every figure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
from aiortc import RTCConfiguration, RTCPeerConnection  # noqa: E402
from aiortc.mediastreams import MediaStreamError  # noqa: E402

from service.gateway.ingress.aiortc_tap import tap_receiver  # noqa: E402
from service.gateway.media.webrtc_media import WebRtcMedia  # noqa: E402
from tests.support.webrtc_client import PcmTrack  # noqa: E402

RATE = 48000
PACKET = 960
SECONDS = 12.0
WARMUP = 1.0  # no impairment for the first second
STALL_GAP = 0.050


@dataclass
class Scenario:
    name: str
    loss: float = 0.0
    jitter_ms: float = 0.0
    burst_every_s: float = 0.0
    burst_len: int = 0


SCENARIOS = [
    Scenario("clean"),
    Scenario("loss 1%", loss=0.01),
    Scenario("loss 5%", loss=0.05),
    Scenario("loss 10%", loss=0.10),
    Scenario("burst 3/2s", burst_every_s=2.0, burst_len=3),
    Scenario("jitter 30ms", jitter_ms=30),
    Scenario("jitter 60ms", jitter_ms=60),
    Scenario("loss 3% + jitter 30ms", loss=0.03, jitter_ms=30),
]


def speech_like(seconds: float, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    pitch = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 4.0 * t) ** 2
    signal = voiced * envelope + 0.05 * rng.normal(size=len(t))
    return (signal / np.max(np.abs(signal)) * 12000).astype(np.int16)


@dataclass
class PathResult:
    frames_out: int = 0
    missing_pct: float = 0.0
    stalls: int = 0
    stall_ms: float = 0.0
    concealed: int = 0
    latency_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        lat = sorted(self.latency_ms) or [float("nan")]
        return {
            "frames_out": self.frames_out,
            "missing_pct": round(self.missing_pct, 2),
            "stalls": self.stalls,
            "stall_ms": round(self.stall_ms, 1),
            "concealed": self.concealed,
            "latency_p50_ms": round(statistics.median(lat), 1),
            "latency_p95_ms": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 1),
            "latency_max_ms": round(lat[-1], 1),
        }


async def run_scenario(scenario: Scenario, seed: int) -> tuple[PathResult, PathResult, dict]:
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    sender = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    receiver = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    sender.addTransceiver(PcmTrack(speech_like(4.0), loop=True), direction="sendonly")
    await sender.setLocalDescription(await sender.createOffer())
    await receiver.setRemoteDescription(sender.localDescription)
    transceiver = receiver.getTransceivers()[0]

    # the ingress path, fed by the tap; the stock path stays behind it
    media = WebRtcMedia(to_model=lambda frame: None)
    ingress_latency: list[float] = []
    played = [0, 0]  # frames played, concealed (while talking)
    original_play = media.play

    def play(now: float) -> np.ndarray:
        jb = media.jitter
        before = (jb.frames_played, jb.frames_concealed) if jb is not None else (0, 0)
        pcm = original_play(now)
        if jb is not None and media.jitter is jb:
            if jb.frames_played > before[0]:
                ingress_latency.append(jb.delay * 1000)
                played[0] += 1
            played[1] += jb.frames_concealed - before[1]
        return pcm

    media.play = play  # type: ignore[method-assign]
    arrivals: list[tuple[int, float]] = []  # (rtp timestamp, arrival) of packets the receiver saw
    first_ts: list[int] = []

    def on_rtp(packet, arrival: float) -> None:
        if not first_ts:
            first_ts.append(packet.timestamp)
        arrivals.append((packet.timestamp, arrival))
        media.on_rtp(packet, arrival)

    tap_receiver(transceiver.receiver, on_rtp, loop.time, keep_stock=True)
    await receiver.setLocalDescription(await receiver.createAnswer())

    # impair what reaches the receiver, after SRTP
    sent = [0, 0]  # packets, dropped
    start = [0.0]
    dtls = transceiver.receiver.transport
    deliver = dtls._handle_rtp_data
    burst_left = [0]
    next_burst = [0.0]

    async def impaired(data: bytes, arrival_time_ms: int) -> None:
        now = loop.time()
        sent[0] += 1  # (RTCP takes another method: this sees RTP only)
        if start[0] and now - start[0] > WARMUP:
            drop = rng.random() < scenario.loss
            if scenario.burst_every_s and now >= next_burst[0]:
                next_burst[0] = now + scenario.burst_every_s
                burst_left[0] = scenario.burst_len
            if burst_left[0] > 0:
                burst_left[0] -= 1
                drop = True
            if drop:
                sent[1] += 1
                return
            if scenario.jitter_ms:
                delay = rng.uniform(0, scenario.jitter_ms) / 1000
                loop.call_later(delay, lambda: asyncio.ensure_future(deliver(data, arrival_time_ms)))
                return
        await deliver(data, arrival_time_ms)

    dtls._handle_rtp_data = impaired  # type: ignore[method-assign]

    stock_out: list[tuple[int, float]] = []  # (pts, time it came out of the track)

    async def read_stock() -> None:
        track = transceiver.receiver.track
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                stock_out.append((frame.pts, loop.time()))

    reader = asyncio.ensure_future(read_stock())
    connected = asyncio.Event()
    receiver.on("connectionstatechange", lambda: connected.set() if receiver.connectionState == "connected" else None)
    await sender.setRemoteDescription(receiver.localDescription)
    await asyncio.wait_for(connected.wait(), 20)
    start[0] = loop.time()
    next_burst[0] = start[0] + WARMUP
    media.start()
    await asyncio.sleep(SECONDS)
    media.stop()
    reader.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reader
    await sender.close()
    await receiver.close()

    fastest = min(arrival - ts / RATE for ts, arrival in arrivals)
    expected = sent[0]
    stock = PathResult(frames_out=len(stock_out))
    base = first_ts[0]
    for pts, out in stock_out:
        stock.latency_ms.append((out - ((base + pts) / RATE + fastest)) * 1000)
    for (_, a), (_, b) in zip(stock_out, stock_out[1:], strict=False):
        if b - a > STALL_GAP:
            stock.stalls += 1
            stock.stall_ms += (b - a - 0.020) * 1000
    stock.missing_pct = 100 * (1 - len(stock_out) / expected) if expected else 0.0
    ours = PathResult(frames_out=played[0], concealed=played[1], latency_ms=ingress_latency)
    # the ingress's jitter-buffer delay is measured from the fastest transit too
    ours.missing_pct = 100 * (1 - played[0] / expected) if expected else 0.0
    network = {"packets": expected, "dropped": sent[1], "loss_pct": round(100 * sent[1] / max(1, expected), 2)}
    return stock, ours, network


async def main() -> None:
    print(__doc__.split("\n\n")[0])
    print(
        f"\n{SECONDS:.0f} s per scenario (first {WARMUP:.0f} s clean), 20 ms Opus packets over loopback, "
        "both paths on the same packets\n"
    )
    header = (
        f"{'scenario':22} {'net loss':>8} | {'aiortc: missing':>15} {'stalls':>6} {'stall ms':>8} "
        f"{'lat p50/p95/max ms':>20} | {'ingress: missing':>16} {'concealed':>9} {'lat p50/p95/max ms':>20}"
    )
    print(header)
    print("-" * len(header))
    results = []
    for index, scenario in enumerate(SCENARIOS):
        stock, ours, network = await run_scenario(scenario, seed=1000 + index)
        s, o = stock.summary(), ours.summary()
        print(
            f"{scenario.name:22} {network['loss_pct']:7.1f}% | {s['missing_pct']:14.1f}% {s['stalls']:6d} "
            f"{s['stall_ms']:8.0f} {s['latency_p50_ms']:6.0f}/{s['latency_p95_ms']:4.0f}/{s['latency_max_ms']:5.0f}"
            f"      | {o['missing_pct']:15.1f}% {o['concealed']:9d} "
            f"{o['latency_p50_ms']:6.0f}/{o['latency_p95_ms']:4.0f}/{o['latency_max_ms']:5.0f}"
        )
        results.append({"scenario": scenario.name, "network": network, "aiortc": s, "ingress": o})
    print(
        "\nmissing: sent packets whose audio never came out; aiortc stalls: gaps > 50 ms between frames out "
        "of its track;\ningress concealed: playout slots filled by PLC; latency: beyond the packet's earliest "
        "possible arrival."
    )
    print(json.dumps({"benchmark": "webrtc_jitter", "seconds_per_scenario": SECONDS, "results": results}))


if __name__ == "__main__":
    asyncio.run(main())
