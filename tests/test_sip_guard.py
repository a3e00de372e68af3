"""The request guard (sip.guard) in a real user agent over real sockets: who may send
requests, digest authentication, per-source rate limits, scanners, in-dialog requests only
from the dialog's peer; every refusal stateless. Attackers are raw peers bound to other
loopback addresses (127.0.0.2, 127.0.0.3), as a scanner on the internet would be."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from sip.acl import AddressList
from sip.auth import DigestAuthenticator, DigestChallenge, authorization
from sip.errors import CallFailed
from sip.guard import RequestGuard
from sip.message import Response
from sip.ratelimit import SourceRateLimiter
from sip.ua import UserAgent
from tests.support.polling import eventually
from tests.support.sip_peer import RawPeer, branch
from tests.test_sip_ua import TIMERS, AnsweringApp, drained, offer

LOCAL_ONLY = AddressList.parse("127.0.0.1/32")
STATE_KEYS = ("dialogs", "pending_calls", "early_dialogs", "server_transactions", "client_transactions", "tasks")


def request(
    method: str,
    ua: UserAgent,
    peer: RawPeer,
    *,
    user: str = "echo",
    call_id: str | None = None,
    cseq: int = 1,
    to_tag: str | None = None,
    from_tag: str = "peer",
    headers: str = "",
    body: str = "",
    branch_id: str | None = None,
) -> bytes:
    """A well-formed request from ``peer`` (whatever address it is bound to)."""
    target = f"sip:{user}@127.0.0.1:{ua.port}"
    to = f"<{target}>" + (f";tag={to_tag}" if to_tag else "")
    typed = "Content-Type: application/sdp\r\n" if body else ""
    return (
        f"{method} {target} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {peer.host}:{peer.port};branch={branch_id or branch()};rport\r\n"
        f"Max-Forwards: 70\r\nFrom: <sip:peer@{peer.host}>;tag={from_tag}\r\nTo: {to}\r\n"
        f"Call-ID: {call_id or secrets.token_hex(6)}\r\nCSeq: {cseq} {method}\r\n"
        f"Contact: <sip:peer@{peer.host}:{peer.port}>\r\n"
        f"{headers}{typed}Content-Length: {len(body.encode())}\r\n\r\n{body}"
    ).encode()


def stateless(ua: UserAgent) -> dict[str, int]:
    counts = ua.counts()
    return {key: counts[key] for key in STATE_KEYS}


def no_state(ua: UserAgent) -> bool:
    return all(value == 0 for value in stateless(ua).values())


async def silence(peer: RawPeer, within: float = 0.5) -> list:
    await asyncio.sleep(within)
    return peer.drain()


@pytest.fixture
async def make_ua():
    started: list[UserAgent] = []

    async def make(guard: RequestGuard | None, **kwargs) -> UserAgent:
        kwargs.setdefault("timers", TIMERS)
        ua = UserAgent("127.0.0.1", 0, guard=guard, **kwargs)
        await ua.start()
        started.append(ua)
        return ua

    yield make
    for ua in started:
        await ua.stop()


@pytest.fixture
async def peers():
    opened: list[RawPeer] = []

    async def open_peer(host: str = "127.0.0.1") -> RawPeer:
        peer = await RawPeer.udp(host)
        opened.append(peer)
        return peer

    yield open_peer
    for peer in opened:
        await peer.close()


# --- who may call ------------------------------------------------------------------------


async def test_a_scanner_sweep_from_outside_the_allow_list_gets_the_same_403_for_everything_and_no_state(
    make_ua, peers
):
    app = AnsweringApp()
    ua = await make_ua(RequestGuard(allow=LOCAL_ONLY), on_invite=app)
    scanner = await peers("127.0.0.2")
    answers = []
    for user in ("100", "101", "admin", "agent", "echo"):
        for method in ("INVITE", "REGISTER", "MESSAGE", "SUBSCRIBE", "FROBNICATE", "BYE"):
            body = offer() if method == "INVITE" else ""
            data = request(method, ua, scanner, user=user, body=body)
            scanner.send(data, ("127.0.0.1", ua.port))
            response = await scanner.final_response()
            answers.append((response.status, response.reason, sorted(name for name, _ in response.headers)))
            if method == "INVITE":  # the ACK of a stateless 403 matches nothing and is absorbed
                via = data.split(b"branch=")[1].split(b";")[0].decode()
                scanner.send(
                    request(
                        "ACK",
                        ua,
                        scanner,
                        user=user,
                        call_id=response.call_id,
                        to_tag=response.to_addr.tag,
                        branch_id=via,
                    ),
                    ("127.0.0.1", ua.port),
                )
            assert no_state(ua), stateless(ua)
    assert {answer[0] for answer in answers} == {403}
    assert len({repr(answer) for answer in answers}) == 1, answers  # nothing tells the users apart
    assert app.calls == [] and ua.counts()["calls_received"] == 0
    assert await silence(scanner) == []  # the ACKs were answered by nothing
    assert ua.guard.counters.refused == {"not-allowed": 30}
    # OPTIONS stays open (load balancers probe from anywhere) unless restricted
    scanner.send(request("OPTIONS", ua, scanner), ("127.0.0.1", ua.port))
    assert (await scanner.final_response()).status == 200


async def test_options_from_outside_the_allow_list_get_403_when_restricted(make_ua, peers):
    ua = await make_ua(RequestGuard(allow=LOCAL_ONLY, restrict_options=True))
    outsider, insider = await peers("127.0.0.2"), await peers("127.0.0.1")
    outsider.send(request("OPTIONS", ua, outsider), ("127.0.0.1", ua.port))
    assert (await outsider.final_response()).status == 403
    insider.send(request("OPTIONS", ua, insider), ("127.0.0.1", ua.port))
    assert (await insider.final_response()).status == 200


async def test_a_flood_of_refused_invites_builds_no_state(make_ua, peers):
    ua = await make_ua(RequestGuard(allow=LOCAL_ONLY), on_invite=AnsweringApp())
    flood = await peers("127.0.0.2")
    body = offer()
    for _ in range(500):
        flood.send(request("INVITE", ua, flood, body=body), ("127.0.0.1", ua.port))
    await eventually(lambda: ua.guard.counters.refused.get("not-allowed", 0) == 500, 20)
    assert no_state(ua), stateless(ua)
    assert ua.transport.counters.responses_sent == {403: 500}


# --- digest authentication ---------------------------------------------------------------


async def test_digest_auth_lets_in_the_right_password_only(make_ua):
    authenticator = DigestAuthenticator({"alice": "s3cret"}, realm="moshimoshi")
    app = AnsweringApp()
    ua = await make_ua(RequestGuard(authenticator=authenticator), on_invite=app)
    uac = await make_ua(None)
    with pytest.raises(CallFailed) as refused:
        await uac.invite(f"sip:echo@127.0.0.1:{ua.port}", offer(), timeout=10)
    assert refused.value.status == 401
    challenges = [DigestChallenge.parse(v) for v in refused.value.response.headers.get_all("WWW-Authenticate")]
    assert [(c.algorithm, c.qop, c.realm) for c in challenges] == [
        ("SHA-256", ["auth"], "moshimoshi"),
        ("MD5", ["auth"], "moshimoshi"),
    ]
    with pytest.raises(CallFailed) as wrong:
        await uac.invite(f"sip:echo@127.0.0.1:{ua.port}", offer(), username="alice", password="guess", timeout=10)
    assert wrong.value.status == 401
    with pytest.raises(CallFailed) as unknown:
        await uac.invite(f"sip:echo@127.0.0.1:{ua.port}", offer(), username="mallory", password="s3cret", timeout=10)
    assert unknown.value.status == 401
    assert app.calls == []
    dialog = await uac.invite(f"sip:echo@127.0.0.1:{ua.port}", offer(), username="alice", password="s3cret", timeout=10)
    answered = await app.dialog()
    await dialog.bye()
    assert await asyncio.wait_for(answered.terminated, 5) == "remote-bye"
    refused_counts = ua.guard.counters.refused
    assert refused_counts["auth-missing"] == 4 and refused_counts["auth-failed"] == 2, refused_counts
    await drained(ua, uac)


def answer(
    challenge_value: str, method: str, uri: str, password: str = "s3cret", nc: int = 1, cnonce: str = "c0ffee"
) -> str:
    return authorization(
        DigestChallenge.parse(challenge_value),
        method=method,
        uri=uri,
        username="alice",
        password=password,
        nc=nc,
        cnonce=cnonce,
    )


async def test_digest_auth_refuses_a_replayed_nc_and_says_stale_for_an_expired_nonce(make_ua, peers):
    now = [1000.0]
    authenticator = DigestAuthenticator({"alice": "s3cret"}, nonce_seconds=30, clock=lambda: now[0])
    app = AnsweringApp()
    ua = await make_ua(RequestGuard(authenticator=authenticator), on_invite=app)
    peer = await peers("127.0.0.1")
    uri = f"sip:echo@127.0.0.1:{ua.port}"

    async def invite(headers: str = "", call_id: str | None = None) -> Response:
        peer.send(request("INVITE", ua, peer, call_id=call_id, headers=headers, body=offer()), ("127.0.0.1", ua.port))
        return await peer.final_response(call_id)

    challenged = await invite()
    assert challenged.status == 401
    value = challenged.headers.get_all("WWW-Authenticate")[1]  # MD5
    credentials = answer(value, "INVITE", uri)
    first = await invite(f"Authorization: {credentials}\r\n", call_id="first")
    assert first.status == 200
    peer.send(request("ACK", ua, peer, call_id="first", to_tag=first.to_addr.tag), ("127.0.0.1", ua.port))
    replay = await invite(f"Authorization: {credentials}\r\n", call_id="replay")  # same nonce, same nc
    assert replay.status == 401 and not DigestChallenge.parse(replay.headers.get("WWW-Authenticate")).stale
    next_nc = await invite(f"Authorization: {answer(value, 'INVITE', uri, nc=2)}\r\n", call_id="second")
    assert next_nc.status == 200  # a higher nc on the same nonce is a new request
    peer.send(request("ACK", ua, peer, call_id="second", to_tag=next_nc.to_addr.tag), ("127.0.0.1", ua.port))
    now[0] += 31
    expired = await invite(f"Authorization: {answer(value, 'INVITE', uri, nc=3)}\r\n", call_id="late")
    assert expired.status == 401
    assert all(DigestChallenge.parse(v).stale for v in expired.headers.get_all("WWW-Authenticate"))
    wrong_and_expired = await invite(f"Authorization: {answer(value, 'INVITE', uri, 'x', nc=4)}\r\n")
    assert not DigestChallenge.parse(wrong_and_expired.headers.get("WWW-Authenticate")).stale
    assert len(app.calls) == 2
    counts = ua.guard.counters.refused
    assert (counts["auth-replayed"], counts["auth-stale"], counts["auth-failed"]) == (1, 1, 1), counts


async def test_a_nonce_is_bound_to_the_address_it_was_given_to(make_ua, peers):
    authenticator = DigestAuthenticator({"alice": "s3cret"})
    ua = await make_ua(RequestGuard(authenticator=authenticator), on_invite=AnsweringApp())
    one, two = await peers("127.0.0.1"), await peers("127.0.0.3")
    uri = f"sip:echo@127.0.0.1:{ua.port}"
    one.send(request("INVITE", ua, one, body=offer()), ("127.0.0.1", ua.port))
    value = (await one.final_response()).headers.get("WWW-Authenticate")
    two.send(
        request("INVITE", ua, two, headers=f"Authorization: {answer(value, 'INVITE', uri)}\r\n", body=offer()),
        ("127.0.0.1", ua.port),
    )
    stolen = await two.final_response()
    assert stolen.status == 401 and ua.guard.counters.refused["auth-failed"] == 1


def test_the_authenticator_keeps_a_bounded_table_and_forgotten_nonces_go_stale():
    now = [0.0]
    authenticator = DigestAuthenticator(
        {"alice": "s3cret"}, nonce_seconds=100, max_tracked_nonces=4, clock=lambda: now[0]
    )
    uri = "sip:echo@127.0.0.1"

    def use(nonce_challenge: str, nc: int = 1):
        return authenticator.verify("INVITE", uri, [answer(nonce_challenge, "INVITE", uri, nc=nc)], "127.0.0.1")

    challenges = []
    for _ in range(6):
        challenges.append(authenticator.challenge("127.0.0.1")[0])
        now[0] += 1
    for value in challenges:
        assert use(value).ok
    assert authenticator.tracked_nonces == 4
    forgotten = use(challenges[0], nc=2)  # its nc can no longer be checked: refused as stale
    assert not forgotten.ok and forgotten.stale
    assert use(challenges[5], nc=2).ok and not use(challenges[5], nc=2).ok


def test_credentials_are_parsed_without_ever_showing_a_password():
    from sip.auth import parse_credentials

    assert parse_credentials("alice:pa:ss, bob:x\n# comment\ncarol:y") == {"alice": "pa:ss", "bob": "x", "carol": "y"}
    for bad in ("alice", "alice:", ":pw", "alice:x,alice:y", 'al"ice:pw'):
        with pytest.raises(ValueError) as error:
            parse_credentials(bad)
        assert "pw" not in str(error.value) or bad == ":pw" and "entry 1" in str(error.value)
    assert "s3cret" not in repr(DigestAuthenticator({"alice": "s3cret"}))


# --- rate limits and scanners ------------------------------------------------------------


async def test_a_source_over_its_rate_gets_one_503_then_nothing_and_others_are_unaffected(make_ua, peers):
    rate = SourceRateLimiter(limit=16, window=2.0, ban=300.0)
    ua = await make_ua(RequestGuard(rate=rate))
    flood, other = await peers("127.0.0.2"), await peers("127.0.0.1")
    for _ in range(40):
        flood.send(request("OPTIONS", ua, flood), ("127.0.0.1", ua.port))
    await eventually(lambda: ua.transport.counters.filtered == 23)
    statuses = sorted(message.status for message in await silence(flood))
    assert statuses == [200] * 16 + [503]
    # the ban is checked before parsing: a banned flooder costs a lookup per datagram
    assert ua.guard.counters.refused == {"rate-limited": 1}
    other.send(request("OPTIONS", ua, other), ("127.0.0.1", ua.port))
    assert (await other.final_response()).status == 200
    assert rate.banned("127.0.0.2") and not rate.banned("127.0.0.1")


async def test_the_ban_leaves_the_banned_peers_own_dialogs_alone(make_ua, peers):
    app = AnsweringApp()
    ua = await make_ua(RequestGuard(rate=SourceRateLimiter(limit=3, window=60.0, ban=300.0)), on_invite=app)
    trunk = await peers("127.0.0.1")
    trunk.send(request("INVITE", ua, trunk, call_id="kept", body=offer()), ("127.0.0.1", ua.port))
    ok = await trunk.final_response("kept")
    trunk.send(request("ACK", ua, trunk, call_id="kept", to_tag=ok.to_addr.tag), ("127.0.0.1", ua.port))
    for _ in range(5):
        trunk.send(request("OPTIONS", ua, trunk), ("127.0.0.1", ua.port))
    await eventually(lambda: ua.guard.counters.refused.get("banned", 0) == 2)
    trunk.send(request("BYE", ua, trunk, call_id="kept", to_tag=ok.to_addr.tag, cseq=2), ("127.0.0.1", ua.port))
    assert (await trunk.final_response("kept")).status == 200
    await eventually(lambda: ua.counts()["peer_addresses"] == 0)
    trunk.send(request("OPTIONS", ua, trunk), ("127.0.0.1", ua.port))  # no call left: dropped unread
    await eventually(lambda: ua.transport.counters.filtered == 1)


async def test_authenticated_invites_do_not_count_against_the_rate_limit(make_ua):
    """A trunk placing a burst of calls with digest: each call costs one count (its first,
    challenged INVITE), not two, so 10 calls at once stay within 16 per window."""
    rate = SourceRateLimiter(limit=16, window=60.0, ban=300.0)
    app = AnsweringApp()
    ua = await make_ua(RequestGuard(rate=rate, authenticator=DigestAuthenticator({"alice": "s3cret"})), on_invite=app)
    uac = await make_ua(None)
    dialogs = await asyncio.gather(
        *(
            uac.invite(f"sip:echo@127.0.0.1:{ua.port}", offer(), username="alice", password="s3cret", timeout=10)
            for _ in range(10)
        )
    )
    assert len(app.calls) == 10 and not rate.banned("127.0.0.1")
    await asyncio.gather(*(dialog.bye() for dialog in dialogs))


async def test_scanner_user_agents_are_dropped_without_an_answer(make_ua, peers):
    ua = await make_ua(RequestGuard())
    scanner = await peers("127.0.0.1")
    for agent in ("friendly-scanner", "sipvicious 0.3.4", "SIPCLI/v1.8", "VaxSIPUserAgent/3.1", "pplsip"):
        scanner.send(request("OPTIONS", ua, scanner, headers=f"User-Agent: {agent}\r\n"), ("127.0.0.1", ua.port))
        scanner.send(
            request("INVITE", ua, scanner, headers=f"User-Agent: {agent}\r\n", body=offer()), ("127.0.0.1", ua.port)
        )
    assert await silence(scanner) == []
    assert ua.guard.counters.refused == {"scanner": 10} and no_state(ua)
    scanner.send(request("OPTIONS", ua, scanner, headers="User-Agent: Asterisk PBX 20\r\n"), ("127.0.0.1", ua.port))
    assert (await scanner.final_response()).status == 200


# --- in-dialog requests only from the dialog's peer ----------------------------------------


async def test_forged_in_dialog_requests_from_another_address_end_nothing(make_ua, peers):
    app = AnsweringApp()
    ua = await make_ua(RequestGuard(), on_invite=app)
    caller, forger = await peers("127.0.0.1"), await peers("127.0.0.2")
    caller.send(request("INVITE", ua, caller, call_id="victim", body=offer()), ("127.0.0.1", ua.port))
    ok = await caller.final_response("victim")
    dialog = await app.dialog()
    caller.send(request("ACK", ua, caller, call_id="victim", to_tag=ok.to_addr.tag), ("127.0.0.1", ua.port))
    await eventually(dialog.confirmed.is_set)
    tag = ok.to_addr.tag
    for cseq, method in enumerate(("BYE", "INVITE", "UPDATE", "INFO", "PRACK", "OPTIONS"), 10):
        body = offer(port=40404) if method in ("INVITE", "UPDATE") else ""
        forger.send(
            request(method, ua, forger, call_id="victim", to_tag=tag, cseq=cseq, body=body), ("127.0.0.1", ua.port)
        )
        response = await forger.final_response("victim")
        assert response.status == 403, (method, response.status)
    forger.send(
        request("ACK", ua, forger, call_id="victim", to_tag=tag, cseq=10, body=offer(port=40404)),
        ("127.0.0.1", ua.port),
    )
    await asyncio.sleep(0.2)
    assert not dialog.is_terminated and dialog.media.remote_port == 30000 and dialog.remote_seq == 1
    assert ua.guard.counters.refused == {"not-dialog-peer": 7}
    caller.send(request("BYE", ua, caller, call_id="victim", to_tag=tag, cseq=2), ("127.0.0.1", ua.port))
    assert (await caller.final_response("victim")).status == 200
    assert await asyncio.wait_for(dialog.terminated, 5) == "remote-bye"


async def test_a_forged_cancel_from_another_address_leaves_the_ringing_call_alone(make_ua, peers):
    answer_now = asyncio.Event()

    async def ring_then_answer(call) -> None:
        await call.ringing()
        await answer_now.wait()
        await call.accept(offer(port=40000))

    app = AnsweringApp(ring_then_answer)
    ua = await make_ua(RequestGuard(), on_invite=app)
    caller, forger = await peers("127.0.0.1"), await peers("127.0.0.2")
    via = branch()
    caller.send(request("INVITE", ua, caller, call_id="ringing", branch_id=via, body=offer()), ("127.0.0.1", ua.port))
    await caller.expect(lambda m: isinstance(m, Response) and m.status == 180)
    forger.send(request("CANCEL", ua, caller, call_id="ringing", branch_id=via), ("127.0.0.1", ua.port))
    assert (await forger.final_response("ringing")).status == 403  # answered where it came from
    answer_now.set()
    assert (await caller.final_response("ringing")).status == 200


async def test_in_dialog_requests_through_the_record_route_proxy_are_the_peers(make_ua, peers):
    app = AnsweringApp()
    ua = await make_ua(RequestGuard(), on_invite=app)
    caller, proxy = await peers("127.0.0.1"), await peers("127.0.0.3")
    record_route = f"Record-Route: <sip:127.0.0.3:{proxy.port};lr>\r\n"
    caller.send(
        request("INVITE", ua, caller, call_id="routed", headers=record_route, body=offer()), ("127.0.0.1", ua.port)
    )
    ok = await caller.final_response("routed")
    await app.dialog()
    proxy.send(request("BYE", ua, proxy, call_id="routed", to_tag=ok.to_addr.tag, cseq=2), ("127.0.0.1", ua.port))
    assert (await proxy.final_response("routed")).status == 200


async def test_without_a_guard_nothing_is_refused(make_ua, peers):
    ua = await make_ua(None, on_invite=AnsweringApp())
    outsider = await peers("127.0.0.2")
    outsider.send(request("INVITE", ua, outsider, body=offer()), ("127.0.0.1", ua.port))
    assert (await outsider.final_response()).status == 200


async def test_fuzzed_requests_through_the_guard_never_crash_or_leak(make_ua, peers, caplog):
    """The torture suite's seeded mutations, against a UA whose guard authenticates and
    limits: every one is answered or dropped, nothing is logged as an error, nothing leaks."""
    import logging
    import random

    from tests.test_sip_torture import FUZZ_SEEDS, OWN_CASES, mutate

    caplog.set_level(logging.WARNING)
    guard = RequestGuard(
        allow=LOCAL_ONLY,
        authenticator=DigestAuthenticator({"alice": "s3cret"}),
        rate=SourceRateLimiter(limit=10_000, window=1.0, ban=1.0),
    )
    ua = await make_ua(guard, on_invite=AnsweringApp())
    rng = random.Random(20241206)
    seeds = [(OWN_CASES / name).read_bytes() for name in FUZZ_SEEDS]
    inside, outside = await peers("127.0.0.1"), await peers("127.0.0.2")
    for i in range(300):
        (inside if i % 2 else outside).send(mutate(rng.choice(seeds), rng), ("127.0.0.1", ua.port))
    inside.send(request("OPTIONS", ua, inside, call_id="probe"), ("127.0.0.1", ua.port))
    assert (await inside.final_response("probe")).status == 200
    await eventually(lambda: no_state(ua), 20)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors
    assert sum(guard.counters.refused.values()) > 0
