"""The Prometheus metrics the project defines, and the ones a PromQL expression uses.

Definitions are read from the source (every ``service/**/*.py``), so that metrics kept in
their own registries (the worker's) count as well as the global ones: a call such as
``Counter("moshimoshi_x_total", "...", ["code"])`` gives name, type and label names.
Names that appear only as string constants (built at scrape time, e.g. the gateway's
per-call RTP counters fed to ``CounterMetricFamily``) are "untyped": their exposition may
add ``_total`` and their labels are unknown.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

METRIC_CONSTRUCTORS = {
    "Counter": "counter",
    "Gauge": "gauge",
    "Histogram": "histogram",
    "Summary": "summary",
    "Info": "info",
    "Enum": "stateset",
    "CounterMetricFamily": "counter",
    "GaugeMetricFamily": "gauge",
    "HistogramMetricFamily": "histogram",
    "SummaryMetricFamily": "summary",
    "LoopHistogram": "histogram",  # service/gateway/metrics.py: the lock-free per-packet histogram
}
SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
    "stateset": ("",),
    "untyped": ("", "_total"),
}
# Labels that scraping adds (Prometheus operator / Kubernetes service discovery).
TARGET_LABELS = frozenset({"namespace", "pod", "job", "instance", "service", "container", "endpoint"})
NAME_RE = re.compile(r"^moshimoshi_[a-z0-9_]+$")
USE_RE = re.compile(r"\bmoshimoshi_[a-zA-Z0-9_]+")


@dataclass
class MetricDef:
    """One metric family as defined in the source."""

    name: str
    kind: str
    labels: frozenset[str] | None  # None: unknown
    where: str = ""
    exposed: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        base = self.name.removesuffix("_total") if self.kind in ("counter", "untyped") else self.name
        if self.kind == "untyped":
            self.exposed = (self.name, base + "_total")
        else:
            self.exposed = tuple(base + suffix for suffix in SUFFIXES[self.kind])


def _callee(node: ast.Call) -> str | None:
    if isinstance(node.func, ast.Name):
        return node.func.id
    if isinstance(node.func, ast.Attribute):
        return node.func.attr
    return None


def _const_str(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _label_names(node: ast.Call, kind_ctor: str) -> frozenset[str] | None:
    arg: ast.AST | None = None
    keyword = "labels" if kind_ctor.endswith("MetricFamily") else "labelnames"
    for kw in node.keywords:
        if kw.arg == keyword:
            arg = kw.value
    if arg is None and not kind_ctor.endswith("MetricFamily") and len(node.args) >= 3:
        arg = node.args[2]
    if arg is None:
        return frozenset()
    if isinstance(arg, ast.List | ast.Tuple):
        names = [_const_str(e) for e in arg.elts]
        strings = [n for n in names if n is not None]
        if len(strings) == len(names):
            return frozenset(strings)
    return None


def defined_metrics(source_root: Path) -> dict[str, MetricDef]:
    """Every ``moshimoshi_*`` metric defined under ``source_root`` (typed where possible)."""
    typed: dict[str, MetricDef] = {}
    loose: dict[str, str] = {}
    for path in sorted(source_root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        where = str(path.relative_to(source_root.parent))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _callee(node) in METRIC_CONSTRUCTORS:
                ctor = _callee(node)
                assert ctor is not None
                name = _const_str(node.args[0]) if node.args else None
                for kw in node.keywords:
                    if kw.arg == "name":
                        name = _const_str(kw.value)
                if name and NAME_RE.match(name):
                    typed[name] = MetricDef(name, METRIC_CONSTRUCTORS[ctor], _label_names(node, ctor), where)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and NAME_RE.match(node.value):
                loose.setdefault(node.value, where)
    result = dict(typed)
    for name, where in loose.items():
        if name not in result:
            result[name] = MetricDef(name, "untyped", None, where)
    return result


def exposition_index(defs: dict[str, MetricDef]) -> dict[str, MetricDef]:
    """Exposed series name (``x_total``, ``x_bucket``...) → its definition."""
    index: dict[str, MetricDef] = {}
    for d in defs.values():
        for name in d.exposed:
            index[name] = d
    return index


def used_metrics(expr: str) -> set[str]:
    return set(USE_RE.findall(expr))


def selector_labels(expr: str) -> list[tuple[str, set[str]]]:
    """(metric, label names in its {...} matchers) for every selector with matchers."""
    out = []
    for metric, body in re.findall(r"\b(moshimoshi_[a-zA-Z0-9_]+)\s*\{([^}]*)\}", expr):
        out.append((metric, set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", body))))
    return out


def grouping_labels(expr: str) -> set[str]:
    """Label names in every ``by (...)``/``without (...)`` clause."""
    labels: set[str] = set()
    for body in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        labels.update(x.strip() for x in body.split(",") if x.strip())
    return labels


def label_problems(expr: str, index: dict[str, MetricDef]) -> list[str]:
    """Labels an expression matches or groups on that none of its metrics carries."""
    problems = []
    for metric, labels in selector_labels(expr):
        d = index.get(metric)
        if d is None or d.labels is None:
            continue
        allowed = d.labels | TARGET_LABELS | ({"le"} if metric.endswith("_bucket") else set())
        problems += [f"{metric}{{{label}}}" for label in sorted(labels - allowed)]
    defs = [index.get(m) for m in used_metrics(expr)]
    if defs and all(d is not None and d.labels is not None for d in defs):
        allowed = set(TARGET_LABELS) | {"le"}
        for d in defs:
            assert d is not None and d.labels is not None
            allowed |= d.labels
        problems += [f"by ({label})" for label in sorted(grouping_labels(expr) - allowed)]
    return problems
