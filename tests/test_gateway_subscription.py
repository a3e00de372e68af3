"""The gateway's cross-replica channel subscription (call requests and transfers) over a real
redis-server: messages reach the handler, and after Redis is killed and started again on the
same port the subscription stands again by itself, having said the outage once."""

from __future__ import annotations

import asyncio
import logging

from service.gateway.control.subscription import ChannelSubscription
from service.pool import connect
from tests.support.polling import eventually


async def test_follows_a_channel_through_a_redis_restart(redis_server, caplog):
    client = connect(redis_server.url)
    channel = client.keys.prefix + "test-channel"
    received: list[str] = []
    subscription = ChannelSubscription(client, channel, received.append, what="test", metric="test-subscribe")
    subscribed = subscription.subscribed
    subscription.start("test-subscription")
    try:
        await eventually(subscribed.is_set, what="subscribed")
        await client.redis.publish(channel, "one")
        await eventually(lambda: received == ["one"], what="the first message handed on")

        with caplog.at_level(logging.DEBUG, logger="service.gateway.control.subscription"):
            redis_server.kill()
            await eventually(lambda: not subscribed.is_set(), what="the subscription lost")
            await asyncio.sleep(2.0)  # several retries against a Redis that is down
            redis_server.start()
            await eventually(subscribed.is_set, timeout=15.0, what="subscribed again")
        lost = [r for r in caplog.records if "test channel lost" in r.getMessage()]
        assert [r.levelno for r in lost][:1] == [logging.WARNING], caplog.text
        assert len(lost) >= 2 and all(r.levelno == logging.DEBUG for r in lost[1:]), caplog.text

        await client.redis.publish(channel, "two")
        await eventually(lambda: received == ["one", "two"], what="a message after the restart handed on")
    finally:
        await subscription.close()
        await client.close()
