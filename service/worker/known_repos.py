"""The Hugging Face repos the worker knows by name: licence, files, and the files' sizes.

A download is checked against these sizes before anything is loaded, so that a partial one
(an interrupted copy into the cache or a volume, a full disk) is reported as such rather
than as a broken model. Where the figure is a rounded one from a model page, it has the
rounding as tolerance. A file smaller than that is an error; a larger one is logged (a
re-upload in another dtype, say) and the tensor check decides.

The figures and where they come from:

- Mimi, ``tokenizer-e351c8d8-checkpoint125.safetensors``: 384,644,900 bytes exactly.
  Kyutai's file (the READMEs of J-Moshi and LLM-jp-Moshi name it as theirs), and also the
  exact size of the stock Mimi's tensors as moshi 0.2.2 saves them (a test checks this on
  a random one: the size depends only on the tensor layout).
- ``model.safetensors`` of a Moshi 7B in bf16: 15.4 GB on J-Moshi's model page (14.3 GiB:
  the "~14 GB" quoted for LLM-jp-Moshi-v1, which is a Moshi 7B too); the architecture's
  tensors are 15,375,458,304 bytes in bf16, plus the header (a test computes this).
- J-Moshi's ``tokenizer_spm_32k_3.model``: 806 kB on its model page (rinna's
  japanese-gpt2-medium SentencePiece). LLM-jp-Moshi-v1's page gives no figure: not checked
  by size (a truncated SentencePiece model still fails to parse, with its own message).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

log = logging.getLogger(__name__)

APACHE = "Apache-2.0"
CC_BY_NC = "CC BY-NC 4.0 (research use only, no commercial use)"

MOSHI_NAME = "model.safetensors"
MIMI_NAME = "tokenizer-e351c8d8-checkpoint125.safetensors"
TOKENIZER_NAME = "tokenizer_spm_32k_3.model"

MOSHI_7B_BF16_TENSOR_BYTES = 15_375_458_304


@dataclasses.dataclass(frozen=True)
class KnownFile:
    """A file of a known repo: its documented size and the tolerance of that figure."""

    name: str
    size: int  # bytes
    tolerance: int  # bytes either side; 0 for an exact figure
    documented: str  # how the size is quoted, for messages

    def too_small(self, actual: int) -> bool:
        return actual < self.size - self.tolerance

    def too_large(self, actual: int) -> bool:
        return actual > self.size + self.tolerance


@dataclasses.dataclass(frozen=True)
class KnownRepo:
    repo_id: str
    license: str
    files: tuple[KnownFile, ...]

    def expected(self, name: str) -> KnownFile | None:
        return next((f for f in self.files if f.name == name), None)


MIMI = KnownFile(MIMI_NAME, 384_644_900, 0, "384,644,900 bytes")
MOSHI_7B_BF16 = KnownFile(MOSHI_NAME, 15_400_000_000, 50_000_000, "15.4 GB")
JMOSHI_TOKENIZER = KnownFile(TOKENIZER_NAME, 806_000, 500, "806 kB")

KNOWN_REPOS: dict[str, KnownRepo] = {
    repo.repo_id: repo
    for repo in (
        KnownRepo("llm-jp/llm-jp-moshi-v1", APACHE, (MOSHI_7B_BF16, MIMI)),
        KnownRepo("nu-dialogue/j-moshi", CC_BY_NC, (MOSHI_7B_BF16, MIMI, JMOSHI_TOKENIZER)),
        KnownRepo("nu-dialogue/j-moshi-ext", CC_BY_NC, (MOSHI_7B_BF16, MIMI, JMOSHI_TOKENIZER)),
    )
}


def check_download(repo_id: str, files: dict[str, Path]) -> str | None:
    """Compare a known repo's fetched files with their documented sizes.

    Returns an error message for the first file smaller than documented ("a partial
    download"), None when all fit. Larger files are logged only.
    """
    repo = KNOWN_REPOS.get(repo_id)
    if repo is None:
        return None
    for name, path in files.items():
        expected = repo.expected(name)
        if expected is None:
            continue
        actual = path.stat().st_size
        if expected.too_small(actual):
            return (
                f"{name} is {actual:,} bytes but {repo_id}'s is {expected.documented}: a partial "
                "download (delete it from the Hugging Face cache and download it again)"
            )
        if expected.too_large(actual):
            log.warning(
                "%s: %s is %s bytes, larger than the documented %s; loading it anyway (its tensors are checked)",
                repo_id,
                name,
                f"{actual:,}",
                expected.documented,
            )
    return None
