"""The lines a gateway prints once it answers calls: where to call it and where to watch it.

Addresses are ones a person can dial or open: a wildcard bind (``0.0.0.0``, ``::``) is
shown as this machine's address toward the network (``--public-host`` when set), never as
the wildcard; IPv6 addresses in brackets. The softphone is shown on ``localhost`` when the
HTTP server listens there, because browsers give the microphone only to localhost or
HTTPS pages.
"""

from __future__ import annotations

import socket

from sip.uri import format_host

WILDCARDS = ("0.0.0.0", "::", "")
LOOPBACKS = ("127.0.0.1", "::1", "localhost")


def outbound_address(ipv6: bool = False) -> str:
    """The local address the kernel would use toward the network (no packet is sent);
    the loopback address when there is no route."""
    family, probe, fallback = (
        (socket.AF_INET6, "2001:db8::1", "::1") if ipv6 else (socket.AF_INET, "192.0.2.1", "127.0.0.1")
    )
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((probe, 9))
            address: str = sock.getsockname()[0]
            return address
    except OSError:
        return fallback


def reachable_host(bind_host: str, public_host: str | None = None) -> str:
    """Where a bind address can be reached from elsewhere, bracketed when IPv6."""
    if public_host:
        return format_host(public_host)
    if bind_host in WILDCARDS:
        return format_host(outbound_address(ipv6=bind_host == "::"))
    return format_host(bind_host)


def ready_banner(
    *,
    sip_host: str,
    public_host: str | None,
    sip_port: int,
    tls_port: int | None,
    http_host: str,
    http_port: int,
    workers: str,
) -> str:
    """``moshimoshi ready: …`` and the addresses, one per line."""
    sip = reachable_host(sip_host, public_host)
    web = reachable_host(http_host)
    phone_host = "localhost" if http_host in WILDCARDS or http_host in LOOPBACKS else web
    lines = [f"moshimoshi ready: {workers}: calls are answered", f"  call       sip:agent@{sip}:{sip_port}"]
    if tls_port is not None:
        lines.append(f"             sips:agent@{sip}:{tls_port}")
    lines += [
        f"  dashboard  http://{web}:{http_port}/dashboard",
        f"  softphone  http://{phone_host}:{http_port}/phone",
        f"  API        http://{web}:{http_port}/docs",
    ]
    return "\n".join(lines)
