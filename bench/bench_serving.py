# SPDX-License-Identifier: Apache-2.0
"""Serving latency: one user against N candidates, for every model the Scorer serves: DLRM,
DCN-v2, DeepFM and DIN (history length 50), against eager PyTorch and torch.compile of the same
model in the same precision.

Schema (Criteo-like, ``criteo_schema``): 26 categorical fields C1..C26, table sizes Criteo
Kaggle's capped at 1e6 rows (5.57M rows in all, D=16), and 13 dense fields I1..I13
(log1p_standardize). C1..C13 and the dense fields are user/context-side (one value per request),
C14..C26 candidate-side (N values). The big tables hash their values (``vocab: hash``,
hash_size = the table size); C6, C9 (user side) and C14, C17, C20 (candidate side) have a built
vocabulary (table size - 1 values), so ``Scorer.score`` runs both encoders. DIN adds ``hist``, a
user-side behaviour history (multi_categorical, sequence: true, share_with C16, 50 values per
request), whose target is C16. Models (D=16, pooling sum, fp32): DLRM bottom 13-512-256-64-16,
top 512-256; DCN-v2 3 cross layers + 512-256, parallel; DeepFM 512-256; DIN 512-256 with FM and
first order. Weights are random: embeddings with std 0.15, first-order tables with std 0.1,
torch's initialisation of the MLPs, the head scaled so that its share of the logit has std 1 on
a random request of 256 candidates and its bias shifted so that their mean logit is 0; so the
probabilities spread over (0, 1), neither all within 0.01 of 0.5 nor saturated, and the output
check below compares something.

A request is drawn as raw values: user {C1..C13: str, I1..I13: float or None[, hist: 50 str]},
candidates {C14..C26: lists of N str}; hashed values are random 32-bit hex strings (distinct
rows), built-vocabulary values come from the vocabulary with 5% unseen ones (id 0). The same
request, encoded outside the clock by the schema (``Schema.lookup``, ``Schema.dense_values``),
gives the id arrays the other providers take: user ids int64 [13], candidate ids int64 [N, 13],
dense float32 [13] (transformed), history ids int64 [50].

Providers (fp32 unless named):

  score         the headline: ``Scorer.score(user, candidates)`` on the raw values
  ids           ``Scorer.ids_path(C14..C26)`` on the id arrays (the Scorer's leanest path),
                where the loaded model has one; else "n/a" with the reason. DIN passes its
                history as ``seqs=[ids int64 [50]]``
  adrec_model   the trained model's own forward on the request expanded to N rows
                (torch.inference_mode; the project's fused ops), from the id arrays
  eager         plain PyTorch (bench/serving_models.py: nn.EmbeddingBag / nn.Embedding + torch
                ops) on a copy of the model's weights, under inference_mode, the user side and
                the history expanded to N rows, from the id arrays
  compile       ``eager`` with its tower (everything after the lookups) under
                torch.compile(dynamic=True)

``--extra``: score_fp16 / score_int8 (float16 / row-wise int8 tables), score_bf16 (MLP weights
in bf16: Scorer mlp="bf16"; "n/a" where the Scorer refuses a variant for a model),
eager_bf16 / compile_bf16 (the tower in bfloat16), eager_qint8 (the MLPs' Linear layers as
torch's dynamic int8 Linear), fbgemm_int8 (DLRM, DCN-v2: FBGEMM IntNBit int8 tables with random
weights, latency only, + the ``eager`` tower, when fbgemm_gpu imports). A second targets table
compares score_bf16 with the best of eager_bf16, compile_bf16 and eager_qint8.

The peers get ids encoded outside the clock, ``score`` pays for its encoding: the comparison is
conservative for ours. Every provider holds its own copy of the tables (two Scorers, two plain
peers), so no provider finds the rows of a request in the cache because another provider has
just served it.

Before timing, at every N, each provider scores the first request of the pool and is compared
with the model's own forward on the same raw request encoded by ``Schema.encode_columns``:
max |p - p_model| <= 1e-5 for fp32 providers, else the run stops (reduced-precision providers
are reported only; fbgemm_int8 is not compared).

Timing: p50 / p99 of sequential requests, N in {1, 64, 512, 4096}, torch intra-op threads 2
(``--threads 1,2`` adds 1). Providers alternate: each round takes the next requests of the pool
and every provider serves the same ones in turn, the order rotating from round to round, so a
change in machine load lands on all of them; within its turn a provider first serves untimed
requests for 2 ms (its threads wake, the previous provider's leftovers clear), then a block of
32 / 16 / 8 / 4 timed sequential requests (N = 1 / 64 / 512 / 4096). The pool of each N touches
>= 4x the L3 in table rows (at most 4096 requests), every request a different user and
different candidates. Rounds continue for ``--seconds`` per (model, N, threads) and until every
provider has ``--min-requests`` timed requests.

Output: one Markdown table per model (p50 / p99 per provider and N), then the targets table
(2 threads): ``score`` p99 against the best same-precision peer p99 (eager, compile) of the same
run, ratio = peer / ours, the target and met / not met, and ``ids`` beside it. Targets: DLRM
10x / 3x / 1.5x / 1.2x at N = 1 / 64 / 512 / 4096; DCN-v2, DeepFM and DIN 5x / 2x / 1.3x / 1.2x.
The 1-minute load is printed before and after every model and the whole run, with the peak RSS
and the setup time (model, checkpoint, providers: a few seconds per model). Peak RSS: about
3.1 GiB for the default run, 4.6 GiB with ``--extra`` for DLRM and DCN-v2 (every provider's
own copy of the 356 MB of tables).

    python bench/bench_serving.py --json /tmp/serving.json         # the 4 models, fp32
    python bench/bench_serving.py --quick                          # smoke run, N in {1, 64}
    python bench/bench_serving.py --models dlrm --extra            # + low-precision providers
    python bench/bench_serving.py --models dlrm --throughput       # + closed-loop throughput
    python bench/bench_serving.py --frappe                         # quantization AUC only

``--throughput``: closed loop, C in {2, 4, 8} client threads each sending its next request when
the last one returns, N = 64, intra-op threads 1 (score, ids, eager).

``--frappe``: DLRM and DCN-v2 trained on the Frappe fit split (bench/frappe_models.py's 80/10/10
split and settings: D=16, batch 256, early stop on the 10% split, embedding lr 0.05); the test
rows are grouped into requests by their user/context fields (user, daytime, weekday, isweekend,
homework, weather, country, city), with item and cost per candidate, and scored by
Scorer.score in fp32, fp16 and int8; AUC against the model's own forward.
"""
from __future__ import annotations

import argparse
import inspect
import itertools
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _harness as H  # noqa: E402
from serving_models import plain_peer  # noqa: E402

import adrec_fast  # noqa: E402, F401
from adrec_fast.data.batch import Batch  # noqa: E402
from adrec_fast.data.schema import Schema  # noqa: E402
from adrec_fast.models.checkpoint import save_checkpoint  # noqa: E402
from adrec_fast.models.registry import build_model  # noqa: E402
from adrec_fast.serving import Scorer  # noqa: E402

CARDS = (1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
         27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572)
ROWS = tuple(min(n, 1_000_000) for n in CARDS)
T, D, N_DENSE = len(ROWS), 16, 13
USER_T = 13  # C1..C13 user/context-side, C14..C26 per candidate
USER_F = [f"C{t + 1}" for t in range(USER_T)]
CAND_F = [f"C{t + 1}" for t in range(USER_T, T)]
DENSE_F = [f"I{i}" for i in range(1, N_DENSE + 1)]
BUILT = ("C6", "C9", "C14", "C17", "C20")  # built vocabularies; every other table hashes
HIST, HIST_OF, HIST_LEN = "hist", "C16", 50
KW = {"dlrm": {"bottom": (512, 256, 64), "top": (512, 256)},
      "dcnv2": {"cross_layers": 3, "hidden": (512, 256), "structure": "parallel"},
      "deepfm": {"hidden": (512, 256)},
      "din": {"hidden": (512, 256)}}
MODELS = tuple(KW)
NS = (1, 64, 512, 4096)
EMB_STD, LIN_STD = 0.15, 0.1
TOL = 1e-5  # max |p - p_model| of an fp32 provider
LEAD_S = 2e-3  # untimed requests at the start of every provider's block (see measure)
FP32_PEERS = ("eager", "compile")
LOW_PEERS = ("eager_bf16", "compile_bf16", "eager_qint8")
EXTRA = ("score_fp16", "score_int8", "score_bf16", "eager_bf16", "compile_bf16", "eager_qint8",
         "fbgemm_int8")
REDUCED = ("score_fp16", "score_int8", "score_bf16", "eager_bf16", "compile_bf16", "eager_qint8")
BASE = ("score", "ids", "adrec_model", "eager", "compile")
TARGETS = {"dlrm": {1: 10.0, 64: 3.0, 512: 1.5, 4096: 1.2}}
TARGETS.update({m: {1: 5.0, 64: 2.0, 512: 1.3, 4096: 1.2} for m in ("dcnv2", "deepfm", "din")})


def vocab_values(name: str, rows: int) -> list[str]:
    """The raw values of a built-vocabulary field: ``rows - 1`` of them (id 0 is OOV)."""
    return [f"{name.lower()}_{i}" for i in range(rows - 1)]


def criteo_schema(history: bool = False) -> Schema:
    """The benchmark's schema, fitted (see the module doc); ``history`` adds DIN's ``hist``."""
    fields = [{"name": f, "type": "dense", "transform": "log1p_standardize"} for f in DENSE_F]
    for t, n in enumerate(ROWS):
        name = f"C{t + 1}"
        if name in BUILT:
            fields.append({"name": name, "type": "categorical", "vocab": "build"})
        else:
            fields.append({"name": name, "type": "categorical", "vocab": "hash", "hash_size": n,
                           "salt": name})
    if history:
        fields.append({"name": HIST, "type": "multi_categorical", "sequence": True,
                       "share_with": HIST_OF, "max_len": HIST_LEN})
    schema = Schema(fields, label="label")
    # fit: every vocabulary value once (sizes = the table sizes), Criteo-like counts for the
    # dense statistics
    g = np.random.default_rng(0)
    n = 4096
    cols = {f: [v for _, v in zip(range(n), itertools.cycle(vocab_values(f, ROWS[int(f[1:]) - 1])))]
            for f in BUILT}
    cols.update({f: g.geometric(0.01, n).astype(np.float64) - 1 for f in DENSE_F})
    schema.fit(cols)
    for f in BUILT:
        card = schema.cardinality(f)
        if card != ROWS[int(f[1:]) - 1]:
            raise AssertionError(f"{f}: table of {card} rows, expected {ROWS[int(f[1:]) - 1]}")
    return schema


# ---------------------------------------------------------------------------- requests
class Request:
    """One request: raw values (``user``, ``user_hist``: with the history, ``cands``) and the same
    values encoded by the schema (numpy and torch views of the same memory)."""

    __slots__ = ("user", "user_hist", "cands", "user_ids", "cand_ids", "dense", "hist_ids",
                 "seqs", "t_user", "t_cand", "t_dense", "t_hist", "n")

    def __init__(self, user, hist, cands, user_ids, cand_ids, dense, hist_ids):
        self.user, self.cands = user, cands
        self.user_hist = {**user, HIST: hist}
        self.user_ids, self.cand_ids = user_ids, cand_ids  # [13], [N, 13] int64
        self.dense, self.hist_ids = dense, hist_ids  # [13] float32, [50] int64
        self.seqs = [hist_ids]  # ids_path's histories
        self.n = cand_ids.shape[0]
        self.t_user, self.t_cand = torch.from_numpy(user_ids), torch.from_numpy(cand_ids)
        self.t_dense, self.t_hist = torch.from_numpy(dense), torch.from_numpy(hist_ids)

    def raw_user(self, history: bool) -> dict:
        return self.user_hist if history else self.user


def _raw(g, field: str, size: int) -> list:
    """``size`` raw values of a categorical field (strings)."""
    t = int(field[1:]) - 1
    if field in BUILT:
        voc = vocab_values(field, ROWS[t])
        pick = g.integers(0, len(voc), size)
        unseen = g.random(size) < 0.05
        return [f"unseen_{i}" if u else voc[i] for i, u in zip(pick.tolist(), unseen.tolist())]
    return [f"{v:08x}" for v in g.integers(0, 2**32, size).tolist()]


def make_pool(schema: Schema, n: int, count: int, seed: int) -> list[Request]:
    """``count`` requests of ``n`` candidates, drawn in columns and encoded column by column."""
    import pyarrow as pa

    g = np.random.default_rng(seed)
    ucols = {f: _raw(g, f, count) for f in USER_F}
    ccols = {f: _raw(g, f, count * n) for f in CAND_F}
    hist = [f"{v:08x}" for v in g.integers(0, 2**32, count * HIST_LEN).tolist()]
    dense = {f: [None if m else float(v) for v, m in
                 zip((g.geometric(0.01, count) - 1).tolist(), (g.random(count) < 0.05).tolist())]
             for f in DENSE_F}

    def enc(field, vals):
        return schema.lookup(field, pa.array(vals, pa.string()))

    uid = np.stack([enc(f, ucols[f]) for f in USER_F], axis=1)  # [count, 13]
    cid = np.stack([enc(f, ccols[f]) for f in CAND_F], axis=1).reshape(count, n, len(CAND_F))
    hid = enc(HIST_OF, hist).reshape(count, HIST_LEN)  # the history reads C16's table
    dv = np.stack([schema.dense_values(f, dense[f]) for f in DENSE_F], axis=1)  # [count, 13]
    out = []
    for i in range(count):
        user = {f: ucols[f][i] for f in USER_F}
        user.update({f: dense[f][i] for f in DENSE_F})
        cands = {f: ccols[f][i * n:(i + 1) * n] for f in CAND_F}
        out.append(Request(user, hist[i * HIST_LEN:(i + 1) * HIST_LEN], cands,
                           np.ascontiguousarray(uid[i]), np.ascontiguousarray(cid[i]),
                           np.ascontiguousarray(dv[i], dtype=np.float32),
                           np.ascontiguousarray(hid[i])))
    return out


def pool_count(n: int, quick: bool) -> int:
    """Requests per pool: their table rows (13 user-side + 13 N candidate-side + 50 history rows
    of D floats) touch >= ``H.fresh_bytes()``; at most 4096 (64 in quick mode), at least 8."""
    per = (USER_T + n * len(CAND_F) + HIST_LEN) * D * 4
    return max(8, min(64 if quick else 4096, -(-H.fresh_bytes() // per)))


def expanded(r: Request, history: bool) -> dict:
    """The raw request as N rows (the user values repeated), for ``Schema.encode_columns``."""
    cols = {f: list(v) for f, v in r.cands.items()}
    for f, v in r.raw_user(history).items():
        cols[f] = [v] * r.n
    return cols


def reference(model, schema: Schema, r: Request, history: bool) -> np.ndarray:
    """The model's own forward on the raw request expanded to N rows and encoded by the schema:
    the probabilities every provider is checked against."""
    with torch.inference_mode():
        return torch.sigmoid(model(schema.encode_columns(expanded(r, history)))).numpy()


# ---------------------------------------------------------------------------- providers
def build(name: str, schema: Schema, tmp: Path):
    """The model ``name`` (random weights, see the module doc) and its checkpoint path."""
    torch.manual_seed(0)
    model = build_model(name, schema, embedding_dim=D, pooling="sum", init_std=EMB_STD,
                        **KW[name])
    model.eval()
    with torch.no_grad():
        if getattr(model, "linear", None) is not None:
            model.linear.ebc.weight.normal_(0.0, LIN_STD)  # first order: zeros when built
        # the head's share of the logit to std 1 and the mean logit to 0 on a random request:
        # torch's initialisation leaves every probability within 0.01 of 0.5, and the FM terms
        # push many to 0 or 1, where the output check sees little
        batch = schema.encode_columns(expanded(make_pool(schema, 256, 1, seed=12345)[0],
                                               name == "din"))
        w, b = model.head.head.weight, model.head.head.bias
        z = model(batch)  # [256]
        w0 = w.clone()
        w.zero_()
        share = float((z - model(batch)).std())
        w.copy_(w0 / share)
        b.sub_(model(batch).mean())  # and the mean logit to 0
    return model, save_checkpoint(tmp / name, model, rng=False)


def adrec_model_fn(model, history: bool):
    def run(r: Request):
        with torch.inference_mode():
            n = r.n
            ids = np.empty((T, n), dtype=np.int64)  # table-major, one id per bag
            ids[:USER_T] = r.user_ids[:, None]
            ids[USER_T:] = r.cand_ids.T
            seq_i, seq_o = {}, {}
            if history:
                seq_i[HIST] = torch.from_numpy(np.tile(r.hist_ids, n))  # [N*L]
                seq_o[HIST] = torch.arange(0, n * HIST_LEN + 1, HIST_LEN)  # [N+1]
            b = Batch(indices=torch.from_numpy(ids.reshape(-1)), offsets=torch.arange(T * n + 1),
                      dense=r.t_dense.expand(n, N_DENSE).contiguous(), labels=torch.zeros(n),
                      vectors=torch.zeros(n, 0), num_bags=T, seq_indices=seq_i,
                      seq_offsets=seq_o)
            return torch.sigmoid(model(b)).numpy()

    return run


def peer_fn(model, compiled: bool, precision: str = "fp32"):
    """``eager`` / ``compile`` (and their bf16 / qint8 variants): its own plain peer."""
    m = plain_peer(model, USER_T, precision)
    tower = torch.compile(m.tower, dynamic=True) if compiled else m.tower

    def run(r: Request):
        with torch.inference_mode():
            emb = m.embed(r.t_user, r.t_cand, r.t_hist)
            return tower(*emb, r.t_dense.expand(r.n, N_DENSE).to(m.dtype)).numpy()

    return run


def ids_fn(sc: Scorer, history: bool):
    """(``Scorer.ids_path`` request function, None) or (None, why it is n/a). A model with a
    history passes it as ``seqs`` (one id array per history); a path without ``seqs`` is n/a."""
    try:
        ip = sc.ids_path(CAND_F)
    except NotImplementedError as e:
        return None, f"n/a: {e}"
    if history:
        if "seqs" not in inspect.signature(ip.__call__).parameters:
            return None, "n/a: ids_path takes no history (no seqs argument)"
        return (lambda r: ip(r.user_ids, r.cand_ids, r.dense, seqs=r.seqs)), None
    return (lambda r: ip(r.user_ids, r.cand_ids, r.dense)), None


def fbgemm_fn(model):
    """FBGEMM IntNBit int8 tables (random weights: latency only) + the ``eager`` tower.
    Returns (fn or None, note)."""
    try:
        from fbgemm_gpu.split_embedding_configs import SparseType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
        from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
            IntNBitTableBatchedEmbeddingBagsCodegen,
        )
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return None, f"fbgemm_int8: fbgemm_gpu not importable here ({type(e).__name__})"
    emb = IntNBitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[(f"C{t + 1}", ROWS[t], D, SparseType.INT8, EmbeddingLocation.HOST)
                         for t in range(T)], device="cpu")
    emb.fill_random_weights()
    m = plain_peer(model, USER_T)

    def run(r: Request):
        with torch.inference_mode():
            n = r.n
            ids = np.empty((T, n), dtype=np.int32)  # table-major, one id per bag
            ids[:USER_T] = r.user_ids[:, None]
            ids[USER_T:] = r.cand_ids.T
            pooled = emb(torch.from_numpy(ids.reshape(-1)),
                         torch.arange(T * n + 1, dtype=torch.int32))  # [N, T*D]
            return m.tower(pooled.view(n, T, D), r.t_dense.expand(n, N_DENSE)).numpy()

    return run, "fbgemm_int8: IntNBit INT8 tables with random weights (latency only)"


def providers_for(name: str, model, path: Path, wanted: list[str], notes: list[str]) -> dict:
    """{provider: fn(Request) -> probabilities [N]} of model ``name``; n/a ones are noted."""
    history = name == "din"
    fns = {}
    if "score" in wanted:
        sc = Scorer.load(path)
        fns["score"] = lambda r, sc=sc: sc.score(r.raw_user(history), r.cands)
    if "ids" in wanted:
        fn, why = ids_fn(Scorer.load(path), history)  # its own Scorer: its own tables
        if fn is None:
            notes.append(f"{name} ids: {why}")
        else:
            fns["ids"] = fn
    if "adrec_model" in wanted:
        fns["adrec_model"] = adrec_model_fn(model, history)
    for p, compiled in (("eager", False), ("compile", True)):
        if p in wanted:
            fns[p] = peer_fn(model, compiled)
    for p, q, mlp in (("score_fp16", "fp16", None), ("score_int8", "int8", None),
                      ("score_bf16", None, "bf16")):
        if p in wanted:
            try:
                sc = Scorer.load(path, quantize=q, mlp=mlp)
            except (ValueError, NotImplementedError) as e:  # a variant this model lacks
                notes.append(f"{name} {p}: n/a: {e}")
                continue
            fns[p] = lambda r, sc=sc: sc.score(r.raw_user(history), r.cands)
    for p, compiled, prec in (("eager_bf16", False, "bf16"), ("compile_bf16", True, "bf16"),
                              ("eager_qint8", False, "qint8")):
        if p in wanted:
            fns[p] = peer_fn(model, compiled, prec)
    # FBGEMM's tables stand in for the lookups of the towers that take the pooled embeddings
    # alone (DLRM, DCN-v2)
    if "fbgemm_int8" in wanted and name in ("dlrm", "dcnv2"):
        fn, note = fbgemm_fn(model)
        notes.append(f"{name} {note}")
        if fn is not None:
            fns["fbgemm_int8"] = fn
    return fns


def check(name: str, fns: dict, ref: np.ndarray, r: Request, notes: list[str]) -> None:
    """Every provider against the model's own forward on request ``r``; an fp32 provider off by
    more than ``TOL`` stops the run."""
    bad = []
    for p, fn in fns.items():
        got = np.asarray(fn(r))
        if p == "fbgemm_int8":  # random tables: latency only
            continue
        if got.shape != ref.shape:
            bad.append(f"{name} {p}: shape {got.shape}, expected {ref.shape}")
            continue
        err = float(np.abs(got - ref).max())
        notes.append(f"{name} {p} N={r.n}: max |p - p_model| = {err:.2e}")
        if p not in REDUCED and not err <= TOL:
            bad.append(f"{name} {p} N={r.n}: max |p - p_model| = {err:.3e} > {TOL}")
    if bad:
        raise SystemExit("output check failed:\n  " + "\n  ".join(bad))


# ---------------------------------------------------------------------------- timing
def block_size(n: int) -> int:
    """Timed requests per provider per round: about 0.5-30 ms of work on 2 cores."""
    return 32 if n <= 1 else 16 if n <= 64 else 8 if n <= 512 else 4


def measure(fns: dict, pool: list[Request], seconds: float, min_requests: int,
            order: int = 0) -> dict:
    """Seconds per request of every provider, for ``seconds`` of wall time in all and at least
    ``min_requests`` timed requests per provider. A round takes the next requests of ``pool``
    and every provider serves the same ones in turn, the order rotating from round to round:
    first untimed requests for ``LEAD_S`` (at least one), then ``block_size(N)`` timed
    sequential requests. The untimed lead lets the provider's threads wake and the previous
    provider's leftovers (its pool threads, the caches) clear: the first requests after a
    switch take up to 1.5x longer and would time the switch, not sequential serving."""
    names = list(fns)
    blk = block_size(pool[0].n)
    lead = 4 * blk  # at most; the lead stops after LEAD_S
    times: dict[str, list[float]] = {p: [] for p in names}
    pos, rounds = 0, 0
    t_end = time.perf_counter() + seconds
    while rounds * blk < min_requests or time.perf_counter() < t_end:
        reqs = [pool[(pos + j) % len(pool)] for j in range(lead + blk)]
        pos += lead + blk
        k0 = (rounds + order) % len(names)
        for p in names[k0:] + names[:k0]:
            fn, ts = fns[p], times[p]
            t_lead = time.perf_counter() + LEAD_S
            for r in reqs[:lead]:
                fn(r)
                if time.perf_counter() > t_lead:
                    break
            for r in reqs[lead:]:
                t0 = time.perf_counter()
                fn(r)
                ts.append(time.perf_counter() - t0)
        rounds += 1
    return times


def stats(ts: list[float]) -> dict:
    a = np.array(ts) * 1e6
    return {"p50_us": float(np.percentile(a, 50)), "p99_us": float(np.percentile(a, 99)),
            "requests": len(ts)}


def throughput(fn, reqs, clients: int, seconds: float):
    """Closed loop: ``clients`` threads, each sending its next request when the last returns."""
    stop = threading.Event()
    counts = [0] * clients
    lats: list[list[int]] = [[] for _ in range(clients)]
    errors = []

    def client(k):
        i = k
        while not stop.is_set():
            r = reqs[i % len(reqs)]
            t0 = time.perf_counter_ns()
            try:
                fn(r)
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))
            lats[k].append(time.perf_counter_ns() - t0)
            counts[k] += 1
            i += clients

    ths = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for th in ths:
        th.start()
    time.sleep(seconds)
    stop.set()
    for th in ths:
        th.join()
    dt = time.perf_counter() - t0
    a = np.concatenate([np.array(x) for x in lats]) / 1e3
    return {"req_per_s": sum(counts) / dt, "p50_us": float(np.percentile(a, 50)),
            "p99_us": float(np.percentile(a, 99)), "errors": len(errors)}


def frappe(json_path=None) -> str:
    """Quantization AUC on Frappe (see the module doc)."""
    import pyarrow as pa
    from frappe_models import DENSE_LR, FRAPPE, MAX_EPOCHS, PATIENCE, SEED, split_frappe

    from adrec_fast.data.metrics import auc
    from adrec_fast.training.loop import Trainer

    if not FRAPPE.is_file():
        raise SystemExit(f"Frappe data not found at {FRAPPE}")
    torch.set_num_threads(2)
    table, (fit_rows, stop_rows, test_rows) = split_frappe()
    table = table.cast(pa.schema([(c, pa.string() if c != "label" else pa.int64())
                                  for c in table.column_names]))
    fields = [{"name": c, "type": "categorical"} for c in table.column_names if c != "label"]
    schema = Schema(fields, label="label").fit(table.take(pa.array(fit_rows)))
    fit_b, stop_b = (schema.encode(table.take(pa.array(r))) for r in (fit_rows, stop_rows))
    test = table.take(pa.array(test_rows))
    labels = np.array(test.column("label").to_pylist())
    cols = {c: test.column(c).to_pylist() for c in test.column_names if c != "label"}
    cand_f = ["item", "cost"]
    user_f = [c for c in cols if c not in cand_f]
    groups: dict = {}
    for i in range(len(labels)):
        groups.setdefault(tuple(cols[c][i] for c in user_f), []).append(i)
    out = [(f"Frappe test split: {len(labels)} rows in {len(groups)} requests "
            f"(user/context = {user_f}; per candidate = {cand_f})\n"),
           ("| model | fp32 forward AUC | Scorer fp32 | fp16 | int8 | bf16 MLP | int8 + bf16 MLP "
            "| fp16 - fp32 | int8 - fp32 | bf16 MLP - fp32 | int8 + bf16 MLP - fp32 "
            "| max abs p diff int8 | max abs p diff bf16 MLP |"),
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for name, kw in (("dlrm", {"top": (256, 128)}),
                     ("dcnv2", {"hidden": (256, 128), "cross_layers": 3})):
        torch.manual_seed(SEED)
        model = build_model(name, schema, embedding_dim=16, **kw)
        Trainer(model, lr=DENSE_LR, embedding_lr=0.05, batch_size=256, seed=SEED,
                patience=PATIENCE, progress=False).fit(fit_b, stop_b, epochs=MAX_EPOCHS)
        model.eval()
        ref = model.predict(schema.encode(test)).numpy()
        res = {"model": name, "forward_auc": auc(labels, ref)}
        with tempfile.TemporaryDirectory() as tmp:
            path = save_checkpoint(Path(tmp) / name, model, rng=False)
            probs = {}
            variants = [("fp32", None, None), ("fp16", "fp16", None), ("int8", "int8", None)]
            variants += [("bf16mlp", None, "bf16"), ("int8_bf16mlp", "int8", "bf16")]
            for key_, q, mlp in variants:
                sc = Scorer.load(path, quantize=q, mlp=mlp)
                p = np.empty(len(labels), dtype=np.float32)
                for key, idx in groups.items():
                    p[idx] = sc.score(dict(zip(user_f, key)),
                                      {c: [cols[c][i] for i in idx] for c in cand_f})
                probs[key_] = p
                res[f"auc_{key_}"] = auc(labels, p)
        res["max_abs_fp32_vs_forward"] = float(np.abs(probs["fp32"] - ref).max())
        res["max_abs_int8"] = float(np.abs(probs["int8"] - probs["fp32"]).max())
        if "bf16mlp" in probs:
            res["max_abs_bf16mlp"] = float(np.abs(probs["bf16mlp"] - probs["fp32"]).max())
        rows.append(res)
        print(json.dumps(res), flush=True)

        def cell(k, delta=False, res=res):
            if f"auc_{k}" not in res:
                return "-"
            return (f"{res[f'auc_{k}'] - res['auc_fp32']:+.5f}" if delta
                    else f"{res[f'auc_{k}']:.5f}")

        out.append(f"| {name} | {res['forward_auc']:.5f} | {cell('fp32')} | {cell('fp16')} | "
                   f"{cell('int8')} | {cell('bf16mlp')} | {cell('int8_bf16mlp')} | "
                   f"{cell('fp16', True)} | {cell('int8', True)} | {cell('bf16mlp', True)} | "
                   f"{cell('int8_bf16mlp', True)} | {res['max_abs_int8']:.2e} | "
                   f"{res.get('max_abs_bf16mlp', float('nan')):.2e} |")
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1))
    return "\n".join(out)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {MODELS}")
    ap.add_argument("--ns", default=",".join(map(str, NS)), help="candidate counts N")
    ap.add_argument("--threads", default="2", help="torch intra-op threads, comma list (1,2)")
    ap.add_argument("--providers", default=None,
                    help=f"comma list (default {','.join(BASE)}, plus the --extra ones)")
    ap.add_argument("--extra", action="store_true",
                    help="DLRM / DCN-v2: + reduced-precision providers and fbgemm_int8")
    ap.add_argument("--seconds", type=float, default=10.0,
                    help="timing per (model, N, threads), all providers together")
    ap.add_argument("--min-requests", type=int, default=200,
                    help="timed requests per provider and (model, N, threads), at least")
    ap.add_argument("--runs", type=int, default=1,
                    help="timing runs per (model, N, threads); tables give medians over them")
    ap.add_argument("--throughput", action="store_true",
                    help="+ closed-loop throughput, N=64, 1 intra-op thread")
    ap.add_argument("--tp-seconds", type=float, default=2.0, help="per throughput run")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: N in {1, 64}, short timings, small pools")
    ap.add_argument("--json", default=None, help="write every result to this file")
    ap.add_argument("--frappe", action="store_true", help="quantization AUC on Frappe only")
    a = ap.parse_args(argv)
    a.models = [m for m in a.models.split(",") if m]
    bad = [m for m in a.models if m not in MODELS]
    if bad or not a.models:
        raise SystemExit(f"--models: unknown {bad or a.models}; choose from {list(MODELS)}")
    try:
        a.ns = [int(x) for x in a.ns.split(",") if x]
        a.threads = [int(x) for x in a.threads.split(",") if x]
    except ValueError as e:
        raise SystemExit(f"--ns and --threads take comma lists of integers ({e})") from None
    if not a.ns or min(a.ns) < 1 or not a.threads or min(a.threads) < 1:
        raise SystemExit(f"--ns and --threads must be integers >= 1 (got {a.ns}, {a.threads})")
    if a.quick:
        a.ns = [n for n in a.ns if n <= 64] or [1]
        a.seconds, a.min_requests, a.runs = min(a.seconds, 0.5), min(a.min_requests, 32), 1
        a.tp_seconds = min(a.tp_seconds, 0.5)
    if a.seconds <= 0 or a.min_requests < 1 or a.runs < 1:
        raise SystemExit("--seconds must be > 0, --min-requests and --runs >= 1")
    known = BASE + EXTRA
    a.providers = (a.providers.split(",") if a.providers
                   else list(BASE) + (list(EXTRA) if a.extra else []))
    bad = [p for p in a.providers if p not in known]
    if bad:
        raise SystemExit(f"--providers: unknown {bad}; choose from {list(known)}")
    return a


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.frappe:
        print(frappe(a.json))
        return
    t_start = time.perf_counter()
    res = {"torch": torch.__version__, "cpus": os.cpu_count(), "l3_mib": H.l3_bytes() >> 20,
           "load1_start": H.load1(), "args": {k: v for k, v in vars(a).items()},
           "latency": [], "throughput": [], "notes": [], "models": {}}
    print(f"serving: models {a.models}, N {a.ns}, threads {a.threads}, {a.runs} run(s) x "
          f"{a.seconds:g} s (>= {a.min_requests} requests) per (model, N, threads), torch "
          f"{torch.__version__}, {os.cpu_count()} CPUs; 1-minute load at start "
          f"{res['load1_start']:.2f}" + ("; QUICK smoke run, timings not meaningful"
                                          if a.quick else ""), flush=True)
    schemas = {h: criteo_schema(history=h) for h in {m == "din" for m in a.models}}
    pools: dict[int, list[Request]] = {}
    for name in a.models:
        history = name == "din"
        schema = schemas[history]
        load0, t0 = H.load1(), time.perf_counter()
        notes: list[str] = []
        with tempfile.TemporaryDirectory() as tmp:
            model, path = build(name, schema, Path(tmp))
            fns = providers_for(name, model, path, a.providers, notes)
        setup_s = time.perf_counter() - t0
        print(f"{name}: model, checkpoint and {len(fns)} providers in {setup_s:.1f} s, peak RSS "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10} MiB", flush=True)
        for n in a.ns:
            if n not in pools:
                pools[n] = make_pool(schema, n, pool_count(n, a.quick), seed=n)
            pool = pools[n]
            ref = reference(model, schema, pool[0], history)
            notes.append(f"{name} N={n}: p_model in [{ref.min():.3f}, {ref.max():.3f}], "
                         f"pool of {len(pool)} requests")
            torch.set_num_threads(max(a.threads))
            check(name, fns, ref, pool[0], notes)
            measure(fns, pool, min(1.0, a.seconds / 4), 1)  # warm-up, not timed
            for threads, run in itertools.product(a.threads, range(a.runs)):
                torch.set_num_threads(threads)
                times = measure(fns, pool, a.seconds, a.min_requests, order=run)
                for p, ts in times.items():
                    row = {"model": name, "provider": p, "threads": threads, "N": n, "run": run,
                           **stats(ts)}
                    res["latency"].append(row)
                cells = ", ".join(f"{r['provider']} {r['p50_us']:.0f}/{r['p99_us']:.0f}"
                                  for r in res["latency"][-len(times):])
                print(f"{name} N={n} threads={threads} run {run}: p50/p99 us {cells}", flush=True)
        if a.throughput:
            torch.set_num_threads(1)
            if 64 not in pools:
                pools[64] = make_pool(schema, 64, pool_count(64, a.quick), seed=64)
            pool = pools[64]
            for p in [x for x in ("score", "ids", "eager") if x in fns]:
                for clients in (2, 4, 8):
                    r = throughput(fns[p], pool, clients, a.tp_seconds)
                    res["throughput"].append({"model": name, "provider": p, "clients": clients,
                                              "N": 64, **r})
        res["models"][name] = {"setup_s": setup_s, "load1_before": load0,
                               "load1_after": H.load1()}
        print(f"{name}: 1-minute load {load0:.2f} before, {H.load1():.2f} after", flush=True)
        res["notes"] += notes
        del fns, model
    res["load1_end"] = H.load1()
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
    res["wall_s"] = time.perf_counter() - t_start
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    print(report(res))


# ---------------------------------------------------------------------------- report
def _median(res: dict, model: str, p: str, threads: int, n: int, key: str) -> float:
    v = [r[key] for r in res["latency"] if (r["model"], r["provider"], r["threads"], r["N"])
         == (model, p, threads, n)]
    return statistics.median(v) if v else float("nan")


def _per_run(res: dict, model: str, p: str, threads: int, n: int) -> dict[int, float]:
    return {r["run"]: r["p99_us"] for r in res["latency"]
            if (r["model"], r["provider"], r["threads"], r["N"]) == (model, p, threads, n)}


def _best_peer(res, model, peers, threads, n) -> tuple[float, str, dict[int, float]]:
    """(median p99, name, per-run p99 of the best peer in each run) of the fastest peer."""
    got = [(_median(res, model, p, threads, n, "p99_us"), p) for p in peers
           if _per_run(res, model, p, threads, n)]
    if not got:
        return float("nan"), "-", {}
    best = min(got)
    runs: dict[int, float] = {}
    for p in peers:
        for k, v in _per_run(res, model, p, threads, n).items():
            runs[k] = min(runs.get(k, float("inf")), v)
    return best[0], best[1], runs


def targets_table(res: dict, threads: int = 2, ours: str = "score",
                  peers: tuple[str, ...] = FP32_PEERS, label: str = "fp32",
                  beside: str | None = "ids") -> str:
    """``ours`` p99 against the best same-precision peer (ratio = peer / ours) per model and N,
    with the target; ``beside`` (the ids path) in the last columns. With several runs: medians,
    and the per-run ratios."""
    lat = [r for r in res["latency"] if r["threads"] == threads]
    if not any(r["provider"] == ours for r in lat):
        return ""
    runs = max(r["run"] for r in lat) + 1
    out = [f"\nTargets, {threads} threads, p99 in µs: {ours} ({label}) against the best "
           f"{label} peer of the same run ({', '.join(peers)}); ratio = peer / {ours}"
           + (f", median of {runs} runs (per-run ratios)" if runs > 1 else "") + "\n",
           f"| model | N | {ours} p50 / p99 | best peer p99 | ratio | target | met |"
           + (f" {beside} p50 / p99 | {beside} ratio |" if beside else ""),
           "|---|---|---|---|---|---|---|" + ("---|---|" if beside else "")]
    for model in dict.fromkeys(r["model"] for r in lat):
        for n in sorted({r["N"] for r in lat if r["model"] == model}):
            o50, o99 = (_median(res, model, ours, threads, n, k) for k in ("p50_us", "p99_us"))
            bp, bname, brun = _best_peer(res, model, peers, threads, n)
            orun = _per_run(res, model, ours, threads, n)
            ratios = [brun[k] / orun[k] for k in orun if k in brun]
            ratio = statistics.median(ratios) if ratios else float("nan")
            tgt = TARGETS[model].get(n)
            met = "-" if tgt is None or ratio != ratio else ("met" if ratio >= tgt else "NOT met")
            per = f" ({', '.join(f'{x:.2f}' for x in ratios)})" if len(ratios) > 1 else ""
            row = (f"| {model} | {n} | {o50:.0f} / {o99:.0f} | {bp:.0f} ({bname}) | "
                   f"{ratio:.2f}x{per} | {f'{tgt}x' if tgt else '-'} | {met} |")
            irun = _per_run(res, model, beside, threads, n) if beside else {}
            if irun:
                i50, i99 = (_median(res, model, beside, threads, n, k)
                            for k in ("p50_us", "p99_us"))
                ir = statistics.median([brun[k] / irun[k] for k in irun if k in brun])
                row += f" {i50:.0f} / {i99:.0f} | {ir:.2f}x |"
            elif beside:
                row += " n/a | n/a |"
            out.append(row)
    return "\n".join(out)


def report(res: dict) -> str:
    out = []
    lat = res["latency"]
    for name in dict.fromkeys(r["model"] for r in lat):
        for threads in sorted({r["threads"] for r in lat}):
            rows = [r for r in lat if r["model"] == name and r["threads"] == threads]
            provs = list(dict.fromkeys(r["provider"] for r in rows))
            runs = max(r["run"] for r in rows) + 1
            out.append(f"\n{name}, {threads} thread(s): p50 / p99 in µs"
                       + (f" (medians of {runs} runs)" if runs > 1 else "") + "\n")
            out.append("| N | " + " | ".join(provs) + " |")
            out.append("|---|" + "---|" * len(provs))
            for n in sorted({r["N"] for r in rows}):
                cells = [f"{_median(res, name, p, threads, n, 'p50_us'):.0f} / "
                         f"{_median(res, name, p, threads, n, 'p99_us'):.0f}" for p in provs]
                out.append(f"| {n} | " + " | ".join(cells) + " |")
            reqs = [r["requests"] for r in rows]
            out.append(f"\n{min(reqs)}-{max(reqs)} requests per provider and N")
    threads = 2 if any(r["threads"] == 2 for r in lat) else max(r["threads"] for r in lat)
    out.append(targets_table(res, threads))
    if any(r["provider"] == "score_bf16" for r in lat):
        out.append(targets_table(res, threads, "score_bf16", LOW_PEERS, "bf16/int8", None))
    tp = res["throughput"]
    if tp:
        out.append("\nclosed-loop throughput, N=64, intra-op threads 1: requests/s (p99 µs)\n")
        out.append("| model | provider | 2 clients | 4 clients | 8 clients | errors |")
        out.append("|---|---|---|---|---|---|")
        for (m, p), grp in itertools.groupby(tp, key=lambda r: (r["model"], r["provider"])):
            grp = list(grp)
            cells = [f"{r['req_per_s']:.0f} ({r['p99_us']:.0f})" for r in grp]
            out.append(f"| {m} | {p} | " + " | ".join(cells)
                       + f" | {sum(r['errors'] for r in grp)} |")
    out.append("")
    out += [f"- {n}" for n in res["notes"]]
    out.append(f"\n1-minute load: {res['load1_start']:.2f} at start, {res['load1_end']:.2f} at "
               f"end; per model (before / after): " + ", ".join(
                   f"{m} {v['load1_before']:.2f} / {v['load1_after']:.2f}"
                   for m, v in res["models"].items()))
    out.append(f"peak RSS {res['peak_rss_mib']} MiB; wall {res['wall_s']:.0f} s; setup (model, "
               "checkpoint, providers) " + ", ".join(f"{m} {v['setup_s']:.1f} s"
                                                     for m, v in res["models"].items()))
    return "\n".join(out)


if __name__ == "__main__":
    main()
