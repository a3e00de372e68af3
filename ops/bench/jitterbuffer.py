"""Jitter buffer benchmark: sip.jitterbuffer against aiortc's JitterBuffer on the same traces.

Each trace is a 20 ms G.711 stream (one packet per frame) sent for DURATION seconds through
a simulated network, seeded so both buffers see identical arrivals:

* one-way delay = 40 ms propagation + queueing jitter (gamma, k=2, θ=2.5 ms: mean 5 ms,
  p99 ≈ 17 ms) + congestion episodes (on average every 5 s, 100–400 ms long, a triangular
  extra delay peaking at 30–80 ms);
* "fifo": the network keeps packet order (a packet never overtakes the one before it);
  "reorder": every packet's delay is independent, and 2 % get 20–60 ms extra on top, so
  packets overtake each other;
* loss: independent (Bernoulli) at 0, 1, 5, 10, 20 %;
* and first a "clean" line for reference: 0–1 ms jitter, no congestion, no loss.

The receiver's media clock pops one frame every 20 ms (random phase). For each buffer:

* concealed %: pops that had no audio to play, between the first and the last frame played;
* discarded %: packets that arrived but were never played (late + overflow + duplicate +
  dropped to shrink the delay), over packets that arrived; network losses are not counted;
* added latency: time from a packet's arrival to its playout (what the buffer adds on top of
  that packet's own network delay), mean and p99 over frames played.

aiortc adaptation (said again in the output): aiortc's audio receiver uses
``JitterBuffer(capacity=16, prefetch=4)``; ``add()`` returns a frame when one is complete,
and aiortc hands frames to the decoder and on to the track's unbounded queue, which the
application reads. Here that queue is a FIFO read by the same 20 ms playout clock; a pop
that finds the FIFO empty counts as concealed. The packets are aiortc ``RtpPacket`` objects
with ``_data`` set to the payload as aiortc's receiver does. Nothing else is changed.

Then a micro-benchmark of the per-packet receive cost: parse + put + pop + G.711 decode, its
parts, PLC per loss event, and RtpSession's datagram handler up to the jitter buffer's put.

The last line of output is one JSON object with every figure.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from sip.g711 import G711Decoder  # noqa: E402
from sip.jitterbuffer import JitterBuffer  # noqa: E402
from sip.plc import PacketLossConcealer  # noqa: E402
from sip.rtp import RtpPacket, build_rtp  # noqa: E402
from sip.rtpsession import PortAllocator  # noqa: E402

PTIME = 0.020
SAMPLES = 160
DURATION = 120.0
PROPAGATION = 0.040
LOSSES = (0.0, 0.01, 0.05, 0.10, 0.20)


@dataclass
class Arrival:
    time: float
    index: int  # frame number; the payload carries it too


def make_trace(loss: float, reorder: bool, seed: int, clean: bool = False) -> tuple[list[Arrival], int]:
    """Arrivals sorted by time, and the number of packets sent. ``clean``: ±1 ms jitter only."""
    rng = random.Random(seed)
    count = int(DURATION / PTIME)
    # congestion episodes as (start, length, peak)
    episodes = []
    t = rng.expovariate(1 / 5.0)
    while t < DURATION and not clean:
        episodes.append((t, rng.uniform(0.1, 0.4), rng.uniform(0.030, 0.080)))
        t += rng.expovariate(1 / 5.0)

    def congestion(at: float) -> float:
        extra = 0.0
        for start, length, peak in episodes:
            if start <= at < start + length:
                x = (at - start) / length
                extra = max(extra, peak * (1 - abs(2 * x - 1)))
        return extra

    arrivals: list[Arrival] = []
    previous = 0.0
    for i in range(count):
        sent = i * PTIME
        if clean:
            delay = PROPAGATION + rng.uniform(0, 0.001)
        else:
            delay = PROPAGATION + rng.gammavariate(2.0, 0.0025) + congestion(sent)
        if reorder and rng.random() < 0.02:
            delay += rng.uniform(0.020, 0.060)
        if rng.random() < loss:
            continue
        arrival = sent + delay
        if not reorder:
            arrival = max(arrival, previous + 1e-5)
            previous = arrival
        arrivals.append(Arrival(arrival, i))
    arrivals.sort(key=lambda a: a.time)
    return arrivals, count


def payload(index: int) -> bytes:
    return index.to_bytes(4, "big") + bytes(SAMPLES - 4)


@dataclass
class Result:
    concealed_pct: float
    discarded_pct: float
    added_mean_ms: float
    added_p99_ms: float
    played: int


def summarise(pops: list[int | None], play_times: dict[int, float], arrivals: list[Arrival]) -> Result:
    played_positions = [k for k, p in enumerate(pops) if p is not None]
    first, last = played_positions[0], played_positions[-1]
    span = pops[first : last + 1]
    concealed = sum(p is None for p in span)
    arrival_of = {a.index: a.time for a in arrivals}
    added = sorted(play_times[i] - arrival_of[i] for i in play_times)
    discarded = len(arrivals) - len(play_times)
    return Result(
        concealed_pct=100 * concealed / len(span),
        discarded_pct=100 * discarded / len(arrivals),
        added_mean_ms=1000 * statistics.fmean(added),
        added_p99_ms=1000 * added[min(len(added) - 1, int(0.99 * len(added)))],
        played=len(play_times),
    )


def run_ours(arrivals: list[Arrival], phase: float) -> tuple[Result, JitterBuffer]:
    jb = JitterBuffer()
    packets = [
        (a.time, RtpPacket(0, a.index & 0xFFFF, (1000 + a.index * SAMPLES) & 0xFFFFFFFF, 0x5EED, payload(a.index)))
        for a in arrivals
    ]
    pops: list[int | None] = []
    play_times: dict[int, float] = {}
    now, k = phase, 0
    end = arrivals[-1].time + 1.0
    while now < end:
        while k < len(packets) and packets[k][0] <= now:
            jb.put(packets[k][1], packets[k][0])
            k += 1
        out = jb.pop(now)
        if isinstance(out, bytes):
            index = int.from_bytes(out[:4], "big")
            pops.append(index)
            play_times[index] = now
        else:
            pops.append(None)
        now += PTIME
    return summarise(pops, play_times, arrivals), jb


def run_aiortc(arrivals: list[Arrival], phase: float) -> Result:
    from aiortc.jitterbuffer import JitterBuffer as AiortcJitterBuffer
    from aiortc.rtp import RtpPacket as AiortcPacket

    jb = AiortcJitterBuffer(capacity=16, prefetch=4)
    fifo: list[int] = []
    head = 0
    pops: list[int | None] = []
    play_times: dict[int, float] = {}
    now, k = phase, 0
    end = arrivals[-1].time + 1.0
    while now < end or head < len(fifo):
        while k < len(arrivals) and arrivals[k].time <= now:
            a = arrivals[k]
            packet = AiortcPacket(
                payload_type=0,
                sequence_number=a.index & 0xFFFF,
                timestamp=(1000 + a.index * SAMPLES) & 0xFFFFFFFF,
                ssrc=0x5EED,
                payload=payload(a.index),
            )
            packet._data = packet.payload  # what aiortc's receiver does before add()
            _, frame = jb.add(packet)
            if frame is not None:
                fifo.append(int.from_bytes(frame.data[:4], "big"))
            k += 1
        if head < len(fifo):
            index = fifo[head]
            head += 1
            pops.append(index)
            play_times[index] = now
        elif play_times:
            pops.append(None)
        now += PTIME
        if now > end + 30:
            break
    return summarise(pops, play_times, arrivals)


def per_packet_cost(iterations: int = 20000) -> dict[str, float]:
    """µs per packet for the receive path and its parts (median of 5 runs)."""
    wire = [
        build_rtp(0, i & 0xFFFF, (i * SAMPLES) & 0xFFFFFFFF, 0x5EED, bytes([i & 0xFF]) * SAMPLES)
        for i in range(iterations)
    ]
    decoder = G711Decoder("PCMU")

    def full() -> float:
        jb = JitterBuffer()
        start = time.perf_counter()
        for i, data in enumerate(wire):
            packet = RtpPacket.parse(data)
            jb.put(packet, i * PTIME + 0.040)
            out = jb.pop(i * PTIME + 0.065)
            if isinstance(out, bytes):
                decoder.decode(out)
        return (time.perf_counter() - start) / iterations * 1e6

    def parse_only() -> float:
        start = time.perf_counter()
        for data in wire:
            RtpPacket.parse(data)
        return (time.perf_counter() - start) / iterations * 1e6

    def build_only() -> float:
        start = time.perf_counter()
        for i in range(iterations):
            build_rtp(0, i & 0xFFFF, i * SAMPLES, 0x5EED, wire[0])
        return (time.perf_counter() - start) / iterations * 1e6

    def decode_only() -> float:
        start = time.perf_counter()
        for data in wire:
            decoder.decode(data[12:])
        return (time.perf_counter() - start) / iterations * 1e6

    def conceal_only() -> float:
        plc = PacketLossConcealer()
        rng = np.random.default_rng(0)
        frames = [rng.integers(-8000, 8000, SAMPLES).astype(np.int16) for _ in range(50)]
        n = 2000
        start = time.perf_counter()
        for i in range(n):
            # alternate one real frame and one lost frame: every loss is a new loss event
            plc.good(frames[i % 50])
            plc.conceal(SAMPLES)
        return (time.perf_counter() - start) / n * 1e6

    def session_receive() -> float:
        """RtpSession's datagram handler: source check, parse, RFC 3550 stats, dispatch to put."""
        from sip.rtpsession import RtpSession

        async def measure() -> float:
            ports = PortAllocator(40000, 65534)
            session = await RtpSession.open(ports, host="127.0.0.1", rtcp_interval=3600)
            try:
                session.update_remote("127.0.0.1", 9)
                jb = JitterBuffer()
                session.attach_jitter_buffer(jb)
                source = ("127.0.0.1", 9)
                start = time.perf_counter()
                for data in wire:
                    session._on_rtp(data, source)
                return (time.perf_counter() - start) / iterations * 1e6
            finally:
                session.close(send_bye=False)

        return asyncio.run(measure())

    def median(fn) -> float:
        return statistics.median(fn() for _ in range(5))

    return {
        "parse_put_pop_decode_us": median(full),
        "parse_us": median(parse_only),
        "build_us": median(build_only),
        "g711_decode_us": median(decode_only),
        "plc_good_plus_conceal_us": median(conceal_only),
        "session_receive_to_put_us": median(session_receive),
    }


def main() -> None:
    print(__doc__.split("\n\n")[0])
    print(
        f"\n{DURATION:.0f} s per trace, 20 ms packets, 40 ms propagation, gamma queueing jitter and congestion"
        " episodes (see the module docstring)."
    )
    print(
        "aiortc: JitterBuffer(capacity=16, prefetch=4) as its audio receiver uses it; its output frames go"
        " to a FIFO read by the same 20 ms playout clock (an empty FIFO = a concealed pop).\n"
    )
    header = (
        f"{'loss':>5} {'order':>7} | {'ours: concealed':>15} {'discarded':>9} {'added mean':>10} {'p99':>6}"
        f" | {'aiortc: concealed':>17} {'discarded':>9} {'added mean':>10} {'p99':>6}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    scenarios = [(0.0, False, True)] + [(loss, reorder, False) for loss in LOSSES for reorder in (False, True)]
    for loss, reorder, clean in scenarios:
        seed = int(loss * 1000) * 2 + reorder
        arrivals, sent = make_trace(loss, reorder, seed, clean)
        phase = random.Random(seed).uniform(0, PTIME)
        ours, jb = run_ours(arrivals, phase)
        theirs = run_aiortc(arrivals, phase)
        order = "clean" if clean else "reorder" if reorder else "fifo"
        print(
            f"{loss * 100:4.0f}% {order:>7} | {ours.concealed_pct:14.2f}% {ours.discarded_pct:8.2f}%"
            f" {ours.added_mean_ms:8.1f}ms {ours.added_p99_ms:4.0f}ms"
            f" | {theirs.concealed_pct:16.2f}% {theirs.discarded_pct:8.2f}% {theirs.added_mean_ms:8.1f}ms"
            f" {theirs.added_p99_ms:4.0f}ms"
        )
        stats = jb.stats()
        rows.append(
            {
                "loss": loss,
                "reorder": reorder,
                "clean_line": clean,
                "packets_sent": sent,
                "packets_arrived": len(arrivals),
                "ours": {
                    **vars(ours),
                    "late": stats.packets_late,
                    "overflow": stats.packets_overflow,
                    "duplicate": stats.packets_duplicate,
                    "dropped_to_shrink": stats.frames_dropped,
                    "inserted_to_grow": stats.frames_inserted,
                    "final_delay_ms": stats.delay_ms,
                },
                "aiortc": vars(theirs),
            }
        )
    print(
        "\nconcealed: pops without audio between first and last frame played (includes the network's losses);"
        "\ndiscarded: arrived but never played; added: playout time minus arrival time."
    )
    cost = per_packet_cost()
    print("\nper-packet receive cost on this machine (µs, median of 5 runs):")
    for name, value in cost.items():
        print(f"  {name:28} {value:7.2f}")
    print(
        json.dumps(
            {
                "benchmark": "jitterbuffer",
                "duration_s": DURATION,
                "ptime_ms": PTIME * 1000,
                "scenarios": rows,
                "per_packet_cost": cost,
            },
            separators=(",", ":"),
        )
    )


if __name__ == "__main__":
    main()
