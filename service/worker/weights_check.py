"""Checks a weights file before it is loaded: complete on disk, and holding the tensors the
model expects.

A safetensors file states its own size: an 8-byte header length, a JSON header naming every
tensor with its dtype, shape and byte range, then the data. A file shorter than its header
says is a partial download, and that is known before any byte of data is read. The tensors
are then matched against the model built on the ``meta`` device (no memory, even for the
7B) with the installed moshi's own load hooks, so that 0.2.2's fused attention weights are
read as moshi reads them. The results are one-line messages naming the tensors.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
import typing as tp
from pathlib import Path

MAX_HEADER_BYTES = 100 * 2**20  # the safetensors format's own limit
NAMES_SHOWN = 3


class WeightsError(ValueError):
    """A weights file that is incomplete, malformed or not the model's; one line, names tensors."""


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorEntry]
    header_bytes: int  # 8 + the JSON header
    data_bytes: int

    @property
    def file_bytes(self) -> int:
        return self.header_bytes + self.data_bytes


def human_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def read_header(path: Path) -> SafetensorsHeader:
    """Parse ``path``'s safetensors header and check the file holds all the data it names.

    Raises :class:`WeightsError` for a truncated file ("a partial download") or one that is
    not safetensors at all.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise WeightsError(
                f"{path.name} is truncated: {size} bytes, not even a safetensors "
                "header (a partial download: download it again)"
            )
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES:
            raise WeightsError(f"{path.name} is not a safetensors file (a {length}-byte header)")
        if 8 + length > size:
            raise WeightsError(
                f"{path.name} is truncated: {size:,} bytes, shorter than its own "
                f"{length:,}-byte header (a partial download: download it again)"
            )
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path.name} is not a safetensors file (its header is not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path.name} is not a safetensors file (its header is not an object)")
    tensors: dict[str, TensorEntry] = {}
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = entry["dtype"]
            shape = tuple(entry["shape"])
            begin, stop = entry["data_offsets"]
            if not (
                isinstance(dtype, str)
                and all(isinstance(d, int) and d >= 0 for d in shape)
                and isinstance(begin, int)
                and isinstance(stop, int)
                and 0 <= begin <= stop
            ):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{path.name} is not a safetensors file (bad entry for {name[:80]!r})") from None
        tensors[name] = TensorEntry(dtype, shape)
        end = max(end, stop)
    if 8 + length + end > size:
        raise WeightsError(
            f"{path.name} is truncated: {size:,} bytes on disk, its header describes "
            f"{8 + length + end:,} ({human_bytes(size)} of {human_bytes(8 + length + end)}): "
            "a partial download, download it again"
        )
    return SafetensorsHeader(tensors=tensors, header_bytes=8 + length, data_bytes=end)


def _names(names: tp.Sequence[str]) -> str:
    shown = ", ".join(names[:NAMES_SHOWN])
    if len(names) > NAMES_SHOWN:
        shown += f", … {len(names) - NAMES_SHOWN} more"
    return shown


_SIZE_MISMATCH = re.compile(
    r"size mismatch for ([^:\s]+): copying a param with shape "
    r"torch\.Size\(\[([^\]]*)\]\) from checkpoint, the shape in current "
    r"model is torch\.Size\(\[([^\]]*)\]\)"
)


def match_tensors(module: tp.Any, header: SafetensorsHeader) -> None:
    """Raise :class:`WeightsError` unless ``header``'s tensors fit ``module`` (built on meta).

    Loads meta tensors of the header's shapes into the meta module with ``strict=False``:
    the module's load hooks (moshi's remapping of fused attention weights) run as in a real
    load, and what does not fit is named: missing, unexpected, of another shape.
    """
    import torch

    state = {name: torch.empty(entry.shape, device="meta") for name, entry in header.tensors.items()}
    seen: dict[str, list[str]] = {}

    def capture(_module: tp.Any, incompatible: tp.Any) -> None:
        seen["missing"] = list(incompatible.missing_keys)
        seen["unexpected"] = list(incompatible.unexpected_keys)

    handle = module.register_load_state_dict_post_hook(capture)
    wrong_shape: list[str] = []
    try:
        module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # strict=False: raised for shapes only
        found = _SIZE_MISMATCH.findall(str(exc))
        if not found:
            text = str(exc).strip()
            first = text.splitlines()[0] if text else type(exc).__name__
            raise WeightsError(f"its tensors cannot be mapped onto the model ({first[:200]})") from None
        wrong_shape = [f"{name} [{have}] in the file, [{want}] in the model" for name, have, want in found]
    finally:
        handle.remove()
    missing = sorted(seen.get("missing", []))
    unexpected = sorted(seen.get("unexpected", []))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({_names(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_names(unexpected)})")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} of another shape ({_names(wrong_shape)})")
    if problems:
        raise WeightsError("tensors " + "; ".join(problems))
