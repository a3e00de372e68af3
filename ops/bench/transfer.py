"""Transfer to a human: from the transfer request to the caller hearing the person, and the
silence the caller hears meanwhile, by REFER and bridged.

``moshimoshi serve --model echo`` (embedded Redis, an echo worker: the "AI" plays the
caller's own 440 Hz tone back) and a person: baresip answering by itself and playing a
1 kHz tone in bursts (200 ms on, 300 ms off). Each round calls the gateway, lets the AI talk for a while, asks
``POST /v1/calls/{id}/transfer`` and watches, on the loopback wire (a raw capture of the
RTP going to the caller), when the first packet carrying the person's tone reaches the
caller:

* **bridge**: the caller is ``moshimoshi call``'s engine (it has no REFER in its Allow, so
  the gateway bridges): request → the gateway calls the person → answer → the person's
  audio relayed through the gateway. Also measured from the caller's own recording (its
  jitter buffer included), and, per burst of the person's tone, how long it takes through
  the relay (its first packet out of the person to its first packet into the caller).
* **refer**: the caller is baresip (it takes the REFER and calls the person itself):
  request → REFER → 202 → baresip's INVITE to the person → answer → NOTIFY 200 → BYE.

"Silence" is the longest stretch, between the request and the person's first packet, in
which nothing audible reached the caller (the AI's last words to the person's first). The
gateway and both peers share this machine's two cores. The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import typing as tp
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from service.settings import CallSettings  # noqa: E402
from service.tools.call import place_call  # noqa: E402
from sip import g711  # noqa: E402
from sip.rtp import RtpPacket  # noqa: E402
from tests.support.baresip import write_baresip_config  # noqa: E402
from tests.support.person import Person, first_heard, heard, tone_wav  # noqa: E402
from tests.support.procs import free_port_pair  # noqa: E402
from tests.support.services import ADMIN_TOKEN, Gateway, start_serve, wait_until  # noqa: E402
from tests.support.sniff import Datagram, LoopbackSniffer, can_sniff  # noqa: E402

PERSON_HZ, AI_HZ = 1000.0, 440.0
PERSON_PORTS = (36000, 36999)
CALLER_PORTS = (38000, 38999)  # both callers' RTP: the capture's filter
TALK_BEFORE_S = 1.5  # the AI talks this long before the transfer is asked for
AFTER_S = 1.5  # the person is heard this long before the caller hangs up
LOUD = 300.0  # RMS on the int16 scale: anything quieter is silence


def transfer(gateway: Gateway, call_id: str, target: str, mode: str) -> tuple[int, dict, float]:
    request = urllib.request.Request(
        gateway.api + f"/v1/calls/{call_id}/transfer",
        method="POST",
        data=json.dumps({"target": target, "mode": mode}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    asked = time.time()
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read()), asked
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}"), asked


def active_call(gateway: Gateway, since: float) -> dict:
    def found() -> dict | None:
        _, body = gateway.get("/v1/calls?state=active")
        calls = [c for c in body["calls"] if c["started_at"] >= since and c["state"] == "active"]
        return calls[0] if calls else None

    return wait_until(found, 15, "the call answered", gateway.proc, interval=0.05)


def to_caller(datagrams: list[Datagram], since: float) -> list[tuple[float, float, float]]:
    """(arrival, RMS, share of the person's tone) of each RTP packet to a caller port."""
    return decoded(datagrams, since, lambda d: CALLER_PORTS[0] <= d.destination[1] <= CALLER_PORTS[1])


def decoded(
    datagrams: list[Datagram], since: float, chosen: tp.Callable[[Datagram], bool]
) -> list[tuple[float, float, float]]:
    """(arrival, RMS, share of the person's tone) of the chosen PCMU packets, in time order."""
    out = []
    for datagram in list(datagrams):
        if datagram.at < since or not chosen(datagram):
            continue
        try:
            packet = RtpPacket.parse(datagram.payload)
        except ValueError:
            continue
        if packet.payload_type != 0 or not packet.payload:
            continue
        pcm = g711.decode("PCMU", packet.payload).astype(np.float64)
        rms = float(np.sqrt((pcm**2).mean()))
        spectrum = np.abs(np.fft.rfft(pcm * np.hanning(len(pcm)))) ** 2
        freqs = np.fft.rfftfreq(len(pcm), 1 / 8000)
        band = (freqs > PERSON_HZ - 60) & (freqs < PERSON_HZ + 60)
        share = float(spectrum[band].sum() / max(spectrum.sum(), 1e-9))
        out.append((datagram.at, rms, share))
    out.sort()
    return out


def onsets(packets: list[tuple[float, float, float]]) -> list[float]:
    """When the person's tone bursts start: a loud tone packet after at least 60 ms without."""
    out, quiet_since = [], None
    for at, rms, share in packets:
        loud = rms > LOUD and share > 0.6
        if not loud:
            quiet_since = at if quiet_since is None else quiet_since
        elif quiet_since is not None and at - quiet_since >= 0.06:
            out.append(at)
            quiet_since = None
        elif quiet_since is not None:
            quiet_since = None
    return out


def relay_delays(datagrams: list[Datagram], since: float) -> list[float]:
    """Per burst of the person's tone, from its first packet leaving the person to its first
    packet reaching the caller through the gateway (one way through the relay)."""
    sent = onsets(decoded(datagrams, since, lambda d: PERSON_PORTS[0] <= d.source[1] <= PERSON_PORTS[1]))
    arrived = onsets(to_caller(datagrams, since))
    delays = []
    for at in sent:
        later = [a for a in arrived if at <= a < at + 0.4]
        if later:
            delays.append(later[0] - at)
    return delays


def wire_figures(packets: list[tuple[float, float, float]], asked: float) -> tuple[float | None, float]:
    """Seconds from ``asked`` to the first of three packets in a row carrying the person's
    tone, and the longest silence (s) before it (gaps between audible packets)."""
    heard_at = None
    for i in range(len(packets) - 2):
        if all(p[1] > LOUD and p[2] > 0.6 for p in packets[i : i + 3]) and packets[i][0] >= asked:
            heard_at = packets[i][0]
            break
    if heard_at is None:
        return None, float("nan")
    audible = [asked] + [t for t, rms, _ in packets if asked <= t < heard_at and rms > LOUD] + [heard_at]
    gaps = [b - a for a, b in zip(audible, audible[1:], strict=False)]
    silence = max(0.0, max(gaps) - 0.02)  # one 20 ms packet interval is no silence
    return heard_at - asked, silence


async def bridge_round(gateway: Gateway, person: Person, folder: Path, sniffer: LoopbackSniffer) -> dict:
    seconds = TALK_BEFORE_S + 1.0 + AFTER_S + 2.0  # room for the answer; the caller then hangs up
    wav = tone_wav(folder / "caller.wav", AI_HZ, seconds + 1)
    settings = CallSettings(
        uri=gateway.uri,
        play=str(wav),
        record=str(folder / "heard.wav"),
        seconds=seconds,
        local_host="127.0.0.1",
        rtp_port_min=CALLER_PORTS[0],
        rtp_port_max=CALLER_PORTS[1],
    )
    began = time.time()
    calling = asyncio.create_task(place_call(settings))
    call = await asyncio.to_thread(active_call, gateway, began)
    await asyncio.sleep(TALK_BEFORE_S)
    status, outcome, asked = await asyncio.to_thread(transfer, gateway, call["id"], person.uri, "bridge")
    answered = time.time() - asked
    summary = await calling  # the caller hangs up; the gateway then hangs up on the person
    wire_s, silence_s = wire_figures(to_caller(sniffer.datagrams, began), asked)
    offset = asked - summary["recording_started_at"]
    at = first_heard(heard(summary["recording"]), PERSON_HZ, after_s=max(0.0, offset))
    relay = relay_delays(sniffer.datagrams, asked)
    spoke = [
        at
        for at, rms, share in decoded(
            sniffer.datagrams, asked, lambda d: PERSON_PORTS[0] <= d.source[1] <= PERSON_PORTS[1]
        )
        if rms > LOUD and share > 0.6
    ]
    return {
        "person_out_s": round(spoke[0] - asked, 4) if spoke else None,
        "mode": "bridge",
        "status": status,
        "outcome": outcome.get("outcome"),
        "api_s": round(answered, 3),
        "handover_s": outcome.get("seconds"),
        "wire_s": wire_s,
        "silence_s": silence_s,
        "recorded_s": None if at is None else round(at - offset, 3),
        "relay_ms": [round(d * 1000, 1) for d in relay],
    }


async def refer_round(gateway: Gateway, person: Person, folder: Path, sniffer: LoopbackSniffer) -> dict:
    wav = tone_wav(folder / "caller.wav", AI_HZ, 30)
    config = write_baresip_config(
        folder / "baresip",
        port=free_port_pair(),
        source=wav,
        folder=folder,
        account="<sip:caller@127.0.0.1>;regint=0",
        rtp_ports=CALLER_PORTS,
        heard="heard.wav",
        dumps=False,
    )
    began = time.time()
    with (folder / "baresip.log").open("wb") as log:
        caller = await asyncio.create_subprocess_exec(
            "baresip",
            "-f",
            str(config),
            "-e",
            f"/dial {gateway.uri}",
            "-t",
            str(int(TALK_BEFORE_S + AFTER_S + 6)),
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
        )
    try:
        call = await asyncio.to_thread(active_call, gateway, began)
        await asyncio.sleep(TALK_BEFORE_S)
        status, outcome, asked = await asyncio.to_thread(transfer, gateway, call["id"], person.uri, "refer")
        answered = time.time() - asked
        await asyncio.sleep(AFTER_S)
    finally:
        caller.terminate()
        await caller.wait()
    wire_s, silence_s = wire_figures(to_caller(sniffer.datagrams, began), asked)
    return {
        "mode": "refer",
        "status": status,
        "outcome": outcome.get("outcome"),
        "api_s": round(answered, 3),
        "handover_s": outcome.get("seconds"),
        "wire_s": wire_s,
        "silence_s": silence_s,
    }


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summary(rounds: list[dict], mode: str) -> dict:
    mine = [r for r in rounds if r["mode"] == mode]
    done = [r for r in mine if r["outcome"] == "transferred" and r["wire_s"] is not None]
    wire = [r["wire_s"] * 1000 for r in done]
    silence = [r["silence_s"] * 1000 for r in done]
    api = [r["api_s"] * 1000 for r in done]
    out = {
        "rounds": len(mine),
        "transferred": len(done),
        "heard_p50_ms": percentile(wire, 50),
        "heard_p99_ms": percentile(wire, 99),
        "api_answer_p50_ms": percentile(api, 50),
        "silence_p50_ms": percentile(silence, 50),
        "silence_max_ms": max(silence) if silence else None,
    }
    if mode == "bridge":
        recorded = [r["recorded_s"] * 1000 for r in done if r.get("recorded_s") is not None]
        out["heard_in_recording_p50_ms"] = percentile(recorded, 50)
        relay = [d for r in done for d in r.get("relay_ms", [])]
        out["relay_one_way_p50_ms"] = percentile(relay, 50)
        out["relay_one_way_p99_ms"] = percentile(relay, 99)
        out["relay_bursts"] = len(relay)
        spoke = [r["person_out_s"] * 1000 for r in done if r.get("person_out_s") is not None]
        out["person_first_packet_p50_ms"] = percentile(spoke, 50)
    return {k: round(v, 1) if isinstance(v, float) else v for k, v in out.items()}


async def run(args: argparse.Namespace) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="transfer-bench-"))
    gateway = start_serve(folder, "echo", "--transfer-ring-seconds", "10", "--slots", "2")
    person = Person(
        folder / "person",
        tone_hz=PERSON_HZ,
        quit_after=args.rounds * 30 + 60,
        rtp_ports=PERSON_PORTS,
        bursts=(0.2, 0.3),
    )
    rounds: list[dict] = []
    try:
        await asyncio.to_thread(gateway.wait_ready)
        await person.start()
        modes = ["bridge", "refer"] if args.mode == "both" else [args.mode]
        ports = set(range(CALLER_PORTS[0], CALLER_PORTS[1] + 1)) | set(range(PERSON_PORTS[0], PERSON_PORTS[1] + 1))
        with LoopbackSniffer(ports) as sniffer:
            for i in range(args.rounds):
                for mode in modes:
                    where = folder / f"{mode}-{i}"
                    where.mkdir()
                    round_ = await (bridge_round if mode == "bridge" else refer_round)(gateway, person, where, sniffer)
                    rounds.append(round_)
                    wire = "-" if round_["wire_s"] is None else f"{round_['wire_s'] * 1000:6.0f}"
                    print(
                        f"{mode:6} round {i + 1:2}: {round_['status']} {round_['outcome']}, API answered in "
                        f"{round_['api_s'] * 1000:6.0f} ms, person heard on the wire after {wire} ms, "
                        f"silence {round_['silence_s'] * 1000:5.0f} ms",
                        flush=True,
                    )
                    sniffer.datagrams.clear()
                    await asyncio.sleep(0.5)  # the person's baresip hangs up its last call
    finally:
        await person.stop()
        gateway.proc.stop()
    return {
        "rounds": rounds,
        "by_mode": {m: summary(rounds, m) for m in ("bridge", "refer") if any(r["mode"] == m for r in rounds)},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="transfers per mode (20)")
    parser.add_argument("--mode", choices=["both", "bridge", "refer"], default="both")
    args = parser.parse_args()
    if not can_sniff():
        print("transfer bench: capturing on lo needs root (CAP_NET_RAW)", file=sys.stderr)
        return 2
    result = asyncio.run(run(args))
    print()
    for mode, figures in result["by_mode"].items():
        print(
            f"{mode}: {figures['transferred']}/{figures['rounds']} transferred; the person heard on the wire "
            f"p50 {figures['heard_p50_ms']} ms, p99 {figures['heard_p99_ms']} ms after the request (the API "
            f"answered p50 {figures['api_answer_p50_ms']} ms); silence the caller heard p50 "
            f"{figures['silence_p50_ms']} ms, max {figures['silence_max_ms']} ms"
        )
        if mode == "bridge":
            print(
                f"bridge: the person's voice through the relay, one way (first packet out of the person to first "
                f"packet into the caller, {figures['relay_bursts']} tone bursts): p50 "
                f"{figures['relay_one_way_p50_ms']} ms, p99 {figures['relay_one_way_p99_ms']} ms"
            )
    print(json.dumps({"benchmark": "transfer", **result["by_mode"], "rounds": result["rounds"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
