"""Every few seconds: each live call's quality into the jitter and loss histograms and into
its call record (so that every gateway replica can show it), and retention of the ended
calls kept in memory (their transcripts are personal data: they go when the retention
says so, as the Redis copies do)."""

from __future__ import annotations

import asyncio

from service.call_record import ACTIVE
from service.gateway import metrics
from service.gateway.calls.call import Call
from service.gateway.calls.recorder import CallRecorder
from service.gateway.calls.table import CallTable

SAMPLE_SECONDS = 5.0
IDLE_POLL_SECONDS = 0.5


def sample_call(call: Call, recorder: CallRecorder) -> None:
    """One live call's quality into the histograms and its record."""
    if call.state != ACTIVE:
        return
    quality = call.quality()
    if quality.packets_received:
        metrics.RTP_JITTER.observe(max(0.0, quality.jitter_ms or 0.0) / 1000)
        metrics.RTP_LOSS.observe(max(0.0, quality.loss_fraction or 0.0))
    recorder.quality(call, quality)


async def sample_forever(table: CallTable, recorder: CallRecorder, period: float = SAMPLE_SECONDS) -> None:
    """Calls are sampled one at a time, spread over the period: sampling them all at once
    would hold the event loop for milliseconds at a few hundred calls, and every packet
    due meanwhile would leave late."""
    while True:
        calls = list(table.live.values())
        if not calls:
            await asyncio.sleep(IDLE_POLL_SECONDS)  # a new call is sampled soon after it starts
        gap = period / max(1, len(calls))
        for call in calls:
            await asyncio.sleep(gap)
            if table.get(call.id) is call:
                sample_call(call, recorder)
        table.forget_expired()
