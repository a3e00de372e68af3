"""Settings for every role, read from ``MOSHIMOSHI_*`` environment variables and CLI flags.

Each settings class is a dataclass whose fields carry their own help, bounds and choices.
``load`` validates everything at start-up and raises ``ConfigError`` naming the bad setting
(``MOSHIMOSHI_SIP_PORT='abc': not an integer``), so a misconfigured pod fails at once with a
message instead of misbehaving later. CLI flags override the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing as tp
from collections.abc import Mapping

if tp.TYPE_CHECKING:
    from _typeshed import DataclassInstance

ENV_PREFIX = "MOSHIMOSHI_"

# The sections of ``--help``, in the order shown; every setting names one (``group=``).
GROUPS: dict[str, str] = {
    "sip": "SIP",
    "sip-security": "who may call: allowed addresses, digest, rate and TCP limits",
    "encryption": "encryption: SIP over TLS, SRTP",
    "media": "media: RTP, codecs, jitter buffer, resampling",
    "pool": "calls and the pool: Redis, workers, queue, retention",
    "routes": "routes (which model and policy each number gets) and outbound calls",
    "api": "HTTP: API, dashboard, softphone",
    "webrtc": "WebRTC (browser calls)",
    "webhook": "webhook (a POST for each ended call)",
    "record": "the call's record: callers' transcript, recordings, DTMF, consent",
    "model": "model and sampling",
    "inference": "inference and capacity",
    "worker": "worker server and pool membership",
    "asr": "ASR worker (the callers' transcript)",
    "asr-openai": "ASR through an OpenAI-compatible endpoint",
    "secrets": "secrets between gateways and workers",
    "call": "the call",
    "call-media": "media",
    "call-tls": "encryption",
    "call-api": "transcript from the gateway's API",
    "logging": "logging",
}


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names it."""


def setting(
    default: tp.Any,
    help: str,
    *,
    min: float | None = None,
    max: float | None = None,
    choices: tp.Sequence[str] | None = None,
    env: str | None = None,
    secret: bool = False,
    group: str = "",
    positional: bool = False,
) -> tp.Any:
    """Declare a settings field: its default, help text and validation; ``group`` is its
    section of ``--help`` (a key of :data:`GROUPS`); a ``positional`` one is a command's
    argument, not a flag."""
    meta = {
        "help": help,
        "min": min,
        "max": max,
        "choices": choices,
        "env": env,
        "secret": secret,
        "group": group,
        "positional": positional,
    }
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def env_name(field: dataclasses.Field) -> str:
    return field.metadata.get("env") or ENV_PREFIX + field.name.upper()


def flag_name(field: dataclasses.Field) -> str:
    return "--" + field.name.replace("_", "-")


def _field_type(cls: type, field: dataclasses.Field) -> tp.Any:
    hints = tp.get_type_hints(cls)
    return hints[field.name]


def _base_type(annotation: tp.Any) -> tuple[type, bool]:
    """(scalar type, optional) for ``int``, ``str | None``, ``list[str]``..."""
    args = tp.get_args(annotation)
    optional = type(None) in args
    if args and tp.get_origin(annotation) is not list:
        non_none = [a for a in args if a is not type(None)]
        annotation = non_none[0]
    return annotation, optional


def _parse(value: str, annotation: tp.Any, label: str) -> tp.Any:
    base, optional = _base_type(annotation)
    text = value.strip()
    if optional and text == "":
        return None
    if tp.get_origin(base) is list:
        return [item.strip() for item in text.split(",") if item.strip()]
    if base is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{label}={value!r}: not a boolean (use true or false)")
    if base is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{label}={value!r}: not an integer") from None
    if base is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{label}={value!r}: not a number") from None
    return text


def _check(value: tp.Any, field: dataclasses.Field, label: str) -> None:
    meta = field.metadata
    if value is None:
        return
    shown = "***" if meta.get("secret") else repr(value)
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ConfigError(f"{label}={shown}: must be one of {', '.join(meta['choices'])}")
    if meta.get("min") is not None and value < meta["min"]:
        raise ConfigError(f"{label}={shown}: must be at least {meta['min']}")
    if meta.get("max") is not None and value > meta["max"]:
        raise ConfigError(f"{label}={shown}: must be at most {meta['max']}")


def _metavar(field: dataclasses.Field, base: tp.Any) -> str:
    if field.metadata.get("choices"):
        return "{" + ",".join(field.metadata["choices"]) + "}"
    if tp.get_origin(base) is list:
        return "A,B,..."
    if base is int:
        return "N"
    if base is float:
        return "SECONDS" if field.name.endswith("_seconds") else "MS" if field.name.endswith("_ms") else "NUMBER"
    if field.name.endswith(("_file", "_cert", "_key", "_ca")) or field.name in ("play", "record", "transcript"):
        return "FILE"
    return "TEXT"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def help_text(field: dataclasses.Field) -> str:
    """A flag's help: what it does, its default (unless the text says it), its range, its variable."""
    meta = field.metadata
    text = meta["help"]
    notes = []
    default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    if "default" not in text.lower() and default not in (None, "", [], dataclasses.MISSING):
        if meta.get("secret"):
            pass
        elif isinstance(default, bool):
            notes.append("default: " + ("on" if default else "off"))
        elif isinstance(default, list):
            notes.append("default: " + ",".join(str(item) for item in default))
        else:
            notes.append(f"default: {_number(default) if isinstance(default, float) else default}")
    if meta.get("min") is not None and meta.get("max") is not None:
        notes.append(f"{_number(meta['min'])} to {_number(meta['max'])}")
    elif meta.get("min") is not None:
        notes.append(f"at least {_number(meta['min'])}")
    if notes:
        text += " (" + "; ".join(notes) + ")"
    # argparse formats help with %: a literal percent sign must be doubled
    return f"{text} [env {env_name(field)}]".replace("%", "%%")


def add_sections(
    parser: argparse.ArgumentParser,
    classes: tp.Sequence[type],
    sections: dict[str, argparse._ArgumentGroup] | None = None,
) -> dict[str, argparse._ArgumentGroup]:
    """The ``--help`` sections the fields of ``classes`` need, made in :data:`GROUPS` order."""
    sections = {} if sections is None else sections
    order = list(GROUPS)
    groups = {f.metadata.get("group", "") for cls in classes for f in dataclasses.fields(cls)}
    for group in sorted(groups, key=lambda g: order.index(g) if g in order else len(order)):
        if group not in sections:
            sections[group] = parser.add_argument_group(GROUPS.get(group, "other settings"))
    return sections


def add_arguments(
    parser: argparse.ArgumentParser, cls: type, *, sections: dict[str, argparse._ArgumentGroup] | None = None
) -> None:
    """Add one CLI flag per field of ``cls`` (``sip_port`` → ``--sip-port``), each in the
    ``--help`` section its ``group`` names. ``sections`` (group → argument group) lets
    several classes share sections; new ones are made in :data:`GROUPS` order."""
    fields = [f for f in dataclasses.fields(cls) if not f.metadata.get("positional")]
    sections = add_sections(parser, [cls], sections)
    for field in fields:
        base, _ = _base_type(_field_type(cls, field))
        target = sections[field.metadata.get("group", "")]
        if base is bool:
            target.add_argument(
                flag_name(field),
                dest=field.name,
                default=None,
                action=argparse.BooleanOptionalAction,
                help=help_text(field),
            )
        else:
            target.add_argument(
                flag_name(field), dest=field.name, default=None, metavar=_metavar(field, base), help=help_text(field)
            )


T = tp.TypeVar("T", bound="DataclassInstance")


def load(
    cls: type[T], args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None, **overrides: tp.Any
) -> T:
    """Build ``cls`` from defaults < environment < CLI flags < keyword overrides, validated."""
    environ = os.environ if environ is None else environ
    values: dict[str, tp.Any] = {}
    for field in dataclasses.fields(cls):
        annotation = _field_type(cls, field)
        value: tp.Any = dataclasses.MISSING
        label = env_name(field)
        if label in environ:
            value = _parse(environ[label], annotation, label)
        cli_value = getattr(args, field.name, None) if args is not None else None
        if cli_value is not None:
            label = flag_name(field)
            value = cli_value if isinstance(cli_value, bool) else _parse(str(cli_value), annotation, label)
        if field.name in overrides:
            value = overrides[field.name]
        if value is dataclasses.MISSING:
            continue
        _check(value, field, label)
        values[field.name] = value
    instance = cls(**values)
    validate = getattr(instance, "validate", None)
    if validate is not None:
        validate()
    return instance


def describe(instance: tp.Any) -> dict[str, tp.Any]:
    """The settings as a dict, secrets masked: safe to log or serve."""
    out = {}
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        out[field.name] = "***" if field.metadata.get("secret") and value else value
    return out
