# SPDX-License-Identifier: Apache-2.0
"""Benchmark session setup shared by every bench/bench_*.py (STYLE.md §6).

- 2 intra-op threads (``ADREC_BENCH_THREADS`` overrides), set before any benchmark runs.
- The 1-minute load average is recorded before the run (``machine_info["adrec"]``), at the start
  of every benchmark (``extra_info["load1"]``) and after the run (``adrec_run`` in the JSON):
  another busy process on these 2 cores changes a timing by 2-40x, so a result taken under load
  is noted as such.
- ``ADREC_BENCH_QUICK=1`` selects the quick presets and fewer rounds (see ``bench_rounds``).
- Every round takes fresh inputs from a pool that touches >= 4x the L3 (``_harness``); the
  embedding benchmarks' ``ADREC_BENCH_CACHE=1`` times one repeated batch instead (the cache
  variant, labelled "cache" in the groups).
- One benchmark per provider cannot alternate providers within a round: the headline ratios come
  from each file's script mode (``python bench/bench_<op>.py --runs 3``).

Plain ``pytest`` does not collect bench/ (``testpaths = ["tests"]``).
"""
from __future__ import annotations

import os
import platform
import time

import pytest
import torch

# bench/gpu/bench_gpu.py is a script (run by bench/gpu/run_device_checks.sh, arguments parsed at
# import), not a pytest module: `python -m pytest bench` must not collect it.
collect_ignore = ["gpu"]

THREADS = int(os.environ.get("ADREC_BENCH_THREADS", "2"))
QUICK = os.environ.get("ADREC_BENCH_QUICK", "") not in ("", "0")
_LOAD_START: tuple[float, float, float] | None = None
_T_START = 0.0


def bench_rounds(default: int = 20) -> int:
    """Timed rounds for a normal benchmark: ``default``, or 5 in quick mode."""
    return 5 if QUICK else default


def _versions() -> dict[str, str]:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    for mod in ("adrec_fast", "fbgemm_gpu", "torchrec", "numpy"):
        try:
            m = __import__(mod)
            out[mod] = str(getattr(m, "__version__", "?"))
        except Exception as e:  # noqa: BLE001 - optional peers
            out[mod] = f"unavailable ({type(e).__name__})"
    return out


def pytest_sessionstart(session):
    global _LOAD_START, _T_START
    torch.set_num_threads(THREADS)
    _LOAD_START = os.getloadavg()
    _T_START = time.time()
    if _LOAD_START[0] > 0.5 * (os.cpu_count() or 1):
        print(
            f"\n[bench] WARNING: 1-minute load is {_LOAD_START[0]:.2f} on {os.cpu_count()} CPUs "
            "before the run; timings will be noisy (compare ratios within this run only)."
        )


def pytest_report_header(config):
    la = _LOAD_START or os.getloadavg()
    return (
        f"adrec bench: torch threads={torch.get_num_threads()}, cpus={os.cpu_count()}, "
        f"load avg (1/5/15 min) before run = {la[0]:.2f}/{la[1]:.2f}/{la[2]:.2f}, "
        f"quick={QUICK}"
    )


@pytest.fixture(autouse=True)
def _bench_env(request):
    """Every benchmark: threads pinned and the current 1-minute load noted."""
    torch.set_num_threads(THREADS)
    if "benchmark" in request.fixturenames:
        bm = request.getfixturevalue("benchmark")
        bm.extra_info["load1"] = round(os.getloadavg()[0], 2)
        bm.extra_info["threads"] = torch.get_num_threads()
    yield


def pytest_benchmark_update_machine_info(config, machine_info):
    la = _LOAD_START or os.getloadavg()
    machine_info["adrec"] = {
        "threads": THREADS,
        "quick": QUICK,
        "loadavg_before": list(la),
        "uptime_before": _uptime(),
        "versions": _versions(),
        "adrec_C": _ext_id(),
    }


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["adrec_run"] = {
        "loadavg_before": list(_LOAD_START or ()),
        "loadavg_after": list(os.getloadavg()),
        "wall_s": round(time.time() - _T_START, 1),
    }


def _ext_id() -> str:
    """Which build of adrec_fast._C was timed: the kernels change while others optimise them."""
    try:
        import hashlib

        import adrec_fast._C as ext

        with open(ext.__file__, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:12]
        mtime = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(ext.__file__)))
        return f"sha256 {digest}, built {mtime}"
    except Exception as e:  # noqa: BLE001
        return f"unknown ({type(e).__name__})"


def _uptime() -> str:
    try:
        import subprocess

        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception:  # noqa: BLE001
        return ""
