"""TLS contexts, certificate reloading and TLS over memory (sip/tls.py), without sockets."""

from __future__ import annotations

import os
import ssl
import warnings

import pytest

from sip.tls import (
    ServerCertificates,
    TlsError,
    TlsSession,
    certificate_subject,
    client_context,
    server_context,
)
from tests.support.certs import TestCa, serial_of


@pytest.fixture
def ca(tmp_path):
    return TestCa(tmp_path / "pki")


def handshake(client: TlsSession, server: TlsSession) -> None:
    """Pump bytes between the two until both are up (or one raises)."""
    to_server = client.start()
    server.start()
    for _ in range(10):
        _, to_client = server.feed(to_server)
        _, to_server = client.feed(to_client)
        if client.established and server.established and not to_server:
            return
    raise AssertionError("handshake did not finish")


def test_a_verified_handshake_then_data_both_ways_and_close_notify(ca):
    issued = ca.issue("gateway.example")
    server = TlsSession(server_context(str(issued.cert), str(issued.key)), server_side=True)
    client = TlsSession(client_context(str(ca.path)), server_side=False, server_hostname="localhost")
    handshake(client, server)
    assert server.peer.version in ("TLSv1.2", "TLSv1.3") and server.peer.certificate is None
    assert certificate_subject(client._ssl.getpeercert()) == "gateway.example"
    plain, _ = server.feed(client.encrypt(b"OPTIONS sip:a@b SIP/2.0\r\n"))
    assert plain == b"OPTIONS sip:a@b SIP/2.0\r\n"
    plain, _ = client.feed(server.encrypt(b"SIP/2.0 200 OK\r\n"))
    assert plain == b"SIP/2.0 200 OK\r\n"
    plain, _ = server.feed(client.close())
    assert plain == b"" and server.closed


def test_a_client_that_does_not_trust_the_server_fails_with_the_reason(ca, tmp_path):
    other = TestCa(tmp_path / "other", "another CA").issue("stranger")
    server = TlsSession(server_context(str(other.cert), str(other.key)), server_side=True)
    client = TlsSession(client_context(str(ca.path)), server_side=False, server_hostname="localhost")
    with pytest.raises(TlsError, match="certificate verification failed"):
        handshake(client, server)


def old_client(version: ssl.TLSVersion) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = context.maximum_version = version
    context.set_ciphers("ALL:@SECLEVEL=0")
    return context


@pytest.mark.parametrize("version", ["TLSv1", "TLSv1_1"])
def test_tls_1_0_and_1_1_clients_are_refused(ca, version):
    issued = ca.issue("gateway")
    # the control: this OpenSSL still speaks the old version with a server that allows it
    lax = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    lax.load_cert_chain(str(issued.cert), str(issued.key))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        lax.minimum_version = ssl.TLSVersion.TLSv1
    lax.set_ciphers("ALL:@SECLEVEL=0")
    server = TlsSession(lax, server_side=True)
    handshake(TlsSession(old_client(ssl.TLSVersion[version]), server_side=False), server)
    assert server.peer.version == version.replace("_", ".")
    ours = TlsSession(server_context(str(issued.cert), str(issued.key)), server_side=True)
    with pytest.raises(TlsError, match="(?i)unsupported protocol"):
        handshake(TlsSession(old_client(ssl.TLSVersion[version]), server_side=False), ours)


def test_tls_1_2_without_forward_secrecy_is_refused(ca):
    issued = ca.issue("gateway")
    server = TlsSession(server_context(str(issued.cert), str(issued.key)), server_side=True)
    weak = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    weak.check_hostname, weak.verify_mode = False, ssl.CERT_NONE
    weak.maximum_version = ssl.TLSVersion.TLSv1_2
    weak.set_ciphers("AES128-SHA:AES256-SHA:AES128-GCM-SHA256")  # RSA key transport, CBC
    with pytest.raises(TlsError):
        handshake(TlsSession(weak, server_side=False), server)
    good = client_context(str(ca.path))
    good.maximum_version = ssl.TLSVersion.TLSv1_2
    server = TlsSession(server_context(str(issued.cert), str(issued.key)), server_side=True)
    client = TlsSession(good, server_side=False, server_hostname="localhost")
    handshake(client, server)
    assert server.peer.version == "TLSv1.2" and server.peer.cipher.startswith("ECDHE-")


def test_mutual_tls_requires_a_client_certificate_from_the_client_ca(ca, tmp_path):
    issued = ca.issue("gateway")
    trunk = ca.issue("trunk.example", client=True)
    context = server_context(str(issued.cert), str(issued.key), client_ca=str(ca.path))
    anonymous = TlsSession(client_context(str(ca.path)), server_side=False, server_hostname="localhost")
    server = TlsSession(context, server_side=True)
    with pytest.raises(TlsError):
        handshake(anonymous, server)
        server.feed(anonymous.encrypt(b"x"))  # TLS 1.3: the server's verdict follows the handshake
    client = TlsSession(
        client_context(str(ca.path), cert_file=str(trunk.cert), key_file=str(trunk.key)),
        server_side=False,
        server_hostname="localhost",
    )
    server = TlsSession(context, server_side=True)
    handshake(client, server)
    assert certificate_subject(server.peer.certificate) == "trunk.example"


def test_garbage_instead_of_a_client_hello_is_a_tls_error(ca):
    issued = ca.issue("gateway")
    server = TlsSession(server_context(str(issued.cert), str(issued.key)), server_side=True)
    with pytest.raises(TlsError):
        server.feed(b"OPTIONS sip:x SIP/2.0\r\n\r\n")


def test_server_certificates_reload_on_change_and_keep_the_old_pair_when_the_new_one_is_bad(ca):
    first = ca.issue("gateway", stem="live")
    store = ServerCertificates(str(first.cert), str(first.key))
    before = store.context()
    assert store.context() is before  # nothing changed: no rebuild

    def served_serial(context: ssl.SSLContext) -> int:
        server = TlsSession(context, server_side=True)
        client = TlsSession(client_context(str(ca.path)), server_side=False, server_hostname="localhost")
        handshake(client, server)
        return serial_of(client._ssl.getpeercert(binary_form=True))

    assert served_serial(before) == first.serial
    second = ca.issue("gateway", stem="next")
    os.replace(second.cert, first.cert)  # the kubelet swaps both files
    os.replace(second.key, first.key)
    after = store.context()
    assert after is not before and store.reloads == 1 and served_serial(after) == second.serial
    # a rotation half done: a new certificate with the old key does not load
    third = ca.issue("gateway", stem="third")
    os.replace(third.cert, first.cert)
    assert store.context() is after and store.reload_failures == 1
    store.context()
    assert store.reload_failures == 1  # not retried on every connection
    os.replace(third.key, first.key)
    assert store.context() is not after and store.reloads == 2


def test_a_bad_pair_at_start_is_an_error_naming_the_problem(ca, tmp_path):
    issued = ca.issue("gateway")
    other = ca.issue("other")
    with pytest.raises(ssl.SSLError):
        ServerCertificates(str(issued.cert), str(other.key))
    with pytest.raises(OSError):
        ServerCertificates(str(tmp_path / "missing.pem"), str(issued.key))
