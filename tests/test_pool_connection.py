"""connect(): every URL form against a real server (TCP, unix socket, TLS, Sentinel)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import random
import subprocess
import time

import pytest

from service.pool import (
    EmbeddedRedis,
    PoolUnavailable,
    RenewResult,
    SlotLeases,
    WorkerRegistration,
    connect,
    redacted,
)
from service.pool.connection import parse_sentinel_url
from tests.support.pool import eventually, worker
from tests.support.procs import free_port, wait_for_tcp

pytestmark = pytest.mark.system


async def claim_works(client) -> None:
    await WorkerRegistration(client, worker("w1", capacity=1), interval=30).heartbeat()
    lease = await SlotLeases(client).claim()
    assert lease is not None and lease.worker_id == "w1"


def test_sentinel_url_forms():
    address = parse_sentinel_url("redis+sentinel://s1:26379,s2:26380,s3/mymaster/2")
    assert address.sentinels == [("s1", 26379), ("s2", 26380), ("s3", 26379)]
    assert (address.service, address.db, address.password) == ("mymaster", 2, None)
    address = parse_sentinel_url("redis+sentinel://:p%40ss@[::1]:26379/pool?sentinel_password=sp")
    assert address.sentinels == [("::1", 26379)]
    assert (address.service, address.db, address.password, address.sentinel_password) == ("pool", 0, "p@ss", "sp")
    address = parse_sentinel_url("redis+sentinel://app:secret@s1/mymaster")
    assert (address.username, address.password) == ("app", "secret")
    for bad in (
        "redis+sentinel://s1:26379",
        "redis+sentinel://s1:x/m",
        "redis+sentinel:///m",
        "redis+sentinel://s1/m/notadb",
        "redis+sentinel://s1/m/0/extra",
    ):
        with pytest.raises(ValueError):
            parse_sentinel_url(bad)


def test_unsupported_url_names_the_supported_forms():
    with pytest.raises(ValueError, match="redis\\+sentinel://") as info:
        connect("http://user:hunter2@example.com/")
    assert "hunter2" not in str(info.value)


def test_passwords_are_redacted():
    assert redacted("redis://:hunter2@h:6379/0") == "redis://:***@h:6379/0"
    assert redacted("redis://app:hunter2@h/0") == "redis://app:***@h/0"
    assert redacted("redis://h:6379/0") == "redis://h:6379/0"


async def test_tcp(redis_server):
    async with connect(redis_server.url) as client:
        await claim_works(client)


async def test_unix_socket():
    async with EmbeddedRedis(unix_socket=True) as url:
        assert url.startswith("unix://")
        async with connect(url) as client:
            await claim_works(client)


@pytest.fixture
def tls_redis(tmp_path):
    """A redis-server speaking only TLS, with a self-signed certificate for 127.0.0.1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            str(cert_path),
            "--tls-key-file",
            str(key_path),
            "--tls-ca-cert-file",
            str(cert_path),
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_tcp("127.0.0.1", port, proc=proc)
        yield port, cert_path
    finally:
        proc.terminate()
        proc.wait(10)


async def test_tls(tls_redis):
    port, ca = tls_redis
    async with connect(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}") as client:
        await claim_works(client)
    # a client that does not trust the certificate gets PoolUnavailable, not a hang
    async with connect(f"rediss://127.0.0.1:{port}/0") as client:
        start = time.monotonic()
        with pytest.raises(PoolUnavailable):
            await client.ping()
        assert time.monotonic() - start < 1.5


def start_sentinel(tmp_path, primary_port: int, *settings: str) -> tuple[subprocess.Popen, int]:
    """A real Redis Sentinel (redis-server --sentinel) watching 127.0.0.1:primary_port as mymaster."""
    port = free_port()
    conf = tmp_path / f"sentinel-{port}.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor mymaster 127.0.0.1 {primary_port} 1\n" + "".join(f"{line}\n" for line in settings)
    )
    proc = subprocess.Popen(
        ["redis-server", str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for_tcp("127.0.0.1", port, proc=proc)
    return proc, port


@pytest.fixture
def sentinel(redis_server, tmp_path):
    proc, port = start_sentinel(tmp_path, redis_server.port)
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


async def test_sentinel(sentinel, redis_server):
    dead = free_port()
    url = f"redis+sentinel://127.0.0.1:{dead},127.0.0.1:{sentinel}/mymaster/0"  # the first one is down
    async with connect(url, prefix="s:") as client:
        await claim_works(client)
        # the keys landed on the primary the Sentinel named
        async with connect(redis_server.url, prefix="s:") as direct:
            assert await direct.redis.exists(direct.keys.lease("w1", 0))


async def test_sentinel_unknown_service_is_unavailable(sentinel):
    async with connect(f"redis+sentinel://127.0.0.1:{sentinel}/nosuchmaster") as client:
        start = time.monotonic()
        with pytest.raises(PoolUnavailable, match="nosuchmaster"):
            await client.ping()
        assert time.monotonic() - start < 1.5


def start_redis(tmp_path, name: str, *extra: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    directory = tmp_path / name
    directory.mkdir()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_tcp("127.0.0.1", port, proc=proc)
    return proc, port


async def test_sentinel_failover_is_followed(tmp_path):
    """Primary + replica + Sentinel: kill the primary, the client ends up on the promoted replica."""
    procs: list[subprocess.Popen] = []
    try:
        primary, primary_port = start_redis(tmp_path, "primary")
        procs.append(primary)
        replica, replica_port = start_redis(tmp_path, "replica", "--replicaof", "127.0.0.1", str(primary_port))
        procs.append(replica)
        async with connect(f"redis://127.0.0.1:{replica_port}/0") as direct:
            await eventually(lambda: _link_up(direct), what="replica in sync")
        sentinel, sentinel_port = start_sentinel(
            tmp_path,
            primary_port,
            "sentinel down-after-milliseconds mymaster 300",
            "sentinel failover-timeout mymaster 2000",
        )
        procs.append(sentinel)

        async with connect(f"redis+sentinel://127.0.0.1:{sentinel_port}/mymaster/0", prefix="f:") as client:
            await WorkerRegistration(client, worker("w1", capacity=2), interval=60).heartbeat()
            leases = SlotLeases(client)
            lease = await leases.claim(ttl_ms=120_000)
            await client.redis.execute_command("WAIT", 1, 2000)  # replicated before the crash
            primary.kill()

            async def claims_again() -> bool:
                try:
                    return await leases.claim(ttl_ms=120_000) is not None
                except PoolUnavailable:
                    return False

            await eventually(claims_again, timeout=60, interval=0.2, what="failover to the replica")
            # the lease survived on the promoted replica and still renews
            assert await leases.validate("w1", lease.slot, lease.token)
            assert await leases.renew(lease) is RenewResult.RENEWED
            assert client.errors_total > 0  # the outage was seen and counted
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)


async def _link_up(client) -> bool:
    info = await client.redis.info("replication")
    return info.get("master_link_status") == "up"


async def test_a_cancelled_operation_always_cancels_its_task(redis_server):
    """Python 3.11's asyncio.wait_for (which redis-py uses with a socket timeout) can swallow
    a cancellation; the pool's clients must never let a cancelled task carry on."""
    async with connect(redis_server.url, prefix="c:") as client:
        await WorkerRegistration(client, worker("w1", capacity=1), interval=60).heartbeat()
        leases = SlotLeases(client)
        lease = await leases.claim(ttl_ms=60_000)
        rng = random.Random(7)
        for _ in range(300):

            async def renew_forever() -> None:
                while True:
                    await leases.renew(lease)

            task = asyncio.create_task(renew_forever())
            await asyncio.sleep(rng.random() * 0.003)
            task.cancel()
            done, _ = await asyncio.wait([task], timeout=5)
            assert done and task.cancelled(), "the cancellation was swallowed"
        # and a holder always stops when closed
        for _ in range(100):
            async with leases.hold(lease, renew_every=0) as holder:
                await asyncio.sleep(rng.random() * 0.003)
            assert holder.released is True
            lease = await leases.claim(ttl_ms=60_000)
