# SPDX-License-Identifier: Apache-2.0
"""Training throughput of whole models (issue 3 Done-when): DLRM and DCN-v2, B=4096, the 26
Criteo Kaggle tables capped at 1e6 rows (5.57M rows), D=16, 13 dense features, 2 threads.
One timed round = one full training step: forward, fused sigmoid-BCE, backward, embedding update
and dense optimizer step. samples/s = B / median step time (``extra_info["samples_per_s"]``).

Providers (the same architecture and the same dense optimizer, Adam(fused=True), everywhere):
  adrec     adrec_fast.models (one fused EmbeddingBagCollection, row-wise Adagrad fused into
            the backward; fused dot/BCE ops; in fp32 the tower's products run through oneDNN
            with bias+ReLU fused, ``models._dense``: ``ADREC_DENSE=aten`` measures the ATen/MKL
            path instead; GEMM widths padded to multiples of 16)
  adrec_recipe  ``adrec`` with the default recipe's regularisers (embedding L2 1.0 as lazy
            decay inside the fused update, dropout 0.2 in the MLPs): what the CLI trains
  eager     plain PyTorch: one concatenated nn.EmbeddingBag(sparse=True) with torch.optim.Adagrad
            on its sparse gradient, torch interaction code, F.binary_cross_entropy_with_logits
  compile   ``eager`` with its dense tower (interaction, MLPs, loss) under torch.compile (the
            sparse-gradient EmbeddingBag stays eager: compiled graphs do not emit sparse grads)
  fbgemm    FBGEMM TBE embeddings (fbgemm-gpu-cpu ``SplitTableBatchedEmbeddingBagsCodegen``,
            EmbeddingLocation.HOST / ComputeDevice.CPU, EXACT_ROWWISE_ADAGRAD fused into its
            backward, the batch's own TBE layout) under the ``eager`` tower
  fbgemm_compile  ``fbgemm`` with the tower under torch.compile (the strongest peer: FBGEMM's
            fused sparse path plus the compiled dense tower); skipped without fbgemm_gpu

Precision (``precision`` parameter): ``fp32`` everywhere, or ``bf16`` mixed precision for every
provider alike: adrec ``build_model(..., precision="bf16")``; the peers' towers (eager, compiled,
on FBGEMM) run under ``torch.autocast("cpu", dtype=torch.bfloat16)``. Parameters, optimizer
state and embedding tables stay fp32 in both; compare bf16 only with bf16.

    python -m pytest bench/bench_train.py --benchmark-only --benchmark-columns=median
    python -m pytest bench/bench_train.py --benchmark-only --benchmark-json=/tmp/train.json
"""
from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from peers import import_fbgemm, optional
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
N_BATCHES = 4
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


def make_batches(seed: int = 0) -> list[Batch]:
    """N_BATCHES batches of B rows: one uniform id per table, Gaussian dense, random labels."""
    g = np.random.default_rng(seed)
    out = []
    for _ in range(N_BATCHES):
        ids = np.concatenate([g.integers(0, n, B) for n in ROWS])  # [T*B] table-major
        out.append(Batch(indices=torch.from_numpy(ids), offsets=torch.arange(T * B + 1),
                         dense=torch.from_numpy(g.standard_normal((B, N_DENSE), dtype=np.float32)),
                         labels=torch.from_numpy((g.random(B) < 0.25).astype(np.float32)),
                         vectors=torch.zeros(B, 0), num_bags=T))
    return out


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


#: ``adrec_recipe``: the regularisers of the default training recipe (models/recipes.py), i.e.
#: the lazy embedding L2 inside the fused update and dropout in the MLPs, on the same shapes
RECIPE_L2 = 1.0
RECIPE_DROPOUT = 0.2


def build_adrec(name: str, precision: str = "fp32", regularised: bool = False):
    torch.manual_seed(0)
    kw = DLRM_KW if name == "dlrm" else DCN_KW
    if regularised:  # the training recipe's regularisers on the same architecture
        kw = {**kw, "embedding_l2": RECIPE_L2, "dropout": RECIPE_DROPOUT}
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
        _BATCHES.extend(make_batches())
    return _BATCHES


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

    if provider.startswith("adrec"):
        step = build_adrec(model, precision, regularised=provider == "adrec_recipe")
    elif provider.startswith("fbgemm"):
        if FBGEMM is None:
            pytest.skip(f"fbgemm_gpu unavailable: {FBGEMM_WHY}")
        step = build_fbgemm(model, provider == "fbgemm_compile", precision)
    else:
        step = build_eager(model, provider == "compile", precision)
    batches = _batches()
    losses = [float(step(b).detach()) for b in batches]  # warm-up (compiles) and a sanity check
    assert all(np.isfinite(losses)), losses
    it = iter(range(10**9))

    def one():
        step(batches[next(it) % N_BATCHES])

    benchmark.extra_info.update({"B": B, "T": T, "D": D, "rows": sum(ROWS), "model": model,
                                 "precision": precision})
    benchmark.pedantic(one, warmup_rounds=2, rounds=bench_rounds(10), iterations=1)
    benchmark.extra_info["samples_per_s"] = B / benchmark.stats.stats.median
