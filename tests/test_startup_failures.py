"""The first things that go wrong, as a new user meets them: each is one line on stderr, a
non-zero exit, no traceback, and nothing left running (the real commands, started here)."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import time
import typing as tp
from dataclasses import dataclass

import pytest

from tests.support.certs import TestCa
from tests.support.procs import free_port, moshimoshi_cmd, python_env

pytestmark = pytest.mark.system


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    leftovers: bool  # a process of the command's session still runs


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60.0) -> Result:
    """The command in its own session; afterwards, whether anything of that session is left."""
    proc = subprocess.Popen(
        moshimoshi_cmd(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=python_env(**(env or {})),
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"{args[0]} did not exit within {timeout}s") from None
    try:
        os.killpg(proc.pid, 0)
        left = True
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        left = False
    return Result(proc.returncode, stdout, stderr, left)


def one_line(result: Result) -> str:
    """The command's only line on stderr (asserts it is one, without a traceback)."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def last_line(result: Result) -> str:
    """The command's failure: its last line on stderr; before it only log lines below ERROR."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert all(" INFO " in line or " WARNING " in line for line in lines[:-1]), result.stderr
    return lines[-1]


@contextlib.contextmanager
def holding(port: int, *kinds: str) -> tp.Iterator[None]:
    """This process holds ``port`` on 127.0.0.1 (TCP listening, UDP bound)."""
    socks = []
    try:
        for kind in kinds:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", port))
            if kind == "tcp":
                sock.listen()
            socks.append(sock)
        yield
    finally:
        for sock in socks:
            sock.close()


def serve_args(sip: int, http: int, worker: int, model: str = "echo") -> list[str]:
    return [
        "serve",
        "--model",
        model,
        "--asr",
        "off",
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
    ]


HELD_BY_US = f"in use by pid {os.getpid()} ("


@pytest.mark.parametrize(
    "taken, kinds, what, setting",
    [
        ("sip", ("udp",), "SIP port {port} (UDP)", "--sip-port / MOSHIMOSHI_SIP_PORT"),
        ("sip", ("tcp",), "SIP port {port} (TCP)", "--sip-port / MOSHIMOSHI_SIP_PORT"),
        ("http", ("tcp",), "HTTP (API and dashboard) port {port} (TCP)", "--http-port / MOSHIMOSHI_HTTP_PORT"),
        ("worker", ("tcp",), "worker port {port} (TCP)", "--port / MOSHIMOSHI_PORT"),
    ],
)
def test_serve_names_the_port_taken_its_setting_and_its_holder_and_starts_nothing(taken, kinds, what, setting):
    ports = {"sip": free_port(), "http": free_port(), "worker": free_port()}
    with holding(ports[taken], *kinds):
        result = run(*serve_args(ports["sip"], ports["http"], ports["worker"]))
    line = one_line(result)
    assert result.returncode == 1
    assert line.startswith(f"moshimoshi: {what.format(port=ports[taken])} on 127.0.0.1 is {HELD_BY_US}"), line
    assert line.endswith(f"): stop it, or choose another port with {setting}"), line
    assert not result.leftovers, "serve left a process running"
    assert "API token" not in result.stdout  # it failed before it started anything


def test_serve_names_the_tls_port_taken(tmp_path):
    issued = TestCa(tmp_path).issue("gateway")
    tls = free_port()
    with holding(tls, "tcp"):
        result = run(
            *serve_args(free_port(), free_port(), free_port()),
            "--sip-tls-cert",
            str(issued.cert),
            "--sip-tls-key",
            str(issued.key),
            "--sip-tls-port",
            str(tls),
        )
    line = one_line(result)
    assert result.returncode == 1 and not result.leftovers
    assert line.startswith(f"moshimoshi: SIP over TLS port {tls} (TCP) on 127.0.0.1 is {HELD_BY_US}"), line
    assert line.endswith("--sip-tls-port / MOSHIMOSHI_SIP_TLS_PORT"), line


def test_the_gateway_alone_names_the_http_port_taken():
    http = free_port()
    with holding(http, "tcp"):
        result = run(
            "gateway",
            "--worker-url",
            "echo:",
            "--sip-host",
            "127.0.0.1",
            "--sip-port",
            str(free_port()),
            "--http-host",
            "127.0.0.1",
            "--http-port",
            str(http),
        )
    line = one_line(result)
    assert result.returncode == 1 and not result.leftovers
    assert line.startswith(f"moshimoshi: HTTP (API and dashboard) port {http} (TCP) on 127.0.0.1 is {HELD_BY_US}")


@pytest.mark.parametrize(
    "command, extra, what, setting",
    [
        ("worker", ("--model", "echo"), "worker", "--port / MOSHIMOSHI_PORT"),
        ("asr", ("--model", "demo"), "ASR worker", "--port / MOSHIMOSHI_ASR_PORT"),
    ],
)
def test_a_worker_names_its_port_taken(command, extra, what, setting):
    port = free_port()
    with holding(port, "tcp"):
        result = run(command, "--host", "127.0.0.1", "--port", str(port), *extra)
    line = one_line(result)
    assert result.returncode == 1 and not result.leftovers
    assert line == (
        f"moshimoshi: {what} port {port} (TCP) on 127.0.0.1 is {HELD_BY_US}"
        f"{line.split(HELD_BY_US, 1)[1].split(')', 1)[0]}): stop it, or choose another port with "
        f"{setting}"
    ), line


# -- Redis --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command, extra",
    [
        ("serve", ("--model", "echo", "--asr", "off", "--sip-host", "127.0.0.1", "--http-host", "127.0.0.1")),
        ("gateway", ("--sip-host", "127.0.0.1", "--http-host", "127.0.0.1")),
        ("worker", ("--model", "echo", "--host", "127.0.0.1")),
        ("asr", ("--model", "demo", "--host", "127.0.0.1")),
    ],
)
def test_an_unreachable_redis_stops_the_start_after_the_wait(command, extra):
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    ports = ["--sip-port", str(free_port()), "--http-port", str(free_port())] if command in ("serve", "gateway") else []
    if command != "gateway":
        ports += ["--port", str(free_port())]
    started = time.monotonic()
    result = run(
        command,
        *extra,
        *ports,
        "--redis-connect-seconds",
        "1.5",
        env={"REDIS_URL": url, "MOSHIMOSHI_API_TOKENS": "t-0123456789abcdef:admin"},
    )
    took = time.monotonic() - started
    line = last_line(result)
    assert result.returncode == 1 and not result.leftovers
    assert line.startswith(f"moshimoshi: Redis at {url} did not answer within 1.5 s ("), line
    assert line.endswith(
        "): start it, or set REDIS_URL / --redis-url to one that runs (--redis-connect-seconds waits longer)"
    ), line
    assert "Connection refused" in line
    assert took < 30, f"{command} took {took:.0f} s to give up"


def sip_options_status(port: int) -> int | None:
    """The status a gateway answers an OPTIONS with (None: no answer within 2 s)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(2.0)
        local = sock.getsockname()[1]
        sock.sendto(
            (
                f"OPTIONS sip:agent@127.0.0.1:{port} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP 127.0.0.1:{local};branch=z9hG4bK{secrets.token_hex(6)};rport\r\n"
                f"Max-Forwards: 70\r\nFrom: <sip:probe@127.0.0.1>;tag={secrets.token_hex(4)}\r\n"
                f"To: <sip:agent@127.0.0.1:{port}>\r\nCall-ID: {secrets.token_hex(8)}\r\n"
                "CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
            ).encode(),
            ("127.0.0.1", port),
        )
        try:
            data, _ = sock.recvfrom(65535)
        except TimeoutError:
            return None
    return int(data.split(b" ", 2)[1])


def test_a_redis_outage_after_start_is_loud_and_refuses_calls_until_redis_is_back(redis_server, tmp_path):
    import httpx

    from tests.support.polling import wait_until
    from tests.support.system import running_system

    def until(predicate: tp.Callable[[], bool], what: str, within: float = 20.0) -> None:
        wait_until(predicate, within, what, detail=system.output, interval=0.2)

    with running_system(tmp_path, model="echo", env={"REDIS_URL": redis_server.url}) as system:
        assert sip_options_status(system.sip_port) == 200
        redis_server.stop()
        until(lambda: httpx.get(system.api + "/readyz").status_code == 503, "/readyz 503")
        assert httpx.get(system.api + "/readyz").json()["redis"] is False
        assert sip_options_status(system.sip_port) == 503
        until(lambda: "out of the pool until Redis answers again" in system.output(), "the worker leaves the pool")
        output = system.output()
        assert "ERROR moshimoshi.gateway: Redis unreachable: new calls are refused (503) until it is back" in output
        assert output.count("Redis unreachable: new calls are refused") == 1  # said once, not every second
        redis_server.start()
        until(lambda: httpx.get(system.api + "/readyz").status_code == 200, "ready again")
        assert sip_options_status(system.sip_port) == 200
        assert "Redis is back: new calls are taken again" in system.output()


# -- an unknown Hugging Face repo, the Hub out of reach ------------------------------------


def out_of_reach_hub(tmp_path, how: str) -> dict[str, str]:
    """An empty Hugging Face cache, and the Hub either refusing connections or switched off."""
    env = {
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
        "MOSHIMOSHI_API_TOKENS": "t-0123456789abcdef:admin",
    }
    if how == "refused":  # an air-gapped machine: nothing answers where the Hub should be
        return {**env, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    return {**env, "HF_HUB_OFFLINE": "1"}


HUB_WHY = {
    "refused": "Hugging Face is unreachable (http://127.0.0.1:{port}: ConnectionError)",
    "offline": "Hugging Face is unreachable (HF_HUB_OFFLINE is set)",
}
NOT_CACHED = "and the file is not in the local cache (download it once, or set HF_HOME to a cache that has it)"


@pytest.mark.parametrize("how", ["refused", "offline"])
def test_serve_with_an_unknown_repo_and_no_hub_fails_fast_in_one_line(tmp_path, how):
    env = out_of_reach_hub(tmp_path, how)
    started = time.monotonic()
    result = run(*serve_args(free_port(), free_port(), free_port(), model="nobody/nothing-here"), env=env)
    took = time.monotonic() - started
    assert result.returncode == 1 and not result.leftovers
    assert "Traceback" not in result.stderr, result.stderr
    assert "Retry" not in result.stderr and "retry" not in result.stderr  # huggingface_hub's own, ~26 s of them
    last = result.stderr.strip().splitlines()[-1]
    port = env.get("HF_ENDPOINT", ":0").rsplit(":", 1)[1]
    assert last == (
        "moshimoshi: the worker exited (status 2) before it was ready: checkpoint nobody/nothing-here: "
        f"cannot fetch config.json: {HUB_WHY[how].format(port=port)} {NOT_CACHED}"
    ), last
    assert result.stderr.count("cannot fetch config.json") == 1, result.stderr  # serve says it, the worker not too
    assert "moshimoshi ready" not in result.stdout
    assert took < 30, f"{took:.0f} s to give up"


def test_a_worker_with_an_unknown_repo_and_no_hub_says_so_once_and_exits(tmp_path):
    env = out_of_reach_hub(tmp_path, "refused")
    started = time.monotonic()
    result = run("worker", "--model", "nobody/nothing-here", "--host", "127.0.0.1", "--port", str(free_port()), env=env)
    took = time.monotonic() - started
    assert result.returncode == 2 and not result.leftovers
    assert "Traceback" not in result.stderr, result.stderr
    errors = [
        line
        for line in result.stderr.splitlines()
        if " ERROR " in line or " WARNING " in line and "no worker secret" not in line
    ]
    port = env["HF_ENDPOINT"].rsplit(":", 1)[1]
    assert len(errors) == 1 and errors[0].endswith(
        f"ERROR service.worker: worker failed: checkpoint nobody/nothing-here: cannot fetch config.json: "
        f"{HUB_WHY['refused'].format(port=port)} {NOT_CACHED}"
    ), result.stderr
    assert took < 30, f"{took:.0f} s to give up"


# -- moshimoshi call ----------------------------------------------------------------------


def test_a_call_to_where_nothing_answers_fails_fast():
    port = free_port(socket.SOCK_DGRAM)  # nothing listens there
    started = time.monotonic()
    result = run("call", f"sip:agent@127.0.0.1:{port}", "--response-seconds", "2", "--local-host", "127.0.0.1")
    took = time.monotonic() - started
    assert result.returncode == 1 and not result.leftovers
    assert one_line(result) == (
        f"moshimoshi call: nothing answered at 127.0.0.1:{port} over UDP within 2 s: is a gateway running there?"
    )
    assert took < 15, f"{took:.0f} s (Timer B would wait 32 s)"


def test_a_call_writes_its_transcript_file_and_says_invalid_token_when_the_token_was_refused(tmp_path):
    from tests.support.services import Process, wait_until

    sip, http = free_port(), free_port()
    gateway = Process(
        "gateway",
        [
            "gateway",
            "--worker-url",
            "echo:",
            "--sip-host",
            "127.0.0.1",
            "--sip-port",
            str(sip),
            "--http-host",
            "127.0.0.1",
            "--http-port",
            str(http),
        ],
        tmp_path,
        env={"MOSHIMOSHI_API_TOKENS": "good-token-0123456789:read"},
    )
    try:
        wait_until(lambda: "moshimoshi ready" in gateway.log(), 60, "the gateway ready", gateway)
        uri = f"sip:agent@127.0.0.1:{sip}"
        api = f"http://127.0.0.1:{http}"
        common = ("--seconds", "2.5", "--local-host", "127.0.0.1", "--dtmf", "5")  # DTMF 1 s in
        cases = {
            "refused": (
                ("--api", api, "--api-token", "not-the-token"),
                f"the API at {api} refused the token: invalid token",
            ),
            "no token": (
                ("--api", api),
                f"the API at {api} needs a token: pass --api-token (or "
                "MOSHIMOSHI_API_TOKEN; moshimoshi serve prints one at start)",
            ),
            "unreachable": (("--api", f"http://127.0.0.1:{free_port()}", "--api-token", "x"), "is unreachable: "),
        }
        for name, (extra, said) in cases.items():
            path = tmp_path / f"{name}.txt"
            result = run("call", uri, *common, "--transcript", str(path), *extra)
            assert result.returncode == 0, result.stderr  # the call itself went well
            assert said in one_line(result) and one_line(result).startswith("moshimoshi call: no transcript: ")
            assert path.read_text() == f"# no transcript: {one_line(result).split('no transcript: ', 1)[1]}\n"
        path = tmp_path / "good.txt"
        result = run(
            "call", uri, *common, "--transcript", str(path), "--api", api, "--api-token", "good-token-0123456789"
        )
        assert result.returncode == 0 and not result.stderr.strip(), result.stderr
        assert "DTMF: *" in path.read_text()  # digits are stored masked unless --dtmf-clear
    finally:
        gateway.stop()
