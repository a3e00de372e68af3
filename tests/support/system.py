"""A whole running system for tests: ``moshimoshi serve`` (embedded redis-server, one worker
child, the gateway) on free ports, with API tokens, and test calls placed with
``moshimoshi call``.

    with running_system(tmp_path, model="demo") as system:
        call = system.call(seconds=5)             # python -m service call ..., in the background
        requests.get(system.api + "/v1/calls", headers=system.headers("read"))
        summary = call.result()                   # the call's JSON summary

The process runs in its own session (process group), its output (stdout and stderr) goes to
``system.log_path``; teardown stops it with SIGINT, waits, kills the whole group if it
hangs, and checks the exit status.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import typing as tp
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.procs import free_port, moshimoshi_cmd, python_env

READ_TOKEN = "test-read-token-0123456789"
ADMIN_TOKEN = "test-admin-token-0123456789"
CALL_TOKEN = "test-call-token-0123456789"
DEFAULT_TOKENS = {"read": READ_TOKEN, "admin": ADMIN_TOKEN, "call": CALL_TOKEN}


class SystemFailed(AssertionError):
    """The system did not start, or did not stop cleanly; the message has its output's tail."""


@dataclass
class TestCallProcess:
    """A ``moshimoshi call`` running in the background."""

    proc: subprocess.Popen
    log_path: Path

    def result(self, timeout: float = 60.0) -> dict[str, tp.Any]:
        """Wait for the call to end; its JSON summary (fails on a non-zero exit)."""
        try:
            stdout, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the test call did not end within {timeout}s") from None
        output = self.log_path.read_text(errors="replace")
        assert self.proc.returncode == 0, f"moshimoshi call exited {self.proc.returncode}: {output[-3000:]}"
        return json.loads(stdout.strip().splitlines()[-1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass
class RunningSystem:
    """One ``moshimoshi serve`` process and what tests need to reach it."""

    proc: subprocess.Popen
    sip_port: int
    http_port: int
    worker_port: int
    log_path: Path
    workdir: Path
    tokens: dict[str, str] = field(default_factory=dict)
    calls: list[TestCallProcess] = field(default_factory=list)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def worker_http(self) -> str:
        return f"http://127.0.0.1:{self.worker_port}"

    @property
    def sip_uri(self) -> str:
        return f"sip:agent@127.0.0.1:{self.sip_port}"

    def headers(self, scope: str = "read") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[scope]}"}

    def output(self) -> str:
        """Everything the process (gateway, worker, redis) wrote so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def call(
        self,
        *,
        seconds: float = 5.0,
        play: str | Path | None = None,
        record: str | Path | None = None,
        extra: tp.Sequence[str] = (),
    ) -> TestCallProcess:
        """Place a call with ``moshimoshi call`` in the background."""
        index = len(self.calls)
        args = [
            self.sip_uri,
            "--seconds",
            str(seconds),
            "--local-host",
            "127.0.0.1",
            "--api",
            self.api,
            "--api-token",
            self.tokens.get("read", ""),
        ]
        if play is not None:
            args += ["--play", str(play)]
        args += ["--record", str(record if record is not None else self.workdir / f"call{index}.wav")]
        log_path = self.workdir / f"call{index}.log"
        with log_path.open("w") as stderr:
            proc = subprocess.Popen(
                moshimoshi_cmd("call", *args, *extra),
                env=python_env(),
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        call = TestCallProcess(proc, log_path)
        self.calls.append(call)
        return call

    def wait_ready(self, within: float) -> None:
        deadline = time.monotonic() + within
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise SystemFailed(
                        f"serve exited with {self.proc.returncode} before it was ready:\n{self.output()[-4000:]}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(self.api + "/readyz").status_code == 200:
                        return
                time.sleep(0.2)
        raise SystemFailed(f"serve not ready within {within}s:\n{self.output()[-4000:]}")

    def stop(self, sig: int = signal.SIGINT, within: float = 30.0) -> int:
        """Stop the system (SIGINT: at once; SIGTERM: drain); kill the group if it hangs.
        Returns the exit status; a hang raises SystemFailed."""
        for call in self.calls:
            call.stop()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(within)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                raise SystemFailed(
                    f"serve did not stop within {within}s after signal {sig}:\n{self.output()[-4000:]}"
                ) from None
        # the worker child and redis-server go down with serve; make sure nothing is left
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode


def start_system(
    workdir: Path,
    *,
    model: str = "echo",
    tokens: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    args: tp.Sequence[str] = (),
    slots: int = 2,
    ready_within: float = 180.0,
) -> RunningSystem:
    """Start ``moshimoshi serve`` on free loopback ports and wait until /readyz says ready."""
    workdir.mkdir(parents=True, exist_ok=True)
    tokens = dict(DEFAULT_TOKENS if tokens is None else tokens)
    sip_port = free_port()
    http_port = free_port()
    worker_port = free_port()
    extra_env = {"MOSHIMOSHI_API_TOKENS": ",".join(f"{t}:{scope}" for scope, t in tokens.items())}
    extra_env.update(env or {})
    command = moshimoshi_cmd(
        "serve",
        "--model",
        model,
        "--sip-host",
        "127.0.0.1",
        "--sip-port",
        str(sip_port),
        "--http-host",
        "127.0.0.1",
        "--http-port",
        str(http_port),
        "--host",
        "127.0.0.1",
        "--port",
        str(worker_port),
        "--slots",
        str(slots),
        # the callers' transcript is tested in test_asr_*.py: here its worker would only take CPU
        *(() if "--asr" in args else ("--asr", "off")),
        *args,
    )
    log_path = workdir / "serve.log"
    with log_path.open("w") as out:
        proc = subprocess.Popen(
            command,
            env=python_env(**extra_env),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=workdir,
            start_new_session=True,
        )
    system = RunningSystem(proc, sip_port, http_port, worker_port, log_path, workdir, tokens)
    try:
        system.wait_ready(ready_within)
    except BaseException:
        with contextlib.suppress(SystemFailed):
            system.stop(signal.SIGKILL, within=10)
        raise
    return system


@contextlib.contextmanager
def running_system(workdir: Path, *, expect_exit: int | None = 0, **kwargs: tp.Any) -> Iterator[RunningSystem]:
    """``start_system`` for the body of a ``with``; stops it after and checks its exit
    status (``expect_exit=None`` skips the check)."""
    system = start_system(workdir, **kwargs)
    try:
        yield system
    except BaseException:
        with contextlib.suppress(SystemFailed):
            system.stop()
        raise
    status = system.stop()
    if expect_exit is not None and status != expect_exit:
        raise SystemFailed(f"serve exited with {status}, expected {expect_exit}:\n{system.output()[-4000:]}")
