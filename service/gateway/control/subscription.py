"""One Redis pub/sub channel followed for as long as the gateway runs, through outages.

The gateway's cross-replica channels (call requests in ``commands.py``, transfers in
``transfers.py``) listen the same way: subscribe, hand each message on, and after a Redis
error resubscribe with a backoff doubling from ``RETRY_FIRST_SECONDS`` to
``RETRY_MAX_SECONDS``. A message published while the subscription is down is not seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import typing as tp

from redis.exceptions import RedisError

from service.gateway import metrics
from service.pool import PoolClient

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5  # below the pool's 1 s socket timeout
RETRY_FIRST_SECONDS = 0.5
RETRY_MAX_SECONDS = 5.0


class ChannelSubscription:
    """Owns the task that follows one channel (``follow_channel``) from ``start`` to ``close``."""

    def __init__(
        self, client: PoolClient, channel: str, on_message: tp.Callable[[tp.Any], None], *, what: str, metric: str
    ) -> None:
        self.client = client
        self.channel = channel
        self.on_message = on_message
        self.what = what
        self.metric = metric
        self.subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self, name: str) -> None:
        if self._task is None:
            self._task = asyncio.create_task(
                follow_channel(
                    self.client, self.channel, self.on_message, self.subscribed, what=self.what, metric=self.metric
                ),
                name=name,
            )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


async def follow_channel(
    client: PoolClient,
    channel: str,
    on_message: tp.Callable[[tp.Any], None],
    subscribed: asyncio.Event,
    *,
    what: str,
    metric: str,
) -> None:
    """Hand the data of every message on ``channel`` to ``on_message`` until cancelled.

    ``subscribed`` is set while the subscription stands. A lost subscription is said once
    per outage as ``{what} channel lost`` (the pool's check says Redis is down, loudly) and
    counted in the gateway's Redis errors under ``metric``."""
    delay = RETRY_FIRST_SECONDS
    while True:
        pubsub = client.redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(channel)
            subscribed.set()
            delay = RETRY_FIRST_SECONDS
            while True:
                message = await pubsub.get_message(timeout=POLL_SECONDS)
                if message is not None and message.get("type") == "message":
                    on_message(message.get("data"))
        except (RedisError, OSError, TimeoutError) as exc:
            (log.warning if subscribed.is_set() else log.debug)(
                "%s channel lost (%s); resubscribing in %.1fs", what, exc, delay
            )
            subscribed.clear()
            metrics.REDIS_ERRORS.labels(metric).inc()
            await asyncio.sleep(delay)
            delay = min(RETRY_MAX_SECONDS, delay * 2)
        finally:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await pubsub.aclose()
