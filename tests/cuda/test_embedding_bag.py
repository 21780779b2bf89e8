# SPDX-License-Identifier: Apache-2.0
"""embedding_bag on CUDA tensors vs the reference: the Triton launchers, adrec::embedding_bag_triton
(autograd), the csrc/cuda kernels (torch.ops.adrec.embedding_bag*, when built) and the fused
SGD / row-wise Adagrad update through the public path."""
from __future__ import annotations

import pytest
import torch

import adrec_fast
from adrec_fast import reference as R
from adrec_fast.ops import embedding_bag as ops_eb

from ..conftest import assert_close_verbose, assert_no_worse_than_torch
from ..triton._inputs import make_bags, reference_dense_grad, reference_update

pytestmark = pytest.mark.cuda

CUDA_BUILT = adrec_fast._C.build_info()["cuda"]
BACKENDS = ["triton", "cuda"]
CASES = [  # (rows per table, B, max bag length, D, index dtype, duplicates)
    ([5], 1, 3, 17, torch.int64, False),
    ([7, 3, 11], 5, 4, 17, torch.int32, False),
    ([6, 4], 64, 6, 8, torch.int64, True),
    ([1000] * 26, 256, 20, 64, torch.int64, False),
    ([300, 50], 33, 3, 300, torch.int32, False),  # D > 256
]


def _kernels():
    return pytest.importorskip("adrec_fast.kernels.embedding_bag")


def _fwd(backend, *args):
    if backend == "cuda":
        if not CUDA_BUILT:
            pytest.skip("_C was built without CUDA kernels")
        return torch.ops.adrec.embedding_bag(*args)
    return _kernels().embedding_bag_fwd(*args)


def _bwd(backend, *args):
    if backend == "cuda":
        return torch.ops.adrec.embedding_bag_bwd(*args)
    return _kernels().embedding_bag_bwd(*args)


def _update(backend, *args):
    if backend == "cuda":
        return torch.ops.adrec.embedding_bag_bwd_update(*args)
    return _kernels().embedding_bag_bwd_update(*args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pooling", [0, 1], ids=["sum", "mean"])
@pytest.mark.parametrize("psw", [False, True], ids=["nopsw", "psw"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_backward_update(backend, case, pooling, psw):
    rows, B, max_len, D, index_dtype, dup = case
    tofs, idx, ofs = make_bags(rows, B, max_len, index_dtype, dup=dup, device="cuda")
    N = sum(rows)
    w = torch.randn(N, D, device="cuda")
    p = torch.rand(idx.numel(), device="cuda") if psw else None
    out = _fwd(backend, w, tofs, idx, ofs, p, pooling)
    truth = R.embedding_bag(w.double().cpu(), tofs.cpu(), idx.cpu(), ofs.cpu(),
                            p.double().cpu() if psw else None, pooling)
    assert_close_verbose(out.cpu(), truth.float())
    g = torch.randn_like(out)
    dense, touched = reference_dense_grad(w, tofs, idx, ofs, p, pooling, g)
    rows_u, rg = _bwd(backend, g, w, tofs, idx, ofs, p, pooling)
    assert torch.equal(rows_u.cpu(), touched.nonzero().flatten())
    assert_close_verbose(rg.cpu(), dense[rows_u.cpu()].float())
    rows2, rg2 = _bwd(backend, g, w, tofs, idx, ofs, p, pooling)
    assert torch.equal(rg, rg2)  # deterministic
    for optimizer in (0, 1):
        w1, s1 = w.clone(), torch.rand(N, device="cuda")
        want_w, want_s = reference_update(w1, s1, dense, touched, optimizer, 0.1, 1e-8)
        _update(backend, g, w1, s1, tofs, idx, ofs, p, pooling, optimizer, 0.1, 1e-8)
        assert_close_verbose(w1.cpu(), want_w.float())
        assert_close_verbose(s1.cpu(), want_s.float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_ids_raise(backend):
    tofs, idx, ofs = make_bags([4, 5], 3, 3, min_len=1, device="cuda")
    w = torch.randn(9, 4, device="cuda")
    bad = idx.clone()
    bad[-1] = 5
    with pytest.raises(IndexError, match=r"out of range for table 1 \(5 rows"):
        _fwd(backend, w, tofs, bad, ofs, None, 0)
    s = torch.zeros(9, device="cuda")
    w0 = w.clone()
    with pytest.raises(IndexError, match="table 1"):
        _update(backend, torch.ones(3, 8, device="cuda"), w, s, tofs, bad, ofs, None, 0, 1, 0.1, 1e-8)
    assert torch.equal(w, w0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_forward(backend, dtype):
    tofs, idx, ofs = make_bags([500, 70], 64, 12, device="cuda")
    w = torch.randn(570, 64, device="cuda", dtype=dtype)
    out = _fwd(backend, w, tofs, idx, ofs, None, 0)
    truth = R.embedding_bag(w.double(), tofs, idx, ofs, None, 0)
    same = R.embedding_bag(w, tofs, idx, ofs, None, 0)
    assert_no_worse_than_torch(out, truth, same)


def test_public_path_and_fused_training(monkeypatch):
    from adrec_fast import functional as F
    from adrec_fast.nn import EmbeddingBagCollection
    from adrec_fast.optim import FusedRowwiseAdagrad

    for be in (["triton", "cuda"] if CUDA_BUILT else ["triton"]):
        monkeypatch.setenv("ADREC_BACKEND", be)
        tofs, idx, ofs = make_bags([40, 9], 6, 5, device="cuda")
        w = torch.randn(49, 16, device="cuda", requires_grad=True)
        out = F.embedding_bag(w, tofs, idx, ofs, None, "mean")
        out.square().sum().backward()
        wd = w.detach().double().requires_grad_(True)
        R.embedding_bag(wd, tofs, idx, ofs, None, 1).square().sum().backward()
        assert_close_verbose(w.grad.to_dense(), wd.grad.float())

        ebc = EmbeddingBagCollection([40, 9], 16, optimizer=FusedRowwiseAdagrad(lr=0.05)).cuda()
        w0 = ebc.weight.detach().clone()
        ebc(idx, ofs).square().sum().backward()
        dense, touched = reference_dense_grad(w0, tofs, idx, ofs, None, 0,
                                              2 * R.embedding_bag(w0, tofs, idx, ofs, None, 0))
        want_w, _ = reference_update(w0, torch.zeros(49), dense, touched, 1, 0.05, 1e-8)
        assert_close_verbose(ebc.weight.detach().cpu(), want_w.float())
    assert ops_eb._backend.backend_for("embedding_bag", "cuda") in ("triton", "cuda")
