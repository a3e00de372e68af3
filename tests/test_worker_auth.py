"""Workers are not an open door (issue 13, item 7): the worker's /v1 API (sessions, drain,
info) and the ASR worker's need the deployment's worker secret; probes and metrics stay open.

Real workers (uvicorn, the echo engine or the tiny Whisper) and real gateways: refusals are
HTTP 401 before any WebSocket upgrade, counted, and leave no state; a worker that would be
open to the network refuses to start; ``serve`` makes a secret of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import typing as tp

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from service.gateway.routing.worker_link import WorkerLink, WorkerRefused
from service.worker.auth import WorkerAuth, check_exposure, is_loopback, resolve_secret
from tests.support.procs import WORKER_SECRET, free_port, moshimoshi_cmd, python_env
from tests.support.services import http_json, start_gateway, start_serve, start_worker, wait_until
from tests.support.worker import running_worker, start_message, worker_settings

SECRET = "a-worker-secret-of-32-characters"
WRONG = "b-worker-secret-of-32-characters"  # same length: only the comparison can refuse it


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


# --- the settings and the checks ---------------------------------------------------------


def test_the_secret_comes_from_the_setting_or_a_file(tmp_path):
    from service.config import ConfigError

    assert resolve_secret(None, None) is None
    assert resolve_secret(SECRET, None) == SECRET
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")  # as `kubectl create secret --from-file` often leaves it
    assert resolve_secret(None, str(path)) == SECRET
    for secret, secret_file, message in [
        ("short", None, "at least 16"),
        ("has a space in it, so no", None, "without whitespace"),
        (SECRET, str(path), "not both"),
        (None, str(tmp_path / "missing"), "cannot read"),
    ]:
        with pytest.raises(ConfigError, match=message):
            resolve_secret(secret, secret_file)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        resolve_secret(None, str(tmp_path / "empty"))


def test_only_a_loopback_worker_may_run_without_a_secret():
    from service.config import ConfigError

    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.5", "worker.internal"))
    check_exposure("127.0.0.1", None, False)
    check_exposure("0.0.0.0", SECRET, False)
    check_exposure("0.0.0.0", None, True)
    with pytest.raises(ConfigError, match="--insecure-no-worker-secret"):
        check_exposure("0.0.0.0", None, False)


async def test_the_middleware_compares_the_whole_header():
    """Every presented value but the exact one is refused, and counted by endpoint."""
    seen: list[str] = []

    async def app(scope, receive, send):
        seen.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    refused: list[str] = []
    auth = WorkerAuth(app, SECRET, on_refused=refused.append)
    transport = httpx.ASGITransport(app=auth)
    async with httpx.AsyncClient(transport=transport, base_url="http://worker") as client:
        for headers in (
            {},
            bearer(WRONG),
            bearer(SECRET[:-1]),
            bearer(SECRET + "x"),
            {"Authorization": SECRET},
            {"Authorization": f"bearer {SECRET}"},
            {"Authorization": f"Basic {SECRET}"},
        ):
            response = await client.get("/v1/info", headers=headers)
            assert response.status_code == 401, headers
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert SECRET not in response.text
        assert (await client.get("/v1/info", headers=bearer(SECRET))).status_code == 200
        assert (await client.post("/v1/somewhere-new")).status_code == 401  # everything under /v1
        for path in ("/metrics", "/healthz", "/readyz"):
            assert (await client.get(path)).status_code == 200
    assert refused == ["/v1/info"] * 7 + ["other"]
    assert seen == ["/v1/info", "/metrics", "/healthz", "/readyz"]  # no refused request reached the app


# --- a real worker -----------------------------------------------------------------------


async def test_a_worker_with_a_secret_refuses_everyone_else_on_v1(tmp_path):
    settings = worker_settings(model="echo", slots=2, worker_secret=SECRET)
    async with running_worker(settings) as worker, httpx.AsyncClient(base_url=worker.http) as client:
        for path in ("/healthz", "/readyz", "/metrics"):  # probes and Prometheus need no secret
            assert (await client.get(path)).status_code == 200, path
        assert (await client.get("/v1/info")).status_code == 401
        assert (await client.get("/v1/info", headers=bearer(WRONG))).status_code == 401
        drain = await client.post("/v1/drain", headers=bearer(WRONG))
        assert drain.status_code == 401
        assert worker.runtime.state == "ready"  # an unauthenticated drain does nothing

        # a WebSocket without the secret is refused before the upgrade: no session, no slot
        with pytest.raises(InvalidStatus) as refused:
            async with connect(worker.url):
                pass
        assert refused.value.response.status_code == 401
        with pytest.raises(InvalidStatus):
            async with connect(worker.url, additional_headers=bearer(WRONG)):
                pass
        info = (await client.get("/v1/info", headers=bearer(SECRET))).json()
        assert info["free"] == 2 and info["busy"] == 0

        async with connect(worker.url, additional_headers=bearer(SECRET)) as ws:
            await ws.send(start_message(call_id="with-secret"))
            assert json.loads(await ws.recv())["type"] == "started"

        metrics = (await client.get("/metrics")).text
        assert 'moshimoshi_worker_auth_refused_total{endpoint="/v1/info"} 2.0' in metrics
        assert 'moshimoshi_worker_auth_refused_total{endpoint="/v1/drain"} 1.0' in metrics
        assert 'moshimoshi_worker_auth_refused_total{endpoint="/v1/session"} 2.0' in metrics

        assert (await client.post("/v1/drain", headers=bearer(SECRET))).status_code == 202


async def test_the_gateway_link_presents_the_secret_and_says_why_it_was_refused():
    settings = worker_settings(model="echo", slots=1, worker_secret=SECRET)
    async with running_worker(settings) as worker:
        wrong = WorkerLink(worker.url, "call-wrong", secret=WRONG)
        with pytest.raises(WorkerRefused) as refused:
            await wrong.open(timeout=5)
        assert refused.value.code == 401 and "MOSHIMOSHI_WORKER_SECRET" in refused.value.reason
        missing = WorkerLink(worker.url, "call-missing")
        with pytest.raises(WorkerRefused):
            await missing.open(timeout=5)
        link = WorkerLink(worker.url, "call-right", secret=SECRET)
        info = await link.open(timeout=5)
        assert info.slot == 0
        await link.close()


# --- processes ---------------------------------------------------------------------------


def run_worker_process(tmp_path, *args: str, env: dict[str, str], timeout: float = 60) -> tuple[int, str]:
    """``moshimoshi worker`` that is expected to exit by itself: (status, output)."""
    proc = subprocess.run(
        moshimoshi_cmd("worker", "--model", "echo", "--port", str(free_port()), *args),
        env=python_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.system
def test_a_worker_open_to_the_network_without_a_secret_does_not_start(tmp_path):
    status, output = run_worker_process(tmp_path, "--host", "0.0.0.0", env={"MOSHIMOSHI_WORKER_SECRET": ""})
    assert status == 2, output
    assert "MOSHIMOSHI_WORKER_SECRET" in output and "--insecure-no-worker-secret" in output
    status, output = run_worker_process(tmp_path, "--host", "0.0.0.0", env={"MOSHIMOSHI_WORKER_SECRET": "short"})
    assert status == 2 and "at least 16 characters" in output, output
    assert "short" not in output.replace("at least 16", "")  # the bad secret is not echoed
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET)
    status, output = run_worker_process(tmp_path, "--host", "0.0.0.0", "--worker-secret-file", str(secret_file), env={})
    assert status == 2 and "not both" in output, output  # the suite's own secret is set too


@contextlib.contextmanager
def worker_process(tmp_path, *args: str, env: dict[str, str]) -> tp.Iterator[int]:
    port = free_port()
    log = (tmp_path / f"worker-{port}.log").open("w")
    proc = subprocess.Popen(
        moshimoshi_cmd("worker", "--model", "echo", "--port", str(port), "--slots", "1", *args),
        env=python_env(**env),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until(lambda: _answers(port), 60, "the worker to listen")
        yield port
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _answers(port: int) -> bool:
    try:
        return http_json(f"http://127.0.0.1:{port}/readyz", token=None)[0] == 200
    except OSError:
        return False


@pytest.mark.system
def test_a_worker_reads_its_secret_from_a_mounted_file_or_runs_open_only_when_told(tmp_path):
    secret_file = tmp_path / "worker-secret"
    secret_file.write_text(SECRET + "\n")
    with worker_process(
        tmp_path,
        "--host",
        "0.0.0.0",
        env={"MOSHIMOSHI_WORKER_SECRET": "", "MOSHIMOSHI_WORKER_SECRET_FILE": str(secret_file)},
    ) as port:
        assert http_json(f"http://127.0.0.1:{port}/v1/info", token=None)[0] == 401
        assert http_json(f"http://127.0.0.1:{port}/v1/info", token=SECRET)[0] == 200
    with worker_process(
        tmp_path, "--host", "0.0.0.0", "--insecure-no-worker-secret", env={"MOSHIMOSHI_WORKER_SECRET": ""}
    ) as port:
        assert http_json(f"http://127.0.0.1:{port}/v1/info", token=None)[0] == 200


@pytest.mark.system
async def test_a_gateway_with_the_wrong_secret_gets_no_session_and_says_so(redis_server, tmp_path):
    from service.tools.call import place_call
    from sip.errors import CallFailed
    from tests.test_pool_e2e import call_settings, wait_pool

    worker = start_worker(tmp_path, redis_server.url, "w0", "echo", 1)
    gateway = start_gateway(tmp_path, redis_server.url, "--queue-seconds", "0", env={"MOSHIMOSHI_WORKER_SECRET": WRONG})
    try:
        worker.wait_ready()
        gateway.wait_ready()
        await wait_pool(redis_server.url, lambda s: "w0" in s, 10, "worker up")
        with pytest.raises(CallFailed) as refused:
            await place_call(call_settings(gateway, tmp_path, "refused", 1.0))
        assert refused.value.status == 503  # the caller hears "busy", the operator reads why
        assert "MOSHIMOSHI_WORKER_SECRET" in gateway.proc.log()
        status, text = http_json(f"http://127.0.0.1:{worker.port}/metrics", token=None)
        assert 'moshimoshi_worker_auth_refused_total{endpoint="/v1/session"}' in str(text)
        await wait_pool(redis_server.url, lambda s: s["w0"]["leases"] == 0, 10, "no lease left behind")
    finally:
        gateway.proc.stop()
        worker.proc.stop()


@pytest.mark.system
async def test_serve_makes_a_secret_of_its_own_when_none_is_set(tmp_path):
    from service.tools.call import place_call
    from tests.test_pool_e2e import call_settings

    gateway = start_serve(tmp_path, "echo", env={"MOSHIMOSHI_WORKER_SECRET": ""})
    worker_port = int(gateway.proc.proc.args[gateway.proc.proc.args.index("--port") + 1])
    try:
        gateway.wait_ready()
        summary = await place_call(call_settings(gateway, tmp_path, "served", 1.5))
        assert summary["received_rms"] > 1000  # its gateway and worker share the secret
        for token in (None, WORKER_SECRET):  # nobody else knows it
            status, _ = await asyncio.to_thread(http_json, f"http://127.0.0.1:{worker_port}/v1/info", token)
            assert status == 401
    finally:
        gateway.proc.stop()


# --- the ASR worker ----------------------------------------------------------------------


@pytest.mark.system
async def test_an_asr_worker_with_a_secret_refuses_everyone_else(tmp_path):
    from service.asr.client import AsrWorkerFinder
    from service.asr.main import serve_asr
    from service.asr.tinywhisper import build_whisper
    from service.settings import AsrSettings

    settings = AsrSettings(
        model=str(build_whisper(tmp_path / "whisper")),
        host="127.0.0.1",
        port=0,
        cpu_threads=1,
        log_level="warning",
        worker_secret=SECRET,
    )
    listening: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve_asr(settings, on_listening=listening.set_result))
    port = await asyncio.wait_for(listening, 30)
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base) as client:
            await asyncio.wait_for(_ready(client), 60)
            assert (await client.get("/metrics")).status_code == 200
            assert (await client.get("/v1/info")).status_code == 401
            assert (await client.post("/v1/drain")).status_code == 401
        with pytest.raises(InvalidStatus):
            async with connect(base.replace("http", "ws") + "/v1/asr"):
                pass
        finder = AsrWorkerFinder(url=base.replace("http", "ws"), secret=SECRET)
        async with connect(base.replace("http", "ws") + "/v1/asr", additional_headers=finder.headers) as ws:
            await ws.send(json.dumps({"type": "start", "version": 2, "call_id": "c-auth"}))
            assert json.loads(await ws.recv())["type"] == "started"
        async with httpx.AsyncClient(base_url=base) as client:
            metrics = (await client.get("/metrics")).text
            assert 'moshimoshi_asr_auth_refused_total{endpoint="/v1/asr"} 1.0' in metrics
            assert (await client.post("/v1/drain", headers=bearer(SECRET))).status_code == 202
        assert await asyncio.wait_for(task, 30) == 0
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _ready(client: httpx.AsyncClient) -> None:
    while True:
        if (await client.get("/readyz")).status_code == 200:
            return
        await asyncio.sleep(0.05)
