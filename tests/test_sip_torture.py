"""Torture messages (RFC 4475 and our own cases in tests/data/sip) sent to a running user
agent over UDP and TCP: each gets the answer its RFC section expects (or silence), nothing
crashes or leaks, and the server still answers OPTIONS afterwards."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
import tomllib
from dataclasses import dataclass

import pytest

from sip.errors import SipParseError
from sip.message import Request, Response, parse_message
from sip.sdp import MediaPreferences, NoCommonCodec, answer_offer
from sip.transaction import Timers, server_key
from sip.ua import IncomingCall, UserAgent
from tests.support.procs import REPO_ROOT, SHARED_TESTDATA
from tests.support.sip_peer import RawPeer, branch, options

TIMERS = Timers(t1=0.02, t2=0.08, t4=0.1)
OWN_CASES = REPO_ROOT / "tests" / "data" / "sip"
RFC4475 = SHARED_TESTDATA / "rfc4475"

# What RFC 4475 expects of a UAS that accepts calls (see its README): a final status, a
# set of acceptable ones, or None for silence (responses and undecodable input).
RFC4475_EXPECT: dict[str, int | set[int] | None] = {
    # 3.1.1 valid messages: answered as method and dialog state require
    "wsinv": 481,
    "intmeth": 501,
    "esc01": 200,
    "escnull": 405,
    "esc02": 501,
    "lwsdisp": 200,
    "longreq": 200,
    "dblreq": 405,
    "semiuri": 200,
    "transports": 200,
    "mpart01": 405,
    "unreason": None,
    "noreason": None,
    # 3.1.2 invalid messages
    "badinv01": 400,
    "clerr": 400,
    "ncl": 400,
    "scalar02": 400,
    "scalarlg": None,
    "quotbal": 400,
    "ltgtruri": 400,
    "lwsruri": 400,
    "lwsstart": 400,
    "trws": 400,
    "escruri": 400,
    "baddate": 400,
    "regbadct": 400,
    "badaspec": 400,
    "baddn": 400,
    "badvers": 505,
    "mismatch01": 400,
    "mismatch02": 400,
    "bigcode": None,
    # 3.2 transaction layer: reject, or fall back to RFC 2543 matching
    "badbranch": {200, 400},
    # 3.3 application layer
    "insuf": 400,
    "unkscm": 416,
    "novelsc": 416,
    "unksm2": 405,
    "bext01": 420,
    "invut": 415,
    "regaut01": 405,
    "multi01": 400,
    "mcl01": 400,
    "bcast": None,
    "zeromf": 483,
    "cparam01": 405,
    "cparam02": 405,
    "regescrt": 405,
    "sdp01": 406,
    # 3.4 backward compatibility
    "inv2543": 200,
}
# Two requests in one buffer: over TCP the second one is a request of its own.
NOT_OVER_TCP = {"dblreq"}


@dataclass
class Case:
    name: str
    data: bytes
    expect: int | set[int] | None
    transports: tuple[str, ...]
    closes: bool = False


def frames_cleanly(data: bytes) -> bool:
    """Whether the message can be sent on a stream: exactly one valid Content-Length that
    matches the body (the others are datagram-only tests)."""
    head_end = re.search(rb"\r?\n\r?\n", data)  # where sip.framing sees the blank line
    if head_end is None or data[:1] in (b"\r", b"\n"):
        return False
    lengths = re.findall(rb"^(?:content-length|l)[ \t]*:[ \t]*(\S*)", data[: head_end.start()], re.I | re.M)
    return len(lengths) == 1 and lengths[0].isdigit() and head_end.end() + int(lengths[0]) == len(data)


def rfc4475_cases() -> list[Case]:
    cases = []
    for name, expect in RFC4475_EXPECT.items():
        data = (RFC4475 / f"{name}.dat").read_bytes()
        tcp = frames_cleanly(data) and name not in NOT_OVER_TCP
        cases.append(Case(name, data, expect, ("udp", "tcp") if tcp else ("udp",)))
    return cases


def own_cases() -> list[Case]:
    manifest = tomllib.loads((OWN_CASES / "torture.toml").read_text(encoding="utf-8"))
    cases = []
    for entry in manifest["case"]:
        expect = entry["expect"]
        cases.append(
            Case(
                entry["file"],
                (OWN_CASES / entry["file"]).read_bytes(),
                None if expect == "silence" else set(expect) if isinstance(expect, list) else expect,
                tuple(entry["transports"]),
                entry.get("closes", False),
            )
        )
    return cases


class AcceptingApp:
    async def __call__(self, call: IncomingCall) -> None:
        await call.ringing()
        try:
            answer, _ = answer_offer(call.offer, MediaPreferences(), "127.0.0.1", 40000)
        except NoCommonCodec:
            await call.reject(488)
            return
        await call.accept(str(answer))


@pytest.fixture
async def server(caplog):
    caplog.set_level(logging.WARNING, logger="sip")
    ua = UserAgent("127.0.0.1", 0, on_invite=AcceptingApp(), timers=TIMERS, force_rport=True)
    await ua.start()
    yield ua
    await ua.stop()
    errors = [r for r in caplog.records if r.name.startswith("sip") and r.levelno >= logging.ERROR]
    assert not errors, f"errors logged: {[r.getMessage() for r in errors]}"


async def connect(ua: UserAgent, transport: str) -> RawPeer:
    return await (RawPeer.udp() if transport == "udp" else RawPeer.tcp("127.0.0.1", ua.port))


def send(peer: RawPeer, ua: UserAgent, data: bytes) -> None:
    peer.send(data, ("127.0.0.1", ua.port) if peer.transport == "UDP" else None)


async def probe(peer: RawPeer, ua: UserAgent) -> list:
    """Send OPTIONS; return everything that arrived before its 200."""
    call_id = f"probe-{secrets.token_hex(4)}"
    send(peer, ua, options(f"sip:probe@127.0.0.1:{ua.port}", peer, call_id=call_id))
    before = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        message = await peer.receive(within=max(deadline - time.monotonic(), 0.01))
        if isinstance(message, Response) and message.headers.get("Call-ID") == call_id:
            assert message.status == 200
            return before
        before.append(message)
    raise AssertionError("the probe OPTIONS was not answered")


def in_dialog(method: str, invite: Request, ok: Response, peer: RawPeer, cseq: int) -> bytes:
    target = ok.contacts[0].uri if ok.contacts else invite.uri
    return (
        f"{method} {target} SIP/2.0\r\n"
        f"Via: SIP/2.0/{peer.transport} 127.0.0.1:{peer.port};branch={branch()};rport\r\n"
        f"Max-Forwards: 70\r\nFrom: {invite.headers.get('From')}\r\nTo: {ok.headers.get('To')}\r\n"
        f"Call-ID: {invite.call_id}\r\nCSeq: {cseq} {method}\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def ack_for_failure(invite: Request, response: Response) -> bytes:
    """§17.1.1.3: ACK a non-2xx with the INVITE's top Via (same branch)."""
    return (
        f"ACK {invite.uri} SIP/2.0\r\nVia: {invite.headers.get_all('Via')[0]}\r\nMax-Forwards: 70\r\n"
        f"From: {invite.headers.get('From')}\r\nTo: {response.headers.get('To')}\r\n"
        f"Call-ID: {invite.call_id}\r\nCSeq: {invite.cseq.seq} ACK\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def wanted(expect: int | set[int]) -> set[int]:
    return expect if isinstance(expect, set) else {expect}


async def run_case(ua: UserAgent, case: Case, transport: str) -> str | None:
    """Send one case; return what went wrong, or None."""
    try:
        request = parse_message(case.data)
    except SipParseError:
        request = None
    if isinstance(request, Request):
        # RFC 4475 reuses branches (unkscm/novelsc, cparam01/cparam02): while the earlier
        # transaction lives, the later message is rightly absorbed as its retransmission.
        key = server_key(request)
        for _ in range(500):
            if key not in ua.transactions.server:
                break
            await asyncio.sleep(0.02)
    peer = await connect(ua, transport)
    try:
        send(peer, ua, case.data)
        if case.expect is None:
            before = await probe(peer, ua)
            return f"expected silence, got {before!r}" if before else None
        finals = []
        while not finals:
            message = await peer.receive(within=10)
            if isinstance(message, Response) and message.status >= 200:
                finals.append(message)
        final = finals[0]
        if final.status not in wanted(case.expect):
            return f"expected {case.expect}, got {final.status} {final.reason}"
        if isinstance(request, Request) and request.method == "INVITE":
            if final.is_success:
                send(peer, ua, in_dialog("ACK", request, final, peer, request.cseq.seq))
                send(peer, ua, in_dialog("BYE", request, final, peer, request.cseq.seq + 1))
                bye = await peer.expect(
                    lambda m: isinstance(m, Response) and m.headers.get("CSeq", "").endswith("BYE"),
                    within=10,
                    what="the answer to our BYE",
                )
                if bye.status != 200:
                    return f"BYE after the call answered {bye.status}"
            else:
                send(peer, ua, ack_for_failure(request, final))
        if case.closes and transport == "tcp":
            await asyncio.wait_for(peer.closed.wait(), 10)
            await peer.close()
            peer = await connect(ua, transport)
        before = await probe(peer, ua)
        others = {
            m.status
            for m in before
            if isinstance(m, Response) and m.status >= 200 and not m.headers.get("CSeq", "").endswith("BYE")
        }
        if others - {final.status}:
            return f"more than one final status: {sorted(others | {final.status})}"
        return None
    except (AssertionError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        await peer.close()


async def wait_until_idle(ua: UserAgent) -> dict[str, int]:
    deadline = time.monotonic() + 20
    keys = ("dialogs", "pending_calls", "server_transactions", "client_transactions", "tasks")
    while time.monotonic() < deadline:
        counts = ua.counts()
        if all(counts[key] == 0 for key in keys):
            return counts
        await asyncio.sleep(0.05)
    return ua.counts()


async def run_suite(ua: UserAgent, cases: list[Case], transport: str) -> None:
    failures = []
    ran = 0
    for case in cases:
        if transport not in case.transports:
            continue
        ran += 1
        problem = await run_case(ua, case, transport)
        if problem is not None:
            failures.append(f"{case.name}: {problem}")
    assert ran > 0
    assert not failures, "\n".join(failures)
    counts = await wait_until_idle(ua)
    assert counts["dialogs"] == counts["pending_calls"] == 0, counts
    assert counts["server_transactions"] == counts["client_transactions"] == counts["tasks"] == 0, counts
    peer = await connect(ua, transport)
    try:
        assert await probe(peer, ua) == []
    finally:
        await peer.close()


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_own_torture_cases(server, transport):
    await run_suite(server, own_cases(), transport)
    if transport == "udp":
        assert server.transport.counters.bad_requests_answered > 0 and server.transport.counters.dropped > 0


@pytest.mark.skipif(not RFC4475.is_dir(), reason=f"{RFC4475} not present (only beside the lead's checkout)")
@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_rfc4475_torture_messages(server, transport):
    assert {p.stem for p in RFC4475.glob("*.dat")} == set(RFC4475_EXPECT), "the RFC's 49 messages, each expected"
    await run_suite(server, rfc4475_cases(), transport)


def test_own_cases_cover_every_rfc4475_section():
    manifest = tomllib.loads((OWN_CASES / "torture.toml").read_text(encoding="utf-8"))
    sections = {entry["section"] for entry in manifest["case"]}
    assert sections == {"3.1.1", "3.1.2", "3.2", "3.3", "3.4"}
    assert len(manifest["case"]) >= 40


FUZZ_SEEDS = [
    name
    for name in (
        "escaped-uris.sip",
        "tortured-whitespace.sip",
        "long-everything.sip",
        "ipv6-everywhere.sip",
        "require-unknown.sip",
        "unknown-content-type.sip",
        "cancel-without-invite.sip",
        "bye-without-dialog.sip",
        "semicolon-user.sip",
    )
]
SPECIAL_BYTES = b'<>;,"\\:@ \t\r\n=/?%[]\x00\xff'


def mutate(data: bytes, rng) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not out:
            break
        at = rng.randrange(len(out))
        kind = rng.choice(["delete", "insert", "replace", "duplicate-line"])
        if kind == "delete":
            del out[at : at + rng.randint(1, 12)]
        elif kind == "insert":
            out[at:at] = bytes(rng.choice(SPECIAL_BYTES) for _ in range(rng.randint(1, 4)))
        elif kind == "replace":
            out[at] = rng.choice(SPECIAL_BYTES)
        else:
            start = out.rfind(b"\n", 0, at) + 1
            end = out.find(b"\n", at)
            if end > start:
                out[end + 1 : end + 1] = out[start : end + 1]
    return bytes(out)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_fuzzed_requests_never_crash_or_leak(server, transport):
    """Seeded mutations of valid requests: whatever comes back, the UA keeps answering,
    logs no error and, once the timers have run, holds no call, dialog or transaction."""
    import random

    rng = random.Random(20240607)
    seeds = [(OWN_CASES / name).read_bytes() for name in FUZZ_SEEDS]
    peer = await connect(server, transport)
    try:
        for i in range(200):
            data = mutate(rng.choice(seeds), rng)
            if transport == "tcp" and not frames_cleanly(data):
                continue  # a broken stream only tests the framer, which has its own tests
            send(peer, server, data)
            if i % 20 == 19:
                await probe(peer, server)
        await probe(peer, server)
    finally:
        await peer.close()
    counts = await wait_until_idle(server)
    assert counts["dialogs"] == counts["pending_calls"] == counts["server_transactions"] == 0, counts
    assert counts["client_transactions"] == counts["tasks"] == 0, counts
