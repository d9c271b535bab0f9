#!/usr/bin/env bash
# Creates the virtual environment that serves this bundle with MONAI Label (default: <bundle>/.venv-monailabel).
# MONAI Label 0.8.5 needs numpy<2 (through pydicom-seg) and pydicom 2, so it gets its own environment,
# separate from the bundle's (numpy 2).
#   bash apps/monailabel/setup_venv.sh [VENV_DIR]
# Re-running it on a complete environment does nothing; delete the folder to rebuild it.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="${1:-$ROOT/.venv-monailabel}"
PYTHON="${PYTHON:-python3}"
REQ="$HERE/requirements.txt"
LOCK="$HERE/constraints.txt"
STAMP="$VENV/.requirements.sha256"
want="$(cat "$REQ" "$LOCK" | sha256sum | cut -d' ' -f1)"
if [ -x "$VENV/bin/monailabel" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ]; then
    echo "$VENV: up to date"
    exit 0
fi
rm -f "$STAMP"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
# Every pip call below is held to the tested versions (torch stays the CPU build, numpy stays 1.26).
export PIP_CONSTRAINT="$LOCK"
# torch first: a bare torch requirement would pull a multi-GB CUDA build.
"${PIP[@]}" install -q torch==2.13.0
# sam2 (a monailabel requirement) is an sdist whose build imports torch: build it against the
# torch just installed, without its CUDA extension, instead of an isolated build that would fetch
# another torch.
"${PIP[@]}" install -q "setuptools>=61" wheel
SAM2_BUILD_CUDA=0 "${PIP[@]}" install -q --no-build-isolation sam2
"${PIP[@]}" install -q -r "$REQ"
"$VENV/bin/python" -c "import monailabel, monai, torch, numpy; print('monailabel', monailabel.__version__, '| monai', monai.__version__, '| torch', torch.__version__, '| numpy', numpy.__version__)"
echo "$want" > "$STAMP"
