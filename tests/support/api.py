"""Helpers for the API tests: a real Gateway (no SIP started) with its real app served by
uvicorn on a free port, and calls driven through the steps of the gateway's own call
lifecycle (begin, answered, finish), as an ingress's leg would."""

from __future__ import annotations

import asyncio
import contextlib
import typing as tp
from collections.abc import AsyncIterator

import uvicorn

from service.api.app import create_app
from service.gateway.calls.call import Call
from service.gateway.calls.transcript import TranscriptEvent
from service.gateway.main import Gateway
from service.settings import GatewaySettings
from sip.identity import CallerIdentity

READ_TOKEN = "unit-read-token-0123456789"
RECORDINGS_TOKEN = "unit-recordings-token-0123456789"
ADMIN_TOKEN = "unit-admin-token-0123456789"
CALL_TOKEN = "unit-call-token-0123456789"
TOKENS = [f"{READ_TOKEN}:read", f"{RECORDINGS_TOKEN}:recordings", f"{ADMIN_TOKEN}:admin", f"{CALL_TOKEN}:call"]


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


READ = auth(READ_TOKEN)
RECORDINGS = auth(RECORDINGS_TOKEN)
ADMIN = auth(ADMIN_TOKEN)
CALL = auth(CALL_TOKEN)


class ApiGateway:
    """A Gateway with its control plane running and its app on ``base`` (http://...)."""

    def __init__(self, gateway: Gateway, port: int) -> None:
        self.gateway = gateway
        self.port = port

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_base(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start_call(
        self,
        *,
        from_uri: str = "sip:alice@192.0.2.10",
        worker_id: str = "w-test",
        slot: int = 0,
        sampling: dict | None = None,
        identity: CallerIdentity | None = None,
    ) -> Call:
        """A call arriving, getting a slot and answered, as the SIP ingress runs it."""
        gateway = self.gateway
        call = Call(
            "sip",
            from_uri=from_uri,
            to_uri="sip:agent@gateway.test",
            sip_call_id="sip-1",
            source="192.0.2.10:5060",
            codec="PCMU",
            identity=identity,
            gateway_id=gateway.gateway_id,
        )
        gateway.lifecycle.begin(call)
        gateway.lifecycle.routed(call, gateway.lifecycle.route_of(call))
        call.record.worker_id, call.record.slot, call.record.sampling = worker_id, slot, sampling
        gateway.lifecycle.answered(call)
        return call

    def refuse_call(
        self,
        reason: str = "rejected-busy",
        status: int | None = 503,
        *,
        identity: CallerIdentity | None = None,
        detail: str = "all agents busy",
    ) -> Call:
        """A call arriving and refused before its answer, as the lifecycle ends one."""
        gateway = self.gateway
        call = Call(
            "sip",
            from_uri="sip:+819012345678@192.0.2.10",
            to_uri="sip:agent@gateway.test",
            sip_call_id="sip-r",
            source="192.0.2.10:5060",
            sip_transport="UDP",
            identity=identity,
            gateway_id=gateway.gateway_id,
        )
        gateway.lifecycle.begin(call)
        call.refused_status = status
        call.end(reason, detail)
        gateway.lifecycle.finish(call)
        return call

    @staticmethod
    def say(call: Call, text: str, t: float | None = None) -> None:
        call.add_transcript(TranscriptEvent(t=call.call_seconds if t is None else t, kind="agent", text=text))

    @staticmethod
    def dtmf(call: Call, digit: str, t: float = 0.0) -> None:
        call.add_transcript(TranscriptEvent(t=t, kind="dtmf", text=digit, duration_ms=120.0))

    def end_call(self, call: Call, reason: str = "remote-bye") -> None:
        call.end(reason)
        self.gateway.lifecycle.finish(call)

    async def hang_up(self, call: Call, reason: str = "remote-bye") -> None:
        """The call ends as the lifecycle ends it: the media stopped, the caller's last words
        and the recording closed, then the record."""
        call.end(reason)
        call.mark_end_time()
        await self.gateway.capture.end(call)
        self.gateway.lifecycle.finish(call)

    async def settle(self, timeout: float = 5.0) -> None:
        """Wait for the gateway's background writes (records, transcript pieces)."""
        await self.gateway.recorder.settle(timeout)
        if self.gateway.transcript_store is not None:
            assert await self.gateway.transcript_store.flush(timeout)
        if self.gateway.refusal_store is not None:
            assert await self.gateway.refusal_store.flush(timeout)


def identity_of(*headers: str, dialled: str = "0501234567") -> CallerIdentity:
    """The identity a SIP INVITE to ``dialled`` with ``headers`` carries."""
    from sip.message import parse_message

    text = (
        f"INVITE sip:{dialled}@gateway.test SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.10;branch=z9hG4bK1\r\n"
        "From: <sip:anonymous@anonymous.invalid>;tag=1\r\nTo: <sip:agent@gateway.test>\r\nCall-ID: i-1\r\n"
        "CSeq: 1 INVITE\r\n" + "".join(h + "\r\n" for h in headers) + "Content-Length: 0\r\n\r\n"
    )
    return CallerIdentity.from_request(parse_message(text.encode()))


def gateway_settings(redis_url: str | None, **overrides: tp.Any) -> GatewaySettings:
    values: dict[str, tp.Any] = {
        "sip_host": "127.0.0.1",
        "sip_port": 0,
        "http_host": "127.0.0.1",
        "http_port": 0,
        "redis_url": redis_url,
        "api_tokens": list(TOKENS),
        "log_level": "warning",
    }
    values.update(overrides)
    return GatewaySettings(**values)


@contextlib.asynccontextmanager
async def api_gateway(redis_url: str | None, **overrides: tp.Any) -> AsyncIterator[ApiGateway]:
    """A Gateway (control plane started, SIP not) and its app served on a free port."""
    gateway = Gateway(gateway_settings(redis_url, **overrides))
    gateway.start_control_plane()
    app = create_app(gateway.control, gateway.api_tokens)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off", access_log=False)
    )
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 (uvicorn has no event)
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield ApiGateway(gateway, port)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        for call in list(gateway.table.live.values()):
            call.end("test-over")
            gateway.lifecycle.finish(call)
        if gateway.recording_writer is not None:
            await gateway.recording_writer.close()
        if gateway._tasks:
            await asyncio.wait(list(gateway._tasks), timeout=5)
        await gateway.recorder.settle(timeout=5)
        await gateway.stop_control_plane()
        if gateway.pool is not None:
            await gateway.pool.close()
