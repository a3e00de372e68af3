"""The softphone page in real headless Chromium calls the demo model.

Chromium's fake microphone plays a WAV (``--use-file-for-fake-audio-capture``); the page
asks for the API token, lists the microphones, places the call over WebRTC, plays the
model's audio (checked through getStats and a WebAudio analyser in the page) and shows the
model's words as they come.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Page, async_playwright

from tests.support.services import CALL_TOKEN
from tests.support.webrtc_client import speech_like, write_wav

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
]


@pytest.fixture(scope="module")
def demo(demo_gateway):
    if not CHROMIUM.exists():
        raise RuntimeError("chromium is not installed: run the tests through `make test`")
    return demo_gateway


async def wait_for(page: Page, expression: str, within: float, what: str) -> None:
    try:
        await page.wait_for_function(expression, timeout=within * 1000, polling=250)
    except Exception:
        state = await page.evaluate("JSON.stringify(window.moshimoshiPhone)")
        status = await page.inner_text("#status")
        raise AssertionError(f"{what}: not within {within}s (status {status!r}, phone {state})") from None


async def test_the_softphone_calls_the_model_plays_its_audio_and_shows_its_words(demo, tmp_path):
    wav = write_wav(tmp_path / "caller.wav", speech_like(8.0))
    console: list[str] = []
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=[*ARGS, f"--use-file-for-fake-audio-capture={wav}"]
        )
        try:
            page = await browser.new_page()
            page.on("console", lambda message: console.append(message.text))
            page.on("pageerror", lambda error: console.append(f"page error: {error}"))
            await page.goto(demo.api + "/phone")

            # the token is asked for once, and kept for the tab
            await page.wait_for_selector("#token", state="visible", timeout=15000)
            assert await page.is_disabled("#call")
            await page.fill("#token", CALL_TOKEN)
            await page.click("#token-save")
            await wait_for(page, "!document.getElementById('call').disabled", 15, "the call button")
            await page.reload()
            await wait_for(page, "!document.getElementById('call').disabled", 15, "the call button after reload")
            assert await page.is_hidden("#auth")
            microphones = await page.eval_on_selector_all("#mic option", "options => options.length")
            assert microphones >= 2, "the picker lists the fake microphones besides the default"

            await page.click("#call")
            await wait_for(page, "window.moshimoshiPhone.state === 'connected'", 30, "connected")
            call_id = await page.evaluate("window.moshimoshiPhone.callId")
            assert call_id and call_id.startswith("c-")

            # the model's audio plays: RTP arrives and the analyser hears more than silence
            await wait_for(page, "(window.moshimoshiPhone.stats.bytesReceived || 0) > 20000", 30, "model audio")
            await wait_for(page, "window.moshimoshiPhone.stats.agentRms > 0.002", 30, "audible model audio")
            # its words appear (the demo model babbles text as well as audio)
            await wait_for(page, "window.moshimoshiPhone.pieces >= 3", 90, "transcript pieces")
            transcript = (await page.inner_text("#transcript")).strip()
            assert len(transcript) >= 3, transcript
            # call quality from getStats() and the gateway
            await wait_for(page, "document.getElementById('q-rtt').textContent.endsWith('ms')", 15, "round trip")
            await wait_for(
                page, "document.getElementById('q-buffer').textContent.endsWith('ms')", 15, "the gateway's buffer"
            )

            await page.click("#call")
            await wait_for(page, "window.moshimoshiPhone.state === 'idle'", 15, "hung up")
            assert await page.inner_text("#status") == "you hung up"
        finally:
            await browser.close()

    # the gateway ended the call as the browser's hang-up
    deadline = time.monotonic() + 15
    async with httpx.AsyncClient() as http:
        while True:
            metrics = (await http.get(demo.api + "/metrics")).text
            if 'moshimoshi_calls_total{ingress="webrtc",outcome="remote-hangup"} 1.0' in metrics:
                break
            assert time.monotonic() < deadline, metrics[-3000:]
            await asyncio.sleep(0.2)
    assert not [line for line in console if "page error" in line], console
