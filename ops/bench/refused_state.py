"""Refused calls and Redis: what INVITEs refused before their answer leave behind (issue 13, item 4).

A real Redis, an echo worker with one slot and a gateway (run as separate processes; the
source 127.0.0.1 is allowed, no digest, no rate limit, so that every INVITE reaches the
call lifecycle). For each kind of refusal, ``--invites`` INVITEs from an allowed source,
each answered and ACKed:

* ``bad-offer``: an offer with no codec in common (G.729 only): 488;
* ``busy``: the one slot held by a call in progress, each INVITE queued for
  ``--queue-seconds`` (ringing) and then refused: 503 with Retry-After;
* ``cancelled``: the slot held, each INVITE queued and then CANCELled by the caller: 487.

Before and after each kind, every key in Redis with its ``MEMORY USAGE``: it prints the
keys and bytes each kind added, per refused INVITE, and which keys (target: none per
refused INVITE; a bounded, short-lived record of refusals for the dashboard at most).
The last line printed is a JSON object.

    python ops/bench/refused_state.py [--invites 1000] [--concurrency 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from service.pool import EmbeddedRedis  # noqa: E402
from service.settings import CallSettings  # noqa: E402
from service.tools.call import place_call  # noqa: E402
from tests.support.services import start_gateway, start_worker  # noqa: E402
from tests.support.sip_peer import G729_OFFER, PCMU_OFFER, InviteCaller, RawPeer  # noqa: E402

KINDS = ("bad-offer", "busy", "cancelled")
SETTLE_S = 2.0  # the gateway's write-behind to Redis
MAX_KEYS = 4  # the record of refusals: its stream and a count per minute
MAX_BYTES = 512 * 1024  # its stream holds ~1000 entries at most


async def flood(port: int, kind: str, invites: int, concurrency: int) -> dict[int, int]:
    caller = InviteCaller(await RawPeer.udp(), port)
    answers: dict[int, int] = {}
    left = iter(range(invites))

    async def lane() -> None:
        for _ in left:
            status = await caller.call(G729_OFFER if kind == "bad-offer" else PCMU_OFFER, cancel=kind == "cancelled")
            answers[status] = answers.get(status, 0) + 1

    try:
        await asyncio.gather(*(lane() for _ in range(concurrency)))
    finally:
        await caller.close()
    return answers


def redis_keys(url: str) -> dict[bytes, int]:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return {key: int(client.memory_usage(key) or 0) for key in client.scan_iter(count=1000)}
    finally:
        client.close()


def redis_used_memory(url: str) -> int:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return int(client.info("memory")["used_memory"])
    finally:
        client.close()


async def run(args: argparse.Namespace) -> dict:
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        log_dir = Path(tmp)
        async with EmbeddedRedis() as redis_url:
            worker = start_worker(log_dir, redis_url, "refused-worker", slots=1)
            gateway = start_gateway(
                log_dir,
                redis_url,
                "--sip-rate-limit",
                "0",
                "--queue-seconds",
                str(args.queue_seconds),
                "--log-level",
                "warning",
            )
            holder: asyncio.Task | None = None
            try:
                await asyncio.to_thread(worker.wait_ready)
                await asyncio.to_thread(gateway.wait_ready)
                for kind in KINDS:
                    if kind != "bad-offer" and holder is None:  # the one slot held from now on
                        holder = asyncio.create_task(
                            place_call(
                                CallSettings(
                                    uri=gateway.uri,
                                    seconds=3600,
                                    local_host="127.0.0.1",
                                    rtp_port_min=45000,
                                    rtp_port_max=45099,
                                )
                            )
                        )
                        await busy(gateway)
                    await asyncio.sleep(SETTLE_S)
                    before = await asyncio.to_thread(redis_keys, redis_url)
                    memory_before = await asyncio.to_thread(redis_used_memory, redis_url)
                    started = time.monotonic()
                    answers = await flood(gateway.sip_port, kind, args.invites, args.concurrency)
                    took = time.monotonic() - started
                    await asyncio.sleep(SETTLE_S)
                    after = await asyncio.to_thread(redis_keys, redis_url)
                    memory_after = await asyncio.to_thread(redis_used_memory, redis_url)
                    added = {k: v for k, v in after.items() if k not in before}
                    grown = {k: after[k] - before[k] for k in after if k in before and after[k] != before[k]}
                    results[kind] = {
                        "invites": args.invites,
                        "answers": answers,
                        "seconds": round(took, 2),
                        "keys_added": len(added),
                        "bytes_added": sum(added.values()),
                        "bytes_grown_in_existing_keys": sum(grown.values()),
                        "used_memory_delta": memory_after - memory_before,
                        "keys_added_per_invite": round(len(added) / args.invites, 3),
                        "bytes_per_invite": round((sum(added.values()) + sum(grown.values())) / args.invites, 1),
                        "sample_keys": sorted({pattern(k) for k in [*added, *grown]}),
                    }
                    print(
                        f"{kind}: {args.invites} INVITEs in {took:.1f} s answered {answers}; Redis keys added "
                        f"{len(added)} ({sum(added.values())} bytes), existing keys grew "
                        f"{sum(grown.values())} bytes, used_memory {memory_after - memory_before:+d} bytes; "
                        f"keys: {results[kind]['sample_keys']}"
                    )
            finally:
                if holder is not None:
                    holder.cancel()
                    await asyncio.gather(holder, return_exceptions=True)
                gateway.proc.stop()
                worker.proc.stop()
    out = {"benchmark": "refused_state", "invites": args.invites, "queue_seconds": args.queue_seconds, "kinds": results}
    out["targets_met"] = all(
        r["keys_added"] <= MAX_KEYS and r["bytes_added"] + r["bytes_grown_in_existing_keys"] <= MAX_BYTES
        for r in results.values()
    )
    print(
        f"targets {'met' if out['targets_met'] else 'NOT met'} (no key per refused INVITE: at most {MAX_KEYS} "
        f"keys and {MAX_BYTES // 1024} KiB added by {args.invites} of a kind, the bounded record of refusals)"
    )
    return out


def pattern(key: bytes) -> str:
    """A key with its call id replaced, so that a thousand keys read as one pattern."""
    text = key.decode(errors="replace")
    head, _, tail = text.rpartition(":")
    return f"{head}:*" if head and (tail.startswith("c-") or len(tail) > 12) else text


async def busy(gateway, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        status, pool = gateway.get("/v1/pool")
        if status == 200 and isinstance(pool, dict) and pool.get("slots_busy") == 1:
            return
        await asyncio.sleep(0.2)
    raise RuntimeError("the holding call did not take the slot")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--invites", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--queue-seconds", type=float, default=0.2)
    result = asyncio.run(run(parser.parse_args()))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
