"""An echo gateway for the edge benchmarks, alone on one CPU core, the load on the others.

``edge_capacity.py`` and ``tls_handshakes.py`` measure what one gateway core carries: the
gateway (``--worker-url echo:``, SIP and HTTP on loopback) runs pinned to the first core
this process may use, and the benchmark moves itself to the rest.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def split_cores() -> tuple[int, list[int]]:
    """The core for the gateway and the cores for the load (the same one on a 1-core machine);
    this process moves to the load's."""
    cores = sorted(os.sched_getaffinity(0))
    gateway_core, load_cores = cores[0], cores[1:] or cores
    os.sched_setaffinity(0, set(load_cores))
    return gateway_core, load_cores


def start_gateway(
    core: int, sip_port: int, http_port: int, *args: str, env: dict[str, str], cwd: Path
) -> subprocess.Popen[bytes]:
    """``python -m service gateway --worker-url echo:`` on 127.0.0.1 with ``args``, pinned to
    ``core``; its log goes to stderr."""
    command = [
        sys.executable,
        "-m",
        "service",
        "gateway",
        "--worker-url",
        "echo:",
        "--sip-host",
        "127.0.0.1",
        "--sip-port",
        str(sip_port),
        "--http-host",
        "127.0.0.1",
        "--http-port",
        str(http_port),
        *args,
    ]
    return subprocess.Popen(
        command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, preexec_fn=lambda: os.sched_setaffinity(0, {core})
    )
