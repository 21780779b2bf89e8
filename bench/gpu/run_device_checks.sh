#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# One prepared run for a lent GPU (H200: torch 2.11 + CUDA 13, Triton 3.6, no internet), in
# under 8 minutes: build _C with the CUDA kernels (sm_90), run the GPU tests, measure the
# device-to-device copy bandwidth and benchmark every op against PyTorch eager and torch.compile
# (bench/gpu/bench_gpu.py). The short table comes last; logs and JSON go to $OUT.
#
#   bash bench/gpu/run_device_checks.sh            # on the GPU machine
#   bash bench/gpu/run_device_checks.sh --dry-run  # here, no GPU: CPU build, interpreter path
set -uo pipefail
cd "$(dirname "$0")/../.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-/tmp/adrec_device_checks}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || PY=python
T0=$(date +%s)
LIMIT=${ADREC_CHECK_LIMIT_S:-470}  # whole script, seconds
elapsed() { echo $(( $(date +%s) - T0 )); }
step() { echo "== [$(elapsed)s] $*"; }
rc=0

step "machine"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
[ $DRY = 0 ] && { nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.total --format=csv || true; }

step "build"
if [ $DRY = 1 ]; then
  # The normal CPU build, through the shared lock (other builds use the same tree).
  flock /tmp/adrec_build.lock $PY -m pip install --no-build-isolation --no-deps -e . \
    > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; }
else
  ADREC_WITH_CUDA=ON CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90" \
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) timeout 270 \
    $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
    || { tail -60 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; }
fi
$PY -c "import adrec_fast; print('build_info', adrec_fast._C.build_info())" || exit 1
if [ $DRY = 0 ]; then
  $PY -c "import adrec_fast, sys; sys.exit(0 if adrec_fast._C.build_info()['cuda'] else 1)" \
    || { echo "CUDA kernels were not built into _C"; rc=1; }
fi

step "tests"
if [ $DRY = 1 ]; then
  TRITON_INTERPRET=1 timeout 200 $PY -m pytest tests/triton -m triton -q -p no:cacheprovider \
    2>&1 | tee "$OUT/tests.log" | tail -3
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
else
  timeout 170 $PY -m pytest tests/cuda -m cuda -q -p no:cacheprovider -ra 2>&1 \
    | tee "$OUT/tests.log" | tail -25
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  TRITON_INTERPRET=1 timeout 60 $PY -m pytest tests/triton -m triton -q -p no:cacheprovider \
    2>&1 | tee "$OUT/tests_interp.log" | tail -2
fi

step "benchmarks"
LEFT=$(( LIMIT - $(elapsed) ))
BUDGET=$(( LEFT - 60 ))
[ $BUDGET -lt 30 ] && BUDGET=30
ARGS=(--out "$OUT" --budget-s "$BUDGET")
[ $DRY = 1 ] && ARGS+=(--dry-run)
PYTHONUNBUFFERED=1 timeout $(( LEFT > 40 ? LEFT - 10 : 30 )) \
  $PY bench/gpu/bench_gpu.py "${ARGS[@]}" > "$OUT/bench.log" 2>&1
brc=$?
[ $brc = 0 ] || rc=1
grep -v '^  ' "$OUT/bench.log" | tail -45
step "done (rc=$rc, bench rc=$brc); logs in $OUT"
exit $rc
