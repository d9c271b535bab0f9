#!/usr/bin/env bash
# Creates the environment tests/test_tracking.py runs MONAI's MLflow tracking in (default: <bundle>/.venv-tracking):
# the ACTIVE test environment's packages (read through a .pth file, not copied) plus MLflow
# (tests/requirements-tracking.txt, versions of constraints.txt). MLflow is kept out of the test environment
# because MONAI imports it on `import monai` wherever it is installed: 2-4 s more for every other
# `python -m monai.bundle` the suite starts (2 cores).
#   . .venv/bin/activate && bash tests/setup_tracking_venv.sh [VENV_DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-$ROOT/.venv-tracking}"
base="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
python -c "import monai, torch" || { echo "activate the test environment first (README: Tests)" >&2; exit 1; }
python -m venv "$VENV"
site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "import site; site.addsitedir('$base')" > "$site/test-environment.pth"
"$VENV/bin/python" -m pip install -q -r "$ROOT/tests/requirements-tracking.txt" -c "$ROOT/constraints.txt"
"$VENV/bin/python" -c "import mlflow, sqlalchemy, alembic, monai; print('$VENV: MLflow', mlflow.__version__, '| MONAI', monai.__version__)"
