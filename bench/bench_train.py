# SPDX-License-Identifier: Apache-2.0
"""Training throughput of whole models: DLRM and DCN-v2, B=4096, the 26 Criteo Kaggle tables
capped at 1e6 rows (5.57M rows), D=16, 13 dense features, 2 threads. One timed round = one full
training step: forward, fused sigmoid-BCE, backward, embedding update and dense optimizer step,
on the next batch of a pool whose touched embedding rows are >= 4x the L3 (``make_batches``), so
the step reads and updates its rows from DRAM as training does. samples/s = B / median step time.

Providers (the same architecture and the same dense optimizer, Adam(fused=True), everywhere):
  adrec     adrec_fast.models (one fused EmbeddingBagCollection, row-wise Adagrad fused into
            the backward; fused dot/BCE ops; the tower's dense products through the models'
            dense-linear path)
  adrec_recipe  ``adrec`` with the default recipe's regularisers (the model's embedding L2 as
            lazy decay inside the fused update, its dropout in the MLPs): what the CLI trains
  eager     plain PyTorch: one concatenated nn.EmbeddingBag(sparse=True) with torch.optim.Adagrad
            on its sparse gradient, torch interaction code, F.binary_cross_entropy_with_logits
  compile   ``eager`` with its dense tower (interaction, MLPs, loss) under torch.compile (the
            sparse-gradient EmbeddingBag stays eager: compiled graphs do not emit sparse grads)
  fbgemm    FBGEMM TBE embeddings (fbgemm-gpu-cpu ``SplitTableBatchedEmbeddingBagsCodegen``,
            EmbeddingLocation.HOST / ComputeDevice.CPU, EXACT_ROWWISE_ADAGRAD fused into its
            backward, the batch's own TBE layout) under the ``eager`` tower
  fbgemm_compile  ``fbgemm`` with the tower under torch.compile (the strongest peer: FBGEMM's
            fused sparse path plus the compiled dense tower); skipped without fbgemm_gpu

Precision: ``fp32`` everywhere, or ``bf16`` mixed precision for every provider alike: adrec
``build_model(..., precision="bf16")``; the peers' towers (eager, compiled, on FBGEMM) run under
``torch.autocast("cpu", dtype=torch.bfloat16)``. Parameters, optimizer state and embedding
tables stay fp32 in both; compare bf16 only with bf16.

Headline ratios (script mode: providers alternating step by step on the same batches, 3 runs,
Markdown table of medians, spread, ratio to the best peer, per-run ratios and load; fp32 with the
default peers about 3-5 min on 2 quiet cores, much of it torch.compile; ``--quick``: a smoke
run of DLRM against one peer)::

    python bench/bench_train.py --runs 3
    python bench/bench_train.py --runs 3 --precision fp32,bf16 --providers eager,adrec_recipe

Every provider on its own (pytest-benchmark, no alternation)::

    python -m pytest bench/bench_train.py --benchmark-only --benchmark-columns=median
"""
from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from peers import import_fbgemm, optional
from _harness import fresh_bytes, l3_bytes
from shapes import criteo_rows
from torch import nn

import adrec_fast  # noqa: F401
from adrec_fast.data.batch import Batch
from adrec_fast.data.schema import Schema
from adrec_fast.models.registry import build_model

B = 4096
D = 16
N_DENSE = 13
ROWS = criteo_rows()
T = len(ROWS)
# DLRM Criteo-Kaggle layout (bottom 13-512-256-64-16, top 512-256-1); DCN-v2 3 cross layers in
# parallel with a 512-256 MLP on x0 = [26 x 16 embeddings, 13 dense] (K = 429)
DLRM_KW = {"bottom": (512, 256, 64), "top": (512, 256)}
DCN_KW = {"cross_layers": 3, "hidden": (512, 256), "structure": "parallel"}
EMB_LR = 0.05
LR = 1e-3


def criteo_schema() -> Schema:
    fields = [{"name": f"I{i}", "type": "dense"} for i in range(1, N_DENSE + 1)]
    fields += [{"name": f"C{t + 1}", "type": "categorical", "vocab": "hash", "hash_size": n,
                "salt": f"C{t + 1}"} for t, n in enumerate(ROWS)]
    return Schema(fields, label="label")


def make_batches(seed: int = 0, min_bytes: int | None = None,
                 max_batches: int = 256) -> list[Batch]:
    """Batches of B rows (one uniform id per table, Gaussian dense, random labels) until the
    embedding rows they touch together, times D*4 bytes, reach ``min_bytes`` (default 4x the L3)
    or ``max_batches``. Ids are table-major (TBE layout); every batch shares one offsets tensor."""
    min_bytes = fresh_bytes() if min_bytes is None else min_bytes
    g = np.random.default_rng(seed)
    starts = np.concatenate([[0], np.cumsum(ROWS)[:-1]])
    seen = np.zeros(sum(ROWS), dtype=bool)  # rows touched so far
    offsets = torch.arange(T * B + 1)
    out = []
    while len(out) < max_batches and (len(out) < 4 or np.count_nonzero(seen) * D * 4 < min_bytes):
        ids = [g.integers(0, n, B) for n in ROWS]  # per table [B]
        for t, x in enumerate(ids):
            seen[x + starts[t]] = True
        out.append(Batch(indices=torch.from_numpy(np.concatenate(ids)), offsets=offsets,
                         dense=torch.from_numpy(g.standard_normal((B, N_DENSE), dtype=np.float32)),
                         labels=torch.from_numpy((g.random(B) < 0.25).astype(np.float32)),
                         vectors=torch.zeros(B, 0), num_bags=T))
    out_bytes = int(np.count_nonzero(seen)) * D * 4
    _POOL_INFO.update(batches=len(out), touched_MB=round(out_bytes / 1e6, 1),
                      l3_multiple=round(out_bytes / l3_bytes(), 2))
    return out


_POOL_INFO: dict = {}


# ---------------------------------------------------------------------------- eager peers
def _mlp(widths):
    layers = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers)


class DenseDLRM(nn.Module):
    def __init__(self):
        super().__init__()
        self.bottom = _mlp([N_DENSE, *DLRM_KW["bottom"], D])
        F_ = T + 1
        self.register_buffer("tri", torch.triu_indices(F_, F_, offset=1), persistent=False)
        self.top = _mlp([D + F_ * (F_ - 1) // 2, *DLRM_KW["top"]])
        self.out = nn.Linear(DLRM_KW["top"][-1], 1)

    def forward(self, pooled, dense, labels):  # pooled [B, T*D]
        d = self.bottom(dense)  # [B, D]
        fields = torch.cat([d.unsqueeze(1), pooled.view(-1, T, D)], dim=1)  # [B, F, D]
        z = torch.bmm(fields, fields.transpose(1, 2))[:, self.tri[0], self.tri[1]]  # [B, P]
        logit = self.out(self.top(torch.cat([d, z], dim=1))).squeeze(1)
        return TF.binary_cross_entropy_with_logits(logit, labels)


class DenseDCN(nn.Module):
    def __init__(self):
        super().__init__()
        k = T * D + N_DENSE
        self.cross = nn.ModuleList(nn.Linear(k, k) for _ in range(DCN_KW["cross_layers"]))
        self.deep = _mlp([k, *DCN_KW["hidden"]])
        self.out = nn.Linear(k + DCN_KW["hidden"][-1], 1)

    def forward(self, pooled, dense, labels):
        x0 = torch.cat([pooled, dense], dim=1)  # [B, K]
        x = x0
        for lin in self.cross:
            x = x0 * lin(x) + x
        logit = self.out(torch.cat([x, self.deep(x0)], dim=1)).squeeze(1)
        return TF.binary_cross_entropy_with_logits(logit, labels)


class EagerModel(nn.Module):
    def __init__(self, tower: nn.Module):
        super().__init__()
        self.emb = nn.EmbeddingBag(sum(ROWS), D, mode="sum", sparse=True)
        with torch.no_grad():
            self.emb.weight.normal_(0, 0.1 / D**0.5)
        starts = np.concatenate([[0], np.cumsum(ROWS)[:-1]])
        self.register_buffer("base", torch.from_numpy(starts), persistent=False)
        self.tower = tower

    def lookup(self, batch):
        # table-major TBE ids -> sample-major global ids for one concatenated EmbeddingBag
        gid = (batch.indices.view(T, B) + self.base[:, None]).t().reshape(-1)  # [B*T]
        return self.emb(gid, torch.arange(B * T)).view(B, T * D)  # one id per bag


def _autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def build_eager(name: str, compiled: bool, precision: str = "fp32"):
    torch.manual_seed(0)
    m = EagerModel(DenseDLRM() if name == "dlrm" else DenseDCN())
    run_tower = torch.compile(m.tower) if compiled else m.tower

    def tower(*args):
        with _autocast(precision):
            return run_tower(*args)

    sparse_opt = torch.optim.Adagrad([m.emb.weight], lr=EMB_LR)
    dense_opt = torch.optim.Adam(m.tower.parameters(), lr=LR, fused=True)

    def step(batch):
        loss = tower(m.lookup(batch), batch.dense, batch.labels)
        sparse_opt.zero_grad(set_to_none=True)
        dense_opt.zero_grad(set_to_none=True)
        loss.backward()
        sparse_opt.step()
        dense_opt.step()
        return loss

    return step


FBGEMM, FBGEMM_WHY = optional(import_fbgemm)


def build_fbgemm(name: str, compiled: bool, precision: str = "fp32"):
    """FBGEMM TBE lookup (row-wise Adagrad fused into its backward) + the eager peers' tower."""
    F = FBGEMM
    TBE, Loc, Dev, Pool, Opt = (F[k] for k in ("TBE", "EmbeddingLocation", "ComputeDevice",
                                                "PoolingMode", "OptimType"))
    torch.manual_seed(0)
    tower = DenseDLRM() if name == "dlrm" else DenseDCN()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tbe = TBE([(n, D, Loc.HOST, Dev.CPU) for n in ROWS], optimizer=Opt.EXACT_ROWWISE_ADAGRAD,
                  learning_rate=EMB_LR, eps=1e-8, pooling_mode=Pool.SUM)
    with torch.no_grad():
        for w in tbe.split_embedding_weights():
            w.normal_(0, 0.1 / D**0.5)
    run_tower = torch.compile(tower) if compiled else tower
    dense_opt = torch.optim.Adam(tower.parameters(), lr=LR, fused=True)

    def step(batch):
        pooled = tbe(batch.indices, batch.offsets)  # [B, T*D], the batch's table-major layout
        with _autocast(precision):
            loss = run_tower(pooled, batch.dense, batch.labels)
        dense_opt.zero_grad(set_to_none=True)
        loss.backward()  # the TBE rows are updated inside its backward
        dense_opt.step()
        return loss

    return step


def recipe_regularisers(name: str) -> dict:
    """``adrec_recipe``'s settings: the regularisers of the model's default training recipe
    (``training/recipes.py``: the lazy embedding L2 inside the fused update, dropout in the
    MLPs), applied to this file's shapes."""
    from adrec_fast.training import recipes

    r = recipes.recipe(name).model
    return {"embedding_l2": r["embedding_l2"], "dropout": r["dropout"]}


def build_adrec(name: str, precision: str = "fp32", regularised: bool = False):
    torch.manual_seed(0)
    kw = DLRM_KW if name == "dlrm" else DCN_KW
    if regularised:  # the training recipe's regularisers on the same architecture
        kw = {**kw, **recipe_regularisers(name)}
    model = build_model(name, criteo_schema(), embedding_dim=D, pooling="sum",
                        precision=precision, **kw)
    model.train()
    for c in model.embedding_collections():
        c.optimizer.lr = EMB_LR
    opt = torch.optim.Adam(model.dense_parameters(), lr=LR, fused=True)

    def step(batch):
        loss = model.loss(model(batch), batch.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


_BATCHES: list[Batch] = []


def _batches() -> list[Batch]:
    if not _BATCHES:
        from conftest import QUICK

        _BATCHES.extend(make_batches(max_batches=8 if QUICK else 256))
    return _BATCHES


PROVIDERS = ["adrec", "adrec_recipe", "eager", "compile", "fbgemm", "fbgemm_compile"]


def build(provider: str, model: str, precision: str):
    """The step function ``step(batch) -> loss`` of one provider."""
    if provider.startswith("adrec"):
        return build_adrec(model, precision, regularised=provider == "adrec_recipe")
    if provider.startswith("fbgemm"):
        if FBGEMM is None:
            raise RuntimeError(f"fbgemm_gpu unavailable: {FBGEMM_WHY}")
        return build_fbgemm(model, provider == "fbgemm_compile", precision)
    if provider in ("eager", "compile"):
        return build_eager(model, provider == "compile", precision)
    raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")


# torch's own warnings in the peers' paths (compile touches torch.jit.script_method and .grad
# of non-leaf tensors while tracing; sparse Adagrad builds COO tensors without invariant checks)
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
@pytest.mark.filterwarnings("ignore:Sparse invariant checks are implicitly disabled:UserWarning")
@pytest.mark.benchmark(group="train_step")
@pytest.mark.parametrize("provider", ["adrec", "adrec_recipe", "eager", "compile", "fbgemm",
                                      "fbgemm_compile"])
@pytest.mark.parametrize("model", ["dlrm", "dcnv2"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_step(benchmark, precision, model, provider):
    from conftest import bench_rounds

    if provider.startswith("fbgemm") and FBGEMM is None:
        pytest.skip(f"fbgemm_gpu unavailable: {FBGEMM_WHY}")
    step = build(provider, model, precision)
    batches = _batches()
    losses = [float(step(b).detach()) for b in batches[:4]]  # warm-up (compiles), sanity check
    assert all(np.isfinite(losses)), losses
    it = iter(range(4, 10**9))

    def one():
        step(batches[next(it) % len(batches)])

    benchmark.extra_info.update({"B": B, "T": T, "D": D, "rows": sum(ROWS), "model": model,
                                 "precision": precision, **_POOL_INFO})
    benchmark.pedantic(one, warmup_rounds=2, rounds=bench_rounds(10), iterations=1)
    benchmark.extra_info["samples_per_s"] = B / benchmark.stats.stats.median


# ---------------------------------------------------------------------------- script mode
# Peers timed by default: the ones that can be the best peer (FBGEMM's fused sparse path, the
# compiled tower); ``eager`` is slower than ``compile`` on every shape and adds minutes.
SCRIPT_PEERS = ["compile", "fbgemm", "fbgemm_compile"]


def main(argv=None) -> None:
    import argparse
    import statistics

    import _harness as H

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    H.add_args(ap, rounds=10)
    ap.add_argument("--models", default=None, help="comma list of dlrm, dcnv2 (default both; "
                    "--quick: dlrm)")
    ap.add_argument("--precision", default="fp32", help="comma list of fp32, bf16")
    ap.add_argument("--providers", default="",
                    help="extra providers beside adrec and " + ", ".join(SCRIPT_PEERS)
                         + " (comma list of " + ", ".join(PROVIDERS) + ")")
    args = H.settle(ap.parse_args(argv))
    if args.models is None:
        args.models = "dlrm" if args.quick else "dlrm,dcnv2"
    models = [m for m in args.models.split(",") if m]
    precisions = [p for p in args.precision.split(",") if p]
    for m in models:
        if m not in ("dlrm", "dcnv2"):
            raise SystemExit(f"--models: unknown {m!r}; choose from dlrm, dcnv2")
    for p in precisions:
        if p not in ("fp32", "bf16"):
            raise SystemExit(f"--precision: unknown {p!r}; choose from fp32, bf16")
    providers = ["adrec"]
    # --quick: one peer that still goes through torch.compile and FBGEMM (compiling is most of
    # a smoke run's time)
    peers = ["fbgemm_compile" if FBGEMM is not None else "compile"] if args.quick else SCRIPT_PEERS
    for p in peers + [p for p in args.providers.split(",") if p]:
        if p not in PROVIDERS:
            raise SystemExit(f"--providers: unknown {p!r}; choose from {PROVIDERS}")
        if p not in providers:
            providers.append(p)
    res = H.Results("Whole-model training step (B=4096, D=16, 26 Criteo tables, fresh batches)")
    if FBGEMM is None:
        providers = [p for p in providers if not p.startswith("fbgemm")]
        res.notes.append(f"FBGEMM peers skipped: fbgemm_gpu unavailable ({FBGEMM_WHY})")
    print(H.header(args, "bench_train"), flush=True)
    batches = make_batches(max_batches=8 if args.quick else 256)
    res.notes.append(f"pool: {_POOL_INFO['batches']} batches touching "
                     f"{_POOL_INFO['touched_MB']} MB of embedding rows "
                     f"({_POOL_INFO['l3_multiple']}x L3)")
    res.notes.append("Target: adrec >= 1.25x the best peer in fp32, median of >= 3 runs.")
    stream = H.cycle(batches)
    steps = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notes on the peers' compile/sparse paths
        for prec in precisions:
            for m in models:
                case = steps[(prec, m)] = {}
                for p in providers:
                    case[p] = build(p, m, prec)
                    loss = float(case[p](next(stream)).detach())  # compiles; sanity check
                    if not np.isfinite(loss):
                        raise SystemExit(f"{m} {prec} {p}: first loss is {loss}")
                print(f"built {m} {prec}: {', '.join(case)}", flush=True)
        for run in range(args.runs):
            l0 = H.load1()
            for (prec, m), case in steps.items():
                H.warm(case, stream, seconds=0.0 if args.quick else 1.0,
                       min_calls=1 if args.quick else 2)
                times = H.alternate(case, stream, args.rounds)
                res.add(f"{m} {prec}", times)
                print(f"run {run + 1}: {m} {prec}: " + ", ".join(
                    f"{p} {statistics.median(t) * 1e3:.1f} ms" for p, t in times.items()),
                    flush=True)
            res.loads.append((l0, H.load1()))
    print()
    print(res.markdown(best_peer=True, own=("adrec_recipe",)))


if __name__ == "__main__":
    main()
