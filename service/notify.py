"""Readiness notification between a process and its supervisor (systemd's ``sd_notify``).

A worker sends ``READY=1`` (with a ``STATUS=`` line) to the datagram socket named in
``NOTIFY_SOCKET`` once it serves: its model is warm and it is in the pool. ``moshimoshi
serve`` listens on such a socket for each child it supervises (:class:`ReadyListener`), so
it knows a worker that exits before it was ready (a bad ``--model``: stop) from one that
exits after (drained: start a fresh one). Under systemd, ``Type=notify`` units get the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket

ENV = "NOTIFY_SOCKET"
# set by ``moshimoshi serve`` for its children: it prints a child's ``STATUS=failed: ...`` as its
# own last line, so a child that fails before it was ready need not log the same error too
SUPERVISOR_SAYS_FAILURE_ENV = "MOSHIMOSHI_SUPERVISOR_SAYS_FAILURE"


def notify(*lines: str) -> bool:
    """Send ``READY=1``-style lines to the supervisor, if there is one; True when sent."""
    address = os.environ.get(ENV)
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto("\n".join(lines).encode(), address)
        return True
    return False


def tell_failure(reason: str) -> bool:
    """Tell the supervisor why this process fails; True when that supervisor says a failure
    before readiness to the user itself (``moshimoshi serve``)."""
    return notify(f"STATUS=failed: {reason}") and os.environ.get(SUPERVISOR_SAYS_FAILURE_ENV) == "1"


class ReadyListener:
    """A supervisor's end: an abstract datagram socket; ``ready`` is set by ``READY=1``
    (clear it before starting the next process) and ``status`` holds the last ``STATUS=``."""

    def __init__(self) -> None:
        self.address = f"@moshimoshi-{os.getpid()}-{secrets.token_hex(6)}"
        self.ready = asyncio.Event()
        self.status = ""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind("\0" + self.address[1:])
        self._sock.setblocking(False)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._read)

    def _read(self) -> None:
        while True:
            try:
                data = self._sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            for line in data.decode("utf-8", "replace").splitlines():
                key, _, value = line.partition("=")
                if key == "READY" and value == "1":
                    self.ready.set()
                elif key == "STATUS":
                    self.status = value

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
