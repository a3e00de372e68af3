"""Requests for a call across gateway replicas (hang up, pause or resume its recording),
over a Redis pub/sub channel.

The API of any replica can act on any call: when the call is not its own, it publishes
the request on ``{prefix}hangup``; every gateway subscribes, and the one that has the
call carries it out (a BYE; silence in the recording from now). A hang-up is the bare call
id (what earlier versions sent); other requests are JSON ``{"op": "pause", "call_id": …}``.
The subscription (``subscription.py``) reconnects by itself after a Redis outage.
"""

from __future__ import annotations

import json
import logging
import typing as tp

from service.gateway.control.subscription import ChannelSubscription
from service.pool import PoolClient

log = logging.getLogger(__name__)

HANGUP = "hangup"
OPERATIONS = frozenset({HANGUP, "pause", "resume"})


class CallCommands:
    """Publishes requests and hands the ones for any call to ``on_request(op, call_id)``
    (which returns True when it had the call)."""

    def __init__(self, client: PoolClient, on_request: tp.Callable[[str, str], bool]) -> None:
        self.client = client
        self.channel = client.keys.prefix + "hangup"
        self.on_request = on_request
        self.received = 0
        self._subscription = ChannelSubscription(
            client, self.channel, self._handle, what="call request", metric="hangup-subscribe"
        )
        self.subscribed = self._subscription.subscribed

    async def publish(self, call_id: str, op: str = HANGUP) -> int:
        """Ask every gateway to do ``op`` to ``call_id``; returns how many gateways listened.
        Raises PoolError."""
        if op not in OPERATIONS:
            raise ValueError(f"unknown call request {op!r}")
        message = call_id if op == HANGUP else json.dumps({"op": op, "call_id": call_id})
        async with self.client.guard(f"publish {op}"):
            return int(await self.client.redis.publish(self.channel, message))

    def start(self) -> None:
        self._subscription.start("call-commands")

    async def close(self) -> None:
        await self._subscription.close()

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
