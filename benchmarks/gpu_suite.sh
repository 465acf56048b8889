#!/usr/bin/env bash
# Everything GPU-only, in one go (a few minutes on one H200): the kernel tests on real CUDA (no
# interpreter), the kernel, training-step and loader benchmarks, and `ddmim train --benchmark` for the
# seed preset at 224 px / bf16 across data backends, channels-last, torch.compile and kernels.
# Results land in one folder.
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
run bench-loaders "$py" benchmarks/bench_loaders.py --workers 8 --batch 128

# the photographs (built by bench-loaders) in all three formats, both splits
photos=${XDG_CACHE_HOME:-$HOME/.cache}/ddmim/bench/photos-2000
data=${XDG_CACHE_HOME:-$HOME/.cache}/ddmim/bench/suite
[ -d "$data/ffcv" ] || "$py" data_prep/to_ffcv.py "$photos" "$data/ffcv" --max-resolution 256 > /dev/null
[ -d "$data/dali" ] || "$py" data_prep/to_dali.py "$photos" "$data/dali" --max-resolution 256 > /dev/null
bench() {  # name, extra options
  local name=$1; shift
  run "train-benchmark-$name" "$py" -m ddmim train --preset seed --batch-size 128 --workers 8 --benchmark 30 \
    --no-progress "$@"
  cp benchmarks/results/train-benchmark-cuda.json "$out/train-benchmark-$name.json" 2>/dev/null
}
bench folder --data "$photos"
bench ffcv --data "$data/ffcv"
bench dali --data "$data/dali"
bench dali-channels-last --data "$data/dali" --channels-last
bench dali-compile --data "$data/dali" --compile
bench dali-torch-kernels --data "$data/dali" --kernels torch
cp benchmarks/results/*-cuda.json "$out"/ 2>/dev/null
echo "results in $out"
exit $status
