"""Encrypted trunks end to end: a real `moshimoshi gateway` (echo inside, no worker) with SIP
over TLS and SDES-SRTP, called by baresip (its own TLS and libsrtp) and by our own client.

What is checked on the wire is captured on the loopback interface with a raw socket: the
media packets carry ciphertext (byte entropy of random data, SRTP's tag on every packet),
not G.711. Certificates are made at test time; sipp is not used here because Debian's
sipp is built without TLS (`sipp -v`: SCTP-PCAP-RTPSTREAM, no libssl).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import time
import warnings
import wave
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from service.settings import CallSettings
from service.tools.call import place_call, read_wav
from sip import g711
from sip.rtp import RtpPacket
from sip.sdp import MediaPreferences, build_offer
from sip.srtp import SrtpContext, SrtpError
from sip.tls import client_context
from sip.ua import UserAgent
from tests.support.baresip import write_baresip_config
from tests.support.certs import TestCa, serial_of
from tests.support.procs import free_port
from tests.support.realtime import realtime_test
from tests.support.services import TOKENS, Gateway, Process, gateway_args, wait_until
from tests.support.sniff import LoopbackSniffer, can_sniff, entropy_bits_per_byte
from tests.support.tools import requires
from tests.support.udp import UdpPeer
from tests.test_e2e_echo import echo_delay, noise_bursts_wav

pytestmark = pytest.mark.system

BARESIP_RTP_PORTS = (33000, 33999)
needs_baresip = requires(shutil.which("baresip") is not None, "baresip is not installed")
needs_sniffing = requires(can_sniff(), "capturing on lo needs root (CAP_NET_RAW)")


class TlsGateway(Gateway):
    def __init__(
        self, proc: Process, sip_port: int, http_port: int, tls_port: int, ca: TestCa, cert: Path, key: Path
    ) -> None:
        super().__init__(proc, sip_port, http_port)
        self.tls_port, self.ca, self.cert, self.key = tls_port, ca, cert, key

    @property
    def tls_uri(self) -> str:
        return f"sip:agent@127.0.0.1:{self.tls_port};transport=tls"

    def calls_since(self, began: float) -> list[dict]:
        status, body = self.get("/v1/calls?state=ended&limit=50")
        assert status == 200, body
        return [c for c in body["calls"] if c["started_at"] >= began]

    def call(self, call_id: str) -> dict:
        status, body = self.get(f"/v1/calls/{call_id}")
        assert status == 200, body
        return body


def start_tls_gateway(folder: Path, *extra: str, name: str = "tls-gateway") -> TlsGateway:
    """`moshimoshi gateway --worker-url echo:` with TLS on a free port and fresh certificates."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = TestCa(folder / "pki")
    issued = ca.issue("gateway.test", stem="gateway")
    sip_port, http_port, tls_port = free_port(), free_port(), free_port()
    proc = Process(
        name,
        [
            "gateway",
            *gateway_args(sip_port, http_port),
            "--worker-url",
            "echo:",
            "--sip-tls-port",
            str(tls_port),
            "--sip-tls-cert",
            str(issued.cert),
            "--sip-tls-key",
            str(issued.key),
            "--sip-tls-handshake-seconds",
            "2",
            # the tests call from one address many times a second
            "--sip-rate-limit",
            "0",
            *extra,
        ],
        folder,
        env={"MOSHIMOSHI_API_TOKENS": TOKENS},
    )
    gateway = TlsGateway(proc, sip_port, http_port, tls_port, ca, issued.cert, issued.key)
    try:
        gateway.wait_ready()
    except BaseException:
        proc.stop()
        raise
    return gateway


@pytest.fixture(scope="module")
def tls_gateway(tmp_path_factory):
    gateway = start_tls_gateway(tmp_path_factory.mktemp("tls-gateway"))
    yield gateway
    code = gateway.proc.stop()
    assert code in (0, -2, 130), f"gateway exited {code}:\n{gateway.proc.log()[-3000:]}"


def client_settings(gateway: TlsGateway, tmp_path: Path, **overrides) -> CallSettings:
    wav = noise_bursts_wav(tmp_path / "bursts.wav", seconds=4.0)
    values = dict(
        uri=gateway.tls_uri,
        play=str(wav),
        record=str(tmp_path / "out.wav"),
        seconds=4.0,
        local_host="127.0.0.1",
        transport="tls",
        srtp=True,
        tls_ca=str(gateway.ca.path),
    )
    values.update(overrides)
    return CallSettings(**values)


def recorded(path: str) -> tuple[np.ndarray, np.ndarray]:
    with wave.open(path) as rec:
        frames = np.frombuffer(rec.readframes(rec.getnframes()), "<i2").reshape(-1, 2)
    return frames[:, 0], frames[:, 1]


def assert_ciphertext(datagrams, what: str) -> None:
    """Every RTP packet is 12 + 160 + 10 bytes (G.711 with SRTP's 80-bit tag) and its payload
    reads as random bytes, which G.711 audio never does (the control: the same measure on
    μ-law speech-like noise)."""
    rtp = [d.payload for d in datagrams if len(d.payload) >= 12 and d.payload[1] & 0x7F in (0, 8)]
    assert len(rtp) > 100, f"{what}: only {len(rtp)} RTP packets captured"
    odd = [(i, p[:12].hex(), len(p)) for i, p in enumerate(rtp) if len(p) != 182]
    assert not odd, f"{what}: of {len(rtp)} packets, these are not SRTP-sized: {odd}"
    payload = b"".join(p[12:172] for p in rtp)
    assert entropy_bits_per_byte(payload) > 7.9, f"{what}: entropy {entropy_bits_per_byte(payload):.2f}"


def test_entropy_tells_g711_audio_from_ciphertext(tmp_path):
    """The control for ``assert_ciphertext``: μ-law of the test audio is far from random."""
    audio = read_wav(noise_bursts_wav(tmp_path / "n.wav"))
    assert entropy_bits_per_byte(g711.encode("PCMU", audio)) < 7.3
    assert entropy_bits_per_byte(os.urandom(len(audio))) > 7.9


# -- baresip: TLS + mandatory SRTP -----------------------------------------------------------


def baresip_config(folder: Path, gateway: TlsGateway, wav: Path) -> Path:
    config = folder / "baresip"
    config.mkdir()
    sip_port = free_port()
    while True:  # baresip binds TLS on the SIP port + 1: both must be free
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", sip_port + 1))
                break
            except OSError:
                sip_port = free_port()
    return write_baresip_config(
        config,
        port=sip_port,
        source=wav,
        folder=folder,
        account="<sip:baresip@127.0.0.1;transport=tls>;regint=0;mediaenc=srtp-mand",
        rtp_ports=BARESIP_RTP_PORTS,
        modules=["srtp"],
        extra=[f"sip_cafile {gateway.ca.path}"],  # baresip checks the gateway's certificate against our CA
    )


@needs_baresip
@needs_sniffing
@realtime_test()
def test_baresip_over_tls_with_mandatory_srtp_hears_the_echo_and_the_wire_carries_srtp(tls_gateway, tmp_path, timing):
    import subprocess

    began = time.time()
    wav = noise_bursts_wav(tmp_path / "bursts.wav", seconds=4.0)
    config = baresip_config(tmp_path, tls_gateway, wav)
    with LoopbackSniffer(set(range(BARESIP_RTP_PORTS[0], BARESIP_RTP_PORTS[1] + 1))) as sniffer:
        result = subprocess.run(
            ["baresip", "-f", str(config), "-e", f"/dial sip:agent@127.0.0.1:{tls_gateway.tls_port}", "-t", "10"],
            capture_output=True,
            text=True,
            timeout=40,
        )
        captured = sniffer.stop()
    output = result.stdout + result.stderr
    assert "Call established" in output, output[-3000:]
    assert "SRTP is Enabled" in output, output[-3000:]
    [call] = wait_until(
        lambda: [c for c in tls_gateway.calls_since(began) if "baresip@" in c["from_uri"]], 10, "baresip's call record"
    )
    assert (call["sip_transport"], call["media_encryption"], call["end_reason"]) == ("TLS", "SDES-SRTP", "remote-bye")
    quality = tls_gateway.call(call["id"])["quality"]
    assert quality["packets_received"] > 150 and quality["srtp_suite"] == "AES_CM_128_HMAC_SHA1_80"
    # baresip pings the RTCP port with a plain RTCP APP packet before SRTCP starts: it cannot
    # authenticate and is dropped and counted; every RTP packet verified
    assert quality["packets_srtp_auth_failed"] <= 2 and quality["packets_srtp_replayed"] == 0, quality
    # the call's media flow (other tests on this machine may use these ports too): the busiest
    # pair of an even baresip port and a gateway port, each way
    flows = Counter(
        (d.source, d.destination)
        for d in captured
        if BARESIP_RTP_PORTS[0] <= d.source[1] <= BARESIP_RTP_PORTS[1] and d.source[1] % 2 == 0
    )
    (baresip, gateway), _ = flows.most_common(1)[0]
    assert_ciphertext([d for d in captured if (d.source, d.destination) == (baresip, gateway)], "baresip → gateway")
    assert_ciphertext([d for d in captured if (d.source, d.destination) == (gateway, baresip)], "gateway → baresip")
    heard = read_wav(sorted(tmp_path.glob("dump-*-dec.wav"))[0])
    spoken = read_wav(sorted(tmp_path.glob("dump-*-enc.wav"))[0])
    delay_ms, correlation = echo_delay(spoken, heard)
    assert correlation > 0.5, (delay_ms, correlation, output[-2000:])
    timing.expect(correlation > 0.8, f"echo heard intact: {correlation:.2f} of the sounds")


# -- our own client --------------------------------------------------------------------------


@realtime_test()
async def test_moshimoshi_call_over_tls_with_srtp_hears_its_echo(tls_gateway, tmp_path, timing):
    summary = await place_call(client_settings(tls_gateway, tmp_path))
    assert (summary["sip_transport"], summary["media_encryption"]) == ("TLS", "SDES-SRTP")
    assert summary["packets_srtp_auth_failed"] == 0 and summary["packets_received"] > 150
    sent, heard = recorded(summary["recording"])
    delay_ms, correlation = echo_delay(sent, heard)
    assert correlation > 0.5, (delay_ms, correlation)
    timing.expect(correlation > 0.8, f"echo heard intact: {correlation:.2f} of the sounds")
    record = tls_gateway.call(summary["gateway_call_id"])
    assert (record["sip_transport"], record["media_encryption"]) == ("TLS", "SDES-SRTP")
    assert record["quality"]["packets_srtp_auth_failed"] == 0


async def test_plain_offers_over_tls_and_plain_calls_over_udp_are_answered_with_rtp(tls_gateway, tmp_path):
    """--srtp optional: RTP/AVP gets RTP over TLS too; over UDP the same."""
    for settings in (
        client_settings(tls_gateway, tmp_path, srtp=False, seconds=1.0),
        client_settings(tls_gateway, tmp_path, srtp=False, seconds=1.0, transport="udp", uri=tls_gateway.uri),
    ):
        summary = await place_call(settings)
        assert summary["media_encryption"] == "none" and summary["packets_received"] > 20
        record = tls_gateway.call(summary["gateway_call_id"])
        assert record["media_encryption"] == "none"
        assert record["sip_transport"] == settings.transport.upper()


async def test_srtp_keys_over_udp_are_refused_with_488(tls_gateway, tmp_path):
    began = time.time()
    from sip.errors import CallFailed

    with pytest.raises(CallFailed) as failed:
        await place_call(client_settings(tls_gateway, tmp_path, transport="udp", uri=tls_gateway.uri, seconds=1.0))
    assert failed.value.status == 488
    [call] = wait_until(lambda: tls_gateway.calls_since(began), 10, "the refused call's record")
    assert call["end_reason"] == "rejected-srtp" and call["sip_transport"] == "UDP"


def test_srtp_required_refuses_plain_offers_and_any_call_without_tls(tmp_path):
    gateway = start_tls_gateway(tmp_path / "required", "--srtp", "required", name="srtp-required")
    try:

        async def calls() -> list[int]:
            from sip.errors import CallFailed

            statuses = []
            for settings in (
                client_settings(gateway, tmp_path, srtp=False, seconds=1.0),  # plain over TLS
                client_settings(gateway, tmp_path, seconds=1.0, transport="udp", uri=gateway.uri),
                client_settings(gateway, tmp_path, seconds=1.0),
            ):  # TLS + SRTP: answered
                try:
                    await place_call(settings)
                    statuses.append(200)
                except CallFailed as exc:
                    statuses.append(exc.status)
            return statuses

        assert asyncio.run(calls()) == [488, 488, 200]
    finally:
        gateway.proc.stop()


# -- replay, tamper, rekey ---------------------------------------------------------------------


async def test_replayed_and_tampered_srtp_is_dropped_and_counted_and_a_rekey_goes_on(tls_gateway, tmp_path):
    """Our own SRTP caller over TLS: it replays packets and flips bits in others (counted,
    dropped, the call goes on), then rekeys by re-INVITE and the echo continues under the
    new keys both ways."""
    peer = await UdpPeer.open("127.0.0.1")
    ua = UserAgent("127.0.0.1", 0, tls_client_context=client_context(str(tls_gateway.ca.path)))
    await ua.start()
    try:
        prefs = MediaPreferences(codecs=["PCMU"], srtp="required", srtp_suites=("AES_CM_128_HMAC_SHA1_80",))
        offer = build_offer(prefs, "127.0.0.1", peer.address[1])
        dialog = await ua.invite(tls_gateway.tls_uri, str(offer))
        media = dialog.media
        target = (media.remote_address, media.remote_port)
        call_id = dialog.answer_response.headers.get("X-Moshimoshi-Call-Id")
        tone = g711.encode("PCMU", (8000 * np.sin(np.arange(160) * 2 * np.pi * 440 / 8000)).astype(np.int16))
        sequence = [1000]

        async def talk(context: SrtpContext, seconds: float, *, replay: int = 0, tamper: int = 0) -> list[bytes]:
            sent = []
            for i in range(int(seconds * 50)):
                seq = sequence[0]
                sequence[0] += 1
                packet = context.protect(RtpPacket(0, seq, seq * 160, 0x5EC, tone).build())
                peer.send(packet, target)
                sent.append(packet)
                if i < replay:
                    peer.send(packet, target)  # the same packet again
                if replay <= i < replay + tamper:
                    forged = bytearray(context.protect(RtpPacket(0, sequence[0], 0, 0x5EC, tone).build()))
                    sequence[0] += 1
                    forged[40] ^= 0x20  # one flipped bit in the payload
                    peer.send(bytes(forged), target)
                await asyncio.sleep(0.02)
            return sent

        def echoes(context: SrtpContext) -> int:
            good = 0
            for data, _ in peer.drain():
                try:
                    if RtpPacket.parse(context.unprotect(data)).payload_type == 0:
                        good += 1
                except (SrtpError, ValueError):
                    pass
            return good

        context = SrtpContext(media.srtp)
        await talk(context, 2.0, replay=5, tamper=7)
        assert echoes(context) > 50  # the echo came back, SRTP both ways
        quality = tls_gateway.call(call_id)["quality"]
        assert quality["packets_srtp_replayed"] == 5 and quality["packets_srtp_auth_failed"] == 7, quality
        # rekey: a re-INVITE with a new key of ours; the answer brings a new key of the gateway's
        rekey = build_offer(prefs, "127.0.0.1", peer.address[1], session_id=offer.origin.session_id)
        rekey.origin.session_version = offer.origin.session_version + 1
        response = await dialog.reinvite(rekey)
        assert response.status == 200
        assert dialog.media.srtp.local_key != media.srtp.local_key
        assert dialog.media.srtp.remote_key != media.srtp.remote_key  # the gateway rekeyed too
        rekeyed = SrtpContext(dialog.media.srtp)
        await talk(rekeyed, 2.0)
        assert echoes(rekeyed) > 50
        quality = tls_gateway.call(call_id)["quality"]
        assert quality["packets_srtp_auth_failed"] == 7, quality  # nothing under the new keys failed
        assert quality["packets_received"] >= 190
        await dialog.bye()
    finally:
        await ua.stop()
        peer.close()


# -- certificates ------------------------------------------------------------------------------


@realtime_test()
async def test_a_certificate_renewed_during_a_call_leaves_the_call_alone_and_serves_the_next(tmp_path, timing):
    gateway = start_tls_gateway(tmp_path / "rotation", name="rotation")
    try:
        long_call = asyncio.create_task(
            place_call(client_settings(gateway, tmp_path, seconds=5.0, record=str(tmp_path / "long.wav")))
        )
        await asyncio.sleep(1.5)
        assert not long_call.done()
        renewed = gateway.ca.issue("gateway.test", stem="renewed")
        os.replace(renewed.cert, gateway.cert)  # as the kubelet swaps a Secret's files
        os.replace(renewed.key, gateway.key)
        context = client_context(str(gateway.ca.path))
        with (
            socket.create_connection(("127.0.0.1", gateway.tls_port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            assert serial_of(tls.getpeercert(binary_form=True)) == renewed.serial
        summary = await long_call
        assert summary["ended_by"] == "local-bye" and summary["call_seconds"] >= 4.9
        sent, heard = recorded(summary["recording"])
        assert echo_delay(sent, heard)[1] > 0.5  # the call went on over its old connection
        after = await place_call(client_settings(gateway, tmp_path, seconds=1.0, record=str(tmp_path / "next.wav")))
        assert after["media_encryption"] == "SDES-SRTP"
        assert "TLS certificate reloaded" in gateway.proc.log()
    finally:
        gateway.proc.stop()


# -- raw TLS probes against the gateway process -------------------------------------------------


def probe(port: int, context: ssl.SSLContext, server_hostname: str | None = "localhost") -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        return context.wrap_socket(raw, server_hostname=server_hostname)
    except BaseException:
        raw.close()
        raise


def test_tls_probes_unknown_ca_expired_tls10_no_sni_and_silence(tls_gateway, tmp_path):
    stranger = TestCa(tmp_path / "stranger", "stranger CA")
    with pytest.raises(ssl.SSLCertVerificationError):
        probe(tls_gateway.tls_port, client_context(str(stranger.path)))
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1
    old.set_ciphers("ALL:@SECLEVEL=0")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        probe(tls_gateway.tls_port, old, server_hostname=None)
    no_sni = client_context(str(tls_gateway.ca.path))
    no_sni.check_hostname = False
    with probe(tls_gateway.tls_port, no_sni, server_hostname=None) as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        tls.sendall(
            b"OPTIONS sip:agent@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TLS 127.0.0.1:5061;branch=z9hG4bKprobe1\r\n"
            b"From: <sip:p@127.0.0.1>;tag=1\r\nTo: <sip:agent@127.0.0.1>\r\nCall-ID: probe1\r\n"
            b"CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        )
        assert tls.recv(4096).startswith(b"SIP/2.0 200")
    with socket.create_connection(("127.0.0.1", tls_gateway.tls_port), timeout=10) as silent:
        started = time.monotonic()
        assert silent.recv(10) == b""  # closed by the gateway (handshake deadline 2 s)
        assert time.monotonic() - started < 8
    status, metrics = tls_gateway.get("/metrics", token=None)
    text = metrics if isinstance(metrics, str) else ""
    assert 'moshimoshi_sip_tls_handshakes_total{outcome="timeout"}' in text
