#!/usr/bin/env bash
# Set up llavakit in ./.venv: PyTorch 2.13.0 first, then llavakit and its dependencies.
#   bash scripts/setup.sh          # runtime (what the demo needs)
#   bash scripts/setup.sh --dev    # + test dependencies
# torch is installed on its own, pinned, before anything else: on a Linux machine with NVIDIA GPUs
# `pip install torch==2.13.0` gives the CUDA build from PyPI; where a local CPU wheel is configured
# (pip's find-links) it takes that one, and no later step pulls another torch, because llavakit's
# own requirement (torch>=2.4) is already satisfied.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${LLAVAKIT_TORCH_VERSION:-2.13.0}
extras=""
for arg in "$@"; do
  case "$arg" in
    --dev) extras="[dev]" ;;
    *) echo "setup.sh: unknown option $arg (use --dev)" >&2; exit 2 ;;
  esac
done

"$PYTHON" - <<'PY' || { echo "setup.sh: llavakit needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PYTHON" -m venv .venv
fi
pip_install() { .venv/bin/python -m pip install --disable-pip-version-check -qq "$@"; }

if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
  echo "[setup] installing torch==$TORCH_VERSION"
  pip_install "torch==$TORCH_VERSION"
fi
echo "[setup] installing llavakit$extras"
pip_install -e ".$extras"
.venv/bin/python -c "import torch, transformers, llavakit; print(f'[setup] ok: llavakit {llavakit.__version__}, torch {torch.__version__} (cuda: {torch.cuda.is_available()}), transformers {transformers.__version__}')"
