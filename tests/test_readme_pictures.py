"""The README's pictures (``make screenshots``) are there, and small."""

from __future__ import annotations

import re

from tests.support.procs import REPO_ROOT

MAX_BYTES = 200 * 1024


def test_every_picture_the_readme_links_is_committed_and_small():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    linked = set(re.findall(r"\((ops/screenshots/[\w.-]+\.png)\)", readme))
    expected = {f"ops/screenshots/{page}-{width}.png" for page in ("dashboard", "softphone") for width in (1280, 390)}
    assert linked == expected
    for path in sorted(linked):
        data = (REPO_ROOT / path).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n"), path
        assert len(data) <= MAX_BYTES, f"{path}: {len(data) // 1024} KiB"
