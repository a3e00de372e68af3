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
import subprocess
import time
import urllib.error
import urllib.request
import wave
from pathlib import Path

import numpy as np
import pytest

from service.settings import CallSettings
from service.tools.call import place_call
from tests.support.procs import free_port_pair
from tests.support.services import ADMIN_TOKEN, READ_TOKEN, Gateway, start_serve, wait_until
from tests.support.sipp import SCENARIOS, Sipp, have_sipp
from tests.support.tools import requires

pytestmark = pytest.mark.system
needs_sipp = requires(have_sipp(), "sipp (sip-tester) is not installed")
needs_baresip = requires(shutil.which("baresip") is not None, "baresip is not installed")

TONE_HZ = 1000.0
BARESIP_RTP_PORTS = (36000, 36999)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """``moshimoshi serve --model echo`` (two slots) with a short transfer ring time."""
    log_dir = tmp_path_factory.mktemp("transfer-serve")
    served = start_serve(log_dir, "echo", "--transfer-ring-seconds", "4", "--slots", "2")
    try:
        served.wait_ready()
        yield served
    finally:
        code = served.proc.stop()
        assert code in (0, -2, 130), f"serve exited {code}:\n{served.proc.log()[-3000:]}"


def post_json(gateway: Gateway, path: str, body: dict, token: str | None = ADMIN_TOKEN,
              timeout: float = 30.0) -> tuple[int, dict]:
    request = urllib.request.Request(gateway.api + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
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


def leases(gateway: Gateway) -> dict[str, int]:
    """Call id → slot, for every slot leased in the pool."""
    status, pool = gateway.get("/v1/pool")
    assert status == 200, pool
    return {slot["call_id"]: slot["slot"] for worker in pool["workers"] for slot in worker["slots"]
            if slot["state"] == "leased"}


def transcript_kinds(gateway: Gateway, call_id: str) -> list[dict]:
    status, body = gateway.get(f"/v1/calls/{call_id}/transcript")
    assert status == 200, body
    return [e for e in body["events"] if e["kind"] == "transfer"]


# -- REFER: sipp plays the PBX -------------------------------------------------------------

def refer_sipp(tmp_path: Path, gateway: Gateway, final: str) -> Sipp:
    return Sipp(tmp_path, "-sf", str(SCENARIOS / "uac_refer.xml"), "-s", "agent", "-key", "notify_final", final,
                "-trace_logs", "-log_file", str(tmp_path / "sipp-refer.log"), f"127.0.0.1:{gateway.sip_port}")


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
    assert (human["kind"], human["mode"], human["target"], human["end"]) == ("human", "refer",
                                                                            "sip:queue@pbx.example", None)
    assert ai["end"] == human["start"]
    [attempt] = record["transfers"]
    assert (attempt["outcome"], attempt["mode"], attempt["status"], attempt["by"]) == ("transferred", "refer",
                                                                                      200, "api")
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
