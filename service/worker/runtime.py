"""The worker's moving parts in one place: engine thread, clock, slots, sessions, draining.

The inference thread builds the engine (loading the checkpoint), warms it up, and then
runs the :class:`~service.worker.scheduler.BatchClock` in that same thread, so that every
torch call (and every CUDA graph) lives on one thread. The event loop only moves bytes.
States: ``loading`` -> ``ready`` -> ``draining`` -> ``stopped`` (or ``failed``). Apart from
the state, a ready worker whose step p99 over the last minute exceeds the step budget is
``overloaded``: it takes no new sessions until the p99 is back under the budget.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import typing as tp

from service.settings import WorkerSettings
from service.wire import FRAME_MS, SAMPLE_RATE
from service.worker.checkpoint import ModelInfo
from service.worker.engine_api import Engine
from service.worker.metrics import WorkerMetrics
from service.worker.scheduler import BatchClock, Driver, ImmediateDriver, OutputSink
from service.worker.sizing import SlotSizing
from service.worker.slots import NotAccepting, SlotTable, TokenValidator
from service.worker.stepwatch import StepWatch
from service.worker.text import skipped_ids

if tp.TYPE_CHECKING:
    from service.worker.session import Session

log = logging.getLogger(__name__)

EngineFactory = tp.Callable[[], Engine]


class WorkerRuntime:
    """Owns the engine and its thread, the clock, the slot table and the live sessions."""

    def __init__(
        self,
        settings: WorkerSettings,
        engine_factory: EngineFactory,
        *,
        validator: TokenValidator | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or WorkerMetrics()
        self._factory = engine_factory
        self.validator = validator
        self.state = "loading"
        self._draining = False  # drain() under way
        self.error: BaseException | None = None
        self.engine: Engine | None = None
        self.info = ModelInfo(model=settings.model or "?", license="?", source="loading")
        self.table: SlotTable | None = None
        self.driver: Driver | None = None
        self.clock: BatchClock | None = None
        self.skip_text_ids: frozenset[int] = frozenset()
        self.sessions: dict[int, Session] = {}
        self.warm_up_seconds: float | None = None
        self.sizing: SlotSizing | None = None
        self.overloaded = False
        self.watch: StepWatch | None = None
        # Told True/False when the worker becomes overloaded or recovers (the pool announces it).
        self.on_overload: tp.Callable[[bool], None] | None = None
        self.ready_event = asyncio.Event()
        self._idle = asyncio.Event()  # set while no session holds a slot
        self._idle.set()
        self.stopped_event = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._thread_done = threading.Event()
        self._thread_clock: BatchClock | None = None
        self._closing = threading.Event()
        # Starts draining (set by serve_worker: also announces it to the pool).
        self.request_drain: tp.Callable[[str], None] | None = None
        # Told (slot, token) whenever a session gives its slot back (the pool releases the lease).
        self.on_slot_released: tp.Callable[[int, int | None], None] | None = None

    # --- life cycle ---------------------------------------------------------------------
    async def start(self) -> None:
        """Start loading in the inference thread; returns at once (see :meth:`wait_ready`)."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._inference_thread, name="moshimoshi-inference", daemon=True)
        self._thread.start()

    async def wait_ready(self) -> None:
        """Wait until the engine is warm; raise the load error if it failed."""
        await self.ready_event.wait()
        if self.error is not None:
            raise self.error

    def _inference_thread(self) -> None:
        assert self._loop is not None
        engine: Engine | None = None
        try:
            engine = self._factory()
            started = time.monotonic()
            engine.warm_up()
            warm = time.monotonic() - started
            skip = skipped_ids(engine.tokenizer, engine.text_padding_ids) if engine.tokenizer else frozenset()
            clock = None
            if engine.clocked:
                self.watch = StepWatch(self.settings.step_budget_ms, self.settings.overload_window_seconds)
                clock = BatchClock(
                    engine,
                    self.metrics,
                    self._loop,
                    queue_frames=self.settings.input_queue_frames,
                    watch=self.watch,
                    on_overload=self._overload_changed,
                )
            # close() sets _closing, then stops _thread_clock: whatever the interleaving,
            # a clock is either stopped by close() or never started.
            self._thread_clock = clock
            if self._closing.is_set():
                return
            self._post(self._ready, engine, clock, skip, warm)
            if clock is not None:
                clock.run()
        except BaseException as exc:  # noqa: BLE001 - reported to the loop, which exits non-zero
            if engine is not None:
                log.exception("the inference thread failed")
            self._post(self._failed, exc)
        finally:
            try:
                if engine is not None:
                    engine.close()
            finally:
                self._thread_done.set()

    def _post(self, callback: tp.Callable[..., None], *args: tp.Any) -> None:
        """Run ``callback`` on the event loop (dropped if the loop is gone: we are exiting)."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            pass

    def _ready(self, engine: Engine, clock: BatchClock | None, skip: frozenset[int], warm: float) -> None:
        self.engine = engine
        self.info = engine.info
        self.clock = clock
        self.driver = clock if clock is not None else ImmediateDriver(engine, asyncio.get_running_loop())
        self.skip_text_ids = skip
        self.warm_up_seconds = warm
        self.table = SlotTable(engine.batch_size, self.validator)
        if self.validator is not None:
            self.table.on_preempt = self._preempt
        self.metrics.slots.set(engine.batch_size)
        self.metrics.info.labels(engine.info.model, engine.info.license).set(1)
        self._publish_sizing(engine.sizing)
        if self.state == "loading":
            self.state = "ready"
            self.table.accepting = True
            self.metrics.ready.set(1)
        log.info("worker ready: %s, %d slots, warm-up %.1f s", engine.info.banner(), engine.batch_size, warm)
        self.ready_event.set()

    def _publish_sizing(self, sizing: SlotSizing | None) -> None:
        metrics = self.metrics
        metrics.step_budget.set(self.settings.step_budget_ms / 1000)
        if self.info.context_seconds is not None:
            metrics.context.set(self.info.context_seconds)
        kv_bytes = getattr(self.engine, "kv_bytes_per_slot", None)
        if kv_bytes:
            metrics.slot_kv_bytes.set(kv_bytes)
        self.sizing = sizing
        if sizing is None:
            return
        if sizing.memory_slots is not None:
            metrics.memory_slots.set(sizing.memory_slots)
        metrics.slots_reason.labels(sizing.reason).set(1)
        if sizing.p50_ms is not None and sizing.p99_ms is not None:
            metrics.warmup_step.labels("0.5").set(sizing.p50_ms / 1000)
            metrics.warmup_step.labels("0.99").set(sizing.p99_ms / 1000)

    def _overload_changed(self, overloaded: bool, p99_ms: float | None) -> None:
        """On the loop: the step p99 over the window crossed the budget, one way or the other."""
        if overloaded == self.overloaded:
            return
        self.overloaded = overloaded
        budget = self.settings.step_budget_ms
        window = self.settings.overload_window_seconds
        if overloaded:
            log.warning(
                "step p99 %.1f ms over the last %.0f s exceeds the %g ms budget: taking no new "
                "calls until it recovers (%d call(s) go on)",
                p99_ms or 0.0,
                window,
                budget,
                len(self.sessions),
            )
        else:
            shown = f"{p99_ms:.1f} ms" if p99_ms is not None else "no steps"
            log.info(
                "step p99 over the last %.0f s is back under the %g ms budget (%s): taking calls again",
                window,
                budget,
                shown,
            )
        if self.on_overload is not None:
            self.on_overload(overloaded)

    def _failed(self, exc: BaseException) -> None:
        if self.state in ("stopped",):
            return
        self.error = exc
        self.state = "failed"
        self.metrics.ready.set(0)
        if self.table is not None:
            self.table.stop_accepting("the worker failed")
        for session in list(self.sessions.values()):
            session.end("shutdown")
        self.ready_event.set()
        self.stopped_event.set()

    def begin_drain(self, grace_seconds: float) -> None:
        """Stop taking sessions now (``drain`` lets the calls finish)."""
        if self.state in ("draining", "stopped"):
            return
        log.info("draining: no new sessions; %d call(s) may go on for up to %.0f s", len(self.sessions), grace_seconds)
        self.state = "draining"
        self.metrics.ready.set(0)
        if self.table is not None:
            self.table.stop_accepting("the worker is draining")

    async def drain(self, grace_seconds: float) -> None:
        """Stop taking sessions; let calls go on until idle or ``grace_seconds``; end the rest."""
        if self.state == "stopped" or self._draining:
            return
        self._draining = True
        self.begin_drain(grace_seconds)
        if not await self._wait_idle(grace_seconds):
            log.info("grace period over: ending %d call(s)", len(self.sessions))
            for session in list(self.sessions.values()):
                session.end("shutdown")
            await self._wait_idle(5.0)
        self.stopped_event.set()

    async def _wait_idle(self, seconds: float) -> bool:
        try:
            async with asyncio.timeout(seconds):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Stop the clock and wait for the inference thread (it may still be loading)."""
        self.state = "stopped"
        self.metrics.ready.set(0)
        self._closing.set()
        if self._thread_clock is not None:
            self._thread_clock.stop()
        if self._thread is not None:
            await asyncio.to_thread(self._thread_done.wait, 30.0)

    @property
    def accepting(self) -> bool:
        """Takes new sessions: ready, not overloaded, a slot free."""
        return (
            self.state == "ready"
            and not self.overloaded
            and self.table is not None
            and self.table.accepting
            and self.table.free > 0
        )

    # --- what sessions use --------------------------------------------------------------
    def serves_model(self, model: str) -> bool:
        names = {self.info.model, self.info.path, self.settings.model}
        return model in {name for name in names if name}

    async def bind(self, slot: int | None, token: int | None, call_id: str, session: Session) -> int:
        if self.table is None or self.state != "ready":
            reason = "the worker is loading its model" if self.state == "loading" else f"the worker is {self.state}"
            raise NotAccepting(reason)
        if self.overloaded:
            p99 = self.watch.p99_ms if self.watch is not None else None
            raise NotAccepting(
                f"the worker is overloaded: its step p99 ({p99 or 0:.0f} ms over the last "
                f"{self.settings.overload_window_seconds:.0f} s) exceeds the "
                f"{self.settings.step_budget_ms:g} ms budget"
            )
        return await self.table.bind(slot, token, call_id, owner=session)

    def slot_sampling(self, slot: int, overrides: dict[str, tp.Any] | None) -> dict[str, tp.Any] | None:
        """Have ``slot``'s new session sample with ``overrides`` (before it is attached);
        returns the settings it samples with (what its ``started`` message says)."""
        engine = self.engine
        if engine is None:
            return self.info.sampling
        return engine.set_slot_sampling(slot, overrides)

    def attach(self, slot: int, sink: OutputSink, session: Session) -> None:
        assert self.driver is not None and self.table is not None
        self.driver.attach(slot, sink)
        self.sessions[slot] = session
        self._idle.clear()
        self.metrics.slots_busy.set(self.table.busy)

    def push(self, slot: int, frame: bytes) -> None:
        if self.driver is not None:
            self.driver.push(slot, frame)

    def unbind(self, slot: int, session: Session) -> None:
        """Free ``slot`` if ``session`` holds it (idempotent)."""
        if self.table is None:
            return
        token = self.table.token(slot) if self.table.holder(slot) is not None else None
        held = self.sessions.get(slot) is session
        if held:
            del self.sessions[slot]
            if self.driver is not None:
                self.driver.detach(slot)
            if not self.sessions:
                self._idle.set()
        self.table.release(slot, owner=session)
        self.metrics.slots_busy.set(self.table.busy)
        if held and self.on_slot_released is not None:
            self.on_slot_released(slot, token)

    def _preempt(self, slot: int, owner: object | None) -> None:
        """A newer lease took ``slot``: its old session ends with 4003 (fenced out)."""
        session = self.sessions.get(slot)
        if session is not None and session is owner:
            del self.sessions[slot]
            if self.driver is not None:
                self.driver.detach(slot)
            if not self.sessions:
                self._idle.set()
            session.fence_out()
        log.warning("slot %d: fenced out its session for a newer lease", slot)

    def describe(self) -> dict[str, tp.Any]:
        """The /v1/info document."""
        table = self.table
        out: dict[str, tp.Any] = {
            "model": self.info.model,
            "license": self.info.license,
            "research_only": self.info.research_only,
            "slots": table.size if table else None,
            "free": table.free if table and self.state == "ready" else 0,
            "busy": table.busy if table else 0,
            "state": self.state,
            "model_info": self.info.to_dict(),
            "worker_id": self.settings.worker_id,
            "frame_ms": FRAME_MS,
            "sample_rate": SAMPLE_RATE,
            "max_call_seconds": self.settings.max_call_seconds,
            "warm_up_seconds": self.warm_up_seconds,
            "accepting": self.accepting,
            "overloaded": self.overloaded,
            "step_budget_ms": self.settings.step_budget_ms,
            "step_p99_ms": (None if self.watch is None or self.watch.p99_ms is None else round(self.watch.p99_ms, 2)),
            "step_window_seconds": self.settings.overload_window_seconds,
            "sizing": self.sizing.to_dict() if self.sizing is not None else None,
        }
        if self.clock is not None:
            out["clock"] = {
                "steps": self.clock.steps,
                "overruns": self.clock.overruns,
                "skipped_ticks": self.clock.skipped_ticks,
                "underruns": self.clock.underruns,
                "input_dropped": self.clock.dropped,
            }
        if self.error is not None:
            out["error"] = str(self.error)
        return out
