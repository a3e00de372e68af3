"""The ASR worker's state: its backend and the VAD (loaded in a thread), the batching
queues (utterances for the backend, audio windows for the VAD), sessions.

States: ``loading`` -> ``ready`` -> ``draining`` -> ``stopped`` (or ``failed``). Sessions
are accepted only while ``ready`` and below ``max_sessions``.
"""

from __future__ import annotations

import asyncio
import logging
import typing as tp

from service.asr.backends import Backend
from service.asr.batcher import UtteranceBatcher
from service.asr.metrics import AsrMetrics
from service.asr.vad_batcher import VadBatcher
from service.settings import AsrSettings

if tp.TYPE_CHECKING:
    from service.asr.session import AsrSession

log = logging.getLogger(__name__)

BackendFactory = tp.Callable[[], Backend]


class NotAccepting(Exception):
    """No new session now (loading, draining or full): close 4029."""


class AsrRuntime:
    """Owns the backend, the batcher and the live sessions of one ASR worker."""

    def __init__(self, settings: AsrSettings, backend_factory: BackendFactory) -> None:
        self.settings = settings
        self.metrics = AsrMetrics()
        self._factory = backend_factory
        self.state = "loading"
        self.error: BaseException | None = None
        self.backend: Backend | None = None
        self.batcher: UtteranceBatcher | None = None
        self.vad: VadBatcher | None = None
        self.sessions: set[AsrSession] = set()
        self.ready_event = asyncio.Event()
        self.stopped_event = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._loader: asyncio.Task | None = None
        self.request_drain: tp.Callable[[str], None] | None = None
        self.on_sessions_changed: tp.Callable[[int], None] | None = None

    @property
    def model(self) -> str:
        return self.backend.name if self.backend is not None else (self.settings.model or "?")

    async def start(self) -> None:
        """Start loading the backend in a thread; returns at once."""
        self._loader = asyncio.create_task(self._load(), name="asr-load")

    async def _load(self) -> None:
        from service.asr.vad import SileroVad

        try:
            self.backend = await asyncio.to_thread(self._factory)
            vad_model = await asyncio.to_thread(SileroVad)
        except Exception as exc:  # a bad model path, a failed download: the process exits 2
            self.error = exc
            self.state = "failed"
            log.error("ASR backend failed to load: %s: %s", type(exc).__name__, exc)
            self.ready_event.set()
            self.stopped_event.set()
            return
        settings = self.settings
        self.batcher = UtteranceBatcher(
            self.backend,
            max_batch=settings.max_batch,
            max_wait=settings.batch_wait_ms / 1000,
            max_queue=max(settings.max_queue, settings.max_batch),
            metrics=self.metrics,
        )
        self.batcher.start()
        metrics = self.metrics
        self.vad = VadBatcher(
            vad_model,
            on_dropped=metrics.vad_dropped_seconds.inc,
            on_round=metrics.vad_batch_windows.observe,
            on_cpu=metrics.vad_cpu_seconds.inc,
        )
        self.vad.start()
        if self.state == "loading":
            self.state = "ready"
            self.metrics.ready.set(1)
        log.info("ASR worker ready: %s (%s)", self.backend.name, settings.backend)
        self.ready_event.set()

    async def wait_ready(self) -> None:
        await self.ready_event.wait()
        if self.error is not None:
            raise self.error

    def admit(self, session: AsrSession) -> None:
        """Take a session, or raise NotAccepting."""
        if self.state != "ready":
            raise NotAccepting(f"the ASR worker is {self.state}")
        if len(self.sessions) >= self.settings.max_sessions:
            raise NotAccepting(f"all {self.settings.max_sessions} sessions are in use")
        self.sessions.add(session)
        self._idle.clear()
        self._changed()

    def leave(self, session: AsrSession) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            self._changed()
        if not self.sessions:
            self._idle.set()

    def _changed(self) -> None:
        self.metrics.sessions.set(len(self.sessions))
        if self.on_sessions_changed is not None:
            self.on_sessions_changed(self.settings.max_sessions - len(self.sessions))

    async def drain(self, grace: float) -> None:
        """No new sessions; wait for the open ones (up to ``grace``), end the rest, stop."""
        if self.state in ("loading", "ready"):
            self.state = "draining"
            self.metrics.ready.set(0)
        try:
            async with asyncio.timeout(grace):
                await self._idle.wait()
        except TimeoutError:
            log.info("drain grace over: ending %d ASR sessions", len(self.sessions))
            for session in list(self.sessions):
                session.shutdown()
            async with asyncio.timeout(5):
                await self._idle.wait()
        self.stopped_event.set()

    def describe(self) -> dict[str, tp.Any]:
        return {
            "role": "asr",
            "state": self.state,
            "backend": self.settings.backend,
            "model": self.model,
            "random_weights": bool(self.backend is not None and self.backend.random_weights),
            "sessions": len(self.sessions),
            "max_sessions": self.settings.max_sessions,
            "queued": self.batcher.queued if self.batcher is not None else 0,
            "max_batch": self.settings.max_batch,
        }

    async def close(self) -> None:
        if self._loader is not None:
            self._loader.cancel()
            await asyncio.gather(self._loader, return_exceptions=True)
        if self.vad is not None:
            await self.vad.stop()
        if self.batcher is not None:
            await self.batcher.close()
        if self.backend is not None:
            await self.backend.close()
        self.state = "stopped"
