#!/usr/bin/env bash
# RepVGG training on a GPU: step throughput beside timm, the make-train recipe in float32
# and bfloat16, the data-parallel and resume tests (tools/gpu_train_check.py says what).
# Usage: tools/gpu_train_check.sh OUT_DIR [--quick]. Needs jax (CUDA), flax, optax, orbax,
# torch and timm; ml_collections and the Fashion-MNIST files travel in .gpu_carry/
# (make gpu-carry), which is put on the path; nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/.gpu_carry/site${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" tools/gpu_train_check.py "$@"
