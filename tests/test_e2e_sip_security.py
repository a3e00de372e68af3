"""Issue 13's attacks against a real gateway (a real Redis, an echo worker), as a scanner on
the internet would make them: sources are other loopback addresses (127.0.0.2 is outside
the allow list, 127.0.0.3 inside it without credentials), peers are sipp, baresip and raw
sockets.

The gateway: ``--sip-allow 127.0.0.1/32,127.0.0.3/32``, digest user alice (MD5 challenges, the default:
sipp 3.6 and baresip 1.0 know no SHA-256; the SHA-256 path is tested in test_sip_guard),
nonces good for NONCE_SECONDS, 30 requests per 2 s per source, TCP deadlines of 2 and 3 s.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import socket
import subprocess
import urllib.request
import wave
from pathlib import Path

import pytest
import redis

from sip.auth import DigestChallenge, authorization
from sip.framing import StreamFramer
from sip.message import Response, parse_message
from tests.conftest import RedisServer
from tests.support.baresip import write_baresip_config
from tests.support.procs import free_port
from tests.support.services import start_gateway, start_worker, wait_until
from tests.support.sip_peer import RawPeer, branch
from tests.support.sipp import SCENARIOS, Sipp, have_sipp, media_port
from tests.support.tools import requires

pytestmark = [pytest.mark.system, requires(have_sipp(), "sipp (sip-tester) is not installed")]

NONCE_SECONDS = 3
RATE_LIMIT = 30
USER, PASSWORD = "alice", "s3cret"


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """A gateway, an echo worker with 2 slots and a Redis, the gateway locked down."""
    log_dir = tmp_path_factory.mktemp("security")
    redis_server = RedisServer(log_dir)
    redis_server.start()
    worker = start_worker(log_dir, redis_server.url, "sec-worker", slots=2)
    gateway = start_gateway(
        log_dir,
        redis_server.url,
        "--sip-allow",
        "127.0.0.1/32,127.0.0.3/32",
        "--sip-auth",
        f"{USER}:{PASSWORD}",
        "--sip-auth-nonce-seconds",
        str(NONCE_SECONDS),
        "--sip-rate-limit",
        str(RATE_LIMIT),
        "--sip-rate-window-seconds",
        "2",
        "--sip-rate-ban-seconds",
        "5",
        "--sip-tcp-first-message-seconds",
        "2",
        "--sip-tcp-message-seconds",
        "3",
    )
    try:
        worker.wait_ready()
        gateway.wait_ready()
        gateway.redis = redis.Redis.from_url(redis_server.url)
        yield gateway
    finally:
        code = gateway.proc.stop()
        worker.proc.stop()
        redis_server.stop()
        assert code in (0, -2, 130), f"gateway exited {code}:\n{gateway.proc.log()[-3000:]}"


def metric(gateway, name: str, labels: str = "") -> float:
    with urllib.request.urlopen(gateway.api + "/metrics", timeout=5) as response:
        text = response.read().decode()
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return 0.0


def redis_state(gateway) -> set[bytes]:
    return set(gateway.redis.keys("*"))


def calls_in_api(gateway) -> set[str]:
    status, body = gateway.get("/v1/calls?limit=500")
    assert status == 200, body
    return {c["id"] for c in body["calls"]}


def sdp(host: str, port: int) -> str:
    return (
        f"v=0\r\no=peer 1 1 IN IP4 {host}\r\ns=-\r\nc=IN IP4 {host}\r\nt=0 0\r\n"
        f"m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
    )


def invite(
    gateway,
    peer: RawPeer,
    *,
    call_id: str,
    user: str = "agent",
    cseq: int = 1,
    body: str = "",
    headers: str = "",
    via_branch: str | None = None,
    top_via_port: int | None = None,
) -> bytes:
    uri = f"sip:{user}@127.0.0.1:{gateway.sip_port}"
    typed = "Content-Type: application/sdp\r\n" if body else ""
    return (
        f"INVITE {uri} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {peer.host}:{top_via_port or peer.port};branch={via_branch or branch()};rport\r\n"
        f"{headers}Max-Forwards: 70\r\nFrom: <sip:caller@{peer.host}>;tag=c{call_id[-6:]}\r\n"
        f"To: <{uri}>\r\nCall-ID: {call_id}\r\nCSeq: {cseq} INVITE\r\n"
        f"Contact: <sip:caller@{peer.host}:{peer.port}>\r\n{typed}"
        f"Content-Length: {len(body.encode())}\r\n\r\n{body}"
    ).encode()


def in_dialog(method: str, gateway, peer: RawPeer, ok: Response, *, cseq: int, body: str = "") -> bytes:
    typed = "Content-Type: application/sdp\r\n" if body else ""
    return (
        f"{method} sip:agent@127.0.0.1:{gateway.sip_port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {peer.host}:{peer.port};branch={branch()};rport\r\nMax-Forwards: 70\r\n"
        f"From: {ok.headers.get('From')}\r\nTo: {ok.headers.get('To')}\r\nCall-ID: {ok.call_id}\r\n"
        f"CSeq: {cseq} {method}\r\nContact: <sip:caller@{peer.host}:{peer.port}>\r\n{typed}"
        f"Content-Length: {len(body.encode())}\r\n\r\n{body}"
    ).encode()


async def authenticated_call(gateway, peer: RawPeer, call_id: str, body: str) -> Response:
    """INVITE, 401, ACK, INVITE with credentials: the final response to the second."""
    first_branch = branch()
    peer.send(
        invite(gateway, peer, call_id=call_id, body=body, via_branch=first_branch), ("127.0.0.1", gateway.sip_port)
    )
    challenge = await peer.final_response(call_id)
    assert challenge.status == 401, challenge
    peer.send(ack_for(gateway, peer, challenge, first_branch), ("127.0.0.1", gateway.sip_port))
    peer.send(
        invite(
            gateway,
            peer,
            call_id=call_id,
            cseq=2,
            body=body,
            headers=f"Authorization: {credentials(gateway, challenge)}\r\n",
        ),
        ("127.0.0.1", gateway.sip_port),
    )
    return await peer.final_response(call_id, within=10)


def credentials(gateway, challenge: Response, password: str = PASSWORD, user: str = "agent") -> str:
    value = DigestChallenge.parse(challenge.headers.get("WWW-Authenticate"))
    return authorization(
        value, method="INVITE", uri=f"sip:{user}@127.0.0.1:{gateway.sip_port}", username=USER, password=password
    )


def ack_for(gateway, peer: RawPeer, response: Response, via_branch: str) -> bytes:
    return (
        f"ACK sip:agent@127.0.0.1:{gateway.sip_port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {peer.host}:{peer.port};branch={via_branch};rport\r\nMax-Forwards: 70\r\n"
        f"From: {response.headers.get('From')}\r\nTo: {response.headers.get('To')}\r\n"
        f"Call-ID: {response.call_id}\r\nCSeq: {response.cseq.seq} ACK\r\nContent-Length: 0\r\n\r\n"
    ).encode()


async def sipp_call(
    tmp_path: Path,
    gateway,
    scenario: str,
    *args: str,
    host: str = "127.0.0.1",
    transport: str = "u1",
    within: float = 45,
) -> Sipp:
    sipp = Sipp(
        tmp_path,
        "-sf",
        str(SCENARIOS / scenario),
        "-au",
        USER,
        *args,
        f"127.0.0.1:{gateway.sip_port}",
        "-mp",
        str(media_port()),
        transport=transport,
    )
    if host != "127.0.0.1":
        sipp.args[sipp.args.index("-i") + 1] = host
    await sipp.start()
    try:
        await sipp.finished(within=within)
    finally:
        await sipp.stop()
    return sipp


# -- who may call ---------------------------------------------------------------------------


async def test_a_scanner_sweep_from_outside_the_allow_list_gets_identical_403s_and_leaves_no_trace(secured):
    keys_before, calls_before = redis_state(secured), calls_in_api(secured)
    refused_before = metric(secured, "moshimoshi_sip_requests_refused_total", 'reason="not-allowed"')
    scanner = await RawPeer.udp("127.0.0.2")
    answers = set()
    try:
        for user in ("100", "1000", "admin", "agent", "test"):
            for method in ("INVITE", "REGISTER"):
                data = invite(
                    secured, scanner, call_id=f"scan-{secrets.token_hex(4)}", user=user, body=sdp("127.0.0.2", 40000)
                )
                if method != "INVITE":
                    data = data.replace(b"INVITE", method.encode())
                scanner.send(data, ("127.0.0.1", secured.sip_port))
                response = await scanner.final_response()
                answers.add((response.status, response.reason, tuple(sorted(name for name, _ in response.headers))))
    finally:
        await scanner.close()
    assert len(answers) == 1 and next(iter(answers))[0] == 403, answers  # nothing tells users or methods apart
    assert metric(secured, "moshimoshi_sip_requests_refused_total", 'reason="not-allowed"') - refused_before == 10
    assert redis_state(secured) == keys_before and calls_in_api(secured) == calls_before


async def test_sipp_as_a_disallowed_source_gets_403(secured, tmp_path):
    """sipp (a real SIP stack) as the scanner: its INVITE gets 403, its ACK is absorbed."""
    calls_before = calls_in_api(secured)
    sipp = Sipp(tmp_path, "-sf", str(SCENARIOS / "uac_refused.xml"), "-s", "1000", f"127.0.0.1:{secured.sip_port}")
    sipp.args[sipp.args.index("-i") + 1] = "127.0.0.2"
    await sipp.start()
    try:
        await sipp.finished(within=20)
    finally:
        await sipp.stop()
    assert calls_in_api(secured) == calls_before


# -- digest authentication --------------------------------------------------------------------


async def test_sipp_with_the_right_password_calls_a_replay_a_wrong_one_and_a_stale_nonce_are_refused(secured, tmp_path):
    before = calls_in_api(secured)
    good = await sipp_call(tmp_path, secured, "uac_auth.xml", "-ap", PASSWORD, "-trace_msg")
    assert len(calls_in_api(secured) - before) == 1
    # Replay, within the nonce's lifetime: the Authorization sipp sent in its good call, in a
    # new INVITE from the same address (as an eavesdropper there would), is refused: its nc
    # was used.
    log = next(good.dir.glob("*_messages.log")).read_text(errors="replace")
    used = re.search(r"^Authorization: (Digest .*)$", log, re.M)
    assert used, log[-2000:]
    peer = await RawPeer.udp("127.0.0.1")
    try:
        replay_uri = re.search(r'uri="([^"]+)"', used[1])[1]
        data = invite(
            secured,
            peer,
            call_id="replayed",
            body=sdp("127.0.0.1", 40000),
            headers=f"Authorization: {used[1].strip()}\r\n",
        ).replace(f"sip:agent@127.0.0.1:{secured.sip_port} SIP/2.0".encode(), f"{replay_uri} SIP/2.0".encode(), 1)
        peer.send(data, ("127.0.0.1", secured.sip_port))
        replayed = await peer.final_response("replayed")
    finally:
        await peer.close()
    assert replayed.status == 401
    assert metric(secured, "moshimoshi_sip_requests_refused_total", 'reason="auth-replayed"') == 1
    await sipp_call(tmp_path, secured, "uac_auth_refused.xml", "-ap", "wrong")
    assert metric(secured, "moshimoshi_sip_requests_refused_total", 'reason="auth-failed"') >= 1
    await sipp_call(tmp_path, secured, "uac_auth_stale.xml", "-ap", PASSWORD, "-d", str(NONCE_SECONDS * 1000 + 1500))
    assert metric(secured, "moshimoshi_sip_requests_refused_total", 'reason="auth-stale"') >= 1
    assert len(calls_in_api(secured) - before) == 2


def baresip_call(tmp_path: Path, gateway, password: str) -> str:
    config = tmp_path / f"baresip-{password}"
    config.mkdir()
    silence = tmp_path / "silence.wav"
    if not silence.exists():
        with wave.open(str(silence), "wb") as wav:
            wav.setnchannels(1)
            wav.setsampwidth(2)
            wav.setframerate(8000)
            wav.writeframes(b"\0\0" * 8000 * 3)
    write_baresip_config(
        config,
        port=free_port(),
        source=silence,
        folder=tmp_path,
        account=f"<sip:{USER}@127.0.0.1>;auth_user={USER};auth_pass={password};regint=0",
        rtp_ports=(32000, 32999),
        dumps=False,
    )
    result = subprocess.run(
        ["baresip", "-f", str(config), "-e", f"/dial sip:agent@127.0.0.1:{gateway.sip_port}", "-t", "6"],
        capture_output=True,
        timeout=40,
    )
    return (result.stdout + result.stderr).decode(errors="replace")


@requires(shutil.which("baresip") is not None, "baresip is not installed")
def test_baresip_with_credentials_calls_and_with_a_wrong_password_does_not(secured, tmp_path):
    before = calls_in_api(secured)
    good = baresip_call(tmp_path, secured, PASSWORD)
    assert "Call established" in good, good[-3000:]
    wrong = baresip_call(tmp_path, secured, "guess")
    assert "Call established" not in wrong and "401" in wrong, wrong[-3000:]
    new = calls_in_api(secured) - before
    assert len(new) == 1, new  # the refused one left no record


# -- floods and rate limits -------------------------------------------------------------------


async def test_an_unauthenticated_flood_from_an_allowed_address_is_banned_and_leaves_no_trace(secured, tmp_path):
    keys_before = redis_state(secured)
    flood = await RawPeer.udp("127.0.0.3")
    try:
        body = sdp("127.0.0.3", 40000)
        for i in range(100):
            flood.send(invite(secured, flood, call_id=f"flood-{i}", body=body), ("127.0.0.1", secured.sip_port))
        await asyncio.sleep(1.0)
        statuses = sorted(m.status for m in flood.drain() if isinstance(m, Response))
    finally:
        await flood.close()
    assert statuses == [401] * RATE_LIMIT + [503], statuses  # the rest: dropped, as pike does
    assert metric(secured, "moshimoshi_sip_banned_sources") >= 1
    assert redis_state(secured) == keys_before
    # a legitimate caller from another address is not affected
    await sipp_call(tmp_path, secured, "uac_auth.xml", "-ap", PASSWORD)


# -- TCP: a slowloris ---------------------------------------------------------------------------


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_a_slowloris_of_1024_connections_does_not_stop_a_tcp_call(secured, tmp_path):
    pid = secured.proc.pid
    baseline = fd_count(pid)
    sockets: list[socket.socket] = []
    try:
        for _ in range(1024):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.bind(("127.0.0.2", 0))
            try:
                sock.connect(("127.0.0.1", secured.sip_port))
            except BlockingIOError:
                pass
            sockets.append(sock)
        await asyncio.sleep(0.5)
        peak = fd_count(pid)
        trickle = asyncio.create_task(_trickle(sockets))
        try:
            await sipp_call(tmp_path, secured, "uac_auth.xml", "-ap", PASSWORD, transport="t1")
            peak = max(peak, fd_count(pid))
        finally:
            trickle.cancel()
        assert peak - baseline <= 32 + 16, (baseline, peak)  # the per-source cap, and the call's own
    finally:
        for sock in sockets:
            sock.close()
    wait_until(lambda: fd_count(pid) <= baseline + 4, 15, "the gateway's fds back to its baseline")
    assert metric(secured, "moshimoshi_sip_messages_dropped_total", 'reason="tcp-refused"') >= 1024 - 32


async def _trickle(sockets: list[socket.socket]) -> None:
    header = b"OPTIONS sip:agent@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.2:5060;branch=z9hG4bKslow\r\n"
    for byte in header:
        for sock in sockets:
            try:
                sock.send(bytes([byte]))
            except OSError:
                pass
        await asyncio.sleep(0.25)


# -- media: reflection and hijacking ----------------------------------------------------------


class Victim(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.packets = 0

    def datagram_received(self, data: bytes, addr) -> None:
        self.packets += 1


async def test_an_invite_naming_a_third_party_in_its_sdp_sends_it_nothing(secured):
    loop = asyncio.get_running_loop()
    victim_transport, victim = await loop.create_datagram_endpoint(Victim, local_addr=("127.0.0.3", 0))
    victim_port = victim_transport.get_extra_info("sockname")[1]
    withheld_before = metric(secured, "moshimoshi_rtp_packets_withheld_total")
    caller = await RawPeer.udp("127.0.0.1")
    try:
        ok = await authenticated_call(secured, caller, "reflect", sdp("127.0.0.3", victim_port))
        assert ok.status == 200, ok
        caller.send(ack_for(secured, caller, ok, branch()), ("127.0.0.1", secured.sip_port))
        await asyncio.sleep(3.0)
        assert victim.packets == 0  # was 1502 packets for one 862-byte INVITE+ACK
        assert metric(secured, "moshimoshi_rtp_packets_withheld_total") - withheld_before >= 100
        caller.send(in_dialog("BYE", secured, caller, ok, cseq=3), ("127.0.0.1", secured.sip_port))
        assert (await caller.final_response("reflect")).status == 200
    finally:
        victim_transport.close()
        await caller.close()


async def test_forged_in_dialog_requests_from_another_address_end_nothing(secured):
    caller, forger = await RawPeer.udp("127.0.0.1"), await RawPeer.udp("127.0.0.2")
    media = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    media.bind(("127.0.0.1", 0))
    try:
        ok = await authenticated_call(secured, caller, "victim-call", sdp("127.0.0.1", media.getsockname()[1]))
        assert ok.status == 200, ok
        caller.send(ack_for(secured, caller, ok, branch()), ("127.0.0.1", secured.sip_port))
        call_id = ok.headers.get("X-Moshimoshi-Call-Id")
        for cseq, (method, body) in enumerate(
            [("BYE", ""), ("INVITE", sdp("127.0.0.2", 40000)), ("UPDATE", sdp("127.0.0.2", 40000)), ("INFO", "")], 10
        ):
            forger.send(in_dialog(method, secured, forger, ok, cseq=cseq, body=body), ("127.0.0.1", secured.sip_port))
            assert (await forger.final_response("victim-call")).status == 403, method
        await asyncio.sleep(0.5)
        status, record = secured.get(f"/v1/calls/{call_id}")
        assert status == 200 and record["state"] == "active", record
        caller.send(in_dialog("BYE", secured, caller, ok, cseq=3), ("127.0.0.1", secured.sip_port))
        assert (await caller.final_response("victim-call")).status == 200
        wait_until(
            lambda: secured.get(f"/v1/calls/{call_id}")[1].get("end_reason") == "remote-bye",
            10,
            "the call ended by its own caller",
        )
    finally:
        media.close()
        await caller.close()
        await forger.close()


# -- a response too big for UDP ---------------------------------------------------------------


async def _tcp_sink(messages: asyncio.Queue) -> asyncio.Server:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        framer = StreamFramer()
        while data := await reader.read(65536):
            for raw in framer.feed(data):
                messages.put_nowait(parse_message(raw))
        writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


def huge_vias(count: int) -> str:
    return "".join(
        f"Via: SIP/2.0/UDP 192.0.2.{i % 250 + 1}:5060;branch=z9hG4bK{secrets.token_hex(8)}\r\n" for i in range(count)
    )


async def test_a_via_list_too_big_for_a_udp_response_is_answered_over_tcp_or_with_513(secured):
    peer = await RawPeer.udp("127.0.0.1")
    messages: asyncio.Queue = asyncio.Queue()
    sink = await _tcp_sink(messages)
    sink_port = sink.sockets[0].getsockname()[1]
    slots_before = secured.get("/v1/pool")[1]
    try:
        peer.send(invite(secured, peer, call_id="nonce-for-huge"), ("127.0.0.1", secured.sip_port))
        challenge = await peer.final_response("nonce-for-huge")
        auth = f"Authorization: {credentials(secured, challenge)}\r\n"
        body = sdp("127.0.0.1", 40000)
        data = invite(
            secured, peer, call_id="huge-tcp", body=body, headers=auth + huge_vias(960), top_via_port=sink_port
        )
        assert 63_000 < len(data) < 65_507
        peer.send(data, ("127.0.0.1", secured.sip_port))
        while True:
            ok = await asyncio.wait_for(messages.get(), 10)
            if isinstance(ok, Response) and ok.status >= 200:
                break
        assert ok.status == 200 and len(ok.vias) == 961
        peer.send(ack_for(secured, peer, ok, branch()), ("127.0.0.1", secured.sip_port))
        peer.send(in_dialog("BYE", secured, peer, ok, cseq=3), ("127.0.0.1", secured.sip_port))
        assert (await peer.final_response("huge-tcp")).status == 200
        # no TCP listener at the sent-by port: 513, and no call, no slot
        nobody = free_port()
        peer.send(invite(secured, peer, call_id="nonce-2"), ("127.0.0.1", secured.sip_port))
        challenge = await peer.final_response("nonce-2")
        auth = f"Authorization: {credentials(secured, challenge)}\r\n"
        before = calls_in_api(secured)
        peer.send(
            invite(secured, peer, call_id="huge-513", body=body, headers=auth + huge_vias(960), top_via_port=nobody),
            ("127.0.0.1", secured.sip_port),
        )
        refused = await peer.final_response("huge-513", within=10)
        assert refused.status == 513
        assert calls_in_api(secured) == before
        assert secured.get("/v1/pool")[1]["slots_busy"] == slots_before["slots_busy"]
    finally:
        sink.close()
        await peer.close()
