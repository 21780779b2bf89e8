# SPDX-License-Identifier: Apache-2.0
"""Pooled multi-table embedding lookup: forward, and the training step (forward + backward +
optimizer update), adrec_fast against its peers.

Every round takes the next batch of a pool whose touched rows, times D*4 bytes, are at least 4x
the L3 (``shapes.make_pool``), so a step reads and updates rows from DRAM as training does. One
batch repeated every round keeps its rows in the L3 and measures the cache; that variant is kept,
labelled "cache" (``--cache`` / ``ADREC_BENCH_CACHE=1``), and is not the headline.

Headline ratios (script mode: adrec and its peers alternating round by round on the same
batches, 3 runs, a Markdown table of medians, spread, ratios and load; about 5-10 min on 2 quiet
cores and about 6 GB of memory; ``--quick``: a smoke run of 2 shapes in about a minute)::

    python bench/bench_embedding_bag.py --runs 3
    python bench/bench_embedding_bag.py --runs 3 --cache          # the cache variant

Every provider on its own (pytest-benchmark, one benchmark per provider, so no alternation;
about 10-15 min; ``ADREC_BENCH_QUICK=1`` for a 2-shape smoke run)::

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
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest
import torch
from torch import nn

from peers import import_fbgemm, import_torchrec, optional
import _harness as H
from _harness import cycle, fresh_bytes, l3_bytes
from shapes import (
    QUICK,
    SHAPES,
    EmbInputs,
    EmbShape,
    emb_shapes,
    make_grad_out,
    make_inputs,
    make_pool,
    make_weights,
    pool_touched_bytes,
)

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
    if not _POOL.setdefault(key, []):  # one spare per kind: a D=64 table is 1.4 GB
        _POOL[key].append(buf)


# ------------------------------------------------------------------------------------------
# Providers


@dataclass
class Prov:
    """One provider built for one (shape, optimizer). ``prepare`` turns a batch into the
    provider's own arguments (layouts, per-table splits) outside the clock; ``step`` is the timed
    call on them and returns the [B, T*D] output."""

    step: Callable[[object], torch.Tensor | None]
    prepare: Callable[[EmbInputs], object] = lambda inp: (inp.indices, inp.offsets)
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


def build_row_gather(shape, tofs, w0, optim):
    rows_per_chunk = max(1024, (1 << 20) // (4 * shape.D))  # ~1 MB buffer, stays in L2
    buf = torch.empty(rows_per_chunk, shape.D)

    def step(chunks):
        for c in chunks:
            torch.index_select(w0, 0, c, out=buf[: c.numel()])
        return None

    return Prov(step, prepare=lambda inp: list(inp.global_ids.split(rows_per_chunk)),
                note=f"index_select in chunks of {rows_per_chunk} rows")


def build_adrec(shape, tofs, w0, optim):
    if optim is None:
        # The table as EmbeddingBagCollection holds it (adrec's allocation: huge pages), looked up
        # through the functional API.
        buf = _take(w0, adrec_memory=True)

        def step(a):
            return AF.embedding_bag(buf, tofs, *a)
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

    def step(a):
        out = ebc(*a)
        out.backward(g)
        return out

    return Prov(step, read_rows=lambda r: ebc.weight[r], buffers=[buf])


def build_nn_loop(shape, tofs, w0, optim):
    tofs = tofs.tolist()
    train = optim is not None
    buf = _take(w0) if train else w0
    mods = [
        nn.EmbeddingBag(tofs[t + 1] - tofs[t], shape.D, mode="sum", sparse=True,
                        include_last_offset=True, _weight=buf[tofs[t]:tofs[t + 1]])
        for t in range(shape.T)
    ]
    for m in mods:
        m.weight.requires_grad_(train)

    def prepare(inp):
        return inp.per_table

    if not train:
        def step(per_table):
            return torch.cat([m(i, o) for m, (i, o) in zip(mods, per_table)], dim=1)
        return Prov(step, prepare)
    params = [m.weight for m in mods]
    opt = (torch.optim.SGD(params, lr=LR) if optim == "sgd"
           else torch.optim.Adagrad(params, lr=LR, eps=EPS))
    g = make_grad_out(shape)

    def step(per_table):
        out = torch.cat([m(i, o) for m, (i, o) in zip(mods, per_table)], dim=1)
        out.backward(g)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out

    return Prov(step, prepare, read_rows=lambda r: buf[r], buffers=[buf])


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


def build_nn_concat(shape, tofs, w0, optim):
    train = optim is not None
    buf = _take(w0) if train else w0
    emb = nn.EmbeddingBag(buf.shape[0], shape.D, mode="sum", sparse=True, include_last_offset=True,
                          _weight=buf)
    emb.weight.requires_grad_(train)
    B, TD = shape.B, shape.T * shape.D

    def prepare(inp):
        return _sample_major(shape, inp)

    if not train:
        def step(a):
            return emb(*a).view(B, TD)
        return Prov(step, prepare)
    opt = (torch.optim.SGD(emb.parameters(), lr=LR) if optim == "sgd"
           else torch.optim.Adagrad(emb.parameters(), lr=LR, eps=EPS))
    g = make_grad_out(shape)

    def step(a):
        out = emb(*a).view(B, TD)
        out.backward(g)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out

    return Prov(step, prepare, read_rows=lambda r: buf[r], buffers=[buf])


def build_fbgemm(shape, tofs, w0, optim):
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
    starts = tofs.tolist()
    with torch.no_grad():
        for t, w in enumerate(tables):
            if w.data_ptr() != buf[starts[t]].data_ptr():
                w.copy_(w0[starts[t]:starts[t + 1]])
    if optim is None:
        def step(a):
            return tbe(*a)
        return Prov(step, buffers=[buf])
    g = make_grad_out(shape)

    def step(a):
        out = tbe(*a)
        out.backward(g)
        return out

    return Prov(step, read_rows=lambda r: _rows_from_tables(tables, tofs, r),
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


def build_torchrec_ebc(shape, tofs, w0, optim):
    R = TORCHREC
    train = optim is not None
    buf = _take(w0) if train else w0
    starts = tofs.tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ebc = R["EBC"](tables=_trec_tables(shape), device=torch.device("meta"))
    for t, bag in enumerate(ebc.embedding_bags.values()):  # plug in the shared weights
        bag.weight = nn.Parameter(buf[starts[t]:starts[t + 1]], requires_grad=train)

    def prepare(inp):
        return _kjt(shape, inp)

    if not train:
        def step(kjt):
            return ebc(kjt).values()
        return Prov(step, prepare)
    opt = torch.optim.SGD(ebc.parameters(), lr=LR)
    g = make_grad_out(shape)

    def step(kjt):
        out = ebc(kjt).values()
        out.backward(g)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out

    return Prov(step, prepare, read_rows=lambda r: buf[r], buffers=[buf],
                note="dense gradients (nn.EmbeddingBag sparse=False inside torchrec EBC)")


def build_torchrec_fused(shape, tofs, w0, optim):
    R = TORCHREC
    if optim == "rowwise_adagrad":
        ot, kw = R["RowWiseAdagrad"], {"lr": LR, "eps": EPS}
    else:
        ot, kw = torch.optim.SGD, {"lr": LR}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ebc = R["FusedEBC"](tables=_trec_tables(shape), optimizer_type=ot, optimizer_kwargs=kw,
                            device=torch.device("cpu"))
    starts = tofs.tolist()
    sd = ebc.state_dict()
    tables = [sd[f"embedding_bags.t{t}.weight"] for t in range(shape.T)]
    with torch.no_grad():
        for t, w in enumerate(tables):
            w.copy_(w0[starts[t]:starts[t + 1]])

    def prepare(inp):
        return _kjt(shape, inp)

    if optim is None:
        def step(kjt):
            return ebc(kjt).values()
        return Prov(step, prepare)
    g = make_grad_out(shape)

    def step(kjt):
        out = ebc(kjt).values()
        out.backward(g)
        return out

    return Prov(step, prepare, read_rows=lambda r: _rows_from_tables(tables, tofs, r))


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
# shape run with cold TLBs and a cold allocator: the per-call time falls for 5-15 calls before it
# settles, so a fixed 3 warm-up rounds would leave a variable part of the timed rounds in that
# transient (measurements in bench/RESULTS.md).
WARM_SECONDS = 0.3
WARM_MIN_CALLS = 3
WARM_MAX_CALLS = 30


def _warm(prov: Prov, batches) -> int:
    """Call the provider on the next batches until WARM_SECONDS have passed (at least
    WARM_MIN_CALLS, at most WARM_MAX_CALLS times); returns the number of calls."""
    if QUICK:
        return 0
    n, t_end = 0, time.perf_counter() + WARM_SECONDS
    while n < WARM_MIN_CALLS or (n < WARM_MAX_CALLS and time.perf_counter() < t_end):
        prov.step(prov.prepare(next(batches)))
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


# ``ADREC_BENCH_CACHE=1`` (pytest) / ``--cache`` (script): every round on one repeated batch, whose
# rows then stay in the L3. It measures the cache, not training; its groups say "cache".
CACHE = os.environ.get("ADREC_BENCH_CACHE", "") not in ("", "0")


def batch_pool(shape: EmbShape, cache: bool = CACHE, quick: bool = QUICK) -> list[EmbInputs]:
    """The batches a benchmark cycles through: a fresh-batch pool (rows touched >= 4x the L3),
    or the one batch of the cache variant. Quick runs cap the pool (smoke only)."""
    if cache:
        return [make_inputs(shape)]
    return make_pool(shape, fresh_bytes(), max_batches=8 if quick else 1024)


def _label(shape, pool) -> str:
    if len(pool) == 1:
        return f"{shape} cache (1 repeated batch)"
    return (f"{shape} fresh ({len(pool)} batches, "
            f"{pool_touched_bytes(shape, pool) / l3_bytes():.1f}x L3)")


def _extra(benchmark, shape, inp, mode, optim, provider, prov, pool):
    e = benchmark.extra_info
    e.update(
        provider=provider, optimizer=optim or "", mode=mode, D=shape.D, B=shape.B, T=shape.T,
        pooling=shape.pooling_label, dist=shape.dist, nnz=inp.nnz, unique_rows=inp.U,
        samples=shape.B, rows_gathered=inp.nnz,
        bytes=_bytes(shape, inp, "gather" if provider == "row_gather" else mode, optim),
        note=prov.note, batches=len(pool),
        pool_touched_MB=round(pool_touched_bytes(shape, pool) / 1e6, 1) if len(pool) > 1 else 0,
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


def _suffix():
    return " cache" if CACHE else ""


def _pedantic(benchmark, prov: Prov, batches, first_s: float):
    rounds, warm = _rounds(first_s)
    benchmark.extra_info["warm_calls"] = _warm(prov, batches)
    benchmark.pedantic(prov.step, setup=lambda: ((prov.prepare(next(batches)),), {}),
                       warmup_rounds=warm, rounds=rounds, iterations=1)


@pytest.mark.parametrize("shape,backend", _fwd_cases())
def test_embedding_bag_fwd(benchmark, shape: EmbShape, backend: str):
    _need(backend)
    benchmark.group = f"embedding_bag_fwd {shape}{_suffix()}"
    pool, w0 = batch_pool(shape), make_weights(shape)
    inp = pool[0]
    prov = None
    try:
        prov = BUILDERS[backend](shape, inp.table_offsets, w0, None)
        with torch.no_grad():
            t0 = time.perf_counter()
            out = prov.step(prov.prepare(inp))
            first = time.perf_counter() - t0
            if out is not None:
                check_forward(out, shape, inp, w0, backend)
            del out
            _extra(benchmark, shape, inp, "fwd", None, backend, prov, pool)
            _pedantic(benchmark, prov, cycle(pool, 1), first)
    finally:
        _release(prov)


@pytest.mark.parametrize("shape,backend,optim", _train_cases())
def test_embedding_bag_fwdbwd(benchmark, shape: EmbShape, backend: str, optim: str):
    """Training step: forward + backward(fixed random grad_out) + optimizer update."""
    _need(backend)
    kind = "sgd" if optim == "sgd" else "adagrad"
    benchmark.group = f"embedding_bag_train_{kind} {shape}{_suffix()}"
    pool, w0 = batch_pool(shape), make_weights(shape)
    inp = pool[0]
    prov = None
    try:
        prov = BUILDERS[backend](shape, inp.table_offsets, w0, optim)
        t0 = time.perf_counter()
        out = prov.step(prov.prepare(inp))
        first = time.perf_counter() - t0
        check_forward(out.detach(), shape, inp, w0, backend)
        del out
        check_step(prov, shape, inp, w0, optim, f"{backend}/{optim}")
        _extra(benchmark, shape, inp, "train", optim, backend, prov, pool)
        _pedantic(benchmark, prov, cycle(pool, 1), first)
    finally:
        _release(prov)


# ------------------------------------------------------------------------------------------
# Script mode: providers alternating round by round on the same fresh batches, several runs.

# Each step's peers: the ones the targets are set against (forward: every lookup that has been
# the best peer on some shape; training: FBGEMM TBE with its fused optimizer). --providers adds
# others.
SCRIPT_PEERS = {
    "fwd": ["nn_embedding_bag_concat", "nn_embedding_bag_loop", "fbgemm_tbe"],
    "sgd": ["fbgemm_tbe"],
    "rowwise_adagrad": ["fbgemm_tbe"],
}
TARGET_NOTES = [
    "Targets: forward >= 1.0x the best peer at one id per field, >= 1.3x at 10-20; training "
    "step (SGD, row-wise Adagrad) >= 2.0x FBGEMM TBE; each in the median of >= 3 runs.",
]


def _available(provider: str) -> bool:
    if provider == "fbgemm_tbe":
        return FBGEMM is not None
    if provider.startswith("torchrec"):
        return TORCHREC is not None
    return provider in BUILDERS


def run_case(shape, mode, providers, pool, batches, w0, rounds, check: bool, quick: bool):
    """Build every provider for (shape, mode), check them once if asked, then time them
    alternating over ``rounds`` fresh batches. Returns {provider: [seconds]}."""
    optim = None if mode == "fwd" else mode
    provs = {}
    try:
        for p in providers:
            provs[p] = BUILDERS[p](shape, pool[0].table_offsets, w0, optim)
            if check:
                with torch.set_grad_enabled(optim is not None):
                    out = provs[p].step(provs[p].prepare(pool[0]))
                if out is not None:
                    check_forward(out.detach(), shape, pool[0], w0, p)
                if optim is not None:
                    check_step(provs[p], shape, pool[0], w0, optim, f"{p}/{optim}")
        steps = {p: pv.step for p, pv in provs.items()}
        prepare = {p: pv.prepare for p, pv in provs.items()}
        with torch.set_grad_enabled(optim is not None):
            H.warm({p: (lambda b, p=p: steps[p](prepare[p](b))) for p in provs}, batches,
                   seconds=0.0 if quick else WARM_SECONDS, min_calls=1 if quick else 3)
            return H.alternate(steps, batches, rounds, prepare)
    finally:
        for pv in provs.values():
            _release(pv)


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    H.add_args(ap)
    ap.add_argument("--modes", default="fwd,sgd,rowwise_adagrad",
                    help="comma list of fwd, sgd, rowwise_adagrad")
    ap.add_argument("--providers", default="",
                    help="extra providers beside adrec and the default peers (comma list of "
                         + ", ".join(p for p in BUILDERS if p != "adrec") + ")")
    ap.add_argument("--shapes", default="",
                    help="only shapes whose name contains one of these (comma list, e.g. D16-L1)")
    ap.add_argument("--cache", action="store_true",
                    help="one repeated batch per shape: measures the cache, not training")
    args = H.settle(ap.parse_args(argv))
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in SCRIPT_PEERS]
    if bad:
        raise SystemExit(f"--modes: unknown {bad}; choose from {list(SCRIPT_PEERS)}")
    extra = [p for p in args.providers.split(",") if p]
    bad = [p for p in extra if p not in BUILDERS]
    if bad:
        raise SystemExit(f"--providers: unknown {bad}; choose from {list(BUILDERS)}")
    shapes = SHAPES["criteo_emb_quick" if args.quick else "criteo_emb"]
    if args.shapes:
        keys = args.shapes.split(",")
        shapes = [s for s in shapes if any(k in str(s) for k in keys)]
        if not shapes:
            raise SystemExit(f"--shapes {args.shapes!r} matches none of {SHAPES['criteo_emb']}")
    print(H.header(args, "embedding bag" + (" (cache variant)" if args.cache else "")), flush=True)
    skipped = set()
    res = H.Results("Embedding bag: " + ("one repeated batch (cache, not the headline)"
                                         if args.cache else "fresh batches"))
    res.notes += TARGET_NOTES
    streams = {}  # shape -> its batch iterator: every round of every run takes the next batch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peers' deprecation notes on their hot paths
        for run in range(args.runs):
            l0 = H.load1()
            for shape in shapes:
                pool = batch_pool(shape, args.cache, args.quick)
                w0 = make_weights(shape)
                for mode in modes:
                    providers = ["adrec"]
                    for p in SCRIPT_PEERS[mode] + extra:
                        if p in providers:
                            continue
                        if _available(p):
                            providers.append(p)
                        else:
                            skipped.add(p)
                    batches = streams.setdefault(str(shape), cycle(pool, 1))
                    times = run_case(shape, mode, providers, pool, batches, w0, args.rounds,
                                     check=run == 0, quick=args.quick)
                    res.add(f"{_label(shape, pool)} {mode}", times)
                    print(f"run {run + 1}: {shape} {mode}: " + ", ".join(
                        f"{p} {statistics.median(t) * 1e3:.3f} ms" for p, t in times.items()),
                        flush=True)
            res.loads.append((l0, H.load1()))
    for p in sorted(skipped):
        why = FBGEMM_WHY if p == "fbgemm_tbe" else TORCHREC_WHY
        res.notes.append(f"{p} skipped: {why}")
    print()
    print(res.markdown(best_peer=True))


if __name__ == "__main__":
    main()
