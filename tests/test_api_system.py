"""The control plane end to end: ``moshimoshi serve --model demo`` (real redis-server, worker
process, gateway) and real SIP/RTP calls placed with ``moshimoshi call``. During a call the
API, the live transcript WebSocket and /metrics show it; after it, the transcript, the
record, the webhook; transcripts never reach the logs. Hang-up and drain through the API,
and probes during a drain, on an echo system."""

from __future__ import annotations

import json
import signal
import time
import typing as tp

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect as ws_connect

from tests.support.http_sink import HttpSink
from tests.support.polling import wait_until
from tests.support.system import RunningSystem, running_system

pytestmark = pytest.mark.system

CALL_SECONDS = 7.0

# moshi's defaults: `serve --model demo` sets no sampling flag
MOSHI_SAMPLING = {"greedy": False, "temp": 0.8, "temp_text": 0.7, "top_k": 250, "top_k_text": 25}


def metric_values(system: RunningSystem) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, parsed with prometheus_client's own parser."""
    text = httpx.get(system.api + "/metrics", timeout=10).text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def value(values: dict, name: str, **labels: str) -> float:
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


def active_call(system: RunningSystem, client: httpx.Client) -> dict:
    def find() -> dict | None:
        calls = client.get("/v1/calls", params={"state": "active"}).json()["calls"]
        return next((c for c in calls if c["state"] == "active"), None)

    return wait_until(find, what="the call listed as active")


@pytest.fixture(scope="module")
def webhook_sink() -> tp.Iterator[HttpSink]:
    with HttpSink() as sink:
        yield sink


@pytest.fixture(scope="module")
def system(tmp_path_factory, webhook_sink) -> tp.Iterator[RunningSystem]:
    with running_system(
        tmp_path_factory.mktemp("demo-system"), model="demo", env={"MOSHIMOSHI_WEBHOOK_URL": webhook_sink.url}
    ) as running:
        yield running


def test_a_call_in_the_api_live_transcript_metrics_and_webhook(system, webhook_sink):
    before = metric_values(system)
    call = system.call(seconds=CALL_SECONDS)
    client = httpx.Client(base_url=system.api, headers=system.headers("read"), timeout=10)

    # during the call: listed, with live quality
    listed = active_call(system, client)
    call_id = listed["id"]
    assert listed["from_uri"].startswith("sip:moshimoshi@127.0.0.1") and listed["on_this_gateway"]
    assert listed["worker_id"] and listed["slot"] in (0, 1) and listed["model"] == "demo"
    assert listed["sampling"] == MOSHI_SAMPLING  # what the worker said it samples this call with

    # the live transcript delivers pieces while the call goes on
    pieces: list[dict] = []
    url = f"ws://127.0.0.1:{system.http_port}/v1/calls/{call_id}/transcript/live?token={system.tokens['read']}"
    with ws_connect(url, open_timeout=10) as ws:
        while len(pieces) < 5:
            message = json.loads(ws.recv(timeout=10))
            assert message["type"] == "piece", message
            pieces.append(message)
        assert call.proc.poll() is None, "the pieces should arrive during the call"

        detail = client.get(f"/v1/calls/{call_id}").json()
        quality = detail["quality"]
        assert detail["state"] == "active" and quality["codec"] == "PCMU"
        for key in (
            "jitter_ms",
            "loss_fraction",
            "concealed_frames",
            "egress_underruns",
            "packets_received",
            "packets_sent",
        ):
            assert quality[key] is not None and quality[key] >= 0, key
        assert quality["gateway_latency_ms"]["p50"] > 0 and quality["gateway_latency_ms"]["jitter_buffer"] >= 0
        assert "rtt_ms" in quality
        assert quality["packets_received"] > 0

        during = metric_values(system)
        assert value(during, "moshimoshi_calls_active", ingress="sip") == 1
        received = value(during, "moshimoshi_rtp_packets_received_total")
        sent = value(during, "moshimoshi_rtp_packets_sent_total")
        assert received > value(before, "moshimoshi_rtp_packets_received_total")
        time.sleep(0.5)
        later = metric_values(system)
        assert value(later, "moshimoshi_rtp_packets_received_total") > received  # moving
        assert value(later, "moshimoshi_rtp_packets_sent_total") > sent

        while (message := json.loads(ws.recv(timeout=CALL_SECONDS + 10)))["type"] == "piece":
            pieces.append(message)
        assert message == {"type": "end", "reason": "remote-bye"}

    summary = call.result()
    assert summary["gateway_call_id"] == call_id
    assert summary["transcript_events"] >= len(pieces) > 0  # `moshimoshi call` read it with the token

    # after the call: the transcript, JSON and text, and the record, ended with its reason
    transcript = client.get(f"/v1/calls/{call_id}/transcript").json()
    assert transcript["complete"] and transcript["end_reason"] == "remote-bye"
    assert [(e["seq"], e["text"]) for e in transcript["events"]] == [(p["seq"], p["text"]) for p in pieces]
    text = client.get(f"/v1/calls/{call_id}/transcript", params={"format": "text"}).text
    assert text.startswith(f"# call {call_id}, ended: remote-bye\n")
    agent_words = transcript["text"]
    assert agent_words.replace(" ", "")[:8] in text.replace(" ", "")
    ended = client.get(f"/v1/calls/{call_id}").json()
    assert (ended["state"], ended["end_reason"]) == ("ended", "remote-bye")
    assert ended["sampling"] == MOSHI_SAMPLING
    assert ended["duration_s"] == pytest.approx(CALL_SECONDS, abs=2.0)
    assert call_id in [c["id"] for c in client.get("/v1/calls", params={"state": "ended"}).json()["calls"]]

    after = metric_values(system)
    assert value(after, "moshimoshi_calls_active", ingress="sip") == 0
    assert value(after, "moshimoshi_calls_total", ingress="sip", outcome="remote-bye") == 1 + value(
        before, "moshimoshi_calls_total", ingress="sip", outcome="remote-bye"
    )
    assert value(after, "moshimoshi_call_duration_seconds_count") > value(
        before, "moshimoshi_call_duration_seconds_count"
    )
    assert value(after, "moshimoshi_sip_responses_total", code="200") >= 1
    assert value(after, "moshimoshi_transcript_pieces_total") >= len(pieces)
    assert (
        value(after, "moshimoshi_http_requests_total", method="GET", route="/v1/calls/{call_id}/transcript", code="200")
        >= 2
    )
    assert value(after, "moshimoshi_gateway_added_latency_seconds_count") > 0
    # each live call's jitter and loss are sampled every 5 s: a 7 s call is sampled at least once
    assert value(after, "moshimoshi_rtp_jitter_seconds_count") > value(before, "moshimoshi_rtp_jitter_seconds_count")
    assert value(after, "moshimoshi_rtp_loss_ratio_count") > value(before, "moshimoshi_rtp_loss_ratio_count")

    # the webhook got the record, the quality and the same transcript
    delivered = wait_until(
        lambda: [json.loads(r.body) for r in webhook_sink.received if json.loads(r.body)["record"]["id"] == call_id],
        what="the webhook",
    )
    payload = delivered[0]
    assert payload["record"]["end_reason"] == "remote-bye" and payload["quality"]["codec"] == "PCMU"
    assert payload["record"]["sampling"] == MOSHI_SAMPLING
    assert [e["text"] for e in payload["transcript"]["events"]] == [e["text"] for e in transcript["events"]]

    # transcripts are personal data: no stretch of the agent's words is in the logs
    assert len(agent_words) >= 12
    output = system.output()
    assert call_id in output  # the log does name the call
    leaks = [
        agent_words[i : i + 6]
        for i in range(len(agent_words) - 5)
        if agent_words[i : i + 6].strip() and agent_words[i : i + 6] in output
    ]
    assert not leaks, f"transcript text in the logs: {leaks[:3]}"
    client.close()


def test_hangup_through_the_api_sends_bye(system):
    call = system.call(seconds=30)
    client = httpx.Client(base_url=system.api, timeout=10)
    call_id = active_call(system, httpx.Client(base_url=system.api, headers=system.headers("read")))["id"]
    refused = client.post(f"/v1/calls/{call_id}/hangup", headers=system.headers("read"))
    assert refused.status_code == 403
    started = time.monotonic()
    answer = client.post(f"/v1/calls/{call_id}/hangup", headers=system.headers("admin"))
    assert answer.status_code == 202 and answer.json()["on_this_gateway"] is True
    summary = call.result(timeout=20)
    took = time.monotonic() - started
    assert summary["ended_by"] == "remote-bye", summary
    assert took < 10, f"the BYE came {took:.1f} s after the hang-up"
    record = wait_until(
        lambda: (
            (r := client.get(f"/v1/calls/{call_id}", headers=system.headers("read")).json())
            and r["state"] == "ended"
            and r
        ),
        what="the call ended",
    )
    assert record["end_reason"] == "api-hangup"
    client.close()


def test_drain_through_the_api_and_sigterm_keep_the_probes_answering(tmp_path):
    with running_system(tmp_path, model="echo") as system:
        client = httpx.Client(base_url=system.api, timeout=10)
        assert client.get("/readyz").json()["ready"] is True
        call = system.call(seconds=15)  # outlasts the drain steps below on a slow machine
        active_call(system, httpx.Client(base_url=system.api, headers=system.headers("read")))
        [worker] = client.get("/v1/pool", headers=system.headers("read")).json()["workers"]
        assert (
            client.post(f"/v1/workers/{worker['worker_id']}/drain", headers=system.headers("read")).status_code == 403
        )
        drained = client.post(f"/v1/workers/{worker['worker_id']}/drain", headers=system.headers("admin"))
        assert drained.status_code == 202
        assert drained.json()["status"] == 202 and "sessions" in drained.json()["answer"]  # the worker's own answer
        wait_until(
            lambda: client.get("/v1/pool", headers=system.headers("read")).json()["workers"][0]["state"] == "draining",
            what="the worker draining in the pool",
        )
        wait_until(lambda: client.get("/readyz").status_code == 503, what="not ready without a ready worker")

        system.proc.send_signal(signal.SIGTERM)  # the gateway drains too; its probes keep answering
        wait_until(lambda: client.get("/readyz").json()["draining"], what="the gateway draining")
        assert client.get("/healthz").status_code == 200
        assert client.get("/v1/calls", params={"state": "active"}, headers=system.headers("read")).json()["calls"], (
            "the call goes on"
        )
        summary = call.result()
        assert summary["ended_by"] == "local-bye"  # the call ran its course
        system.proc.wait(30)
        assert system.proc.returncode == 0
        client.close()


def test_serve_without_tokens_makes_one_for_the_run_and_prints_it_once(tmp_path):
    with running_system(tmp_path, model="echo", tokens={}) as system:
        lines = [line for line in system.output().splitlines() if "API token for this run" in line]
        assert len(lines) == 1, lines
        token = lines[0].rsplit(" ", 1)[1]
        pool = httpx.get(system.api + "/v1/pool", headers={"Authorization": f"Bearer {token}"})
        assert pool.status_code == 200 and pool.json()["workers_ready"] == 1
        hangup = httpx.post(system.api + "/v1/calls/c-none/hangup", headers={"Authorization": f"Bearer {token}"})
        assert hangup.status_code == 404  # admin scope: past auth, to the route
        assert httpx.get(system.api + "/v1/pool").status_code == 401
