#!/usr/bin/env bash
# Every GPU-only measurement in one go, on a GPU machine without network, FFCV or DALI: its own python3 (torch,
# triton, timm, pytorch-lightning, numpy, pytest, scikit-image), no venv, and the project not installed. The steps, their limits and how long they take: benchmarks/gpu_suite.py.
#   bash benchmarks/gpu_suite.sh OUT               on the GPU machine
#   bash benchmarks/gpu_suite.sh --dry-run OUT     the same steps rehearsed on a CPU (tiny presets, few steps), with
#                                                  FFCV and DALI blocked and any installed copy of the project hidden
# Extra options go to gpu_suite.py (--budget S, --only STEP...). A packed FFCV (.ffcv-gpu in the checkout, made by
# benchmarks/pack_ffcv_for_gpu.sh) is installed into a temporary folder first.
# Exit status: 0 when every step that could run passed.
set -uo pipefail
cd "$(dirname "$0")/.."
dry=()
if [ "${1:-}" = "--dry-run" ]; then dry=(--dry-run); shift; fi
[ $# -ge 1 ] || { echo "usage: bash benchmarks/gpu_suite.sh [--dry-run] OUT [gpu_suite.py options]" >&2; exit 2; }
out=$1; shift
if [ -n "${PYTHON:-}" ]; then py=$PYTHON
elif [ ${#dry[@]} -gt 0 ] && [ -x .venv/bin/python ]; then py=.venv/bin/python  # the rehearsal's packages
else py=python3; fi

# kernels/ imports as ddmim_kernels, a name only an installed project has: a link gives it.
links=$(mktemp -d)
trap 'rm -rf "$links"' EXIT
ln -s "$PWD/kernels" "$links/ddmim_kernels"
path="$links:$PWD"
[ ${#dry[@]} -gt 0 ] && path="$PWD/benchmarks/rehearsal:$path"
if [ ${#dry[@]} -eq 0 ] && [ -d .ffcv-gpu/wheels ]; then
    "$py" -m pip install --quiet --no-index --no-deps --no-compile --disable-pip-version-check \
        --target "$links/site" .ffcv-gpu/wheels/*.whl && path="$path:$links/site"
    export DDMIM_FFCV_LIB="$PWD/.ffcv-gpu/lib"  # only the FFCV steps get it: these are older than the system's
fi
export PYTHONPATH="$path${PYTHONPATH:+:$PYTHONPATH}"
"$py" benchmarks/gpu_suite.py "$out" "${dry[@]}" "$@"
