#!/usr/bin/env bash
# FFCV for a GPU machine whose python3 is CPython 3.12 without FFCV and without network: a cp312 wheel of ffcv
# built here, the wheels of its pure-Python needs that such a machine lacks, and the shared libraries its
# extension loads (what `ldd` lists, less the C and C++ runtimes that every Linux has), in one folder that is
# copied into the checkout there and that `benchmarks/gpu_suite.sh` installs.
#   bash benchmarks/pack_ffcv_for_gpu.sh [DEST]      (default .ffcv-gpu, git-ignored)
# Needs a Python 3.12 here ($PYTHON312, else python3.12 or pyenv's), pip access to PyPI, and the system
# libraries FFCV builds against (`make system-deps`). Fails, saying why, if the folder would exceed 60 MiB (it is
# meant to travel with the checkout, and the libraries it needs come to about 23 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.ffcv-gpu}
py=${PYTHON312:-}
if [ -z "$py" ]; then
    py=$(command -v python3.12 2>/dev/null || true)
    "$py" --version >/dev/null 2>&1 || py=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null | tail -n 1)
fi
if [ -z "$py" ] || ! "$py" --version >/dev/null 2>&1; then
    echo "pack_ffcv_for_gpu: no Python 3.12 found (set PYTHON312=/path/to/python3.12)" >&2; exit 2
fi
rm -rf "$dest.tmp"
mkdir -p "$dest.tmp/wheels" "$dest.tmp/lib"
# ffcv and assertpy exist on PyPI as source only; the others as pure-Python wheels. The machine already has
# numba, numpy, opencv-python-headless, psutil and tqdm.
"$py" -m pip wheel --quiet --disable-pip-version-check --no-deps ffcv==1.0.2 assertpy==1.1 -w "$dest.tmp/wheels"
"$py" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 -d "$dest.tmp/wheels" \
    terminaltables==3.1.10 pytorch-pfn-extras==0.9.0 fastargs==0.3.0
ext=$(mktemp -d)
unzip -q -o "$dest.tmp"/wheels/ffcv-*.whl 'ffcv/_libffcv*.so' -d "$ext"
# glibc and the C++ runtime stay the machine's own (a newer system's are compatible; older copies are not)
ldd "$ext"/ffcv/_libffcv*.so | awk '$2 == "=>" && $3 ~ /^\// {print $3}' \
    | grep -v -E '/(libc|libm|libdl|librt|libpthread|libstdc\+\+|libgcc_s|ld-linux[^/]*)\.so' \
    | while read -r lib; do cp -L "$lib" "$dest.tmp/lib/"; done
rm -rf "$ext"
size=$(du -sm "$dest.tmp" | cut -f1)
if [ "$size" -gt 60 ]; then
    echo "pack_ffcv_for_gpu: $size MiB, over the 60 MiB meant for a folder that travels with the checkout:" >&2
    du -sh "$dest.tmp"/lib/* | sort -h | tail -n 5 >&2
    rm -rf "$dest.tmp"; exit 2
fi
rm -rf "$dest"
mv "$dest.tmp" "$dest"
echo "packed FFCV for Python 3.12 into $dest ($size MiB: $(ls "$dest/wheels" | wc -l) wheels, $(ls "$dest/lib" | wc -l) libraries)"
echo "copy $dest into the checkout on the GPU machine; benchmarks/gpu_suite.sh installs it from there"
