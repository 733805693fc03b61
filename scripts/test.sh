#!/usr/bin/env bash
# The test suite on a fresh machine: set up, then run pytest (CPU, offline, tiny models).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# pytest (not `python -m pytest`): the repo root must not be on sys.path, where our nodes/ would shadow ComfyUI's.
.venv/bin/pytest -q "$@"
