"""Transfer requests across gateway replicas, over Redis pub/sub, with the outcome sent back.

The API of any replica can transfer any call (as it can hang one up, ``commands.py``); but
a transfer has an outcome to report, so the request names a reply channel:

1. the asking replica subscribes to ``{prefix}transfer-reply:{request id}`` and publishes
   ``{"id", "call_id", "target", "mode"}`` on ``{prefix}transfer``;
2. every gateway listens there; the one that has the call answers ``{"state": "started",
   "ring_seconds"}`` at once (or ``{"state": "refused", "status", "detail"}``), runs the
   transfer, then answers ``{"state": "done", "result": {...}}``;
3. the asking replica waits for "started" for ``ACK_SECONDS`` (no answer: no gateway has
   the call) and for "done" for the ring time and a margin.

The subscription (``subscription.py``) reconnects by itself after a Redis outage; a request
that arrives while it is down is not seen (the asking side then says no gateway answered).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
import typing as tp

from redis.exceptions import RedisError

from service.gateway import metrics
from service.gateway.calls.transfer import TransferError, TransferResult
from service.gateway.control.subscription import POLL_SECONDS, ChannelSubscription
from service.pool import PoolClient, PoolError

log = logging.getLogger(__name__)

ACK_SECONDS = 3.0  # how long the owner may take to say it has the call
DONE_MARGIN_SECONDS = 15.0  # beyond the ring time (a REFER's NOTIFY may take 5 s more)
MAX_MESSAGE_BYTES = 4096

# runs a transfer of a local call: None when the call is not on this gateway, else
# (the ring time, the running transfer); raises TransferError when refused
Starter = tp.Callable[[str, str, str], "tuple[float, asyncio.Future[TransferResult]] | None"]


class NoGateway(Exception):
    """No gateway said it has the call (it ended, or its gateway is gone)."""


class TransferChannel:
    """Sends transfer requests to the call's gateway and serves the ones for our calls."""

    def __init__(self, client: PoolClient, start: Starter) -> None:
        self.client = client
        self.channel = client.keys.prefix + "transfer"
        self.start_local = start
        self.received = 0
        self._subscription = ChannelSubscription(
            client, self.channel, self._handle, what="transfer", metric="transfer-subscribe"
        )
        self.subscribed = self._subscription.subscribed
        self._serving: set[asyncio.Task[None]] = set()

    # -- the asking side ---------------------------------------------------------------

    async def request(self, call_id: str, target: str, mode: str) -> TransferResult:
        """Have the call's gateway transfer it; its result. Raises TransferError (refused
        there), NoGateway, or PoolError (Redis)."""
        request_id = secrets.token_hex(8)
        reply = f"{self.channel}-reply:{request_id}"
        pubsub = self.client.redis.pubsub(ignore_subscribe_messages=True)
        try:
            async with self.client.guard("transfer reply subscribe"):
                await pubsub.subscribe(reply)
            message = json.dumps({"id": request_id, "call_id": call_id, "target": target, "mode": mode, "reply": reply})
            async with self.client.guard("publish transfer"):
                await self.client.redis.publish(self.channel, message)
            started = await self._next(pubsub, ACK_SECONDS)
            if started is None:
                raise NoGateway(f"no gateway answered for call {call_id} within {ACK_SECONDS:g} s")
            if started.get("state") == "refused":
                raise TransferError(int(started.get("status", 409)), str(started.get("detail", "refused")))
            ring = float(started.get("ring_seconds", 30.0))
            done = await self._next(pubsub, ring + DONE_MARGIN_SECONDS)
            if done is not None and done.get("state") == "refused":
                raise TransferError(int(done.get("status", 409)), str(done.get("detail", "refused")))
            if done is None or done.get("state") != "done" or not isinstance(done.get("result"), dict):
                raise NoGateway(f"the gateway of call {call_id} did not report the transfer's outcome")
            return TransferResult.from_dict(done["result"])
        except (RedisError, OSError) as exc:
            raise PoolError(f"transfer over Redis: {exc}") from exc
        finally:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await pubsub.aclose()

    async def _next(self, pubsub: tp.Any, within: float) -> dict[str, tp.Any] | None:
        deadline = time.monotonic() + within
        while (left := deadline - time.monotonic()) > 0:
            async with self.client.guard("transfer reply"):
                message = await pubsub.get_message(timeout=min(POLL_SECONDS, left))
            if message is not None and message.get("type") == "message":
                decoded = _decode(message.get("data"))
                if decoded is not None:
                    return decoded
        return None

    # -- the serving side ----------------------------------------------------------------

    def start(self) -> None:
        self._subscription.start("transfer-subscriber")

    async def close(self) -> None:
        serving = list(self._serving)
        for task in serving:
            task.cancel()
        await asyncio.gather(*serving, return_exceptions=True)
        await self._subscription.close()

    def _handle(self, data: tp.Any) -> None:
        self.received += 1
        request = _decode(data)
        if request is None:
            return
        call_id, target, mode, reply = (request.get(k) for k in ("call_id", "target", "mode", "reply"))
        if not all(isinstance(v, str) for v in (call_id, target, mode, reply)):
            return
        assert isinstance(reply, str)
        if not reply.startswith(self.channel + "-reply:"):
            return  # answers go to our own reply channels only
        try:
            started = self.start_local(tp.cast(str, call_id), tp.cast(str, target), tp.cast(str, mode))
        except TransferError as exc:
            self._spawn(self._publish(reply, {"state": "refused", "status": exc.status, "detail": exc.detail}))
            return
        if started is None:
            return  # not our call
        ring, running = started
        log.info("call %s: transfer requested through another gateway's API", call_id)
        self._spawn(self._report(reply, ring, running))

    def _spawn(self, work: tp.Coroutine[tp.Any, tp.Any, None]) -> None:
        task = asyncio.create_task(work)
        self._serving.add(task)
        task.add_done_callback(self._serving.discard)

    async def _report(self, reply: str, ring: float, running: asyncio.Future[TransferResult]) -> None:
        await self._publish(reply, {"state": "started", "ring_seconds": ring})
        try:
            result = await asyncio.shield(running)
        except asyncio.CancelledError:
            if not running.cancelled():
                raise
            await self._publish(
                reply, {"state": "refused", "status": 409, "detail": "the call ended during the transfer"}
            )
            return
        await self._publish(reply, {"state": "done", "result": result.to_dict()})

    async def _publish(self, channel: str, message: dict[str, tp.Any]) -> None:
        try:
            async with self.client.guard("publish transfer reply"):
                await self.client.redis.publish(channel, json.dumps(message))
        except PoolError as exc:
            metrics.REDIS_ERRORS.labels("transfer-reply").inc()
            log.warning("transfer reply lost: %s", exc)


def _decode(data: tp.Any) -> dict[str, tp.Any] | None:
    raw = data if isinstance(data, bytes | str) else b""
    if len(raw) > MAX_MESSAGE_BYTES:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
