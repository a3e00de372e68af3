"""The life of a worker process once its socket is bound, for both roles (``moshimoshi
worker`` in ``main.py``, ``moshimoshi asr`` in ``service/asr/main.py``): serve until
drained, and tell a supervisor when it serves.

SIGTERM or SIGINT (or ``POST /v1/drain``, through ``runtime.request_drain``) drains: no
new sessions, open ones go on for up to the grace time, and the pool is told. A second
signal ends the sessions at once. The runtime stopping (drained, or failed) ends the
process: 0, or 2 when it failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import typing as tp

import uvicorn

from service.notify import notify


class Registered(tp.Protocol):
    async def wait_registered(self) -> None: ...


class Membership(Registered, tp.Protocol):
    """A worker's place in the pool (``PoolMembership``, ``AsrMembership``)."""

    def start(self) -> None: ...

    async def drain(self) -> None: ...

    async def stop(self) -> None: ...


class Runtime(tp.Protocol):
    """What serving needs of a role's runtime (``WorkerRuntime``, ``AsrRuntime``)."""

    ready_event: asyncio.Event
    stopped_event: asyncio.Event
    error: BaseException | None
    request_drain: tp.Callable[[str], None] | None

    async def start(self) -> None: ...

    async def drain(self, grace: float, /) -> None: ...

    async def close(self) -> None: ...


async def announce_ready(
    ready: asyncio.Event, error: tp.Callable[[], BaseException | None], membership: Registered | None
) -> bool:
    """Tell a supervisor (``serve``, systemd) that the worker serves: warm, and in the pool
    when it has one (service/notify.py); True once told."""
    await ready.wait()
    if error() is not None:
        return False
    if membership is not None:
        await membership.wait_registered()
    notify("READY=1", "STATUS=serving")
    return True


def announced_ready(announce: asyncio.Task[bool]) -> bool:
    return announce.done() and not announce.cancelled() and announce.exception() is None and announce.result()


async def serve_until_drained(
    runtime: Runtime,
    membership: Membership | None,
    server: uvicorn.Server,
    sock: socket.socket,
    *,
    log: logging.Logger,
    what: str,
    host: str,
    grace: float,
    begin_drain: tp.Callable[[], None] | None,
    end_sessions: tp.Callable[[], None],
    sessions_word: str,
    report_failure: tp.Callable[[BaseException, asyncio.Task[bool]], None],
    on_listening: tp.Callable[[int], None] | None,
) -> int:
    """Serve on ``sock`` until ``runtime`` stops; the exit status.

    ``what`` names the role in the log lines (``worker``, ``ASR worker``); ``begin_drain``
    runs at once when a drain starts; ``end_sessions`` ends the open sessions at a second
    signal (said as ``ending {sessions_word} now``); ``report_failure`` says a runtime
    failure (the announcing task tells whether the supervisor heard the worker was ready)."""
    port = sock.getsockname()[1]
    loop = asyncio.get_running_loop()
    signals = 0
    drains: set[asyncio.Task] = set()  # referenced until done

    def keep(coroutine: tp.Coroutine[tp.Any, tp.Any, None]) -> None:
        task = loop.create_task(coroutine)
        drains.add(task)
        task.add_done_callback(drains.discard)

    def start_drain(why: str) -> None:
        log.info("%s: draining (grace %.0f s)", why, grace)
        if begin_drain is not None:
            begin_drain()
        keep(runtime.drain(grace))
        if membership is not None:
            keep(membership.drain())

    runtime.request_drain = start_drain

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            start_drain(sig.name)
        else:
            log.info("%s again: ending %s now", sig.name, sessions_word)
            end_sessions()
            keep(runtime.drain(0.0))

    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)

    await runtime.start()
    if membership is not None:
        membership.start()
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    announce = asyncio.create_task(
        announce_ready(runtime.ready_event, lambda: runtime.error, membership), name="ready-notify"
    )
    log.info("%s listening on %s:%d", what, host, port)
    if on_listening is not None:
        on_listening(port)
    status = 0
    try:
        stopped = asyncio.create_task(runtime.stopped_event.wait())
        await asyncio.wait({serving, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if runtime.error is not None:
            report_failure(runtime.error, announce)
            status = 2
    finally:
        announce.cancel()
        server.should_exit = True
        await asyncio.gather(serving, announce, return_exceptions=True)
        if membership is not None:
            await membership.stop()
        await runtime.close()
        for sig in installed:
            loop.remove_signal_handler(sig)
        sock.close()
    log.info("%s stopped", what)
    return status
