#!/usr/bin/env bash
# Creates (once) a separate virtual environment with moshi 0.2.2: the release that
# LLM-jp-Moshi-v1's and J-Moshi's READMEs pin (moshi<=0.2.2) and that wrote their
# checkpoints. The compatibility tests (tests/test_worker_legacy_checkpoints.py) let it write
# tiny checkpoints in that format and run its own inference as the reference for the
# worker, which runs moshi 0.2.13.
#
#   ops/tools/moshi022-venv.sh [VENV]      (default .venv-moshi022; PYTHON, TORCH_VERSION)
#
# moshi 0.2.2 pins torch<2.7: it is installed with --no-deps on the same torch as the
# service (its model code runs unchanged on torch 2.13), with the packages it imports:
# bitsandbytes is one (0.2.2 imports it in every linear layer, even unquantised ones).
set -euo pipefail
VENV="${1:-.venv-moshi022}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
STAMP="$VENV/.installed-moshi0.2.2-torch$TORCH_VERSION"
[ -f "$STAMP" ] && exit 0

echo "creating $VENV: moshi 0.2.2 on torch $TORCH_VERSION (for the checkpoint compatibility tests)"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install "torch==$TORCH_VERSION"
"${pip[@]}" install "numpy>=1.26,<2.3" "safetensors>=0.4.0,<0.6" "huggingface-hub>=0.24,<0.29" \
  "einops>=0.7,<0.9" "sentencepiece==0.2.0" "bitsandbytes>=0.45,<0.46"
"${pip[@]}" install --no-deps "moshi==0.2.2"  # last: its torch pin is not checked again
"$VENV/bin/python" -c "import moshi, torch; assert moshi.__version__ == '0.2.2', moshi.__version__"
touch "$STAMP"
