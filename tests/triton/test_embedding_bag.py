# SPDX-License-Identifier: Apache-2.0
"""kernels/embedding_bag.py launchers on CPU tensors under TRITON_INTERPRET=1, vs the reference:
forward, backward (unique rows + row grads) and the fused SGD / row-wise Adagrad update."""
from __future__ import annotations

import pytest
import torch

import adrec_fast  # noqa: F401  (sets up adrec_fast.kernels in a source tree)
from adrec_fast import reference as R

from ..conftest import assert_close_verbose, assert_no_worse_than_torch
from ._inputs import make_bags, reference_dense_grad, reference_update

k = pytest.importorskip("adrec_fast.kernels.embedding_bag")
pytestmark = pytest.mark.triton

CASES = [  # (rows per table, B, max bag length, D, index dtype, duplicates)
    ([5], 1, 3, 17, torch.int64, False),  # B=1, odd D
    ([7, 3, 11], 5, 4, 17, torch.int32, False),  # empty bags (min length 0)
    ([6, 4], 4, 6, 8, torch.int64, True),  # many duplicate ids
]


@pytest.mark.parametrize("pooling", [0, 1], ids=["sum", "mean"])
@pytest.mark.parametrize("psw", [False, True], ids=["nopsw", "psw"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_backward_update(case, pooling, psw):
    rows, B, max_len, D, index_dtype, dup = case
    tofs, idx, ofs = make_bags(rows, B, max_len, index_dtype, dup=dup)
    N = sum(rows)
    w = torch.randn(N, D)
    p = torch.rand(idx.numel()) if psw else None

    out = k.embedding_bag_fwd(w, tofs, idx, ofs, p, pooling)
    truth = R.embedding_bag(w.double(), tofs, idx, ofs, p.double() if psw else None, pooling)
    assert_close_verbose(out, truth.float())

    g = torch.randn_like(out)
    dense, touched = reference_dense_grad(w, tofs, idx, ofs, p, pooling, g)
    rows_u, rg = k.embedding_bag_bwd(g, w, tofs, idx, ofs, p, pooling)
    assert torch.equal(rows_u, touched.nonzero().flatten())  # ascending, touched rows only
    assert_close_verbose(rg, dense[rows_u].float())

    for optimizer in (0, 1):
        w1, s1 = w.clone(), torch.rand(N)
        want_w, want_s = reference_update(w1, s1, dense, touched, optimizer, 0.1, 1e-8)
        k.embedding_bag_bwd_update(g, w1, s1, tofs, idx, ofs, p, pooling, optimizer, 0.1, 1e-8)
        assert_close_verbose(w1, want_w.float())
        assert_close_verbose(s1, want_s.float())


def test_literal_example():
    # Two tables (rows 0-1 and 2-4), B=2, D=2; bag (1, 1) is empty.
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 20.0], [30.0, 40.0], [50.0, 60.0]])
    tofs = torch.tensor([0, 2, 5])
    idx = torch.tensor([0, 1, 1, 2, 2])
    ofs = torch.tensor([0, 2, 3, 5, 5])
    out = k.embedding_bag_fwd(w, tofs, idx, ofs, None, 0)
    assert out.tolist() == [[4.0, 6.0, 100.0, 120.0], [3.0, 4.0, 0.0, 0.0]]
    rows, rg = k.embedding_bag_bwd(torch.ones(2, 4), w, tofs, idx, ofs, None, 0)
    assert rows.tolist() == [0, 1, 4] and rg.tolist() == [[1, 1], [2, 2], [2, 2]]


def test_bad_inputs_raise():
    tofs, idx, ofs = make_bags([4, 5], 3, 3, min_len=1)
    w = torch.randn(9, 4)
    bad = idx.clone()
    bad[-1] = 5  # table 1 has 5 rows
    with pytest.raises(IndexError, match=r"out of range for table 1 \(5 rows"):
        k.embedding_bag_fwd(w, tofs, bad, ofs)
    s = torch.zeros(9)
    w0 = w.clone()
    with pytest.raises(IndexError, match="table 1"):
        k.embedding_bag_bwd_update(torch.ones(3, 8), w, s, tofs, bad, ofs, None, 0, 1, 0.1, 1e-8)
    assert torch.equal(w, w0) and not s.any()  # a bad batch leaves the model as it was
    short = ofs.clone()
    short[-1] -= 1
    with pytest.raises(ValueError, match="offsets"):
        k.embedding_bag_fwd(w, tofs, idx, short)


def test_empty_batch_and_deterministic():
    w = torch.randn(6, 5)
    tofs = torch.tensor([0, 6])
    out = k.embedding_bag_fwd(w, tofs, torch.zeros(0, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    assert out.shape == (0, 5)
    tofs, idx, ofs = make_bags([6], 7, 8, dup=True)
    g = torch.randn(7, 5)
    a = k.embedding_bag_bwd(g, w, tofs, idx, ofs)[1]
    b = k.embedding_bag_bwd(g, w, tofs, idx, ofs)[1]
    assert torch.equal(a, b)


def test_half_forward():
    tofs, idx, ofs = make_bags([9, 4], 3, 4)
    w = torch.randn(13, 16, dtype=torch.float16)
    out = k.embedding_bag_fwd(w, tofs, idx, ofs, None, 1)
    truth = R.embedding_bag(w.double(), tofs, idx, ofs, None, 1)
    same = R.embedding_bag(w.float(), tofs, idx, ofs, None, 1).half()
    assert_no_worse_than_torch(out, truth, same)
