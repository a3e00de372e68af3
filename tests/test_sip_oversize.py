"""A UDP request whose responses would not fit in a datagram (a huge Via list): served over
TCP to its sender (RFC 3261 §18.2.2), or refused with 513; never an answer lost in silence
while a call waits for an ACK that cannot come."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from sip.framing import StreamFramer
from sip.message import Response, parse_message
from sip.ua import UserAgent
from tests.support.sip_peer import RawPeer, branch
from tests.test_sip_ua import TIMERS, AnsweringApp, drained, offer


def huge_invite(ua: UserAgent, peer: RawPeer, tcp_port: int, *, vias: int, call_id: str, body: str) -> bytes:
    """An INVITE whose top Via names ``tcp_port`` as sent-by, with ``vias`` more below it."""
    more = "".join(
        f"Via: SIP/2.0/UDP 192.0.2.{i % 250 + 1}:5060;branch=z9hG4bK{secrets.token_hex(8)}\r\n" for i in range(vias)
    )
    return (
        f"INVITE sip:echo@127.0.0.1:{ua.port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{tcp_port};branch={branch()};rport\r\n{more}"
        f"Max-Forwards: 70\r\nFrom: <sip:peer@127.0.0.1>;tag=huge\r\nTo: <sip:echo@127.0.0.1>\r\n"
        f"Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\nContact: <sip:peer@127.0.0.1:{peer.port}>\r\n"
        f"Content-Type: application/sdp\r\nContent-Length: {len(body)}\r\n\r\n{body}"
    ).encode()


class TcpSink:
    """A TCP listener standing for the sender's sent-by port: collects what is sent to it."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue = asyncio.Queue()
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> TcpSink:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        framer = StreamFramer()
        while data := await reader.read(65536):
            for raw in framer.feed(data):
                self.messages.put_nowait(parse_message(raw))

    async def response(self, status: int, within: float = 5.0) -> Response:
        while True:
            message = await asyncio.wait_for(self.messages.get(), within)
            if isinstance(message, Response) and message.status == status:
                return message

    async def close(self) -> None:
        for writer in self.writers:
            writer.close()
        assert self.server is not None
        self.server.close()


@pytest.fixture
async def uas():
    app = AnsweringApp()
    ua = UserAgent("127.0.0.1", 0, on_invite=app, timers=TIMERS, max_udp_response=8000)
    await ua.start()
    ua.app = app
    yield ua
    await ua.stop()


async def test_responses_too_big_for_udp_go_over_tcp_to_the_sender(uas):
    peer, sink = await RawPeer.udp(), await TcpSink().start()
    try:
        peer.send(huge_invite(uas, peer, sink.port, vias=150, call_id="huge", body=offer()), ("127.0.0.1", uas.port))
        ok = await sink.response(200)
        assert len(ok.to_bytes()) > 8000 and len(ok.vias) == 151
        dialog = await uas.app.dialog()
        assert uas.app.calls[0].transport == "TCP" and uas.counts()["responses_over_tcp"] == 1
        ack = (
            f"ACK sip:echo@127.0.0.1:{uas.port} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{peer.port};branch={branch()}\r\n"
            f"Max-Forwards: 70\r\nFrom: <sip:peer@127.0.0.1>;tag=huge\r\nTo: {ok.headers.get('To')}\r\n"
            f"Call-ID: huge\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n"
        ).encode()
        peer.send(ack, ("127.0.0.1", uas.port))
        await asyncio.wait_for(dialog.confirmed.wait(), 5)
        assert peer.drain() == []  # nothing came over UDP: it could not have fitted
        await dialog.bye()
        assert await dialog.terminated == "local-bye"
    finally:
        await sink.close()
        await peer.close()


async def test_responses_too_big_for_udp_and_no_tcp_get_513_and_no_call(uas):
    peer, sink = await RawPeer.udp(), await TcpSink().start()
    closed_port = sink.port
    await sink.close()  # nobody listens on the sent-by port now
    try:
        data = huge_invite(uas, peer, closed_port, vias=150, call_id="no-tcp", body=offer())
        peer.send(data, ("127.0.0.1", uas.port))
        peer.send(data, ("127.0.0.1", uas.port))  # a retransmission while we try TCP
        response = await peer.final_response("no-tcp")
        assert response.status == 513 and "TCP" in response.reason
        assert uas.app.calls == [] and uas.counts()["responses_too_big"] == 1
        await asyncio.sleep(0.3)
        assert [m.status for m in peer.drain()] == []  # one answer for both copies
        await drained(uas)
    finally:
        await peer.close()


async def test_the_real_datagram_limit():
    """The default limit is the largest UDP datagram: a 63 KB Via list fits in the request
    but not in a response carrying our headers and SDP."""
    app = AnsweringApp()
    ua = UserAgent("127.0.0.1", 0, on_invite=app, timers=TIMERS)
    await ua.start()
    peer, sink = await RawPeer.udp(), await TcpSink().start()
    try:
        data = huge_invite(ua, peer, sink.port, vias=970, call_id="sixty", body=offer())
        assert 63_000 < len(data) < 65_507
        peer.send(data, ("127.0.0.1", ua.port))
        ok = await sink.response(200)
        assert ok.status == 200 and ua.counts()["responses_over_tcp"] == 1
        await (await app.dialog()).bye()
    finally:
        await sink.close()
        await peer.close()
        await ua.stop()
