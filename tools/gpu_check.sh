#!/usr/bin/env bash
# RepVGG inference on a GPU: exactness, speed beside PyTorch, the portable export
# (tools/gpu_check.py says what and how). Usage: tools/gpu_check.sh OUT_DIR [--quick]
# Needs jax (with its CUDA plugin), flax, optax, orbax-checkpoint; torch and timm for the
# PyTorch rows; nothing is downloaded. Pure-Python packages the machine lacks can travel
# in .gpu_carry/ (make gpu-carry), which is put on the path.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/.gpu_carry/site${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" tools/gpu_check.py "$@"
