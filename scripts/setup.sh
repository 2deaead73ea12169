#!/usr/bin/env bash
# Set up llavakit in ./.venv: PyTorch 2.13.0 first, then llavakit and its dependencies.
#   bash scripts/setup.sh                 # runtime (what the demo needs), versions from requirements/lock.txt
#   bash scripts/setup.sh --dev           # + test dependencies
#   bash scripts/setup.sh --dev --latest  # the newest versions pyproject.toml allows instead of the lock
#                                         # (also LLAVAKIT_LATEST=1); upgrades an existing venv too
# LLAVAKIT_VENV=DIR sets up DIR instead of .venv (e.g. .venv-latest, to test against the newest
# releases next to the locked .venv).
# torch is installed on its own, pinned, before anything else: on a Linux machine with NVIDIA GPUs
# `pip install torch==2.13.0` gives the CUDA build from PyPI; where a local CPU wheel is configured
# (pip's find-links) it takes that one, and no later step pulls another torch, because torch stays
# pinned to that version (the lock's own torch line is replaced by it, --latest included).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${LLAVAKIT_TORCH_VERSION:-2.13.0}
VENV=${LLAVAKIT_VENV:-.venv}
LOCK=requirements/lock.txt
latest=${LLAVAKIT_LATEST:-0}
extras=""
usage="usage: bash scripts/setup.sh [--dev] [--latest]   (env: LLAVAKIT_VENV=DIR, LLAVAKIT_LATEST=1, PYTHON, LLAVAKIT_TORCH_VERSION)"
for arg in "$@"; do
  case "$arg" in
    --dev) extras="[dev]" ;;
    --latest) latest=1 ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) echo "setup.sh: unknown option $arg" >&2; echo "$usage" >&2; exit 2 ;;
  esac
done
case "$latest" in 1|true|yes) latest=1 ;; *) latest=0 ;; esac

"$PYTHON" - <<'PY' || { echo "setup.sh: llavakit needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
pip_install() { "$VENV/bin/python" -m pip install --disable-pip-version-check -qq "$@"; }

# constraints for every pip call: torch at TORCH_VERSION always; the lock's versions unless --latest
constraints=$(mktemp "${TMPDIR:-/tmp}/llavakit-constraints.XXXXXX")
trap 'rm -f "$constraints"' EXIT
echo "torch==$TORCH_VERSION" >"$constraints"
if [ "$latest" = 1 ]; then
  mode="newest releases pyproject.toml allows"
  upgrade=(--upgrade --upgrade-strategy eager)
else
  [ -f "$LOCK" ] || { echo "setup.sh: $LOCK is missing (use --latest to set up without it)" >&2; exit 1; }
  mode="versions from $LOCK"
  grep -v -i -E '^[[:space:]]*torch[[:space:]]*==' "$LOCK" >>"$constraints"
  upgrade=()
fi

if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
  echo "[setup] installing torch==$TORCH_VERSION"
  pip_install -c "$constraints" "torch==$TORCH_VERSION"
fi
echo "[setup] installing llavakit$extras ($mode)"
pip_install -c "$constraints" ${upgrade[@]+"${upgrade[@]}"} -e ".$extras"
"$VENV/bin/python" -c "import torch, transformers, llavakit; print(f'[setup] ok: llavakit {llavakit.__version__}, torch {torch.__version__} (cuda: {torch.cuda.is_available()}), transformers {transformers.__version__} in $VENV')"
