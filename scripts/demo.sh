#!/usr/bin/env bash
# The main job on a fresh machine: set up, write tiny random-weight demo models, and upscale the demo image x4
# through the shipped OSEDiff workflow inside a real (vendored) ComfyUI. Random weights do not upscale anything:
# this shows the whole path running. With real models, point --models-dir at your ComfyUI models folder.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/onestep-sr make-demo-models demo_models
.venv/bin/onestep-sr upscale demo_models/demo_input.png --out demo_models/demo_output_x4.png \
    --models-dir demo_models --scale 4
