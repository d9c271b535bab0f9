#!/usr/bin/env bash
# The environment of the ANTs side of benchmarks/benchmark_ants.py: .venv-ants next to the bundle.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m venv .venv-ants
.venv-ants/bin/pip install -q -r benchmarks/ants/requirements.txt
.venv-ants/bin/python -c "import ants; print('antspyx', ants.__version__)"
