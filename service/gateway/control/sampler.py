"""Every few seconds: each live call's quality into the jitter and loss histograms and into
its call record (so that every gateway replica can show it), and retention of the ended
calls kept in memory (their transcripts are personal data: they go when the retention
says so, as the Redis copies do)."""

from __future__ import annotations

import asyncio
import time
import typing as tp

from service.gateway import metrics

if tp.TYPE_CHECKING:
    from service.gateway.main import Gateway

SAMPLE_SECONDS = 5.0
IDLE_POLL_SECONDS = 0.5


def sample_call(gateway: Gateway, call) -> None:
    """One live call's quality into the histograms and its record."""
    if call.media is None or call.state != "active":
        return
    quality = call.media.quality()
    if quality.get("packets_received"):
        metrics.RTP_JITTER.observe(max(0.0, quality.get("jitter_ms") or 0.0) / 1000)
        metrics.RTP_LOSS.observe(max(0.0, quality.get("loss_fraction") or 0.0))
    stored = {k: v for k, v in quality.items() if v is not None}
    stored["failovers"] = call.failovers
    gateway.record_update(call, quality=stored)


def sample_once(gateway: Gateway) -> None:
    for call in list(gateway.calls.values()):
        sample_call(gateway, call)
    forget_expired(gateway)


def forget_expired(gateway: Gateway, now: float | None = None) -> int:
    """Drop ended calls older than the retention from memory; returns how many."""
    cutoff = (time.time() if now is None else now) - gateway.settings.call_retention_seconds
    kept = [s for s in gateway.recent if (s.get("ended_at") or 0.0) >= cutoff]
    dropped = len(gateway.recent) - len(kept)
    if dropped:
        gateway.recent[:] = kept
    return dropped


async def sample_forever(gateway: Gateway, period: float = SAMPLE_SECONDS) -> None:
    """Calls are sampled one at a time, spread over the period: sampling them all at once
    would hold the event loop for milliseconds at a few hundred calls, and every packet
    due meanwhile would leave late."""
    while True:
        calls = list(gateway.calls.values())
        if not calls:
            await asyncio.sleep(IDLE_POLL_SECONDS)  # a new call is sampled soon after it starts
        gap = period / max(1, len(calls))
        for call in calls:
            await asyncio.sleep(gap)
            if call.id in gateway.calls:
                sample_call(gateway, call)
        forget_expired(gateway)
