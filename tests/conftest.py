# SPDX-License-Identifier: Apache-2.0
"""Shared test fixtures: per-test seeding, devices, the shared-data path and comparison helpers."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

# Register the *_triton ops even without a GPU or the interpreter (ops/_backend.py): opcheck
# covers their schemas, fake kernels and autograd on CPU.
os.environ.setdefault("ADREC_TRITON_OPS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    for item in items:
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "triton" in item.keywords and not (has_cuda or interp):
            item.add_marker(pytest.mark.skip(reason="needs a GPU or TRITON_INTERPRET=1"))


@pytest.fixture(autouse=True)
def _seed(request):
    """Fresh per test, reproducible per test: the seed comes from the test id (and
    ADREC_TEST_SEED, to draw other inputs in a rerun)."""
    salt = os.environ.get("ADREC_TEST_SEED", "0")
    seed = int(hashlib.sha256((request.node.nodeid + salt).encode()).hexdigest()[:8], 16)
    torch.manual_seed(seed)
    yield


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real CTR data not found at {SHARED_DATA} (a fresh clone has no ../shared)")
    return SHARED_DATA


def assert_close_verbose(actual, expected, **kw):
    """torch.testing.assert_close with its dtype defaults, reporting the worst element."""
    try:
        torch.testing.assert_close(actual, expected, **kw)
    except AssertionError as e:
        if actual.shape == expected.shape and actual.numel() > 0:
            diff = (actual.double() - expected.double()).abs()
            i = int(diff.argmax())
            idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), diff.shape))
            raise AssertionError(
                f"{e}\nworst element at {idx}: actual={actual.reshape(-1)[i].item()} "
                f"expected={expected.reshape(-1)[i].item()}"
            ) from None
        raise


def assert_no_worse_than_torch(out, truth, same_dtype, factor=2.0):
    """Low-precision rule (flash-attn): the error against the float64 truth is at most
    ``factor`` x the error of the reference run in the same dtype (plus a tiny floor)."""
    if out.dtype in (torch.float32, torch.float64):
        assert_close_verbose(out, truth.to(out.dtype))
        return
    err = (out.double() - truth.double()).abs().max().item()
    ref_err = (same_dtype.double() - truth.double()).abs().max().item()
    assert err <= factor * ref_err + 1e-6, f"error {err} > {factor} x reference error {ref_err}"


def rerun_in_child(test_file: str, k_expr: str, **env: str) -> None:
    """Run ``pytest -k k_expr`` on ``test_file`` in a child process with ``env`` added (settings
    the extension reads once per process); fails unless the child passed at least one test."""
    import subprocess
    import sys

    here = Path(test_file).resolve()
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(here), "-k", k_expr],
        capture_output=True, text=True, timeout=600, env={**os.environ, **env},
        cwd=str(here.parents[2]),
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert " passed" in res.stdout
