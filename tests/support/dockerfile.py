"""A small Dockerfile reader: stages, their base and their instructions."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Stage:
    """One ``FROM ... AS name`` stage and the instructions under it."""

    name: str | None
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            keyword, _, args = full.partition(" ")
            out.append((keyword.upper(), args.strip()))
    return out


def stages(path: Path) -> list[Stage]:
    result: list[Stage] = []
    for keyword, args in instructions(path.read_text(encoding="utf-8")):
        if keyword == "FROM":
            m = re.match(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?$", args, re.IGNORECASE)
            assert m, f"cannot parse FROM {args}"
            result.append(Stage(name=m.group(2), base=m.group(1)))
        elif result:
            result[-1].instructions.append((keyword, args))
    return result


def lineage(all_stages: list[Stage], name: str) -> list[Stage]:
    """The stage ``name``, the stages it is built FROM and those it COPYs --from, recursively."""
    by_name = {s.name: s for s in all_stages if s.name}
    seen: list[Stage] = []
    todo = [name]
    while todo:
        stage = by_name.get(todo.pop())
        if stage is None or stage in seen:
            continue
        seen.append(stage)
        todo.append(stage.base)
        for args in stage.all("COPY"):
            m = re.search(r"--from=(\S+)", args)
            if m:
                todo.append(m.group(1))
    return seen
