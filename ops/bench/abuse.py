"""Abuse: legitimate calls while the SIP port is attacked (issue 13).

A real Redis, an echo worker with 10 slots and a gateway locked down as a call center would
run it (``--sip-allow 127.0.0.1/32,127.0.0.3/32``, digest user ``bench``, the default rate
limit unless ``--rate-limit`` says otherwise) run as separate processes. Two phases of
``--seconds`` each:

1. baseline: ``--calls`` legitimate calls from 127.0.0.1 with digest credentials, each
   playing telephone-band noise and measured (answered, RTP lost both ways);
2. attack: the same calls again while a flooder sends ``--disallowed-rate`` INVITE/s from
   127.0.0.2 (outside the allow list) and ``--unauthenticated-rate`` INVITE/s from 127.0.0.3
   (inside it, without credentials), each INVITE with its own Call-ID.

It prints the legitimate calls answered (target: all) and their packet loss (target 0), the
gateway's CPU in each phase and the difference (the attack's cost), what the attackers got
back, and the Redis keys and bytes the attack added (target: none: a refused INVITE creates
no state). The last line printed is a JSON object.

    python ops/bench/abuse.py [--calls 10] [--seconds 30] [--rate-limit 16|0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from ops.bench.machine import StealMeter, cpu_seconds  # noqa: E402
from service.pool import EmbeddedRedis  # noqa: E402
from service.settings import CallSettings  # noqa: E402
from service.tools.call import place_call  # noqa: E402
from tests.support.services import start_gateway, start_worker  # noqa: E402

USER, PASSWORD = "bench", "b3nch-secret"
DISALLOWED, UNAUTHENTICATED, LEGITIMATE = "127.0.0.2", "127.0.0.3", "127.0.0.1"


def noise_wav(path: Path, seconds: float) -> Path:
    """Telephone-band noise: every packet carries audio, so a lost one shows."""
    rng = np.random.default_rng(13)
    n = int(8000 * seconds)
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / 8000)
    spectrum[(freqs < 300) | (freqs > 3400)] = 0
    audio = np.fft.irfft(spectrum, n)
    audio *= 0.2 / audio.std()
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(8000)
        wav.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    return path


# -- the flooder (a child process: its CPU is not the gateway's, nor the callers') ----------


def flood_invite(source: str, port: int, target: tuple[str, int], user: str) -> bytes:
    call_id = secrets.token_hex(12)
    body = (
        f"v=0\r\no=scan 1 1 IN IP4 {source}\r\ns=-\r\nc=IN IP4 {source}\r\nt=0 0\r\n"
        "m=audio 40000 RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n"
        "a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\n"
    )
    uri = f"sip:{user}@{target[0]}:{target[1]}"
    return (
        f"INVITE {uri} SIP/2.0\r\nVia: SIP/2.0/UDP {source}:{port};branch=z9hG4bK{secrets.token_hex(8)};rport\r\n"
        f'Max-Forwards: 70\r\nFrom: "{user}" <sip:{user}@{source}>;tag={secrets.token_hex(4)}\r\n'
        f"To: <{uri}>\r\nCall-ID: {call_id}\r\nCSeq: 1 INVITE\r\nContact: <sip:{user}@{source}:{port}>\r\n"
        f"User-Agent: Linphone/5.2\r\nContent-Type: application/sdp\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    ).encode()


def run_flooder(target_port: int, seconds: float, rates: dict[str, float]) -> dict:
    """Send INVITEs from each source at its rate for ``seconds``; count what comes back."""
    target = ("127.0.0.1", target_port)
    sockets = {}
    for source in rates:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((source, 0))
        sock.setblocking(False)
        sockets[source] = sock
    sent = dict.fromkeys(rates, 0)
    answers: dict[str, dict[str, int]] = {source: {} for source in rates}
    users = [str(n) for n in range(100, 200)]
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < seconds:
        for source, rate in rates.items():
            sock = sockets[source]
            while sent[source] < rate * elapsed:
                user = users[sent[source] % len(users)]
                sock.sendto(flood_invite(source, sock.getsockname()[1], target, user), target)
                sent[source] += 1
            while True:
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    break
                status = data.split(b" ", 2)[1].decode(errors="replace") if data.startswith(b"SIP/2.0 ") else "?"
                answers[source][status] = answers[source].get(status, 0) + 1
        time.sleep(0.001)
    time.sleep(1.0)  # late answers
    for source, sock in sockets.items():
        while True:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                break
            status = data.split(b" ", 2)[1].decode(errors="replace") if data.startswith(b"SIP/2.0 ") else "?"
            answers[source][status] = answers[source].get(status, 0) + 1
        sock.close()
    return {"sent": sent, "answers": answers}


# -- the legitimate calls -------------------------------------------------------------------


async def legitimate_calls(gateway, wav: Path, calls: int, seconds: float) -> list[dict]:
    settings = [
        CallSettings(
            uri=gateway.uri,
            play=str(wav),
            seconds=seconds,
            local_host=LEGITIMATE,
            username=USER,
            password=PASSWORD,
            rtp_port_min=40000 + 200 * i,
            rtp_port_max=40000 + 200 * i + 199,
        )
        for i in range(calls)
    ]
    results = await asyncio.gather(*(place_call(s) for s in settings), return_exceptions=True)
    out = []
    for result in results:
        if isinstance(result, BaseException):
            out.append({"answered": False, "error": repr(result)})
            continue
        status, record = gateway.get(f"/v1/calls/{result['gateway_call_id']}")
        quality = (record.get("quality") or {}) if status == 200 and isinstance(record, dict) else {}
        out.append(
            {
                "answered": True,
                "gateway_call_id": result["gateway_call_id"],
                "sent": result["packets_sent"],
                "received": result["packets_received"],
                "lost_to_caller": result["packets_lost"] + result["arrivals"].get("sequence_gaps", 0),
                "lost_to_gateway": int(quality.get("packets_lost") or 0),
                "late_at_gateway": int(quality.get("packets_late") or 0),
            }
        )
    return out


def summarise(calls: list[dict]) -> dict:
    answered = [c for c in calls if c["answered"]]
    return {
        "answered": len(answered),
        "calls": len(calls),
        "packets_sent": sum(c["sent"] for c in answered),
        "lost_to_caller": sum(c["lost_to_caller"] for c in answered),
        "lost_to_gateway": sum(c["lost_to_gateway"] for c in answered),
        "late_at_gateway": sum(c["late_at_gateway"] for c in answered),
        "errors": [c["error"] for c in calls if not c["answered"]],
    }


async def phase(gateway, wav: Path, args: argparse.Namespace, attack: bool) -> dict:
    pid = gateway.proc.pid
    flooder = None
    if attack:
        rates = {DISALLOWED: args.disallowed_rate, UNAUTHENTICATED: args.unauthenticated_rate}
        flooder = subprocess.Popen(  # noqa: ASYNC220 - a child for the whole phase
            [
                sys.executable,
                __file__,
                "--flooder",
                json.dumps({"port": gateway.sip_port, "seconds": args.seconds, "rates": rates}),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
    steal = StealMeter().start()
    cpu_start, wall_start = cpu_seconds(pid), time.monotonic()
    calls = await legitimate_calls(gateway, wav, args.calls, args.seconds)
    flood = None
    if flooder is not None:
        out, _ = await asyncio.to_thread(flooder.communicate)
        flood = json.loads(out.strip().splitlines()[-1])
    cpu, wall = cpu_seconds(pid) - cpu_start, time.monotonic() - wall_start
    return {
        "calls": summarise(calls),
        "call_ids": [c.get("gateway_call_id") for c in calls],
        "gateway_cpu_s": round(cpu, 3),
        "wall_s": round(wall, 2),
        "steal": round(steal.share(), 4),
        "flood": flood,
    }


async def pool_idle(gateway, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        status, pool = gateway.get("/v1/pool")
        if status == 200 and isinstance(pool, dict) and pool.get("slots_busy") == 0:
            return
        await asyncio.sleep(0.2)
    raise RuntimeError("the pool did not go idle after the calls")


def redis_keys(url: str) -> dict[bytes, int]:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return {key: int(client.memory_usage(key) or 0) for key in client.scan_iter(count=1000)}
    finally:
        client.close()


async def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        log_dir = Path(tmp)
        wav = noise_wav(log_dir / "noise.wav", args.seconds + 2)
        async with EmbeddedRedis() as redis_url:
            worker = start_worker(log_dir, redis_url, "abuse-worker", slots=args.calls)
            gateway = start_gateway(
                log_dir,
                redis_url,
                "--sip-allow",
                f"{LEGITIMATE}/32,{UNAUTHENTICATED}/32",
                "--sip-auth",
                f"{USER}:{PASSWORD}",
                "--sip-rate-limit",
                str(args.rate_limit),
                "--log-level",
                "warning",
            )
            try:
                await asyncio.to_thread(worker.wait_ready)
                await asyncio.to_thread(gateway.wait_ready)
                print(
                    f"gateway pid {gateway.proc.pid}; rate limit "
                    f"{'off' if args.rate_limit == 0 else f'{args.rate_limit} per 2 s, ban 300 s'}"
                )
                baseline = await phase(gateway, wav, args, attack=False)
                print(
                    f"baseline: {baseline['calls']['answered']}/{args.calls} answered, "
                    f"gateway CPU {baseline['gateway_cpu_s']:.2f} s in {baseline['wall_s']:.1f} s"
                )
                await pool_idle(gateway)  # the calls' leases released: only lasting keys remain
                keys_before = await asyncio.to_thread(redis_keys, redis_url)
                attacked = await phase(gateway, wav, args, attack=True)
                await pool_idle(gateway)
                keys_after = await asyncio.to_thread(redis_keys, redis_url)
                refused_metrics = gateway_metrics(gateway)
            finally:
                gateway.proc.stop()
                worker.proc.stop()
    legit_ids = {i for i in attacked["call_ids"] if i}
    added = {k: v for k, v in keys_after.items() if k not in keys_before}
    attack_keys = {k: v for k, v in added.items() if not any(call_id.encode() in k for call_id in legit_ids)}
    flood = attacked["flood"]
    invites = sum(flood["sent"].values())
    attack_cpu = attacked["gateway_cpu_s"] - baseline["gateway_cpu_s"]
    calls = attacked["calls"]
    result = {
        "benchmark": "abuse",
        "seconds": args.seconds,
        "rate_limit": args.rate_limit,
        "legitimate_answered": calls["answered"],
        "legitimate_calls": calls["calls"],
        "legitimate_packets_sent": calls["packets_sent"],
        "legitimate_lost": calls["lost_to_caller"] + calls["lost_to_gateway"],
        "legitimate_lost_to_caller": calls["lost_to_caller"],
        "legitimate_lost_to_gateway": calls["lost_to_gateway"],
        "legitimate_late_at_gateway": calls["late_at_gateway"],
        "errors": calls["errors"],
        "baseline_answered": baseline["calls"]["answered"],
        "baseline_lost": baseline["calls"]["lost_to_caller"] + baseline["calls"]["lost_to_gateway"],
        "attack_invites": flood["sent"],
        "attack_answers": flood["answers"],
        "gateway_cpu_baseline_s": baseline["gateway_cpu_s"],
        "gateway_cpu_attacked_s": attacked["gateway_cpu_s"],
        "gateway_cpu_attack_s": round(attack_cpu, 3),
        "gateway_cpu_per_attack_invite_us": round(1e6 * attack_cpu / max(invites, 1), 1),
        "steal": [baseline["steal"], attacked["steal"]],
        "redis_keys_added_by_attack": len(attack_keys),
        "redis_bytes_added_by_attack": sum(attack_keys.values()),
        "redis_attack_keys": sorted(k.decode(errors="replace") for k in attack_keys),
        "redis_keys_added_by_legitimate_calls": len(added) - len(attack_keys),
        "refused": refused_metrics,
    }
    result["targets_met"] = bool(
        result["legitimate_answered"] == result["legitimate_calls"]
        and result["legitimate_lost"] == 0
        and result["redis_keys_added_by_attack"] == 0
    )
    print(
        f"\nunder attack ({invites} INVITEs in {args.seconds:g} s: {flood['sent'][DISALLOWED]} from a disallowed "
        f"address, {flood['sent'][UNAUTHENTICATED]} from an allowed one without credentials):"
    )
    print(
        f"  legitimate calls answered: {calls['answered']}/{calls['calls']} (target {calls['calls']}/{calls['calls']})"
    )
    print(
        f"  their RTP lost: {result['legitimate_lost']} of {calls['packets_sent']} sent each way "
        f"({calls['lost_to_caller']} on the way to the callers, {calls['lost_to_gateway']} to the gateway; "
        f"{calls['late_at_gateway']} late) (target 0)"
    )
    print(
        f"  gateway CPU: {baseline['gateway_cpu_s']:.2f} s without the attack, {attacked['gateway_cpu_s']:.2f} s "
        f"with it: {attack_cpu:.2f} s for the attack, {result['gateway_cpu_per_attack_invite_us']:.0f} µs "
        f"per attacking INVITE (steal {baseline['steal']:.1%} / {attacked['steal']:.1%})"
    )
    print(f"  the attackers got back: {flood['answers']}")
    print(
        f"  Redis keys added by the attack: {len(attack_keys)} ({sum(attack_keys.values())} bytes) (target 0)"
        f"{' ' + str(result['redis_attack_keys']) if attack_keys else ''}; "
        f"by the legitimate calls: {result['redis_keys_added_by_legitimate_calls']}"
    )
    print(f"  refusals counted by the gateway: {refused_metrics}")
    print(f"targets {'met' if result['targets_met'] else 'NOT met'}")
    return result


def gateway_metrics(gateway) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(gateway.api + "/metrics", timeout=5) as response:
        text = response.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("moshimoshi_sip_requests_refused_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            out[reason] = float(line.split()[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--disallowed-rate", type=float, default=200.0, help="INVITE/s from outside the allow list")
    parser.add_argument(
        "--unauthenticated-rate", type=float, default=50.0, help="INVITE/s from an allowed address without credentials"
    )
    parser.add_argument("--rate-limit", type=int, default=16, help="the gateway's --sip-rate-limit (0: off)")
    parser.add_argument("--flooder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flooder:
        spec = json.loads(args.flooder)
        print(json.dumps(run_flooder(spec["port"], spec["seconds"], spec["rates"])))
        return
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
