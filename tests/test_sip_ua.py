"""The user agent, end to end over real sockets: our UAC calling our UAS, and raw peers
for what a well-behaved UA would never send."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from sip.errors import CallAborted, CallCancelled, CallFailed, SipError
from sip.message import Request, Response, make_response
from sip.sdp import MediaPreferences, NoCommonCodec, SessionDescription, answer_offer, build_offer
from sip.transaction import Timers
from sip.ua import IncomingCall, UserAgent
from tests.support.polling import eventually
from tests.support.procs import has_ipv6
from tests.support.sip_peer import RawPeer, branch

TIMERS = Timers(t1=0.02, t2=0.08, t4=0.1)
PREFS = MediaPreferences(codecs=["PCMU", "PCMA"])  # what these tests check the answers for


def offer(port: int = 30000, direction: str = "sendrecv") -> str:
    return str(build_offer(PREFS, "127.0.0.1", port, direction=direction))


async def drained(*uas: UserAgent, within: float = 15.0, transactions: bool = True) -> None:
    """Every dialog and call gone, and (unless ``transactions`` is False) every
    transaction too: with shrunk timers that takes about 64*T1."""
    keys = ["dialogs", "pending_calls"] + (["server_transactions", "client_transactions"] if transactions else [])

    def idle() -> bool:
        return all(ua.counts()[key] == 0 for ua in uas for key in keys)

    await eventually(idle, within)


class AnsweringApp:
    """A test application: rings, answers with sip.sdp, remembers its dialogs."""

    def __init__(self, behaviour: Callable[[IncomingCall], Awaitable[None]] | None = None) -> None:
        self.dialogs: asyncio.Queue = asyncio.Queue()
        self.calls: list[IncomingCall] = []
        self.behaviour = behaviour

    async def __call__(self, call: IncomingCall) -> None:
        self.calls.append(call)
        if self.behaviour is not None:
            await self.behaviour(call)
            return
        await call.ringing()
        if call.offer is None:
            sdp = build_offer(PREFS, "127.0.0.1", 40000)
        else:
            try:
                sdp, _ = answer_offer(call.offer, PREFS, "127.0.0.1", 40000)
            except NoCommonCodec:
                await call.reject(488)
                return
        self.dialogs.put_nowait(await call.accept(str(sdp)))

    async def dialog(self):
        return await asyncio.wait_for(self.dialogs.get(), 10)


@pytest.fixture
async def make_ua():
    started: list[UserAgent] = []

    async def make(**kwargs) -> UserAgent:
        kwargs.setdefault("timers", TIMERS)
        ua = UserAgent("127.0.0.1", 0, **kwargs)
        await ua.start()
        started.append(ua)
        return ua

    yield make
    for ua in started:
        await ua.stop()


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_call_answered_and_hung_up_by_the_caller(make_ua, transport):
    app = AnsweringApp()
    uas = await make_ua(on_invite=app)
    uac = await make_ua()
    provisional: list[Response] = []
    dialog = await uac.invite(
        f"sip:echo@127.0.0.1:{uas.port};transport={transport}", offer(), on_provisional=provisional.append
    )
    answered = await app.dialog()
    assert 180 in [r.status for r in provisional]
    assert dialog.media.codec == "PCMU" and dialog.media.remote_port == 40000
    assert answered.media.remote_port == 30000 and answered.media.dtmf_payload_type == 101
    call = app.calls[0]
    assert call.transport == transport.upper() and call.to_uri.user == "echo" and call.source[0] == "127.0.0.1"
    await eventually(answered.confirmed.is_set)
    assert uas.counts()["dialogs"] == 1 and uac.counts()["dialogs"] == 1
    await dialog.bye()
    assert await dialog.terminated == "local-bye"
    assert await asyncio.wait_for(answered.terminated, 5) == "remote-bye"
    await drained(uas, uac)


async def test_callee_hangs_up(make_ua):
    app = AnsweringApp()
    uas = await make_ua(on_invite=app)
    uac = await make_ua()
    dialog = await uac.invite(f"sip:echo@127.0.0.1:{uas.port}", offer())
    answered = await app.dialog()
    await answered.bye()
    assert await asyncio.wait_for(dialog.terminated, 5) == "remote-bye"
    assert await answered.terminated == "local-bye"
    await drained(uas, uac)


async def test_reject_with_retry_after_and_no_common_codec(make_ua):
    async def busy(call: IncomingCall) -> None:
        await call.reject(503, headers={"Retry-After": "30"})

    uas = await make_ua(on_invite=busy)
    uac = await make_ua()
    with pytest.raises(CallFailed) as failed:
        await uac.invite(f"sip:echo@127.0.0.1:{uas.port}", offer())
    assert failed.value.status == 503 and failed.value.response.headers.get("Retry-After") == "30"

    picky = await make_ua(on_invite=AnsweringApp())
    g729 = (
        str(build_offer(MediaPreferences(codecs=["PCMA"]), "127.0.0.1", 30000))
        .replace("RTP/AVP 8 101", "RTP/AVP 18 101")
        .replace("a=rtpmap:8 PCMA/8000", "a=rtpmap:18 G729/8000")
    )
    with pytest.raises(CallFailed) as failed:
        await uac.invite(f"sip:echo@127.0.0.1:{picky.port}", g729)
    assert failed.value.status == 488
    await drained(uas, uac, picky)


async def test_caller_cancels_before_answer(make_ua):
    outcome: asyncio.Future = asyncio.get_running_loop().create_future()

    async def slow(call: IncomingCall) -> None:
        await call.ringing()
        await asyncio.wait_for(call.cancelled.wait(), 10)
        try:
            await call.accept(offer())
        except CallCancelled as exc:
            outcome.set_result(exc)

    uas = await make_ua(on_invite=slow)
    uac = await make_ua()
    ringing = asyncio.Event()
    task = asyncio.create_task(
        uac.invite(
            f"sip:echo@127.0.0.1:{uas.port}", offer(), on_provisional=lambda r: r.status == 180 and ringing.set()
        )
    )
    await asyncio.wait_for(ringing.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert isinstance(await asyncio.wait_for(outcome, 10), CallCancelled)
    await drained(uas, uac)
    assert uas.counts()["calls_answered"] == 0


async def test_invite_timeout_cancels_and_raises_408(make_ua):
    async def never(call: IncomingCall) -> None:
        await call.ringing()
        await asyncio.wait_for(call.cancelled.wait(), 10)

    uas = await make_ua(on_invite=never)
    uac = await make_ua()
    with pytest.raises(CallFailed) as failed:
        await uac.invite(f"sip:echo@127.0.0.1:{uas.port}", offer(), timeout=0.5)
    assert failed.value.status == 408
    await drained(uas, uac)


async def test_hold_and_resume_with_the_default_reoffer_answer(make_ua):
    app = AnsweringApp()
    uas = await make_ua(on_invite=app)
    uac = await make_ua()
    dialog = await uac.invite(f"sip:echo@127.0.0.1:{uas.port}", offer())
    answered = await app.dialog()
    updates = []
    answered.on_media_update = updates.append
    version = answered.local_sdp.origin.session_version
    held = await dialog.reinvite(offer(direction="sendonly"))
    assert held.status == 200
    assert dialog.remote_sdp.media[0].direction == "recvonly" and dialog.media.direction == "sendonly"
    await eventually(lambda: answered.media.direction == "recvonly")
    assert answered.local_sdp.origin.session_version == version + 1 and updates[-1].direction == "recvonly"
    resumed = await dialog.reinvite(offer())
    assert resumed.status == 200 and dialog.media.direction == "sendrecv"
    await eventually(lambda: answered.media.direction == "sendrecv")
    update = await dialog.request("UPDATE", body=offer(direction="inactive"), content_type="application/sdp")
    assert update.status == 200 and SessionDescription.parse(update.body).media[0].direction == "inactive"
    await eventually(lambda: answered.media.direction == "inactive")
    await dialog.bye()
    await drained(uas, uac)


async def test_reoffer_rejected_by_the_application_keeps_the_dialog(make_ua):
    app = AnsweringApp()
    uas = await make_ua(on_invite=app)
    uac = await make_ua()
    dialog = await uac.invite(f"sip:echo@127.0.0.1:{uas.port}", offer())
    answered = await app.dialog()

    async def refuse(sdp: SessionDescription) -> str:
        raise SipError(488, "Not Acceptable Here")

    answered.on_reoffer = refuse
    assert (await dialog.reinvite(offer(direction="inactive"))).status == 488
    assert not answered.is_terminated and not dialog.is_terminated
    update = await dialog.request("UPDATE", headers={"Subject": "no offer"})
    assert update.status == 200
    await dialog.bye()
    await drained(uas, uac)


async def test_info_reaches_the_application(make_ua):
    app = AnsweringApp()
    uas = await make_ua(on_invite=app)
    uac = await make_ua()
    dialog = await uac.invite(f"sip:echo@127.0.0.1:{uas.port}", offer())
    answered = await app.dialog()
    infos: list[Request] = []
    answered.on_info = infos.append
    response = await dialog.request("INFO", body="Signal=5\r\nDuration=160\r\n", content_type="application/dtmf-relay")
    assert response.status == 200 and infos[0].body.startswith(b"Signal=5")
    assert (await dialog.request("OPTIONS")).status == 200
    await dialog.bye()
    await drained(uas, uac)


async def test_session_timer_refresh_and_422_negotiation(make_ua):
    app = AnsweringApp()
    # 3 s is too small for the UAS (Min-SE 6): 422, then 6 s. The UAC refreshes every 3 s;
    # the UAS would give up at 6 - 6/3 = 4 s without a refresh: a margin of a second.
    uas = await make_ua(on_invite=app, min_se=6, session_expires=6)
    uac = await make_ua(min_se=1, session_expires=3)
    dialog = await uac.invite(f"sip:echo@127.0.0.1:{uas.port}", offer())
    answered = await app.dialog()
    assert dialog.session_timer.interval == 6 and dialog.session_timer.refresher == "local"
    assert answered.session_timer.refresher == "remote"
    await eventually(lambda: uac.session_refreshes >= 1)  # an UPDATE after interval/2
    assert not answered.is_terminated and answered.session_timer.interval == 6
    await dialog.bye()
    await drained(uas, uac)


async def test_many_concurrent_calls(make_ua):
    # Timers less shrunk than elsewhere: 200 simultaneous calls on a busy 2-core machine
    # must not be mistaken for lost messages.
    timers = Timers(t1=0.1, t2=0.4, t4=0.5)
    app = AnsweringApp()
    uas = await make_ua(on_invite=app, timers=timers)
    uac = await make_ua(timers=timers)
    count = 200
    dialogs = await asyncio.gather(
        *[uac.invite(f"sip:n{i}@127.0.0.1:{uas.port}", offer(30000 + 2 * i)) for i in range(count)]
    )
    assert uas.counts()["dialogs"] == count and uac.counts()["dialogs"] == count
    assert len({d.call_id for d in dialogs}) == count
    await asyncio.gather(*[d.bye() for d in dialogs])
    assert uas.counts()["calls_answered"] == count
    await drained(uas, uac, transactions=False)


async def test_stop_ends_live_dialogs(make_ua):
    app = AnsweringApp()
    uas = await make_ua(on_invite=app)
    uac = await make_ua()
    dialog = await uac.invite(f"sip:echo@127.0.0.1:{uas.port}", offer())
    await uac.stop()
    assert await dialog.terminated == "stopped"


async def test_application_that_does_not_answer_gets_500(make_ua):
    async def forgetful(call: IncomingCall) -> None:
        await call.ringing()

    uas = await make_ua(on_invite=forgetful)
    uac = await make_ua()
    with pytest.raises(CallFailed) as failed:
        await uac.invite(f"sip:echo@127.0.0.1:{uas.port}", offer())
    assert failed.value.status == 500


# --- raw peers: what our own UAC would not do ------------------------------------------


@pytest.fixture
async def peer():
    peer = await RawPeer.udp()
    yield peer
    await peer.close()


def raw(
    method: str,
    ua: UserAgent,
    peer: RawPeer,
    *,
    call_id: str = "raw-1",
    cseq: int = 1,
    to_tag: str | None = None,
    headers: str = "",
    body: str = "",
    uri: str | None = None,
    branch_id: str | None = None,
    content_type: str = "application/sdp",
) -> bytes:
    to = f"<sip:echo@127.0.0.1:{ua.port}>" + (f";tag={to_tag}" if to_tag else "")
    typed = f"Content-Type: {content_type}\r\n" if body else ""
    return (
        f"{method} {uri or f'sip:echo@127.0.0.1:{ua.port}'} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{peer.port};branch={branch_id or branch()};rport\r\n"
        f"Max-Forwards: 70\r\nFrom: <sip:peer@127.0.0.1>;tag=peer\r\nTo: {to}\r\n"
        f"Call-ID: {call_id}\r\nCSeq: {cseq} {method}\r\nContact: <sip:peer@127.0.0.1:{peer.port}>\r\n"
        f"{headers}{typed}Content-Length: {len(body.encode())}\r\n\r\n{body}"
    ).encode()


async def ask(peer: RawPeer, ua: UserAgent, data: bytes) -> Response:
    peer.send(data, ("127.0.0.1", ua.port))
    return await peer.final_response()


@pytest.mark.parametrize(
    "kwargs, status, header",
    [
        (dict(method="BYE", to_tag="nope"), 481, None),
        (dict(method="INFO", to_tag=None), 481, None),
        (dict(method="REGISTER"), 405, ("Allow", "INVITE, ACK, BYE, CANCEL, OPTIONS, UPDATE, INFO, PRACK, NOTIFY")),
        (dict(method="SUBSCRIBE"), 405, None),
        (dict(method="FROBNICATE"), 501, None),
        (dict(method="OPTIONS", headers="Require: foo, timer\r\n"), 420, ("Unsupported", "foo")),
        (dict(method="OPTIONS", uri="tel:+81312345678"), 416, None),
        (dict(method="OPTIONS", headers="Max-Forwards: 0\r\n"), 483, None),
        (dict(method="INVITE", body="hello", content_type="text/plain"), 415, ("Accept", "application/sdp")),
        (dict(method="INVITE", headers="Accept: text/html\r\n", body=offer()), 406, None),
        (dict(method="INVITE", headers="Session-Expires: 30\r\n", body=offer()), 422, ("Min-SE", "90")),
        (dict(method="INVITE", body="v=1\r\n"), 400, None),
        (dict(method="CANCEL"), 481, None),
        (dict(method="OPTIONS"), 200, ("Accept", "application/sdp")),
    ],
)
async def test_requests_the_ua_answers_itself(make_ua, peer, kwargs, status, header):
    ua = await make_ua(on_invite=AnsweringApp())
    kwargs = dict(kwargs)  # the parameters are shared by every event loop's run
    method = kwargs.pop("method")
    via_branch = branch()
    data = raw(method, ua, peer, branch_id=via_branch, **kwargs)
    if "Max-Forwards: 0" in kwargs.get("headers", ""):
        data = data.replace(b"Max-Forwards: 70\r\n", b"")
    response = await ask(peer, ua, data)
    assert response.status == status, response.reason
    if header is not None:
        assert ", ".join(response.values(header[0])) == header[1]
    if method == "INVITE":  # the ACK for a non-2xx reuses the INVITE's branch
        peer.send(raw("ACK", ua, peer, branch_id=via_branch, to_tag=response.to_addr.tag), ("127.0.0.1", ua.port))
    await drained(ua, transactions=False)  # transaction clean-up is checked by the torture tests


async def test_unacknowledged_2xx_ends_the_dialog_with_ack_timeout_and_bye(make_ua, peer):
    app = AnsweringApp()
    ua = await make_ua(on_invite=app)
    peer.send(raw("INVITE", ua, peer, body=offer()), ("127.0.0.1", ua.port))
    dialog = await app.dialog()
    retransmissions = [m for m in [await peer.final_response() for _ in range(3)]]
    assert {r.status for r in retransmissions} == {200}  # the 2xx is retransmitted while no ACK comes
    bye = await peer.expect(lambda m: isinstance(m, Request) and m.method == "BYE", within=10)
    assert await dialog.terminated == "ack-timeout"
    peer.send(make_response(bye, 200), ("127.0.0.1", ua.port))
    assert ua.counts()["ack_timeouts"] == 1
    await drained(ua)


async def test_offerless_invite_gets_our_offer_and_the_answer_comes_in_the_ack(make_ua, peer):
    app = AnsweringApp()
    ua = await make_ua(on_invite=app)
    peer.send(raw("INVITE", ua, peer, call_id="late-offer"), ("127.0.0.1", ua.port))
    ok = await peer.final_response()
    dialog = await app.dialog()
    assert ok.status == 200 and ok.content_type == "application/sdp"
    answer, _ = answer_offer(SessionDescription.parse(ok.body), PREFS, "127.0.0.1", 50000)
    ack = raw("ACK", ua, peer, call_id="late-offer", to_tag=ok.to_addr.tag, body=str(answer))
    peer.send(ack, ("127.0.0.1", ua.port))
    await eventually(dialog.confirmed.is_set)
    assert dialog.remote_sdp.media[0].port == 50000 and dialog.media.remote_port == 50000
    bye = raw("BYE", ua, peer, call_id="late-offer", to_tag=ok.to_addr.tag, cseq=2)
    assert (await ask(peer, ua, bye)).status == 200
    stale = raw("INFO", ua, peer, call_id="late-offer", to_tag=ok.to_addr.tag, cseq=3)
    assert (await ask(peer, ua, stale)).status == 481
    await drained(ua)


async def test_in_dialog_cseq_must_grow(make_ua, peer):
    app = AnsweringApp()
    ua = await make_ua(on_invite=app)
    peer.send(raw("INVITE", ua, peer, call_id="cseq", cseq=5, body=offer()), ("127.0.0.1", ua.port))
    ok = await peer.final_response()
    await app.dialog()
    peer.send(raw("ACK", ua, peer, call_id="cseq", cseq=5, to_tag=ok.to_addr.tag), ("127.0.0.1", ua.port))
    old = raw("OPTIONS", ua, peer, call_id="cseq", cseq=4, to_tag=ok.to_addr.tag)
    assert (await ask(peer, ua, old)).status == 500
    bye = raw("BYE", ua, peer, call_id="cseq", cseq=6, to_tag=ok.to_addr.tag)
    assert (await ask(peer, ua, bye)).status == 200
    await drained(ua)


async def test_digest_challenge_from_a_proxy_is_answered_once(make_ua, peer):
    uac = await make_ua()
    task = asyncio.create_task(
        uac.invite(f"sip:echo@127.0.0.1:{peer.port}", offer(), username="alice", password="wrong")
    )
    challenge = 'Digest realm="proxy.example", nonce="n1", qop="auth"'
    first = await peer.expect(lambda m: isinstance(m, Request) and m.method == "INVITE")
    peer.send(make_response(first, 407, to_tag="p", headers={"Proxy-Authenticate": challenge}), ("127.0.0.1", uac.port))
    second = await peer.expect(lambda m: isinstance(m, Request) and m.method == "INVITE" and m.cseq.seq == 2)
    credentials = second.headers.get("Proxy-Authorization")
    assert credentials.startswith("Digest ") and 'username="alice"' in credentials and "nc=00000001" in credentials
    assert second.call_id == first.call_id and second.from_addr.tag == first.from_addr.tag
    peer.send(
        make_response(second, 407, to_tag="p", headers={"Proxy-Authenticate": challenge}), ("127.0.0.1", uac.port)
    )  # same nonce again: the password is wrong
    with pytest.raises(CallFailed) as failed:
        await asyncio.wait_for(task, 10)
    assert failed.value.status == 407
    acks = [m for m in peer.drain() if isinstance(m, Request) and m.method == "ACK"]
    assert acks  # each 407 was ACKed by the transaction layer


@pytest.mark.skipif(not has_ipv6(), reason="no IPv6 loopback")
@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_call_over_ipv6(transport):
    app = AnsweringApp()
    uas = UserAgent("::", 0, on_invite=app, timers=TIMERS)
    uac = UserAgent("::1", 0, timers=TIMERS)
    await uas.start()
    await uac.start()
    try:
        dialog = await uac.invite(
            f"sip:echo@[::1]:{uas.port};transport={transport}", str(build_offer(PREFS, "::1", 30000))
        )
        answered = await app.dialog()
        assert app.calls[0].source[0] == "::1"
        assert app.calls[0].request.top_via.host == "::1"
        assert str(answered.remote_target).startswith("sip:moshimoshi@[::1]:")
        await dialog.bye()
        assert await asyncio.wait_for(answered.terminated, 5) == "remote-bye"
    finally:
        await uac.stop()
        await uas.stop()


async def test_refresh_to_a_vanished_peer_ends_with_transport_error(make_ua):
    app = AnsweringApp()
    uas = await make_ua(on_invite=app, min_se=1, session_expires=2)
    uac = await make_ua(min_se=1, session_expires=2)
    dialog = await uac.invite(f"sip:echo@127.0.0.1:{uas.port};transport=tcp", offer())
    await app.dialog()
    assert dialog.session_timer.refresher == "local"
    await uas.stop()  # the peer is gone: the refresh after 1 s cannot even connect
    assert await asyncio.wait_for(dialog.terminated, 15) == "transport-error"


# --- delayed offer: the answer comes in the ACK (RFC 3261 §13.2.1) ----------------------


def _not_offered_answer(ok: Response) -> str:
    """An answer choosing a payload type our offer did not contain."""
    answer, _ = answer_offer(SessionDescription.parse(ok.body), PREFS, "127.0.0.1", 50000)
    return str(answer).replace("RTP/AVP 0", "RTP/AVP 18").replace("a=rtpmap:0 PCMU/8000", "a=rtpmap:18 G729/8000")


@pytest.mark.parametrize(
    "ack_body, content_type, reason, detail",
    [
        (None, "application/sdp", "ack-without-answer", "no SDP answer"),
        ("v=0\r\nnot sdp\r\n", "application/sdp", "unacceptable-answer", "SDP:"),
        ("hello", "text/plain", "unacceptable-answer", "text/plain"),
        (_not_offered_answer, "application/sdp", "unacceptable-answer", "not offered"),
        ("checked", "application/sdp", "unacceptable-answer", "refused by the check"),
    ],
)
async def test_a_delayed_offer_whose_ack_brings_no_usable_answer_ends_with_bye_and_a_reason(
    make_ua, peer, ack_body, content_type, reason, detail
):
    app = AnsweringApp(behaviour=None)

    async def accept_with_check(call: IncomingCall) -> None:
        dialog = await call.accept(
            str(build_offer(PREFS, "127.0.0.1", 40000)),
            check_media=lambda media: "refused by the check" if ack_body == "checked" else None,
        )
        app.dialogs.put_nowait(dialog)

    app.behaviour = accept_with_check
    ua = await make_ua(on_invite=app)
    peer.send(raw("INVITE", ua, peer, call_id="late-bad"), ("127.0.0.1", ua.port))
    ok = await peer.final_response()
    dialog = await app.dialog()
    if callable(ack_body):
        body = ack_body(ok)
    elif ack_body == "checked":
        body = str(answer_offer(SessionDescription.parse(ok.body), PREFS, "127.0.0.1", 50000)[0])
    else:
        body = ack_body or ""
    peer.send(
        raw("ACK", ua, peer, call_id="late-bad", to_tag=ok.to_addr.tag, body=body, content_type=content_type),
        ("127.0.0.1", ua.port),
    )
    bye = await peer.expect(lambda m: isinstance(m, Request) and m.method == "BYE", within=5)
    assert await dialog.terminated == reason
    assert detail in dialog.end_detail
    assert bye.headers.get("Reason").startswith("SIP ;cause=488 ;text=")
    assert dialog.media is None
    peer.send(make_response(bye, 200), ("127.0.0.1", ua.port))
    await drained(ua)


# --- reliable provisional responses (RFC 3262) ------------------------------------------


def prack(
    ua: UserAgent, peer: RawPeer, provisional: Response, *, call_id: str, cseq: int = 2, rack: str | None = None
) -> bytes:
    return raw(
        "PRACK",
        ua,
        peer,
        call_id=call_id,
        cseq=cseq,
        to_tag=provisional.to_addr.tag,
        headers=f"RAck: {rack or provisional.headers.get('RSeq') + ' 1 INVITE'}\r\n",
    )


async def test_required_100rel_gets_a_reliable_ringing_retransmitted_until_its_prack(make_ua, peer):
    ringing_sent = asyncio.Event()

    async def ring_then_answer(call: IncomingCall) -> None:
        await call.ringing()
        ringing_sent.set()
        app.dialogs.put_nowait(await call.accept(str(answer_offer(call.offer, PREFS, "127.0.0.1", 40000)[0])))

    app = AnsweringApp(ring_then_answer)
    ua = await make_ua(on_invite=app)
    peer.send(
        raw("INVITE", ua, peer, call_id="rel", body=offer(), headers="Require: 100rel\r\n"), ("127.0.0.1", ua.port)
    )
    first = await peer.expect(lambda m: isinstance(m, Response) and m.status == 180)
    assert first.headers.get("Require") == "100rel" and "PRACK" in first.values("Allow")
    rseq = int(first.headers.get("RSeq"))
    assert 1 <= rseq < 2**31
    again = await peer.expect(lambda m: isinstance(m, Response) and m.status == 180, within=1)
    assert again.headers.get("RSeq") == str(rseq)  # retransmitted while no PRACK came
    # a PRACK that names another response is refused, and the 200 still waits
    wrong = prack(ua, peer, first, call_id="rel", rack=f"{rseq + 1} 1 INVITE")
    assert (await ask(peer, ua, wrong)).status == 481
    assert not [m for m in peer.drain() if isinstance(m, Response) and m.status == 200]
    assert (await ask(peer, ua, prack(ua, peer, first, call_id="rel", cseq=3))).status == 200
    ok = await peer.expect(lambda m: isinstance(m, Response) and m.status == 200 and m.cseq.method == "INVITE")
    assert "100rel" in ok.values("Supported")
    await asyncio.sleep(4 * TIMERS.t1)
    assert not [m for m in peer.drain() if isinstance(m, Response) and m.status == 180]  # retransmission stopped
    dialog = await app.dialog()
    peer.send(raw("ACK", ua, peer, call_id="rel", to_tag=ok.to_addr.tag), ("127.0.0.1", ua.port))
    late = prack(ua, peer, first, call_id="rel", cseq=4)
    assert (await ask(peer, ua, late)).status == 481  # acknowledged already: none unacknowledged
    assert (await ask(peer, ua, raw("BYE", ua, peer, call_id="rel", to_tag=ok.to_addr.tag, cseq=5))).status == 200
    assert await dialog.terminated == "remote-bye"
    await drained(ua)


async def test_supported_100rel_makes_a_183_with_sdp_reliable_and_the_next_provisional_waits_for_its_prack(
    make_ua, peer
):
    async def early_media(call: IncomingCall) -> None:
        assert call.reliable_provisionals and not call.requires_100rel
        answer = answer_offer(call.offer, PREFS, "127.0.0.1", 40000)[0]
        await call.provisional(183, sdp=answer)
        await call.ringing()  # unreliable (only supported, no SDP), but only after the 183's PRACK
        app.dialogs.put_nowait(await call.accept(str(answer)))

    app = AnsweringApp(early_media)
    ua = await make_ua(on_invite=app)
    peer.send(
        raw("INVITE", ua, peer, call_id="early", body=offer(), headers="Supported: timer, 100rel\r\n"),
        ("127.0.0.1", ua.port),
    )
    progress = await peer.expect(lambda m: isinstance(m, Response) and m.status == 183)
    assert progress.headers.get("Require") == "100rel" and progress.content_type == "application/sdp"
    await asyncio.sleep(3 * TIMERS.t1)
    assert {m.status for m in peer.drain() if isinstance(m, Response)} - {100} == {183}  # nothing else until PRACK
    assert (await ask(peer, ua, prack(ua, peer, progress, call_id="early"))).status == 200
    ringing = await peer.expect(lambda m: isinstance(m, Response) and m.status == 180)
    assert ringing.headers.get("RSeq") is None
    ok = await peer.expect(lambda m: isinstance(m, Response) and m.status == 200 and m.cseq.method == "INVITE")
    assert SessionDescription.parse(ok.body).media[0].port == 40000
    await app.dialog()
    peer.send(raw("ACK", ua, peer, call_id="early", to_tag=ok.to_addr.tag), ("127.0.0.1", ua.port))
    assert (await ask(peer, ua, raw("BYE", ua, peer, call_id="early", to_tag=ok.to_addr.tag, cseq=3))).status == 200
    await drained(ua)


async def test_no_prack_for_a_reliable_provisional_rejects_the_call_with_500(make_ua, peer):
    outcome: asyncio.Future = asyncio.get_running_loop().create_future()

    async def ring_then_answer(call: IncomingCall) -> None:
        await call.ringing()
        try:
            await call.accept(str(answer_offer(call.offer, PREFS, "127.0.0.1", 40000)[0]))
        except CallAborted as exc:
            outcome.set_result(exc)

    ua = await make_ua(on_invite=ring_then_answer)
    peer.send(
        raw("INVITE", ua, peer, call_id="noprack", body=offer(), headers="Require: 100rel\r\n"), ("127.0.0.1", ua.port)
    )
    final = await peer.final_response(call_id="noprack", within=10)
    assert final.status == 500 and "PRACK" in final.reason
    assert (await asyncio.wait_for(outcome, 5)).reason == "no-prack"
    assert ua.counts()["unacknowledged_provisionals"] == 1
    peer.send(raw("ACK", ua, peer, call_id="noprack", to_tag=final.to_addr.tag), ("127.0.0.1", ua.port))
    await drained(ua)
    assert ua.counts()["early_dialogs"] == 0


async def test_bye_in_the_early_dialog_ends_a_ringing_call_like_cancel(make_ua, peer):
    outcome: asyncio.Future = asyncio.get_running_loop().create_future()

    async def ring_forever(call: IncomingCall) -> None:
        await call.ringing()
        await call.cancelled.wait()
        with pytest.raises(CallCancelled):
            await call.accept(offer())
        outcome.set_result(call.abort_reason)

    ua = await make_ua(on_invite=ring_forever)
    peer.send(raw("INVITE", ua, peer, call_id="earlybye", body=offer()), ("127.0.0.1", ua.port))
    ringing = await peer.expect(lambda m: isinstance(m, Response) and m.status == 180)
    bye = raw("BYE", ua, peer, call_id="earlybye", cseq=2, to_tag=ringing.to_addr.tag)
    assert (await ask(peer, ua, bye)).status == 200
    assert (await peer.final_response(call_id="earlybye")).status == 487
    assert await asyncio.wait_for(outcome, 5) == "cancelled"
    peer.send(raw("ACK", ua, peer, call_id="earlybye", to_tag=ringing.to_addr.tag), ("127.0.0.1", ua.port))
    await drained(ua)
    assert ua.counts()["early_dialogs"] == 0
