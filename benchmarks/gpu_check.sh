#!/usr/bin/env bash
# GPU checks (see ../shared/gpu/README.md): CUDA parity of fp32/fp16, throughput grid next to PyTorch
# fp16 eager, single-query latency, dynamic batching. Usage: benchmarks/gpu_check.sh RESULTS_DIR
set -euo pipefail
out="${1:?usage: benchmarks/gpu_check.sh RESULTS_DIR}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi finds none); run it on the GPU machine" >&2
  exit 3
fi
export PYTHONPATH="${PYTHONPATH:-}:$PWD/runtime:$PWD/export:$PWD"
python3 -m benchmarks.gpu "$out"
