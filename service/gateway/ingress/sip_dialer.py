"""The bridged transfer's second leg: a call the gateway places to a person over SIP.

``SipDialer.dial(call, target)`` sends an INVITE from the gateway's user agent (its UAC)
with an offer for a fresh RTP session, rings for up to the ring time (then CANCEL) and,
once the person answers, runs the leg's media with the same edge code as a caller's
(``media/rtp_media.py``: jitter buffer, codec, loss concealment, resampling to 24 kHz
model frames, pacer), so the transfer bridges two pipelines of the same shape. The leg
measures its own quality (``SipHumanLeg.quality``). The offer puts the caller's codec
first, at the caller's packet time: a person who takes it (or another codec at the same
rate) is relayed packet by packet (``CallMedia.start_relay``), with no resampling and no
80 ms frame in the way.

Where the INVITE goes: a ``sip:``/``sips:`` target as it is; a ``tel:`` number through
the trunk the caller came from (``sip:<number>@<the caller's signalling source>;user=phone``,
over the caller's transport), which is where a carrier takes numbers.

The person sees the caller's identity in From (anonymous when the caller withheld it) and
the gateway's call id in ``X-Moshimoshi-Call-Id``. A leg whose RTP stops for the RTP
timeout ends (``rtp-timeout``), like a caller's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import typing as tp

from service.api.control import CALL_ID_HEADER
from service.call_record import CallQuality
from service.gateway.calls.call import Call
from service.gateway.calls.transfer import DialFailed
from service.gateway.ingress.sip import local_address_toward, media_preferences, srtp_policy
from service.gateway.media.pipeline import MediaTaps
from service.gateway.media.rtp_media import CallMedia
from service.settings import GatewaySettings
from sip.errors import CallFailed, SipParseError, TransportError
from sip.identity import ANONYMOUS_URI
from sip.rtpsession import PortAllocator, PortsExhausted, RtpSession
from sip.sdp import MediaPreferences, NegotiatedMedia, build_offer
from sip.ua import UserAgent
from sip.uri import SipUri, format_host

log = logging.getLogger(__name__)

RTP_CHECK_SECONDS = 1.0


def sip_target(call: Call, target: str) -> SipUri:
    """Where the INVITE for ``target`` goes (see the module docstring). Raises DialFailed."""
    if not target.startswith("tel:"):
        return SipUri.parse(target, "target")
    source, transport = call.record.source, call.record.sip_transport
    host, sep, port = source.rpartition(":")
    if not sep or not host or not port.isdigit() or transport not in ("UDP", "TCP", "TLS"):
        raise DialFailed(404, "a tel: target is dialled through the caller's SIP trunk, and this call has none")
    number = target.removeprefix("tel:")
    params = ";user=phone" + {"TCP": ";transport=tcp", "TLS": ";transport=tls"}.get(transport, "")
    return SipUri.parse(f"sip:{number}@{format_host(host.strip('[]'))}:{port}{params}", "target")


class SipDialer:
    """Places bridged transfers' calls through the gateway's user agent."""

    def __init__(
        self, ua: UserAgent, ports: PortAllocator, settings: GatewaySettings, rtp_bind_host: tp.Callable[[str], str]
    ) -> None:
        self.ua = ua
        self.ports = ports
        self.settings = settings
        self.rtp_bind_host = rtp_bind_host

    async def dial(self, call: Call, target: str, *, ring_seconds: float) -> SipHumanLeg:
        leg = SipHumanLeg(self, call)
        try:
            await leg.place(sip_target(call, target), ring_seconds)
        except BaseException:
            await leg.close()
            raise
        return leg


class SipHumanLeg:
    """One placed call to a person (see the module docstring and ``calls/transfer.HumanLeg``)."""

    def __init__(self, dialer: SipDialer, call: Call) -> None:
        self.dialer = dialer
        self.call = call
        self.on_frame: tp.Callable[[bytes], None] | None = None
        self.ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.rtp: RtpSession | None = None
        self.media: CallMedia | None = None
        self.dialog: tp.Any = None
        self._watch: asyncio.Task[None] | None = None

    async def place(self, uri: SipUri, ring_seconds: float) -> None:
        dialer, settings = self.dialer, self.dialer.settings
        transport = uri.wire_transport or "UDP"
        srtp = srtp_policy(settings.srtp, transport, settings.srtp_allow_plaintext_keys)
        if srtp is None:
            raise DialFailed(488, f"SRTP is required and its keys travel only over TLS, not {transport}")
        try:
            address = await dialer.ua.transport.resolve(uri.param("maddr") or uri.host)
        except TransportError as exc:
            raise DialFailed(503, f"cannot resolve {uri.host}: {exc}") from None
        local_ip = settings.public_host or local_address_toward(address)
        try:
            self.rtp = await RtpSession.open(dialer.ports, host=dialer.rtp_bind_host(local_ip))
        except PortsExhausted:
            raise DialFailed(503, "no RTP port free for the transfer") from None
        offer = build_offer(self._preferences(srtp), local_ip, self.rtp.local_port)
        identity = self.call.identity
        from_uri: str | None = None
        if identity is not None and identity.withheld:
            from_uri = ANONYMOUS_URI
        elif self.call.record.from_uri.startswith(("sip:", "sips:")):
            from_uri = self.call.record.from_uri
        try:
            dialog = await dialer.ua.invite(
                uri, str(offer), timeout=ring_seconds, from_uri=from_uri, headers={CALL_ID_HEADER: self.call.id}
            )
        except CallFailed as exc:
            if exc.status == 408 and "no answer" in (exc.reason or ""):
                raise DialFailed(408, f"no answer within {ring_seconds:g} s") from None
            raise DialFailed(exc.status, exc.reason or "") from None
        except (SipParseError, ValueError) as exc:
            raise DialFailed(400, f"cannot call {uri}: {exc}") from None
        self.dialog = dialog
        media = dialog.media
        problem = (
            None
            if media is None
            else (
                "the answer has no address to send audio to"
                if media.remote_address is None
                else self.rtp.remote_problem(media.remote_address)
            )
        )
        if media is None or problem is not None:
            with contextlib.suppress(Exception):
                await dialog.bye()
            raise DialFailed(488, problem or "the answer has no usable audio stream")
        self._start_media(media, address)
        dialog.on_media_update = self._on_media_update
        dialog.terminated.add_done_callback(self._dialog_ended)
        self._watch = asyncio.create_task(self._watch_rtp(), name=f"human-rtp-{self.call.id}")
        log.info("call %s: the person at %s answered (%s)", self.call.id, uri, media.codec)

    def _preferences(self, srtp: str) -> MediaPreferences:
        """Our codecs, the caller's first and at its packet time: a person who takes them
        gets the caller's audio relayed packet by packet, not in 80 ms frames."""
        prefs = media_preferences(self.dialer.settings.codecs, srtp)
        edge = self.call.pipeline.edge
        if isinstance(edge, CallMedia) and edge.codec in prefs.codecs:
            prefs.codecs = [edge.codec] + [c for c in prefs.codecs if c != edge.codec]
            prefs.order, prefs.ptime = "ours", edge.ptime_ms
        return prefs

    def _start_media(self, media: NegotiatedMedia, address: str) -> None:
        assert self.rtp is not None and media.remote_address is not None
        settings = self.dialer.settings
        self.rtp.update_remote(media.remote_address, media.remote_port, media.remote_rtcp_port)
        self.rtp.trust_ip(address)
        self.media = CallMedia(
            self.rtp,
            media,
            to_model=self._on_audio,
            taps=MediaTaps(),
            jitter_min_ms=settings.jitter_min_ms,
            jitter_max_ms=settings.jitter_max_ms,
            resampler=settings.resampler,
        )
        self.media.start()

    def _on_audio(self, frame: bytes) -> None:
        if self.on_frame is not None:
            self.on_frame(frame)

    def _on_media_update(self, negotiated: NegotiatedMedia) -> None:
        if self.media is not None:
            self.media.update(negotiated)

    def _dialog_ended(self, terminated: asyncio.Future[str]) -> None:
        reason = terminated.result() if not terminated.cancelled() and terminated.exception() is None else "error"
        self._end(reason)

    def _end(self, reason: str) -> None:
        if not self.ended.done():
            self.ended.set_result(reason)

    async def _watch_rtp(self) -> None:
        timeout = self.dialer.settings.rtp_timeout_seconds
        if timeout <= 0:
            return
        while not self.ended.done():
            await asyncio.sleep(RTP_CHECK_SECONDS)
            silent = self.media.silent_seconds() if self.media is not None else None
            if silent is not None and silent > timeout:
                log.warning("call %s: no RTP from the person for %.0fs", self.call.id, timeout)
                self._end("rtp-timeout")
                return

    # -- the bridge --------------------------------------------------------------------

    def send_frame(self, frame: bytes) -> None:
        """One 80 ms frame of the caller (24 kHz) for the person."""
        if self.media is not None:
            self.media.from_model(frame)

    def relay_with(self, edge: object) -> bool:
        """Relay packet by packet between this leg and the caller's ``edge`` (both RTP, same
        audio rate and packet time); False leaves the audio to the 80 ms frames."""
        media = self.media
        if (
            media is None
            or not isinstance(edge, CallMedia)
            or edge.spec.sample_rate != media.spec.sample_rate
            or edge.ptime_ms != media.ptime_ms
        ):
            return False
        edge.start_relay(media.relay)
        media.start_relay(edge.relay)
        return True

    def quality(self) -> CallQuality:
        return self.media.quality() if self.media is not None else CallQuality()

    async def hang_up(self) -> None:
        if self.dialog is not None and not self.dialog.is_terminated:
            with contextlib.suppress(Exception):
                await self.dialog.bye()
        self._end("local-bye")

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
            self._watch = None
        if self.media is not None:
            self.media.stop()
        if self.rtp is not None:
            self.rtp.close()
        self._end("closed")
