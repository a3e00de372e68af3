"""TLS for SIP (RFC 3261 §26.3.1, RFC 5630): contexts, certificate reloading, and TLS over
a byte stream.

- :func:`server_context` / :func:`client_context`: TLS 1.2 and 1.3 only; under TLS 1.2 only
  ECDHE key exchange with AEAD ciphers (forward secrecy, no CBC, no RSA key transport);
  no compression, no renegotiation. A server given a client CA requires a client
  certificate signed by it (mutual TLS for trunks that authenticate that way).
- :class:`ServerCertificates`: the server context for each *new* connection, rebuilt when
  the certificate or key file changes on disk (cert-manager renews, the kubelet swaps the
  Secret's files): connections already up keep the certificate they were opened with. A
  pair that does not load (a half-written rotation, a key that does not match) is logged
  and counted and the previous context stays in use.
- :class:`TlsSession`: TLS on memory BIOs, driven by whoever owns the socket. The SIP
  transport feeds it the bytes a TCP connection receives and writes back what it returns,
  so a TLS connection is a TCP connection (the same limits, idle timers and framing) with
  a handshake deadline of its own, on any event loop.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import time
from dataclasses import dataclass

log = logging.getLogger("sip.tls")

TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"  # TLS 1.3's own suites are all AEAD with (EC)DHE
_OPTIONS = ssl.OP_NO_COMPRESSION | getattr(ssl, "OP_NO_RENEGOTIATION", 0) | ssl.OP_CIPHER_SERVER_PREFERENCE


class TlsError(Exception):
    """A TLS handshake or record failed; the message says why."""


def _harden(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= _OPTIONS
    return context


def server_context(cert_file: str, key_file: str, client_ca: str | None = None) -> ssl.SSLContext:
    """A server context presenting ``cert_file`` (the chain, leaf first) with ``key_file``;
    with ``client_ca``, clients must present a certificate that CA signed. Raises
    ``ssl.SSLError``/``OSError`` naming what did not load."""
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.load_cert_chain(cert_file, key_file)
    if client_ca:
        context.load_verify_locations(cafile=client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(
    ca_file: str | None = None, *, verify: bool = True, cert_file: str | None = None, key_file: str | None = None
) -> ssl.SSLContext:
    """A client context that checks the server's certificate and name against the system's
    CAs and ``ca_file`` (``verify=False``: against nothing, for trying a test server);
    ``cert_file``/``key_file``: our certificate for servers that want mutual TLS."""
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    if verify:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if ca_file:
            context.load_verify_locations(cafile=ca_file)
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cert_file:
        context.load_cert_chain(cert_file, key_file)
    return context


def _signature(paths: tuple[str, ...]) -> tuple[tuple[int, int, int] | None, ...]:
    out: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append(None)
            continue
        out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


class ServerCertificates:
    """The server context for new TLS connections, reloaded when its files change."""

    RETRY_SECONDS = 1.0  # a pair that failed to load is tried again at most this often

    def __init__(self, cert_file: str, key_file: str, client_ca: str | None = None) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.client_ca = client_ca
        self._paths = tuple(p for p in (cert_file, key_file, client_ca) if p)
        self._signature = _signature(self._paths)
        self._context = server_context(cert_file, key_file, client_ca)  # start-up: a bad pair stops here
        self._failed_signature: tuple | None = None
        self._failed_at = 0.0
        self.reloads = 0
        self.reload_failures = 0

    def context(self) -> ssl.SSLContext:
        """The context to accept a new connection with (a stat of each file; rebuilt on change)."""
        signature = _signature(self._paths)
        if signature != self._signature:
            now = time.monotonic()
            if signature != self._failed_signature or now - self._failed_at >= self.RETRY_SECONDS:
                self._reload(signature, now)
        return self._context

    def _reload(self, signature: tuple, now: float) -> None:
        try:
            context = server_context(self.cert_file, self.key_file, self.client_ca)
        except (OSError, ssl.SSLError, ValueError) as exc:
            if signature != self._failed_signature:
                log.warning("TLS certificate %s did not reload (keeping the previous one): %s", self.cert_file, exc)
            self.reload_failures += 1
            self._failed_signature, self._failed_at = signature, now
            return
        self._context = context
        self._signature = signature
        self._failed_signature = None
        self.reloads += 1
        log.info("TLS certificate reloaded from %s", self.cert_file)


@dataclass(frozen=True)
class PeerInfo:
    """What a finished handshake tells about the connection."""

    version: str
    cipher: str
    certificate: dict | None  # the peer's verified certificate (mutual TLS), else None


class TlsSession:
    """TLS over bytes: :meth:`start` (client: the ClientHello), then :meth:`feed` what the
    socket received and send what it returns; :meth:`encrypt` application data. Errors
    raise :class:`TlsError`."""

    def __init__(self, context: ssl.SSLContext, *, server_side: bool, server_hostname: str | None = None) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side, server_hostname=server_hostname
        )
        self.established = False
        self.closed = False
        self.peer: PeerInfo | None = None

    def start(self) -> bytes:
        """Begin the handshake; returns the bytes to send (a client's hello, nothing for a server)."""
        self._handshake()
        return self._outgoing.read()

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        """Bytes from the socket in; (application data decrypted, bytes to send) out. A
        closed session (the peer's close_notify) returns no more data."""
        if self.closed:
            return b"", b""
        self._incoming.write(data)
        plain = bytearray()
        if not self.established:
            self._handshake()
        if self.established:
            while True:
                try:
                    chunk = self._ssl.read(65536)
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:
                    self.closed = True
                    break
                except ssl.SSLError as exc:
                    raise TlsError(_describe(exc)) from None
                if not chunk:  # the peer's close_notify (no data would raise SSLWantReadError)
                    self.closed = True
                    break
                plain += chunk
        return bytes(plain), self._outgoing.read()

    def encrypt(self, data: bytes) -> bytes:
        if not self.established or self.closed:
            raise TlsError("TLS session is not established")
        try:
            self._ssl.write(data)
        except ssl.SSLError as exc:
            raise TlsError(_describe(exc)) from None
        return self._outgoing.read()

    def close(self) -> bytes:
        """Our close_notify, to send before closing the socket (empty if not established)."""
        if not self.established or self.closed:
            return b""
        self.closed = True
        try:
            self._ssl.unwrap()
        except ssl.SSLError:
            pass
        return self._outgoing.read()

    def _handshake(self) -> None:
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            return
        except ssl.SSLCertVerificationError as exc:
            raise TlsError(f"certificate verification failed: {exc.verify_message}") from None
        except ssl.SSLError as exc:
            raise TlsError(_describe(exc)) from None
        self.established = True
        cipher = self._ssl.cipher()
        self.peer = PeerInfo(
            version=self._ssl.version() or "",
            cipher=cipher[0] if cipher else "",
            certificate=self._ssl.getpeercert() or None,
        )


def _describe(exc: ssl.SSLError) -> str:
    return re.sub(r"\s*\(_ssl\.c:\d+\)", "", str(exc)) or type(exc).__name__


def certificate_subject(certificate: dict | None) -> str | None:
    """The peer certificate's common name (else its first DNS name), for logs and records."""
    if not certificate:
        return None
    for rdn in certificate.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    for kind, value in certificate.get("subjectAltName", ()):
        if kind == "DNS":
            return str(value)
    return None
