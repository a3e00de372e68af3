"""Connecting to Redis: URL forms, short timeouts, one exception type for an outage.

``connect(url)`` accepts

- ``redis://[[user]:password@]host[:port][/db]`` — plain TCP
- ``rediss://...`` — TLS (redis-py's ``ssl_*`` query parameters apply, e.g.
  ``?ssl_ca_certs=/etc/ca.pem`` or ``?ssl_cert_reqs=none``)
- ``unix:///path/to/redis.sock[?db=0]`` — a local unix socket
- ``redis+sentinel://[[user]:password@]host1:26379,host2:26379/mymaster[/db]`` — ask
  the Sentinels for the current primary of ``mymaster`` (password and user are the
  primary's; ``?sentinel_password=...`` authenticates to the Sentinels themselves).
  A failover is followed automatically: the next command goes to the new primary.

The pool's scripts build key names at run time, so they need one primary that holds every
key: a standalone Redis or a Sentinel-managed one, not Redis Cluster.

Every operation runs under one deadline (``operation_timeout``, 1.25 s by default), with
a 1 s connect timeout and at most one immediate retry on a broken connection (the usual
case after a Redis restart): callers get ``PoolUnavailable`` quickly instead of a hang,
and each failure is counted in ``PoolClient.errors_total``.

The deadline is an ``asyncio.timeout`` around the whole operation rather than redis-py's
``socket_timeout``: with a socket timeout set, redis-py sends through ``asyncio.wait_for``,
which on Python 3.11 can swallow a cancellation that arrives as the send completes (the
cancelled task then carries on as if nothing happened). ``asyncio.timeout`` does not, and
redis-py drops a connection whose reply was cut off, so no late reply is ever read as the
answer to the next command.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import typing as tp
from collections.abc import AsyncIterator
from importlib import resources
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import (
    ClusterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.pool.keys import DEFAULT_PREFIX, Keys
from service.pool.retry import Retries

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT = 1.0
DEFAULT_OPERATION_TIMEOUT = 1.25
SENTINEL_SCHEME = "redis+sentinel"

# Server replies that mean "cannot serve now", as opposed to a bad command: redis-py turns
# some into classes of their own (dropping the prefix from the message), others it leaves.
_UNAVAILABLE_REPLIES = (
    "LOADING",
    "READONLY",
    "MASTERDOWN",
    "BUSY",
    "OOM",
    "NOREPLICAS",
    "CLUSTERDOWN",
    "TRYAGAIN",
    "NOAUTH",
    "WRONGPASS",
)
_UNAVAILABLE_CLASSES = (OutOfMemoryError, ReadOnlyError, TryAgainError, ClusterDownError)
PROBE_TTL_MS = 10_000

# A stream's entries, (entry id, fields), as this client returns them: it decodes replies to
# str (decode_responses), which redis-py's types cannot know (they say bytes | str).
StreamEntries = list[tuple[str, dict[str, str]]]


class PoolError(Exception):
    """Base of the pool's errors."""


class PoolUnavailable(PoolError):
    """Redis could not be reached or cannot serve now; the operation did not complete."""


class PoolClient:
    """A Redis connection pool with the key prefix, the Lua scripts and error accounting.

    Every pool object (registration, leases, call records) takes one of these; several may
    share it. ``errors_total`` counts failed Redis operations for the app to export.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        operation_timeout: float = DEFAULT_OPERATION_TIMEOUT,
        location: str = "redis",
        sentinel: Sentinel | None = None,
    ) -> None:
        self.redis = redis
        self.keys = Keys(prefix)
        self.operation_timeout = operation_timeout
        self.location = location
        self.errors_total = 0
        self.last_error: str | None = None
        self.retries = Retries(retry_on=(PoolError,))  # must-happen writes (record ends, releases)
        self._sentinel = sentinel
        self._scripts: dict[str, AsyncScript] = {}

    def script(self, name: str) -> AsyncScript:
        """The Lua script ``lua/<name>.lua``, run by EVALSHA and reloaded if Redis forgot it."""
        script = self._scripts.get(name)
        if script is None:
            text = resources.files("service.pool").joinpath("lua", f"{name}.lua").read_text("utf-8")
            script = self._scripts[name] = self.redis.register_script(text)
        return script

    @contextlib.asynccontextmanager
    async def guard(self, what: str) -> AsyncIterator[None]:
        """Run the body under the operation deadline; Redis failures become PoolUnavailable."""
        try:
            async with asyncio.timeout(self.operation_timeout):
                yield
        except (RedisConnectionError, RedisTimeoutError, TimeoutError, OSError) as exc:
            raise self._failed(what, exc, PoolUnavailable) from exc
        except ResponseError as exc:
            unavailable = isinstance(exc, _UNAVAILABLE_CLASSES) or str(exc).startswith(_UNAVAILABLE_REPLIES)
            raise self._failed(what, exc, PoolUnavailable if unavailable else PoolError) from exc
        except RedisError as exc:
            raise self._failed(what, exc, PoolError) from exc

    def _failed(self, what: str, exc: BaseException, kind: type[PoolError]) -> PoolError:
        self.errors_total += 1
        detail = str(exc) or type(exc).__name__
        if isinstance(exc, TimeoutError) and not str(exc):
            detail = f"no answer within {self.operation_timeout:g} s"
        self.last_error = f"{what}: {detail}"
        if isinstance(exc, OutOfMemoryError):
            detail = f"Redis is full (maxmemory): {detail}"
        if kind is PoolUnavailable:
            return PoolUnavailable(f"Redis unavailable at {self.location} during {what}: {detail}")
        return PoolError(f"Redis error at {self.location} during {what}: {detail}")

    async def ping(self) -> float:
        """Round-trip time to Redis in seconds; raises PoolUnavailable."""
        start = time.perf_counter()
        async with self.guard("ping"):
            await self.redis.ping()
        return time.perf_counter() - start

    async def check_writable(self, name: str) -> None:
        """Write a small key (``{p}probe:{name}``, expiring by itself): raises PoolUnavailable
        when Redis cannot take writes (down, read-only replica, full at maxmemory), which a
        read such as a ping does not show."""
        async with self.guard("write probe"):
            await self.redis.set(self.keys.probe(name), str(round(time.time() * 1000)), px=PROBE_TTL_MS)

    async def close(self) -> None:
        """Give pending retried writes a moment (``retries.close``), then disconnect."""
        await self.retries.close(timeout=2.0)
        with contextlib.suppress(RedisError, OSError):
            await self.redis.aclose()
        if self._sentinel is not None:
            for node in self._sentinel.sentinels:
                with contextlib.suppress(RedisError, OSError):
                    await node.aclose()

    async def __aenter__(self) -> PoolClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _retry() -> Retry:
    # One immediate retry, and only when the connection broke: that heals a pooled
    # connection that died with a restarted Redis. A timeout is not retried (it would
    # double the wait, and the command may have run).
    return Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))


def redacted(url: str) -> str:
    """``url`` without its password, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.split("@", 1)[1]
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:***@{netloc}").geturl()


class SentinelAddress(tp.NamedTuple):
    """A parsed ``redis+sentinel://`` URL."""

    sentinels: list[tuple[str, int]]
    service: str
    db: int
    username: str | None
    password: str | None
    sentinel_password: str | None


def parse_sentinel_url(url: str) -> SentinelAddress:
    """Parse ``redis+sentinel://[[user]:password@]host1:26379,host2/mymaster[/db]``."""
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        raise ValueError(f"not a {SENTINEL_SCHEME}:// URL: {redacted(url)}")
    creds, _, hosts = parts.netloc.rpartition("@")
    username = password = None
    if creds:
        user, has_password, secret = creds.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if has_password else None
    sentinels: list[tuple[str, int]] = []
    for item in hosts.split(","):
        item = item.strip()
        if not item:
            continue
        if item.startswith("["):  # [ipv6]:port
            host, _, rest = item[1:].partition("]")
            port_text = rest.lstrip(":")
        else:
            host, _, port_text = item.rpartition(":") if ":" in item else (item, "", "")
        try:
            port = int(port_text) if port_text else 26379
        except ValueError:
            raise ValueError(f"bad Sentinel port in {redacted(url)}: {item!r}") from None
        sentinels.append((host, port))
    if not sentinels:
        raise ValueError(f"no Sentinel host in {redacted(url)}")
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ValueError(
            f"{redacted(url)}: the path must be /<service name>[/<db>], "
            "e.g. redis+sentinel://host1:26379,host2:26379/mymaster/0"
        )
    try:
        db = int(path[1]) if len(path) == 2 else 0
    except ValueError:
        raise ValueError(f"bad database number in {redacted(url)}: {path[1]!r}") from None
    query = parse_qs(parts.query)
    sentinel_password = query.get("sentinel_password", [None])[0]
    return SentinelAddress(sentinels, unquote(path[0]), db, username, password, sentinel_password)


def connect(
    url: str,
    *,
    prefix: str = DEFAULT_PREFIX,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    operation_timeout: float = DEFAULT_OPERATION_TIMEOUT,
    max_connections: int | None = None,
) -> PoolClient:
    """A PoolClient for ``url`` (see the module docstring for the forms).

    ``connect_timeout`` bounds opening a connection (and each question to a Sentinel, at
    half of it); ``operation_timeout`` bounds every operation as a whole. Nothing is sent
    yet: the first operation connects (``await client.ping()`` to check). Raises ValueError
    for a URL that is not one of the supported forms.
    """
    if connect_timeout <= 0 or operation_timeout <= 0:
        raise ValueError("timeouts must be positive")
    scheme = urlsplit(url).scheme
    common: dict[str, tp.Any] = {
        "socket_timeout": None,  # the operation deadline bounds reads and writes (see above)
        "socket_connect_timeout": connect_timeout,
        "decode_responses": True,
        "retry": _retry(),
    }
    if max_connections is not None:
        common["max_connections"] = max_connections
    if scheme in ("redis", "rediss", "unix"):
        redis = aioredis.Redis.from_url(url, **common)
        return PoolClient(redis, prefix=prefix, operation_timeout=operation_timeout, location=redacted(url))
    if scheme == SENTINEL_SCHEME:
        address = parse_sentinel_url(url)
        # each Sentinel is asked once, briefly: a dead or hung one is skipped within the
        # deadline (a discovery happens only when connecting, so wait_for's flaw hardly matters)
        sentinel_kwargs: dict[str, tp.Any] = {
            "socket_timeout": connect_timeout / 2,
            "socket_connect_timeout": connect_timeout / 2,
            "decode_responses": True,
            "retry": Retry(NoBackoff(), 0),
        }
        if address.sentinel_password:
            sentinel_kwargs["password"] = address.sentinel_password
        sentinel = Sentinel(address.sentinels, sentinel_kwargs=sentinel_kwargs)
        redis = sentinel.master_for(
            address.service, db=address.db, username=address.username, password=address.password, **common
        )
        return PoolClient(
            redis, prefix=prefix, operation_timeout=operation_timeout, location=redacted(url), sentinel=sentinel
        )
    raise ValueError(
        f"unsupported Redis URL {redacted(url)!r}: use redis://host:port/db, rediss://host:port/db, "
        "unix:///path/redis.sock or redis+sentinel://host1:26379,host2:26379/mymaster/db"
    )
