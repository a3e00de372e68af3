"""Transcripts: Redis Streams storage (write-behind, outages, retention), the transcript
endpoint in JSON and text, and the live WebSocket on the call's gateway and on another
replica. Real redis-server, real Gateway objects and apps."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from websockets.asyncio.client import connect as ws_connect

from service.api.transcripts import TRANSCRIPT_VIEWERS
from service.gateway import metrics
from service.gateway.calls.transcript import TranscriptEvent
from service.gateway.control.transcript_store import TranscriptStore, event_fields, transcript_key
from service.pool import connect
from tests.support.api import READ, READ_TOKEN, api_gateway
from tests.support.pool import eventually


def piece(text: str, t: float = 0.0) -> TranscriptEvent:
    return TranscriptEvent(t=t, kind="agent", text=text)


@pytest.fixture
async def store(redis_server):
    client = connect(redis_server.url)
    transcripts = TranscriptStore(client, retention=60.0)
    transcripts.start()
    yield transcripts
    await transcripts.close(timeout=1.0)
    await client.close()


async def test_pieces_are_stored_in_order_with_ttl_and_an_end_entry(store):
    for seq, text in enumerate(["こん", "にち", "は"]):
        store.append("c-1", seq, piece(text, t=seq * 0.08))
    store.append("c-1", 3, TranscriptEvent(t=0.5, kind="dtmf", text="5", duration_ms=160.0))
    store.end("c-1", "remote-bye")
    assert await store.flush(5)
    stored = await store.read("c-1")
    assert stored is not None and stored.ended and stored.end_reason == "remote-bye"
    assert [(seq, e.kind, e.text) for seq, e in stored.pieces] == [
        (0, "agent", "こん"),
        (1, "agent", "にち"),
        (2, "agent", "は"),
        (3, "dtmf", "5"),
    ]
    assert stored.pieces[3][1].duration_ms == 160.0
    assert stored.pieces[1][1].t == pytest.approx(0.08)
    ttl = await store.client.redis.pttl(transcript_key(store.client, "c-1"))
    assert 55_000 < ttl <= 60_000
    assert await store.read("c-none") is None
    assert store.stored == 4 and store.dropped == 0


async def test_a_piece_stored_twice_is_read_once(store):
    key = transcript_key(store.client, "c-dup")
    for fields in (
        event_fields(0, piece("a")),
        event_fields(1, piece("b")),
        event_fields(1, piece("b")),
        {"kind": "agent", "t": "oops"},
    ):  # a malformed entry is skipped
        await store.client.redis.xadd(key, fields)
    stored = await store.read("c-dup")
    assert stored is not None and [e.text for _, e in stored.pieces] == ["a", "b"]


async def test_transcripts_expire_after_the_retention(redis_server):
    client = connect(redis_server.url)
    short = TranscriptStore(client, retention=0.5)
    short.start()
    short.append("c-short", 0, piece("個人情報"))
    short.end("c-short", "remote-bye")
    assert await short.flush(5)
    assert await short.read("c-short") is not None
    await eventually(lambda: _gone(short, "c-short"), timeout=5, what="the transcript expiring")
    await short.close()
    await client.close()


async def _gone(store: TranscriptStore, call_id: str) -> bool:
    return await store.read(call_id) is None


async def test_a_redis_outage_loses_no_piece_and_an_overflow_is_counted(redis_server):
    client = connect(redis_server.url)
    store = TranscriptStore(client, retention=60.0, max_pending=5)
    store.start()
    redis_server.stop()
    dropped_before = metrics.TRANSCRIPT_PIECES_DROPPED.labels("overflow")._value.get()
    for seq in range(3):
        store.append("c-out", seq, piece(str(seq)))  # returns at once, Redis or not
    await eventually(lambda: store.write_failures >= 1, what="a failed write")
    assert store.pending == 3 and store.dropped == 0
    redis_server.start()  # same port, empty
    await eventually(lambda: store.pending == 0, timeout=15, what="the pieces stored after the outage")
    stored = await store.read("c-out")
    assert stored is not None and [e.text for _, e in stored.pieces] == ["0", "1", "2"]

    redis_server.stop()
    for seq in range(3, 10):
        store.append("c-out", seq, piece(str(seq)))
    assert store.pending <= 5 and store.dropped == 2  # the two oldest went
    assert metrics.TRANSCRIPT_PIECES_DROPPED.labels("overflow")._value.get() == dropped_before + 2
    await store.close(timeout=0.2)  # Redis still down: what is left is counted as dropped
    assert store.dropped == 7 and store.pending == 0
    await client.close()


async def test_transcript_endpoint_json_and_text_from_any_replica(redis_server):
    async with (
        api_gateway(redis_server.url, gateway_id="gw-a") as a,
        api_gateway(redis_server.url, gateway_id="gw-b") as b,
        httpx.AsyncClient(timeout=10) as http,
    ):
        call = a.start_call()
        a.say(call, "お電話", t=0.5)
        a.say(call, "ありがとう", t=0.7)
        a.dtmf(call, "3", t=1.0)
        a.say(call, "ございます。", t=1.2)
        a.say(call, "ご用件は", t=4.0)
        live = (await http.get(f"{a.base}/v1/calls/{call.id}/transcript", headers=READ)).json()
        assert live["complete"] is False and live["text"] == "お電話ありがとうございます。ご用件は"
        a.end_call(call, "remote-bye")
        await a.settle()
        for base in (a.base, b.base):  # memory on A, the Redis stream on B
            body = (await http.get(f"{base}/v1/calls/{call.id}/transcript", headers=READ)).json()
            assert body["call_id"] == call.id and body["complete"] is True and body["end_reason"] == "remote-bye"
            assert [(e["seq"], e["t"], e["kind"], e["text"]) for e in body["events"]] == [
                (0, 0.5, "agent", "お電話"),
                (1, 0.7, "agent", "ありがとう"),
                (2, 1.0, "dtmf", "3"),
                (3, 1.2, "agent", "ございます。"),
                (4, 4.0, "agent", "ご用件は"),
            ]
            assert body["events"][2]["duration_ms"] == 120.0
            text = await http.get(f"{base}/v1/calls/{call.id}/transcript?format=text", headers=READ)
            assert text.headers["content-type"] == "text/plain; charset=utf-8"
            assert text.text.splitlines() == [
                f"# call {call.id}, ended: remote-bye",
                "[00:00.50] agent: お電話ありがとう",
                "[00:01.00] DTMF: 3 (120 ms)",
                "[00:01.20] agent: ございます。",
                "[00:04.00] agent: ご用件は",
            ]
            accept = await http.get(f"{base}/v1/calls/{call.id}/transcript", headers={**READ, "Accept": "text/plain"})
            assert accept.text == text.text
        missing = await http.get(f"{b.base}/v1/calls/c-nobody/transcript", headers=READ)
        assert missing.status_code == 404


async def test_ended_transcripts_leave_memory_and_redis_after_the_retention(redis_server):
    async with api_gateway(redis_server.url, call_retention_seconds=1.0) as api, httpx.AsyncClient() as http:
        call = api.start_call()
        api.say(call, "すぐ消える")
        api.end_call(call)
        await api.settle()
        url = f"{api.base}/v1/calls/{call.id}/transcript"
        assert (await http.get(url, headers=READ)).status_code == 200

        async def expired() -> bool:
            transcript = await http.get(url, headers=READ)
            record = await http.get(f"{api.base}/v1/calls/{call.id}", headers=READ)
            return transcript.status_code == record.status_code == 404

        await eventually(expired, timeout=6, what="the transcript and record gone after their retention")
        assert api.gateway.table.forget_expired() == 1  # and the sampler drops it from memory
        assert api.gateway.table.recent == []


async def receive_until_end(ws) -> list[dict]:
    messages = []
    while True:
        message = json.loads(await ws.recv())
        messages.append(message)
        if message["type"] == "end":
            return messages


async def test_live_transcript_replays_then_follows_on_the_calls_gateway(redis_server):
    async with api_gateway(redis_server.url) as api:
        call = api.start_call()
        api.say(call, "前")
        async with ws_connect(f"{api.ws_base}/v1/calls/{call.id}/transcript/live?token={READ_TOKEN}") as ws:
            first = json.loads(await ws.recv())
            assert first == {"type": "piece", "seq": 0, "t": first["t"], "kind": "agent", "text": "前"}
            api.say(call, "<script>alert(1)</script>")  # passed on as data, never interpreted
            api.dtmf(call, "#")
            api.end_call(call, "api-hangup")
            rest = await receive_until_end(ws)
            await ws.wait_closed()
        assert [(m.get("seq"), m.get("text")) for m in rest[:2]] == [(1, "<script>alert(1)</script>"), (2, "#")]
        assert rest[1]["kind"] == "dtmf" and rest[1]["duration_ms"] == 120.0
        assert rest[-1] == {"type": "end", "reason": "api-hangup"}
        assert ws.close_code == 1000
        assert not api.gateway.transcripts.listeners  # no listener left behind

        # an ended call: the whole transcript, then the end
        async with ws_connect(f"{api.ws_base}/v1/calls/{call.id}/transcript/live?token={READ_TOKEN}") as ws:
            replay = await receive_until_end(ws)
        assert [m.get("text") for m in replay] == ["前", "<script>alert(1)</script>", "#", None]

        async with ws_connect(f"{api.ws_base}/v1/calls/c-unknown/transcript/live?token={READ_TOKEN}") as ws:
            await ws.wait_closed()
        assert ws.close_code == 4404


async def test_live_transcript_on_another_replica_follows_the_stream(redis_server):
    async with (
        api_gateway(redis_server.url, gateway_id="gw-a") as a,
        api_gateway(redis_server.url, gateway_id="gw-b") as b,
    ):
        call = a.start_call()
        await a.settle()  # its record is in Redis; it has said nothing yet: no stream
        async with ws_connect(f"{b.ws_base}/v1/calls/{call.id}/transcript/live?token={READ_TOKEN}") as ws:
            a.say(call, "一")
            assert json.loads(await asyncio.wait_for(ws.recv(), 5))["text"] == "一"
        async with ws_connect(f"{b.ws_base}/v1/calls/{call.id}/transcript/live?token={READ_TOKEN}") as ws:
            assert json.loads(await ws.recv())["text"] == "一"  # replayed from the stream
            for text in ("二", "三"):
                a.say(call, text)
                message = json.loads(await asyncio.wait_for(ws.recv(), 5))
                assert message["text"] == text
            a.end_call(call, "remote-bye")
            assert json.loads(await asyncio.wait_for(ws.recv(), 5)) == {"type": "end", "reason": "remote-bye"}
            await ws.wait_closed()
        assert ws.close_code == 1000


async def test_a_viewer_that_leaves_is_let_go(redis_server):
    async with api_gateway(redis_server.url) as api:
        call = api.start_call()
        viewers = TRANSCRIPT_VIEWERS._value.get()
        async with ws_connect(f"{api.ws_base}/v1/calls/{call.id}/transcript/live?token={READ_TOKEN}"):
            await eventually(lambda: call.id in api.gateway.transcripts.listeners, what="the viewer subscribed")
            assert TRANSCRIPT_VIEWERS._value.get() == viewers + 1
        await eventually(lambda: call.id not in api.gateway.transcripts.listeners, what="the viewer let go")
        await eventually(lambda: TRANSCRIPT_VIEWERS._value.get() == viewers, what="the gauge back")


async def test_following_a_stream_that_never_ends_stops_when_the_call_is_gone(store):
    """The call's gateway died without writing the end entry: the follower asks whether
    the call still goes on, and stops when it does not."""
    answers = iter([True, False])
    asked = []

    async def still_on() -> bool:
        asked.append(True)
        return next(answers)

    store.append("c-orphan", 0, piece("最後"))
    assert await store.flush(5)
    entries = [e async for e in store.follow("c-orphan", still_on=still_on, block_ms=100, check_every=0.2)]
    assert [e.event.text for e in entries if e.event] == ["最後"] and len(asked) == 2
    # without still_on, a stream that does not exist ends the follow at once
    assert [e async for e in store.follow("c-never")] == []
