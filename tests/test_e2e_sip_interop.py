"""What real PBXs and carriers send, against `moshimoshi serve --model echo --slots 1`.

sipp plays each trunk's habit with a hand-written scenario from ops/sipp: a delayed offer
(INVITE without SDP, answer in the ACK), ``Require: 100rel`` with PRACK, DTMF in SIP INFO,
caller identity headers behind a proxy, a caller hanging up while queued for the one slot,
and SDP whose ``c=`` names no address RTP can go to. Each is checked through the API the
operator uses. The gateway runs on each event loop the service supports.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from service.gateway.banner import outbound_address
from service.realtime import EVENT_LOOPS
from service.settings import CallSettings
from service.tools.call import place_call
from sip.uri import format_host
from tests.support.procs import free_port, has_ipv6, moshimoshi_cmd, python_env
from tests.support.services import READ_TOKEN, Process, start_serve, wait_until
from tests.support.sipp import SCENARIOS, Sipp, have_sipp, media_port
from tests.support.tools import requires

SIPP_AUDIO = Path("/usr/share/sip-tester/g711a.pcap")
QUEUE_SECONDS = 8

pytestmark = [
    pytest.mark.system,
    requires(have_sipp(), "sipp (sip-tester) is not installed"),
    requires(SIPP_AUDIO.exists(), "sip-tester's pcaps are not installed"),
]


@pytest.fixture(scope="module", params=EVENT_LOOPS)
def gateway(request, tmp_path_factory):
    """One worker slot, calls wait up to QUEUE_SECONDS for it."""
    log_dir = tmp_path_factory.mktemp("interop-serve")
    gateway = start_serve(
        log_dir,
        "echo",
        "--slots",
        "1",
        "--queue-seconds",
        str(QUEUE_SECONDS),
        env={"MOSHIMOSHI_EVENT_LOOP": request.param, "MOSHIMOSHI_DTMF_CLEAR": "true"},
    )  # the digits decoded are checked
    try:
        gateway.wait_ready()
        yield gateway
    finally:
        code = gateway.proc.stop()
        assert code in (0, -2, 130), f"serve exited {code}:\n{gateway.proc.log()[-3000:]}"


def call_ids(gateway) -> set[str]:
    status, body = gateway.get("/v1/calls?limit=200")
    assert status == 200, body
    return {c["id"] for c in body["calls"]}


def new_ended_call(gateway, before: set[str], within: float = 15.0) -> dict:
    def ended() -> list[dict]:
        status, body = gateway.get("/v1/calls?state=ended&limit=50")
        assert status == 200, body
        return [c for c in body["calls"] if c["id"] not in before]

    [call] = wait_until(ended, within, "the call's record")
    status, detail = gateway.get(f"/v1/calls/{call['id']}")
    assert status == 200, detail
    return detail


def metric(gateway, line_start: str) -> float:
    import urllib.request

    with urllib.request.urlopen(gateway.api + "/metrics", timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    return 0.0


async def run_sipp(tmp_path: Path, gateway, scenario: str, *args: str, transport: str = "u1") -> None:
    sipp = Sipp(
        tmp_path,
        "-sf",
        str(SCENARIOS / scenario),
        *args,
        f"127.0.0.1:{gateway.sip_port}",
        "-mp",
        str(media_port()),
        transport=transport,
    )
    await sipp.start()
    try:
        await sipp.finished(within=45)
    finally:
        await sipp.stop()


def assert_echoed(call: dict) -> None:
    quality = call["quality"]
    assert quality["packets_received"] > 30, quality  # sipp's A-law speech came in...
    assert quality["model_packets"] > 30, quality  # ...and went back out as the worker's audio


# -- delayed offer ----------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["u1", "t1"])
async def test_a_delayed_offer_gets_our_offer_in_the_200_and_the_answer_in_the_ack_starts_the_echo(
    gateway, tmp_path, transport
):
    before = call_ids(gateway)
    await run_sipp(tmp_path, gateway, "uac_delayed_offer.xml", transport=transport)
    call = new_ended_call(gateway, before)
    assert call["end_reason"] == "remote-bye", call
    assert call["codec"] == "PCMA"  # what the ACK's answer chose from our offer
    assert_echoed(call)


@pytest.mark.parametrize(
    "keys, reason, detail",
    [
        (None, "ack-without-answer", "no SDP answer"),
        (("18", "G729", "127.0.0.1"), "unacceptable-answer", "not offered"),
        (("8", "PCMA", "224.0.1.9"), "unacceptable-answer", "multicast"),
        (("8", "PCMA", "localhost"), "unacceptable-answer", "not an IP address"),
    ],
)
async def test_a_delayed_offer_whose_ack_brings_no_usable_answer_is_hung_up_with_the_reason(
    gateway, tmp_path, keys, reason, detail
):
    before = call_ids(gateway)
    if keys is None:
        await run_sipp(tmp_path, gateway, "uac_delayed_offer_no_answer.xml")
    else:
        pt, codec, ip = keys
        await run_sipp(
            tmp_path,
            gateway,
            "uac_delayed_offer_bad_answer.xml",
            "-key",
            "answer_pt",
            pt,
            "-key",
            "answer_codec",
            codec,
            "-key",
            "answer_ip",
            ip,
        )
    call = new_ended_call(gateway, before)
    assert call["end_reason"] == reason, call
    assert detail in call["end_detail"], call
    assert call["quality"] is None or not call["quality"].get("packets_sent"), call  # no media ever started


# -- reliable provisional responses (RFC 3262) -------------------------------------------


@pytest.mark.parametrize("transport", ["u1", "t1"])
async def test_a_caller_requiring_100rel_gets_a_reliable_183_prack_and_the_echo(gateway, tmp_path, transport):
    before = call_ids(gateway)
    await run_sipp(tmp_path, gateway, "uac_100rel.xml", transport=transport)
    call = new_ended_call(gateway, before)
    assert call["end_reason"] == "remote-bye", call
    assert call["codec"] == "PCMA"
    assert_echoed(call)


# -- DTMF in SIP INFO -------------------------------------------------------------------


async def test_info_dtmf_digits_are_reported_like_rfc4733_ones_and_bad_bodies_refused(gateway, tmp_path):
    before = call_ids(gateway)
    bad = metric(gateway, 'moshimoshi_sip_info_requests_total{outcome="bad-body"}')
    unsupported = metric(gateway, 'moshimoshi_sip_info_requests_total{outcome="unsupported-type"}')
    digits = metric(gateway, "moshimoshi_dtmf_digits_total")
    await run_sipp(tmp_path, gateway, "uac_info_dtmf.xml")  # sipp checks 200, 200, 400, 415
    call = new_ended_call(gateway, before)
    assert call["end_reason"] == "remote-bye", call
    status, transcript = gateway.get(f"/v1/calls/{call['id']}/transcript", token=READ_TOKEN)
    assert status == 200, transcript
    dtmf = [e for e in transcript["events"] if e["kind"] == "dtmf"]
    assert [e["text"] for e in dtmf] == ["5", "#"], transcript
    assert dtmf[0]["duration_ms"] == 160 and dtmf[1].get("duration_ms") is None  # application/dtmf has none
    assert metric(gateway, "moshimoshi_dtmf_digits_total") == digits + 2
    assert metric(gateway, 'moshimoshi_sip_info_requests_total{outcome="bad-body"}') == bad + 1
    assert metric(gateway, 'moshimoshi_sip_info_requests_total{outcome="unsupported-type"}') == unsupported + 1


# -- caller identity and the dialled number ---------------------------------------------


@pytest.mark.parametrize("privacy", ["none", "id"])
async def test_caller_identity_and_dialled_number_are_kept_and_privacy_honoured(gateway, tmp_path, privacy):
    before = call_ids(gateway)
    await run_sipp(tmp_path, gateway, "uac_identity.xml", "-key", "dialled", "0501234567", "-key", "privacy", privacy)
    call = new_ended_call(gateway, before)
    assert call["end_reason"] == "remote-bye", call
    assert call["dialled"] == "0501234567"  # the Request-URI's user part...
    assert call["to_uri"].startswith("sip:service@")  # ...not To's
    caller = call["caller"]
    assert caller["source"] == "p-asserted-identity" and caller["privacy"] == [privacy]
    for token in (None, READ_TOKEN):  # admin and read tokens see the same
        status, seen = gateway.get(f"/v1/calls/{call['id']}", **({} if token is None else {"token": token}))
        assert status == 200 and seen["caller"] == caller
    if privacy == "none":
        assert caller["number"] == "+81312345678" and caller["name"] == "Yamada Taro"
        assert not caller["withheld"]
        assert [(r["header"], r["number"]) for r in call["redirects"]] == [
            ("diversion", "0312340000"),
            ("history-info", "0312340000"),
            ("history-info", "0501234567"),
        ]
        assert call["redirects"][0]["reason"] == "unconditional"
    else:
        assert caller["withheld"] and caller["number"] is None and caller["name"] is None
        assert caller["uri"] is None and "81312345678" not in str(call)
        assert call["from_uri"] == "sip:anonymous@anonymous.invalid"


# -- CANCEL while queued for a slot -------------------------------------------------------


async def test_a_call_cancelled_while_queued_leaves_the_queue_at_once_and_never_takes_the_slot(gateway, tmp_path):
    holder = asyncio.create_task(
        place_call(
            CallSettings(uri=gateway.uri, seconds=6.0, local_host="127.0.0.1", record=str(tmp_path / "holder.wav"))
        )
    )
    try:

        def slot_taken() -> bool:
            status, pool = gateway.get("/v1/pool")
            return status == 200 and pool["slots_busy"] == 1

        await asyncio.to_thread(wait_until, slot_taken, 10, "the first call holding the one slot")
        before = call_ids(gateway)
        abandoned = metric(gateway, "moshimoshi_pool_abandoned_calls_total")
        started = time.monotonic()
        # INVITE -> 180 (queued) -> CANCEL -> 200 -> 487 -> ACK
        await run_sipp(tmp_path, gateway, "uac_cancel.xml")
        call = await asyncio.to_thread(new_ended_call, gateway, before, 5.0)
        assert call["end_reason"] == "cancelled", call
        assert time.monotonic() - started < QUEUE_SECONDS - 2  # it did not wait out the queue time
        assert call["worker_id"] == "" and call["slot"] is None and call["answered_at"] is None
        assert metric(gateway, "moshimoshi_pool_abandoned_calls_total") == abandoned + 1
        summary = await holder
        assert summary["ended_by"] == "local-bye"
    finally:
        if not holder.done():
            holder.cancel()
    # the slot that freed went to nobody: the cancelled call is not holding it
    status, pool = gateway.get("/v1/pool")
    assert status == 200 and pool["slots_busy"] == 0, pool
    status, again = gateway.get(f"/v1/calls/{call['id']}")
    assert again["state"] == "ended" and again["worker_id"] == "", again


# -- c= that names no address RTP can go to (488) and hold (200) ---------------------------


def invite(port: int, local_port: int, connection: str, call_id: str) -> bytes:
    sdp = (
        f"v=0\r\no=peer 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc={connection}\r\nt=0 0\r\n"
        f"m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
    )
    return (
        f"INVITE sip:agent@127.0.0.1:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{local_port};branch=z9hG4bK{uuid.uuid4().hex};rport\r\n"
        f"Max-Forwards: 70\r\nFrom: <sip:peer@127.0.0.1>;tag=p1\r\nTo: <sip:agent@127.0.0.1>\r\n"
        f"Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\nContact: <sip:peer@127.0.0.1:{local_port}>\r\n"
        f"Content-Type: application/sdp\r\nContent-Length: {len(sdp)}\r\n\r\n{sdp}"
    ).encode()


def final_status(sock: socket.socket, method: str = "INVITE") -> tuple[int, str, str]:
    """(status, reason, To tag) of the first final response to ``method`` on ``sock``."""
    while True:
        head = sock.recv(65536).decode().split("\r\n")
        status = int(head[0].split()[1])
        cseq = next(line for line in head if line.lower().startswith("cseq:"))
        if status >= 200 and cseq.split()[-1] == method:
            to = next(line for line in head if line.lower().startswith("to:"))
            return status, head[0].split(" ", 2)[2], to.split("tag=")[-1]


@pytest.mark.parametrize(
    "connection, problem",
    [
        ("IN IP6 2001:db8::7", "IPv6"),
        ("IN IP4 localhost", "not an IP address"),
        ("IN IP4 224.0.1.9/127", "multicast"),
        ("IN IP4 255.255.255.255", "broadcast"),
    ],
)
def test_sdp_naming_no_reachable_rtp_address_gets_488_with_the_reason(gateway, connection, problem):
    before = call_ids(gateway)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5)
        sock.sendto(
            invite(gateway.sip_port, sock.getsockname()[1], connection, uuid.uuid4().hex),
            ("127.0.0.1", gateway.sip_port),
        )
        status, reason, _ = final_status(sock)
    assert status == 488 and problem in reason, reason
    call = new_ended_call(gateway, before)
    assert call["end_reason"] == "rejected-sdp", call
    status, pool = gateway.get("/v1/pool")
    assert pool["slots_busy"] == 0  # nothing was claimed for it


def test_an_offer_on_hold_with_an_unspecified_address_is_still_answered(gateway):
    """RFC 2543 hold (c=0.0.0.0) is not an unusable address: the call is answered."""
    call_id = uuid.uuid4().hex
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5)
        local = sock.getsockname()[1]
        sock.sendto(invite(gateway.sip_port, local, "IN IP4 0.0.0.0", call_id), ("127.0.0.1", gateway.sip_port))
        status, _, tag = final_status(sock)
        assert status == 200
        common = (
            f"Max-Forwards: 70\r\nFrom: <sip:peer@127.0.0.1>;tag=p1\r\nTo: <sip:agent@127.0.0.1>;tag={tag}\r\n"
            f"Call-ID: {call_id}\r\nContent-Length: 0\r\n\r\n"
        )
        for method, cseq in (("ACK", 1), ("BYE", 2)):
            sock.sendto(
                (
                    f"{method} sip:agent@127.0.0.1:{gateway.sip_port} SIP/2.0\r\n"
                    f"Via: SIP/2.0/UDP 127.0.0.1:{local};branch=z9hG4bK{uuid.uuid4().hex};rport\r\n"
                    f"CSeq: {cseq} {method}\r\n" + common
                ).encode(),
                ("127.0.0.1", gateway.sip_port),
            )
        assert final_status(sock, "BYE")[0] == 200


# -- moshimoshi call: an IPv6 target, and its RTP port range ----------------------------


@pytest.mark.skipif(not has_ipv6(), reason="no IPv6 loopback on this machine")
def test_moshimoshi_call_reaches_an_ipv6_gateway_from_its_own_rtp_port_range(tmp_path):
    sip_port, http_port = free_port(), free_port()
    gateway = Process(
        "gateway-v6",
        [
            "gateway",
            "--worker-url",
            "echo:",
            "--sip-host",
            "::",
            "--sip-port",
            str(sip_port),
            "--http-host",
            "127.0.0.1",
            "--http-port",
            str(http_port),
        ],
        tmp_path,
    )
    try:
        wait_until(lambda: "moshimoshi ready" in gateway.log(), 60, "the gateway's banner", gateway)
        shown = format_host(outbound_address(ipv6=True))
        assert f"sip:agent@{shown}:{sip_port}\n" in gateway.log() and shown.startswith("[")  # as a URI must be
        port = media_port()
        port += port & 1
        result = subprocess.run(
            moshimoshi_cmd(
                "call",
                f"sip:agent@[::1]:{sip_port}",
                "--seconds",
                "2",
                "--rtp-port-min",
                str(port),
                "--rtp-port-max",
                str(port + 1),
            ),
            capture_output=True,
            text=True,
            timeout=60,
            env=python_env(),
        )
        assert result.returncode == 0, result.stderr[-3000:]
        summary = json.loads(result.stdout.strip().splitlines()[-1])
        assert summary["local_rtp_port"] == port
        assert summary["ended_by"] == "local-bye" and summary["packets_received"] > 50, summary
    finally:
        gateway.stop()
