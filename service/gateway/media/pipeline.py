"""A call's media pipeline and its named taps.

Every call has one pipeline between its ingress's media edge (RTP, or WebRTC through
aiortc) and its worker session. The edge does the transport and codec work; the pipeline
carries the model frames and offers four taps, points where anyone may listen without
touching the ingress, the edge or the pacer::

    caller ──RTP/SRTP or WebRTC──▶ jitter buffer ─▶ decode ─▶ PLC ──(caller)──▶ resample to 24 kHz,
                                                                               cut into 80 ms frames
                                                                                      │
                                                                              (caller_model)
                                                                                      ▼
                                                                             worker session (model)
                                                                                      │
                                                                                  (agent)
                                                                                      ▼
    caller ◀─────────── RTP or WebRTC track ◀── pacer ◀── encode ◀── resample to the codec's rate
    caller ──telephone-event (RFC 4733) or SIP INFO──▶ (dtmf) ──▶ transcript, metrics

* ``caller``: the caller's audio after the jitter buffer and loss concealment, at the
  edge's audio rate (8 or 16 kHz for SIP G.711/G.722, 24 kHz for Opus after its
  decimation): :class:`CallerAudio`, one playout slot or one model frame's worth at a time.
  Caller ASR attaches here (resampled to 16 kHz), recording too.
* ``caller_model``: the caller's audio as the model gets it, 80 ms frames of PCM16 at
  24 kHz (``service.wire.FRAME_BYTES``), in order, one per 80 ms.
* ``agent``: the voice the caller hears, 80 ms frames at 24 kHz as they go to the edge to
  be resampled, paced and sent to the caller (a frame the pacer finds too late is still
  dropped there, and counted): the model's, as the worker sent them, or, after a bridged
  transfer, the human's (see below). Recording attaches here and to ``caller``.
* ``dtmf``: each digit the caller pressed (:data:`Digit`: RFC 4733 or SIP INFO).

A bridged transfer (``calls/transfer.py``) joins a second leg to the pipeline with
``bridge(peer)``: from then on the caller's frames go to ``peer.send_frame`` instead of
the model (the ``caller`` and ``caller_model`` taps go on as before), the peer's decoded
audio comes back through ``from_model`` (so the ``agent`` tap carries the human's voice),
and with its first frame the edge's pacer starts over on the new stream's timing
(``MediaEdge.new_source``): until then the model's last queued words play out, so the
caller hears no more silence than the new stream takes to come.

The gateway's own prompts (a queue announcement, a ringback tone, a message: see
``media/prompts.py``) go to the caller through :meth:`MediaPipeline.play`, the same way as
the model's voice but not on the ``agent`` tap. The first frame from the model ends a
prompt: the edge drops what is left of it and starts the model's audio on a fresh timeline
(``MediaEdge.new_source``), on the same RTP stream.

A tap with no subscriber costs one truth test of a list per emission. Subscribers are
called synchronously on the event loop, in the media path: they must return at once
(queue the work, never block). ``attach`` returns the function that detaches.

``announce(frames)`` plays an announcement (the recording consent) before the model is
heard: each frame from the worker is replaced by the announcement's next frame until it
is over, so the announcement goes out on the worker's own cadence (the pacer sees one
continuous stream) and the model's first words come right after it. The replaced frames
of the model are counted in ``held_back_frames``; the ``agent`` tap carries the
announcement (it is what the caller heard).
"""

from __future__ import annotations

import typing as tp

import numpy as np

from service.call_record import CallQuality
from sip.dtmf import DtmfDigit, InfoDigit

T = tp.TypeVar("T")
Digit = DtmfDigit | InfoDigit  # RFC 4733 telephone-event, or SIP INFO: ``digit`` and ``duration_ms``
TAP_NAMES = ("caller", "caller_model", "agent", "dtmf")


class CallerAudio(tp.NamedTuple):
    """Caller audio on the ``caller`` tap: int16 samples at ``rate`` Hz."""

    pcm: np.ndarray
    rate: int


class Tap(tp.Generic[T]):
    """One named point of the pipeline that subscribers listen to."""

    __slots__ = ("name", "subscribers")

    def __init__(self, name: str) -> None:
        self.name = name
        self.subscribers: list[tp.Callable[[T], None]] = []

    def attach(self, subscriber: tp.Callable[[T], None]) -> tp.Callable[[], None]:
        """Start calling ``subscriber`` with each item; returns the detach function."""
        self.subscribers = [*self.subscribers, subscriber]  # copy on write: emit never sees a change mid-loop

        def detach() -> None:
            self.subscribers = [s for s in self.subscribers if s is not subscriber]

        return detach

    def emit(self, item: T) -> None:
        for subscriber in self.subscribers:
            subscriber(item)


class MediaTaps:
    """The four taps of one call (see the module docstring)."""

    __slots__ = ("caller", "caller_model", "agent", "dtmf")

    def __init__(self) -> None:
        self.caller: Tap[CallerAudio] = Tap("caller")
        self.caller_model: Tap[bytes] = Tap("caller_model")
        self.agent: Tap[bytes] = Tap("agent")
        self.dtmf: Tap[Digit] = Tap("dtmf")

    def __getitem__(self, name: str) -> Tap[tp.Any]:
        if name not in TAP_NAMES:
            raise KeyError(f"no tap {name!r} (taps: {', '.join(TAP_NAMES)})")
        return tp.cast(Tap[tp.Any], getattr(self, name))


class MediaEdge(tp.Protocol):
    """An ingress's media: what the pipeline needs of RTP or WebRTC media."""

    def from_model(self, frame: bytes) -> None: ...
    def play_prompt(self, frame: bytes) -> None:
        """A frame of the gateway's own audio (a prompt), paced like the model's."""

    def quality(self) -> CallQuality: ...
    def counters(self) -> dict[str, int]: ...
    @property
    def queued_packets(self) -> int: ...
    def silent_seconds(self) -> float | None: ...
    def new_source(self) -> None: ...


class BridgePeer(tp.Protocol):
    """The far side of a bridged transfer: takes the caller's 80 ms frames at 24 kHz."""

    def send_frame(self, frame: bytes) -> None: ...


class MediaPipeline:
    """One call's pipeline: frames between its media edge and its model, and the taps."""

    def __init__(self, to_model: tp.Callable[[bytes], None]) -> None:
        self.taps = MediaTaps()
        self.edge: MediaEdge | None = None
        self.peer: BridgePeer | None = None  # a bridged human leg (see the module docstring)
        self._source_changed = False  # the next frame out starts a new stream at the edge
        self._model_sink = to_model
        self._to_model = to_model
        self.prompting = False  # a prompt is playing (until stop_prompt or the model's first frame)
        self.model_frames = 0  # frames from the model so far (the first one ends a prompt)
        self._announcement: list[bytes] = []
        self._announced = 0
        self.held_back_frames = 0
        self.on_announced: tp.Callable[[], None] | None = None

    def attach_edge(self, edge: MediaEdge) -> None:
        """The ingress's media, once it exists (SIP: with the answer; WebRTC: with the offer)."""
        self.edge = edge

    def bridge(self, peer: BridgePeer) -> None:
        """The caller talks to ``peer`` from now on: their frames go to it, not to the model,
        and the edge follows the timing of what ``peer`` sends back (via ``from_model``)."""
        self.peer = peer
        self._to_model = peer.send_frame
        self._source_changed = True

    def unbridge(self) -> None:
        """Back to the model (a fresh session's frames come through ``from_model``)."""
        if self.peer is None:
            return
        self.peer = None
        self._to_model = self._model_sink
        self._source_changed = True

    def to_model(self, frame: bytes) -> None:
        """An 80 ms frame of the caller from the edge, on its way to the worker."""
        tap = self.taps.caller_model
        if tap.subscribers:
            tap.emit(frame)
        self._to_model(frame)

    def play(self, frame: bytes) -> None:
        """An 80 ms frame of a prompt (24 kHz PCM16, ``FRAME_BYTES``) to the caller."""
        if self.edge is None:
            return
        if not self.prompting:
            self.prompting = True
            self.edge.new_source()
        self.edge.play_prompt(frame)

    def stop_prompt(self) -> None:
        """End a prompt now: what is queued of it is dropped (the caller hears it stop)."""
        if self.prompting:
            self.prompting = False
            if self.edge is not None:
                self.edge.new_source()

    def announce(self, frames: list[bytes]) -> None:
        """Play these 80 ms frames (24 kHz PCM16) in place of the model's next frames."""
        self._announcement = list(frames)
        self._announced = 0

    @property
    def announcing(self) -> bool:
        return self._announced < len(self._announcement)

    def from_model(self, frame: bytes) -> None:
        """An 80 ms frame for the caller (the model's, or a bridged human's), on its way out;
        the first one ends a prompt, and the consent announcement's frames take the model's
        place until it is over."""
        self.model_frames += 1
        if self.prompting:
            self.stop_prompt()
        if self._announcement:
            frame = self._announce_instead(frame)
        tap = self.taps.agent
        if tap.subscribers:
            tap.emit(frame)
        if self.edge is not None:
            if self._source_changed:
                self._source_changed = False
                self.edge.new_source()
            self.edge.from_model(frame)

    def _announce_instead(self, frame: bytes) -> bytes:
        if self.edge is None:  # not answered yet: nothing reaches the caller
            return frame
        if self._announced >= len(self._announcement):
            return frame
        self.held_back_frames += 1
        frame = self._announcement[self._announced]
        self._announced += 1
        if self._announced == len(self._announcement):
            self._announcement = []
            if self.on_announced is not None:
                self.on_announced()
        return frame

    def quality(self) -> CallQuality | None:
        return self.edge.quality() if self.edge is not None else None

    def counters(self) -> dict[str, int] | None:
        return self.edge.counters() if self.edge is not None else None

    @property
    def queued_packets(self) -> int:
        """Model audio waiting in the edge's pacer (what a hang-up lets play out first)."""
        return self.edge.queued_packets if self.edge is not None else 0

    def silent_seconds(self) -> float | None:
        """Seconds since the caller's last packet; None without media, or none expected."""
        return self.edge.silent_seconds() if self.edge is not None else None
