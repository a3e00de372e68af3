"""The call lifecycle as a caller meets it, through a real gateway process (the in-gateway
echo, ``--worker-url echo:``): what ends a call ends it with the right reason, a BYE and
a record, whichever ingress it came in by."""

from __future__ import annotations

import asyncio
import secrets
import struct

import pytest

from service.api.control import CALL_ID_HEADER
from sip.ua import UserAgent
from tests.support.procs import free_port
from tests.support.services import TOKENS, Gateway, Process, gateway_args, wait_until
from tests.support.udp import UdpPeer

pytestmark = pytest.mark.system


@pytest.fixture
def echo_gateway(tmp_path):
    """``moshimoshi gateway --worker-url echo:`` with a one-second RTP timeout."""
    sip_port, http_port = free_port(), free_port()
    proc = Process(
        "gateway",
        ["gateway", "--worker-url", "echo:", *gateway_args(sip_port, http_port)],
        tmp_path,
        env={"MOSHIMOSHI_API_TOKENS": TOKENS, "MOSHIMOSHI_RTP_TIMEOUT_SECONDS": "1"},
    )
    gateway = Gateway(proc, sip_port, http_port)
    try:
        gateway.wait_ready()
        yield gateway
    finally:
        code = proc.stop()
        assert code in (0, -2, 130), f"gateway exited {code}:\n{proc.log()[-3000:]}"


def pcmu_offer(port: int) -> str:
    return "\r\n".join(
        [
            "v=0",
            f"o=t {secrets.randbelow(10**9)} 1 IN IP4 127.0.0.1",
            "s=-",
            "c=IN IP4 127.0.0.1",
            "t=0 0",
            f"m=audio {port} RTP/AVP 0",
            "a=rtpmap:0 PCMU/8000",
            "a=ptime:20",
            "a=sendrecv",
            "",
        ]
    )


async def test_a_caller_whose_rtp_stops_is_hung_up_with_a_bye_and_the_reason_recorded(echo_gateway):
    """Written before the two ingresses' RTP watches became the lifecycle's one: no test
    covered the RTP timeout at all."""
    rtp = await UdpPeer.open()
    ua = UserAgent("127.0.0.1", 0, user_agent="silent-caller")
    await ua.start()
    try:
        dialog = await ua.invite(echo_gateway.uri, pcmu_offer(rtp.address[1]))
        call_id = dialog.answer_response.headers.get(CALL_ID_HEADER) if dialog.answer_response else None
        assert call_id, "the 200 OK names the gateway's call id"
        answer = dialog.remote_sdp
        assert answer is not None
        remote = (answer.connection_of(answer.media[0]).host, answer.media[0].port)
        ssrc, seq, ts = secrets.randbits(32), secrets.randbits(16), secrets.randbits(32)
        for i in range(10):  # 200 ms of speech, then the line goes dead
            rtp.send(
                struct.pack("!BBHII", 0x80, 0, (seq + i) & 0xFFFF, (ts + 160 * i) & 0xFFFFFFFF, ssrc) + b"\xff" * 160,
                remote,
            )
            await asyncio.sleep(0.02)
        reason = await asyncio.wait_for(asyncio.shield(dialog.terminated), 15)
        assert reason == "remote-bye", reason  # the gateway hung up
    finally:
        await ua.stop()
        rtp.close()

    def ended() -> dict | None:
        status, body = echo_gateway.get(f"/v1/calls/{call_id}")
        return body if status == 200 and body["state"] == "ended" else None

    wait_until(ended, 10, "the call's record ended", echo_gateway.proc)
    record = ended()
    assert record is not None
    assert (record["end_reason"], record["ingress"], record["codec"]) == ("rtp-timeout", "sip", "PCMU")
    assert record["quality"]["packets_received"] >= 9 and record["quality"]["failovers"] == 0
