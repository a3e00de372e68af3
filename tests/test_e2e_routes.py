"""Routes, queue announcements, overflow, per-route limits and outbound calls, end to end.

One Redis, two workers serving different models (``--model echo`` with two slots, ``demo``
with one), one gateway with a routes file: real SIP calls placed with ``moshimoshi call``'s
engine, sipp and baresip as the far ends of outbound calls. The file is rewritten and the
gateway sent SIGHUP in the middle of a call.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import typing as tp
import wave
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.settings import CallSettings
from service.tools.call import place_call
from sip.errors import CallFailed
from tests.conftest import RedisServer
from tests.support.baresip import write_baresip_config
from tests.support.person import Person
from tests.support.procs import free_port_pair, moshimoshi_cmd, python_env
from tests.support.services import ADMIN_TOKEN, Gateway, start_gateway, start_worker, wait_until
from tests.support.sipp import SCENARIOS, Sipp, have_sipp
from tests.support.tools import requires
from tests.support.udp import UdpPeer

pytestmark = pytest.mark.system

ECHO, DEMO, QUEUE, FULL, LIMITED, SHORT, SWITCH = (
    "0311110000",
    "0322220000",
    "0344440000",
    "0355550000",
    "0366660000",
    "0388880000",
    "0377770000",
)
PBX = "0391910000"  # a PBX's line: pressing 0 hands the call back to it by REFER
ROUTES = f"""\
# one number per behaviour under test
unmatched: reject
routes:
  - name: echo-line
    match: {{number: "{ECHO}"}}
    model: echo
    dtmf: {{"9": hangup}}
  - name: demo-line
    match: {{number: "+81{DEMO[1:]}"}}   # written in E.164, dialled in national form
    model: demo
    sampling: {{temp: 0.5, top_k: 10}}
  - name: queue-line
    match: {{number: "{QUEUE}"}}
    model: echo
    queue_seconds: 8
    announcement: ringback
  - name: full-line
    match: {{number: "{FULL}"}}
    model: demo
    queue_seconds: 1
    overflow: {{action: message, message: message.wav}}
  - name: limited-line
    match: {{number: "{LIMITED}"}}
    model: echo
    max_calls: 1
  - name: short-line
    match: {{number: "{SHORT}"}}
    model: echo
    max_call_seconds: 2
  - name: switch-line
    match: {{number: "{SWITCH}"}}
    model: echo
  - name: pbx-line
    match: {{number: "{PBX}"}}
    model: echo
    fallback: "sip:queue@pbx.example"
    dtmf: {{"0": transfer}}
"""


def tone_wav(path: Path, seconds: float, freq: float, rate: int = 8000) -> Path:
    t = np.arange(int(rate * seconds)) / rate
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes((0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2").tobytes())
    return path


def heard(path: str | Path, channel: int = 1) -> tuple[np.ndarray, int]:
    with wave.open(str(path)) as wav:
        rate, channels = wav.getframerate(), wav.getnchannels()
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), "<i2").reshape(-1, channels)[:, channel]
    return pcm.astype(np.float64), rate


def peak_hz(pcm: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(pcm * np.hanning(len(pcm))))
    return float(np.fft.rfftfreq(len(pcm), 1 / rate)[spectrum.argmax()])


def rms(pcm: np.ndarray) -> float:
    return float(np.sqrt(np.mean(pcm**2))) if len(pcm) else 0.0


class Cluster(tp.NamedTuple):
    gateway: Gateway
    routes: Path
    dir: Path
    redis_url: str


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> tp.Iterator[Cluster]:
    folder = tmp_path_factory.mktemp("routes")
    tone_wav(folder / "message.wav", 1.5, 1000.0)
    routes = folder / "routes.yaml"
    routes.write_text(ROUTES)
    redis = RedisServer(folder)
    redis.start()
    started: list[tp.Any] = []
    try:
        echo = start_worker(folder, redis.url, "w-echo", "echo", 2)
        started.append(echo.proc)
        demo = start_worker(folder, redis.url, "w-demo", "demo", 1)
        started.append(demo.proc)
        gateway = start_gateway(folder, redis.url, "--routes", str(routes), "--retry-after-seconds", "9")
        started.append(gateway.proc)
        echo.wait_ready()
        demo.wait_ready(timeout=240)
        gateway.wait_ready()
        wait_until(lambda: pool_free(gateway) == 3, 15, "both workers' slots in the pool", gateway.proc)
        yield Cluster(gateway, routes, folder, redis.url)
    finally:
        for proc in reversed(started):
            proc.stop()
        redis.stop()


def pool_free(gateway: Gateway) -> int:
    """Free slots over both workers; -1 while one of them is missing from the pool (a
    heartbeat late on a loaded machine would otherwise read as its slots taken)."""
    status, body = gateway.get("/v1/pool")
    if status != 200 or not isinstance(body, dict) or body["workers_ready"] != 2:
        return -1
    return int(body["slots_free"])


def record(gateway: Gateway, call_id: str) -> dict:
    status, body = gateway.get(f"/v1/calls/{call_id}")
    assert status == 200, body
    assert isinstance(body, dict)
    return body


def ended(gateway: Gateway, call_id: str) -> dict:
    return wait_until(
        lambda: (lambda r: r if r["state"] == "ended" else None)(record(gateway, call_id)),
        15,
        f"call {call_id} ended",
        gateway.proc,
    )


def settings(
    cluster: Cluster, number: str, name: str, seconds: float, freq: float = 440.0, **extra: tp.Any
) -> CallSettings:
    return CallSettings(
        uri=f"sip:{number}@127.0.0.1:{cluster.gateway.sip_port}",
        play=str(tone_wav(cluster.dir / f"{name}.wav", seconds, freq)),
        record=str(cluster.dir / f"{name}-heard.wav"),
        seconds=seconds,
        local_host="127.0.0.1",
        api=cluster.gateway.api,
        api_token=ADMIN_TOKEN,
        **extra,
    )


def reloads(gateway: Gateway) -> int:
    return gateway.proc.log().count("routes reloaded")


async def reload(cluster: Cluster, text: str) -> None:
    """The routes file rewritten and read again (SIGHUP)."""
    before = reloads(cluster.gateway)
    cluster.routes.write_text(text)
    cluster.gateway.proc.signal(signal.SIGHUP)
    await asyncio.to_thread(wait_until, lambda: reloads(cluster.gateway) > before, 10, "the routes reloaded")


def metric(gateway: Gateway, line_start: str) -> float | None:
    _, text = gateway.get("/metrics", token=None)
    assert isinstance(text, str)
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_two_numbers_reach_two_models_and_a_third_gets_404(cluster):
    echo = await place_call(settings(cluster, ECHO, "to-echo", 2.5, 440.0))
    demo = await place_call(settings(cluster, DEMO, "to-demo", 2.5, 440.0))
    echo_record = ended(cluster.gateway, echo["gateway_call_id"])
    demo_record = ended(cluster.gateway, demo["gateway_call_id"])
    assert (echo_record["route"], echo_record["model"], echo_record["worker_id"]) == ("echo-line", "echo", "w-echo")
    assert (demo_record["route"], demo_record["model"], demo_record["worker_id"]) == ("demo-line", "demo", "w-demo")
    assert demo_record["dialled"] == DEMO  # national form, matched against the E.164 route
    assert demo_record["sampling"] == {
        "greedy": False,
        "temp": 0.5,
        "temp_text": 0.7,
        "top_k": 10,
        "top_k_text": 25,
    }  # the route's overrides, as the worker applied them
    assert echo_record["sampling"] is None  # the echo worker samples nothing
    pcm, rate = heard(echo["recording"])
    assert abs(peak_hz(pcm[rate:], rate) - 440) < 10  # the echo worker sent our tone back
    with pytest.raises(CallFailed) as refused:
        await place_call(settings(cluster, "0399999999", "nowhere", 1.0))
    assert refused.value.status == 404
    assert metric(cluster.gateway, "moshimoshi_route_unmatched_calls_total") == 1.0


async def test_a_queued_caller_hears_ringback_as_early_media_then_the_agent_on_the_same_stream(cluster):
    """Both echo slots are busy: the caller gets a 183 with SDP at once and hears Japan's
    ringback (400 Hz) on the call's RTP stream before the 200; when a slot frees the call
    is answered and the echo comes back on the same stream (no sequence gap)."""
    busy = [asyncio.create_task(place_call(settings(cluster, ECHO, f"busy{i}", 4.0, 700.0))) for i in range(2)]
    await asyncio.to_thread(wait_until, lambda: pool_free(cluster.gateway) == 1, 10, "echo slots taken")
    queued = await place_call(settings(cluster, QUEUE, "queued", 3.0, 440.0))
    await asyncio.gather(*busy)
    assert queued["first_provisional_seconds"] < 1.0, queued  # the 183 came at once
    assert queued["answer_seconds"] > 2.5, queued  # it waited for a slot
    assert queued["early_media_seconds"] > 2.5, queued
    early, rate = heard(queued["early_media_recording"])
    ringing = early[: int(0.9 * rate)]  # the first second of the cadence is tone
    assert rms(ringing) > 1000, rms(ringing)
    assert abs(peak_hz(ringing, rate) - 400) < 20, peak_hz(ringing, rate)
    assert rms(early[int(1.2 * rate) : int(2.8 * rate)]) < 100  # then two seconds of the cadence's silence
    assert queued["arrivals"]["sequence_gaps"] == 0, queued["arrivals"]  # one stream, early media to the end
    pcm, rate = heard(queued["recording"])
    assert abs(peak_hz(pcm[rate:], rate) - 440) < 10  # then the agent (the echo), no more ringback
    call = ended(cluster.gateway, queued["gateway_call_id"])
    assert call["route"] == "queue-line" and call["model"] == "echo"


async def test_no_slot_within_the_queue_time_plays_the_routes_message_then_bye(cluster):
    holder = asyncio.create_task(place_call(settings(cluster, DEMO, "holds-demo", 5.0)))
    await asyncio.to_thread(wait_until, lambda: pool_free(cluster.gateway) == 2, 10, "the demo slot taken")
    overflow = await place_call(settings(cluster, FULL, "overflow", 6.0))
    await holder
    assert overflow["ended_by"] == "remote-bye", overflow  # the gateway hung up after the message
    assert 1.0 < overflow["answer_seconds"] < 2.5, overflow  # a queue time of 1 s, then the answer
    assert overflow["call_seconds"] < 3.0, overflow
    pcm, rate = heard(overflow["recording"])
    message = pcm[int(0.2 * rate) : int(1.3 * rate)]
    assert abs(peak_hz(message, rate) - 1000) < 10 and rms(message) > 1000
    call = ended(cluster.gateway, overflow["gateway_call_id"])
    assert call["end_reason"] == "overflow-message" and call["worker_id"] == "", call
    assert metric(cluster.gateway, 'moshimoshi_route_overflows_total{action="message",route="full-line"}') == 1.0


async def test_a_route_at_its_limit_answers_503_and_counts_it(cluster):
    first = asyncio.create_task(place_call(settings(cluster, LIMITED, "limited1", 3.0)))
    await asyncio.to_thread(
        wait_until,
        lambda: metric(cluster.gateway, 'moshimoshi_route_calls_active{route="limited-line"}') == 1.0,
        10,
        "the first call on the route",
    )
    with pytest.raises(CallFailed) as refused:
        await place_call(settings(cluster, LIMITED, "limited2", 1.0))
    assert refused.value.status == 503
    assert refused.value.response.headers.get("Retry-After") == "9"
    # refused for the route's limit, not for want of a slot
    await asyncio.to_thread(wait_until, lambda: pool_free(cluster.gateway) >= 1, 5, "a free slot")
    summary = await first
    assert summary["received_rms"] > 1000
    assert metric(cluster.gateway, 'moshimoshi_route_limited_calls_total{route="limited-line"}') == 1.0
    await asyncio.to_thread(
        wait_until,
        lambda: metric(cluster.gateway, 'moshimoshi_route_calls_active{route="limited-line"}') == 0.0,
        10,
        "the route idle",
    )


async def test_a_dtmf_key_hangs_up_and_a_route_limits_the_call_length(cluster):
    pressed = await place_call(settings(cluster, ECHO, "presses-9", 5.0, dtmf="9"))
    assert pressed["ended_by"] == "remote-bye" and pressed["call_seconds"] < 3.0, pressed
    assert ended(cluster.gateway, pressed["gateway_call_id"])["end_reason"] == "dtmf-hangup"
    short = await place_call(settings(cluster, SHORT, "short", 6.0))
    assert short["ended_by"] == "remote-bye" and 1.5 < short["call_seconds"] < 3.5, short
    assert ended(cluster.gateway, short["gateway_call_id"])["end_reason"] == "max_duration"


async def test_sighup_reloads_the_routes_and_a_call_in_progress_keeps_its_route(cluster):
    gateway = cluster.gateway
    talking = asyncio.create_task(place_call(settings(cluster, SWITCH, "during-reload", 5.0, 440.0)))
    await asyncio.to_thread(wait_until, lambda: pool_free(gateway) == 2, 10, "the call up")
    before = reloads(gateway)
    cluster.routes.write_text(
        ROUTES.replace(
            '  - name: switch-line\n    match: {number: "0377770000"}\n    model: echo',
            '  - name: switch-line\n    match: {number: "0377770000"}\n    model: demo',
        )
    )
    gateway.proc.signal(signal.SIGHUP)
    await asyncio.to_thread(wait_until, lambda: reloads(gateway) > before, 10, "the reload")
    assert "SIGHUP: reloading the routes" in gateway.proc.log()
    during = await talking
    pcm, rate = heard(during["recording"])
    assert abs(peak_hz(pcm[3 * rate :], rate) - 440) < 10  # still the echo after the reload
    assert ended(gateway, during["gateway_call_id"])["model"] == "echo"
    after = await place_call(settings(cluster, SWITCH, "after-reload", 2.0))
    assert ended(gateway, after["gateway_call_id"])["model"] == "demo"  # the next call: the new route

    # a file that does not check keeps the routes in force, and the log names the line
    broken = ROUTES.replace("max_calls: 1", "max_calls: one")
    cluster.routes.write_text(broken)
    line = broken.splitlines().index("    max_calls: one") + 1
    gateway.proc.signal(signal.SIGHUP)
    await asyncio.to_thread(wait_until, lambda: "routes not reloaded" in gateway.proc.log(), 10, "the refusal")
    assert f"{cluster.routes}:{line}: route 'limited-line': 'max_calls' must be" in gateway.proc.log()
    kept = await place_call(settings(cluster, SWITCH, "kept", 1.5))
    assert ended(gateway, kept["gateway_call_id"])["model"] == "demo"
    await reload(cluster, ROUTES)


def leases(gateway: Gateway) -> dict[str, str] | None:
    """Call id → worker, for every slot leased in the pool; None while a worker is missing
    from it (its leases are not listed then)."""
    status, pool = gateway.get("/v1/pool")
    assert status == 200 and isinstance(pool, dict), pool
    if not all(worker["alive"] for worker in pool["workers"]):
        return None
    return {
        slot["call_id"]: worker["worker_id"]
        for worker in pool["workers"]
        for slot in worker["slots"]
        if slot["state"] == "leased"
    }


async def listed_leases(gateway: Gateway, within: float) -> dict[str, str]:
    """:func:`leases` as soon as every worker is listed."""

    def listed() -> tuple[dict[str, str]] | None:
        found = leases(gateway)
        return (found,) if found is not None else None

    [found] = await asyncio.to_thread(wait_until, listed, within, "every worker in the pool", gateway.proc, 0.02)
    return found


def live_call(gateway: Gateway, route: str) -> dict | None:
    status, body = gateway.get("/v1/calls?state=active")
    assert status == 200 and isinstance(body, dict), body
    calls = [c for c in body["calls"] if c.get("route") == route]
    return calls[0] if calls else None


@requires(have_sipp(), "sipp is not installed")
async def test_dtmf_0_hands_the_call_back_to_the_pbx_by_refer_and_frees_the_slot_at_once(cluster, tmp_path):
    """sipp plays the PBX (``uac_refer_dtmf.xml``): its caller presses 0 (SIP INFO) on a
    route whose DTMF action is ``0 → transfer``; the gateway REFERs the call to the route's
    fallback, the PBX takes it (202, NOTIFY 100 then 200) and the gateway's leg ends with
    BYE. sipp holds its answer to that BYE for 1.5 s: the slot is already free in
    /v1/pool while the gateway's leg is still hanging up."""
    gateway = cluster.gateway
    log_file = tmp_path / "sipp-pbx.log"
    sipp = await Sipp(
        tmp_path,
        "-sf",
        str(SCENARIOS / "uac_refer_dtmf.xml"),
        "-s",
        PBX,
        "-trace_logs",
        "-log_file",
        str(log_file),
        f"127.0.0.1:{gateway.sip_port}",
    ).start()
    try:
        call = await asyncio.to_thread(
            wait_until, lambda: live_call(gateway, "pbx-line"), 10, "the call answered", gateway.proc
        )
        held = await listed_leases(gateway, within=5)
        assert held.get(call["id"]) == "w-echo", (call, held)

        def handed_over() -> bool:
            return [p["kind"] for p in record(gateway, call["id"])["phases"]] == ["ai", "human"]

        await asyncio.to_thread(wait_until, handed_over, 10, "the hand-over", gateway.proc, 0.02)
        after = await listed_leases(gateway, within=1)
        assert call["id"] not in after, after  # free at once, not when the leg has ended
        assert sipp.proc is not None and sipp.proc.returncode is None  # the BYE is still unanswered
        await sipp.finished(within=20)  # it got the REFER, the BYE, and answered them
    finally:
        await sipp.stop()
    assert "REFER to <sip:queue@pbx.example> by <sip:" in log_file.read_text()
    done = ended(gateway, call["id"])
    assert done["end_reason"] == "transferred", done
    [attempt] = done["transfers"]
    assert (attempt["by"], attempt["mode"], attempt["outcome"], attempt["status"], attempt["target"]) == (
        "dtmf",
        "refer",
        "transferred",
        200,
        "sip:queue@pbx.example",
    ), attempt
    ai, human = done["phases"]
    assert ai["end"] == human["start"] and (human["mode"], human["target"]) == ("refer", "sip:queue@pbx.example")
    status, transcript = gateway.get(f"/v1/calls/{call['id']}/transcript")
    assert status == 200 and isinstance(transcript, dict), transcript
    assert [(e["kind"], e["text"]) for e in transcript["events"] if e["kind"] in ("dtmf", "transfer")] == [
        ("dtmf", "*"),
        ("transfer", "transferred to sip:queue@pbx.example (refer)"),
    ]  # digits stored masked


TRANSFER_LINES = """\
  - name: dtmf-transfer-line
    match: {{number: "0312120000"}}
    model: echo
    fallback: {person}
    dtmf: {{"0": transfer}}
  - name: overflow-transfer-line
    match: {{number: "0313130000"}}
    model: demo
    queue_seconds: 1
    fallback: {person}
    overflow: transfer
"""


@requires(shutil.which("baresip") is not None, "baresip is not installed")
async def test_dtmf_0_hands_the_caller_to_the_routes_fallback(cluster, tmp_path):
    """The route's DTMF action calls the transfer's entry point: the caller presses 0 one
    second in, the person (baresip, a 1 kHz tone) answers, the AI's slot goes back."""
    person = await Person(tmp_path / "person", tone_hz=1000.0, quit_after=20).start()
    try:
        await reload(cluster, ROUTES + TRANSFER_LINES.format(person=person.uri))
        summary = await place_call(settings(cluster, "0312120000", "presses-0", 7.0, 440.0, dtmf="0"))
    finally:
        await person.stop()
        await reload(cluster, ROUTES)
    pcm, rate = heard(summary["recording"])
    assert abs(peak_hz(pcm[int(0.3 * rate) : int(0.9 * rate)], rate) - 440) < 10  # the AI (the echo) first
    assert abs(peak_hz(pcm[5 * rate :], rate) - 1000) < 10  # then the person
    call = ended(cluster.gateway, summary["gateway_call_id"])
    [attempt] = call["transfers"]
    assert (attempt["by"], attempt["outcome"], attempt["target"]) == ("dtmf", "transferred", person.uri), attempt
    assert [phase["kind"] for phase in call["phases"]] == ["ai", "human"]


@requires(shutil.which("baresip") is not None, "baresip is not installed")
async def test_no_slot_hands_the_caller_to_the_humans_by_the_routes_overflow(cluster, tmp_path):
    """The demo slot is busy and the route overflows to its fallback: the call is answered
    without an AI and bridged to the person."""
    person = await Person(tmp_path / "person", tone_hz=1000.0, quit_after=20).start()
    holder = asyncio.create_task(place_call(settings(cluster, DEMO, "holds-demo-3", 7.0)))
    try:
        await reload(cluster, ROUTES + TRANSFER_LINES.format(person=person.uri))
        await asyncio.to_thread(wait_until, lambda: pool_free(cluster.gateway) == 2, 10, "the demo slot taken")
        summary = await place_call(settings(cluster, "0313130000", "overflows", 5.0, 440.0))
        await holder
    finally:
        await person.stop()
        await reload(cluster, ROUTES)
    assert summary["answer_seconds"] > 0.9, summary  # it waited its queue time first
    pcm, rate = heard(summary["recording"])
    assert abs(peak_hz(pcm[2 * rate :], rate) - 1000) < 10  # the person
    call = ended(cluster.gateway, summary["gateway_call_id"])
    [attempt] = call["transfers"]
    assert (attempt["by"], attempt["outcome"]) == ("overflow", "transferred"), attempt
    assert call["worker_id"] == "" and [phase["kind"] for phase in call["phases"]] == ["human"], call


def test_an_invalid_routes_file_stops_the_gateway_with_one_line_naming_the_line(tmp_path):
    bad = tmp_path / "routes.yaml"
    bad.write_text('routes:\n  - name: a\n    model: echo\n    dtmf: {"0": transfer}\n')
    result = subprocess.run(
        moshimoshi_cmd("gateway", "--worker-url", "echo:", "--routes", str(bad), "--sip-port", "0", "--http-port", "0"),
        capture_output=True,
        text=True,
        timeout=60,
        env=python_env(),
    )
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"moshimoshi: configuration error: MOSHIMOSHI_ROUTES: {bad}:4: route 'a': DTMF 0 transfers, "
        "but the route has no 'fallback' target"
    ], result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def place(gateway: Gateway, body: dict) -> httpx.Response:
    return httpx.post(
        gateway.api + "/v1/calls", json=body, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10
    )


@requires(shutil.which("baresip") is not None, "baresip is not installed")
def test_an_outbound_call_to_baresip_is_answered_with_audio_both_ways_and_recorded(cluster, tmp_path):
    """baresip answers automatically (answermode=auto) and plays a tone; the echo worker
    sends it back, so baresip hears its own tone: audio went both ways. The call's record
    and its transcript are stored as for an inbound call."""
    wav = tone_wav(tmp_path / "callee.wav", 4.0, 600.0)
    port = free_port_pair()
    config = write_baresip_config(
        tmp_path / "baresip",
        port=port,
        source=wav,
        folder=tmp_path,
        account="<sip:callee@127.0.0.1>;regint=0;answermode=auto;audio_codecs=PCMU",
        rtp_ports=(31000, 31999),
    )
    baresip = subprocess.Popen(
        ["baresip", "-f", str(config), "-t", "20"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        wait_until(lambda: _listening(port), 10, "baresip listening")
        response = place(
            cluster.gateway, {"to": f"sip:callee@127.0.0.1:{port}", "from": "+81312345678", "route": "echo-line"}
        )
        assert response.status_code == 202, response.text
        call_id = response.json()["call_id"]
        assert response.json()["route"] == "echo-line"
        live = wait_until(
            lambda: (lambda r: r if r["answered_at"] else None)(record(cluster.gateway, call_id)),
            10,
            "the callee's answer",
        )
        assert live["ingress"] == "outbound" and live["model"] == "echo" and live["to_uri"].startswith("sip:callee@")
        call = ended(cluster.gateway, call_id)  # baresip hangs up when its file ends
        output, _ = baresip.communicate(timeout=30)
    finally:
        if baresip.poll() is None:
            baresip.kill()
            baresip.wait()
    assert "Call established" in output, output[-2000:]
    assert call["end_reason"] == "remote-bye" and call["duration_s"] > 3.0, call
    assert call["caller"]["number"] == "+81312345678"
    received = sorted(tmp_path.glob("dump-*-dec.wav"))
    assert received, output[-2000:]
    pcm, rate = heard(received[0], channel=0)
    assert rms(pcm[rate : 3 * rate]) > 1000 and abs(peak_hz(pcm[rate : 3 * rate], rate) - 600) < 10
    quality = call["quality"]
    assert quality["packets_received"] > 100 and quality["packets_sent"] > 100, quality
    status, transcript = cluster.gateway.get(f"/v1/calls/{call_id}/transcript")
    assert status == 200 and transcript["complete"] and transcript["end_reason"] == "remote-bye", transcript


@requires(have_sipp(), "sipp is not installed")
async def test_a_busy_callee_is_recorded_with_the_reason(cluster, tmp_path):
    sipp = await Sipp(tmp_path, "-sf", str(SCENARIOS / "uas_busy.xml")).start()
    try:
        await sipp.listening()
        response = await asyncio.to_thread(
            place, cluster.gateway, {"to": f"sip:busy@127.0.0.1:{sipp.port}", "route": "echo-line"}
        )
        assert response.status_code == 202, response.text
        call = await asyncio.to_thread(ended, cluster.gateway, response.json()["call_id"])
        await sipp.finished()
    finally:
        await sipp.stop()
    assert call["end_reason"] == "outbound-busy" and call["end_detail"] == "486 Busy Here", call
    assert call["answered_at"] is None
    await asyncio.to_thread(wait_until, lambda: pool_free(cluster.gateway) == 3, 10, "its slot released")


@requires(have_sipp(), "sipp is not installed")
async def test_an_outbound_call_hung_up_while_it_rings_is_cancelled(cluster, tmp_path):
    sipp = await Sipp(tmp_path, "-sf", str(SCENARIOS / "uas_cancel.xml")).start()
    try:
        await sipp.listening()
        response = await asyncio.to_thread(
            place, cluster.gateway, {"to": f"sip:ringing@127.0.0.1:{sipp.port}", "route": "echo-line"}
        )
        assert response.status_code == 202, response.text
        call_id = response.json()["call_id"]
        await asyncio.sleep(1.0)  # ringing
        assert record(cluster.gateway, call_id)["state"] == "ringing"
        status, _ = cluster.gateway.post(f"/v1/calls/{call_id}/hangup")
        assert status == 202
        call = await asyncio.to_thread(ended, cluster.gateway, call_id)
        await sipp.finished()  # it got the CANCEL, answered 487 and had it ACKed
    finally:
        await sipp.stop()
    assert call["end_reason"] == "api-hangup" and call["answered_at"] is None, call
    await asyncio.to_thread(wait_until, lambda: pool_free(cluster.gateway) == 3, 10, "its slot released")


async def test_an_outbound_call_without_a_free_slot_gets_503_and_sends_no_invite(cluster):
    peer = await UdpPeer.open()
    holder = asyncio.create_task(place_call(settings(cluster, DEMO, "holds-demo-2", 3.0)))
    try:
        await asyncio.to_thread(wait_until, lambda: pool_free(cluster.gateway) == 2, 10, "the demo slot taken")
        response = await asyncio.to_thread(
            place, cluster.gateway, {"to": f"sip:nobody@127.0.0.1:{peer.address[1]}", "route": "demo-line"}
        )
        assert response.status_code == 503, response.text
        assert response.headers.get("Retry-After") == "9"
        unknown = await asyncio.to_thread(place, cluster.gateway, {"to": "sip:x@127.0.0.1", "route": "nope"})
        assert unknown.status_code == 404
        number = await asyncio.to_thread(place, cluster.gateway, {"to": "+81312345678", "route": "echo-line"})
        assert number.status_code == 422 and "MOSHIMOSHI_OUTBOUND_TRUNK" in number.text
        await asyncio.sleep(0.5)
        assert peer.drain() == [], "an INVITE went out without a slot"
    finally:
        await holder
        assert peer.transport is not None
        peer.transport.close()


def _listening(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False
