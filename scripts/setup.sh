#!/usr/bin/env bash
# Installs adrec_fast and what its tests need into the active Python, from nothing.
# torch is pinned here (not in the package's dependencies): 2.13.0 is this machine's CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${ADREC_TORCH_SPEC:-torch==2.13.0}
TRITON_SPEC=${ADREC_TRITON_SPEC:-triton==3.7.1}
$PY -m pip install -q --upgrade pip
$PY -m pip install -q "$TORCH_SPEC"
$PY -m pip install -q numpy pyarrow tqdm safetensors pyyaml matplotlib \
    pytest pytest-benchmark hypothesis "scikit-build-core>=0.10" pybind11 ninja "$TRITON_SPEC"
# Build the extension against the torch just installed (no isolated build env).
$PY -m pip install -q --no-build-isolation --no-deps -e .
$PY -c "import adrec_fast, torch; print('adrec_fast', adrec_fast.__version__, 'on torch', torch.__version__, adrec_fast._C.build_info())"
