"""Transactions (RFC 3261 §17, RFC 6026) against a raw peer, with shrunk timers.

Assertions count messages and states, never intervals: retransmissions are checked to
happen and to stop, not to happen at particular instants.
"""

from __future__ import annotations

import asyncio

import pytest

from sip.message import Request, Response, make_response
from sip.transaction import Timers, TransactionLayer
from sip.transport import Flow, Transport
from tests.support.polling import eventually
from tests.support.sip_peer import RawPeer, branch

TIMERS = Timers(t1=0.02, t2=0.08, t4=0.1)  # 64*T1 = 1.28 s


class Application:
    """The transaction user of these tests: records what the layer hands up."""

    def __init__(self) -> None:
        self.requests: asyncio.Queue = asyncio.Queue()
        self.acks: list[Request] = []
        self.stray: list[Response] = []
        self.retransmitted_2xx: list[Response] = []

    def on_request(self, request, transaction, flow) -> None:
        if transaction is None:
            self.acks.append(request)
        else:
            self.requests.put_nowait((request, transaction))

    def on_stray_response(self, response, flow) -> None:
        self.stray.append(response)

    def on_invite_2xx_retransmission(self, response) -> None:
        self.retransmitted_2xx.append(response)

    async def next(self):
        return await asyncio.wait_for(self.requests.get(), 5)


@pytest.fixture
async def stack():
    app = Application()
    transport = Transport("127.0.0.1", 0)
    layer = TransactionLayer(transport, TIMERS, app)
    transport.on_message = layer.receive
    layer.start()
    await transport.start()
    layer.app = app
    yield layer
    layer.stop()
    await transport.stop()


@pytest.fixture
async def peer():
    peer = await RawPeer.udp()
    yield peer
    await peer.close()


def request(
    method: str,
    peer: RawPeer,
    port: int,
    *,
    branch_id: str | None = "new",
    cseq: int = 1,
    call_id: str = "tx-test",
    to_tag: str | None = None,
    from_tag: str = "f1",
) -> bytes:
    via_branch = "" if branch_id is None else f";branch={branch() if branch_id == 'new' else branch_id}"
    to = f"<sip:ua@127.0.0.1:{port}>" + (f";tag={to_tag}" if to_tag else "")
    return (
        f"{method} sip:ua@127.0.0.1:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{peer.port}{via_branch};rport\r\n"
        f"From: <sip:peer@127.0.0.1>;tag={from_tag}\r\nTo: {to}\r\nCall-ID: {call_id}\r\n"
        f"CSeq: {cseq} {method}\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def ack_for(invite: bytes, response: Response) -> bytes:
    """The ACK for a non-2xx response: the INVITE's Via (same branch), the response's To."""
    lines = invite.decode().split("\r\n")
    out = [lines[0].replace("INVITE", "ACK", 1)]
    for line in lines[1:]:
        if line.startswith("To:"):
            line = "To: " + response.headers.get("To")
        elif line.startswith("CSeq:"):
            line = line.replace("INVITE", "ACK")
        out.append(line)
    return "\r\n".join(out).encode()


async def quiet_for(peer: RawPeer, seconds: float) -> list:
    await asyncio.sleep(seconds)
    return peer.drain()


async def test_invite_server_sends_100_at_once_and_retransmits_non_2xx_until_ack(stack, peer):
    invite = request("INVITE", peer, stack.transport.port)
    peer.send(invite, ("127.0.0.1", stack.transport.port))
    trying = await peer.receive()
    assert trying.status == 100 and trying.to_addr.tag is None
    received, transaction = await stack.app.next()
    peer.send(invite, ("127.0.0.1", stack.transport.port))  # retransmission: the 100 again, not the TU
    assert (await peer.receive()).status == 100
    transaction.respond(make_response(received, 486, to_tag="t"))
    busy = [await peer.receive() for _ in range(3)]  # the 486 and at least two retransmissions (timer G)
    assert [r.status for r in busy] == [486, 486, 486]
    peer.send(ack_for(invite, busy[0]), ("127.0.0.1", stack.transport.port))
    await eventually(lambda: transaction.state in ("confirmed", "terminated"))
    peer.drain()
    assert await quiet_for(peer, 4 * TIMERS.t2) == []
    await eventually(lambda: transaction.terminated)
    assert stack.app.requests.empty() and stack.app.acks == [] and stack.counts()["server_transactions"] == 0


async def test_invite_server_gives_up_without_ack_timer_h(stack, peer):
    peer.send(request("INVITE", peer, stack.transport.port), ("127.0.0.1", stack.transport.port))
    received, transaction = await stack.app.next()
    transaction.respond(make_response(received, 480, to_tag="t"))
    await eventually(lambda: transaction.terminated)
    assert transaction.ack_timed_out and stack.ack_timeouts == 1


async def test_invite_server_accepted_state_absorbs_retransmissions_with_the_2xx(stack, peer):
    invite = request("INVITE", peer, stack.transport.port)
    peer.send(invite, ("127.0.0.1", stack.transport.port))
    received, transaction = await stack.app.next()
    transaction.respond(make_response(received, 200, to_tag="t"))
    assert transaction.state == "accepted"
    peer.send(invite, ("127.0.0.1", stack.transport.port))
    statuses = [(await peer.receive()).status for _ in range(3)]
    assert statuses == [100, 200, 200]
    assert stack.app.requests.empty()
    await eventually(lambda: transaction.terminated)  # timer L


async def test_non_invite_server_replays_the_final_response_until_timer_j(stack, peer):
    options = request("OPTIONS", peer, stack.transport.port)
    peer.send(options, ("127.0.0.1", stack.transport.port))
    received, transaction = await stack.app.next()
    transaction.respond(make_response(received, 200, to_tag="t"))
    for _ in range(2):
        peer.send(options, ("127.0.0.1", stack.transport.port))
    assert [(await peer.receive()).status for _ in range(3)] == [200, 200, 200]
    assert stack.app.requests.empty() and stack.absorbed_retransmissions == 2
    assert not transaction.respond(make_response(received, 500))  # a second final response is refused
    await eventually(lambda: transaction.terminated)


async def test_non_invite_server_over_tcp_terminates_at_once(stack):
    tcp = await RawPeer.tcp("127.0.0.1", stack.transport.port)
    try:
        tcp.send(request("OPTIONS", tcp, stack.transport.port).replace(b"UDP", b"TCP"))
        received, transaction = await stack.app.next()
        transaction.respond(make_response(received, 200, to_tag="t"))
        assert (await tcp.receive()).status == 200
        await eventually(lambda: transaction.terminated)  # timer J is 0 on reliable transports
    finally:
        await tcp.close()


async def test_rfc2543_requests_without_branch_are_matched(stack, peer):
    invite = request("INVITE", peer, stack.transport.port, branch_id=None, call_id="old-style")
    peer.send(invite, ("127.0.0.1", stack.transport.port))
    received, transaction = await stack.app.next()
    peer.send(invite, ("127.0.0.1", stack.transport.port))
    transaction.respond(make_response(received, 404, to_tag="t"))
    final = await peer.final_response()
    peer.send(ack_for(invite, final), ("127.0.0.1", stack.transport.port))
    await eventually(lambda: transaction.state in ("confirmed", "terminated"))
    assert stack.app.requests.empty() and stack.app.acks == []


async def test_merged_requests_get_482(stack, peer):
    port = stack.transport.port
    peer.send(request("INVITE", peer, port, call_id="merged"), ("127.0.0.1", port))
    _, first = await stack.app.next()
    peer.send(request("INVITE", peer, port, call_id="merged"), ("127.0.0.1", port))  # another branch
    response = await peer.expect(lambda m: isinstance(m, Response) and m.status >= 200)
    assert response.status == 482 and stack.merged_requests == 1
    assert stack.app.requests.empty()
    first.respond(make_response(first.request, 486, to_tag="t"))


def outgoing(method: str, stack: TransactionLayer, peer: RawPeer, cseq: int = 1) -> Request:
    return Request(
        method,
        f"sip:peer@127.0.0.1:{peer.port}",
        [
            ("Via", f"SIP/2.0/UDP 127.0.0.1:{stack.transport.port};branch={branch()};rport"),
            ("Max-Forwards", "70"),
            ("From", "<sip:ua@127.0.0.1>;tag=ours"),
            ("To", f"<sip:peer@127.0.0.1:{peer.port}>"),
            ("Call-ID", f"client-{method}"),
            ("CSeq", f"{cseq} {method}"),
        ],
    )


async def test_non_invite_client_retransmits_and_times_out_with_local_408(stack, peer):
    transaction = await stack.send_request(outgoing("OPTIONS", stack, peer), Flow("UDP", "127.0.0.1", peer.port))
    copies = [await peer.receive() for _ in range(3)]  # the request and retransmissions (timer E)
    assert {c.top_via.branch for c in copies} == {transaction.request.top_via.branch}
    response = await asyncio.wait_for(transaction.response, 10)
    assert response.status == 408 and response.local  # timer F
    assert stack.counts()["client_transactions"] == 0


async def test_non_invite_client_completes_and_absorbs_response_retransmissions(stack, peer):
    transaction = await stack.send_request(outgoing("BYE", stack, peer), Flow("UDP", "127.0.0.1", peer.port))
    received = await peer.receive()
    ok = make_response(received, 200, to_tag="theirs")
    peer.send(ok, ("127.0.0.1", stack.transport.port))
    assert (await asyncio.wait_for(transaction.response, 5)).status == 200
    peer.send(ok, ("127.0.0.1", stack.transport.port))
    await eventually(lambda: transaction.terminated)  # timer K
    assert stack.app.stray == []


async def test_invite_client_acks_a_non_2xx_itself(stack, peer):
    provisional = []
    transaction = await stack.send_request(
        outgoing("INVITE", stack, peer), Flow("UDP", "127.0.0.1", peer.port), on_provisional=provisional.append
    )
    invite = await peer.receive()
    peer.send(make_response(invite, 180, to_tag="theirs"), ("127.0.0.1", stack.transport.port))
    await eventually(lambda: transaction.state == "proceeding")
    peer.drain()
    assert await quiet_for(peer, 4 * TIMERS.t1) == []  # timer A stopped by the 1xx
    busy = make_response(invite, 486, to_tag="theirs")
    peer.send(busy, ("127.0.0.1", stack.transport.port))
    ack = await peer.receive()
    assert ack.method == "ACK" and ack.top_via.branch == invite.top_via.branch
    assert ack.cseq.method == "ACK" and ack.to_addr.tag == "theirs"
    peer.send(busy, ("127.0.0.1", stack.transport.port))  # lost ACK: the 486 again
    assert (await peer.receive()).method == "ACK"
    assert (await transaction.response).status == 486 and [p.status for p in provisional] == [180]


async def test_invite_client_times_out_timer_b_and_hands_2xx_retransmissions_to_the_tu(stack, peer):
    silent = await stack.send_request(outgoing("INVITE", stack, peer), Flow("UDP", "127.0.0.1", peer.port))
    assert [(await peer.receive()).method for _ in range(3)] == ["INVITE"] * 3  # timer A
    assert (await asyncio.wait_for(silent.response, 10)).status == 408
    peer.drain()
    answered = await stack.send_request(outgoing("INVITE", stack, peer, cseq=2), Flow("UDP", "127.0.0.1", peer.port))
    invite = await peer.expect(lambda m: isinstance(m, Request) and m.cseq.seq == 2)
    ok = make_response(invite, 200, to_tag="theirs")
    peer.send(ok, ("127.0.0.1", stack.transport.port))
    assert (await answered.response).status == 200 and answered.state == "accepted"
    peer.send(ok, ("127.0.0.1", stack.transport.port))
    await eventually(lambda: len(stack.app.retransmitted_2xx) == 1)


async def test_unmatched_responses_go_to_the_tu_as_strays(stack, peer):
    data = (
        f"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1:{stack.transport.port};branch={branch()}\r\n"
        "From: <sip:a@b>;tag=1\r\nTo: <sip:c@d>;tag=2\r\nCall-ID: nobody\r\nCSeq: 9 BYE\r\n\r\n"
    ).encode()
    peer.send(data, ("127.0.0.1", stack.transport.port))
    await eventually(lambda: stack.stray_responses == 1)
    assert stack.app.stray[0].call_id == "nobody"


async def test_cancel_finds_its_invite(stack, peer):
    port = stack.transport.port
    invite = request("INVITE", peer, port, branch_id="z9hG4bKcancelme")
    peer.send(invite, ("127.0.0.1", port))
    _, transaction = await stack.app.next()
    cancel = invite.replace(b"INVITE", b"CANCEL")
    peer.send(cancel, ("127.0.0.1", port))
    cancel_request, cancel_transaction = await stack.app.next()
    assert cancel_request.method == "CANCEL" and cancel_transaction is not transaction
    assert stack.find_invite(cancel_request) is transaction
