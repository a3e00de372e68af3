"""Edge capacity: how many concurrent echo calls one gateway carries on ONE core.

The gateway runs as its own process pinned to one CPU core, with the in-gateway loopback
(``--worker-url echo:``: every call goes through SIP, RTP, the jitter buffer, G.711, the
8↔24 kHz resamplers, 80 ms framing and the egress pacer; only the worker hop is left out).
This script, pinned to another core, places N calls with the project's own SIP stack,
sends 50 RTP packets a second on each and counts what comes back. For each N it measures,
over a steady window:

* the gateway's egress pacing error (how late each packet left against its schedule, from
  the gateway's moshimoshi_rtp_pacer_lateness_seconds histogram);
* audio lost inbound: packets lost on the way in or too late for their playout deadline
  (the gateway's counters; a late packet is concealed, so the model never hears it);
* packets lost outbound (sequence gaps seen here), and egress underruns: ticks that had no
  model audio ready while the model was talking, so the caller heard 20 ms of silence;
* the gateway's CPU use (from /proc), packets per second, and CPU per call;
* the gateway's run-queue wait ("gw wait": time it was runnable but another process, or the
  hypervisor, had its core) and the core's steal time: on a virtual machine the hypervisor may stop the core
  for milliseconds at a time, which shows as lateness that no code change can remove;
* the load generator's own CPU use and how late its sending ran ("gen lag", the worst
  phase): a generator that falls behind sends in bursts, and packets then reach the
  gateway late through no fault of its own.

A step passes when the pacing p99 is under 2 ms, no packet was lost either way (a packet
too late for its playout deadline counts as lost: an overloaded gateway may still send on
time while it falls behind on what it receives), and under 0.1 % of egress ticks
underran. The underrun share is the pacer's latency trade-off: its cushion covers the
usual spread of frame arrivals, not every scheduling hiccup. Target:
at least 200 concurrent calls per core. The last line printed is a JSON object.

``--srtp``: each step runs twice on the same gateway, first N calls with plain RTP, then
(after hanging those up) N calls with SRTP (SDES, AES_CM_128_HMAC_SHA1_80, SRTCP too), and
prints the gateway's CPU per call-second of both and their ratio: what encryption costs.
The SRTP keys travel over UDP here (the gateway runs with --srtp-allow-plaintext-keys):
this measures media, and TLS signalling has its own benchmark (ops/bench/tls_handshakes.py).

``--gateway-checkout DIR``: the gateway runs the code of another checkout (say, a
``git worktree`` of the commit before a change) while the load generator stays this one's:
a before/after ladder that measures the gateway alone, run back to back.

    python ops/bench/edge_capacity.py [--steps 50,100,150,200,250,300] [--hold 10] [--srtp]
                                      [--gateway-checkout DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from ops.bench.machine import StealMeter, cpu_seconds, runqueue_wait_seconds  # noqa: E402
from ops.bench.pinned_gateway import split_cores, start_gateway  # noqa: E402
from sip import g711  # noqa: E402
from sip.rtp import RtpPacket  # noqa: E402
from sip.rtpsession import PortAllocator, RtpSession  # noqa: E402
from sip.sdp import MediaPreferences, build_offer  # noqa: E402
from sip.ua import UserAgent  # noqa: E402
from tests.support.procs import free_port, python_env, wait_for_tcp  # noqa: E402

TARGET_CALLS = 200
PACING_LIMIT_S = 0.002
UNDERRUN_LIMIT = 0.001
STEAL_NOTICE = 0.01  # a step whose core was stolen more than this says so


def scrape(url: str) -> dict[str, dict]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out: dict[str, dict] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name + (json.dumps(sample.labels, sort_keys=True) if sample.labels else "")
            out[key] = sample.value
    return out


def wait_ready(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if urllib.request.urlopen(url, timeout=2).status == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not ready within {timeout:.0f} s")
        time.sleep(0.1)


def verdict(ok: bool, steal: float) -> str:
    if ok:
        return "ok"
    return "FAIL (core stolen: rerun)" if steal > STEAL_NOTICE else "FAIL"


def counter_delta(before: dict, after: dict, name: str) -> int:
    return int(after.get(name, 0) - before.get(name, 0))


def bucket_quantile(before: dict, after: dict, name: str, q: float) -> tuple[float, float, int]:
    """(q-quantile upper bound, fraction within PACING_LIMIT_S, count) of a histogram's delta."""
    buckets = []
    for key, value in after.items():
        if key.startswith(name + "_bucket"):
            le = json.loads(key[len(name + "_bucket") :])["le"]
            bound = float("inf") if le == "+Inf" else float(le)
            buckets.append((bound, value - before.get(key, 0.0)))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0
    if not total:
        return 0.0, 1.0, 0
    quantile = next(bound for bound, count in buckets if count >= q * total)
    within = next((count for bound, count in buckets if bound >= PACING_LIMIT_S), total) / total
    return quantile, within, int(total)


class LoadCall:
    """One benchmark call: its dialog, RTP session and what came back."""

    def __init__(self, rtp: RtpSession) -> None:
        self.rtp = rtp
        self.dialog = None
        self.received = 0
        self.gaps = 0
        self._last_seq: int | None = None
        rtp.route(0, self.on_packet)

    def on_packet(self, packet: RtpPacket, arrival: float) -> None:
        self.received += 1
        if self._last_seq is not None and (packet.sequence - self._last_seq) & 0xFFFF != 1:
            self.gaps += 1
        self._last_seq = packet.sequence


async def place(ua: UserAgent, ports: PortAllocator, uri: str, srtp: bool = False) -> LoadCall:
    rtp = await RtpSession.open(ports, host="127.0.0.1", rtcp_interval=5.0)
    call = LoadCall(rtp)
    prefs = MediaPreferences(
        codecs=["PCMU"], srtp="required" if srtp else "off", srtp_suites=("AES_CM_128_HMAC_SHA1_80",)
    )
    offer = build_offer(prefs, "127.0.0.1", rtp.local_port)
    call.dialog = await ua.invite(uri, str(offer), timeout=20)
    media = call.dialog.media
    if srtp and media.srtp is None:
        raise RuntimeError("the gateway answered without SRTP")
    rtp.set_srtp(media.srtp)
    rtp.update_remote(media.remote_address, media.remote_port, media.remote_rtcp_port)
    rtp.trust_ip("127.0.0.1")  # the gateway we called: media may go there at once
    return call


async def hang_up(calls: list[LoadCall]) -> None:
    """BYE every call (the gateway frees them), then close their RTP."""
    for start in range(0, len(calls), 50):
        await asyncio.gather(*(c.dialog.bye() for c in calls[start : start + 50]), return_exceptions=True)
    for call in calls:
        call.rtp.close(send_bye=False)
    calls.clear()


class SendLag:
    """How late the load generator's own sending ran (its phases against their schedule): a
    generator that falls behind sends in bursts, and the gateway then sees late packets that
    are not its fault."""

    def __init__(self) -> None:
        self.worst = 0.0
        self.over_5ms = 0

    def reset(self) -> None:
        self.worst = 0.0
        self.over_5ms = 0

    def add(self, lag: float) -> None:
        self.worst = max(self.worst, lag)
        self.over_5ms += lag > 0.005


async def send_loop(calls: list[LoadCall], stop: asyncio.Event, lag: SendLag) -> None:
    """50 packets/s on every call, a tone so the echo carries audio. Calls are spread over
    20 phases 1 ms apart, as independent callers would be, rather than sent in one burst."""
    import numpy as np

    t = np.arange(160) / 8000
    payload = g711.encode("PCMU", (3000 * np.sin(2 * np.pi * 400 * t)).astype(np.int16))
    loop = asyncio.get_running_loop()
    clock = time.monotonic
    tick = loop.time()
    phase = 0
    while not stop.is_set():
        lag.add(clock() - tick)
        for call in calls[phase::20]:
            call.rtp.send(payload)
        phase = (phase + 1) % 20
        tick += 0.001
        await asyncio.sleep(max(0.0, tick - loop.time()))


async def run(args: argparse.Namespace) -> dict:
    sip_port, http_port = free_port(), free_port()
    gateway_core, load_cores = split_cores()
    gateway_args = [
        "--rtp-port-min",
        "20000",
        "--rtp-port-max",
        "29999",
        "--log-level",
        "warning",
        "--rtp-timeout-seconds",
        "0",
        "--sip-rate-limit",
        "0",
    ]  # hundreds of calls from one address
    if args.srtp:
        gateway_args += ["--srtp", "optional", "--srtp-allow-plaintext-keys"]
    checkout = args.gateway_checkout or REPO
    gateway = start_gateway(
        gateway_core, sip_port, http_port, *gateway_args, env=python_env(PYTHONPATH=str(checkout)), cwd=checkout
    )
    metrics_url = f"http://127.0.0.1:{http_port}/metrics"
    uri = f"sip:agent@127.0.0.1:{sip_port}"
    results = []
    calls: list[LoadCall] = []
    ua = UserAgent("127.0.0.1", 0, user_agent="edge-bench", session_expires=0)
    ports = PortAllocator(40000, 49998)
    stop = asyncio.Event()
    sender: asyncio.Task | None = None
    try:
        await asyncio.to_thread(wait_for_tcp, "127.0.0.1", http_port, 30.0, gateway)
        await asyncio.to_thread(wait_ready, f"http://127.0.0.1:{http_port}/readyz")  # else the first INVITEs get 503
        await ua.start()
        lag = SendLag()
        sender = asyncio.create_task(send_loop(calls, stop, lag))
        print(f"gateway pinned to core {gateway_core}, load generator on {load_cores}; {args.hold:.0f} s per step\n")
        print(
            f"{'calls':>6} {'media':>5} {'gw CPU':>7} {'CPU/call':>9} {'pkt/s':>7} {'pacing p50':>11} {'p99':>7} "
            f"{'<=2ms':>7} {'lost in':>8} {'lost out':>9} {'underruns':>10} {'steal':>6} {'gw wait':>8} {'gen CPU':>8} "
            f"{'gen lag':>8}  verdict"
        )
        plan = [(n, media) for n in args.steps for media in (("rtp", "srtp") if args.srtp else ("rtp",))]
        for target, media in plan:
            if args.srtp and calls:
                await hang_up(calls)  # each row starts from zero calls of its own kind
                await asyncio.sleep(1.0)
            while len(calls) < target:
                batch = min(25, target - len(calls))
                calls.extend(await asyncio.gather(*(place(ua, ports, uri, media == "srtp") for _ in range(batch))))
            await asyncio.sleep(args.settle)
            before = await asyncio.to_thread(scrape, metrics_url)
            cpu_before = cpu_seconds(gateway.pid)
            wait_before = runqueue_wait_seconds(gateway.pid)
            stolen = StealMeter(gateway_core).start()
            own_cpu_before = cpu_seconds(os.getpid())
            lag.reset()
            received_before = [c.received for c in calls]
            gaps_before = sum(c.gaps for c in calls)
            started = time.monotonic()
            await asyncio.sleep(args.hold)
            elapsed = time.monotonic() - started
            cpu = (cpu_seconds(gateway.pid) - cpu_before) / elapsed
            steal = stolen.share()
            waited = (runqueue_wait_seconds(gateway.pid) - wait_before) / elapsed
            generator_cpu = (cpu_seconds(os.getpid()) - own_cpu_before) / elapsed
            after = await asyncio.to_thread(scrape, metrics_url)
            p50, _, _ = bucket_quantile(before, after, "moshimoshi_rtp_pacer_lateness_seconds", 0.50)
            p99, within, _ = bucket_quantile(before, after, "moshimoshi_rtp_pacer_lateness_seconds", 0.99)
            lost_in = counter_delta(before, after, "moshimoshi_rtp_packets_lost_total") + counter_delta(
                before, after, "moshimoshi_rtp_packets_late_total"
            )
            lost_out = sum(c.gaps for c in calls) - gaps_before
            sent = counter_delta(before, after, "moshimoshi_rtp_packets_sent_total")
            underruns = counter_delta(before, after, "moshimoshi_egress_underruns_total") / max(1, sent)
            rx = sum(c.received - b for c, b in zip(calls, received_before, strict=True)) / elapsed
            pps = (
                after.get("moshimoshi_rtp_packets_received_total", 0)
                - before.get("moshimoshi_rtp_packets_received_total", 0)
            ) / elapsed + rx
            ok = within >= 0.99 and lost_in == 0 and lost_out == 0 and underruns < UNDERRUN_LIMIT
            row = {
                "calls": target,
                "media": media,
                "gateway_cpu": round(cpu, 3),
                "cpu_ms_per_call_per_s": round(1000 * cpu / target, 3),
                "packets_per_second": round(pps),
                "pacing_p50_le_s": p50,
                "pacing_p99_le_s": p99,
                "pacing_within_2ms": round(within, 5),
                "lost_in": int(lost_in),
                "lost_out": int(lost_out),
                "underrun_share": round(underruns, 6),
                "core_steal": round(steal, 3),
                "gateway_runqueue_wait": round(waited, 4),
                "generator_cpu": round(generator_cpu, 3),
                "generator_lag_max_s": round(lag.worst, 4),
                "generator_lag_over_5ms": lag.over_5ms,
                "ok": ok,
            }
            results.append(row)
            print(
                f"{target:>6} {media:>5} {cpu * 100:>6.0f}% {1000 * cpu / target:>7.2f}ms {pps:>7.0f} "
                f"{'≤' + format(p50 * 1000, '.2g') + 'ms':>11} {'≤' + format(p99 * 1000, '.2g') + 'ms':>7} "
                f"{within * 100:>6.2f}% {int(lost_in):>8} {lost_out:>9} {underruns * 100:>9.3f}% {steal * 100:>5.1f}% {waited * 100:>7.2f}% "
                f"{generator_cpu * 100:>7.0f}% {lag.worst * 1000:>6.1f}ms  {verdict(ok, steal)}"
            )
            if media == "srtp":
                plain = next(r for r in results if r["calls"] == target and r["media"] == "rtp")
                row["srtp_cpu_ratio"] = round(cpu / plain["gateway_cpu"], 3) if plain["gateway_cpu"] else None
                print(f"{'':>6} SRTP/RTP CPU per call-second at {target} calls: {row['srtp_cpu_ratio']}")
            if cpu > 0.97 and not ok and (not args.srtp or media == "srtp"):
                break
    finally:
        stop.set()
        if sender is not None:
            await asyncio.gather(sender, return_exceptions=True)
        for call in calls:
            call.rtp.close(send_bye=False)
        await ua.stop()
        gateway.send_signal(signal.SIGINT)  # SIGTERM would drain for the grace period
        await asyncio.to_thread(gateway.wait, 20)
    summary: dict = {
        "benchmark": "edge_capacity",
        "target": TARGET_CALLS,
        "gateway_checkout": str(checkout),
        "steps": results,
    }
    for media in ("rtp", "srtp") if args.srtp else ("rtp",):
        passing = [r for r in results if r["ok"] and r["media"] == media]
        best = max(passing, key=lambda r: r["calls"]) if passing else {"calls": 0, "gateway_cpu": 0.0}
        print(
            f"\n{media.upper()}: largest load meeting pacing p99 < 2 ms with no lost packet: {best['calls']} "
            f"calls on one core at {best['gateway_cpu'] * 100:.0f}% CPU (target ≥ {TARGET_CALLS}: "
            f"{'met' if best['calls'] >= TARGET_CALLS else 'NOT met'})"
        )
        key = "max_calls_one_core" if media == "rtp" else "max_srtp_calls_one_core"
        summary[key] = best["calls"]
    summary["target_met"] = summary["max_calls_one_core"] >= TARGET_CALLS
    if args.srtp:
        ratios = [r["srtp_cpu_ratio"] for r in results if r.get("srtp_cpu_ratio")]
        summary["srtp_cpu_ratio_median"] = sorted(ratios)[len(ratios) // 2] if ratios else None
        print(f"SRTP/RTP gateway CPU per call-second, per step: {ratios} (median {summary['srtp_cpu_ratio_median']})")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="50,100,150,200,250,300", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--hold", type=float, default=10.0, help="seconds measured per step")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds after adding calls")
    parser.add_argument(
        "--srtp", action="store_true", help="run each step with plain RTP and again with SRTP, and compare the CPU"
    )
    parser.add_argument(
        "--gateway-checkout",
        metavar="DIR",
        type=lambda s: Path(s).resolve(),
        help="run the gateway from this checkout (default: this one), the load generator from this one",
    )
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
