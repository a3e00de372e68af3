"""SIP over TLS: how many TLS handshakes one gateway core sustains.

A real ``moshimoshi gateway`` (``--worker-url echo:``) runs pinned to one CPU core with SIP
over TLS on a certificate made here; this script, pinned to the other cores, keeps
``--concurrency`` clients connecting: each opens a TCP connection, completes a full TLS
handshake (no session resumption: every one costs the server its key exchange and
signature), optionally sends an OPTIONS and reads the 200, and closes. For each
certificate type (ECDSA P-256, RSA 2048) it reports over ``--seconds``:

* handshakes completed per second, and the gateway's CPU share meanwhile;
* handshakes per gateway core-second (rate / CPU share): what one core can take when the
  load generator, not the gateway, is the limit (it often is: verifying costs the client
  about what signing costs the server);
* failed handshakes (should be none).

    python ops/bench/tls_handshakes.py [--seconds 10] [--concurrency 32] [--options]

The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import ssl
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from ops.bench.machine import StealMeter, cpu_seconds  # noqa: E402
from ops.bench.pinned_gateway import split_cores, start_gateway  # noqa: E402
from sip.tls import client_context  # noqa: E402
from tests.support.certs import TestCa  # noqa: E402
from tests.support.procs import free_port, python_env, wait_for_tcp  # noqa: E402

OPTIONS = (
    "OPTIONS sip:agent@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TLS 127.0.0.1:5061;branch=z9hG4bK{n}\r\n"
    "From: <sip:bench@127.0.0.1>;tag={n}\r\nTo: <sip:agent@127.0.0.1>\r\nCall-ID: bench-{n}\r\n"
    "CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
)


async def client(port: int, context: ssl.SSLContext, stop: asyncio.Event, counts: dict, options: bool) -> None:
    while not stop.is_set():
        n = counts["attempts"] = counts["attempts"] + 1
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=context, server_hostname="localhost", ssl_handshake_timeout=10
            )
            if options:
                writer.write(OPTIONS.format(n=n).encode())
                line = await asyncio.wait_for(reader.readline(), 10)
                if not line.startswith(b"SIP/2.0 200"):
                    raise ConnectionError(f"answer {line[:40]!r}")
            counts["ok"] += 1
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, ssl.SSLError):
                pass
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            counts["failed"] += 1
            counts["last_error"] = repr(exc)[:200]


async def measure(kind: str, args: argparse.Namespace, gateway_core: int, folder: Path) -> dict:
    ca = TestCa(folder / kind)
    issued = ca.issue("bench.gateway", stem=kind, rsa_key=kind == "rsa2048")
    sip_port, http_port, tls_port = free_port(), free_port(), free_port()
    gateway = start_gateway(
        gateway_core,
        sip_port,
        http_port,
        "--sip-tls-port",
        str(tls_port),
        "--sip-tls-cert",
        str(issued.cert),
        "--sip-tls-key",
        str(issued.key),
        "--log-level",
        "warning",
        # every client connects from 127.0.0.1: no per-source limits for this load
        "--sip-rate-limit",
        "0",
        "--sip-tcp-max-per-source",
        "1000000",
        env=python_env(MOSHIMOSHI_API_TOKENS="bench-read-token-0123:read"),
        cwd=REPO,
    )
    try:
        await asyncio.to_thread(wait_for_tcp, "127.0.0.1", http_port, 30.0, gateway)
        context = client_context(str(ca.path))
        counts = {"attempts": 0, "ok": 0, "failed": 0, "last_error": ""}
        stop = asyncio.Event()
        warm = [
            asyncio.create_task(client(tls_port, context, stop, counts, args.options)) for _ in range(args.concurrency)
        ]
        await asyncio.sleep(1.0)  # warm up: connections ramp, caches fill
        ok_before, failed_before = counts["ok"], counts["failed"]
        cpu_before = cpu_seconds(gateway.pid)
        stolen = StealMeter(gateway_core).start()
        started = time.monotonic()
        await asyncio.sleep(args.seconds)
        elapsed = time.monotonic() - started
        cpu = (cpu_seconds(gateway.pid) - cpu_before) / elapsed
        done, failed = counts["ok"] - ok_before, counts["failed"] - failed_before
        steal = stolen.share()
        stop.set()
        await asyncio.gather(*warm, return_exceptions=True)
    finally:
        gateway.send_signal(signal.SIGINT)
        await asyncio.to_thread(gateway.wait, 20)
    rate = done / elapsed
    row = {
        "certificate": kind,
        "handshakes_per_s": round(rate, 1),
        "gateway_cpu": round(cpu, 3),
        "handshakes_per_core_s": round(rate / cpu, 1) if cpu > 0 else None,
        "cpu_ms_per_handshake": round(1000 * cpu / rate, 3) if rate else None,
        "failed": failed,
        "core_steal": round(steal, 3),
    }
    if failed:
        row["last_error"] = counts["last_error"]
    return row


async def run(args: argparse.Namespace) -> dict:
    gateway_core, load_cores = split_cores()
    print(
        f"gateway pinned to core {gateway_core}, clients on {load_cores}; {args.concurrency} concurrent "
        f"clients, {args.seconds:.0f} s per certificate, full handshakes{' + OPTIONS' if args.options else ''}\n"
    )
    print(
        f"{'certificate':>12} {'hs/s':>8} {'gw CPU':>7} {'hs per core-s':>14} {'CPU/hs':>9} {'failed':>7} {'steal':>6}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for kind in ("ecdsa-p256", "rsa2048"):
            row = await measure(kind, args, gateway_core, Path(folder))
            rows.append(row)
            per_core = row["handshakes_per_core_s"]
            print(
                f"{kind:>12} {row['handshakes_per_s']:>8.0f} {row['gateway_cpu'] * 100:>6.0f}% "
                f"{per_core if per_core is not None else '-':>14} {row['cpu_ms_per_handshake'] or 0:>7.2f}ms "
                f"{row['failed']:>7} {row['core_steal'] * 100:>5.1f}%"
            )
    print(
        "\nhandshakes per gateway core-second = handshakes/s ÷ the gateway's CPU share (the core is "
        "not saturated when the clients are the limit)"
    )
    return {"benchmark": "tls_handshakes", "options": args.options, "concurrency": args.concurrency, "results": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per certificate type")
    parser.add_argument("--concurrency", type=int, default=32, help="clients connecting at once")
    parser.add_argument("--options", action="store_true", help="send an OPTIONS on each connection and read the 200")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
