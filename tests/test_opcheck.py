# SPDX-License-Identifier: Apache-2.0
"""Contract tests: torch.library.opcheck over every adrec:: op that has a CPU kernel.

opcheck runs the op for real, then checks its schema (mutation and aliasing annotations), its
fake kernel against the real output, its autograd registration and an AOT-dispatch trace. The
op list is read from the dispatcher, so an op added later without sample inputs here fails
``test_every_cpu_op_has_samples`` instead of going unchecked.
"""
from __future__ import annotations

import pytest
import torch

import adrec_fast  # noqa: F401  (registers the ops)


def _emb_inputs(dtype=torch.float64, grad=False):
    """Three tables (5, 3, 4 rows), B=2, D=3: weights [12, 3], table_offsets [4], indices [nnz],
    offsets [7] (one empty bag, one duplicate id)."""
    w = torch.randn(12, 3, dtype=dtype, requires_grad=grad)
    tofs = torch.tensor([0, 5, 8, 12])
    idx = torch.tensor([0, 4, 4, 2, 1, 0, 3, 3])
    ofs = torch.tensor([0, 2, 3, 3, 5, 6, 8])
    return w, tofs, idx, ofs


def _seqs(dtype=torch.float64, grad=False):
    q = torch.randn(3, 4, dtype=dtype, requires_grad=grad)
    k = torch.randn(6, 4, dtype=dtype, requires_grad=grad)
    return q, k, torch.tensor([0, 2, 2, 6])


def _samples(op: str):
    """Lists of (args, kwargs) for the base op name (``_triton`` stripped)."""
    d = torch.float64
    if op == "embedding_bag":
        w, tofs, idx, ofs = _emb_inputs(grad=True)
        psw = torch.rand(8, dtype=d, requires_grad=True)
        return [((w, tofs, idx, ofs, None, 0), {}), ((w, tofs, idx, ofs, psw, 1), {}),
                ((w, tofs, idx.int(), ofs.int(), None, 1), {})]
    if op == "embedding_bag_bwd":
        w, tofs, idx, ofs = _emb_inputs()
        g = torch.randn(2, 9, dtype=d)
        return [((g, w, tofs, idx, ofs, None, 0), {}),
                ((g, w, tofs, idx, ofs, torch.rand(8, dtype=d), 1), {})]
    if op == "embedding_bag_bwd_update":
        w, tofs, idx, ofs = _emb_inputs(torch.float32)
        g = torch.randn(2, 9)
        state = torch.zeros(12)
        return [((g, w, state, tofs, idx, ofs, None, 0, 0, 0.1, 0.0), {}),
                ((g, w.clone(), state.clone(), tofs, idx, ofs, None, 1, 1, 0.1, 1e-8), {})]
    if op == "dropout":
        x = torch.randn(4, 3, 5, dtype=d, requires_grad=True)
        return [((x, 0.3, 17, 0), {}), ((x, 0.0, 5, 2), {}), ((x, 1.0, 5, 0), {})]
    if op == "dropout_":
        x = torch.randn(4, 3, 5, dtype=d)
        return [((x.clone(), 0.3, 17, 0), {}), ((x.clone(), 0.0, 5, 2), {}),
                ((x.clone(), 1.0, 5, 0), {})]
    if op == "fm_interaction":
        return [((torch.randn(4, 3, 5, dtype=d, requires_grad=True),), {})]
    if op == "fm_interaction_bwd":
        return [((torch.randn(4, 1, dtype=d), torch.randn(4, 3, 5, dtype=d)), {})]
    if op == "dot_interaction":
        e = torch.randn(4, 5, 3, dtype=d, requires_grad=True)
        return [((e, False), {}), ((e, True), {})]
    if op == "dot_interaction_bwd":
        e = torch.randn(4, 5, 3, dtype=d)
        return [((torch.randn(4, 10, dtype=d), e, False), {}),
                ((torch.randn(4, 15, dtype=d), e, True), {})]
    if op == "cross_layer":
        return [(tuple(torch.randn(*s, dtype=d, requires_grad=True)
                       for s in [(4, 6), (4, 6), (6, 6), (6,)]), {})]
    if op == "cross_layer_bwd":
        x0, x, xw, g = (torch.randn(4, 6, dtype=d) for _ in range(4))
        return [((g, x0, x, torch.randn(6, 6, dtype=d), xw), {})]
    if op == "cross_layer_bwd_":
        x0, x, xw, g, gx0 = (torch.randn(4, 6, dtype=d) for _ in range(5))
        w = torch.randn(6, 6, dtype=d)
        return [((g.clone(), gx0.clone(), x0, x, w, xw, acc, last), {})
                for acc in (False, True) for last in (False, True)]
    if op == "linear":
        # float64 (ATen); float32 below and from the oneDNN row minimum (32); no bias
        x, w, b = (torch.randn(*s, dtype=d, requires_grad=True) for s in [(4, 6), (5, 6), (5,)])
        xf, wf, bf = (torch.randn(*s, requires_grad=True) for s in [(40, 17), (9, 17), (9,)])
        xs = torch.randn(3, 17, requires_grad=True)
        return [((x, w, b, "none"), {}), ((x, w, None, "relu"), {}),
                ((xs, wf, bf, "relu"), {}), ((xf, wf, bf, "relu"), {}),
                ((xf, wf, None, "none"), {})]
    if op == "linear_bwd":
        x, w, g = torch.randn(4, 6, dtype=d), torch.randn(5, 6, dtype=d), torch.randn(4, 5, dtype=d)
        out = torch.ops.adrec.linear(x, w, None, "relu")
        xf, wf, gf = torch.randn(40, 17), torch.randn(9, 17), torch.randn(40, 9)
        return [((g, x, w, None, "none", [True, True, True]), {}),
                ((g, x, w, out, "relu", [False, True, False]), {}),
                ((gf, xf, wf, torch.ops.adrec.linear(xf, wf, None, "relu"), "relu",
                  [True, True, True]), {})]
    if op == "attention_pooling":
        return [(_seqs(grad=True), {})]
    if op == "attention_pooling_bwd":
        q, k, ofs = _seqs()
        probs = torch.ops.adrec.attention_pooling(q, k, ofs)[1]
        return [((torch.randn(3, 4, dtype=d), q, k, ofs, probs), {})]
    if op == "sigmoid_bce":
        z = torch.randn(7, dtype=d, requires_grad=True)
        y = torch.randint(0, 2, (7,)).to(d)
        return [((z, y, None), {}), ((z, y, torch.rand(7, dtype=d)), {})]
    if op == "score":
        x = torch.randn(5, 3, dtype=d, requires_grad=True)
        w = torch.randn(3, dtype=d, requires_grad=True)
        return [((x, w, torch.randn((), dtype=d, requires_grad=True)), {}),
                ((x, w, torch.randn(1, dtype=d, requires_grad=True)), {})]
    if op == "serving_forward":
        # small specs packed for slot 1 per candidate (N=5): DLRM (fp32 and bf16 layers, fp32
        # and int8 tables), DCN-v2 with a candidate-side dense column, DIN with a history
        from adrec_fast.models.serving_spec import Layer, ServingSpec
        from adrec_fast.serving import pack

        w = torch.randn(10, 4)
        base, card = [0, 4, 7], [4, 3, 3]
        user, cand = torch.tensor([1, 0, 2]), torch.randint(0, 3, (5, 1))
        q = torch.randint(0, 256, (10, 4), dtype=torch.uint8)
        e = torch.zeros(0, dtype=torch.long)
        dlrm = ServingSpec(w, "dot", bottom=[Layer(torch.randn(4, 2), torch.randn(4))],
                           deep=[Layer(torch.randn(6, 10), torch.randn(6))], head=torch.randn(6))
        out = []
        for mlp in (None, "bf16"):
            meta, blob = pack(dlrm, base, card, [], [], 2, [1], (), mlp)
            out += [((meta, blob, w, None, None, user, cand, torch.randn(1, 2), e, e), {}),
                    ((meta, blob, q, torch.rand(10, 2), None, user, cand, torch.randn(1, 2), e,
                      e), {})]
        K = 3 * 4 + 2
        dcn = ServingSpec(w, lin=torch.randn(10), cross=[(torch.randn(K, K), torch.randn(K))],
                          deep=[Layer(torch.randn(5, K), torch.randn(5))], head=torch.randn(5),
                          cross_head=torch.randn(K), bias=0.3)
        meta, blob = pack(dcn, base, card, [], [], 2, [1], (1,))
        out.append(((meta, blob, w.half(), None, torch.randn(10), user, cand, torch.randn(5, 2),
                     e, e), {}))
        din = ServingSpec(w, lin=torch.randn(10), fm=True, sequences=[("h", 1)],
                          deep=[Layer(torch.randn(5, 4 * 4 + 2), torch.randn(5))],
                          head=torch.randn(5))
        meta, blob = pack(din, base, card, [4], [3], 2, [1])
        out.append(((meta, blob, w, None, torch.randn(10), user, cand, torch.randn(1, 2),
                     torch.tensor([0, 2, 1]), torch.tensor([3])), {}))
        return out
    return None


def _cpu_ops() -> list[str]:
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("adrec::"))
    return [
        n.split("::", 1)[1]
        for n in names
        if torch._C._dispatch_has_kernel_for_dispatch_key(n, "CPU")
    ]


CPU_OPS = _cpu_ops()


def test_every_cpu_op_has_samples():
    assert "embedding_bag" in CPU_OPS and "fm_interaction" in CPU_OPS
    missing = [op for op in CPU_OPS if _samples(op.removesuffix("_triton")) is None]
    assert not missing, f"add opcheck sample inputs for {missing}"


# A triton_op is traced through its Triton launcher (not its CPU kernel) by AOT dispatch, which
# needs a Triton driver: on CPU its AOT check runs only where a GPU is (test_opcheck_triton_cuda).
CPU_UTILS_FOR_TRITON = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("op", CPU_OPS)
def test_opcheck(op):
    samples = _samples(op.removesuffix("_triton"))
    if samples is None:
        pytest.skip(f"no samples for {op} (see test_every_cpu_op_has_samples)")
    fn = getattr(torch.ops.adrec, op)
    utils = CPU_UTILS_FOR_TRITON if op.endswith("_triton") else None
    for args, kwargs in samples:
        if utils is None:
            torch.library.opcheck(fn, args, kwargs)
        else:
            torch.library.opcheck(fn, args, kwargs, test_utils=utils)


def _to_cuda(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cuda().requires_grad_(x.requires_grad)
    return x


@pytest.mark.cuda
@pytest.mark.parametrize("op", [op for op in CPU_OPS if op.endswith("_triton")])
def test_opcheck_triton_cuda(op):
    fn = getattr(torch.ops.adrec, op)
    for args, kwargs in _samples(op.removesuffix("_triton")):
        torch.library.opcheck(fn, tuple(_to_cuda(a) for a in args), kwargs)
