"""WebRTC calls against `moshimoshi serve --model echo` (one slot) from a Python aiortc client.

The client is a real WebRTC peer (aiortc: ICE, DTLS-SRTP, Opus) that offers WHIP-style
to /v1/webrtc/offer; the gateway bridges its audio into the same call, pool and worker
path as a SIP call, and the echo worker sends each 80 ms frame straight back.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time
import typing as tp

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.polling import eventually
from tests.support.procs import free_port, worker_headers
from tests.support.realtime import realtime_test
from tests.support.services import (
    ADMIN_TOKEN,
    CALL_TOKEN,
    OTHER_CALL_TOKEN,
    READ_TOKEN,
    TOKENS,
    Gateway,
    Process,
    gateway_args,
    wait_until,
)
from tests.support.webrtc_client import WebRtcClient, speech_like

pytestmark = pytest.mark.system

CONNECT_SECONDS = 3
QUEUE_SECONDS = 2


class EchoSystem(tp.NamedTuple):
    gateway: Gateway
    worker_port: int

    @property
    def api(self) -> str:
        return self.gateway.api


@pytest.fixture(scope="module")
def echo(tmp_path_factory) -> tp.Iterator[EchoSystem]:
    log_dir = tmp_path_factory.mktemp("webrtc-echo")
    sip_port, http_port, worker_port = free_port(), free_port(), free_port()
    proc = Process(
        "serve",
        [
            "serve",
            "--model",
            "echo",
            "--asr",
            "off",
            *gateway_args(sip_port, http_port),
            "--host",
            "127.0.0.1",
            "--port",
            str(worker_port),
            "--slots",
            "1",
            "--queue-seconds",
            str(QUEUE_SECONDS),
            "--webrtc-connect-seconds",
            str(CONNECT_SECONDS),
        ],
        log_dir,
        env={"MOSHIMOSHI_API_TOKENS": TOKENS},
    )
    gateway = Gateway(proc, sip_port, http_port)
    try:
        gateway.wait_ready()
        wait_until(lambda: gateway.get("/readyz", token=None)[1].get("workers_ready"), 30, "worker", proc)
        yield EchoSystem(gateway, worker_port)
    finally:
        code = proc.stop()
        assert code in (0, -2, 130), f"serve exited {code}:\n{proc.log()[-3000:]}"


async def free_slots(system: EchoSystem) -> int:
    async with httpx.AsyncClient() as client:
        return (
            await client.get(f"http://127.0.0.1:{system.worker_port}/v1/info", timeout=5, headers=worker_headers())
        ).json()["free"]


async def metric(system: EchoSystem, name: str, **labels: str) -> float:
    async with httpx.AsyncClient() as client:
        text = (await client.get(system.api + "/metrics", timeout=5)).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def slot_released(system: EchoSystem) -> None:
    async def released() -> bool:
        return await free_slots(system) == 1 and await metric(system, "moshimoshi_calls_active", ingress="webrtc") == 0

    await eventually(released, 15, "the slot is free and no WebRTC call is active")


def echo_delay(sent: np.ndarray, received: np.ndarray) -> tuple[float, float]:
    """(where ``sent`` best matches in ``received``, in ms; the normalised correlation there), 48 kHz."""
    a, b = sent.astype(np.float64), received.astype(np.float64)
    n = len(a) + len(b)
    corr = np.fft.irfft(np.fft.rfft(b, n) * np.conj(np.fft.rfft(a, n)), n)[: len(b)]
    lag = int(np.argmax(corr))
    overlap = b[lag : lag + len(a)]
    norm = np.sqrt(np.sum(a[: len(overlap)] ** 2) * np.sum(overlap**2)) or 1.0
    return lag / 48.0, float(corr[lag] / norm)


async def connected_client(system: EchoSystem, pcm: np.ndarray | None = None) -> WebRtcClient:
    client = WebRtcClient(system.api, token=CALL_TOKEN, pcm=pcm)
    response = await client.call()
    assert response.status_code == 201, response.text
    await client.wait_connected()
    return client


@realtime_test()
async def test_a_call_echoes_the_caller_and_hanging_up_frees_the_slot(echo, timing):
    pcm = np.concatenate((np.zeros(24000, dtype=np.int16), speech_like(3.0)))
    received_before = await metric(echo, "moshimoshi_rtp_packets_received_total")
    client = WebRtcClient(echo.api, token=CALL_TOKEN, pcm=pcm)
    try:
        response = await client.call()
        assert response.status_code == 201, response.text
        assert response.headers["content-type"] == "application/sdp"
        assert re.fullmatch(r"/v1/webrtc/sessions/c-[0-9a-f]+", response.headers["location"])
        assert "a=rtpmap:96 opus/48000/2" in response.text and "PCMU" not in response.text
        await client.wait_connected()
        assert await free_slots(echo) == 0

        async def echoed() -> bool:
            return len(client.audio()) >= len(pcm) + 48000 // 2

        await eventually(echoed, 20, "the echo of the whole signal")
        # Each half second of the signal is found again, 40–600 ms later. (Window by window:
        # on a loaded machine a buffer may slip a frame, which would spoil one long correlation.)
        windows = [echo_delay(pcm[s : s + 24000], client.audio()) for s in range(24000, len(pcm) - 23999, 24000)]
        found = [
            (delay - s / 48, corr)
            for s, (delay, corr) in zip(range(24000, len(pcm), 24000), windows, strict=False)
            if corr > 0.4 and 40 < delay - s / 48 < 600
        ]
        assert len(found) >= 0.4 * len(windows), windows
        timing.expect(len(found) >= 0.7 * len(windows), f"echo found in 70 % of the windows: {windows}")

        # the data channel: the call's id, then the gateway's view of the call's quality
        kinds = [m["type"] for m in client.messages]
        assert kinds[0] == "call" and client.messages[0]["call_id"] == client.call_id
        quality = [m for m in client.messages if m["type"] == "quality"][-1]
        assert quality["codec"] == "opus/48000" and quality["packets_received"] > 100
        timing.expect(
            quality["concealed_frames"] < 0.1 * quality["packets_received"],
            f"under 10 % concealed on loopback: {quality}",
        )
        assert await metric(echo, "moshimoshi_calls_active", ingress="webrtc") == 1

        hung_up = await client.hang_up()
        assert hung_up.status_code == 200, hung_up.text
        await slot_released(echo)
        assert await metric(echo, "moshimoshi_calls_total", ingress="webrtc", outcome="remote-hangup") >= 1
        # the same per-call RTP counters as SIP calls
        assert await metric(echo, "moshimoshi_rtp_packets_received_total") - received_before > 100
        assert (await client.hang_up()).status_code == 404
    finally:
        await client.close()


async def test_bad_offers_get_400_with_the_reason_and_hold_no_slot(echo):
    client = WebRtcClient(echo.api, token=CALL_TOKEN)
    try:
        good = await client.offer_sdp()
    finally:
        await client.close()
    no_opus = re.sub(r"a=rtpmap:\d+ opus/48000/2\r\n", "", good)
    no_opus = re.sub(r"(m=audio \d+ UDP/TLS/RTP/SAVPF) \d+", r"\1", no_opus)
    cases = {
        "hello": "must start with v=0",
        no_opus: "no Opus",
        good.replace("m=audio", "m=video"): "no audio section",
        good + "m=video 9 UDP/TLS/RTP/SAVPF 97\r\na=rtpmap:97 VP8/90000\r\n": "video is not supported",
        re.sub(r"a=fingerprint:.*\r\n", "", good): "fingerprint",
        # past the structural check, refused by aiortc itself
        good.replace("a=setup:actpass", "a=setup:sideways"): "WebRTC stack cannot use this offer",
    }
    headers = {"Authorization": f"Bearer {CALL_TOKEN}", "Content-Type": "application/sdp"}
    async with httpx.AsyncClient(base_url=echo.api) as http:
        for offer, reason in cases.items():
            response = await http.post("/v1/webrtc/offer", content=offer.encode(), headers=headers)
            assert response.status_code == 400, (reason, response.text)
            assert reason in response.json()["detail"], response.text
        wrong_type = await http.post(
            "/v1/webrtc/offer", json={"type": "offer", "sdp": good}, headers={"Authorization": f"Bearer {CALL_TOKEN}"}
        )
        assert wrong_type.status_code == 415
        too_big = await http.post("/v1/webrtc/offer", content=b"v=0\r\n" + b"a=x\r\n" * 20000, headers=headers)
        assert too_big.status_code == 413
        not_utf8 = await http.post("/v1/webrtc/offer", content=b"v=0\r\n\xff\xfe", headers=headers)
        assert not_utf8.status_code == 400
        for auth in ({}, {"Authorization": "Bearer not-a-token"}):
            refused = await http.post(
                "/v1/webrtc/offer", content=good.encode(), headers={"Content-Type": "application/sdp", **auth}
            )
            assert refused.status_code == 401
        assert (await http.patch("/v1/webrtc/sessions/c-0", headers=headers)).status_code == 405
        config = await http.get("/v1/webrtc/config", headers=headers)
        assert config.json()["ice_servers"] == []  # host candidates only unless STUN/TURN is configured
        assert (await http.delete("/v1/webrtc/sessions/c-0", headers=headers)).status_code == 404
    await slot_released(echo)


async def test_a_peer_that_never_connects_is_dropped_and_its_slot_released(echo):
    # A real offer whose only candidate is a UDP socket that never answers.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as black_hole:
        black_hole.bind(("127.0.0.1", 0))
        client = WebRtcClient(echo.api, token=CALL_TOKEN)
        try:
            sdp = await client.offer_sdp()
        finally:
            await client.close()
        sdp = re.sub(r"a=candidate:.*\r\n", "", sdp)
        candidate = f"a=candidate:1 1 udp 2130706431 127.0.0.1 {black_hole.getsockname()[1]} typ host\r\n"
        sdp = sdp.replace("a=end-of-candidates\r\n", candidate + "a=end-of-candidates\r\n")
        timeouts = await metric(echo, "moshimoshi_calls_total", ingress="webrtc", outcome="connect-timeout")
        async with httpx.AsyncClient(base_url=echo.api) as http:
            started = time.monotonic()
            response = await http.post(
                "/v1/webrtc/offer",
                content=sdp.encode(),
                timeout=10,
                headers={"Authorization": f"Bearer {CALL_TOKEN}", "Content-Type": "application/sdp"},
            )
            assert response.status_code == 201, response.text
            assert await free_slots(echo) == 0  # the slot is held from the answer on

            async def timed_out() -> bool:
                return (
                    await metric(echo, "moshimoshi_calls_total", ingress="webrtc", outcome="connect-timeout") > timeouts
                )

            await eventually(timed_out, CONNECT_SECONDS + 10, "the connect timeout")
            assert time.monotonic() - started >= CONNECT_SECONDS - 0.5
            await slot_released(echo)
            gone = await http.delete(response.headers["location"], headers={"Authorization": f"Bearer {CALL_TOKEN}"})
            assert gone.status_code == 404


async def test_webrtc_calls_queue_for_the_slot_and_get_503_when_none_frees(echo):
    first = await connected_client(echo)
    second = WebRtcClient(echo.api, token=CALL_TOKEN)
    third = WebRtcClient(echo.api, token=CALL_TOKEN)
    try:
        # the second call waits in the queue (no slot) and gets the first one's when it hangs up
        waiting = asyncio.ensure_future(second.call())
        await asyncio.sleep(0.5)
        assert not waiting.done()
        assert (await first.hang_up()).status_code == 200
        response = await asyncio.wait_for(waiting, QUEUE_SECONDS + 5)
        assert response.status_code == 201, response.text
        await second.wait_connected()
        # the third finds no slot within the queue wait
        started = time.monotonic()
        refused = await third.call()
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"].isdigit()
        assert "busy" in refused.json()["detail"]
        assert time.monotonic() - started >= QUEUE_SECONDS - 0.5
        assert (await second.hang_up()).status_code == 200
        await slot_released(echo)
        assert await metric(echo, "moshimoshi_calls_total", ingress="webrtc", outcome="rejected-busy") >= 1
    finally:
        for client in (first, second, third):
            await client.close()


def process_resources(pid: int) -> tuple[int, int]:
    """(threads, open file descriptors) of a process."""
    return len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd"))


async def test_a_call_token_ends_only_its_own_calls_and_a_read_token_none(echo):
    """Before: a read token placed and ended WebRTC calls (any call, by its session URL)."""
    reader = WebRtcClient(echo.api, token=READ_TOKEN)
    try:
        refused = await reader.call()
    finally:
        await reader.close()
    assert refused.status_code == 403 and "needs call" in refused.text
    client = await connected_client(echo)
    try:
        session = echo.api + client.location
        async with httpx.AsyncClient() as http:
            for token, status in ((READ_TOKEN, 403), (OTHER_CALL_TOKEN, 404)):
                response = await http.delete(session, headers={"Authorization": f"Bearer {token}"})
                assert response.status_code == status, (token, response.text)
            assert await free_slots(echo) == 0  # the call goes on
            ended = await http.delete(session, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            assert ended.status_code == 200  # an admin ends any call
        await slot_released(echo)
    finally:
        await client.close()


async def test_calls_leave_no_threads_or_sockets_behind(echo):
    pid = echo.gateway.proc.pid

    async def call(hang_up: bool) -> None:
        client = await connected_client(echo, speech_like(0.5))
        try:
            await asyncio.sleep(0.5)
            if hang_up:
                assert (await client.hang_up()).status_code == 200
        finally:
            await client.close()  # without a DELETE first: the gateway sees the peer go
        await slot_released(echo)

    await call(hang_up=True)  # warm: the encoder's thread pool starts with the first call
    threads, fds = process_resources(pid)
    for hang_up in (True, False, True, False):
        await call(hang_up)
    assert await metric(echo, "moshimoshi_calls_total", ingress="webrtc", outcome="peer-gone") >= 2
    after_threads, after_fds = process_resources(pid)
    assert after_threads <= threads, (threads, after_threads)
    assert after_fds <= fds + 2, (fds, after_fds)  # slack for HTTP connections closing
