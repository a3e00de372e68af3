"""Finding and loading a Moshi checkpoint: a Hugging Face repo id or a local directory.

Both go through ONE code path: each file of the layout is fetched (from the directory, or
from the Hub through its cache), checked, and handed to moshi's own
``loaders.CheckpointInfo.from_hf_repo`` as local overrides, so that every checkpoint is
built exactly the way Kyutai's ``moshi.server`` builds it. A missing file or a broken one
is a :class:`CheckpointError` that names the checkpoint and the file.

The architecture comes from the repo's ``config.json``; a repo without one (LLM-jp-Moshi-v1,
J-Moshi: saved by moshi 0.2.2) gets its ``moshi_lm_kwargs.json`` when it has one, else the
Moshi 7B defaults, applied here and said in the log and :class:`ModelInfo`
(:mod:`service.worker.architecture`). Before any weight is read, each file is checked:
a known repo's files against their documented sizes (:mod:`service.worker.known_repos`),
every safetensors file against its own header (a partial download), and its tensors
against the model built on the meta device (:mod:`service.worker.weights_check`).

This module imports torch and moshi lazily: importing it costs nothing, so the licence
table and :func:`check_moshi_version` are usable from the CLI and the echo worker.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import tempfile
import typing as tp
from pathlib import Path

from service.worker import architecture as arch
from service.worker.architecture import CONFIG_NAME, LEGACY_KWARGS_NAME, Architecture, ArchitectureError
from service.worker.known_repos import (
    APACHE,
    CC_BY_NC,
    KNOWN_REPOS,
    MIMI_NAME,
    MOSHI_NAME,
    TOKENIZER_NAME,
    check_download,
)
from service.worker.weights_check import WeightsError, match_tensors, read_header

log = logging.getLogger(__name__)

MIN_MOSHI_VERSION = (0, 2, 5)  # first release with per-slot reset_streaming(reset_mask)

UNKNOWN_LICENSE = "unknown (see the checkpoint's own licence)"

# Hugging Face repo id -> licence of its weights.
KNOWN_LICENSES: dict[str, str] = {repo_id: repo.license for repo_id, repo in KNOWN_REPOS.items()}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or malformed; the message names the file."""


class MoshiVersionError(RuntimeError):
    """The installed moshi package is too old for per-slot batching."""


def license_for(model_id: str) -> str:
    """The licence of a checkpoint's weights, as far as this table knows."""
    if model_id in KNOWN_LICENSES:
        return KNOWN_LICENSES[model_id]
    lowered = model_id.lower()
    if lowered.startswith("nu-dialogue/j-moshi"):
        return CC_BY_NC
    if lowered.startswith("llm-jp/llm-jp-moshi"):
        return APACHE
    return UNKNOWN_LICENSE


def is_research_only(license_text: str) -> bool:
    """Non-commercial licences (CC BY-NC and the like)."""
    return re.search(r"(^|[\s-])NC([\s-]|$)", license_text) is not None


def _parse_version(text: str) -> tuple[int, ...]:
    """Leading numeric release of a version string: "0.2.4rc1" -> (0, 2, 4)."""
    match = re.match(r"\d+(\.\d+)*", text.strip())
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def check_moshi_version() -> str:
    """Return the installed moshi's version; raise :class:`MoshiVersionError` below 0.2.5."""
    from importlib import metadata

    try:
        version = metadata.version("moshi")
    except metadata.PackageNotFoundError:
        raise MoshiVersionError(
            "the moshi package is not installed: the worker needs moshi >= 0.2.5 "
            "(install the [worker] extra and moshi, see the Makefile)"
        ) from None
    return require_moshi_version(version)


def require_moshi_version(version: str) -> str:
    """Return ``version`` if it supports per-slot batching, else raise MoshiVersionError."""
    if _parse_version(version) < MIN_MOSHI_VERSION:
        raise MoshiVersionError(
            f"moshi {version} is installed but the worker needs moshi >= 0.2.5: older releases "
            "cannot reset one slot of a batch (reset_streaming(reset_mask)), so a new call "
            "would disturb every other call. Upgrade moshi."
        )
    return version


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a worker serves: shown by /v1/info, the session ``started`` message and logs."""

    model: str
    license: str
    source: str  # "huggingface", "local", "demo" or "echo"
    path: str | None = None
    revision: str | None = None
    context_steps: int | None = None
    frame_rate: float = 12.5
    architecture: str | None = None  # where the LM's architecture came from (architecture.FROM_*)
    sampling: dict[str, tp.Any] | None = None  # what the engine samples with (set by the engine)

    @property
    def research_only(self) -> bool:
        return is_research_only(self.license)

    @property
    def context_seconds(self) -> float | None:
        return None if self.context_steps is None else self.context_steps / self.frame_rate

    def to_dict(self) -> dict[str, tp.Any]:
        out = dataclasses.asdict(self)
        out["research_only"] = self.research_only
        out["context_seconds"] = self.context_seconds
        return out

    def banner(self) -> str:
        text = f"model {self.model} ({self.source}), licence: {self.license}"
        if self.research_only:
            text += (
                " -- RESEARCH USE ONLY: this checkpoint's licence forbids commercial use; "
                "do not put it on a production line"
            )
        return text


class _FileSource(tp.Protocol):
    label: str

    def get(self, name: str, required: bool) -> Path | None: ...


class _LocalSource:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.label = str(directory)

    def get(self, name: str, required: bool) -> Path | None:
        path = self.directory / name
        if path.is_file():
            return path
        if required:
            raise CheckpointError(f"checkpoint {self.label}: missing {name}")
        return None


HUB_PROBE_SECONDS = 5.0  # one look at the Hub before any download; its client retries for ~30 s


def hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be reached (None when it answers), asked once.

    huggingface_hub retries a refused or unresolvable host five times with backoff (~26 s)
    for each file; one quick look first lets an offline machine use its cache at once, and
    fail at once, in one line, when the cache lacks a file.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = constants.ENDPOINT
    if endpoint not in _hub_probes:
        import requests

        try:
            requests.head(endpoint, timeout=HUB_PROBE_SECONDS, allow_redirects=False)
            _hub_probes[endpoint] = None
        except requests.RequestException as exc:
            reason = type(exc).__name__
            if isinstance(exc, requests.ConnectionError) and "resolve" in str(exc).lower():
                reason = "its name does not resolve"
            _hub_probes[endpoint] = f"{endpoint}: {reason}"
    return _hub_probes[endpoint]


_hub_probes: dict[str, str | None] = {}


class _HubSource:
    def __init__(self, repo_id: str, revision: str | None) -> None:
        self.repo_id = repo_id
        self.revision = revision
        self.label = repo_id + (f"@{revision}" if revision else "")

    def get(self, name: str, required: bool) -> Path | None:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            HFValidationError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        unreachable = hub_unreachable()
        try:
            return Path(
                hf_hub_download(self.repo_id, name, revision=self.revision, local_files_only=unreachable is not None)
            )
        except LocalEntryNotFoundError:
            # Offline and not cached. (A subclass of EntryNotFoundError: test it first, or an
            # unreachable Hub would read as "this repo has no such file".)
            if not required and self._cached_without(name):
                return None
            raise CheckpointError(
                f"checkpoint {self.label}: cannot fetch {name}: Hugging Face is unreachable "
                f"({unreachable or 'offline'}) and the file is not in the local cache (download it "
                "once, or set HF_HOME to a cache that has it)"
            ) from None
        except EntryNotFoundError:
            if required:
                raise CheckpointError(f"checkpoint {self.label}: missing {name}") from None
            return None
        except (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError) as exc:
            raise CheckpointError(f"checkpoint {self.label}: {exc}") from None

    def _cached_without(self, name: str) -> bool:
        """Offline: does the cache know that this revision has no ``name``?

        Either the Hub said so once (a ``.no_exist`` marker), or the revision's snapshot is
        cached (``huggingface-cli download`` fetches whole repos) and lacks the file.
        """
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.file_download import _CACHED_NO_EXIST

        if try_to_load_from_cache(self.repo_id, name, revision=self.revision) is _CACHED_NO_EXIST:
            return True
        weights = try_to_load_from_cache(self.repo_id, MOSHI_NAME, revision=self.revision)
        return isinstance(weights, str)


def _is_repo_id(text: str) -> bool:
    parts = text.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not text.startswith((".", "/", "~"))
        and all(ch.isalnum() or ch in "-_." for ch in text.replace("/", ""))
    )


def _read_json(source: _FileSource, path: Path, name: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {source.label}: {name} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {source.label}: {name} must hold a JSON object, found {type(data).__name__}")
    return data


def _name_in_config(source: _FileSource, config: dict, key: str, default: str | None) -> str | None:
    value = config.get(key, default)
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise CheckpointError(f"checkpoint {source.label}: config.json: {key} must be a file name, got {value!r}")
    return value


def _source_for(model: str, revision: str | None) -> _LocalSource | _HubSource:
    local = Path(model).expanduser()
    if local.is_dir():
        return _LocalSource(local.resolve())
    if _is_repo_id(model) and not local.exists():
        return _HubSource(model, revision)
    raise CheckpointError(f"checkpoint {model}: not a directory and not a Hugging Face repo id (owner/name)")


@dataclasses.dataclass
class _Resolved:
    info: tp.Any  # moshi.models.loaders.CheckpointInfo
    architecture: Architecture


def _architecture(source: _LocalSource | _HubSource, config_path: Path | None) -> Architecture:
    """Where the LM's kwargs come from when the repo has no config.json (see architecture)."""
    if config_path is not None:
        return Architecture(arch.FROM_CONFIG, None)
    kwargs_path = source.get(LEGACY_KWARGS_NAME, required=False)
    if kwargs_path is None:
        log.info(
            "checkpoint %s has no %s and no %s: applying the Moshi 7B defaults (the "
            "architecture moshi 0.2.2 assumed for such repos)",
            source.label,
            CONFIG_NAME,
            LEGACY_KWARGS_NAME,
        )
        return arch.moshi_7b()
    raw = _read_json(source, kwargs_path, LEGACY_KWARGS_NAME)
    try:
        kwargs, notes = arch.lm_kwargs_from_legacy(raw)
    except ArchitectureError as exc:
        raise CheckpointError(f"checkpoint {source.label}: {LEGACY_KWARGS_NAME}: {exc}") from None
    changed = arch.differences(kwargs, arch.MOSHI_7B_LM_KWARGS)
    log.info(
        "checkpoint %s has no %s: LM architecture from its %s (%s)%s",
        source.label,
        CONFIG_NAME,
        LEGACY_KWARGS_NAME,
        "the Moshi 7B's" if not changed else "differs from the Moshi 7B in " + "; ".join(changed),
        "".join(f"; {note}" for note in notes),
    )
    return Architecture(arch.FROM_LEGACY_KWARGS, kwargs)


def _resolve(source: _LocalSource | _HubSource, revision: str | None) -> _Resolved:
    from moshi.models import loaders

    hf_repo = str(source.directory) if isinstance(source, _LocalSource) else source.repo_id
    config_path = source.get(CONFIG_NAME, required=False)
    config: dict = {}
    if config_path is not None:
        config = _read_json(source, config_path, CONFIG_NAME)
    moshi_name = _name_in_config(source, config, "moshi_name", MOSHI_NAME)
    mimi_name = _name_in_config(source, config, "mimi_name", MIMI_NAME)
    tokenizer_name = _name_in_config(source, config, "tokenizer_name", TOKENIZER_NAME)
    mimi_config_name = _name_in_config(source, config, "mimi_config_name", None)
    lora_name = _name_in_config(source, config, "lora_name", None)
    assert moshi_name and mimi_name and tokenizer_name

    moshi_weights = source.get(moshi_name, required=True)
    mimi_weights = source.get(mimi_name, required=True)
    tokenizer = source.get(tokenizer_name, required=True)
    mimi_config_path = source.get(mimi_config_name, required=True) if mimi_config_name else None
    if mimi_config_path is not None:
        _read_json(source, mimi_config_path, mimi_config_name or "")
    lora_weights = source.get(lora_name, required=True) if lora_name else None
    assert moshi_weights and mimi_weights and tokenizer
    if isinstance(source, _HubSource):
        problem = check_download(
            source.repo_id, {moshi_name: moshi_weights, mimi_name: mimi_weights, tokenizer_name: tokenizer}
        )
        if problem:
            raise CheckpointError(f"checkpoint {source.label}: {problem}")
    architecture = _architecture(source, config_path)

    with tempfile.TemporaryDirectory(prefix="moshimoshi-ckpt-") as tmp:
        if architecture.lm_kwargs is not None:
            # Given explicitly, else from_hf_repo would ask the Hub for config.json again and
            # fall back on moshi's own (deprecated) 7B defaults.
            config_path = Path(tmp) / CONFIG_NAME
            config_path.write_text(json.dumps(architecture.lm_kwargs))
        info = loaders.CheckpointInfo.from_hf_repo(
            hf_repo,
            moshi_weights=moshi_weights,
            mimi_weights=mimi_weights,
            tokenizer=tokenizer,
            config_path=config_path,
            mimi_config_path=mimi_config_path,
            lora_weights=lora_weights,
            revision=revision,
        )
    return _Resolved(info, architecture)


def _check_weights(label: str, info: tp.Any, architecture: Architecture, torch_dtype: tp.Any) -> None:
    """Both weight files complete on disk and holding the tensors their models expect."""
    import torch
    from moshi.models import loaders

    try:
        mimi_header = read_header(info.mimi_weights)
        lm_header = read_header(info.moshi_weights)
    except WeightsError as exc:
        raise CheckpointError(f"checkpoint {label}: {exc}") from None
    except OSError as exc:
        raise CheckpointError(f"checkpoint {label}: cannot read the weights ({exc})") from None
    try:
        with torch.device("meta"):
            mimi = loaders.get_mimi(None, info.mimi_config, device="meta")
            lm = None if info.lora_weights else info.get_moshi(device="meta", dtype=torch_dtype, load_weight=False)
    except Exception as exc:  # moshi raises TypeError, AssertionError... for kwargs it cannot build
        raise CheckpointError(
            f"checkpoint {label}: moshi cannot build the LM that "
            f"{architecture.describe()} describes: {_first_line(exc)}"
        ) from None
    mimi_layout = "its mimi config's" if info.mimi_config else "the stock"
    try:
        match_tensors(mimi, mimi_header)
    except WeightsError as exc:
        raise CheckpointError(
            f"checkpoint {label}: {info.mimi_weights.name} does not fit {mimi_layout} Mimi: {exc}"
        ) from None
    if lm is not None:  # (a LoRA checkpoint's adapters are in another file: loaded as moshi does)
        try:
            match_tensors(lm, lm_header)
        except WeightsError as exc:
            raise CheckpointError(
                f"checkpoint {label}: {info.moshi_weights.name} does not fit the LM of {architecture.describe()}: {exc}"
            ) from None


@dataclasses.dataclass
class LoadedModel:
    """Mimi, the LM and the text tokenizer of one checkpoint, ready for an engine."""

    checkpoint: tp.Any  # moshi.models.loaders.CheckpointInfo
    mimi: tp.Any  # moshi.models.compression.MimiModel
    lm: tp.Any  # moshi.models.lm.LMModel
    tokenizer: tp.Any  # sentencepiece.SentencePieceProcessor
    info: ModelInfo

    @property
    def text_padding_ids(self) -> frozenset[int]:
        return frozenset({self.lm.text_padding_token_id, self.lm.end_of_text_padding_id})


def load_checkpoint(
    model: str,
    *,
    revision: str | None = None,
    device: str = "cpu",
    dtype: str = "bfloat16",
    model_id: str | None = None,
    source_kind: str | None = None,
    license: str | None = None,
) -> LoadedModel:
    """Resolve ``model`` and build Mimi, the LM and the tokenizer on ``device``.

    On CPU the weights are always float32. ``model_id``/``source_kind`` override the name and
    source shown in :class:`ModelInfo` (the demo checkpoint lives in a cache directory).
    """
    import torch

    check_moshi_version()
    source = _source_for(model, revision)
    resolved = _resolve(source, revision)
    info = resolved.info
    label = source.label
    local = isinstance(source, _LocalSource)
    torch_dtype = torch.float32 if device == "cpu" else getattr(torch, dtype)
    _check_weights(label, info, resolved.architecture, torch_dtype)

    try:
        tokenizer = info.get_text_tokenizer()
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(
            f"checkpoint {label}: {info.tokenizer.name} is not a SentencePiece model ({exc})"
        ) from None
    try:
        mimi = info.get_mimi(device=device)
    except Exception as exc:  # safetensors, torch and moshi all raise their own kinds
        raise CheckpointError(
            f"checkpoint {label}: cannot load Mimi from {info.mimi_weights.name}: {_first_line(exc)}"
        ) from None
    try:
        lm = info.get_moshi(device=device, dtype=torch_dtype)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {label}: cannot load the LM from {info.moshi_weights.name} "
            f"with {resolved.architecture.describe()}: {_first_line(exc)}"
        ) from None

    if info.model_type != "moshi":
        raise CheckpointError(
            f"checkpoint {label}: model_type {info.model_type!r} is not a "
            "full-duplex dialogue model (only 'moshi' is served)"
        )
    if lm.dep_q <= 0:
        raise CheckpointError(f"checkpoint {label}: the LM has no depformer (dep_q=0), it cannot speak")
    if tokenizer.vocab_size() < lm.text_card:
        raise CheckpointError(
            f"checkpoint {label}: {info.tokenizer.name} has {tokenizer.vocab_size()} pieces but the "
            f"LM emits {lm.text_card} text tokens"
        )
    if mimi.sample_rate != 24000 or mimi.frame_size != 1920:
        raise CheckpointError(
            f"checkpoint {label}: Mimi runs at {mimi.sample_rate} Hz with "
            f"{mimi.frame_size}-sample frames; the worker needs 24000 Hz, 1920"
        )

    name = model_id or (str(Path(model).expanduser().resolve()) if local else model)
    model_info = ModelInfo(
        model=name,
        license=license or (UNKNOWN_LICENSE if local and not model_id else license_for(name)),
        source=source_kind or ("local" if local else "huggingface"),
        path=str(Path(model).expanduser().resolve()) if local else None,
        revision=revision,
        context_steps=lm.context,
        frame_rate=float(mimi.frame_rate),
        architecture=resolved.architecture.source,
    )
    return LoadedModel(checkpoint=info, mimi=mimi, lm=lm, tokenizer=tokenizer, info=model_info)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    head = lines[0] if lines else text
    if len(lines) > 1:
        head += " " + " ".join(lines[1:3])
    return head[:400]
