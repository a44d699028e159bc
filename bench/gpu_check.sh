#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py, docs/performance.md): one table, about 7 minutes on a CUDA
# machine that has PyTorch but neither network access nor this project's other wheels.
#
#   PYTHON=.venv/bin/python bash bench/gpu_check.sh pack [hw3-dev.tgz]   # here, once
#   bash bench/gpu_check.sh [--epochs N]                                 # on the GPU machine
#
# `pack` fills .gpucheck/ (git-ignored; carry it to the GPU machine with the checkout): the
# pycocotools wheel for CPython 3.12 and the real slice with its LZW images rewritten as zlib
# TIFFs (same pixels; tifffile reads them without imagecodecs, whose wheel is too large to carry).
set -euo pipefail
cd "$(dirname "$0")/.."
kit=.gpucheck

if [[ "${1:-}" == pack ]]; then
  python="${PYTHON:-python3}"
  src="${2:-../shared/realdata/hw3-dev.tgz}"
  rm -rf "$kit" && mkdir -p "$kit/wheels"
  "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$kit/wheels" pycocotools==2.0.11
  PYTHONPATH="$PWD" "$python" bench/gpu_check.py --repack "$src" --out "$kit/hw3-dev.tgz"
  du -sh "$kit"
  exit 0
fi

site="$(mktemp -d /tmp/gpu-check-site.XXXX)"
data="$(mktemp -d /tmp/gpu-check-data.XXXX)"
python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$kit"/wheels/*.whl
tar xzf "$kit/hw3-dev.tgz" -C "$data"
# No network there: an unreachable weights mirror makes ImageNet weights fail at once (random ones).
export PYTHONPATH="$PWD:$site" PYTHONUNBUFFERED=1 CELLSEG_WEIGHTS_MIRROR="file:///nonexistent"
timeout 540 python3 bench/gpu_check.py --data "$data/hw3-dev" "$@"
