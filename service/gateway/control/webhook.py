"""The call-end webhook: POST the call's record, quality and transcript to a configured URL.

Each ended call is delivered by its own task, with retries and exponential backoff
(``backoff``, 2×, 4×... capped at ``MAX_BACKOFF_SECONDS``; a ``Retry-After`` from the
receiver is honoured within that cap) for up to ``attempts`` tries. A connection error, a
timeout, 408, 429 or a 5xx is retried; any other answer outside 2xx is final. Outcomes
are counted in ``moshimoshi_webhook_deliveries_total{outcome}``: ``delivered``, ``retry``
(one per retried attempt), ``failed`` (attempts exhausted), ``rejected`` (final 4xx/3xx),
``abandoned`` (the gateway stopped first).

Headers: ``X-Moshimoshi-Event: call.ended``, ``X-Moshimoshi-Delivery: <uuid>`` (the same on
every retry of one delivery, so receivers can drop repeats) and, with a secret,
``X-Moshimoshi-Signature: sha256=<hex HMAC-SHA256 of the body>``. The body carries the
transcript (personal data): it is never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import typing as tp
import uuid

import httpx

from service import __version__
from service.api.models import CallInfo
from service.call_record import CallRecord
from service.config import ConfigError
from service.gateway import metrics
from service.gateway.calls.transcript import TranscriptEvent
from service.gateway.control.transcript_reader import build
from service.settings import GatewaySettings

log = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 300.0
MAX_CONCURRENT_POSTS = 8
RETRY_STATUSES = frozenset({408, 429})
SIGNATURE_HEADER = "X-Moshimoshi-Signature"
DELIVERY_HEADER = "X-Moshimoshi-Delivery"
EVENT_HEADER = "X-Moshimoshi-Event"


def call_ended_payload(record: CallRecord, transcript: list[TranscriptEvent]) -> dict[str, tp.Any]:
    """The webhook body for an ended call, in the API's own shapes: ``record`` as
    ``GET /v1/calls/{id}`` (without quality), ``quality`` as its quality, ``transcript`` as
    ``GET /v1/calls/{id}/transcript``."""
    info = CallInfo.of(record, on_this_gateway=True)
    whole = build(info.id, enumerate(transcript), complete=True, end_reason=info.end_reason)
    return {
        "event": "call.ended",
        "record": info.model_dump(exclude={"quality", "on_this_gateway"}),
        "quality": record.quality.measured() if record.quality is not None else {},
        "transcript": whole.model_dump(exclude_none=True),
    }


def sign(secret: str, body: bytes) -> str:
    """The signature header's value for ``body``: ``sha256=<hex>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class WebhookSender:
    """Delivers call-end payloads in the background; ``close()`` waits for the last ones."""

    def __init__(
        self, url: str, *, secret: str | None = None, attempts: int = 5, backoff: float = 1.0, timeout: float = 5.0
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError("the webhook URL must start with http:// or https://")
        self.url = url
        self.secret = secret
        self.attempts = max(1, attempts)
        self.backoff = backoff
        self.timeout = timeout
        self._client: httpx.AsyncClient | None = None
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_POSTS)
        self._tasks: set[asyncio.Task] = set()

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> WebhookSender | None:
        """The sender the settings ask for (None without a URL); ConfigError for a bad URL."""
        if not settings.webhook_url:
            return None
        try:
            return cls(
                settings.webhook_url,
                secret=settings.webhook_secret,
                attempts=settings.webhook_attempts,
                backoff=settings.webhook_backoff_seconds,
                timeout=settings.webhook_timeout_seconds,
            )
        except ValueError as exc:
            raise ConfigError(f"MOSHIMOSHI_WEBHOOK_URL: {exc}") from None

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def submit(self, call_id: str, payload: dict[str, tp.Any]) -> None:
        """Deliver ``payload`` in the background (returns at once)."""
        task = asyncio.create_task(self.deliver(call_id, payload), name=f"webhook-{call_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def deliver(self, call_id: str, payload: dict[str, tp.Any]) -> str:
        """POST until delivered or out of attempts; returns the outcome."""
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": f"moshimoshi/{__version__}",
            EVENT_HEADER: "call.ended",
            DELIVERY_HEADER: str(uuid.uuid4()),
        }
        if self.secret:
            headers[SIGNATURE_HEADER] = sign(self.secret, body)
        try:
            for attempt in range(1, self.attempts + 1):
                problem, retry_after = await self._post(body, headers)
                if problem is None:
                    metrics.WEBHOOK_DELIVERIES.labels("delivered").inc()
                    return "delivered"
                if retry_after is None:
                    metrics.WEBHOOK_DELIVERIES.labels("rejected").inc()
                    log.warning("webhook for call %s refused: %s (not retried)", call_id, problem)
                    return "rejected"
                if attempt == self.attempts:
                    break
                delay = min(MAX_BACKOFF_SECONDS, max(retry_after, self.backoff * 2 ** (attempt - 1)))
                metrics.WEBHOOK_DELIVERIES.labels("retry").inc()
                log.info(
                    "webhook for call %s: %s (attempt %d of %d); retrying in %.2fs",
                    call_id,
                    problem,
                    attempt,
                    self.attempts,
                    delay,
                )
                await asyncio.sleep(delay)
        except asyncio.CancelledError:
            metrics.WEBHOOK_DELIVERIES.labels("abandoned").inc()
            raise
        metrics.WEBHOOK_DELIVERIES.labels("failed").inc()
        log.warning("webhook for call %s not delivered after %d attempts: %s", call_id, self.attempts, problem)
        return "failed"

    async def _post(self, body: bytes, headers: dict[str, str]) -> tuple[str | None, float | None]:
        """(None, None) when delivered; else (what went wrong, seconds to wait at least before
        a retry, or None when retrying is pointless)."""
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout, follow_redirects=False)
        async with self._slots:
            try:
                response = await self._client.post(self.url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                return f"{type(exc).__name__}: {exc}".rstrip(": "), 0.0
        if 200 <= response.status_code < 300:
            return None, None
        problem = f"HTTP {response.status_code}"
        if response.status_code >= 500 or response.status_code in RETRY_STATUSES:
            retry_after = 0.0
            with contextlib.suppress(ValueError):
                retry_after = float(response.headers.get("Retry-After", "0"))
            return problem, max(0.0, retry_after)
        return problem, None

    async def close(self, timeout: float = 2.0) -> None:
        """Give deliveries in progress ``timeout`` seconds, then abandon them."""
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if self._client is not None:
            await self._client.aclose()
            self._client = None
