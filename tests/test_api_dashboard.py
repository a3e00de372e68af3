"""The operator dashboard in real headless Chromium (Debian's /usr/bin/chromium through the
playwright package): during a real SIP call to ``serve --model demo`` it shows the call
(caller, worker, quality), pool capacity and the transcript arriving live; with a
controlled transcript it renders Japanese and never interprets text as HTML."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import typing as tp

import httpx
import pytest

from tests.support.api import READ_TOKEN, api_gateway, identity_of
from tests.support.polling import eventually, wait_until
from tests.support.realtime import realtime_test
from tests.support.system import RunningSystem, running_system
from tests.support.tools import requires

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [pytest.mark.system, requires(shutil.which(CHROMIUM) is not None, "Debian's chromium is not installed")]


@pytest.fixture(scope="module")
def system(tmp_path_factory) -> tp.Iterator[RunningSystem]:
    with running_system(tmp_path_factory.mktemp("dashboard-system"), model="demo") as running:
        yield running


@pytest.fixture
def browser():  # per test: sync playwright must be gone before an async test runs its loop
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def words_shown(page) -> str:
    return "".join(page.locator("#transcript .words").all_text_contents())


def until(page, expression: str, timeout: float = 15.0) -> None:
    """Poll a JS expression until it is truthy (page.wait_for_function would need the
    'unsafe-eval' that the page's Content-Security-Policy rightly refuses)."""
    wait_until(lambda: page.evaluate(expression), timeout, f"{expression} true")


async def until_async(page, expression: str, timeout: float = 15.0) -> None:
    await eventually(lambda: page.evaluate(expression), timeout, f"{expression} true", interval=0.1)


WORDS_LENGTH = "[...document.querySelectorAll('#transcript .words')].map(e => e.textContent).join('').length"


@realtime_test()
def test_the_dashboard_shows_a_live_call_its_transcript_and_the_pool(system, browser, timing):
    call = system.call(seconds=10)
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(system.api + "/")  # redirects to /dashboard
    assert page.url.endswith("/dashboard")
    assert page.evaluate("document.characterSet") == "UTF-8"

    # a wrong token is refused, with the server's reason
    page.fill("#token", "not-the-token")
    page.click("#login-form button[type=submit]")
    page.wait_for_selector("#login-error:has-text('invalid bearer token')")
    assert page.is_visible("#login") and not page.is_visible("#main")

    page.fill("#token", system.tokens["read"])
    page.click("#login-form button[type=submit]")
    row = page.wait_for_selector("#calls tbody tr[data-call-id]", timeout=15_000)
    assert page.text_content("#scope") == "read token"
    assert page.locator("button.action").count() == 0  # a read token sees no action
    call_id = row.get_attribute("data-call-id")
    with httpx.Client(base_url=system.api, headers=system.headers("read")) as client:
        listed = client.get(f"/v1/calls/{call_id}").json()
        pool = client.get("/v1/pool").json()
    assert listed["state"] == "active"
    cells = {
        name: page.text_content(f"#calls tr[data-call-id='{call_id}'] td.{name}")
        for name in ("caller", "worker", "codec", "security", "jitter", "loss", "latency", "state", "duration")
    }
    assert cells["caller"] == "*" * len("moshimoshi")  # masked as in the logs (a name: wholly)
    assert cells["worker"] == f"{listed['worker_id']} / {listed['slot']}"
    assert cells["codec"] == "PCMU" and cells["state"] == "active"
    assert cells["security"] == "UDP / RTP"  # moshimoshi call: plain SIP over UDP
    assert cells["jitter"].endswith(" ms") and cells["loss"].endswith(" %")
    [worker] = pool["workers"]
    page.wait_for_selector(f"#workers tr[data-worker-id='{worker['worker_id']}']")
    until(page, "document.querySelector('#pool-summary').textContent.includes('1/2 slots busy')")
    assert page.text_content("#pool-summary").startswith("1 worker ready · 1/2 slots busy")

    # the newest call is followed: its transcript arrives while the call goes on
    until(page, "document.querySelector('#transcript-status').textContent === 'live'")
    until(page, f"{WORDS_LENGTH} >= 3")
    early = words_shown(page)
    until(page, f"{WORDS_LENGTH} > {len(early)}")
    assert call.proc.poll() is None, "the transcript should grow during the call"
    duration = page.text_content(f"#calls tr[data-call-id='{call_id}'] td.duration")
    time.sleep(1.2)  # the page polls every second: the duration moves without reloading
    assert page.text_content(f"#calls tr[data-call-id='{call_id}'] td.duration") != duration

    summary = call.result()
    assert summary["gateway_call_id"] == call_id
    page.wait_for_selector("#transcript .end", timeout=15_000)
    status = page.text_content("#transcript-status")
    assert status.startswith("call ended ("), status
    # a demo worker silent for 5 s on a starved machine (no slot elsewhere) ends the call as worker-lost
    timing.expect(status == "call ended (remote-bye)", f"the caller hung up: {status}")
    with httpx.Client(base_url=system.api, headers=system.headers("read")) as client:
        transcript = client.get(f"/v1/calls/{call_id}/transcript").json()
    assert words_shown(page) == transcript["text"]  # every piece, in order, as the API has it
    page.wait_for_selector(f"#recent tr[data-call-id='{call_id}']")
    page.wait_for_selector("#no-calls", state="visible")
    assert not errors, errors
    page.close()


async def test_untrusted_text_is_shown_as_text_and_japanese_renders(redis_server):
    from playwright.async_api import async_playwright

    hostile = "<img src=x onerror=\"document.body.dataset.pwned='1'\">"
    async with api_gateway(redis_server.url) as api, async_playwright() as playwright:
        call = api.start_call(from_uri="sip:<b>mallory</b>@192.0.2.66")
        api.say(call, "お電話ありがとうございます。", t=0.2)
        api.say(call, hostile, t=0.4)
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = await chromium.new_page()
        await page.goto(api.base + "/dashboard")
        await page.fill("#token", READ_TOKEN)
        await page.click("#login-form button[type=submit]")
        await page.wait_for_selector(f"#calls tr[data-call-id='{call.id}']")
        await until_async(
            page, f"document.querySelector('#transcript .words')?.textContent.endsWith({json.dumps(hostile)})"
        )
        api.dtmf(call, "5", t=0.6)
        await page.wait_for_selector("#transcript .dtmf:has-text('DTMF 5')")
        assert await page.text_content("#transcript .words") == "お電話ありがとうございます。" + hostile
        # the caller is masked (a name: wholly): its markup is never interpreted, and never shown either
        assert await page.text_content(f"#calls tr[data-call-id='{call.id}'] td.caller") == "*" * len("<b>mallory</b>")
        assert await page.evaluate("document.querySelectorAll('#transcript img, #calls b').length") == 0
        assert await page.evaluate("document.body.dataset.pwned") is None
        # the token stays in this tab's sessionStorage; a reload keeps the session
        await page.reload()
        await page.wait_for_selector(f"#calls tr[data-call-id='{call.id}']")
        # the operator picks a call from the table
        api.end_call(call, "remote-bye")
        await page.wait_for_selector(f"#recent tr[data-call-id='{call.id}']")
        await page.click(f"#recent tr[data-call-id='{call.id}']")
        await page.wait_for_selector("#transcript .end")
        await chromium.close()


async def test_the_dashboard_shows_the_asserted_caller_the_dialled_number_and_withholds_private_ones(redis_server):
    from playwright.async_api import async_playwright

    async with api_gateway(redis_server.url) as api, async_playwright() as playwright:
        shown = api.start_call(
            from_uri="sip:anonymous@anonymous.invalid",
            identity=identity_of(
                'P-Asserted-Identity: "Yamada Taro" <sip:+81312345678@trunk.example>', dialled="0501234567"
            ),
        )
        private = api.start_call(
            from_uri="sip:+81398765432@trunk.example",
            identity=identity_of(
                "P-Asserted-Identity: <sip:+81398765432@trunk.example>", "Privacy: id", dialled="0507654321"
            ),
        )
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = await chromium.new_page()
        await page.goto(api.base + "/dashboard")
        await page.fill("#token", READ_TOKEN)
        await page.click("#login-form button[type=submit]")
        for call in (shown, private):
            await page.wait_for_selector(f"#calls tr[data-call-id='{call.id}']")

        async def cells(call_id: str) -> tuple[str | None, str | None, str | None]:
            row = f"#calls tr[data-call-id='{call_id}']"
            return (
                await page.text_content(f"{row} td.caller"),
                await page.get_attribute(f"{row} td.caller", "title"),
                await page.text_content(f"{row} td.dialled"),
            )

        who, title, dialled = await cells(shown.id)
        assert (who, dialled) == ("********5678", "0501234567")  # masked as in the logs
        assert title == "from p-asserted-identity"
        who, title, dialled = await cells(private.id)
        assert (who, dialled) == ("withheld", "0507654321") and "Privacy: id" in title
        content = await page.content()
        assert "98765432" not in content and "12345678" not in content and "Yamada" not in content
        api.end_call(private, "remote-bye")
        await page.wait_for_selector(f"#recent tr[data-call-id='{private.id}'] td.caller:has-text('withheld')")
        await chromium.close()


# -- layout, actions, at a glance -----------------------------------------------------------

VIEWPORTS = [(1280, 800), (390, 844)]
NO_SIDEWAYS_SCROLL = "document.documentElement.scrollWidth <= window.innerWidth"


def japanese_font_installed() -> bool:
    import subprocess

    try:
        return bool(subprocess.run(["fc-list", ":lang=ja"], capture_output=True, text=True).stdout.strip())
    except OSError:
        return False


async def sign_in(page, base: str, token: str) -> None:
    await page.goto(base + "/dashboard")
    await page.fill("#token", token)
    await page.click("#login-form button[type=submit]")


@requires(japanese_font_installed(), "no Japanese font (make test installs fonts-ipaexfont-gothic)")
@pytest.mark.parametrize("width, height", VIEWPORTS)
async def test_the_page_never_scrolls_sideways_and_renders_japanese_in_a_japanese_font(redis_server, width, height):
    from playwright.async_api import async_playwright

    from service.pool import WorkerRegistration, connect
    from tests.support.api import ADMIN_TOKEN
    from tests.support.pool import worker

    async with api_gateway(redis_server.url) as api, async_playwright() as playwright:
        client = connect(redis_server.url)
        await WorkerRegistration(
            client, worker("moshimoshi-worker-0-a-long-statefulset-name", capacity=64, model="nu-dialogue/j-moshi-ext")
        ).heartbeat()
        for n in range(3):  # the widest rows: long names, every column filled, admin actions
            call = api.start_call(
                worker_id="moshimoshi-worker-0-a-long-statefulset-name",
                slot=60 + n,
                identity=identity_of(
                    'P-Asserted-Identity: "山田 太郎" <sip:+81312345678@t.example>', dialled="0120-123-456-789"
                ),
            )
        api.say(call, "お電話ありがとうございます。ご用件をお伺いします。" * 4, t=0.3)
        api.refuse_call("rejected-busy")
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = await chromium.new_page(viewport={"width": width, "height": height})
        await sign_in(page, api.base, ADMIN_TOKEN)
        await page.wait_for_selector(f"#calls tr[data-call-id='{call.id}'] button.hangup")
        await page.wait_for_selector("#workers tr[data-worker-id] button.drain")
        await page.click(f"#calls tr[data-call-id='{call.id}'] td.dialled")
        await until_async(page, "document.querySelector('#transcript .words')?.textContent.length > 0")
        assert await page.evaluate(NO_SIDEWAYS_SCROLL), await page.evaluate(
            "[document.documentElement.scrollWidth, window.innerWidth]"
        )
        # the transcript's kanji are drawn by a Japanese font, not a fallback's Chinese forms
        cdp = await page.context.new_cdp_session(page)
        document = await cdp.send("DOM.getDocument")
        node = await cdp.send(
            "DOM.querySelector", {"nodeId": document["root"]["nodeId"], "selector": "#transcript .words"}
        )
        await cdp.send("CSS.enable")
        fonts = await cdp.send("CSS.getPlatformFontsForNode", {"nodeId": node["nodeId"]})
        used = [f["familyName"] for f in fonts["fonts"]]
        assert any(name in used for name in ("IPAexGothic", "Noto Sans CJK JP", "Noto Sans JP")), used
        await client.close()
        await chromium.close()


async def test_admin_actions_are_offered_to_an_admin_token_only(redis_server):
    from playwright.async_api import async_playwright

    from service.pool import WorkerRegistration, connect
    from tests.support.api import ADMIN_TOKEN
    from tests.support.pool import worker

    async with api_gateway(redis_server.url) as api, async_playwright() as playwright:
        client = connect(redis_server.url)
        await WorkerRegistration(client, worker("w-1", capacity=2)).heartbeat()
        call = api.start_call(worker_id="w-1")
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = await chromium.new_page()
        await sign_in(page, api.base, READ_TOKEN)
        await page.wait_for_selector(f"#calls tr[data-call-id='{call.id}']")
        await page.wait_for_selector("#workers tr[data-worker-id='w-1']")
        assert await page.locator("button.action").count() == 0  # no hang up, transfer or drain
        assert not await page.is_visible("#calls th.admin-only")
        await page.click("#logout")
        await sign_in(page, api.base, ADMIN_TOKEN)
        await page.wait_for_selector(f"#calls tr[data-call-id='{call.id}'] button.hangup")
        await page.wait_for_selector("#workers tr[data-worker-id='w-1'] button.drain")
        assert await page.text_content("#scope") == "admin token"
        # transfer asks where to, and says what the API answered (here: not a SIP or tel: URI)
        page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept("not-a-uri")))
        await page.click(f"#calls tr[data-call-id='{call.id}'] button.transfer")
        await page.wait_for_selector(f"#action-error:has-text('transfer {call.id}: ')")
        assert "[object" not in await page.text_content("#action-error")
        assert not call.ended.is_set()
        # hanging up asks first; declined, the call goes on
        page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.dismiss()))
        await page.click(f"#calls tr[data-call-id='{call.id}'] button.hangup")
        await asyncio.sleep(0.5)
        assert not call.ended.is_set()
        page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
        await page.click(f"#calls tr[data-call-id='{call.id}'] button.hangup")
        await asyncio.wait_for(call.ended.wait(), 10)
        assert call.end_reason == "api-hangup"
        await client.close()
        await chromium.close()


async def test_at_a_glance_calls_capacity_refusals_and_the_hour_of_concurrent_calls(redis_server):
    from playwright.async_api import async_playwright

    from tests.support.api import ADMIN_TOKEN

    async with api_gateway(redis_server.url) as api, async_playwright() as playwright:
        now = time.time()
        for minutes_ago, calls in ((50, 1), (30, 4), (10, 2), (0, 3)):
            api.gateway.concurrency.add(calls, 8, now=now - minutes_ago * 60)
        api.start_call()
        api.start_call()
        for reason in ("rejected-busy", "rejected-busy", "rejected-codec"):
            api.refuse_call(reason)
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = await chromium.new_page()
        await sign_in(page, api.base, ADMIN_TOKEN)
        await until_async(page, "document.querySelector('#calls-now').textContent === '2'")
        await until_async(page, "document.querySelector('#refused').textContent === '3'")
        reasons = await page.eval_on_selector_all("#refused-reasons li", "items => items.map(i => i.textContent)")
        assert reasons == ["busy 2", "codec 1"]
        points = await page.get_attribute("#spark-calls", "points")
        assert len(points.split()) == 4  # one point per sample
        ys = [float(p.split(",")[1]) for p in points.split()]
        assert ys[1] == min(ys)  # the busiest moment (4 calls) is the highest point
        assert "peak 4" in await page.text_content("#spark-note")
        await chromium.close()


@pytest.fixture(scope="module")
def echo_system(tmp_path_factory) -> tp.Iterator[RunningSystem]:
    """Calls that a loaded machine cannot end early (the demo model's may stall: worker-lost)."""
    with running_system(tmp_path_factory.mktemp("dashboard-echo"), model="echo") as running:
        yield running


@pytest.mark.parametrize("width, height", VIEWPORTS)
def test_an_admin_hangs_up_a_live_call_from_the_page_and_the_caller_gets_bye(echo_system, browser, width, height):
    system = echo_system
    call = system.call(seconds=30)
    page = browser.new_page(viewport={"width": width, "height": height})
    page.goto(system.api + "/dashboard")
    page.fill("#token", system.tokens["admin"])
    page.click("#login-form button[type=submit]")
    row = page.wait_for_selector("#calls tbody tr[data-call-id]", timeout=15_000)
    call_id = row.get_attribute("data-call-id")
    assert page.evaluate(NO_SIDEWAYS_SCROLL)  # with a live call's row
    page.on("dialog", lambda dialog: dialog.accept())
    page.click(f"#calls tr[data-call-id='{call_id}'] button.hangup")
    summary = call.result(timeout=20)
    assert summary["ended_by"] == "remote-bye", summary  # the caller received our BYE
    assert summary["gateway_call_id"] == call_id
    page.wait_for_selector(f"#recent tr[data-call-id='{call_id}'] td.reason:has-text('api-hangup')")
    page.close()


@pytest.mark.parametrize("width, height", VIEWPORTS)
async def test_the_softphone_never_scrolls_sideways(redis_server, width, height):
    from playwright.async_api import async_playwright

    async with api_gateway(redis_server.url) as api, async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = await chromium.new_page(viewport={"width": width, "height": height})
        await page.goto(api.base + "/phone")
        await page.wait_for_selector("#levels")
        assert await page.evaluate(NO_SIDEWAYS_SCROLL), await page.evaluate(
            "[document.documentElement.scrollWidth, window.innerWidth]"
        )
        await chromium.close()
