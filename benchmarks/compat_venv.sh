#!/usr/bin/env bash
# A second venv with the accelerator image's transformers (5.17) and huggingface-hub (1.33) over the project's
# venv, for tests/training/test_compat.py (docs/accelerator.md, "A venv with torch 2.11 / transformers 5.17").
#   bash benchmarks/compat_venv.sh [BASE_VENV]        # default BASE_VENV: .venv; writes .venv-compat (git-ignored)
#   GMSA_COMPAT_PYTHON=.venv-compat/bin/python python -m pytest -q tests/training/test_compat.py
# torch stays the base venv's CPU build: the registries here serve no CPU build of torch 2.11 (PyPI's Linux
# wheel of 2.11 is the CUDA one, ~0.9 GB plus several GB of nvidia-* dependencies).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BASE=$(cd "${1:-$REPO/.venv}" && pwd)
TARGET=$REPO/.venv-compat
base_site=$("$BASE/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
rm -rf "$TARGET"
"$BASE/bin/python" -m venv --without-pip "$TARGET"
site=$("$TARGET/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$base_site" > "$site/base-venv.pth"  # the base venv's packages, after this venv's own
"$BASE/bin/python" -m pip install -q --no-deps --no-cache-dir --target "$site" transformers==5.17.0 huggingface-hub==1.33.0
"$TARGET/bin/python" -c 'import torch, transformers, huggingface_hub as h; print("compat venv:", "torch", torch.__version__, "transformers", transformers.__version__, "huggingface-hub", h.__version__)'
