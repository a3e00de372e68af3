"""The gateway↔worker session contract (service/worker/PROTOCOL.md): one module both sides import.

One WebSocket per call session. The gateway opens it with a ``start`` message, the worker
answers ``started``; then both directions carry binary frames of ``FRAME_BYTES`` (80 ms of
PCM16 LE mono at 24 kHz) and JSON events. A refused or ended session closes with one of
:class:`CloseCode`.
"""

from __future__ import annotations

import enum
import typing as tp
from dataclasses import dataclass, field

PROTOCOL_VERSION = 1
SESSION_PATH = "/v1/session"
AUTH_PREFIX = "/v1/"  # every request under it carries the deployment's worker secret

SAMPLE_RATE = 24000  # the model's audio rate, both ways
FRAME_MS = 80  # one Mimi frame, one model step
FRAME_SAMPLES = SAMPLE_RATE * FRAME_MS // 1000  # 1920
FRAME_BYTES = FRAME_SAMPLES * 2  # 3840: PCM16 on the wire
FRAME_SECONDS = FRAME_MS / 1000


class CloseCode(enum.IntEnum):
    """Why a session closed (PROTOCOL.md, "Close codes")."""

    NORMAL = 1000  # stop, max duration, drain
    INTERNAL = 1011  # worker internal error
    VIOLATION = 4000  # the gateway broke the protocol
    VERSION = 4001  # unsupported protocol version
    FENCED = 4003  # lease refused (missing, unknown or stale token), or fenced out by a newer lease
    MODEL = 4004  # the worker serves another model
    SLOT_BUSY = 4009  # slot busy or out of range
    NO_SLOT = 4029  # no free slot, or loading, draining, overloaded: try another worker or later


class StartMessage(tp.TypedDict):
    """The gateway's first message."""

    type: tp.Literal["start"]
    version: int
    call_id: str
    slot: int | None  # the slot the gateway holds a lease on; None lets the worker pick
    token: int | None  # the lease's fencing token
    model: str | None  # the model the gateway expects (4004 otherwise)
    sampling: tp.NotRequired[dict[str, float | int | bool]]  # overrides for this session (its route's)


SAMPLING_KEYS = ("temp", "temp_text", "top_k", "top_k_text", "greedy")


def start_message(
    call_id: str,
    *,
    slot: int | None,
    token: int | None,
    model: str | None,
    sampling: tp.Mapping[str, float | int | bool] | None = None,
) -> StartMessage:
    message: StartMessage = {
        "type": "start",
        "version": PROTOCOL_VERSION,
        "call_id": call_id,
        "slot": slot,
        "token": token,
        "model": model,
    }
    if sampling:
        message["sampling"] = {k: v for k, v in sampling.items() if k in SAMPLING_KEYS}
    return message


@dataclass
class Started:
    """The worker's ``started`` answer, as the gateway keeps it."""

    slot: int
    model: str
    license: str
    max_call_seconds: float
    sampling: dict[str, float | int | bool] | None = None  # temperatures, top-k, greedy: this session's
    raw: dict[str, tp.Any] = field(default_factory=dict)

    @classmethod
    def from_message(cls, message: dict[str, tp.Any]) -> Started:
        """Raises KeyError, TypeError or ValueError for a malformed message."""
        return cls(
            slot=int(message["slot"]),
            model=str(message.get("model", "")),
            license=str(message.get("license", "")),
            max_call_seconds=float(message.get("max_call_seconds", 0) or 0),
            sampling=_sampling(message.get("sampling")),
            raw=message,
        )


def _sampling(value: tp.Any) -> dict[str, float | int | bool] | None:
    """The ``sampling`` object of a ``started`` message: numbers and booleans only, kept small
    (it goes into call records and webhooks)."""
    if not isinstance(value, dict):
        return None
    return {str(k)[:32]: v for k, v in list(value.items())[:16] if isinstance(v, (bool, int, float))}


def authorization(secret: str | None) -> dict[str, str]:
    """The header every gateway request to a worker's /v1 carries (PROTOCOL.md,
    "Authentication"): the deployment's shared worker secret as a bearer token; none without one."""
    return {"Authorization": f"Bearer {secret}"} if secret else {}
