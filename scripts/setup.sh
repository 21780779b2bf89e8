#!/usr/bin/env bash
# Installs adrec_fast and what its tests need into the active Python, from nothing.
# torch is pinned here (not in the package's dependencies): 2.13.0 is this machine's CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${ADREC_TORCH_SPEC:-torch==2.13.0}
TRITON_SPEC=${ADREC_TRITON_SPEC:-triton==3.7.1}

# A system Python that its distribution manages (Debian, Ubuntu: PEP 668) refuses pip installs.
if $PY - <<'PYEOF'
import os, sys, sysconfig
managed = os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
sys.exit(0 if managed and sys.prefix == sys.base_prefix else 1)
PYEOF
then
  echo "setup: $($PY -c 'import sys; print(sys.executable)') is managed by the system; make a" \
       "virtual environment first:" >&2
  echo "  python3 -m venv .venv && . .venv/bin/activate && bash scripts/setup.sh" >&2
  exit 1
fi

echo "setup: installing $TORCH_SPEC and the Python dependencies"
$PY -m pip install -q --upgrade pip
$PY -m pip install -q "$TORCH_SPEC"
$PY -m pip install -q numpy pyarrow tqdm safetensors pyyaml matplotlib \
    pytest pytest-benchmark hypothesis "scikit-build-core>=0.10" pybind11 ninja "$TRITON_SPEC"

# Build the extension against the torch just installed (no isolated build env). pip -v passes
# the build's output through; the screen shows CMake's summary line and ninja's [step/steps]
# progress, the log keeps everything.
log=${TMPDIR:-/tmp}/adrec_fast_build.log
echo "setup: building the C++ extension, about 5 minutes on 2 cores (full log: $log)"
if ! $PY -m pip install -v --no-build-isolation --no-deps -e . 2>&1 | tee "$log" |
     { grep --line-buffered -E '^ *(-- adrec_fast:|\[[0-9]+/[0-9]+\])' || true; }; then
  echo "setup: the build failed; the end of $log:" >&2
  tail -n 40 "$log" >&2
  exit 1
fi
$PY -c "import adrec_fast, torch; print('adrec_fast', adrec_fast.__version__, 'on torch', torch.__version__, adrec_fast._C.build_info())"
