"""Kamailio (Debian's ``kamailio`` package) as a real SIP proxy in tests.

It runs the documented config, ``ops/kamailio/kamailio.cfg``, unchanged: the test's paths,
port and probe interval come in as pre-processor defines (``-A``) and ``-l``, which the
config reads with ``#!ifndef`` defaults. Foreground (``-DD -E``), a private runtime
directory (``-Y``), its ctl socket in the test's folder for ``kamcmd``; no root needed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.support.procs import REPO_ROOT, free_port

CONFIG = REPO_ROOT / "ops" / "kamailio" / "kamailio.cfg"


def have_kamailio() -> bool:
    return shutil.which("kamailio") is not None and shutil.which("kamcmd") is not None


class Kamailio:
    """One Kamailio in front of ``destinations`` (dispatcher set 1) on a free loopback port."""

    def __init__(self, workdir: Path, destinations: list[str], *, probe_interval: int = 1) -> None:
        self.dir = workdir / f"kamailio-{free_port()}"
        self.dir.mkdir(parents=True)
        self.port = free_port()
        self.destinations = destinations
        self.list_file = self.dir / "dispatcher.list"
        self.list_file.write_text("".join(f"1 {uri}\n" for uri in destinations))
        self.ctl = f"unix:{self.dir / 'ctl'}"
        self.log_path = self.dir / "kamailio.log"
        runtime = self.dir / "run"
        runtime.mkdir()
        self.args = [
            "kamailio",
            "-f",
            str(CONFIG),
            "-DD",
            "-E",
            "-Y",
            str(runtime),
            "-w",
            str(self.dir),
            "-m",
            "32",
            "-M",
            "4",
            "-l",
            f"udp:127.0.0.1:{self.port}",
            "-l",
            f"tcp:127.0.0.1:{self.port}",
            "-A",
            f'DISPATCHER_LIST="{self.list_file}"',
            "-A",
            f'CTL_SOCKET="{self.ctl}"',
            "-A",
            f"PROBE_INTERVAL={probe_interval}",
        ]
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"sip:agent@127.0.0.1:{self.port}"

    def check(self) -> subprocess.CompletedProcess:
        """``kamailio -c``: the config parses with these defines."""
        return subprocess.run([*self.args, "-c"], capture_output=True, text=True, timeout=30)

    def start(self, within: float = 30.0) -> Kamailio:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"kamailio exited {self.proc.returncode}:\n{self.log()[-4000:]}")
            if self.rpc_ok("core.version"):
                return self
            time.sleep(0.1)
        raise AssertionError(f"kamailio did not answer on {self.ctl} within {within}s:\n{self.log()[-4000:]}")

    def rpc_ok(self, *command: str) -> bool:
        try:
            return subprocess.run(["kamcmd", "-s", self.ctl, *command], capture_output=True, timeout=10).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def rpc(self, *command: str) -> str:
        result = subprocess.run(["kamcmd", "-s", self.ctl, *command], capture_output=True, text=True, timeout=10)
        assert result.returncode == 0, f"kamcmd {' '.join(command)}: {result.stdout}{result.stderr}"
        return result.stdout

    def states(self) -> dict[str, str]:
        """Dispatcher set 1: destination URI → FLAGS (``AP`` active and probed, ``IP``
        inactive and probed, ``TP`` trying)."""
        listing = self.rpc("dispatcher.list")
        return dict(re.findall(r"URI:\s*(\S+)\s+FLAGS:\s*(\S+)", listing))

    def probing(self, active: bool) -> None:
        """Start or stop OPTIONS probing (``dispatcher.ping_active``)."""
        self.rpc("dispatcher.ping_active", "1" if active else "0")

    def set_state(self, state: str, uri: str) -> None:
        self.rpc("dispatcher.set_state", state, "1", uri)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode
