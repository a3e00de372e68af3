"""Requests for a call across gateway replicas (hang up, pause or resume its recording),
over a Redis pub/sub channel.

The API of any replica can act on any call: when the call is not its own, it publishes
the request on ``{prefix}hangup``; every gateway subscribes, and the one that has the
call carries it out (a BYE; silence in the recording from now). A hang-up is the bare call
id (what earlier versions sent); other requests are JSON ``{"op": "pause", "call_id": …}``.
The subscription reconnects by itself after a Redis outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import typing as tp

from redis.exceptions import RedisError

from service.gateway import metrics
from service.pool import PoolClient

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5  # below the pool's 1 s socket timeout
RETRY_FIRST_SECONDS = 0.5
RETRY_MAX_SECONDS = 5.0


HANGUP = "hangup"
OPERATIONS = frozenset({HANGUP, "pause", "resume"})


class CallCommands:
    """Publishes requests and hands the ones for any call to ``on_request(op, call_id)``
    (which returns True when it had the call)."""

    def __init__(self, client: PoolClient, on_request: tp.Callable[[str, str], bool]) -> None:
        self.client = client
        self.channel = client.keys.prefix + "hangup"
        self.on_request = on_request
        self.subscribed = asyncio.Event()
        self.received = 0
        self._task: asyncio.Task | None = None

    async def publish(self, call_id: str, op: str = HANGUP) -> int:
        """Ask every gateway to do ``op`` to ``call_id``; returns how many gateways listened.
        Raises PoolError."""
        if op not in OPERATIONS:
            raise ValueError(f"unknown call request {op!r}")
        message = call_id if op == HANGUP else json.dumps({"op": op, "call_id": call_id})
        async with self.client.guard(f"publish {op}"):
            return int(await self.client.redis.publish(self.channel, message))

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="call-commands")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        delay = RETRY_FIRST_SECONDS
        while True:
            pubsub = self.client.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self.subscribed.set()
                delay = RETRY_FIRST_SECONDS
                while True:
                    message = await pubsub.get_message(timeout=POLL_SECONDS)
                    if message is not None and message.get("type") == "message":
                        self._handle(message.get("data"))
            except (RedisError, OSError, TimeoutError) as exc:
                # said once per outage (the pool's check says Redis is down, loudly)
                (log.warning if self.subscribed.is_set() else log.debug)(
                    "call request channel lost (%s); resubscribing in %.1fs", exc, delay
                )
                self.subscribed.clear()
                metrics.REDIS_ERRORS.labels("hangup-subscribe").inc()
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX_SECONDS, delay * 2)
            finally:
                with contextlib.suppress(RedisError, OSError, TimeoutError):
                    await pubsub.aclose()

    def _handle(self, data: tp.Any) -> None:
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
        self.received += 1
        op, call_id = HANGUP, text
        if text.startswith("{"):
            try:
                message = json.loads(text)
                op, call_id = str(message["op"]), str(message["call_id"])
            except (ValueError, KeyError, TypeError):
                return
            if op not in OPERATIONS:
                return
        if self.on_request(op, call_id[:200]):
            log.info("call %s: %s requested through another gateway's API", call_id[:200], op)
