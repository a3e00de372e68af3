"""The API reference (/docs, Swagger UI) works air-gapped: headless Chromium loads it from the
gateway alone, every request to another host refused."""

from __future__ import annotations

import shutil
from urllib.parse import urlsplit

import pytest

from tests.support.api import api_gateway
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


async def test_the_api_reference_renders_with_nothing_but_the_gateway(redis_server):
    from playwright.async_api import async_playwright

    async with api_gateway(redis_server.url) as api, async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = await chromium.new_page()
        elsewhere: list[str] = []

        async def only_the_gateway(route) -> None:
            if urlsplit(route.request.url).netloc == urlsplit(api.base).netloc:
                await route.continue_()
            else:  # an air-gapped call center: a CDN is not there
                elsewhere.append(route.request.url)
                await route.abort()

        await page.route("**/*", only_the_gateway)
        await page.goto(api.base + "/docs")
        title = await page.wait_for_selector(".swagger-ui .info .title", timeout=15_000)
        assert "moshimoshi gateway" in (await title.text_content() or "")
        # the operations are listed, from the gateway's own OpenAPI document
        await page.wait_for_selector("#operations-calls-hangup_v1_calls__call_id__hangup_post", timeout=15_000)
        assert not elsewhere, f"/docs asked other hosts for {elsewhere}"
        await chromium.close()
