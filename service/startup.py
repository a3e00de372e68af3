"""What stops a process at start, said in one line: a port another process holds, a Redis
that does not answer.

Every listening port of a process is a :class:`Listener` that knows its setting. Before
anything starts, :func:`check_free` tries each one and raises :class:`StartupError` for the
first that is taken, naming the port, its setting and, when ``/proc`` shows it, the process
holding it::

    SIP port 5060 (UDP) on 0.0.0.0 is in use by pid 4242 (baresip -f /etc/baresip): stop it, or choose
    another port with --sip-port / MOSHIMOSHI_SIP_PORT

The command prints the message and exits 1, without a traceback and with nothing left
running (``moshimoshi serve`` checks every port of its children before it starts one).
Likewise a pool whose Redis does not answer within ``--redis-connect-seconds``
(:func:`wait_for_redis`): a gateway or worker without its pool would only refuse calls.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import typing as tp
from dataclasses import dataclass
from pathlib import Path

if tp.TYPE_CHECKING:
    from service.settings import AsrSettings, GatewaySettings, WorkerSettings

PROC = Path("/proc")
TCP_LISTEN = "0A"  # the LISTEN state in /proc/net/tcp


class StartupError(Exception):
    """The process cannot start here (a port is taken, Redis does not answer); the message
    is one line for the operator, and the command exits 1."""


@dataclass(frozen=True)
class Listener:
    """A port a process listens on: ``what`` it serves, where, over which protocols, and
    the setting that moves it (``--sip-port / MOSHIMOSHI_SIP_PORT``)."""

    what: str
    host: str
    port: int
    protocols: tuple[str, ...]
    setting: str

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET


def setting_of(flag: str, env: str | None = None) -> str:
    """``--sip-port / MOSHIMOSHI_SIP_PORT``: how a user moves a port."""
    env = env or "MOSHIMOSHI_" + flag.removeprefix("--").replace("-", "_").upper()
    return f"{flag} / {env}"


def _bind(listener: Listener, protocol: str) -> socket.socket:
    """A socket bound as the service binds it (TCP with SO_REUSEADDR, '::' dual-stack)."""
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(listener.family, kind)
    try:
        if listener.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if listener.host == "::" else 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((listener.host, listener.port))
        if kind == socket.SOCK_STREAM:
            sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def check_free(listeners: list[Listener]) -> None:
    """Raise StartupError for the first listener whose port cannot be bound (port 0 picks
    a free one: nothing to check)."""
    for listener in listeners:
        if listener.port == 0:
            continue
        for protocol in listener.protocols:
            try:
                _bind(listener, protocol).close()
            except OSError as exc:
                raise bind_failed(listener, protocol, exc) from None


def listen(listener: Listener) -> socket.socket:
    """The listening TCP socket of ``listener`` (inheritable: a server may hand it on);
    StartupError when it cannot be had."""
    try:
        sock = _bind(listener, "tcp")
    except OSError as exc:
        raise bind_failed(listener, "tcp", exc) from None
    sock.set_inheritable(True)
    return sock


def bind_failed(listener: Listener, protocol: str, exc: OSError) -> StartupError:
    """The one-line message for a port that could not be bound."""
    where = f"{listener.what} port {listener.port} ({protocol.upper()}) on {listener.host}"
    if exc.errno == errno.EADDRINUSE:
        holder = holder_of(listener.port, protocol)
        held = f"in use by {holder}" if holder else "in use by another process"
        return StartupError(f"{where} is {held}: stop it, or choose another port with {listener.setting}")
    if exc.errno == errno.EACCES:
        return StartupError(
            f"{where}: permission denied (ports below 1024 need privileges): choose another "
            f"port with {listener.setting}"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return StartupError(f"{where}: {listener.host} is not an address of this machine")
    return StartupError(f"{where}: {exc.strerror or exc}")


# -- who holds a port (Linux /proc; None where it cannot be seen) ---------------------------


def _socket_inodes(port: int, protocol: str) -> set[str]:
    inodes = set()
    for table in (protocol, protocol + "6"):
        try:
            lines = (PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10:
                continue
            local, state, inode = fields[1], fields[3], fields[9]
            if int(local.rsplit(":", 1)[1], 16) != port or inode == "0":
                continue
            if protocol == "tcp" and state != TCP_LISTEN:
                continue
            inodes.add(f"socket:[{inode}]")
    return inodes


def _command_line(pid: str) -> str:
    try:
        raw = (PROC / pid / "cmdline").read_bytes()
    except OSError:
        return ""
    words = [word.decode(errors="replace") for word in raw.split(b"\0") if word]
    if words:
        words[0] = os.path.basename(words[0])
    text = " ".join(" ".join(words).split())  # one line, whatever the arguments hold
    return text if len(text) <= 60 else text[:57] + "..."


def holder_of(port: int, protocol: str) -> str | None:
    """``pid 4242 (baresip -f /etc/baresip)`` for the process holding ``port``, or None when
    /proc does not show it (another user's process, another network namespace)."""
    inodes = _socket_inodes(port, protocol)
    if not inodes:
        return None
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target in inodes:
                command = _command_line(entry.name)
                return f"pid {entry.name} ({command})" if command else f"pid {entry.name}"
    return None


# -- the listeners of each role ------------------------------------------------------------


def gateway_listeners(settings: GatewaySettings) -> list[Listener]:
    """SIP (UDP and TCP), SIP over TLS when it is on, and HTTP."""
    listeners = [Listener("SIP", settings.sip_host, settings.sip_port, ("udp", "tcp"), setting_of("--sip-port"))]
    if settings.sip_tls:
        listeners.append(
            Listener("SIP over TLS", settings.sip_host, settings.sip_tls_port, ("tcp",), setting_of("--sip-tls-port"))
        )
    listeners.append(
        Listener(
            "HTTP (API and dashboard)", settings.http_host, settings.http_port, ("tcp",), setting_of("--http-port")
        )
    )
    return listeners


def worker_listener(settings: WorkerSettings) -> Listener:
    return Listener("worker", settings.host, settings.port, ("tcp",), setting_of("--port"))


def asr_listener(settings: AsrSettings) -> Listener:
    return Listener("ASR worker", settings.host, settings.port, ("tcp",), setting_of("--port", "MOSHIMOSHI_ASR_PORT"))


# -- Redis at start ------------------------------------------------------------------------

REDIS_RETRY_SECONDS = 0.5


async def wait_for_redis(url: str, seconds: float, *, setting: str = "REDIS_URL / --redis-url") -> None:
    """Return once Redis at ``url`` takes a write; StartupError when it has not within
    ``seconds`` (a process that cannot reach its pool says so and exits, instead of
    serving nothing)."""
    from service.pool import PoolError, connect, redacted

    log = logging.getLogger("moshimoshi.startup")
    try:
        client = connect(url)
    except ValueError as exc:
        raise StartupError(f"{setting}: {exc}") from None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    waited = False
    try:
        while True:
            try:
                await client.check_writable("startup")
                if waited:
                    log.info("Redis at %s answers", redacted(url))
                return
            except PoolError as exc:
                detail = str(exc).split(": ", 1)[-1] if ": " in str(exc) else str(exc)
                if loop.time() >= deadline:
                    raise StartupError(
                        f"Redis at {redacted(url)} did not answer within {seconds:g} s ({detail}): start it, or "
                        f"set {setting} to one that runs (--redis-connect-seconds waits longer)"
                    ) from None
                if not waited:
                    log.info("waiting up to %g s for Redis at %s (%s)", seconds, redacted(url), detail)
                    waited = True
            await asyncio.sleep(min(REDIS_RETRY_SECONDS, max(0.0, deadline - loop.time())))
    finally:
        await client.close()
