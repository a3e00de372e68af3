"""Redis restarted empty under a full pool loses no call (issue 13, item 8).

A real gateway and a real worker (echo model) over a real redis-server with live SIP calls;
redis-server is SIGKILLed and started again on the same port with no data. New INVITEs two
seconds later must not take the live calls' slots: they wait or get 503, and every live call
goes on to the end its caller chose.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from service.tools.call import place_call
from sip.errors import CallFailed
from tests.support.services import start_gateway, start_worker
from tests.test_pool_e2e import call_settings, silent_run_ms, wait_pool

LIVE_CALLS = 4  # the worker's slots: the pool is full
NEW_INVITES = 8
LIVE_SECONDS = 12.0


@pytest.fixture
def cluster():
    started = []

    def add(process):
        started.append(process)
        return process

    yield add
    for process in reversed(started):
        process.proc.stop()


async def new_call(gateway, tmp_path, name: str) -> tuple[str, float, dict | int]:
    """One new INVITE: ("answered", seconds to answer, summary) or ("refused", seconds, status)."""
    started = time.monotonic()
    try:
        summary = await place_call(call_settings(gateway, tmp_path, name, 1.0, 700))
    except CallFailed as exc:
        return "refused", time.monotonic() - started, exc.status
    return "answered", time.monotonic() - started, summary


async def test_empty_redis_restart_under_a_full_pool_loses_no_live_call(redis_server, tmp_path, cluster):
    url = redis_server.url
    worker = cluster(start_worker(tmp_path, url, "w0", "echo", LIVE_CALLS))
    # default lease TTL (15 s): the gateway renews only every 5 s, so the worker must re-assert
    gateway = cluster(start_gateway(tmp_path, url, "--queue-seconds", "2", "--retry-after-seconds", "9"))
    worker.wait_ready()
    gateway.wait_ready()
    await wait_pool(url, lambda s: "w0" in s, 10, "worker up")

    live = [
        asyncio.create_task(place_call(call_settings(gateway, tmp_path, f"live{i}", LIVE_SECONDS, 300 + 100 * i)))
        for i in range(LIVE_CALLS)
    ]
    before = await wait_pool(url, lambda s: s["w0"]["leases"] == LIVE_CALLS, 20, "the pool full")
    assert before["w0"]["free"] == 0
    await asyncio.sleep(1.0)

    await asyncio.to_thread(redis_server.kill)
    await asyncio.to_thread(redis_server.start)  # same port, no persistence: empty
    await asyncio.sleep(2.0)
    outcomes = await asyncio.gather(*(new_call(gateway, tmp_path, f"new{i}") for i in range(NEW_INVITES)))

    summaries = await asyncio.gather(*live)
    ended = [s["ended_by"] for s in summaries]
    assert ended == ["local-bye"] * LIVE_CALLS, ended  # no live call was hung up by the gateway
    for summary in summaries:
        assert summary["call_seconds"] >= LIVE_SECONDS - 0.5, summary
        assert summary["received_rms"] > 1000, summary
        assert silent_run_ms(summary["recording"]) < 500, summary["recording"]
    # the new calls waited for a slot that never came, and were refused with 503
    assert [o[0] for o in outcomes] == ["refused"] * NEW_INVITES, outcomes
    assert all(o[2] == 503 for o in outcomes), outcomes
    status, text = gateway.get("/metrics", token=None)
    assert status == 200
    assert metric_sum(text, "moshimoshi_pool_failovers_total") == 0  # no live call lost its worker session
    # nothing fenced out on the worker, and no slot leaked once the calls ended
    assert metric_sum(worker_metrics(worker), "moshimoshi_worker_sessions_total", outcome="fenced") == 0
    await wait_pool(
        url, lambda s: s["w0"]["free"] == LIVE_CALLS and s["w0"]["leases"] == 0, 10, "every slot free again"
    )
    after = await new_call(gateway, tmp_path, "after")
    assert after[0] == "answered", after


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` (with these labels) in a Prometheus exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def worker_metrics(worker) -> str:
    from tests.support.services import http_json

    status, text = http_json(f"http://127.0.0.1:{worker.port}/metrics", token=None)
    assert status == 200
    return str(text)


async def test_claims_after_an_empty_restart_wait_only_for_the_workers_re_registration(redis_server, tmp_path, cluster):
    """Half the pool busy: new calls right after the restart get the free slots, never a live one."""
    url = redis_server.url
    worker = cluster(start_worker(tmp_path, url, "w0", "echo", LIVE_CALLS))
    gateway = cluster(start_gateway(tmp_path, url, "--queue-seconds", "5"))
    worker.wait_ready()
    gateway.wait_ready()
    await wait_pool(url, lambda s: "w0" in s, 10, "worker up")
    live = [
        asyncio.create_task(place_call(call_settings(gateway, tmp_path, f"live{i}", 10.0, 300 + 100 * i)))
        for i in range(2)
    ]
    await wait_pool(url, lambda s: s["w0"]["leases"] == 2, 20, "two live calls")
    await asyncio.sleep(1.0)

    await asyncio.to_thread(redis_server.kill)
    await asyncio.to_thread(redis_server.start)
    restarted = time.monotonic()
    # new calls from the moment Redis is back: 503 until the pool is usable again, then answered
    answered_after = None
    refusals = 0
    while answered_after is None:
        assert time.monotonic() - restarted < 10, "no new call answered within 10 s of the restart"
        attempt = time.monotonic()
        kind, _, result = await new_call(gateway, tmp_path, f"new{refusals}")
        if kind == "answered":
            answered_after = attempt - restarted + result["answer_seconds"]
            print(f"\nattempt at +{attempt - restarted:.2f} s answered in {result['answer_seconds']:.2f} s")
        else:
            assert result == 503, result
            refusals += 1
            await asyncio.sleep(0.1)
    second = await new_call(gateway, tmp_path, "second")
    assert second[0] == "answered", second
    summaries = await asyncio.gather(*live)
    assert [s["ended_by"] for s in summaries] == ["local-bye", "local-bye"]
    assert all(silent_run_ms(s["recording"]) < 500 for s in summaries)
    assert metric_sum(worker_metrics(worker), "moshimoshi_worker_sessions_total", outcome="fenced") == 0
    await wait_pool(url, lambda s: s["w0"]["leases"] == 0, 10, "every lease released")
    print(
        f"\nfirst new call answered {answered_after:.2f} s after Redis came back empty "
        f"({refusals} refused with 503 before)"
    )
