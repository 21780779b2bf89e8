# SPDX-License-Identifier: Apache-2.0
"""Pooled multi-table embedding lookup: forward, and the training step (forward + backward +
optimizer update), adrec_fast against its peers in one run (issue 2 §4, STYLE.md §6).

Run (about 10-15 min on 2 cores; ``ADREC_BENCH_QUICK=1`` for a 2-shape smoke run)::

    python -m pytest bench/bench_embedding_bag.py --benchmark-only \
        --benchmark-json=bench/results_embedding_bag.json
    python bench/report.py bench/results_embedding_bag.json

Providers (``backend``):

- ``row_gather``: torch.index_select of the benchmark's own rows (same ids, same table) into a
  small reused buffer: the row-gather bandwidth the lookups are compared with.
- ``adrec``: adrec_fast's C++ kernel (``functional.embedding_bag``; training through
  ``nn.EmbeddingBagCollection(optimizer=FusedSGD | FusedRowwiseAdagrad)``).
- ``nn_embedding_bag_loop``: 26 ``torch.nn.EmbeddingBag(mode="sum", sparse=True)``, outputs
  concatenated; torch.optim.SGD / torch.optim.Adagrad (element-wise Adagrad, NOT row-wise).
- ``nn_embedding_bag_concat``: one ``nn.EmbeddingBag`` over all 5.57M rows with global ids,
  bags ordered sample-major (prepared outside the timing) so its output is already [B, T*D].
- ``fbgemm_tbe``: fbgemm_gpu's ``SplitTableBatchedEmbeddingBagsCodegen`` on the CPU
  (EmbeddingLocation.HOST, ComputeDevice.CPU, default bounds check) with its fused
  EXACT_SGD / EXACT_ROWWISE_ADAGRAD.
- ``torchrec_ebc``: torchrec ``EmbeddingBagCollection`` (per-table nn.EmbeddingBag with dense
  gradients; trained with torch.optim.SGD, the only training case it gets: dense grads of
  5.57M x D per step make it slow).
- ``torchrec_fused_ebc``: torchrec ``FusedEmbeddingBagCollection`` (fbgemm TBE underneath) with
  torch.optim.SGD / torchrec.optim.RowWiseAdagrad.

Every provider's first call is checked against ``adrec_fast.reference.embedding_bag`` on the same
inputs and initial weights; the first training step's touched rows are checked against the
reference gradient pushed through the optimizer's formula. Peers that fail to import are skipped
with the reason.
"""
from __future__ import annotations

import gc
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest
import torch
from torch import nn

from peers import import_fbgemm, import_torchrec, optional
from shapes import QUICK, EmbInputs, EmbShape, emb_shapes, make_grad_out, make_inputs, make_weights

import adrec_fast
from adrec_fast import reference
from adrec_fast import functional as AF
from adrec_fast._memory import empty_table
from adrec_fast.optim import FusedRowwiseAdagrad, FusedSGD

LR = 0.01
EPS = 1e-8

# ------------------------------------------------------------------------------------------
# Optional peers


FBGEMM, FBGEMM_WHY = optional(import_fbgemm)
TORCHREC, TORCHREC_WHY = optional(import_torchrec)


def _need(provider: str):
    if provider in ("fbgemm_tbe",) and FBGEMM is None:
        pytest.skip(f"fbgemm_gpu unavailable: {FBGEMM_WHY}")
    if provider.startswith("torchrec") and TORCHREC is None:
        pytest.skip(f"torchrec unavailable: {TORCHREC_WHY}")


# ------------------------------------------------------------------------------------------
# Weight buffers. A fresh 1.4 GB allocation page-faults for seconds on this VM, so the big
# [N_total, D] tables are drawn from a small pool of already-touched buffers (setup time only).

_POOL: dict[tuple[tuple[int, int], bool], list[torch.Tensor]] = {}
_OWNER: dict[int, bool] = {}  # id(buffer) -> allocated with adrec's memory


def _take(w0: torch.Tensor, adrec_memory: bool = False) -> torch.Tensor:
    """A copy of w0 for one provider to train. ``adrec_memory``: allocated the way
    ``EmbeddingBagCollection`` allocates its weight (``adrec_fast._memory.empty_table``: huge
    pages for large tables), so the adrec module is timed with the memory it gives a user; the
    peers get torch's default allocation, as their own modules do."""
    key = (tuple(w0.shape), adrec_memory)
    bufs = _POOL.setdefault(key, [])
    if bufs:
        buf = bufs.pop()
    elif adrec_memory:
        buf = empty_table(*w0.shape, dtype=w0.dtype)
    else:
        buf = torch.empty_like(w0)
    buf.copy_(w0)
    _OWNER[id(buf)] = adrec_memory
    return buf


def _give(buf: torch.Tensor) -> None:
    key = (tuple(buf.shape), _OWNER.pop(id(buf), False))
    for k in list(_POOL):  # keep buffers of the current D only
        if k[0] != key[0]:
            del _POOL[k]
    if len(_POOL.setdefault(key, [])) < 2:
        _POOL[key].append(buf)


# ------------------------------------------------------------------------------------------
# Providers


@dataclass
class Prov:
    step: Callable[[], torch.Tensor]  # the timed call; returns the [B, T*D] output
    read_rows: Callable[[torch.Tensor], torch.Tensor] | None = None  # global rows -> [n, D]
    buffers: list[torch.Tensor] = field(default_factory=list)  # pooled, given back on close
    note: str = ""


def _rows_from_tables(tables: list[torch.Tensor], table_offsets: torch.Tensor, rows: torch.Tensor):
    """Gather global rows from per-table weights (sorted or not)."""
    t = torch.searchsorted(table_offsets, rows, right=True) - 1
    out = torch.empty(rows.numel(), tables[0].shape[1])
    for k in torch.unique(t).tolist():
        m = t == k
        out[m] = tables[k][rows[m] - table_offsets[k]].float()
    return out


def build_row_gather(shape, inp, w0, optim):
    rows_per_chunk = max(1024, (1 << 20) // (4 * shape.D))  # ~1 MB buffer, stays in L2
    buf = torch.empty(rows_per_chunk, shape.D)
    chunks = list(inp.global_ids.split(rows_per_chunk))

    def step():
        for c in chunks:
            torch.index_select(w0, 0, c, out=buf[: c.numel()])
        return None

    return Prov(step, note=f"index_select in chunks of {rows_per_chunk} rows")


def build_adrec(shape, inp, w0, optim):
    tofs, idx, offs = inp.table_offsets, inp.indices, inp.offsets
    if optim is None:
        # The table as EmbeddingBagCollection holds it (adrec's allocation: huge pages), looked up
        # through the functional API.
        buf = _take(w0, adrec_memory=True)

        def step():
            return AF.embedding_bag(buf, tofs, idx, offs)
        return Prov(step, buffers=[buf])
    opt = FusedSGD(LR) if optim == "sgd" else FusedRowwiseAdagrad(LR, eps=EPS)
    buf = _take(w0, adrec_memory=True)
    try:  # build on meta so the 5.57M x D normal_ init is skipped, then plug in our tensors
        ebc = adrec_fast.nn.EmbeddingBagCollection(list(shape.rows), shape.D, optimizer=opt,
                                                   device="meta")
        ebc.weight = buf
        ebc.table_offsets = tofs.clone()
        n_state = sum(shape.rows) if optim == "rowwise_adagrad" else 0
        ebc.state = empty_table(n_state).zero_()  # as the module allocates it
    except Exception:  # noqa: BLE001
        ebc = adrec_fast.nn.EmbeddingBagCollection(list(shape.rows), shape.D, optimizer=opt)
        ebc.weight.copy_(w0)
    ebc.train()
    g = make_grad_out(shape)

    def step():
        out = ebc(idx, offs)
        out.backward(g)
        return out

    return Prov(step, read_rows=lambda r: ebc.weight[r], buffers=[buf])


def build_nn_loop(shape, inp, w0, optim):
    tofs = inp.table_offsets.tolist()
    train = optim is not None
    buf = _take(w0) if train else w0
    mods = [
        nn.EmbeddingBag(tofs[t + 1] - tofs[t], shape.D, mode="sum", sparse=True,
                        include_last_offset=True, _weight=buf[tofs[t]:tofs[t + 1]])
        for t in range(shape.T)
    ]
    for m in mods:
        m.weight.requires_grad_(train)
    per_table = inp.per_table
    if not train:
        def step():
            return torch.cat([m(i, o) for m, (i, o) in zip(mods, per_table)], dim=1)
        return Prov(step)
    params = [m.weight for m in mods]
    opt = torch.optim.SGD(params, lr=LR) if optim == "sgd" else torch.optim.Adagrad(params, lr=LR, eps=EPS)
    g = make_grad_out(shape)

    def step():
        out = torch.cat([m(i, o) for m, (i, o) in zip(mods, per_table)], dim=1)
        out.backward(g)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out

    return Prov(step, read_rows=lambda r: buf[r], buffers=[buf])


def _sample_major(shape, inp: EmbInputs):
    """Global ids and offsets with bags in (b, t) order, so one EmbeddingBag's [B*T, D] output is
    the [B, T*D] layout without a copy."""
    T, B = shape.T, shape.B
    o = inp.offsets.numpy()
    lengths = np.diff(o)
    perm = np.arange(T * B).reshape(T, B).T.ravel()  # new bag j = old bag perm[j]
    new_len = lengths[perm]
    new_off = np.zeros(T * B + 1, dtype=np.int64)
    np.cumsum(new_len, out=new_off[1:])
    src = np.repeat(o[perm] - new_off[:-1], new_len) + np.arange(new_off[-1])
    return torch.from_numpy(inp.global_ids.numpy()[src]), torch.from_numpy(new_off)


def build_nn_concat(shape, inp, w0, optim):
    train = optim is not None
    buf = _take(w0) if train else w0
    emb = nn.EmbeddingBag(buf.shape[0], shape.D, mode="sum", sparse=True, include_last_offset=True,
                          _weight=buf)
    emb.weight.requires_grad_(train)
    gids, goffs = _sample_major(shape, inp)
    B, TD = shape.B, shape.T * shape.D
    if not train:
        def step():
            return emb(gids, goffs).view(B, TD)
        return Prov(step)
    opt = (torch.optim.SGD(emb.parameters(), lr=LR) if optim == "sgd"
           else torch.optim.Adagrad(emb.parameters(), lr=LR, eps=EPS))
    g = make_grad_out(shape)

    def step():
        out = emb(gids, goffs).view(B, TD)
        out.backward(g)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out

    return Prov(step, read_rows=lambda r: buf[r], buffers=[buf])


def build_fbgemm(shape, inp, w0, optim):
    F = FBGEMM
    ot = {None: F["OptimType"].EXACT_SGD, "sgd": F["OptimType"].EXACT_SGD,
          "rowwise_adagrad": F["OptimType"].EXACT_ROWWISE_ADAGRAD}[optim]
    buf = _take(w0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tbe = F["TBE"](
            [(n, shape.D, F["EmbeddingLocation"].HOST, F["ComputeDevice"].CPU) for n in shape.rows],
            optimizer=ot, learning_rate=LR, eps=EPS, pooling_mode=F["PoolingMode"].SUM,
            preallocated_host_buffers={"weights": buf.view(-1)},
        )
    tables = tbe.split_embedding_weights()
    tofs = inp.table_offsets.tolist()
    with torch.no_grad():
        for t, w in enumerate(tables):
            if w.data_ptr() != buf[tofs[t]].data_ptr():
                w.copy_(w0[tofs[t]:tofs[t + 1]])
    idx, offs = inp.indices, inp.offsets
    if optim is None:
        def step():
            return tbe(idx, offs)
        return Prov(step, buffers=[buf])
    g = make_grad_out(shape)

    def step():
        out = tbe(idx, offs)
        out.backward(g)
        return out

    return Prov(step, read_rows=lambda r: _rows_from_tables(tables, inp.table_offsets, r),
                buffers=[buf], note="bounds_check_mode=WARNING (default)")


def _kjt(shape, inp):
    R = TORCHREC
    return R["KJT"](keys=[f"f{t}" for t in range(shape.T)], values=inp.indices,
                    offsets=inp.offsets)


def _trec_tables(shape):
    R = TORCHREC
    return [R["Config"](name=f"t{t}", embedding_dim=shape.D, num_embeddings=n,
                        feature_names=[f"f{t}"], pooling=R["PoolingType"].SUM)
            for t, n in enumerate(shape.rows)]


def build_torchrec_ebc(shape, inp, w0, optim):
    R = TORCHREC
    train = optim is not None
    buf = _take(w0) if train else w0
    tofs = inp.table_offsets.tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ebc = R["EBC"](tables=_trec_tables(shape), device=torch.device("meta"))
    for t, bag in enumerate(ebc.embedding_bags.values()):  # plug in the shared weights
        bag.weight = nn.Parameter(buf[tofs[t]:tofs[t + 1]], requires_grad=train)
    kjt = _kjt(shape, inp)
    if not train:
        def step():
            return ebc(kjt).values()
        return Prov(step)
    opt = torch.optim.SGD(ebc.parameters(), lr=LR)
    g = make_grad_out(shape)

    def step():
        out = ebc(kjt).values()
        out.backward(g)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out

    return Prov(step, read_rows=lambda r: buf[r], buffers=[buf],
                note="dense gradients (nn.EmbeddingBag sparse=False inside torchrec EBC)")


def build_torchrec_fused(shape, inp, w0, optim):
    R = TORCHREC
    if optim == "rowwise_adagrad":
        ot, kw = R["RowWiseAdagrad"], {"lr": LR, "eps": EPS}
    else:
        ot, kw = torch.optim.SGD, {"lr": LR}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ebc = R["FusedEBC"](tables=_trec_tables(shape), optimizer_type=ot, optimizer_kwargs=kw,
                            device=torch.device("cpu"))
    tofs = inp.table_offsets.tolist()
    sd = ebc.state_dict()
    tables = [sd[f"embedding_bags.t{t}.weight"] for t in range(shape.T)]
    with torch.no_grad():
        for t, w in enumerate(tables):
            w.copy_(w0[tofs[t]:tofs[t + 1]])
    kjt = _kjt(shape, inp)
    if optim is None:
        def step():
            return ebc(kjt).values()
        return Prov(step)
    g = make_grad_out(shape)

    def step():
        out = ebc(kjt).values()
        out.backward(g)
        return out

    return Prov(step, read_rows=lambda r: _rows_from_tables(tables, inp.table_offsets, r))


BUILDERS = {
    "row_gather": build_row_gather,
    "adrec": build_adrec,
    "nn_embedding_bag_loop": build_nn_loop,
    "nn_embedding_bag_concat": build_nn_concat,
    "fbgemm_tbe": build_fbgemm,
    "torchrec_ebc": build_torchrec_ebc,
    "torchrec_fused_ebc": build_torchrec_fused,
}
FWD_PROVIDERS = list(BUILDERS)
# (provider, optimizer). "adagrad_elementwise" is torch.optim.Adagrad: one accumulator per
# weight element, a different (and heavier) algorithm than row-wise Adagrad.
TRAIN_CASES = [
    ("adrec", "sgd"), ("adrec", "rowwise_adagrad"),
    ("fbgemm_tbe", "sgd"), ("fbgemm_tbe", "rowwise_adagrad"),
    ("torchrec_fused_ebc", "sgd"), ("torchrec_fused_ebc", "rowwise_adagrad"),
    ("nn_embedding_bag_loop", "sgd"), ("nn_embedding_bag_loop", "adagrad_elementwise"),
    ("nn_embedding_bag_concat", "sgd"), ("nn_embedding_bag_concat", "adagrad_elementwise"),
    ("torchrec_ebc", "sgd"),
]


# ------------------------------------------------------------------------------------------
# Reference checks (cached per shape)

_REF: dict = {}


def _ref_cached(key, fn):
    if key not in _REF:
        for k in [k for k in _REF if k[0] != key[0]]:  # keep the current shape only
            del _REF[k]
        _REF[key] = fn()
    return _REF[key]


def ref_forward(shape, inp, w0):
    return _ref_cached((str(shape), "fwd"), lambda: reference.embedding_bag(
        w0, inp.table_offsets, inp.indices, inp.offsets))


def ref_row_grads(shape, inp, w0):
    """(touched global rows [U], their summed gradient [U, D], hits per row [U]) from the
    reference op's autograd on a compacted copy of the touched rows (no dense [N_total, D]
    gradient)."""
    def compute():
        u, inv, hits = torch.unique(inp.global_ids, sorted=True, return_inverse=True,
                                    return_counts=True)
        ctofs = torch.searchsorted(u, inp.table_offsets)  # tables are disjoint row ranges
        counts = torch.diff(inp.offsets[:: shape.B])  # ids per table
        local = inv - torch.repeat_interleave(ctofs[:-1], counts)
        wc = w0[u].clone().requires_grad_(True)
        out = reference.embedding_bag(wc, ctofs, local, inp.offsets)
        out.backward(make_grad_out(shape))
        return u, wc.grad.detach(), hits
    return _ref_cached((str(shape), "grad"), compute)


def check_forward(out, shape, inp, w0, who):
    torch.testing.assert_close(out, ref_forward(shape, inp, w0), rtol=1e-4, atol=1e-5,
                               msg=lambda m: f"{who}: forward differs from the reference\n{m}")


def check_step(prov: Prov, shape, inp, w0, optim, who):
    """The touched rows after one step equal the reference gradient pushed through the
    optimizer's formula, up to float32 summation order; a sample of other rows is unchanged.

    A row hit n times sums n gradient rows in an order each library picks, so its gradient is
    only known to ~n * 4e-7 absolute (the small Criteo tables get ~20k hits per row); element-wise
    Adagrad's g/|g| is undefined in sign below that noise and those elements are not compared."""
    u, g, hits = ref_row_grads(shape, inp, w0)
    w = w0[u]
    got = prov.read_rows(u) - w
    noise = (1e-6 + 4e-7 * hits.to(g.dtype))[:, None]  # [U, 1] bound on |g error|
    if optim == "sgd":
        want = -LR * g
        tol = LR * noise + 1e-3 * want.abs()
        mask = torch.ones_like(g, dtype=torch.bool)
    elif optim == "rowwise_adagrad":
        rms = (g * g).mean(dim=1, keepdim=True).sqrt()
        want = -LR * g / (rms + EPS)
        tol = 2 * LR * noise / (rms + EPS) + 1e-3 * want.abs() + 1e-7
        mask = torch.ones_like(g, dtype=torch.bool)
    elif optim == "adagrad_elementwise":
        want = -LR * g / (g.abs() + EPS)
        tol = 1e-3 * want.abs() + 1e-7
        mask = g.abs() > 10 * noise
    else:
        raise ValueError(optim)
    bad = ((got - want).abs() > tol) & mask
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        r, d = divmod(i, g.shape[1])
        raise AssertionError(
            f"{who}: {int(bad.sum())} of {int(mask.sum())} updated weights differ from the "
            f"reference step; first: global row {int(u[r])} (hit {int(hits[r])}x), col {d}: "
            f"update {float(got[r, d]):.6g}, expected {float(want[r, d]):.6g} "
            f"(tolerance {float(tol[r, d]):.3g})")
    gen = torch.Generator().manual_seed(7)
    probe = torch.randint(0, w0.shape[0], (4096,), generator=gen)
    probe = probe[~torch.isin(probe, u)]
    torch.testing.assert_close(prov.read_rows(probe), w0[probe], rtol=0, atol=0,
                               msg=lambda m: f"{who}: an untouched row changed\n{m}")


# ------------------------------------------------------------------------------------------
# Timing


def _rounds(first_call_s: float) -> tuple[int, int]:
    """(rounds, warmup): 20/3 normally; fewer for slow peers so the run stays ~10-15 min."""
    if QUICK:
        return 5, 1
    if first_call_s < 0.12:
        return 20, 3
    return max(3, min(20, int(2.5 / first_call_s))), 1


# Untimed calls before the timed rounds, for every provider alike. A provider's first calls on a
# shape run with cold caches, TLBs and allocator: the per-call time falls for 5-15 calls before
# it settles (one run, 2 threads, D=16, one id per field: adrec 0.30 -> 0.19 ms over 8 calls, the
# concatenated nn.EmbeddingBag 0.46 -> 0.24 ms over 15), so 3 warm-up rounds left a variable part
# of the 20 timed rounds in that transient and the medians moved with it.
WARM_SECONDS = 0.3
WARM_MIN_CALLS = 3
WARM_MAX_CALLS = 30


def _warm(step: Callable[[], object]) -> int:
    """Call ``step`` until WARM_SECONDS have passed (at least WARM_MIN_CALLS, at most
    WARM_MAX_CALLS times); returns the number of calls."""
    if QUICK:
        return 0
    n, t_end = 0, time.perf_counter() + WARM_SECONDS
    while n < WARM_MIN_CALLS or (n < WARM_MAX_CALLS and time.perf_counter() < t_end):
        step()
        n += 1
    return n


def _bytes(shape, inp, mode, optim):
    B, T, D, nnz, U = shape.B, shape.T, shape.D, inp.nnz, inp.U
    if mode == "gather":
        return nnz * D * 4 + nnz * 8
    fwd = nnz * D * 4 + nnz * 8 + (T * B + 1) * 8 + B * T * D * 4
    if mode == "fwd":
        return fwd
    upd = {"sgd": U * D * 8, "rowwise_adagrad": U * D * 8 + U * 8,
           "adagrad_elementwise": U * D * 16}[optim]
    return fwd + B * T * D * 4 + nnz * 8 + upd


def _extra(benchmark, shape, inp, mode, optim, provider, prov):
    e = benchmark.extra_info
    e.update(
        provider=provider, optimizer=optim or "", mode=mode, D=shape.D, B=shape.B, T=shape.T,
        pooling=shape.pooling_label, dist=shape.dist, nnz=inp.nnz, unique_rows=inp.U,
        samples=shape.B, rows_gathered=inp.nnz,
        bytes=_bytes(shape, inp, "gather" if provider == "row_gather" else mode, optim),
        note=prov.note,
    )
    e["GB"] = e["bytes"] / 1e9


def _release(prov):
    if prov is None:
        return
    for b in prov.buffers:
        _give(b)
    prov.buffers.clear()
    gc.collect()


@pytest.fixture(autouse=True)
def _quiet_peers():
    """Peers warn on their hot paths (deprecations, bounds-check notes); the project turns warnings
    into errors, which would abort a benchmark. Ignore them here, in benchmarks only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _fwd_cases():
    return [pytest.param(s, p, id=f"{s}-{p}") for s in emb_shapes() for p in FWD_PROVIDERS]


def _train_cases():
    return [pytest.param(s, p, o, id=f"{s}-{p}-{o}") for s in emb_shapes() for p, o in TRAIN_CASES]


@pytest.mark.parametrize("shape,backend", _fwd_cases())
def test_embedding_bag_fwd(benchmark, shape: EmbShape, backend: str):
    _need(backend)
    benchmark.group = f"embedding_bag_fwd {shape}"
    inp, w0 = make_inputs(shape), make_weights(shape)
    prov = None
    try:
        prov = BUILDERS[backend](shape, inp, w0, None)
        with torch.no_grad():
            t0 = time.perf_counter()
            out = prov.step()
            first = time.perf_counter() - t0
            if out is not None:
                check_forward(out, shape, inp, w0, backend)
            del out
            rounds, warm = _rounds(first)
            _extra(benchmark, shape, inp, "fwd", None, backend, prov)
            benchmark.extra_info["warm_calls"] = _warm(prov.step)
            benchmark.pedantic(prov.step, warmup_rounds=warm, rounds=rounds, iterations=1)
    finally:
        _release(prov)


@pytest.mark.parametrize("shape,backend,optim", _train_cases())
def test_embedding_bag_fwdbwd(benchmark, shape: EmbShape, backend: str, optim: str):
    """Training step: forward + backward(fixed random grad_out) + optimizer update."""
    _need(backend)
    benchmark.group = f"embedding_bag_train_{'sgd' if optim == 'sgd' else 'adagrad'} {shape}"
    inp, w0 = make_inputs(shape), make_weights(shape)
    prov = None
    try:
        prov = BUILDERS[backend](shape, inp, w0, optim)
        t0 = time.perf_counter()
        out = prov.step()
        first = time.perf_counter() - t0
        check_forward(out.detach(), shape, inp, w0, backend)
        del out
        check_step(prov, shape, inp, w0, optim, f"{backend}/{optim}")
        rounds, warm = _rounds(first)
        _extra(benchmark, shape, inp, "train", optim, backend, prov)
        benchmark.extra_info["warm_calls"] = _warm(prov.step)
        benchmark.pedantic(prov.step, warmup_rounds=warm, rounds=rounds, iterations=1)
    finally:
        _release(prov)
