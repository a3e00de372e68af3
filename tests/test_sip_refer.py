"""Blind transfer by REFER (RFC 3515) from our side of a dialog, over real sockets: our UA
answers a raw peer's call, then refers it; the raw peer plays the transferee and its PBX
(202, NOTIFYs with sipfrag bodies) exactly as the test scripts it."""

from __future__ import annotations

import asyncio

import pytest

from sip.errors import SipParseError
from sip.message import Request, Response, make_response
from sip.refer import ReferStatus, event_package, parse_sipfrag, subscription_terminated
from sip.ua import UserAgent
from tests.support.sip_peer import RawPeer
from tests.test_sip_ua import TIMERS, AnsweringApp, offer, raw

TARGET = "sip:queue@pbx.example"


@pytest.fixture
async def make_ua():
    started: list[UserAgent] = []

    async def make(**kwargs) -> UserAgent:
        ua = UserAgent("127.0.0.1", 0, timers=TIMERS, **kwargs)
        await ua.start()
        started.append(ua)
        return ua

    yield make
    for ua in started:
        await ua.stop()


@pytest.fixture
async def peer():
    peer = await RawPeer.udp()
    yield peer
    await peer.close()


class Transferee:
    """The raw peer's side of one answered call: it called ``ua``, and answers what comes."""

    def __init__(self, ua: UserAgent, peer: RawPeer, call_id: str, to_tag: str) -> None:
        self.ua, self.peer, self.call_id, self.to_tag = ua, peer, call_id, to_tag
        self.cseq = 1

    async def request(
        self, method: str, *, headers: str = "", body: str = "", content_type: str = "message/sipfrag"
    ) -> Response:
        self.cseq += 1
        self.peer.send(
            raw(
                method,
                self.ua,
                self.peer,
                call_id=self.call_id,
                cseq=self.cseq,
                to_tag=self.to_tag,
                headers=headers,
                body=body,
                content_type=content_type,
            ),
            ("127.0.0.1", self.ua.port),
        )
        return await self.peer.final_response(self.call_id)

    async def notify(self, sipfrag: str, state: str = "active;expires=60", event: str = "refer", **kwargs) -> Response:
        return await self.request(
            "NOTIFY", headers=f"Event: {event}\r\nSubscription-State: {state}\r\n", body=sipfrag, **kwargs
        )

    async def refer_received(self) -> Request:
        message = await self.peer.expect(lambda m: isinstance(m, Request) and m.method == "REFER", 5, "a REFER")
        assert isinstance(message, Request)
        return message

    def answer(self, request: Request, status: int) -> None:
        self.peer.send(make_response(request, status).to_bytes(), ("127.0.0.1", self.ua.port))


async def answered_call(ua: UserAgent, app: AnsweringApp, peer: RawPeer, call_id: str) -> tuple:
    peer.send(raw("INVITE", ua, peer, call_id=call_id, body=offer()), ("127.0.0.1", ua.port))
    ok = await peer.final_response(call_id)
    assert ok.status == 200
    peer.send(raw("ACK", ua, peer, call_id=call_id, to_tag=ok.to_addr.tag), ("127.0.0.1", ua.port))
    dialog = await app.dialog()
    await asyncio.wait_for(dialog.confirmed.wait(), 5)
    return dialog, Transferee(ua, peer, call_id, ok.to_addr.tag)


async def test_a_referral_accepted_reports_progress_and_success(make_ua, peer):
    app = AnsweringApp()
    ua = await make_ua(on_invite=app)
    dialog, transferee = await answered_call(ua, app, peer, "refer-ok")
    referring = asyncio.create_task(dialog.refer(TARGET))
    refer = await transferee.refer_received()
    assert refer.headers.get("Refer-To") == f"<{TARGET}>"
    assert refer.headers.get("Referred-By") == f"<sip:echo@127.0.0.1:{ua.port}>"  # our URI in the dialog
    assert refer.contacts and refer.cseq.method == "REFER"
    assert refer.to_addr.tag == "peer" and refer.from_addr.tag == transferee.to_tag  # in the dialog
    transferee.answer(refer, 202)
    referral = await asyncio.wait_for(referring, 5)
    assert referral.accepted and referral.response.status == 202 and not referral.done
    seen: list[ReferStatus] = []

    async def follow() -> None:
        async for status in referral:
            seen.append(status)

    following = asyncio.create_task(follow())
    assert (await transferee.notify("SIP/2.0 100 Trying\r\n", event=f"refer;id={refer.cseq.seq}")).status == 200
    assert (await transferee.notify("SIP/2.0 180 Ringing\r\n")).status == 200  # no id: the one referral
    assert not referral.done
    ok = await transferee.notify(
        "SIP/2.0 200 OK\r\nContent-Type: application/sdp\r\n", state="terminated;reason=noresource"
    )
    assert ok.status == 200
    outcome = await referral.outcome(5)
    assert outcome.success and (outcome.status, outcome.reason, outcome.local) == (200, "OK", False)
    await asyncio.wait_for(following, 5)
    assert [s.status for s in seen] == [100, 180, 200]
    # the subscription is over: a late NOTIFY matches nothing
    assert (await transferee.notify("SIP/2.0 200 OK\r\n")).status == 481
    assert not dialog.is_terminated  # hanging up is the application's call
    await dialog.bye()


@pytest.mark.parametrize("status", [405, 603, 501, 403])
async def test_a_refused_refer_finishes_the_referral_with_its_status(make_ua, peer, status):
    app = AnsweringApp()
    ua = await make_ua(on_invite=app)
    dialog, transferee = await answered_call(ua, app, peer, f"refer-no-{status}")
    referring = asyncio.create_task(dialog.refer(TARGET))
    transferee.answer(await transferee.refer_received(), status)
    referral = await asyncio.wait_for(referring, 5)
    assert not referral.accepted and referral.done
    outcome = await referral.outcome(0.1)
    assert outcome.status == status and not outcome.local
    assert (await transferee.notify("SIP/2.0 100 Trying\r\n")).status == 481
    assert not dialog.is_terminated
    await dialog.bye()


async def test_a_final_error_in_a_notify_fails_the_referral(make_ua, peer):
    app = AnsweringApp()
    ua = await make_ua(on_invite=app)
    dialog, transferee = await answered_call(ua, app, peer, "refer-busy")
    referring = asyncio.create_task(dialog.refer("tel:+81312345678"))
    refer = await transferee.refer_received()
    assert refer.headers.get("Refer-To") == "<tel:+81312345678>"
    transferee.answer(refer, 202)
    referral = await asyncio.wait_for(referring, 5)
    await transferee.notify("SIP/2.0 100 Trying")
    await transferee.notify("SIP/2.0 486 Busy Here\r\n", state="terminated")
    outcome = await referral.outcome(5)
    assert (outcome.status, outcome.reason, outcome.success) == (486, "Busy Here", False)
    await dialog.bye()


async def test_no_final_notify_in_time_is_a_local_408_and_later_notifies_are_refused(make_ua, peer):
    app = AnsweringApp()
    ua = await make_ua(on_invite=app)
    dialog, transferee = await answered_call(ua, app, peer, "refer-slow")
    referring = asyncio.create_task(dialog.refer(TARGET))
    transferee.answer(await transferee.refer_received(), 202)
    referral = await asyncio.wait_for(referring, 5)
    assert (await transferee.notify("SIP/2.0 100 Trying")).status == 200
    outcome = await referral.outcome(0.2)
    assert (outcome.status, outcome.local) == (408, True) and "no final NOTIFY" in outcome.reason
    assert (await transferee.notify("SIP/2.0 200 OK")).status == 481
    # another transfer may start once the last one is over
    again = asyncio.create_task(dialog.refer(TARGET))
    second = await transferee.refer_received()
    transferee.answer(second, 202)
    referral2 = await asyncio.wait_for(again, 5)
    # a NOTIFY naming the first REFER's CSeq belongs to a subscription that is gone
    first_id = int(referral.event_id)
    assert (await transferee.notify("SIP/2.0 200 OK", event=f"refer;id={first_id}")).status == 481
    assert (await transferee.notify("SIP/2.0 200 OK", event=f"refer;id={second.cseq.seq}")).status == 200
    assert (await referral2.outcome(5)).success
    await dialog.bye()


async def test_bad_notifies_get_the_rfc_answers_and_change_nothing(make_ua, peer):
    app = AnsweringApp()
    ua = await make_ua(on_invite=app)
    dialog, transferee = await answered_call(ua, app, peer, "refer-bad")
    assert (await transferee.notify("SIP/2.0 200 OK")).status == 481  # no referral yet
    referring = asyncio.create_task(dialog.refer(TARGET))
    transferee.answer(await transferee.refer_received(), 202)
    referral = await asyncio.wait_for(referring, 5)
    assert (await transferee.notify("SIP/2.0 200 OK", event="presence")).status == 489
    assert (await transferee.notify("hello", content_type="text/plain")).status == 415
    assert (await transferee.notify("", content_type="message/sipfrag")).status == 400
    for body in ("SIP/2.0 2000 OK", "HTTP/1.1 200 OK", "SIP/2.0 99 Low", "garbage"):
        assert (await transferee.notify(body)).status == 400, body
    assert (await transferee.notify("SIP/2.0 200 OK", event="refer;id=abc")).status == 481
    assert not referral.done and referral.progress == []
    with pytest.raises(RuntimeError, match="already under way"):
        await dialog.refer(TARGET)
    await dialog.bye()
    outcome = await referral.outcome(1)
    assert (outcome.status, outcome.local) == (487, True) and "local-bye" in outcome.reason


async def test_a_target_that_is_no_uri_is_refused_before_anything_is_sent(make_ua, peer):
    app = AnsweringApp()
    ua = await make_ua(on_invite=app)
    dialog, _ = await answered_call(ua, app, peer, "refer-bad-target")
    for target in ("sip:a@b>\r\nX-Injected: 1", "not a uri", "sip:"):
        with pytest.raises(SipParseError):
            await dialog.refer(target)
    assert not [m for m in peer.drain() if isinstance(m, Request) and m.method == "REFER"]
    await dialog.bye()


async def test_a_refer_to_our_ua_is_405_and_names_notify_in_allow(make_ua, peer):
    app = AnsweringApp()
    ua = await make_ua(on_invite=app)
    dialog, transferee = await answered_call(ua, app, peer, "refer-to-us")
    response = await transferee.request("REFER", headers=f"Refer-To: <{TARGET}>\r\n")
    assert response.status == 405
    allowed = response.values("Allow")
    assert "NOTIFY" in allowed and "REFER" not in allowed
    await dialog.bye()


def test_sipfrag_event_and_subscription_state_parsing():
    assert parse_sipfrag(b"SIP/2.0 183 Session Progress\r\nContact: <sip:x@y>\r\n") == ReferStatus(
        183, "Session Progress"
    )
    assert parse_sipfrag(b"SIP/2.0 200") == ReferStatus(200, "")
    assert parse_sipfrag(b"sip/2.0 503 Service\x00 Unavailable\n") == ReferStatus(503, "Service Unavailable")
    for bad in (b"", b"SIP/2.0 abc OK", b"SIP/3.0 200 OK", b"\xff\xfe", b"SIP/2.0 700 Nope"):
        with pytest.raises(SipParseError):
            parse_sipfrag(bad)
    assert event_package("Refer;id=42") == ("refer", "42")
    assert event_package(" refer ") == ("refer", None)
    assert event_package(None) == ("", None)
    assert subscription_terminated("terminated;reason=noresource")
    assert not subscription_terminated("active;expires=60") and not subscription_terminated(None)
