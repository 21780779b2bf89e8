# SPDX-License-Identifier: Apache-2.0
"""embedding_bag: C++ CPU kernels vs the reference (forward, sparse backward, fused updates)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import adrec_fast
from adrec_fast import functional as F
from adrec_fast import reference as R
from adrec_fast.nn import EmbeddingBagCollection
from adrec_fast.optim import FusedRowwiseAdagrad, FusedSGD

from ..conftest import assert_close_verbose, rerun_in_child

# rerun_in_child(..., ADREC_TEST_TUNING="name=value,...") lowers the kernels' thresholds in the
# child (adrec_fast._C._set_tuning), so that small inputs reach the paths they guard.
if os.environ.get("ADREC_TEST_TUNING"):
    adrec_fast._C._set_tuning(**{k: int(v) for k, v in (
        kv.split("=") for kv in os.environ["ADREC_TEST_TUNING"].split(","))})


def make_bags(rows, B, max_len, index_dtype=torch.int64, min_len=0, dup=False):
    """Random TBE inputs: table_offsets [T+1], indices [nnz], offsets [T*B+1]."""
    T = len(rows)
    tofs = torch.tensor([0] + list(torch.tensor(rows).cumsum(0).tolist()), dtype=torch.long)
    lengths = torch.randint(min_len, max_len + 1, (T * B,))
    idx = []
    for t in range(T):
        n = int(lengths[t * B : (t + 1) * B].sum())
        hi = rows[t] if not dup else min(rows[t], 3)  # few distinct ids -> many duplicates
        ids = torch.randint(0, hi, (n,))
        if n > 0:
            ids[torch.randint(0, n, (1,))] = rows[t] - 1  # the largest valid id
        idx.append(ids)
    indices = torch.cat(idx).to(index_dtype)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(index_dtype)
    return tofs, indices, offsets


SHAPES = [  # (rows per table, B, max bag length, D)
    ([1], 1, 1, 1),
    ([5], 1, 3, 17),
    ([7, 3, 11], 5, 4, 17),
    ([50, 20, 1, 33], 8, 6, 16),
    ([100] * 26, 16, 3, 64),
    ([40, 9], 6, 20, 33),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("pooling", ["sum", "mean"])
@pytest.mark.parametrize("psw", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward_matches_reference(dtype, index_dtype, pooling, psw, shape):
    rows, B, max_len, D = shape
    tofs, indices, offsets = make_bags(rows, B, max_len, index_dtype)
    w = torch.randn(sum(rows), D, dtype=dtype, requires_grad=True)
    w_ref = w.detach().clone().requires_grad_(True)
    p = torch.rand(indices.numel(), dtype=dtype, requires_grad=True) if psw else None
    p_ref = p.detach().clone().requires_grad_(True) if psw else None

    out = F.embedding_bag(w, tofs, indices, offsets, p, pooling)
    ref = R.embedding_bag(w_ref, tofs, indices, offsets, p_ref, pooling)
    assert out.shape == (B, len(rows) * D)
    assert_close_verbose(out, ref)

    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    assert w.grad.is_sparse
    # Only touched rows appear, each once.
    rows_touched = w.grad._indices()[0]
    assert rows_touched.unique().numel() == rows_touched.numel()
    assert_close_verbose(w.grad.to_dense(), w_ref.grad)
    if psw:
        assert_close_verbose(p.grad, p_ref.grad)


def test_literal_example():
    # Two tables: t0 rows 0..2, t1 rows 3..4 of one buffer. B=2.
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [10.0, 20.0], [30.0, 40.0]])
    tofs = torch.tensor([0, 3, 5])
    # bags: (t0,b0)=[0,2] (t0,b1)=[] (t1,b0)=[1] (t1,b1)=[0,1,1]
    indices = torch.tensor([0, 2, 1, 0, 1, 1])
    offsets = torch.tensor([0, 2, 2, 3, 6])
    out = F.embedding_bag(w, tofs, indices, offsets)
    expected = torch.tensor([[6.0, 8.0, 30.0, 40.0], [0.0, 0.0, 70.0, 100.0]])
    torch.testing.assert_close(out, expected)
    out_mean = F.embedding_bag(w, tofs, indices, offsets, pooling="mean")
    expected_mean = torch.tensor([[3.0, 4.0, 30.0, 40.0], [0.0, 0.0, 70 / 3, 100 / 3]])
    torch.testing.assert_close(out_mean, expected_mean)


def test_empty_batch_and_empty_bags():
    w = torch.randn(10, 4)
    tofs = torch.tensor([0, 4, 10])
    out = F.embedding_bag(w, tofs, torch.zeros(0, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    assert out.shape == (0, 8)
    offsets = torch.zeros(2 * 3 + 1, dtype=torch.long)  # B=3, every bag empty
    out = F.embedding_bag(w, tofs, torch.zeros(0, dtype=torch.long), offsets, pooling="mean")
    assert out.shape == (3, 8) and bool((out == 0).all())


def test_non_contiguous_inputs():
    rows, B, D = [13, 7], 4, 9
    tofs, indices, offsets = make_bags(rows, B, 5)
    big = torch.randn(sum(rows), 2 * D)
    w = big[:, ::2]  # non-contiguous [N, D]
    assert not w.is_contiguous()
    idx2 = torch.stack([indices, indices], 1)[:, 0]  # strided indices
    assert not idx2.is_contiguous()
    out = F.embedding_bag(w, tofs, idx2, offsets)
    torch.testing.assert_close(out, R.embedding_bag(w.contiguous(), tofs, indices, offsets))


class _Densify(torch.autograd.Function):
    """Identity whose backward densifies a sparse gradient (gradcheck wants strided grads)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.to_dense() if g.is_sparse else g


def test_gradcheck_float64():
    rows, B, D = [4, 3], 3, 3
    tofs, indices, offsets = make_bags(rows, B, 3, min_len=1)
    w = torch.randn(sum(rows), D, dtype=torch.float64, requires_grad=True)
    p = torch.rand(indices.numel(), dtype=torch.float64, requires_grad=True)
    for pooling in ("sum", "mean"):
        # The weight gradient is sparse: compare it densified through a dense-input wrapper.
        def fn(w_, p_):
            return F.embedding_bag(_Densify.apply(w_), tofs, indices, offsets, p_, pooling)

        assert torch.autograd.gradcheck(fn, (w, p))


def _step_reference(w0, state0, tofs, indices, offsets, psw, pooling, g, opt, lr, eps):
    w = w0.clone().requires_grad_(True)
    out = R.embedding_bag(w, tofs, indices, offsets, psw, pooling)
    out.backward(g)
    grad = w.grad
    if opt == "sgd":
        return R.sgd_update(w0, grad, lr), state0
    rows, _ = adrec_fast.ops.embedding_bag._global_rows(tofs, indices, offsets.long())
    touched = torch.zeros(w0.size(0), dtype=torch.bool)
    touched[rows] = True
    return R.rowwise_adagrad_update(w0, state0, grad, touched, lr, eps)


@pytest.mark.parametrize("opt", ["sgd", "rowwise_adagrad"])
@pytest.mark.parametrize("pooling", ["sum", "mean"])
@pytest.mark.parametrize("psw", [False, True])
@pytest.mark.parametrize("dup", [False, True])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_fused_update_matches_reference(opt, pooling, psw, dup, index_dtype):
    rows, B, D = [30, 5, 17], 9, 16
    tofs, indices, offsets = make_bags(rows, B, 6, index_dtype, dup=dup)
    w0 = torch.randn(sum(rows), D)
    state0 = torch.rand(sum(rows)) if opt == "rowwise_adagrad" else torch.zeros(0)
    p = torch.rand(indices.numel()) if psw else None
    g = torch.randn(B, len(rows) * D)
    lr, eps = 0.1, 1e-8
    w, state = w0.clone(), state0.clone()
    code = adrec_fast.ops.embedding_bag.OPTIMIZERS[opt]
    torch.ops.adrec.embedding_bag_bwd_update(
        g, w, state, tofs, indices, offsets, p, 1 if pooling == "mean" else 0, code, lr, eps
    )
    w_ref, state_ref = _step_reference(w0, state0.clone(), tofs, indices, offsets, p, pooling, g, opt, lr, eps)
    assert_close_verbose(w, w_ref)
    if opt == "rowwise_adagrad":
        assert_close_verbose(state, state_ref)


@pytest.mark.parametrize("opt_cls", [FusedSGD, FusedRowwiseAdagrad])
def test_module_fused_training_step(opt_cls):
    ebc = EmbeddingBagCollection([20, 7, 40], 8, optimizer=opt_cls(lr=0.5))
    assert not ebc.weight.requires_grad
    assert list(ebc.parameters()) == []
    tofs, indices, offsets = make_bags([20, 7, 40], 5, 4, min_len=1)
    w0 = ebc.weight.clone()
    out = ebc(indices, offsets)
    (out * torch.randn_like(out)).sum().backward()
    changed = (ebc.weight != w0).any(dim=1)
    rows, _ = adrec_fast.ops.embedding_bag._global_rows(tofs, indices, offsets)
    touched = torch.zeros_like(changed)
    touched[rows] = True
    assert bool(changed[~touched].logical_not().all()), "an untouched row changed"
    assert bool(changed[touched].any())
    if opt_cls is FusedRowwiseAdagrad:
        assert ebc.state.shape == (67,)
        assert bool((ebc.state[touched] > 0).all()) and bool((ebc.state[~touched] == 0).all())
    # eval mode / no_grad never update
    ebc.eval()
    w1 = ebc.weight.clone()
    out = ebc(indices, offsets)
    assert not out.requires_grad
    torch.testing.assert_close(ebc.weight, w1)


def test_module_sparse_grad_with_torch_optimizer():
    ebc = EmbeddingBagCollection([10, 10], 4)
    opt = torch.optim.SGD(ebc.parameters(), lr=0.1)
    tofs, indices, offsets = make_bags([10, 10], 3, 3, min_len=1)
    w0 = ebc.weight.detach().clone()
    ebc(indices, offsets).sum().backward()
    assert ebc.weight.grad.is_sparse
    opt.step()
    assert not torch.equal(ebc.weight.detach(), w0)


_WIDE_ROWS_CHILD = """
import sys, torch, adrec_fast
adrec_fast._C._set_tuning(direct_min_bytes=int(sys.argv[3]))
torch.manual_seed(int(sys.argv[1]))
rows, B, D = [5000, 3000, 40], 64, 64
T = len(rows)
lengths = torch.randint(3, 9, (T * B,))
lengths[5] = 0  # an empty bag
segs = []
for t, r in enumerate(rows):
    n = int(lengths[t * B:(t + 1) * B].sum())
    if r >= n:  # distinct ids, then 5 planted repeats (under 5% of the >= 189 ids)
        ids = torch.randperm(r)[:n]
        src, dst = torch.randperm(n)[:10].chunk(2)
        ids[dst] = ids[src]
    else:  # the 40-row table: mostly repeats
        ids = torch.randint(0, r, (n,))
    ids[-1] = r - 1  # the largest valid id
    segs.append(ids)
idx = torch.cat(segs)
offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
tofs = torch.tensor([0] + torch.tensor(rows).cumsum(0).tolist())
w0 = torch.randn(sum(rows), D)
state0 = torch.rand(sum(rows))
g = torch.randn(B, T * D)
psw = torch.rand(idx.numel())
out = {"tofs": tofs, "idx": idx, "offsets": offsets, "w0": w0, "state0": state0, "g": g, "psw": psw}
for opt in (0, 1):
    for pooling in (0, 1):
        for use_psw in (False, True):
            for it in (torch.int32, torch.int64):
                w, st = w0.clone(), state0.clone()
                torch.ops.adrec.embedding_bag_bwd_update(g, w, st, tofs, idx.to(it), offsets.to(it),
                                                         psw if use_psw else None, pooling, opt, 0.1, 1e-8)
                out[f"w{opt}{pooling}{int(use_psw)}{it}"] = w
                out[f"s{opt}{pooling}{int(use_psw)}{it}"] = st
torch.save(out, sys.argv[2])
"""


def test_fused_update_wide_rows_direct_path(tmp_path):
    """D >= 64 tables with long segments of mostly non-repeating ids update their rows that
    occur once straight from grad_out (fused_table_direct_f32). Force that path on small tables
    (direct_min_bytes=1 through _C._set_tuning, in a child), with some repeated rows in
    the large tables and many in the small one, and check it against the reference optimizer
    and against the buffered path (the default at this size): equal to float32 rounding, and
    bit for bit without per-sample weights (with them, FMA contraction may differ by an ulp)."""
    seed = int(torch.randint(0, 1 << 30, (1,)))
    outs = {}
    for name, env_min in (("direct", "1"), ("buffered", "0")):
        path = tmp_path / f"{name}.pt"
        res = subprocess.run([sys.executable, "-c", _WIDE_ROWS_CHILD, str(seed), str(path), env_min],
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        outs[name] = torch.load(path)
    d, b = outs["direct"], outs["buffered"]
    # The large tables' ids repeat (a few per cent), so the direct path's buffer is exercised.
    seg = d["idx"][d["offsets"][0]:d["offsets"][64]]
    assert 0 < seg.numel() - seg.unique().numel() < 0.05 * seg.numel()
    for key in d:
        if key[0] in "ws" and key[1:4].isdigit() and len(key) > 4:  # the results
            if key[3] == "0":  # no per-sample weights
                assert torch.equal(d[key], b[key]), key
            else:
                assert_close_verbose(d[key], b[key], rtol=1e-6, atol=1e-6)
    for opt, name in ((0, "sgd"), (1, "rowwise_adagrad")):
        for pooling in (0, 1):
            for use_psw in (0, 1):
                state0 = d["state0"].clone() if opt == 1 else torch.zeros(0)
                w_ref, s_ref = _step_reference(
                    d["w0"], state0, d["tofs"], d["idx"], d["offsets"], d["psw"] if use_psw else None,
                    "mean" if pooling else "sum", d["g"], name, 0.1, 1e-8)
                key = f"{opt}{pooling}{use_psw}{torch.int64}"
                assert_close_verbose(d["w" + key], w_ref)
                if opt == 1:
                    assert_close_verbose(d["s" + key], s_ref)


def test_fused_update_is_deterministic_across_thread_counts():
    rows, B, D = [1000] * 4, 512, 16
    tofs, indices, offsets = make_bags(rows, B, 20, dup=True)
    g = torch.randn(B, len(rows) * D)
    results = []
    prev = torch.get_num_threads()
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            w = torch.zeros(sum(rows), D)
            state = torch.zeros(sum(rows))
            torch.ops.adrec.embedding_bag_bwd_update(g, w, state, tofs, indices, offsets, None, 0, 1, 0.1, 1e-8)
            rws, grads = torch.ops.adrec.embedding_bag_bwd(g, w, tofs, indices, offsets, None, 0)
            results.append((w, state, rws, grads))
    finally:
        torch.set_num_threads(prev)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# ---- bad input -------------------------------------------------------------------------------

def _valid():
    w = torch.randn(10, 4)
    tofs = torch.tensor([0, 4, 10])
    indices = torch.tensor([0, 3, 5, 1])
    offsets = torch.tensor([0, 1, 2, 3, 4])  # T=2, B=2
    return w, tofs, indices, offsets


def test_out_of_range_id_raises_index_error_naming_table_and_position():
    w, tofs, indices, offsets = _valid()
    bad = indices.clone()
    bad[2] = 6  # table 1 has 6 rows: 6 is one past the end
    with pytest.raises(IndexError, match=r"indices\[2\]=6 .*table 1 \(6 rows"):
        F.embedding_bag(w, tofs, bad, offsets)
    bad[2] = -1
    with pytest.raises(IndexError, match=r"indices\[2\]=-1"):
        F.embedding_bag(w, tofs, bad, offsets)
    bad = indices.clone()
    bad[1] = 4  # table 0 has 4 rows
    w_big = w.clone().requires_grad_(True)
    with pytest.raises(IndexError, match=r"indices\[1\]=4 .*table 0"):
        torch.ops.adrec.embedding_bag_bwd(torch.ones(2, 8), w_big, tofs, bad, offsets, None, 0)
    state = torch.zeros(10)
    w_copy = w.clone()
    with pytest.raises(IndexError, match="table 0"):
        torch.ops.adrec.embedding_bag_bwd_update(torch.ones(2, 8), w_copy, state, tofs, bad, offsets, None, 0, 1, 0.1, 1e-8)
    assert torch.equal(w_copy, w) and bool((state == 0).all()), "a rejected batch changed the model"


@pytest.mark.parametrize(
    "offsets,match",
    [
        (torch.tensor([0, 2, 1, 3, 4]), "non-decreasing"),
        (torch.tensor([0, 1, 2, 4]), "length 4, expected T\\*B\\+1"),
        (torch.tensor([0, 1, 2, 3, 3]), r"offsets\[-1\]=3 must equal len\(indices\)=4"),
        (torch.tensor([1, 1, 2, 3, 4]), r"offsets\[0\] must be 0"),
    ],
)
def test_malformed_offsets_raise_value_error(offsets, match):
    w, tofs, indices, _ = _valid()
    with pytest.raises(ValueError, match=match):
        F.embedding_bag(w, tofs, indices, offsets)


def test_wrong_dtype_shape_and_arguments_are_named():
    w, tofs, indices, offsets = _valid()
    with pytest.raises(TypeError, match="indices must be int32 or int64"):
        F.embedding_bag(w, tofs, indices.float(), offsets)
    with pytest.raises(TypeError, match="weights must be a floating tensor"):
        F.embedding_bag(w.long(), tofs, indices, offsets)
    with pytest.raises(ValueError, match="weights must be 2-D"):
        F.embedding_bag(w[0], tofs, indices, offsets)
    with pytest.raises(ValueError, match=r"table_offsets\[-1\]=9 must equal weights.size\(0\)=10"):
        F.embedding_bag(w, torch.tensor([0, 4, 9]), indices, offsets)
    with pytest.raises(ValueError, match="per_sample_weights has 3 entries"):
        F.embedding_bag(w, tofs, indices, offsets, torch.ones(3))
    with pytest.raises(TypeError, match="per_sample_weights has dtype"):
        F.embedding_bag(w, tofs, indices, offsets, torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="pooling must be 'sum' or 'mean'"):
        F.embedding_bag(w, tofs, indices, offsets, pooling="max")
    with pytest.raises(ValueError, match=r"grad_out has shape"):
        torch.ops.adrec.embedding_bag_bwd(torch.ones(3, 8), w, tofs, indices, offsets, None, 0)


def test_bad_inputs_do_not_crash_the_process():
    """Run the bad inputs in a child process: a segfault there would be a failure here."""
    code = textwrap.dedent(
        """
        import torch, adrec_fast
        from adrec_fast import functional as F
        w = torch.randn(10, 4); tofs = torch.tensor([0, 4, 10])
        cases = [
            (torch.tensor([0, 3, 5, 1 << 40]), torch.tensor([0, 1, 2, 3, 4])),
            (torch.tensor([0, 3, 5, -(1 << 40)]), torch.tensor([0, 1, 2, 3, 4])),
            (torch.tensor([0, 3, 5, 1]), torch.tensor([0, 1, 2, 3, 1 << 40])),
            (torch.tensor([0, 3, 5, 1]), torch.tensor([0, -5, 2, 3, 4])),
            (torch.tensor([0, 3, 5, 1], dtype=torch.int32), torch.tensor([0, 1, 2, 3, 4], dtype=torch.int32)),
        ]
        n_err = 0
        for idx, off in cases:
            try:
                F.embedding_bag(w, tofs, idx, off)
            except (IndexError, ValueError):
                n_err += 1
        print("errors", n_err)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "errors 4" in res.stdout


def test_int32_overflow_row_offsets():
    """N_total * D > 2^31: row * D must be computed in 64 bits. The 8.6 GB table is reserved,
    not written (torch.empty): only the page of the row that is set and looked up is touched."""
    n = (1 << 31) // 2 + 7
    try:
        w = torch.empty(n, 2)
    except RuntimeError as e:  # a machine that cannot reserve 8.6 GB of address space
        pytest.skip(f"cannot reserve a {n} x 2 float32 table: {e}")
    w[-1] = torch.tensor([3.0, 4.0])
    tofs = torch.tensor([0, n])
    out = F.embedding_bag(w, tofs, torch.tensor([n - 1], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32))
    torch.testing.assert_close(out, torch.tensor([[3.0, 4.0]]))


def test_baseline_isa_path_matches_reference():
    """The float32 kernels are built for the baseline and AVX2 (isa_dispatch, chosen at run time):
    run the forward, backward and fused-update comparisons again with the baseline forced."""
    rerun_in_child(__file__, "matches_reference and not baseline and (float32 or sgd or adagrad)",
                   ADREC_CPU_ISA="base")


@pytest.mark.parametrize("isa", ["default", "base"])
def test_streaming_store_path_matches_reference(isa):
    """Large forward outputs are written with streaming stores (stream_out_bytes): force them on
    for every output (D = 16 and 64 qualify; 17, 33 do not) and rerun the float32 forward
    comparisons, with the default and the baseline ISA (read once per process: in a child)."""
    env = {"ADREC_TEST_TUNING": "stream_out_bytes=1",
           **({"ADREC_CPU_ISA": "base"} if isa == "base" else {})}
    rerun_in_child(__file__, "(matches_reference and not baseline and not streaming and float32)"
                             " or one_index_per_bag or literal or empty_batch or out_of_range", **env)


def test_concurrent_calls_from_python_threads():
    """Calls from several threads share one work pool; a call that finds it busy runs on its own
    thread. Every result must still equal the reference."""
    import concurrent.futures

    rows, B, D = [300, 40, 1000], 64, 16
    jobs = []
    for _ in range(24):
        tofs, indices, offsets = make_bags(rows, B, 8)
        jobs.append((tofs, indices, offsets))
    w = torch.randn(sum(rows), D)
    expected = [R.embedding_bag(w, *j) for j in jobs]
    g = torch.randn(B, len(rows) * D)

    def work(i):
        out = F.embedding_bag(w, *jobs[i])
        rws, grads = torch.ops.adrec.embedding_bag_bwd(g, w, *jobs[i], None, 0)
        return out, rws, grads

    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        results = list(ex.map(work, range(len(jobs))))
    for (out, rws, grads), exp, job in zip(results, expected, jobs):
        torch.testing.assert_close(out, exp)
        rws1, grads1 = torch.ops.adrec.embedding_bag_bwd(g, w, *job, None, 0)
        assert torch.equal(rws, rws1) and torch.equal(grads, grads1)


_POOL_CHILD = r"""
import random, sys, time, concurrent.futures
import torch
from adrec_fast import _C, functional as F, reference as R
_C._set_tuning(pool_spin_us=int(sys.argv[2]))
torch.set_num_threads(2)
gen = torch.Generator().manual_seed(int(sys.argv[1]))
rows, D = [300, 40, 1000, 7], 16
tofs = torch.tensor([0] + torch.tensor(rows).cumsum(0).tolist())
w = torch.randn(sum(rows), D, generator=gen)
jobs = []
for B in (600, 1500, 257, 3000):  # several tiles each: the forward runs on the work pool
    lengths = torch.randint(0, 4, (len(rows) * B,), generator=gen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    t_of = torch.arange(len(rows)).repeat_interleave(B).repeat_interleave(lengths)
    indices = (torch.rand(int(offsets[-1]), generator=gen) * torch.tensor(rows)[t_of]).long()
    jobs.append((indices, offsets, R.embedding_bag(w, tofs, indices, offsets)))
rnd = random.Random(int(sys.argv[1]))
def call(k):
    idx, offs, exp = jobs[k % len(jobs)]
    out = F.embedding_bag(w, tofs, idx, offs)
    assert torch.allclose(out, exp, rtol=1e-5, atol=1e-5), k
for k in range(400):  # back to back, and with gaps around the workers' polling time
    call(k)
    if rnd.random() < 0.3:
        time.sleep(rnd.choice([20e-6, 150e-6, 2e-3]))
with concurrent.futures.ThreadPoolExecutor(3) as ex:
    list(ex.map(call, range(200)))
print("ok")
"""


@pytest.mark.parametrize("spin_us", ["0", "100", "100000"])
def test_work_pool_back_to_back_and_sleeping_calls(spin_us):
    """The kernels' work pool: idle workers poll for the next job for pool_spin_us microseconds,
    then sleep. Hundreds of calls back to back, with gaps shorter and longer than the polling
    time, and from several Python threads, must all equal the reference (in a child: a lost
    wake-up would hang, not crash)."""
    res = subprocess.run([sys.executable, "-c", _POOL_CHILD, "5", spin_us], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.mark.parametrize("D", [8, 16, 64])
@pytest.mark.parametrize("pooling", ["sum", "mean"])
@pytest.mark.parametrize("psw", [False, True])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_one_index_per_bag_path_matches_reference(D, pooling, psw, index_dtype):
    """Every bag of length 1 (offsets == arange) takes a kernel that never reads the offsets;
    B = 300 spans more than one tile of samples."""
    rows, B = [7, 1, 50, 300], 300
    T = len(rows)
    tofs = torch.tensor([0] + torch.tensor(rows).cumsum(0).tolist())
    indices = torch.cat([torch.randint(0, r, (B,)) for r in rows])
    indices[torch.randint(0, B, (1,))] = rows[0] - 1
    indices[2 * B + torch.randint(0, B, (1,))] = rows[2] - 1
    indices = indices.to(index_dtype)
    offsets = torch.arange(T * B + 1).to(index_dtype)
    w = torch.randn(sum(rows), D)
    p = torch.rand(T * B) if psw else None
    out = F.embedding_bag(w, tofs, indices, offsets, p, pooling)
    assert_close_verbose(out, R.embedding_bag(w, tofs, indices, offsets, p, pooling))
    bad = indices.clone()
    bad[3 * B + 17] = rows[3]
    with pytest.raises(IndexError, match=rf"indices\[{3 * B + 17}\]={rows[3]} .*table 3 \(300 rows, sample 17"):
        F.embedding_bag(w, tofs, bad, offsets, p, pooling)


def test_large_tables_are_advised_onto_huge_pages(monkeypatch):
    import types

    from adrec_fast import _C, _memory

    calls = []
    fake = types.SimpleNamespace(advise_huge_pages=lambda a, n: calls.append((a, n)) or True)
    monkeypatch.setattr(_memory, "_C", fake)
    e = EmbeddingBagCollection([300_000, 10], 16, optimizer=FusedRowwiseAdagrad(0.1))
    assert (e.weight.data_ptr(), e.weight.numel() * 4) in calls
    assert e.weight.std().item() > 0 and bool((e.state == 0).all())
    calls.clear()
    EmbeddingBagCollection([1000], 16)  # 64 KB: not worth it
    assert calls == []
    monkeypatch.setenv("ADREC_HUGE_PAGES", "0")
    EmbeddingBagCollection([300_000], 16)
    assert calls == []
    # The real call: True where THP is available in madvise/always mode, never an error.
    t = torch.empty(4 << 20)
    assert _C.advise_huge_pages(t.data_ptr(), t.numel() * 4) in (True, False)
    assert _C.advise_huge_pages(t.data_ptr(), 100) is False  # no whole 2 MiB page inside


@pytest.mark.parametrize("D", [16, 17, 64], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("B", [1, 9])
def test_fused_update_reads_strided_grad_rows(D, B):
    """grad_out as the first T*D columns of a wider gradient (rows further apart than T*D, as
    DCN-v2's x0 hands it over) or a transposed view: the update equals the one from the same
    values in a contiguous tensor, bit for bit, and the wide gradient is not written."""
    rows = [30, 5, 17]
    tofs, indices, offsets = make_bags(rows, B, 6, dup=True)
    w0 = torch.randn(sum(rows), D)
    state0 = torch.rand(sum(rows))
    wide = torch.randn(B, len(rows) * D + 5)
    sliced = wide[:, : len(rows) * D]
    transposed = wide[:, : len(rows) * D].t().contiguous().t()
    assert B == 1 or not (sliced.is_contiguous() or transposed.is_contiguous())
    keep = wide.clone()
    results = []
    for g in (sliced.contiguous(), sliced, transposed):
        w, state = w0.clone(), state0.clone()
        torch.ops.adrec.embedding_bag_bwd_update(g, w, state, tofs, indices, offsets, None, 0, 1,
                                                 0.1, 1e-8)
        results.append((w, state))
    for w, state in results[1:]:
        assert torch.equal(w, results[0][0]) and torch.equal(state, results[0][1])
    assert not torch.equal(results[0][0], w0)
    assert torch.equal(wide, keep)
