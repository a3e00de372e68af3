"""The call-end webhook against a real local HTTP server: retries with backoff, signature,
final refusals, and the payload a real Gateway sends when a call ends."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time

import httpx
import pytest

from service.config import ConfigError, load
from service.gateway import metrics
from service.gateway.control.webhook import DELIVERY_HEADER, SIGNATURE_HEADER, WebhookSender
from service.settings import GatewaySettings
from tests.support.api import ADMIN, READ, api_gateway, identity_of
from tests.support.http_sink import HttpSink
from tests.support.procs import free_port


def outcome(name: str) -> float:
    return metrics.WEBHOOK_DELIVERIES.labels(name)._value.get()


async def test_a_failed_attempt_is_retried_with_backoff_and_the_same_delivery_id():
    before = {name: outcome(name) for name in ("delivered", "retry")}
    with HttpSink(statuses=[500, 503]) as sink:
        sender = WebhookSender(sink.url, secret="hook-secret", attempts=4, backoff=0.2)
        started = time.monotonic()
        assert await sender.deliver("c-1", {"call": "c-1", "text": "もしもし"}) == "delivered"
        elapsed = time.monotonic() - started
        await sender.close()
    first, second, third = sink.received
    assert elapsed >= 0.2 + 0.4 - 0.05  # backoff 0.2 s, then 0.4 s
    assert first.body == second.body == third.body
    assert json.loads(third.body) == {"call": "c-1", "text": "もしもし"}
    assert first.headers[DELIVERY_HEADER] == third.headers[DELIVERY_HEADER]
    expected = "sha256=" + hmac.new(b"hook-secret", third.body, hashlib.sha256).hexdigest()
    assert third.headers[SIGNATURE_HEADER] == expected
    assert third.headers["Content-Type"] == "application/json; charset=utf-8"
    assert outcome("retry") == before["retry"] + 2
    assert outcome("delivered") == before["delivered"] + 1


async def test_a_client_error_is_final_and_an_unreachable_url_gives_up():
    with HttpSink(statuses=[400]) as sink:
        sender = WebhookSender(sink.url, attempts=3, backoff=0.01)
        rejected = outcome("rejected")
        assert await sender.deliver("c-2", {}) == "rejected"
        assert len(sink.received) == 1 and SIGNATURE_HEADER not in sink.received[0].headers
        assert outcome("rejected") == rejected + 1
    sender = WebhookSender(f"http://127.0.0.1:{free_port()}/hook", attempts=3, backoff=0.01, timeout=1.0)
    failed = outcome("failed")
    assert await sender.deliver("c-3", {}) == "failed"
    assert outcome("failed") == failed + 1
    await sender.close()


async def test_close_abandons_what_is_still_retrying():
    with HttpSink(default=503) as sink:
        sender = WebhookSender(sink.url, attempts=5, backoff=30.0)
        abandoned = outcome("abandoned")
        sender.submit("c-4", {})
        await asyncio.to_thread(sink.wait_for, 1)
        await sender.close(timeout=0.1)
        assert sender.in_flight == 0 and outcome("abandoned") == abandoned + 1


def test_a_webhook_url_that_is_not_http_is_a_configuration_error():
    settings = load(GatewaySettings, environ={"MOSHIMOSHI_WEBHOOK_URL": "ftp://crm.example/hook"})
    with pytest.raises(ConfigError, match="MOSHIMOSHI_WEBHOOK_URL"):
        WebhookSender.from_settings(settings)
    assert WebhookSender.from_settings(load(GatewaySettings, environ={})) is None


async def test_the_gateway_posts_record_quality_and_transcript_when_a_call_ends(redis_server):
    with HttpSink(statuses=[502]) as sink:
        async with api_gateway(
            redis_server.url, webhook_url=sink.url, webhook_secret="s3cr3t-key", webhook_backoff_seconds=0.05
        ) as api:
            call = api.start_call(from_uri="sip:carol@192.0.2.12", worker_id="w-9", slot=2)
            api.say(call, "承知しました", t=1.5)
            api.dtmf(call, "9", t=2.0)
            api.end_call(call, "remote-bye")
            requests = await asyncio.to_thread(sink.wait_for, 2)
    body = json.loads(requests[1].body)
    assert body["event"] == "call.ended"
    record = body["record"]  # as GET /v1/calls/{id} shows it
    assert (record["id"], record["from_uri"], record["worker_id"], record["slot"], record["end_reason"]) == (
        call.id,
        "sip:carol@192.0.2.12",
        "w-9",
        2,
        "remote-bye",
    )
    assert record["state"] == "ended" and record["ended_at"] >= record["answered_at"]
    assert record["gateway_id"] == api.gateway.gateway_id and "quality" not in record
    assert body["transcript"] == {  # as GET /v1/calls/{id}/transcript shows it
        "call_id": call.id,
        "complete": True,
        "end_reason": "remote-bye",
        "text": "承知しました",
        "caller_text": "",
        "events": [
            {"seq": 0, "t": 1.5, "kind": "agent", "text": "承知しました"},
            {"seq": 1, "t": 2.0, "kind": "dtmf", "text": "9", "duration_ms": 120.0},
        ],
    }
    assert isinstance(body["quality"], dict)
    assert requests[1].headers[SIGNATURE_HEADER] == (
        "sha256=" + hmac.new(b"s3cr3t-key", requests[1].body, hashlib.sha256).hexdigest()
    )


@pytest.mark.parametrize("privacy", ["none", "id"])
async def test_caller_identity_in_the_api_and_the_webhook_honours_privacy_the_record_keeps_it(redis_server, privacy):
    identity = identity_of(
        'P-Asserted-Identity: "Yamada Taro" <sip:+81312345678@trunk.example>',
        f"Privacy: {privacy}",
        "Diversion: <sip:0312340000@pbx.example>;reason=no-answer",
    )
    with HttpSink() as sink:
        async with api_gateway(redis_server.url, webhook_url=sink.url) as api:
            call = api.start_call(from_uri="sip:+81312345678@trunk.example", identity=identity)
            await api.settle()
            async with httpx.AsyncClient(base_url=api.base) as client:
                shown = [(await client.get(f"/v1/calls/{call.id}", headers=h)).json() for h in (READ, ADMIN)]
            api.end_call(call, "remote-bye")
            [request] = await asyncio.to_thread(sink.wait_for, 1)
            await api.settle()
            stored = await api.gateway.records.get(call.id)
            async with httpx.AsyncClient(base_url=api.base) as client:
                listed = (await client.get("/v1/calls", headers=READ)).json()["calls"]
    record = json.loads(request.body)["record"]
    [ended] = [c for c in listed if c["id"] == call.id]
    for seen in (*shown, record, ended):  # read and admin tokens, the webhook, the list: all alike
        assert seen["dialled"] == "0501234567"
        if privacy == "id":
            assert seen["caller"]["withheld"] and seen["caller"]["number"] is None
            assert seen["from_uri"] == "sip:anonymous@anonymous.invalid"
            assert "81312345678" not in json.dumps(seen) and "Yamada" not in json.dumps(seen)
        else:
            assert seen["caller"]["number"] == "+81312345678" and seen["caller"]["name"] == "Yamada Taro"
        # Privacy: id withholds who called, not where the call was diverted from (Privacy: header would)
        assert seen["redirects"] == [
            {"header": "diversion", "number": "0312340000", "uri": "sip:0312340000@pbx.example", "reason": "no-answer"}
        ]
    # the stored record keeps the identity whole (for the operator's own audit, never the API)
    assert stored.identity["asserted"][0]["number"] == "+81312345678"
    assert stored.identity["privacy"] == [privacy]
