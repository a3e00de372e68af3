"""``moshimoshi serve`` as its own supervisor: the banner once calls are answered, a drained
worker replaced by a fresh one, a worker that cannot start stopping serve in one line; and
the log telling each call's story (the real command, started here)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess

import httpx
import pytest

from tests.support.polling import wait_until
from tests.support.procs import free_port, moshimoshi_cmd, python_env
from tests.support.system import running_system

pytestmark = pytest.mark.system


def test_the_banner_comes_once_a_worker_is_ready_and_names_addresses_to_dial(tmp_path):
    with running_system(tmp_path, model="echo") as system:
        output = system.output()
        banner = output.index("moshimoshi ready: 1 worker (echo): calls are answered")
        assert output.index("in the pool as") < banner  # not before the worker was ready
        assert f"  call       sip:agent@127.0.0.1:{system.sip_port}\n" in output
        assert f"  dashboard  http://127.0.0.1:{system.http_port}/dashboard\n" in output
        assert "0.0.0.0" not in output[banner:].split("\n\n")[0]


def test_a_worker_drained_through_the_api_is_replaced_by_a_fresh_one(tmp_path):
    with running_system(tmp_path, model="echo") as system:
        client = httpx.Client(base_url=system.api, headers=system.headers("admin"), timeout=10)
        [worker] = client.get("/v1/pool").json()["workers"]
        drained = client.post(f"/v1/workers/{worker['worker_id']}/drain")
        assert drained.status_code == 202
        assert drained.json()["answer"]["state"] == "draining"  # what it does now, not what it did
        wait_until(
            lambda: "exited after draining; starting a fresh one" in system.output(),
            30,
            "the replacement",
            detail=system.output,
        )
        wait_until(
            lambda: re.search(r"the fresh worker \(pid \d+\) is ready", system.output()),
            30,
            "the fresh worker",
            detail=system.output,
        )
        wait_until(lambda: client.get("/readyz").status_code == 200, 30, "ready again", detail=system.output)
        assert system.proc.poll() is None, "serve must go on"
        summary = system.call(seconds=2).result()
        assert summary["packets_received"] > 50  # the fresh worker answers
        assert client.get("/v1/pool").json()["workers"][0]["state"] == "ready"


def test_a_worker_that_cannot_load_its_model_stops_serve_with_its_error_in_one_line(tmp_path):
    proc = subprocess.Popen(
        moshimoshi_cmd(
            "serve",
            "--model",
            str(tmp_path / "no-such-checkpoint"),
            "--asr",
            "off",
            "--sip-host",
            "127.0.0.1",
            "--sip-port",
            str(free_port()),
            "--http-host",
            "127.0.0.1",
            "--http-port",
            str(free_port()),
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=python_env(MOSHIMOSHI_API_TOKENS="t-0123456789abcdef:admin"),
    )
    try:
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1
    assert "Traceback" not in stderr
    assert "moshimoshi ready" not in stdout  # never claimed to answer calls
    last = stderr.strip().splitlines()[-1]
    assert last == (
        f"moshimoshi: the worker exited (status 2) before it was ready: checkpoint "
        f"{tmp_path / 'no-such-checkpoint'}: not a directory and not a Hugging Face repo id "
        "(owner/name)"
    ), last
    assert stderr.count("not a directory and not a Hugging Face repo id") == 1, stderr  # serve says it, once
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # nothing left running


def test_the_log_tells_the_story_of_a_call_and_keeps_the_caller_number_masked(tmp_path):
    with running_system(tmp_path, model="echo") as system:
        uri = f"sip:0501234567@127.0.0.1:{system.sip_port}"
        result = subprocess.run(
            moshimoshi_cmd("call", uri, "--seconds", "2", "--local-host", "127.0.0.1", "--caller", "+81312345678"),
            capture_output=True,
            text=True,
            timeout=60,
            env=python_env(),
        )
        assert result.returncode == 0, result.stderr
        call_id = json.loads(result.stdout.strip().splitlines()[-1])["gateway_call_id"]
        wait_until(lambda: f"call {call_id} ended" in system.output(), 30, "the end line", detail=system.output)
        lines = [line for line in system.output().splitlines() if call_id in line and "lifecycle" in line]
        assert re.search(
            rf"INFO \S+: call {call_id} arrived: SIP/UDP from 127\.0\.0\.1:\d+, dialled 0501234567, "
            r"caller \*{8}5678$",
            lines[0],
        ), lines
        assert "81312345678" not in system.output()  # the number itself is personal data
        assert re.search(
            rf"INFO \S+: call {call_id} ended: remote-bye after 2\.\d s; PCMU, loss \d+\.\d %, "
            r"jitter \d+\.\d ms, .*gateway latency p50 \d+ ms, \d+ frames concealed$",
            lines[-1],
        ), lines
        output = system.output()
        assert '"WebSocket /v1/session" [accepted]' not in output and "connection open" not in output
        assert "HTTP Request:" not in output
