"""Our user agent against sipp (sip-tester) as a real peer, both directions."""

from __future__ import annotations

import asyncio

import pytest

from sip.errors import CallCancelled
from sip.sdp import MediaPreferences, build_offer
from sip.ua import UserAgent
from tests.support.sipp import SCENARIOS, Answering, RingingUntilCancelled, Sipp, have_sipp
from tests.support.tools import requires

pytestmark = [pytest.mark.system, requires(have_sipp(), "sipp (sip-tester) is not installed")]


async def run_sipp(sipps: list[Sipp], sipp: Sipp) -> Sipp:
    sipps.append(sipp)
    return await sipp.start()


@pytest.mark.parametrize("transport", ["u1", "t1"])
async def test_sipp_builtin_uac_calls_us(tmp_path, sipps, transport):
    app = Answering()
    ua = UserAgent("127.0.0.1", 0, on_invite=app)
    await ua.start()
    try:
        sipp = await run_sipp(sipps, Sipp(tmp_path, "-sn", "uac", f"127.0.0.1:{ua.port}", transport=transport))
        dialog = await app.dialog()
        await sipp.finished()
        assert await asyncio.wait_for(dialog.terminated, 10) == "remote-bye"
        assert dialog.media.codec == "PCMU"
    finally:
        await ua.stop()


async def test_we_call_sipp_with_digest_auth(tmp_path, sipps):
    sipp = await run_sipp(sipps, Sipp(tmp_path, "-sf", str(SCENARIOS / "uas_auth.xml")))
    await sipp.listening()
    ua = UserAgent("127.0.0.1", 0)
    await ua.start()
    try:
        offer = build_offer(MediaPreferences(), "127.0.0.1", 30000)
        dialog = await ua.invite(
            f"sip:service@127.0.0.1:{sipp.port}", str(offer), username="moshi", password="s3cret", timeout=20
        )
        assert dialog.media.codec == "PCMA" and dialog.media.dtmf_payload_type == 101
        await dialog.bye()
        await sipp.finished()
        assert await dialog.terminated == "local-bye"
    finally:
        await ua.stop()


async def test_we_cancel_a_call_to_sipp_while_it_rings(tmp_path, sipps):
    sipp = await run_sipp(sipps, Sipp(tmp_path, "-sf", str(SCENARIOS / "uas_cancel.xml")))
    await sipp.listening()
    ua = UserAgent("127.0.0.1", 0)
    await ua.start()
    try:
        ringing = asyncio.Event()
        task = asyncio.create_task(
            ua.invite(
                f"sip:service@127.0.0.1:{sipp.port}",
                str(build_offer(MediaPreferences(), "127.0.0.1", 30000)),
                on_provisional=lambda response: response.status == 180 and ringing.set(),
            )
        )
        await asyncio.wait_for(ringing.wait(), 20)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await sipp.finished()
    finally:
        await ua.stop()


async def test_sipp_cancels_while_we_ring(tmp_path, sipps):
    app = RingingUntilCancelled()
    ua = UserAgent("127.0.0.1", 0, on_invite=app)
    await ua.start()
    try:
        sipp = await run_sipp(sipps, Sipp(tmp_path, "-sf", str(SCENARIOS / "uac_cancel.xml"), f"127.0.0.1:{ua.port}"))
        await sipp.finished()
        assert isinstance(await asyncio.wait_for(app.outcome, 10), CallCancelled)
        assert ua.counts()["pending_calls"] == 0 and ua.counts()["dialogs"] == 0
    finally:
        await ua.stop()


async def test_we_refresh_the_session_when_sipp_asks_us_to(tmp_path, sipps):
    app = Answering()
    ua = UserAgent("127.0.0.1", 0, on_invite=app, min_se=1)
    await ua.start()
    try:
        sipp = await run_sipp(
            sipps, Sipp(tmp_path, "-sf", str(SCENARIOS / "uac_session_refresh.xml"), f"127.0.0.1:{ua.port}")
        )
        dialog = await app.dialog()
        assert dialog.session_timer.interval == 2 and dialog.session_timer.refresher == "local"
        await sipp.finished()
        assert await asyncio.wait_for(dialog.terminated, 10) == "remote-bye"
        assert ua.counts()["session_refreshes"] >= 1
    finally:
        await ua.stop()


async def test_we_hang_up_when_sipp_never_refreshes(tmp_path, sipps):
    app = Answering()
    ua = UserAgent("127.0.0.1", 0, on_invite=app, min_se=1)
    await ua.start()
    try:
        sipp = await run_sipp(
            sipps, Sipp(tmp_path, "-sf", str(SCENARIOS / "uac_session_expiry.xml"), f"127.0.0.1:{ua.port}")
        )
        dialog = await app.dialog()
        assert dialog.session_timer.refresher == "remote"
        assert await asyncio.wait_for(dialog.terminated, 15) == "session-expired"
        await sipp.finished()
    finally:
        await ua.stop()
