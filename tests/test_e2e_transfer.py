"""Transfer to a human, end to end: a real `moshimoshi serve --model echo` (embedded Redis,
an echo worker holding real slot leases), real peers.

* sipp plays the PBX that routed a caller to us (``ops/sipp/uac_refer.xml``): it takes
  the call back by REFER (202, NOTIFY 100 then the final status), or refuses the REFER.
* baresip plays the person: it answers on its own (``answermode=auto``) and plays a
  1 kHz tone, or rings forever (``answermode=manual``).
* ``moshimoshi call`` is the caller that records what it hears: the tone, measured by its
  frequency, and how long it heard nothing at all.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from service.settings import CallSettings
from service.tools.call import place_call
from tests.support.person import Person, dominant_hz, first_heard, heard, longest_silence_ms, tone_wav
from tests.support.services import (
    ADMIN_TOKEN,
    READ_TOKEN,
    Gateway,
    start_gateway,
    start_serve,
    start_worker,
    wait_until,
)
from tests.support.sipp import SCENARIOS, Sipp, have_sipp
from tests.support.tools import requires
from tests.test_recording import decode

pytestmark = pytest.mark.system
needs_sipp = requires(have_sipp(), "sipp (sip-tester) is not installed")
needs_baresip = requires(shutil.which("baresip") is not None, "baresip is not installed")

TONE_HZ = 1000.0  # the person's voice
CALLER_HZ = 440.0  # the caller's, and the AI's (the echo worker plays it back)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """``moshimoshi serve --model echo`` (two slots) with a short transfer ring time; calls
    recorded (WAV), the part with a person too."""
    log_dir = tmp_path_factory.mktemp("transfer-serve")
    served = start_serve(
        log_dir,
        "echo",
        "--transfer-ring-seconds",
        "4",
        "--slots",
        "2",
        "--recording",
        "wav",
        "--recording-dir",
        str(log_dir / "recordings"),
    )
    try:
        served.wait_ready()
        yield served
    finally:
        code = served.proc.stop()
        assert code in (0, -2, 130), f"serve exited {code}:\n{served.proc.log()[-3000:]}"


def post_json(
    gateway: Gateway, path: str, body: dict, token: str | None = ADMIN_TOKEN, timeout: float = 30.0
) -> tuple[int, dict]:
    request = urllib.request.Request(
        gateway.api + path, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def transfer(gateway: Gateway, call_id: str, target: str, mode: str = "auto", **kwargs) -> tuple[int, dict]:
    return post_json(gateway, f"/v1/calls/{call_id}/transfer", {"target": target, "mode": mode}, **kwargs)


def active_call(gateway: Gateway, since: float) -> dict:
    def found() -> dict | None:
        status, body = gateway.get("/v1/calls?state=active")
        assert status == 200, body
        calls = [c for c in body["calls"] if c["started_at"] >= since and c["state"] == "active"]
        return calls[0] if calls else None

    return wait_until(found, 15, "the call answered", gateway.proc)


def ended_call(gateway: Gateway, call_id: str) -> dict:
    def ended() -> dict | None:
        status, body = gateway.get(f"/v1/calls/{call_id}")
        return body if status == 200 and body["state"] == "ended" else None

    return wait_until(ended, 15, f"call {call_id} ended", gateway.proc)


def stored_recording(gateway: Gateway, call_id: str, folder: Path) -> tuple[np.ndarray, int]:
    """The call's recording once stored (int16 scale, stereo: the caller left, what the
    caller heard right) and its rate."""

    def stored() -> bool:
        status, body = gateway.get(f"/v1/calls/{call_id}")
        return status == 200 and (body.get("recording") or {}).get("state") == "stored"

    wait_until(stored, 30, f"call {call_id}'s recording stored", gateway.proc)
    request = urllib.request.Request(
        f"{gateway.api}/v1/calls/{call_id}/recording", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        (folder / "recording.wav").write_bytes(response.read())
    frames, rate = decode(folder / "recording.wav")
    return frames * 32768, rate


def leases(gateway: Gateway) -> dict[str, int]:
    """Call id → slot, for every slot leased in the pool."""
    status, pool = gateway.get("/v1/pool")
    assert status == 200, pool
    return {
        slot["call_id"]: slot["slot"]
        for worker in pool["workers"]
        for slot in worker["slots"]
        if slot["state"] == "leased"
    }


def transcript_kinds(gateway: Gateway, call_id: str) -> list[dict]:
    status, body = gateway.get(f"/v1/calls/{call_id}/transcript")
    assert status == 200, body
    return [e for e in body["events"] if e["kind"] == "transfer"]


# -- REFER: sipp plays the PBX -------------------------------------------------------------


def refer_sipp(tmp_path: Path, gateway: Gateway, final: str) -> Sipp:
    return Sipp(
        tmp_path,
        "-sf",
        str(SCENARIOS / "uac_refer.xml"),
        "-s",
        "agent",
        "-key",
        "notify_final",
        final,
        "-trace_logs",
        "-log_file",
        str(tmp_path / "sipp-refer.log"),
        f"127.0.0.1:{gateway.sip_port}",
    )


@needs_sipp
async def test_a_pbx_that_takes_the_refer_gets_the_call_and_the_slot_is_free_at_once(gateway, tmp_path):
    began = time.time()
    sipp = await refer_sipp(tmp_path, gateway, "200 OK").start()
    try:
        call = await asyncio.to_thread(active_call, gateway, began)
        assert call["id"] in leases(gateway)
        status, outcome = await asyncio.to_thread(transfer, gateway, call["id"], "sip:queue@pbx.example")
        assert status == 200, outcome
        assert (outcome["outcome"], outcome["mode"], outcome["status"]) == ("transferred", "refer", 200)
        assert outcome["target"] == "sip:queue@pbx.example" and outcome["on_this_gateway"]
        assert call["id"] not in leases(gateway)  # released before the API answered
        await sipp.finished(within=20)  # it got the gateway's BYE (and answered it)
    finally:
        await sipp.stop()
    log = (tmp_path / "sipp-refer.log").read_text()
    assert "REFER to <sip:queue@pbx.example> by <sip:agent@127.0.0.1" in log, log
    record = await asyncio.to_thread(ended_call, gateway, call["id"])
    assert record["end_reason"] == "transferred"
    ai, human = record["phases"]
    assert ai["kind"] == "ai" and ai["worker"] == call["worker_id"] and ai["end"] is not None
    assert (human["kind"], human["mode"], human["target"], human["end"]) == (
        "human",
        "refer",
        "sip:queue@pbx.example",
        None,
    )
    assert ai["end"] == human["start"]
    [attempt] = record["transfers"]
    assert (attempt["outcome"], attempt["mode"], attempt["status"], attempt["by"]) == (
        "transferred",
        "refer",
        200,
        "api",
    )
    notes = await asyncio.to_thread(transcript_kinds, gateway, call["id"])
    assert [n["text"] for n in notes] == ["transferred to sip:queue@pbx.example (refer)"]


@needs_sipp
async def test_a_refer_whose_transfer_fails_leaves_the_caller_with_the_ai(gateway, tmp_path):
    began = time.time()
    sipp = await refer_sipp(tmp_path, gateway, "486 Busy Here").start()
    try:
        call = await asyncio.to_thread(active_call, gateway, began)
        status, outcome = await asyncio.to_thread(transfer, gateway, call["id"], "tel:+81-3-1234-5678", "refer")
        assert status == 502, outcome
        assert (outcome["outcome"], outcome["mode"], outcome["status"]) == ("failed", "refer", 486)
        assert outcome["reason"] == "Busy Here" and outcome["detail"] == "Busy Here"
        assert outcome["target"] == "tel:+81312345678"
        assert call["id"] in leases(gateway)  # still with the AI
        status, live = gateway.get(f"/v1/calls/{call['id']}")
        assert live["state"] == "active" and [p["kind"] for p in live["phases"]] == ["ai"]
        await sipp.finished(within=20)  # it hung up itself: the gateway kept the call
    finally:
        await sipp.stop()
    record = await asyncio.to_thread(ended_call, gateway, call["id"])
    assert record["end_reason"] == "remote-bye"
    assert [(t["outcome"], t["status"], t["reason"]) for t in record["transfers"]] == [("failed", 486, "Busy Here")]
    notes = await asyncio.to_thread(transcript_kinds, gateway, call["id"])
    assert [n["text"] for n in notes] == ["transfer to tel:+81312345678 failed (refer): 486 Busy Here"]


async def test_transfers_that_cannot_be_tried_are_refused_and_leave_nothing(gateway):
    status, body = transfer(gateway, "c-0123456789abcdef", "sip:queue@pbx.example")
    assert status == 404, body
    status, body = transfer(gateway, "c-0123456789abcdef", "sip:queue@pbx.example", token=READ_TOKEN)
    assert status == 403, body
    for target in ("queue@pbx", "http://example.com/", "sip:a@b?X-Evil=1", "tel:12ab", "x" * 300):
        status, body = transfer(gateway, "c-0123456789abcdef", target)
        assert status == 422, (target, body)
    status, body = transfer(gateway, "c-0123456789abcdef", "sip:queue@pbx.example", mode="warm")
    assert status == 422, body


# -- bridged: the gateway calls the person (baresip) and relays the audio -----------------


def caller_settings(gateway: Gateway, folder: Path, seconds: float, codec: str = "PCMU") -> CallSettings:
    """``moshimoshi call`` playing a steady 440 Hz tone (the echo worker plays it back: that
    is the AI's voice here) and recording what it hears."""
    wav = tone_wav(folder / "caller.wav", CALLER_HZ, seconds + 1)
    return CallSettings(
        uri=gateway.uri,
        play=str(wav),
        record=str(folder / "caller.wav.out.wav"),
        seconds=seconds,
        local_host="127.0.0.1",
        codec=codec,
    )


@needs_baresip
@pytest.mark.parametrize("codec, relay", [("PCMU", "packet by packet"), ("G722", "in 80 ms frames")])
async def test_the_caller_hears_the_person_and_gets_a_bye_when_the_person_hangs_up(gateway, tmp_path, codec, relay):
    """PCMU: the person (baresip: G.711 only) takes the caller's codec and the legs are relayed
    packet by packet; G.722 (16 kHz) against G.711: through the pipeline's 24 kHz frames."""
    person = await Person(tmp_path / "person", tone_hz=TONE_HZ, quit_after=9).start()
    try:
        began = time.time()
        calling = asyncio.create_task(place_call(caller_settings(gateway, tmp_path, seconds=20, codec=codec)))
        call = await asyncio.to_thread(active_call, gateway, began)
        await asyncio.sleep(1.5)
        asked = time.time()
        status, outcome = await asyncio.to_thread(transfer, gateway, call["id"], person.uri)
        assert status == 200, (outcome, person.output())
        # our caller's Allow has no REFER: auto goes straight to the bridge
        assert (outcome["outcome"], outcome["mode"], outcome["status"]) == ("transferred", "bridge", 200)
        assert call["id"] not in leases(gateway)  # the slot went back when the person answered
        summary = await asyncio.wait_for(calling, 30)
    finally:
        await person.stop()
    assert summary["ended_by"] == "remote-bye", summary  # the person hung up: the caller got a BYE
    rate = summary["sample_rate"]
    assert summary["codec"] == codec and rate == (16000 if codec == "G722" else 8000)
    pcm = heard(summary["recording"])
    offset = asked - summary["recording_started_at"]
    assert dominant_hz(pcm[int(0.5 * rate) : int((offset - 0.2) * rate)], rate) == pytest.approx(CALLER_HZ, abs=10)
    through = first_heard(pcm, TONE_HZ, after_s=offset, rate=rate)
    assert through is not None, "the person's tone never reached the caller"
    assert dominant_hz(pcm[int((through + 0.2) * rate) : -int(0.5 * rate)], rate) == pytest.approx(TONE_HZ, abs=10)
    assert f"{call['id']}: the caller and the person are relayed {relay}" in gateway.proc.log()
    record = await asyncio.to_thread(ended_call, gateway, call["id"])
    assert record["end_reason"] == "human-bye"
    ai, human = record["phases"]
    assert (ai["kind"], human["kind"], human["mode"], human["target"]) == ("ai", "human", "bridge", person.uri)
    assert ai["end"] == human["start"] and human["end"] is not None and human["end"] >= human["start"]
    assert human["quality"]["packets_received"] > 100 and human["quality"]["codec"] in ("PCMU", "PCMA")
    [attempt] = record["transfers"]
    assert (attempt["outcome"], attempt["mode"]) == ("transferred", "bridge")
    # the recording holds the whole call, the part with the person in the same file
    frames, rate = await asyncio.to_thread(stored_recording, gateway, call["id"], tmp_path)
    assert abs(len(frames) / rate - record["duration_s"]) < 0.1
    handover = human["start"] - record["answered_at"]
    left, right = frames[:, 0], frames[:, 1]
    with_ai = slice(int(0.5 * rate), int((handover - 0.2) * rate))
    assert dominant_hz(left[with_ai], rate) == pytest.approx(CALLER_HZ, abs=10)
    assert dominant_hz(right[with_ai], rate) == pytest.approx(CALLER_HZ, abs=10)  # the echo "AI"
    person_from = first_heard(right, TONE_HZ, after_s=handover, rate=rate)
    assert person_from is not None and person_from - handover < 1.0, "the person is not in the recording"
    assert dominant_hz(right[int((person_from + 0.2) * rate) : -int(0.5 * rate)], rate) == pytest.approx(
        TONE_HZ, abs=10
    )
    assert dominant_hz(left[int(handover * rate) : -int(0.5 * rate)], rate) == pytest.approx(CALLER_HZ, abs=10)


@needs_baresip
async def test_a_route_that_keeps_the_person_out_of_the_recording_gets_silence_from_the_hand_over(tmp_path):
    served = start_serve(
        tmp_path,
        "echo",
        "--recording",
        "wav",
        "--recording-dir",
        str(tmp_path / "recordings"),
        "--no-recording-transfer",
        name="serve-no-transfer-recording",
    )
    person = None
    try:
        await asyncio.to_thread(served.wait_ready)
        person = await Person(tmp_path / "person", tone_hz=TONE_HZ, quit_after=6).start()
        began = time.time()
        calling = asyncio.create_task(place_call(caller_settings(served, tmp_path, seconds=15)))
        call = await asyncio.to_thread(active_call, served, began)
        await asyncio.sleep(1.5)
        status, outcome = await asyncio.to_thread(transfer, served, call["id"], person.uri, "bridge")
        assert status == 200, (outcome, person.output())
        await asyncio.wait_for(calling, 30)
        record = await asyncio.to_thread(ended_call, served, call["id"])
        frames, rate = await asyncio.to_thread(stored_recording, served, call["id"], tmp_path)
        status, transcript = served.get(f"/v1/calls/{call['id']}/transcript")
    finally:
        if person is not None:
            await person.stop()
        served.proc.stop()
    human = record["phases"][1]
    handover = human["start"] - record["answered_at"]
    [pause] = record["recording"]["pauses"]
    assert abs(pause["start"] - handover) < 0.1 and pause["end"] == record["duration_s"]
    assert abs(len(frames) / rate - record["duration_s"]) < 0.1
    assert dominant_hz(frames[int(0.5 * rate) : int((handover - 0.2) * rate), 1], rate) == pytest.approx(
        CALLER_HZ, abs=10
    )
    assert not frames[round(pause["start"] * rate) :].any()  # neither side once the person has the call
    notes = [e["text"] for e in transcript["events"] if e["kind"] == "note"]
    assert "recording stopped: the part with a person is not recorded" in notes


@needs_baresip
async def test_the_caller_hanging_up_hangs_up_the_person(gateway, tmp_path):
    person = await Person(tmp_path / "person", tone_hz=TONE_HZ, quit_after=30).start()
    try:
        began = time.time()
        calling = asyncio.create_task(place_call(caller_settings(gateway, tmp_path, seconds=5)))
        call = await asyncio.to_thread(active_call, gateway, began)
        status, outcome = await asyncio.to_thread(transfer, gateway, call["id"], person.uri, "bridge")
        assert status == 200, outcome
        summary = await asyncio.wait_for(calling, 30)
        assert summary["ended_by"] == "local-bye"
        record = await asyncio.to_thread(ended_call, gateway, call["id"])
        assert record["end_reason"] == "remote-bye"
        wait_until(lambda: "terminated" in person.output(), 10, "baresip's call ended by the gateway's BYE")
    finally:
        await person.stop()


@needs_sipp
@needs_baresip
@pytest.mark.parametrize("refusal", ["603", "405"])
async def test_a_trunk_that_refuses_the_refer_is_bridged(gateway, tmp_path, refusal):
    person = await Person(tmp_path / "person", tone_hz=TONE_HZ, quit_after=5).start()
    sipp = await Sipp(
        tmp_path,
        "-sf",
        str(SCENARIOS / "uac_refer_refused.xml"),
        "-s",
        "agent",
        "-set",
        "refusal",
        refusal,
        f"127.0.0.1:{gateway.sip_port}",
    ).start()
    try:
        began = time.time()
        call = await asyncio.to_thread(active_call, gateway, began)
        status, outcome = await asyncio.to_thread(transfer, gateway, call["id"], person.uri)
        assert status == 200, (outcome, person.output())
        assert (outcome["outcome"], outcome["mode"]) == ("transferred", "bridge")
        assert call["id"] not in leases(gateway)
        await sipp.finished(within=30)  # the person hung up: the trunk got the gateway's BYE
    finally:
        await sipp.stop()
        await person.stop()
    record = await asyncio.to_thread(ended_call, gateway, call["id"])
    assert record["end_reason"] == "human-bye"
    [attempt] = record["transfers"]
    assert (attempt["outcome"], attempt["mode"], attempt["status"]) == ("transferred", "bridge", 200)
    expected = "603 Decline" if refusal == "603" else "405 Method Not Allowed"
    assert attempt["reason"] == f"answered (the REFER was refused ({expected}))"


@needs_baresip
async def test_nobody_answering_leaves_the_caller_with_the_ai_without_dead_air(gateway, tmp_path):
    person = await Person(tmp_path / "person", answer=False, quit_after=30).start()
    try:
        began = time.time()
        calling = asyncio.create_task(place_call(caller_settings(gateway, tmp_path, seconds=9)))
        call = await asyncio.to_thread(active_call, gateway, began)
        await asyncio.sleep(1.0)
        asked = time.time()
        status, outcome = await asyncio.to_thread(transfer, gateway, call["id"], person.uri)
        assert status == 502, outcome
        assert (outcome["outcome"], outcome["mode"], outcome["status"]) == ("failed", "bridge", 408)
        assert outcome["reason"] == "no answer within 4 s" and 3.5 < outcome["seconds"] < 8
        assert call["id"] in leases(gateway)  # still with the AI
        summary = await asyncio.wait_for(calling, 30)
    finally:
        await person.stop()
    assert summary["ended_by"] == "local-bye"
    pcm = heard(summary["recording"])
    offset = asked - summary["recording_started_at"]
    # the AI (the echo) went on all along: through the ringing and after it
    assert longest_silence_ms(pcm, 0.5, len(pcm) / 8000 - 0.3) < 300
    assert dominant_hz(pcm[int((offset + 4.5) * 8000) : int((offset + 6) * 8000)]) == pytest.approx(CALLER_HZ, abs=10)
    assert "session closed" in person.output(), person.output()  # the ringing call was cancelled
    record = await asyncio.to_thread(ended_call, gateway, call["id"])
    assert [p["kind"] for p in record["phases"]] == ["ai"]
    assert [(t["outcome"], t["status"]) for t in record["transfers"]] == [("failed", 408)]


# -- across replicas -------------------------------------------------------------------------


@needs_sipp
async def test_any_replica_transfers_a_call_of_another_and_answers_its_outcome(redis_server, tmp_path):
    """Two gateways on one Redis and one echo worker: the call is on A, the request on B."""
    worker = start_worker(tmp_path, redis_server.url, "w-transfer", slots=2)
    a = start_gateway(tmp_path, redis_server.url, name="gateway-a")
    b = start_gateway(tmp_path, redis_server.url, name="gateway-b")
    sipp = None
    try:
        for process in (worker, a, b):
            process.wait_ready()
        began = time.time()
        sipp = await refer_sipp(tmp_path, a, "200 OK").start()
        call = await asyncio.to_thread(active_call, a, began)
        status, outcome = await asyncio.to_thread(transfer, b, call["id"], "sip:queue@pbx.example")
        assert status == 200, outcome
        assert (outcome["outcome"], outcome["mode"], outcome["on_this_gateway"]) == ("transferred", "refer", False)
        assert call["id"] not in leases(b)
        await sipp.finished(within=20)
        record = await asyncio.to_thread(ended_call, b, call["id"])
        assert (record["end_reason"], record["gateway_id"]) == ("transferred", call["gateway_id"])
        status, body = await asyncio.to_thread(transfer, b, call["id"], "sip:queue@pbx.example")
        assert status == 409, body  # ended
    finally:
        if sipp is not None:
            await sipp.stop()
        for process in (b, a):
            process.proc.stop()
        worker.proc.stop()
