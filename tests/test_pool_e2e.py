"""The pool end to end: a gateway and two workers as separate processes over a real Redis.

Calls are real SIP/RTP calls placed with `moshimoshi call`'s engine; workers run the echo
model so that what comes back can be checked.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from service.pool import RegistryReader, connect
from service.settings import CallSettings
from service.tools.call import place_call
from sip.errors import CallFailed
from tests.support.polling import eventually
from tests.support.realtime import realtime_test
from tests.support.services import start_gateway, start_worker, wait_until


def tone(path: Path, seconds: float, freq: float = 440.0) -> Path:
    t = np.arange(int(8000 * seconds)) / 8000
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(8000)
        wav.writeframes((0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2").tobytes())
    return path


async def pool_state(redis_url: str) -> dict[str, dict]:
    client = connect(redis_url)
    try:
        workers = await RegistryReader(client).workers()
    finally:
        await client.close()
    return {
        w.worker_id: {
            "alive": w.alive,
            "free": w.free_slots,
            "capacity": w.capacity,
            "state": w.state,
            "leases": len(w.leases),
        }
        for w in workers
    }


async def wait_pool(redis_url: str, predicate, timeout: float, what: str) -> dict:
    seen: list[dict] = [{}]

    async def check() -> dict | None:
        seen[0] = await pool_state(redis_url)
        return seen[0] if predicate(seen[0]) else None

    return await eventually(check, timeout, what, lambda: f"pool is {seen[0]}", interval=0.1)


def call_settings(gateway, tmp_path: Path, name: str, seconds: float, freq: float = 440.0) -> CallSettings:
    return CallSettings(
        uri=gateway.uri,
        play=str(tone(tmp_path / f"{name}.wav", seconds, freq)),
        record=str(tmp_path / f"{name}-out.wav"),
        seconds=seconds,
        local_host="127.0.0.1",
    )


def silent_run_ms(recording: str, after_s: float = 0.5) -> float:
    """The longest stretch of silence in what came back, after the first ``after_s``."""
    with wave.open(recording) as rec:
        heard = np.frombuffer(rec.readframes(rec.getnframes()), "<i2").reshape(-1, 2)[:, 1]
    frames = heard[int(after_s * 8000) :]
    frames = frames[: len(frames) // 160 * 160].reshape(-1, 160).astype(np.float64)
    loud = np.sqrt((frames**2).mean(axis=1)) > 300
    longest = run = 0
    for flag in loud:
        run = 0 if flag else run + 1
        longest = max(longest, run)
    return longest * 20.0


@pytest.fixture
def cluster(redis_server, tmp_path):
    started = []

    def add(process):
        started.append(process)
        return process

    yield add
    for process in reversed(started):
        proc = getattr(process, "proc", process)
        proc.stop()


async def test_two_workers_fill_then_calls_queue_and_get_503(redis_server, tmp_path, cluster):
    url = redis_server.url
    workers = [cluster(start_worker(tmp_path, url, f"w{i}", slots=2)) for i in range(2)]
    gateway = cluster(start_gateway(tmp_path, url, "--queue-seconds", "2", "--retry-after-seconds", "7"))
    for w in workers:
        w.wait_ready()
    gateway.wait_ready()
    await wait_pool(url, lambda s: len(s) == 2 and all(w["free"] == 2 for w in s.values()), 10, "both workers up")

    calls = [asyncio.create_task(place_call(call_settings(gateway, tmp_path, f"c{i}", 6.0))) for i in range(4)]
    state = await wait_pool(url, lambda s: sum(w["leases"] for w in s.values()) == 4, 15, "4 calls placed")
    assert all(w["free"] == 0 for w in state.values()), state  # least loaded first: 2 + 2

    started = time.monotonic()
    with pytest.raises(CallFailed) as refused:
        await place_call(call_settings(gateway, tmp_path, "extra", 2.0))
    waited = time.monotonic() - started
    assert refused.value.status == 503
    assert refused.value.response is not None
    assert refused.value.response.headers.get("Retry-After") == "7"
    assert waited >= 1.8, waited  # it was held (ringing) for the queue time first

    summaries = await asyncio.gather(*calls)
    assert all(s["received_rms"] > 1000 for s in summaries)
    await wait_pool(
        url, lambda s: all(w["free"] == 2 and w["leases"] == 0 for w in s.values()), 10, "all slots free again"
    )
    status, text = gateway.get("/metrics", token=None)
    assert status == 200
    assert "moshimoshi_pool_queued_calls_total 1.0" in text
    assert 'moshimoshi_pool_rejected_calls_total{reason="no-slot"} 1.0' in text


async def test_worker_killed_mid_call_moves_its_call_to_the_other_worker(redis_server, tmp_path, cluster):
    url = redis_server.url
    workers = {f"w{i}": cluster(start_worker(tmp_path, url, f"w{i}", slots=2)) for i in range(2)}
    gateway = cluster(start_gateway(tmp_path, url))
    for w in workers.values():
        w.wait_ready()
    gateway.wait_ready()
    await wait_pool(url, lambda s: len(s) == 2, 10, "both workers up")

    calls = [
        asyncio.create_task(place_call(call_settings(gateway, tmp_path, f"c{i}", 7.0, 300 + 200 * i))) for i in range(2)
    ]
    state = await wait_pool(url, lambda s: sum(w["leases"] for w in s.values()) == 2, 15, "2 calls placed")
    assert all(w["leases"] == 1 for w in state.values()), state  # one call on each worker
    await asyncio.sleep(2.0)
    await asyncio.to_thread(workers["w0"].proc.kill9)
    killed_at = time.monotonic()
    state = await wait_pool(url, lambda s: s.get("w1", {}).get("leases") == 2, 5, "the call moved to w1")
    moved_after = time.monotonic() - killed_at
    assert moved_after < 2.0, moved_after

    summaries = await asyncio.gather(*calls)
    for summary in summaries:
        assert summary["ended_by"] == "local-bye", summary  # no call was dropped
        assert summary["received_rms"] > 1000
    gaps = [silent_run_ms(s["recording"]) for s in summaries]
    assert max(gaps) < 1000, gaps  # the moved call heard only a short gap
    await wait_pool(
        url,
        lambda s: s["w1"]["free"] == 2 and s["w1"]["leases"] == 0 and (not s.get("w0") or not s["w0"]["alive"]),
        10,
        "slot counts back to full",
    )
    status, text = gateway.get("/metrics", token=None)
    assert 'moshimoshi_pool_failovers_total{outcome="moved"} 1.0' in text


def heard_from(recording: str, start_s: float) -> float:
    """The RMS of what came back from ``start_s`` on (the caller's right channel)."""
    with wave.open(recording) as rec:
        heard = np.frombuffer(rec.readframes(rec.getnframes()), "<i2").reshape(-1, 2)[:, 1]
    tail = heard[int(start_s * 8000) :].astype(np.float64)
    return float(np.sqrt((tail**2).mean())) if len(tail) else 0.0


@realtime_test()
@pytest.mark.stall_expected
async def test_a_stopped_worker_is_left_within_a_second(redis_server, tmp_path, timing):
    """SIGSTOP: the worker's socket stays open and silent. Before: the gateway noticed after a
    second without frames and then waited for the old socket's close handshake (2 s) before
    it claimed a slot elsewhere; the caller heard about 3 s of silence."""
    url = redis_server.url
    run = tmp_path / f"run-{time.monotonic_ns()}"  # a fresh set of processes for each try
    run.mkdir()
    workers = {f"w{i}": start_worker(run, url, f"w{i}-{run.name[-6:]}", slots=2) for i in range(2)}
    gateway = start_gateway(run, url)
    stopped = None
    try:
        for w in workers.values():
            w.wait_ready()
        gateway.wait_ready()
        names = {w.worker_id for w in workers.values()}
        await wait_pool(url, lambda s: names <= {k for k, v in s.items() if v["alive"]}, 10, "both workers up")
        call = asyncio.create_task(place_call(call_settings(gateway, run, "stopped", 7.0)))
        state = await wait_pool(url, lambda s: sum(s[n]["leases"] for n in names) == 1, 15, "the call placed")
        stopped = next(w for w in workers.values() if state[w.worker_id]["leases"] == 1)
        await asyncio.sleep(2.5)
        os.kill(stopped.proc.pid, signal.SIGSTOP)
        summary = await call
        assert summary["ended_by"] == "local-bye", summary  # the call went on
        assert heard_from(summary["recording"], 5.0) > 1000  # the echo came back, from the other worker
        status, text = gateway.get("/metrics", token=None)
        assert 'moshimoshi_pool_failovers_total{outcome="moved"} 1.0' in text
        gap = silent_run_ms(summary["recording"])
        timing.expect(gap <= 1000, f"the caller heard {gap:.0f} ms of silence when its worker stopped (≤ 1 s)")
    finally:
        if stopped is not None:
            os.kill(stopped.proc.pid, signal.SIGCONT)
        gateway.proc.stop()
        for w in workers.values():
            w.proc.stop()


@pytest.mark.stall_expected
async def test_a_stalled_worker_with_no_slot_elsewhere_keeps_its_call_until_it_is_lost(redis_server, tmp_path, cluster):
    """One worker: a pause (SIGSTOP, then SIGCONT 1.5 s later) costs the call a gap, not the
    call (before: it ended after a second, "worker-lost"); a worker that stays stopped is
    given up after WORKER_LOST_SECONDS and the call ends with a BYE."""
    from service.gateway.calls.call import WORKER_LOST_SECONDS

    url = redis_server.url
    worker = cluster(start_worker(tmp_path, url, "w0", slots=2))
    gateway = cluster(start_gateway(tmp_path, url))
    worker.wait_ready()
    gateway.wait_ready()
    await wait_pool(url, lambda s: "w0" in s, 10, "the worker up")
    call = asyncio.create_task(place_call(call_settings(gateway, tmp_path, "paused", 16.0)))
    await wait_pool(url, lambda s: s["w0"]["leases"] == 1, 15, "the call placed")
    try:
        await asyncio.sleep(2.0)
        os.kill(worker.proc.pid, signal.SIGSTOP)
        await asyncio.sleep(1.5)
        os.kill(worker.proc.pid, signal.SIGCONT)
        await asyncio.sleep(2.5)
        status, body = gateway.get("/v1/calls?state=active")
        assert [c["worker_id"] for c in body["calls"]] == ["w0"], body  # the call goes on, on w0
        os.kill(worker.proc.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        summary = await call
        lasted = time.monotonic() - stopped_at
    finally:
        os.kill(worker.proc.pid, signal.SIGCONT)
    assert summary["ended_by"] == "remote-bye", summary
    assert heard_from(summary["recording"], 4.0) > 1000  # the echo came back after the pause
    assert WORKER_LOST_SECONDS - 0.5 < lasted < WORKER_LOST_SECONDS + 3, lasted
    status, record = gateway.get(f"/v1/calls/{summary['gateway_call_id']}")
    assert record["end_reason"] == "worker-lost" and record["quality"]["failovers"] == 0, record


async def test_worker_killed_with_no_slot_elsewhere_ends_the_call_with_bye(redis_server, tmp_path, cluster):
    url = redis_server.url
    workers = {f"w{i}": cluster(start_worker(tmp_path, url, f"w{i}", slots=1)) for i in range(2)}
    gateway = cluster(start_gateway(tmp_path, url))
    for w in workers.values():
        w.wait_ready()
    gateway.wait_ready()
    await wait_pool(url, lambda s: len(s) == 2, 10, "both workers up")
    calls = [asyncio.create_task(place_call(call_settings(gateway, tmp_path, f"c{i}", 8.0))) for i in range(2)]
    await wait_pool(url, lambda s: sum(w["leases"] for w in s.values()) == 2, 15, "2 calls placed")
    await asyncio.sleep(1.0)
    await asyncio.to_thread(workers["w0"].proc.kill9)
    summaries = await asyncio.gather(*calls)
    ended = sorted(s["ended_by"] for s in summaries)
    assert ended == ["local-bye", "remote-bye"], [(s["ended_by"], s["call_seconds"]) for s in summaries]
    short = min(summaries, key=lambda s: s["call_seconds"])
    assert short["call_seconds"] < 4.0
    await wait_pool(url, lambda s: s["w1"]["free"] == 1 and s["w1"]["leases"] == 0, 10, "w1 free again")
    status, text = gateway.get("/metrics", token=None)
    assert 'moshimoshi_pool_failovers_total{outcome="no-slot"} 1.0' in text


async def test_redis_restart_keeps_calls_and_leaves_no_stuck_slot(redis_server, tmp_path, cluster):
    url = redis_server.url
    worker = cluster(start_worker(tmp_path, url, "w0", slots=2))
    gateway = cluster(start_gateway(tmp_path, url, "--queue-seconds", "0", "--lease-ttl-seconds", "3"))
    worker.wait_ready()
    gateway.wait_ready()
    await wait_pool(url, lambda s: "w0" in s, 10, "worker up")
    call = asyncio.create_task(place_call(call_settings(gateway, tmp_path, "long", 9.0)))
    await wait_pool(url, lambda s: s["w0"]["leases"] == 1, 15, "call placed")
    await asyncio.sleep(1.0)

    # (blocking helpers run in threads: the calls' media runs on this test's event loop)
    await asyncio.to_thread(redis_server.stop)  # no persistence: it comes back empty
    await asyncio.to_thread(wait_until, lambda: not gateway.ready(), 10, "the gateway to notice Redis is gone")
    with pytest.raises(CallFailed) as refused:
        await place_call(call_settings(gateway, tmp_path, "during", 1.0))
    assert refused.value.status == 503
    await asyncio.sleep(1.0)
    await asyncio.to_thread(redis_server.start)
    await asyncio.to_thread(wait_until, gateway.ready, 15, "the gateway ready again")
    # the worker re-registered and the call's lease was re-created by its renewal
    await wait_pool(url, lambda s: s.get("w0", {}).get("leases") == 1, 10, "the lease re-created")
    after = await place_call(call_settings(gateway, tmp_path, "after", 2.0))
    assert after["received_rms"] > 1000

    summary = await call
    assert summary["ended_by"] == "local-bye"  # the call carried on through the outage
    assert silent_run_ms(summary["recording"]) < 300
    await wait_pool(url, lambda s: s["w0"]["free"] == 2 and s["w0"]["leases"] == 0, 10, "no stuck slot, no ghost lease")
