"""``moshimoshi <command> --help``: every flag in a section, with its default and allowed values."""

from __future__ import annotations

import dataclasses
import re
import subprocess

import pytest

from service.cli import build_parser
from service.config import GROUPS
from service.settings import AsrSettings, CallSettings, GatewaySettings, ServeSettings, WorkerSettings
from tests.support.procs import moshimoshi_cmd, python_env

SETTINGS = (GatewaySettings, WorkerSettings, ServeSettings, AsrSettings, CallSettings)


def command_help(command: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[command].format_help()  # type: ignore[union-attr]


@pytest.mark.parametrize("cls", SETTINGS, ids=lambda cls: cls.__name__)
def test_every_setting_names_a_help_section(cls):
    ungrouped = [f.name for f in dataclasses.fields(cls) if f.metadata.get("group") not in GROUPS]
    assert not ungrouped, f"{cls.__name__}: give these a group= (a key of service.config.GROUPS): {ungrouped}"


def sections(text: str) -> dict[str, list[str]]:
    """Section title → the flags listed under it."""
    found: dict[str, list[str]] = {}
    current = ""
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            current = line[:-1]
            found[current] = []
        elif match := re.match(r"  (--[a-z0-9-]+)", line):
            found.setdefault(current, []).append(match.group(1))
    return found


def test_serve_help_groups_its_flags_in_sections():
    text = command_help("serve")
    shown = sections(text)
    titles = [
        GROUPS[key]
        for key in (
            "sip",
            "sip-security",
            "encryption",
            "media",
            "pool",
            "api",
            "webrtc",
            "webhook",
            "record",
            "model",
            "inference",
            "worker",
            "asr",
            "secrets",
            "logging",
        )
    ]
    assert [t for t in shown if t in titles] == titles  # each once, in GROUPS order
    assert "--sip-port" in shown["SIP"] and "--sip-allow" in shown[GROUPS["sip-security"]]
    assert "--webhook-url" in shown[GROUPS["webhook"]] and "--model" in shown[GROUPS["model"]]
    assert "--asr" in shown[GROUPS["asr"]]
    assert "--recording" in shown[GROUPS["record"]] and "--dtmf-clear" in shown[GROUPS["record"]]
    flags = sum(len(v) for v in shown.values())
    assert flags > 60
    assert text.startswith("usage: moshimoshi serve [options]\n")  # not 40 lines of flags


@pytest.mark.parametrize(
    "command, flag, shown",
    [
        ("serve", "--sip-port", "(default: 5060; 0 to 65535) [env MOSHIMOSHI_SIP_PORT]"),
        ("serve", "--dtype", "--dtype {bfloat16,float16,float32}"),
        ("serve", "--resampler", "--resampler {fir,soxr-qq,soxr-lq,soxr-mq,soxr-hq,soxr-vhq}"),
        ("serve", "--resampler", "(default: fir)"),
        ("serve", "--codecs", "(opus, G722, PCMU, PCMA)"),
        ("serve", "--srtp", "--srtp {off,optional,required}"),
        ("gateway", "--queue-seconds", "(default: 5; 0 to 120)"),
        ("gateway", "--sip-restrict-options", "--sip-restrict-options, --no-sip-restrict-options"),
        ("call", "--transport", "--transport {udp,tcp,tls}"),
        ("call", "--codec", "(default: PCMU)"),
        ("worker", "--cuda-graphs", "(default: on)"),
    ],
)
def test_help_shows_defaults_and_allowed_values(command, flag, shown):
    text = " ".join(command_help(command).split())  # unwrapped
    assert shown in text, f"{command} --help, {flag}: {shown!r} not in the help"


def test_secrets_show_no_default_and_percent_signs_survive():
    text = " ".join(command_help("gateway").split())
    assert "--api-tokens A,B,... API bearer tokens" in text
    assert "(default: none" not in text.split("--api-tokens", 1)[1].split("--", 1)[0]


def test_call_takes_the_uri_once():
    text = command_help("call")
    assert text.startswith("usage: moshimoshi call URI [options]")
    assert "--uri" not in text


@pytest.mark.system
def test_the_real_command_prints_its_help():
    result = subprocess.run(
        moshimoshi_cmd("serve", "--help"), capture_output=True, text=True, timeout=60, env=python_env(COLUMNS="100")
    )
    assert result.returncode == 0 and not result.stderr
    assert "\nSIP:\n" in result.stdout and "(default: 8080; 0 to 65535)" in " ".join(result.stdout.split())
