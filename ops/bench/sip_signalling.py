"""Benchmark of the SIP signalling stack (sip/): parsing, SDP offer/answer and call setup.

What it measures, on this machine, in one process and one event loop:
  1. parse + validate one INVITE with SDP, and serialise it back (microseconds each);
  2. parse an SDP offer and answer it with sip.sdp.answer_offer (microseconds);
  3. N simultaneous calls, our UAC to our UAS over UDP loopback: INVITE/100/200/ACK for
     all of them at once, then BYE/200. Reports calls per second and CPU time per call
     (both sides of every call run in this process, so one side costs about half), and
     the memory the live calls hold.

Run: python ops/bench/sip_signalling.py [--calls 500]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import timeit
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sip.message import parse_message  # noqa: E402
from sip.sdp import MediaPreferences, SessionDescription, answer_offer, build_offer  # noqa: E402
from sip.ua import IncomingCall, UserAgent  # noqa: E402

OFFER = str(build_offer(MediaPreferences(), "192.0.2.10", 30000))
INVITE = (
    "INVITE sip:agent@gateway.example.com SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK776asdhds;rport\r\n"
    "Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKnashds8;received=192.0.2.1\r\n"
    "Max-Forwards: 70\r\nTo: <sip:agent@gateway.example.com>\r\n"
    'From: "Caller" <sip:0312345678@pbx.example.com>;tag=1928301774\r\n'
    "Call-ID: a84b4c76e66710@pbx.example.com\r\nCSeq: 314159 INVITE\r\n"
    "Contact: <sip:0312345678@192.0.2.10:5060>\r\nAllow: INVITE, ACK, BYE, CANCEL, OPTIONS, UPDATE\r\n"
    "Supported: timer\r\nSession-Expires: 1800\r\nContent-Type: application/sdp\r\n"
    f"Content-Length: {len(OFFER)}\r\n\r\n{OFFER}"
).encode()


def micro(stmt, number: int) -> float:
    """Best of 5 runs, in microseconds per call."""
    return min(timeit.repeat(stmt, number=number, repeat=5)) / number * 1e6


async def calls(count: int) -> dict[str, float]:
    prefs = MediaPreferences()

    async def answer(call: IncomingCall) -> None:
        sdp, _ = answer_offer(call.offer, prefs, "127.0.0.1", 40000)
        await call.accept(str(sdp))

    uas = UserAgent("127.0.0.1", 0, on_invite=answer)
    uac = UserAgent("127.0.0.1", 0)
    await uas.start()
    await uac.start()
    try:
        offers = [str(build_offer(prefs, "127.0.0.1", 30000 + 2 * i)) for i in range(count)]
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        wall, cpu = time.perf_counter(), time.process_time()
        dialogs = await asyncio.gather(*[uac.invite(f"sip:n{i}@127.0.0.1:{uas.port}", offers[i]) for i in range(count)])
        setup_wall, setup_cpu = time.perf_counter() - wall, time.process_time() - cpu
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        held = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
        assert uas.counts()["dialogs"] == count and uac.counts()["dialogs"] == count
        wall, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*[d.bye() for d in dialogs])
        bye_wall, bye_cpu = time.perf_counter() - wall, time.process_time() - cpu
        return {
            "setup_s": setup_wall,
            "setup_cpu_ms": setup_cpu / count * 1e3,
            "bye_s": bye_wall,
            "bye_cpu_ms": bye_cpu / count * 1e3,
            "kib_per_call": held / count / 1024,
            "send_errors": uas.transport.counters.send_errors + uac.transport.counters.send_errors,
        }
    finally:
        await uac.stop()
        await uas.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500, help="simultaneous calls (default 500)")
    args = parser.parse_args()

    message = parse_message(INVITE)
    offer = SessionDescription.parse(message.body)
    print(
        f"INVITE of {len(INVITE)} bytes: parse+validate {micro(lambda: parse_message(INVITE), 2000):.1f} µs, "
        f"serialise {micro(message.to_bytes, 2000):.1f} µs"
    )
    print(
        f"SDP offer: parse {micro(lambda: SessionDescription.parse(message.body), 2000):.1f} µs, "
        f"answer_offer {micro(lambda: answer_offer(offer, MediaPreferences(), '192.0.2.1', 4000), 2000):.1f} µs"
    )
    result = asyncio.run(calls(args.calls))
    print(f"{args.calls} simultaneous calls over UDP loopback (UAC and UAS both in this process, default timers):")
    print(
        f"  setup INVITE..ACK: {result['setup_s']:.2f} s = {args.calls / result['setup_s']:.0f} calls/s, "
        f"{result['setup_cpu_ms']:.2f} ms CPU per call (both sides, tracemalloc on)"
    )
    print(f"  teardown BYE/200:  {result['bye_s']:.2f} s, {result['bye_cpu_ms']:.2f} ms CPU per call")
    print(f"  memory held while the calls are up: {result['kib_per_call']:.1f} KiB per call (both sides)")
    print(f"  send errors: {result['send_errors']}")


if __name__ == "__main__":
    main()
