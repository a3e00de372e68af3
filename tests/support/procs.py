"""Helpers for tests that run real processes and sockets."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_TESTDATA = REPO_ROOT.parent / "shared" / "testdata"


def free_port(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    """A port that is free for ``kind`` right now (both UDP and TCP when asked for SIP)."""
    while True:
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        other = socket.SOCK_DGRAM if kind == socket.SOCK_STREAM else socket.SOCK_STREAM
        try:
            with socket.socket(socket.AF_INET, other) as s:
                s.bind((host, port))
        except OSError:
            continue
        return port


def free_port_pair(host: str = "127.0.0.1") -> int:
    """A port P with P and P+1 free for UDP and TCP: baresip listens for SIP on P (UDP and TCP)
    and for SIP over TLS on P+1, and fails at start when P+1 is taken."""
    while True:
        port = free_port(host=host)
        try:
            with (
                socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp,
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
            ):
                tcp.bind((host, port + 1))
                udp.bind((host, port + 1))
        except OSError:
            continue
        return port


def has_ipv6() -> bool:
    """Whether this machine has an IPv6 loopback to bind (containers often have none)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


# The secret every gateway and worker of a deployment shares (as from one Kubernetes Secret):
# the child processes of the tests get it, as production pods do.
WORKER_SECRET = "test-worker-secret-0123456789abcdef"


def worker_headers(secret: str = WORKER_SECRET) -> dict[str, str]:
    """What a gateway sends to a worker's /v1 API."""
    return {"Authorization": f"Bearer {secret}"}


def python_env(**extra: str) -> dict[str, str]:
    """Environment for a child ``python -m service ...`` that imports this checkout (with the
    deployment's worker secret, unless ``extra`` says otherwise)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("MOSHIMOSHI_WORKER_SECRET", WORKER_SECRET)
    env.update(extra)
    return env


def moshimoshi_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "service", *args]


def wait_for_tcp(host: str, port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")
