#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# CI's cuda-compile job: nvcc compiles every csrc/cuda/*.cu for sm_80 and sm_90 into an object
# library that is never linked, so it needs nvcc but neither a GPU nor a CUDA build of torch.
# Usage: bash bench/gpu/cuda_compile_check.sh [build-dir]   (NVCC=/path/to/nvcc to override)
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD=${1:-build/cuda-check}
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
[ -x "$NVCC" ] || { echo "cuda_compile_check: nvcc not found (set NVCC=...)" >&2; exit 2; }
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
cmake -S . -B "$BUILD" "${GEN[@]}" -DADREC_CUDA_COMPILE_ONLY=ON \
  -DCMAKE_CUDA_COMPILER="$NVCC" -DCMAKE_CUDA_ARCHITECTURES="80;90" >/dev/null
cmake --build "$BUILD" --target adrec_cuda_objects -j "${JOBS:-2}"
n=$(find "$BUILD" -name '*.cu.o' | wc -l)
echo "cuda_compile_check: OK ($n object files for sm_80 and sm_90)"
