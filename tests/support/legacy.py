"""moshi 0.2.2 beside the service's 0.2.13: its environment, its checkpoints, its inference.

LLM-jp-Moshi-v1 and J-Moshi pin moshi<=0.2.2, which wrote their checkpoints. These helpers
run the real 0.2.2 (in `.venv-moshi022`, made by ``ops/tools/moshi022-venv.sh`` as ``make
install-test`` does; made here too when missing) through ``moshi022_legacy.py``: it writes
tiny checkpoints in the authors' format and computes 0.2.2's own greedy inference on them.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import tempfile
import typing as tp
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("MOSHIMOSHI_MOSHI022_VENV", REPO / ".venv-moshi022"))
SCRIPT = Path(__file__).with_name("moshi022_legacy.py")
ENV_SCRIPT = REPO / "ops" / "tools" / "moshi022-venv.sh"

LEGACY_FILES = (
    "model.safetensors",
    "tokenizer_spm_32k_3.model",
    "tokenizer-e351c8d8-checkpoint125.safetensors",
    "moshi_lm_kwargs.json",
)


def moshi022_python() -> Path:
    """The 0.2.2 environment's interpreter, the environment created first if it is missing."""
    lock_path = VENV.parent / (VENV.name + ".lock")
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test processes must not build it at once
        result = subprocess.run(
            ["bash", str(ENV_SCRIPT), str(VENV)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=900,
            env={**os.environ, "PYTHON": sys.executable},
        )
    if result.returncode != 0:
        raise RuntimeError(
            f"cannot create the moshi 0.2.2 environment {VENV} "
            f"(ops/tools/moshi022-venv.sh):\n{result.stdout[-2000:]}{result.stderr[-4000:]}"
        )
    return VENV / "bin" / "python"


def run_022(*args: str, timeout: float = 600) -> str:
    """Run ``moshi022_legacy.py`` under moshi 0.2.2; return its stdout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["NO_TORCH_COMPILE"] = "1"
    result = subprocess.run(
        [str(moshi022_python()), str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=tempfile.gettempdir(),
    )
    if result.returncode != 0:
        raise RuntimeError(f"moshi 0.2.2 failed: {' '.join(args[:1])}\n{result.stderr[-4000:]}")
    return result.stdout


def build_legacy_checkpoint(directory: Path, seed: int = 0, *options: str) -> Path:
    """A tiny random Moshi as moshi 0.2.2 saves one (see moshi022_legacy.py), in ``directory``.

    ``options`` are the script's (``--lm-only`` with a directory that holds the tokenizer and
    Mimi already, ``--no-text-padding-id``).
    """
    from service.worker.tinymodel import train_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / "tokenizer_spm_32k_3.model").exists():
        train_tokenizer(directory / "tokenizer_spm_32k_3.model")
    run_022("build", str(directory), str(seed), *options)
    return directory


class Reference(tp.NamedTuple):
    tokens: np.ndarray  # [T, 1 + dep_q]; -1 on steps where 0.2.2 produced nothing
    pcm: np.ndarray  # [T, 1920]


def reference(directory: Path, calls: dict[str, np.ndarray]) -> dict[str, Reference]:
    """0.2.2's greedy inference on each call's audio ([T, 1920] float32), each from a fresh stream."""
    with tempfile.TemporaryDirectory(prefix="moshi022-") as tmp:
        inputs, outputs = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(inputs, **{name: np.ascontiguousarray(audio, dtype=np.float32) for name, audio in calls.items()})
        run_022("reference", str(directory), str(inputs), str(outputs))
        with np.load(outputs) as data:
            return {name: Reference(data[f"{name}.tokens"], data[f"{name}.pcm"]) for name in calls}


def moshi022_lm_kwargs() -> dict[str, tp.Any]:
    """moshi 0.2.2's own ``loaders._lm_kwargs`` (the Moshi 7B)."""
    import json

    return json.loads(run_022("lm-kwargs"))


def link_copy(source: Path, target: Path, names: tp.Iterable[str]) -> Path:
    """``target`` holding ``names`` of ``source`` as hard links (the Mimi file is 385 MB)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        os.link(source / name, target / name)
    return target
