"""Helpers for the pool tests: polling without fixed sleeps, and worker fixtures."""

from __future__ import annotations

import typing as tp

from service.pool import WorkerInfo
from tests.support.polling import eventually


def worker(worker_id: str, capacity: int = 4, model: str = "test/model", **extra: tp.Any) -> WorkerInfo:
    return WorkerInfo(
        worker_id=worker_id,
        url=f"ws://{worker_id}.test:8081",
        model=model,
        capacity=capacity,
        license="Apache-2.0",
        **extra,
    )


async def lease_keys(client) -> dict[str, str]:
    """Every lease key in Redis with its value."""
    keys = [k async for k in client.redis.scan_iter(match=client.keys.prefix + "lease:*")]
    values = await client.redis.mget(keys) if keys else []
    return {k: v for k, v in zip(keys, values, strict=True) if v is not None}


async def expire_lease(client, worker_id: str, slot: int) -> None:
    """Make the lease on this slot run out now, as its TTL would: the key and its index entry."""
    key = client.keys.lease(worker_id, slot)
    await client.redis.pexpire(key, 1)
    await client.redis.zadd(client.keys.held(worker_id), {str(slot): 0}, xx=True)
    await eventually(lambda: _absent(client, key), what="lease expiry")


async def _absent(client, key: str) -> bool:
    return not await client.redis.exists(key)
