"""Running sipp (sip-tester) as a real SIP peer from asyncio tests."""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
from pathlib import Path

from sip.dialog import Dialog
from sip.errors import CallCancelled
from sip.sdp import MediaPreferences, answer_offer, build_offer
from sip.ua import IncomingCall
from tests.support.procs import REPO_ROOT, free_port

SCENARIOS = REPO_ROOT / "ops" / "sipp"


def have_sipp() -> bool:
    return shutil.which("sipp") is not None


def media_port() -> int:
    """A port for sipp's ``-mp``: sipp binds it and the three above it (RTCP, video RTP and
    RTCP), so all four must be free."""
    while True:
        base = free_port(socket.SOCK_DGRAM)
        sockets: list[socket.socket] = []
        try:
            for port in range(base, base + 4):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
        return base


class Sipp:
    """One sipp process on 127.0.0.1 with its own free port, one call (-m 1), a global
    timeout, and unexpected messages traced into ``tmp_path``."""

    def __init__(self, tmp_path: Path, *args: str, transport: str = "u1", timeout_s: int = 30) -> None:
        self.port = free_port()
        self.dir = tmp_path
        self.transport = transport
        self.errors = tmp_path / f"sipp-{self.port}-errors.log"
        self.screen = tmp_path / f"sipp-{self.port}-screen.log"
        self.args = [
            "sipp",
            *args,
            "-i",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-t",
            transport,
            "-m",
            "1",
            "-timeout",
            f"{timeout_s}s",
            "-timeout_error",
            "-nostdin",
            "-trace_err",
            "-error_file",
            str(self.errors),
            "-trace_screen",
            "-screen_file",
            str(self.screen),
        ]
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> Sipp:
        self.proc = await asyncio.create_subprocess_exec(
            *self.args, cwd=self.dir, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        return self

    async def listening(self, within: float = 10.0) -> None:
        """Wait until sipp has bound its port (for scenarios where sipp is the server)."""
        kind = socket.SOCK_DGRAM if self.transport.startswith("u") else socket.SOCK_STREAM
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            with socket.socket(socket.AF_INET, kind) as probe:
                try:
                    probe.bind(("127.0.0.1", self.port))
                except OSError:
                    return
            assert self.proc is not None
            if self.proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        raise AssertionError(f"sipp did not bind port {self.port}: {self.report()}")

    async def finished(self, within: float = 60.0) -> None:
        """Wait for sipp to exit; fail with its error log unless it exited 0."""
        assert self.proc is not None
        try:
            _, stderr = await asyncio.wait_for(self.proc.communicate(), within)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise AssertionError(f"sipp still running after {within} s: {self.report()}") from None
        if self.proc.returncode != 0:
            raise AssertionError(
                f"sipp exited {self.proc.returncode}: {stderr.decode(errors='replace')}{self.report()}"
            )

    def report(self) -> str:
        parts = []
        for path in (self.errors, self.screen):
            if path.exists():
                parts.append(f"\n--- {path.name} ---\n{path.read_text(errors='replace')[-4000:]}")
        return "".join(parts)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


class Answering:
    """Our user agent's ``on_invite`` for sipp's calling scenarios: rings, answers every
    call with an SDP answer built by sip.sdp, and hands out the dialogs in order."""

    def __init__(self) -> None:
        self.dialogs: asyncio.Queue[Dialog] = asyncio.Queue()

    async def __call__(self, call: IncomingCall) -> None:
        await call.ringing()
        answer, _ = answer_offer(call.offer, MediaPreferences(), "127.0.0.1", 40000)
        self.dialogs.put_nowait(await call.accept(str(answer)))

    async def dialog(self) -> Dialog:
        return await asyncio.wait_for(self.dialogs.get(), 20)


class RingingUntilCancelled:
    """Our user agent's ``on_invite`` for sipp's cancelling scenarios: rings until the
    caller cancels, then tries to answer all the same; ``outcome`` gets the CallCancelled
    that answer must raise."""

    def __init__(self) -> None:
        self.outcome: asyncio.Future[CallCancelled] = asyncio.get_running_loop().create_future()

    async def __call__(self, call: IncomingCall) -> None:
        await call.ringing()
        await asyncio.wait_for(call.cancelled.wait(), 20)
        try:
            await call.accept(str(build_offer(MediaPreferences(), "127.0.0.1", 40000)))
        except CallCancelled as exc:
            self.outcome.set_result(exc)
