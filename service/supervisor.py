"""``moshimoshi serve``'s supervision of its worker processes, as Kubernetes would do it.

A child that exits after it was ready (drained through ``POST /v1/workers/{id}/drain``, or
crashed while serving) is replaced by a fresh one, and the log says so. A child that exits
before it was ever ready (a bad ``--model``, a port taken since the check) would only
fail again: a required child then stops ``serve`` with the child's error as its last line,
an optional one (the ASR worker) is left out with an ERROR. Readiness comes from the
child's ``READY=1`` on its notify socket (service/notify.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import typing as tp

from service.notify import ENV as NOTIFY_ENV
from service.notify import SUPERVISOR_SAYS_FAILURE_ENV, ReadyListener

log = logging.getLogger("moshimoshi.serve")

STOP_SECONDS = 10.0


class Supervised:
    """One child role (``worker``, ``ASR worker``): started, watched, replaced, stopped."""

    def __init__(
        self, role: str, command: list[str], env: dict[str, str], *, required: bool, on_failed: tp.Callable[[str], None]
    ) -> None:
        self.role = role
        self.command = command
        self.required = required
        self.on_failed = on_failed  # told why serve cannot go on (a required child failed)
        self.listener = ReadyListener()
        self.env = {**env, NOTIFY_ENV: self.listener.address}
        if required:  # its failure before it was ready is serve's last line (on_failed)
            self.env[SUPERVISOR_SAYS_FAILURE_ENV] = "1"
        self.process: asyncio.subprocess.Process | None = None
        self.started = 0  # processes started, the first included
        self.stopping = False
        self._task: asyncio.Task[None] | None = None
        self._announcing: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._spawn()
        self._task = asyncio.create_task(self._watch(), name=f"supervise-{self.role}")

    async def _spawn(self) -> None:
        self.listener.ready.clear()
        self.process = await asyncio.create_subprocess_exec(*self.command, env=self.env)
        self.started += 1

    async def _watch(self) -> None:
        while True:
            assert self.process is not None
            status = await self.process.wait()
            if self.stopping:
                return
            if not self.listener.ready.is_set():
                why = f"the {self.role} exited (status {status}) before it was ready"
                told = self.listener.status.removeprefix("failed: ")
                if self.required:
                    self.on_failed(f"{why}: {told}" if told != self.listener.status else f"{why}: its error is above")
                else:
                    log.error("%s: going on without it", why)
                return
            how = "after draining" if status == 0 else f"with status {status}"
            log.warning("the %s (pid %d) exited %s; starting a fresh one", self.role, self.process.pid, how)
            await self._spawn()
            self._announcing = asyncio.create_task(self._announce(self.process.pid if self.process else 0))

    async def _announce(self, pid: int) -> None:
        await self.listener.ready.wait()
        log.info("the fresh %s (pid %d) is ready", self.role, pid)

    def drain(self) -> None:
        """SIGTERM: the child drains and exits; no replacement."""
        self.stopping = True
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)

    async def stop(self) -> None:
        """Stop the child (SIGTERM, then SIGKILL after STOP_SECONDS) and the watching."""
        self.stopping = True
        process = self.process
        if process is not None and process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(STOP_SECONDS):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
        for task in (self._task, self._announcing):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self.listener.close()
