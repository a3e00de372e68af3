"""The project's own files agree with each other: the lock covers every dependency, the
version is written once, and the protocol library never imports the application."""

from __future__ import annotations

import ast
import re
import tomllib

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from service import __version__
from tests.support.procs import REPO_ROOT

MAKEFILE = (REPO_ROOT / "Makefile").read_text()


def locked_versions() -> dict[str, str]:
    out = {}
    for line in (REPO_ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            out[canonicalize_name(name)] = version
    return out


def installed_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    extras = re.search(r"^EXTRAS := (.+)$", MAKEFILE, re.M).group(1).split(",")
    specs = list(project["dependencies"])
    for extra in extras:
        specs += project["optional-dependencies"][extra]
    return [r for r in map(Requirement, specs) if r.marker is None or r.marker.evaluate()]


def test_every_dependency_is_locked_at_a_version_it_allows():
    locked = locked_versions()
    problems = []
    for req in installed_requirements():
        version = locked.get(canonicalize_name(req.name))
        if version is None:
            problems.append(f"{req.name} is not in requirements.lock")
        elif not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req.name}=={version} in requirements.lock is outside {req.specifier}")
    assert not problems, "; ".join(problems) + ": run `make lock`"


def test_torch_is_locked_at_the_makefile_pin():
    torch = re.search(r"^TORCH_VERSION \?= (\S+)$", MAKEFILE, re.M).group(1)
    assert Version(locked_versions()["torch"]).public == torch


def test_the_version_is_written_once_and_the_chart_follows_it():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    chart = yaml.safe_load((REPO_ROOT / "helm" / "moshimoshi" / "Chart.yaml").read_text())
    assert chart["appVersion"] == __version__


def test_the_sip_library_never_imports_the_application():
    offenders = []
    for path in sorted((REPO_ROOT / "sip").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [
                f"{path.relative_to(REPO_ROOT)}:{node.lineno} imports {n}"
                for n in names
                if n == "service" or n.startswith("service.")
            ]
    assert not offenders, offenders
