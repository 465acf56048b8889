#!/usr/bin/env bash
# Everything GPU-only, in one go (a few minutes on one H200): the kernel tests on real CUDA (no
# interpreter), the kernel benchmark and the training benchmark. Results land in one folder.
#   bash benchmarks/gpu_suite.sh [OUT_DIR]
# Uses $PYTHON, else .venv/bin/python, else python3 (which must have the project importable).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/gpu-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$out"
py=${PYTHON:-.venv/bin/python}
[ -x "$py" ] || py=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
status=0
run() {  # name, command...: log to $out/name.log, remember a failure, go on with the next step
  local name=$1; shift
  echo "== $name: $*"
  "$@" 2>&1 | tee "$out/$name.log" || status=1
}
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || { echo "no NVIDIA GPU here"; exit 1; }
run kernel-tests "$py" -m pytest -q tests/test_kernel_masked_loss.py tests/test_kernel_masks.py tests/test_kernel_dispatch.py
run bench-kernels "$py" benchmarks/bench_kernels.py
run bench-train "$py" benchmarks/bench_train.py --presets seed tiny
run bench-train-cl "$py" benchmarks/bench_train.py --presets seed --batch 128 --channels-last
cp benchmarks/results/*-cuda.json "$out"/ 2>/dev/null
echo "results in $out"
exit $status
