"""``moshimoshi`` command line: serve, gateway, worker, asr, call."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from service import __version__, logs
from service.config import ConfigError, add_arguments, add_sections, load
from service.settings import AsrSettings, CallSettings, GatewaySettings, ServeSettings, WorkerSettings
from service.startup import StartupError


def _add_union(parser: argparse.ArgumentParser, *classes: type) -> None:
    """Flags for several settings classes at once; a field they share gets one flag (the
    first class's help), every flag in its section of ``--help``."""
    seen: set[str] = set()
    sections = add_sections(parser, classes)
    for cls in classes:
        fields = [f for f in dataclasses.fields(cls) if f.name not in seen]
        seen.update(f.name for f in fields)
        subset = dataclasses.make_dataclass(cls.__name__, [(f.name, f.type, f) for f in fields])
        subset.__module__ = cls.__module__
        add_arguments(parser, subset, sections=sections)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moshimoshi", description="Telephony service for full-duplex speech models (Moshi, LLM-jp-Moshi, J-Moshi)."
    )
    parser.add_argument("--version", action="version", version=f"moshimoshi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        usage="%(prog)s [options]",
        help="gateway + worker + embedded Redis in one command",
        description="Run a gateway, one worker and (without REDIS_URL) an embedded "
        "redis-server: a whole system on one machine.",
    )
    _add_union(serve, WorkerSettings, GatewaySettings, ServeSettings)  # --model: the worker's

    gateway = sub.add_parser(
        "gateway",
        usage="%(prog)s [options]",
        help="the SIP/WebRTC gateway and control plane",
        description="Answer SIP (and WebRTC) calls and route them to workers.",
    )
    add_arguments(gateway, GatewaySettings)

    worker = sub.add_parser(
        "worker",
        usage="%(prog)s [options]",
        help="an inference worker (one model, B slots)",
        description="Serve a model to gateways: B concurrent calls, one batched step every 80 ms.",
    )
    add_arguments(worker, WorkerSettings)

    asr = sub.add_parser(
        "asr",
        usage="%(prog)s [options]",
        help="an ASR worker (the callers' transcript)",
        description="Transcribe callers' utterances for gateways: many calls, batched "
        "(faster-whisper, or an OpenAI-compatible endpoint).",
    )
    add_arguments(asr, AsrSettings)

    call = sub.add_parser(
        "call",
        usage="%(prog)s URI [options]",
        help="place a test call and record what comes back",
        description="Place a SIP call (UAC), play a WAV file, record the answer.",
    )
    call.add_argument("uri", help="SIP URI to call, e.g. sip:agent@127.0.0.1:5060")
    add_arguments(call, CallSettings)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "worker":
            worker_settings = load(WorkerSettings, args)
            logs.setup(worker_settings.log_level)
            from service.worker.main import run_worker

            return run_worker(worker_settings)
        if args.command == "gateway":
            gateway_settings = load(GatewaySettings, args)
            logs.setup(gateway_settings.log_level)
            from service.gateway.main import run_gateway

            return run_gateway(gateway_settings)
        if args.command == "asr":
            asr_settings = load(AsrSettings, args)
            from service.asr.main import run_asr

            return run_asr(asr_settings)
        if args.command == "serve":
            gateway_settings = load(GatewaySettings, args)
            worker_settings = load(WorkerSettings, args)
            serve_settings = load(ServeSettings, args)
            logs.setup(gateway_settings.log_level)
            from service.serve import run_serve

            return run_serve(gateway_settings, worker_settings, serve_settings)
        if args.command == "call":
            call_settings = load(CallSettings, args, uri=args.uri)
            logs.setup(call_settings.log_level)
            from service.tools.call import run_call

            return run_call(call_settings)
    except ConfigError as exc:
        print(f"moshimoshi: configuration error: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"moshimoshi: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2
