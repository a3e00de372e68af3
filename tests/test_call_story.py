"""The call's story in the log: masked caller numbers, quality summaries, and the web
servers' per-connection lines kept to DEBUG."""

from __future__ import annotations

import logging

from service import logs
from service.call_record import CallQuality, GatewayLatency
from service.gateway.calls.story import quality_summary
from service.privacy import masked_caller
from sip.identity import CallerIdentity, Party


def test_the_caller_shown_is_the_asserted_number_masked_or_withheld():
    asserted = CallerIdentity(from_party=Party(number="anonymous"), asserted=(Party(number="+81312345678"),))
    assert masked_caller(asserted) == "********5678"
    assert masked_caller(CallerIdentity(asserted=(Party(number="+81312345678"),), privacy=("id",))) == "withheld"
    assert masked_caller(None, "sip:0312345678@trunk.example") == "******5678"
    assert masked_caller(asserted.to_dict()) == "********5678"


def test_the_quality_summary_says_whether_the_line_was_good():
    quality = CallQuality(
        codec="PCMU",
        loss_fraction=0.0123,
        jitter_ms=3.14,
        rtt_ms=24.4,
        concealed_frames=3,
        gateway_latency_ms=GatewayLatency(p50=21.3),
        failovers=1,
    )
    assert quality_summary(quality) == (
        "PCMU, loss 1.2 %, jitter 3.1 ms, RTT 24 ms, gateway latency p50 21 ms, 3 frames concealed, 1 failover"
    )
    assert quality_summary(None) == "no media"


def test_uvicorn_per_connection_lines_are_debug(caplog):
    logs.setup("info")
    server = logging.getLogger("uvicorn.error")
    # at_level on the logger itself: an in-process uvicorn earlier in the run leaves its level at WARNING
    with caplog.at_level(logging.INFO, logger="uvicorn.error"):
        server.info('%s - "WebSocket %s" [accepted]', "127.0.0.1:5000", "/v1/session")
        server.info("connection open")
        server.info("Started server process [%d]", 42)
    messages = [r.getMessage() for r in caplog.records if r.name == "uvicorn.error"]
    assert messages == ["Started server process [42]"]
