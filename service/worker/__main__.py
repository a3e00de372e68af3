"""``python -m service.worker [--model ...]``: run one inference worker."""

from __future__ import annotations

import argparse
import sys

from service.config import ConfigError, add_arguments, load
from service.settings import WorkerSettings
from service.worker.main import run_worker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.worker", description=WorkerSettings.__doc__)
    add_arguments(parser, WorkerSettings)
    args = parser.parse_args(argv)
    try:
        settings = load(WorkerSettings, args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_worker(settings)


if __name__ == "__main__":
    raise SystemExit(main())
