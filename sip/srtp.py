"""SRTP and SRTCP (RFC 3711) keyed by SDES (RFC 4568 ``a=crypto``), over libsrtp.

The cryptography is libsrtp's, through ``pylibsrtp``; this module only describes the
suites, reads and writes ``a=crypto`` lines, makes keys, and holds one call's two
directions:

- :class:`CryptoAttribute`: one ``a=crypto`` value (``1 AES_CM_128_HMAC_SHA1_80
  inline:<base64 key||salt>``), parsed strictly: a line that names an unknown suite, a key
  of the wrong length, an MKI, or a session parameter we do not implement raises
  :class:`CryptoError` and is passed over by the SDP layer (RFC 4568 §6.1: the answerer
  picks a line it supports).
- :class:`SrtpContext`: protects what we send with our key, checks what we receive with
  the peer's. A replayed packet raises :class:`SrtpReplayed`, a forged or corrupted one
  :class:`SrtpAuthFailed`; the RTP session drops and counts both. A rekey (re-INVITE)
  makes a new context; the previous one is kept to check the peer's packets still in
  flight under its old key (:meth:`SrtpContext.rekeyed`).

Suites: AES_CM_128_HMAC_SHA1_80 and _32 (RFC 4568 §6.2), AEAD_AES_128_GCM (RFC 7714
§12). SRTCP always carries the 80-bit tag (RFC 4568 §6.2.2) or the GCM tag.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from dataclasses import dataclass

import pylibsrtp

__all__ = [
    "SUITES",
    "DEFAULT_SUITES",
    "CryptoAttribute",
    "CryptoError",
    "SrtpAuthFailed",
    "SrtpContext",
    "SrtpError",
    "SrtpKeys",
    "SrtpReplayed",
    "SrtpSuite",
    "new_crypto",
]


@dataclass(frozen=True)
class SrtpSuite:
    """One SDES crypto suite and the libsrtp profile that runs it."""

    name: str
    profile: int
    key_length: int  # master key, bytes
    salt_length: int  # master salt, bytes
    rtp_overhead: int  # bytes SRTP adds to each RTP packet (the auth tag)

    @property
    def key_material_length(self) -> int:
        return self.key_length + self.salt_length


SUITES: dict[str, SrtpSuite] = {
    suite.name: suite
    for suite in (
        SrtpSuite("AES_CM_128_HMAC_SHA1_80", pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80, 16, 14, 10),
        SrtpSuite("AES_CM_128_HMAC_SHA1_32", pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_32, 16, 14, 4),
        SrtpSuite("AEAD_AES_128_GCM", pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_128_GCM, 16, 12, 16),
    )
}
# What we offer, most preferred first: the suite every SRTP peer has, then GCM, then the
# short tag (weaker authentication: last).
DEFAULT_SUITES = ("AES_CM_128_HMAC_SHA1_80", "AEAD_AES_128_GCM", "AES_CM_128_HMAC_SHA1_32")

_LIFETIME = re.compile(r"^(?:2\^(\d{1,2})|(\d{1,20}))$")
_BASE64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")
REPLAY_WINDOW = 1024  # packets; RFC 3711 asks for at least 64, libsrtp's default is 128


class SrtpError(ValueError):
    """An SRTP packet cannot be processed; the message says why."""


class SrtpReplayed(SrtpError):
    """The packet's index was seen before or is too old for the replay window."""


class SrtpAuthFailed(SrtpError):
    """The packet's authentication tag does not verify: forged, corrupted or the wrong key."""


class CryptoError(ValueError):
    """An ``a=crypto`` line we cannot use; the message says why."""


@dataclass(frozen=True)
class CryptoAttribute:
    """One ``a=crypto`` line (RFC 4568 §9.1) with a single inline key and no MKI."""

    tag: int
    suite: str
    key: bytes  # master key || master salt
    lifetime: int | None = None
    window_size_hint: int | None = None

    @classmethod
    def parse(cls, value: str) -> CryptoAttribute:
        """Parse an ``a=crypto`` value; raise :class:`CryptoError` for anything we cannot run."""
        parts = value.split()
        if len(parts) < 3:
            raise CryptoError(f"crypto: expected 'tag suite inline:key', got {value[:80]!r}")
        tag_text, suite_name, key_params, *session_params = parts
        if not tag_text.isdigit() or len(tag_text) > 9:
            raise CryptoError(f"crypto: tag {tag_text[:12]!r} is not a number of at most 9 digits")
        suite = SUITES.get(suite_name)
        if suite is None:
            raise CryptoError(f"crypto: suite {suite_name[:40]!r} is not supported (supported: {', '.join(SUITES)})")
        if ";" in key_params:
            raise CryptoError("crypto: more than one key (MKI key lists are not supported)")
        method, colon, info = key_params.partition(":")
        if method != "inline" or not colon:
            raise CryptoError(f"crypto: key method {method[:20]!r} is not 'inline'")
        key_text, *extras = info.split("|")
        if len(extras) > 2:
            raise CryptoError("crypto: too many '|' fields in the key parameters")
        key = _decode_key(key_text, suite)
        lifetime = None
        for extra in extras:
            if ":" in extra:
                raise CryptoError("crypto: MKI is not supported")
            match = _LIFETIME.match(extra)
            if match is None:
                raise CryptoError(f"crypto: key lifetime {extra[:24]!r} is not a number or 2^n")
            lifetime = 2 ** int(match.group(1)) if match.group(1) else int(match.group(2))
            if lifetime < 1:
                raise CryptoError("crypto: key lifetime 0")
        window = None
        for param in session_params:
            name, _, arg = param.partition("=")
            if name == "WSH" and arg.isdigit() and 64 <= int(arg) <= 2**15:
                window = int(arg)
            elif name == "KDR" and arg == "0":
                continue
            else:
                raise CryptoError(f"crypto: session parameter {param[:40]!r} is not supported")
        return cls(int(tag_text), suite_name, key, lifetime, window)

    def __str__(self) -> str:
        text = f"{self.tag} {self.suite} inline:{base64.b64encode(self.key).decode()}"
        if self.lifetime is not None:
            text += f"|{_lifetime_text(self.lifetime)}"
        if self.window_size_hint is not None:
            text += f" WSH={self.window_size_hint}"
        return text

    def __repr__(self) -> str:  # never the key material (logs)
        return f"CryptoAttribute({self.tag} {self.suite})"

    @property
    def srtp_suite(self) -> SrtpSuite:
        return SUITES[self.suite]


def _decode_key(text: str, suite: SrtpSuite) -> bytes:
    if not _BASE64.match(text):
        raise CryptoError("crypto: the inline key is not base64")
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise CryptoError("crypto: the inline key is not base64") from None
    if len(key) != suite.key_material_length:
        raise CryptoError(
            f"crypto: {suite.name} needs {suite.key_material_length} bytes of key and salt, the line has {len(key)}"
        )
    return key


def _lifetime_text(lifetime: int) -> str:
    exponent = lifetime.bit_length() - 1
    return f"2^{exponent}" if lifetime == 1 << exponent else str(lifetime)


def new_crypto(tag: int, suite: str) -> CryptoAttribute:
    """A crypto line with a fresh random key (``secrets``: the OS's CSPRNG)."""
    spec = SUITES[suite]
    return CryptoAttribute(tag, suite, secrets.token_bytes(spec.key_material_length))


@dataclass(frozen=True)
class SrtpKeys:
    """What offer/answer agreed for one stream: the suite, our key (we send with it) and the
    peer's (we check what it sends with it)."""

    suite: str
    local_key: bytes
    remote_key: bytes
    remote_window: int | None = None

    def __repr__(self) -> str:  # never the key material (logs)
        return f"SrtpKeys({self.suite})"


_REPLAY_ERRORS = {pylibsrtp.ERRORS[9], pylibsrtp.ERRORS[10]}  # bad index, index too old
_AUTH_ERROR = pylibsrtp.ERRORS[7]


def _classify(exc: pylibsrtp.Error) -> SrtpError:
    message = str(exc)
    if message in _REPLAY_ERRORS:
        return SrtpReplayed(message)
    if message == _AUTH_ERROR:
        return SrtpAuthFailed(message)
    return SrtpError(message)


class SrtpContext:
    """One call's SRTP and SRTCP, both directions. Not thread-safe: one event loop owns it."""

    def __init__(self, keys: SrtpKeys, *, replay_window: int = REPLAY_WINDOW) -> None:
        suite = SUITES[keys.suite]
        self.keys = keys
        self.suite = suite
        outbound = pylibsrtp.Policy(
            key=keys.local_key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND, srtp_profile=suite.profile
        )
        inbound = pylibsrtp.Policy(
            key=keys.remote_key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND, srtp_profile=suite.profile
        )
        inbound.window_size = max(replay_window, keys.remote_window or 0)
        self._tx = pylibsrtp.Session(outbound)
        self._rx = pylibsrtp.Session(inbound)
        self._previous: SrtpContext | None = None

    def rekeyed(self, keys: SrtpKeys) -> SrtpContext:
        """The context for new keys (a re-INVITE). When our key is unchanged the sending side
        is kept (a new context under the same key would reuse keystream); when only the
        peer's changed, its packets under the old key still verify until the first one under
        the new key arrives."""
        if keys == self.keys:
            return self
        context = SrtpContext(keys)
        same_suite = keys.suite == self.keys.suite
        if same_suite and keys.local_key == self.keys.local_key:
            context._tx = self._tx
        if same_suite and keys.remote_key == self.keys.remote_key:
            context._rx, context._previous = self._rx, self._previous  # the replay window goes on
        else:
            context._previous = self
            self._previous = None
        return context

    def protect(self, packet: bytes) -> bytes:
        """The SRTP packet for the RTP ``packet``; raises :class:`SrtpError`."""
        try:
            return self._tx.protect(packet)
        except (pylibsrtp.Error, ValueError) as exc:
            raise SrtpError(str(exc)) from None

    def protect_rtcp(self, packet: bytes) -> bytes:
        try:
            return self._tx.protect_rtcp(packet)
        except (pylibsrtp.Error, ValueError) as exc:
            raise SrtpError(str(exc)) from None

    def unprotect(self, packet: bytes) -> bytes:
        """The RTP packet inside ``packet``; raises :class:`SrtpError` (or a subclass)."""
        try:
            plain = self._rx.unprotect(packet)
        except pylibsrtp.Error as exc:
            error = _classify(exc)
            if self._previous is not None and isinstance(error, SrtpAuthFailed):
                return self._previous.unprotect(packet)
            raise error from None
        except ValueError as exc:  # longer than libsrtp's buffer
            raise SrtpError(str(exc)) from None
        self._previous = None  # the peer sends under its new key: the old one is done
        return plain

    def unprotect_rtcp(self, packet: bytes) -> bytes:
        try:
            return self._rx.unprotect_rtcp(packet)
        except pylibsrtp.Error as exc:
            error = _classify(exc)
            if self._previous is not None and isinstance(error, SrtpAuthFailed):
                return self._previous.unprotect_rtcp(packet)
            raise error from None
        except ValueError as exc:
            raise SrtpError(str(exc)) from None
