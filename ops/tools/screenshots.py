"""The README's pictures: the dashboard and the softphone during a live demo call.

``make screenshots`` runs this: it starts ``moshimoshi serve --model demo`` on free ports,
places a SIP call (``moshimoshi call`` from +81312345678, shown masked, to 0501234567) and a WebRTC call from
the softphone in headless Chromium (its fake microphone), one after the other, lets the
transcript and the figures fill in, and writes, at 1280×800 and 390×844 (failing if a page
scrolls sideways):

    ops/screenshots/dashboard-1280.png   ops/screenshots/dashboard-390.png
    ops/screenshots/softphone-1280.png   ops/screenshots/softphone-390.png

The demo model has random weights: its words are babble, as the README says.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "ops" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
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
    "--mute-audio",
]
WIDTHS = {1280: 800, 390: 844}
TOKEN = "screenshot-admin-token-0123456789"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ready(api: str) -> bool:
    try:
        with urllib.request.urlopen(api + "/readyz", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


async def until(page, expression: str, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await page.evaluate(expression):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {within:.0f} s")
        await asyncio.sleep(0.25)


async def picture(page, name: str, written: list[Path]) -> None:
    """``name`` at each width; the page must not scroll sideways at any."""
    OUT.mkdir(parents=True, exist_ok=True)
    for width, height in WIDTHS.items():
        await page.set_viewport_size({"width": width, "height": height})
        await asyncio.sleep(1.5)  # a poll at the new width
        wide, inner = await page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        if wide > inner:
            raise RuntimeError(f"{name} scrolls sideways at {width} px ({wide} > {inner})")
        path = OUT / f"{name}-{width}.png"
        await page.screenshot(path=str(path))
        written.append(path)


async def shoot(api: str, sip: int, settle: float) -> list[Path]:
    """The softphone's call first, then (one call at a time: the demo model on a laptop's CPU)
    a SIP call followed on the dashboard."""
    from playwright.async_api import async_playwright

    written: list[Path] = []
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        phone = await chromium.new_page(viewport={"width": 1280, "height": 800})
        await phone.goto(api + "/phone")
        await phone.wait_for_selector("#token", state="visible", timeout=15_000)
        await phone.fill("#token", TOKEN)
        await phone.click("#token-save")
        await until(phone, "!document.getElementById('call').disabled", 15, "the call button")
        await phone.click("#call")
        await until(phone, "window.moshimoshiPhone.state === 'connected'", 30, "the softphone's call")
        await until(phone, "window.moshimoshiPhone.pieces >= 3", 90, "the softphone's transcript")
        await asyncio.sleep(settle / 2)
        await picture(phone, "softphone", written)
        await phone.click("#call")  # hang up: it is among the recent calls on the dashboard

        caller = await asyncio.create_subprocess_exec(  # the SIP call the dashboard follows
            sys.executable,
            "-m",
            "service",
            "call",
            f"sip:0501234567@127.0.0.1:{sip}",
            "--caller",
            "+81312345678",
            "--seconds",
            "300",
            "--local-host",
            "127.0.0.1",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        try:
            board = await chromium.new_page(viewport={"width": 1280, "height": 800})
            await board.goto(api + "/dashboard")
            await board.fill("#token", TOKEN)
            await board.click("#login-form button[type=submit]")
            await board.wait_for_selector("#calls tbody tr[data-call-id] button.hangup", timeout=30_000)
            await asyncio.sleep(settle)  # words, figures and a few sparkline samples
            await until(
                board,
                "document.querySelector('#transcript .words')?.textContent.length > 10",
                90,
                "the dashboard's transcript",
            )
            await picture(board, "dashboard", written)
        finally:
            caller.terminate()
            await caller.wait()
        await chromium.close()
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settle", type=float, default=20.0, help="seconds of call before the pictures")
    args = parser.parse_args()
    sip, http, worker = free_port(), free_port(), free_port()
    api = f"http://127.0.0.1:{http}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "MOSHIMOSHI_API_TOKENS": f"{TOKEN}:admin"}
    log = tempfile.NamedTemporaryFile("w+", prefix="moshimoshi-screenshots-", suffix=".log")  # noqa: SIM115
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service",
            "serve",
            "--model",
            "demo",
            "--asr",
            "off",
            "--slots",
            "2",
            "--sip-host",
            "127.0.0.1",
            "--sip-port",
            str(sip),
            "--http-host",
            "127.0.0.1",
            "--http-port",
            str(http),
            "--host",
            "127.0.0.1",
            "--port",
            str(worker),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not ready(api):
            if serve.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise SystemExit(f"serve did not get ready:\n{log.read()[-3000:]}")
            time.sleep(0.5)
        written = asyncio.run(shoot(api, sip, args.settle))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(serve.pid, signal.SIGINT)
        try:
            serve.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
        log.close()
    for path in written:
        print(f"{path.relative_to(REPO)}  {path.stat().st_size // 1024} KiB")
    print(json.dumps({"screenshots": [str(p.relative_to(REPO)) for p in written]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
