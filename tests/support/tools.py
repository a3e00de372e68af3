"""Tests that need a tool `make test` installs (sipp, baresip, Chromium, helm, promtool...).

Outside CI a missing tool skips them with the command that installs it; under ``CI=true``
nothing is skipped for a missing tool: the test runs and fails, because CI installs every
tool through the project's own files and a silent skip there would hide a broken install.
"""

from __future__ import annotations

import os

import pytest


def requires(available: bool, what: str) -> pytest.MarkDecorator:
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    return pytest.mark.skipif(not available and not in_ci, reason=f"{what}: run the tests through `make test`")
