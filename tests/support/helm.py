"""Render the Helm chart with the helm binary that `make install-test` puts in .tools/."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import yaml

from tests.support.procs import REPO_ROOT

CHART = REPO_ROOT / "helm" / "moshimoshi"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))


def helm_binary() -> str | None:
    local = REPO_ROOT / ".tools" / "helm"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("helm")


class HelmError(RuntimeError):
    """helm exited non-zero; the message is its stderr."""


def run_helm(*args: str) -> str:
    helm = helm_binary()
    if helm is None:
        raise HelmError("helm not found: run ops/tools/install-helm.sh .tools (make install-test)")
    proc = subprocess.run([helm, *args], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise HelmError(proc.stderr.strip() or proc.stdout.strip())
    return proc.stdout


def render(values: Path | None = None, *sets: str, release: str = "t", namespace: str = "tel") -> list[dict]:
    """`helm template` → the manifests as dicts (empty documents dropped)."""
    args = ["template", release, str(CHART), "--namespace", namespace]
    if values is not None:
        args += ["-f", str(values)]
    for item in sets:
        args += ["--set", item]
    return [doc for doc in yaml.safe_load_all(run_helm(*args)) if doc]


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_templates(docs: list[dict]) -> list[tuple[str, dict]]:
    """(kind/name, pod spec) of every workload."""
    return [
        (f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"])
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")
    ]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}
