"""Real moshimoshi processes for end-to-end tests: serve, gateway, worker, on free ports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from tests.support import polling
from tests.support.procs import WORKER_SECRET, free_port, moshimoshi_cmd, python_env

ADMIN_TOKEN = "test-admin-token"
READ_TOKEN = "test-read-token"
CALL_TOKEN = "test-call-token"
OTHER_CALL_TOKEN = "test-other-call-token"
TOKENS = f"{ADMIN_TOKEN}:admin,{READ_TOKEN}:read,{CALL_TOKEN}:call,{OTHER_CALL_TOKEN}:call"


def http_json(
    url: str, token: str | None = ADMIN_TOKEN, method: str = "GET", timeout: float = 5.0
) -> tuple[int, dict | list | str]:
    """A request with ``Authorization: Bearer <token>`` (a worker's /v1: the worker secret)."""
    request = urllib.request.Request(url, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read().decode()
            status = response.status
    except urllib.error.HTTPError as exc:
        body, status = exc.read().decode(), exc.code
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


class Process:
    """A child process in its own process group, its output in a log file."""

    def __init__(self, name: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            moshimoshi_cmd(*args),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=python_env(**(env or {})),
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.alive():
            os.killpg(self.proc.pid, sig)

    def kill9(self) -> None:
        """SIGKILL the process itself (not its group: a worker's children die with it)."""
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.alive():
            self.signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


def wait_until(predicate, timeout: float, what: str, proc: Process | None = None, interval: float = 0.1):
    """``polling.wait_until``, failing at once, with its log, if ``proc`` exits meanwhile."""

    def check():
        if proc is not None and not proc.alive():
            raise AssertionError(
                f"{proc.name} exited ({proc.proc.returncode}) while waiting for {what}:\n{proc.log()[-4000:]}"
            )
        return predicate()

    detail = (lambda: f"{proc.name} log:\n{proc.log()}") if proc is not None else None
    return polling.wait_until(check, timeout, what, detail, interval=interval)


class Gateway:
    """A running gateway (``serve`` or ``gateway``) and how to reach it."""

    def __init__(self, proc: Process, sip_port: int, http_port: int) -> None:
        self.proc = proc
        self.sip_port = sip_port
        self.http_port = http_port

    @property
    def uri(self) -> str:
        return f"sip:agent@127.0.0.1:{self.sip_port}"

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def get(self, path: str, token: str | None = ADMIN_TOKEN):
        return http_json(self.api + path, token)

    def post(self, path: str, token: str | None = ADMIN_TOKEN):
        return http_json(self.api + path, token, method="POST")

    def ready(self) -> bool:
        status, _ = self.get("/readyz", token=None)
        return status == 200

    def wait_ready(self, timeout: float = 90.0) -> None:
        wait_until(lambda: self._try_ready(), timeout, f"{self.proc.name} ready", self.proc)

    def _try_ready(self) -> bool:
        try:
            return self.ready()
        except OSError:
            return False


def gateway_args(sip_port: int, http_port: int) -> list[str]:
    return [
        "--sip-host",
        "127.0.0.1",
        "--sip-port",
        str(sip_port),
        "--http-host",
        "127.0.0.1",
        "--http-port",
        str(http_port),
        "--rtp-port-min",
        "21000",
        "--rtp-port-max",
        "29000",
    ]


def start_serve(
    log_dir: Path,
    model: str = "echo",
    *extra: str,
    env: dict[str, str] | None = None,
    name: str = "serve",
    asr: bool = False,
) -> Gateway:
    """``moshimoshi serve`` (embedded Redis, one worker, the gateway) on free ports; with
    ``asr`` also its ASR worker (off by default here: the tests that do not look at the
    callers' transcript leave the two cores to the calls)."""
    sip_port, http_port, worker_port = free_port(), free_port(), free_port()
    args = [
        "serve",
        "--model",
        model,
        *gateway_args(sip_port, http_port),
        "--host",
        "127.0.0.1",
        "--port",
        str(worker_port),
        "--asr",
        "on" if asr else "off",
        *extra,
    ]
    proc = Process(name, args, log_dir, env={"MOSHIMOSHI_API_TOKENS": TOKENS, **(env or {})})
    return Gateway(proc, sip_port, http_port)


def start_gateway(
    log_dir: Path, redis_url: str, *extra: str, name: str = "gateway", env: dict[str, str] | None = None
) -> Gateway:
    sip_port, http_port = free_port(), free_port()
    proc = Process(
        name,
        ["gateway", *gateway_args(sip_port, http_port), *extra],
        log_dir,
        env={"REDIS_URL": redis_url, "MOSHIMOSHI_API_TOKENS": TOKENS, **(env or {})},
    )
    return Gateway(proc, sip_port, http_port)


class Worker:
    def __init__(self, proc: Process, port: int, worker_id: str) -> None:
        self.proc = proc
        self.port = port
        self.worker_id = worker_id

    def info(self) -> dict:
        status, body = http_json(f"http://127.0.0.1:{self.port}/v1/info", token=WORKER_SECRET)
        return body if status == 200 and isinstance(body, dict) else {}

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            try:
                status, _ = http_json(f"http://127.0.0.1:{self.port}/readyz", token=None)
            except OSError:
                return False
            return status == 200

        wait_until(ready, timeout, f"{self.proc.name} ready", self.proc)


def start_worker(
    log_dir: Path, redis_url: str, worker_id: str, model: str = "echo", slots: int = 2, *extra: str
) -> Worker:
    port = free_port()
    proc = Process(
        worker_id,
        [
            "worker",
            "--model",
            model,
            "--slots",
            str(slots),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--worker-id",
            worker_id,
            "--heartbeat-seconds",
            "0.5",
            *extra,
        ],
        log_dir,
        env={"REDIS_URL": redis_url},
    )
    return Worker(proc, port, worker_id)
