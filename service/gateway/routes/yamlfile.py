"""YAML read with the line of every mapping, key and list item, so that errors name it.

``load(text)`` returns plain dicts, lists and scalars, except that mappings are
:class:`Mapping` (a dict with ``line`` and ``key_lines``) and sequences :class:`Sequence`
(a list with ``line`` and ``item_lines``). Lines count from 1. Only YAML's safe types are
built (no tags that construct objects), and aliases are refused: a routes file has no use
for them, and they are how a small file expands into a huge one.
"""

from __future__ import annotations

import typing as tp

import yaml

MAX_FILE_BYTES = 1024 * 1024


class YamlError(ValueError):
    """The text is not YAML we read; ``line`` is where (1-based), 0 when unknown."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


class Mapping(dict[tp.Any, tp.Any]):
    line: int = 0
    key_lines: dict[tp.Any, int]

    def line_of(self, key: tp.Any) -> int:
        """The line of ``key`` (the mapping's own line when it has no such key)."""
        return self.key_lines.get(key, self.line)


class Sequence(list[tp.Any]):
    line: int = 0
    item_lines: list[int]

    def line_of(self, index: int) -> int:
        return self.item_lines[index] if 0 <= index < len(self.item_lines) else self.line


class _Loader(yaml.SafeLoader):
    def compose_node(self, parent: yaml.Node | None, index: tp.Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            events: tp.Any = self  # peek_event is untyped in the stubs
            raise YamlError(events.peek_event().start_mark.line + 1, "aliases (*name) are not allowed here")
        return super().compose_node(parent, index)

    def construct_yaml_map(self, node: yaml.MappingNode) -> tp.Iterator[Mapping]:  # type: ignore[override]
        data = Mapping()
        data.line = node.start_mark.line + 1
        data.key_lines = {}
        yield data
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise YamlError(key_node.start_mark.line + 1, "a key must be a plain value") from None
            if key in data:
                raise YamlError(key_node.start_mark.line + 1, f"{key!r} is given twice")
            data[key] = self.construct_object(value_node, deep=True)
            data.key_lines[key] = key_node.start_mark.line + 1

    def construct_yaml_seq(self, node: yaml.SequenceNode) -> tp.Iterator[Sequence]:  # type: ignore[override]
        data = Sequence()
        data.line = node.start_mark.line + 1
        data.item_lines = [child.start_mark.line + 1 for child in node.value]
        yield data
        data.extend(self.construct_object(child, deep=True) for child in node.value)


_Loader.add_constructor("tag:yaml.org,2002:map", _Loader.construct_yaml_map)
_Loader.add_constructor("tag:yaml.org,2002:seq", _Loader.construct_yaml_seq)


def load(text: str) -> tp.Any:
    """The document in ``text`` (None when empty); raises :class:`YamlError`."""
    if len(text.encode()) > MAX_FILE_BYTES:
        raise YamlError(0, f"the file is larger than {MAX_FILE_BYTES // 1024} KiB")
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except YamlError:
        raise
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 0
        raise YamlError(line, " ".join(str(part) for part in (exc.context, exc.problem) if part) or str(exc)) from None
    except yaml.YAMLError as exc:
        raise YamlError(0, str(exc).splitlines()[0]) from None
