"""Benchmark of the Redis session pool: claim/release latency and claim throughput.

Starts its own redis-server (embedded, loopback TCP, no persistence) unless --redis-url is
given, registers W workers of B slots each (heartbeating every second, as in production),
then measures

1. claim + release latency, one client, sequential: on an idle pool, and on a pool that
   is 80% full (a claim reads every candidate worker's leases, so fullness must not matter);
2. claims per second with N concurrent claimers spread over G gateway connections, each
   looping claim → release, and the claim latency they see.

Target: claim p99 under 5 ms (sequential). Client and server share this machine's CPUs,
so the figures include the Python client's own cost. The last line is JSON.

    python ops/bench/pool.py [--workers 16] [--slots 32] [--concurrency 64] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from service.pool import (  # noqa: E402
    EmbeddedRedis,
    PoolClient,
    SlotLeases,
    WorkerInfo,
    WorkerRegistration,
    connect,
)

CLAIM_P99_TARGET_MS = 5.0
LEASE_TTL_MS = 30_000


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary_ms(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    return {
        "p50": round(percentile(ms, 50), 3),
        "p99": round(percentile(ms, 99), 3),
        "mean": round(statistics.fmean(ms), 3),
        "max": round(max(ms), 3),
        "n": len(ms),
    }


async def sequential(leases: SlotLeases, iterations: int) -> dict[str, dict[str, float]]:
    claim_s, release_s, both_s = [], [], []
    for _ in range(iterations):
        t0 = time.perf_counter()
        lease = await leases.claim(ttl_ms=LEASE_TTL_MS, owner="bench")
        t1 = time.perf_counter()
        if lease is None:
            raise RuntimeError("no free slot: is another client using this Redis?")
        await leases.release(lease)
        t2 = time.perf_counter()
        claim_s.append(t1 - t0)
        release_s.append(t2 - t1)
        both_s.append(t2 - t0)
    return {
        "claim_ms": summary_ms(claim_s),
        "release_ms": summary_ms(release_s),
        "claim_release_ms": summary_ms(both_s),
    }


async def concurrent(clients: list[PoolClient], claimers: int, seconds: float) -> dict[str, object]:
    claim_s: list[float] = []
    none_found = 0
    stop_at = time.perf_counter() + seconds

    async def claimer(index: int) -> None:
        nonlocal none_found
        leases = SlotLeases(clients[index % len(clients)])
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            lease = await leases.claim(ttl_ms=LEASE_TTL_MS, owner=f"bench-{index}")
            claim_s.append(time.perf_counter() - t0)
            if lease is None:
                none_found += 1
                continue
            await leases.release(lease)

    start = time.perf_counter()
    await asyncio.gather(*(claimer(i) for i in range(claimers)))
    elapsed = time.perf_counter() - start
    return {
        "claims_per_second": round(len(claim_s) / elapsed, 1),
        "claims": len(claim_s),
        "no_slot_answers": none_found,
        "claim_ms": summary_ms(claim_s),
        "seconds": round(elapsed, 2),
    }


class ScriptTimer:
    """Redis's own time per script call (INFO commandstats), where CONFIG RESETSTAT is allowed."""

    def __init__(self, client: PoolClient, enabled: bool) -> None:
        self.client = client
        self.enabled = enabled

    @classmethod
    async def start(cls, client: PoolClient) -> ScriptTimer:
        try:
            await client.redis.config_resetstat()
            return cls(client, True)
        except Exception:  # managed Redis often forbids CONFIG
            return cls(client, False)

    async def per_call(self) -> float | None:
        if not self.enabled:
            return None
        stats = (await self.client.redis.info("commandstats")).get("cmdstat_evalsha")
        return round(float(stats["usec_per_call"]), 1) if stats else None


async def run(args: argparse.Namespace) -> dict[str, object]:
    embedded: EmbeddedRedis | None = None
    url = args.redis_url
    if url is None:
        embedded = EmbeddedRedis()
        url = await embedded.start()
    prefix = f"bench{int(time.time())}:"
    clients = [connect(url, prefix=prefix) for _ in range(args.gateways)]
    registrations: list[WorkerRegistration] = []
    try:
        server = await clients[0].redis.info("server")
        for i in range(args.workers):
            info = WorkerInfo(
                worker_id=f"bench-w{i:02d}", url=f"ws://bench-w{i:02d}:8081", model="bench/model", capacity=args.slots
            )
            registration = WorkerRegistration(clients[0], info, interval=1.0)
            await registration.start()
            registrations.append(registration)
        leases = SlotLeases(clients[0])
        rtt = [await clients[0].ping() for _ in range(200)]

        await sequential(leases, min(200, args.iterations))  # warm-up: connections, script cache
        idle = await sequential(leases, args.iterations)

        total = args.workers * args.slots
        server_side = await ScriptTimer.start(clients[0])
        held = [await leases.claim(ttl_ms=LEASE_TTL_MS, owner="filler") for _ in range(int(total * 0.8))]
        claim_server_us = await server_side.per_call()
        busy = await sequential(leases, args.iterations)
        for lease in held:
            if lease is not None:
                await leases.release(lease)

        many = await concurrent(clients, args.concurrency, args.seconds)
        return {
            "bench": "pool",
            "redis": f"{'embedded ' if embedded else ''}redis-server {server.get('redis_version')}",
            "python": platform.python_version(),
            "workers": args.workers,
            "slots_per_worker": args.slots,
            "total_slots": total,
            "ping_ms": summary_ms(rtt),
            "claim_server_us": claim_server_us,
            "sequential_idle": idle,
            "sequential_80pct_full": busy,
            "concurrent": {"claimers": args.concurrency, "gateway_connections": args.gateways, **many},
            "target_claim_p99_ms": CLAIM_P99_TARGET_MS,
            "target_met": idle["claim_ms"]["p99"] < CLAIM_P99_TARGET_MS
            and busy["claim_ms"]["p99"] < CLAIM_P99_TARGET_MS,
            "redis_errors": sum(c.errors_total for c in clients),
        }
    finally:
        for registration in registrations:
            await registration.stop()
        for client in clients:
            await client.close()
        if embedded is not None:
            await embedded.stop()


def report(result: dict) -> None:
    def line(label: str, stats: dict[str, float], target: bool = False) -> None:
        verdict = ""
        if target:
            ok = stats["p99"] < CLAIM_P99_TARGET_MS
            verdict = f"   target p99 < {CLAIM_P99_TARGET_MS:g} ms: {'met' if ok else 'MISSED'}"
        print(
            f"  {label:<22} p50 {stats['p50']:7.3f} ms   p99 {stats['p99']:7.3f} ms   "
            f"max {stats['max']:7.3f} ms   (n={stats['n']}){verdict}"
        )

    print(f"moshimoshi pool benchmark: {result['redis']}, Python {result['python']}")
    print(
        f"  {result['workers']} workers x {result['slots_per_worker']} slots = {result['total_slots']} slots,"
        " heartbeating every 1 s"
    )
    line("Redis PING round trip", result["ping_ms"])
    if result["claim_server_us"] is not None:
        print(
            f"  claim script in Redis   {result['claim_server_us']:.0f} us per call "
            "(Redis's own time, filling the pool from 0 to 80%)"
        )
    for key, title in (
        ("sequential_idle", "one client, idle pool"),
        ("sequential_80pct_full", "one client, pool 80% full"),
    ):
        print(f"{title} (claim then release, sequential):")
        line("claim", result[key]["claim_ms"], target=True)
        line("release", result[key]["release_ms"])
        line("claim + release", result[key]["claim_release_ms"])
    many = result["concurrent"]
    print(
        f"{many['claimers']} concurrent claimers over {many['gateway_connections']} connections, "
        f"{many['seconds']} s (claim then release, in a loop; one Python process, so the latency "
        "includes waiting for the client's own event loop):"
    )
    print(
        f"  claims per second      {many['claims_per_second']:.0f}   "
        f"({many['claims']} claims, {many['no_slot_answers']} answered 'no free slot')"
    )
    line("claim under load", many["claim_ms"])
    print(f"Redis errors: {result['redis_errors']}")
    print(json.dumps(result, separators=(",", ":")))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=16, help="workers registered (default 16)")
    parser.add_argument("--slots", type=int, default=32, help="slots per worker (default 32)")
    parser.add_argument("--iterations", type=int, default=2000, help="sequential claim+release pairs (default 2000)")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent claimers (default 64)")
    parser.add_argument("--gateways", type=int, default=8, help="Redis connections they share (default 8)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the concurrent run (default 5)")
    parser.add_argument("--redis-url", default=None, help="use this Redis instead of an embedded redis-server")
    args = parser.parse_args()
    report(asyncio.run(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
