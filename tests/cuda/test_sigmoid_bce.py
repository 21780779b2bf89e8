# SPDX-License-Identifier: Apache-2.0
"""sigmoid_bce and score on CUDA tensors (Triton and csrc/cuda backends) vs the reference."""
import pytest
import torch

import adrec_fast
from adrec_fast import functional as F
from adrec_fast import reference as R

from ..conftest import assert_close_verbose
from ._common import check_against_reference

pytestmark = pytest.mark.cuda
BACKENDS = ["triton"] + (["cuda"] if adrec_fast._C.build_info()["cuda"] else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B", [1, 17, 65536])
@pytest.mark.parametrize("weighted", [False, True])
def test_sigmoid_bce(monkeypatch, backend, B, weighted):
    y = (torch.rand(B) > 0.5).float()
    w = torch.rand(B) if weighted else None

    def fn(z):
        return F.sigmoid_bce(z, y.cuda(), w.cuda() if weighted else None)

    def ref(z):
        return R.sigmoid_bce(z, y.double(), w.double() if weighted else None)

    check_against_reference(monkeypatch, backend, fn, ref, [torch.randn(B) * 8], [0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigmoid_bce_op_deterministic(backend):
    z, y = torch.randn(100_000, device="cuda"), (torch.rand(100_000, device="cuda") > 0.5).float()
    op = torch.ops.adrec.sigmoid_bce_triton if backend == "triton" else torch.ops.adrec.sigmoid_bce
    a, b = op(z, y, None), op(z, y, None)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,K", [(1, 1), (70, 200), (4096, 429)])
def test_score(monkeypatch, backend, B, K):
    monkeypatch.setenv("ADREC_BACKEND", backend)
    x, w, b = torch.randn(B, K), torch.randn(K) / K**0.5, torch.tensor(0.3)
    out = F.score(x.cuda(), w.cuda(), b.cuda())
    assert_close_verbose(out.cpu(), R.score(x.double(), w.double(), b.double()).float())
