# SPDX-License-Identifier: Apache-2.0
"""Serving latency and throughput: one user against N candidates, DLRM and DCN-v2 of the
training benchmark's shapes (26 Criteo Kaggle tables capped at 1e6 rows = 5.57M rows, D=16,
13 dense features; DLRM bottom 13-512-256-64-16 / top 512-256, DCN-v2 3 cross + 512-256).

Request: C1..C13 and the 13 dense features are user/context-side (one value per request),
C14..C26 are candidate-side (N values). Every provider gets the same numpy arrays (user ids
int64 [13], candidate ids int64 [N, 13], dense float32 [13]; ids within each table) and returns
probabilities as numpy:

  scorer        adrec_fast.serving.Scorer.ids_path: one adrec::serving_dlrm call (fp32 tables,
                fp32 MLP); DCN-v2: one adrec::serving_forward call
  scorer_fp16   the same with float16 tables
  scorer_int8   the same with int8 row-wise tables
  scorer_bf16   fp32 tables, MLP (DCN-v2: cross and deep) weights in bf16 (Scorer mlp="bf16")
  adrec_model   the trained model's own forward on the request expanded to N rows
                (torch.inference_mode; fused ops, one call per layer)
  eager         plain PyTorch: one concatenated nn.EmbeddingBag + torch tower, inference_mode
  compile       ``eager`` with the tower under torch.compile(dynamic=True)
  fbgemm_int8   FBGEMM IntNBitTableBatchedEmbeddingBagsCodegen int8 tables (random weights,
                latency only) + the ``eager`` tower, when fbgemm_gpu is installed
  eager_bf16    same-precision peer of scorer_bf16: ``eager`` with the tower (MLPs,
                interaction, head) in bfloat16
  compile_bf16  ``eager_bf16`` with the tower under torch.compile(dynamic=True)
  eager_qint8   ``eager`` with the MLPs' Linear layers as torch's dynamic int8 quantized Linear
                (int8 weights per tensor, activations quantized per batch)

Latency: p50 / p99 of sequential requests, per provider, N in {1, 64, 512, 4096}, torch intra-op
threads in {1, 2}. Throughput: closed loop, C in {2, 4, 8} client threads each sending its next
request when the last one returns, N = 64, intra-op threads 1.

    python bench/bench_serving.py --json /tmp/serving.json           # everything (~10 min)
    python bench/bench_serving.py --models dlrm --seconds 0.5        # quicker
    python bench/bench_serving.py --frappe                           # quantization AUC only

The ratio tables at the end compare the DLRM 2-thread p99 of ``scorer`` (fp32) with the best
fp32 peer (eager, compile, fbgemm_int8) and of ``scorer_bf16`` with the same and with the best
reduced-precision peer (eager_bf16, compile_bf16, eager_qint8).

``--frappe``: DLRM and DCN-v2 trained on the Frappe fit split (bench/frappe_models.py's 80/10/10
split and settings: D=16, batch 256, early stop on the 10% split, embedding lr 0.05); the test
rows are grouped into requests by their user/context fields (user, daytime, weekday, isweekend,
homework, weather, country, city), with item and cost per candidate, and scored by
Scorer.score in fp32, fp16 and int8; AUC against the model's own forward.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

import adrec_fast  # noqa: F401
from adrec_fast.data.batch import Batch
from adrec_fast.data.schema import Schema
from adrec_fast.models.registry import build_model
from adrec_fast.serving import Scorer
from adrec_fast.models.checkpoint import save_checkpoint

HERE = Path(__file__).resolve().parent
CARDS = (1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
         27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572)
ROWS = tuple(min(n, 1_000_000) for n in CARDS)
T, D, N_DENSE = len(ROWS), 16, 13
USER_T = 13  # C1..C13 user/context-side, C14..C26 per candidate
KW = {"dlrm": {"bottom": (512, 256, 64), "top": (512, 256)},
      "dcnv2": {"cross_layers": 3, "hidden": (512, 256), "structure": "parallel"}}
NS = (1, 64, 512, 4096)


def criteo_schema() -> Schema:
    fields = [{"name": f"I{i}", "type": "dense"} for i in range(1, N_DENSE + 1)]
    fields += [{"name": f"C{t + 1}", "type": "categorical", "vocab": "hash", "hash_size": n,
                "salt": f"C{t + 1}"} for t, n in enumerate(ROWS)]
    return Schema(fields, label="label")


USER_F = [f"C{t + 1}" for t in range(USER_T)]
CAND_F = [f"C{t + 1}" for t in range(USER_T, T)]
FP32_PEERS = ("eager", "compile", "fbgemm_int8")
LOW_PEERS = ("eager_bf16", "compile_bf16", "eager_qint8")


def requests(n: int, count: int, seed: int = 0):
    """``count`` requests: (user ids [13] int64 (C1..C13), candidate ids [n, 13] int64
    (C14..C26), dense [13] float32)."""
    g = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        user = np.array([g.integers(0, ROWS[t]) for t in range(USER_T)], dtype=np.int64)
        cand = np.stack([g.integers(0, ROWS[t], n) for t in range(USER_T, T)], axis=1)
        out.append((user, np.ascontiguousarray(cand, dtype=np.int64),
                    g.standard_normal(N_DENSE).astype(np.float32)))
    return out


# ---------------------------------------------------------------------------- peers
class EagerDLRM(nn.Module):
    """Plain PyTorch DLRM with the adrec model's weights (one concatenated EmbeddingBag)."""

    def __init__(self, model):
        super().__init__()
        self.emb = nn.EmbeddingBag.from_pretrained(model.lookup.ebc.weight.clone(), mode="sum")
        self.bottom, self.top, self.head = model.bottom, model.top, model.head.head
        F_ = T + 1
        self.register_buffer("tri", torch.triu_indices(F_, F_, offset=1), persistent=False)

    def tower(self, pooled, dense):  # pooled [N, T*D], dense [N, 13]
        d = self.bottom(dense)  # [N, D]
        fields = torch.cat([d.unsqueeze(1), pooled.view(-1, T, D)], dim=1)  # [N, F, D]
        z = torch.bmm(fields, fields.transpose(1, 2))[:, self.tri[0], self.tri[1]]  # [N, P]
        h = self.top(torch.cat([d, z], dim=1))
        return torch.sigmoid(h @ self.head.weight + self.head.bias)


class EagerDCN(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.emb = nn.EmbeddingBag.from_pretrained(model.lookup.ebc.weight.clone(), mode="sum")
        self.cw = [w.detach() for w in model.cross.weights]
        self.cb = [b.detach() for b in model.cross.biases]
        self.deep, self.head = model.deep, model.head.head

    def tower(self, pooled, dense):
        x0 = torch.cat([pooled, dense], dim=1)  # [N, K]
        x = x0
        for w, b in zip(self.cw, self.cb):
            x = x0 * torch.nn.functional.linear(x, w, b) + x
        h = torch.cat([x, self.deep(x0)], dim=1)
        return torch.sigmoid(h @ self.head.weight + self.head.bias)


def eager_fn(model, name: str, compiled: bool, precision: str = "fp32"):
    """``precision``: "fp32"; "bf16" (the tower in bfloat16); "qint8" (the MLPs' Linear layers
    as torch's dynamic int8 quantized Linear)."""
    m = (EagerDLRM if name == "dlrm" else EagerDCN)(model).eval()
    dt = torch.bfloat16 if precision == "bf16" else torch.float32
    if precision == "bf16":
        m = copy.deepcopy(m)
        for mod in [m.bottom, m.top, m.head] if name == "dlrm" else [m.deep, m.head]:
            mod.to(torch.bfloat16)
        if name != "dlrm":
            m.cw, m.cb = [w.bfloat16() for w in m.cw], [b.bfloat16() for b in m.cb]
    elif precision == "qint8":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated, still works
            q = torch.ao.quantization.quantize_dynamic
            if name == "dlrm":
                m.bottom = q(m.bottom, {nn.Linear}, dtype=torch.qint8)
                m.top = q(m.top, {nn.Linear}, dtype=torch.qint8)
            else:
                m.deep = q(m.deep, {nn.Linear}, dtype=torch.qint8)
    base = torch.from_numpy(np.concatenate([[0], np.cumsum(ROWS)[:-1]]).astype(np.int64))
    tower = torch.compile(m.tower, dynamic=True) if compiled else m.tower

    def run(user, cand, dense):
        with torch.inference_mode():
            n = cand.shape[0]
            u = torch.from_numpy(user)  # [13]
            c = torch.from_numpy(cand)  # [N, 13]
            ids = torch.cat([u.expand(n, USER_T), c], dim=1) + base  # [N, T] global rows
            pooled = m.emb(ids.reshape(-1), torch.arange(n * T))  # one id per bag
            d = torch.from_numpy(dense).expand(n, N_DENSE)
            return tower(pooled.view(n, T * D).to(dt), d.to(dt)).float().numpy()

    return run


def adrec_model_fn(model):
    def run(user, cand, dense):
        with torch.inference_mode():
            n = cand.shape[0]
            ids = np.empty((T, n), dtype=np.int64)
            ids[:USER_T] = user[:, None]
            ids[USER_T:] = cand.T
            b = Batch(indices=torch.from_numpy(ids.reshape(-1)), offsets=torch.arange(T * n + 1),
                      dense=torch.from_numpy(dense).expand(n, N_DENSE).contiguous(),
                      labels=torch.zeros(n), vectors=torch.zeros(n, 0), num_bags=T)
            return torch.sigmoid(model(b)).numpy()

    return run


def fbgemm_fn(model, name: str):
    """FBGEMM IntNBit int8 tables (random weights: latency only) + the ``eager`` tower.
    Returns (fn or None, note)."""
    try:
        from fbgemm_gpu.split_embedding_configs import SparseType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
        from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
            IntNBitTableBatchedEmbeddingBagsCodegen,
        )
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return None, f"fbgemm_gpu not importable here ({type(e).__name__})"
    emb = IntNBitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[(f"C{t + 1}", ROWS[t], D, SparseType.INT8, EmbeddingLocation.HOST)
                         for t in range(T)], device="cpu")
    emb.fill_random_weights()
    m = (EagerDLRM if name == "dlrm" else EagerDCN)(model).eval()

    def run(user, cand, dense):
        with torch.inference_mode():
            n = cand.shape[0]
            ids = np.empty((T, n), dtype=np.int32)  # table-major, one id per bag
            ids[:USER_T] = user[:, None]
            ids[USER_T:] = cand.T
            pooled = emb(torch.from_numpy(ids.reshape(-1)),
                         torch.arange(T * n + 1, dtype=torch.int32))  # [N, T*D]
            d = torch.from_numpy(dense).expand(n, N_DENSE)
            return m.tower(pooled, d).numpy()

    return run, "fbgemm_int8: IntNBit INT8 tables with random weights (latency only)"


# ---------------------------------------------------------------------------- timing
def latency(fn, reqs, seconds: float, min_reqs: int = 30, max_reqs: int = 1_000_000):
    """p50 / p99 of sequential requests over `seconds` (every provider gets the same window)."""
    for r in reqs[:3]:
        fn(*r)
    lat = []
    t_end = time.perf_counter() + seconds
    for i in itertools.count():
        r = reqs[i % len(reqs)]
        t0 = time.perf_counter_ns()
        fn(*r)
        lat.append(time.perf_counter_ns() - t0)
        if (len(lat) >= min_reqs and time.perf_counter() > t_end) or len(lat) >= max_reqs:
            break
    a = np.array(lat) / 1e3
    return {"p50_us": float(np.percentile(a, 50)), "p99_us": float(np.percentile(a, 99)),
            "requests": len(lat)}


def throughput(fn, reqs, clients: int, seconds: float):
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
                fn(*r)
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


def scorer_fn(sc: Scorer):
    """The Scorer's leanest path for the benchmark's arrays: ``ids_path`` where the model has
    one (DLRM), else ``score_ids`` with the arrays turned into its dicts."""
    try:
        return sc.ids_path(CAND_F)
    except NotImplementedError:
        def run(user, cand, dense):
            return sc.score_ids(dict(zip(USER_F, user.tolist())), dict(zip(CAND_F, cand.T)),
                                dense)
        return run


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="dlrm,dcnv2")
    ap.add_argument("--providers",
                    default="scorer,scorer_fp16,scorer_int8,scorer_bf16,adrec_model,eager,"
                            "compile,fbgemm_int8,eager_bf16,compile_bf16,eager_qint8")
    ap.add_argument("--seconds", type=float, default=1.0, help="per latency configuration")
    ap.add_argument("--tp-seconds", type=float, default=2.0, help="per throughput run")
    ap.add_argument("--json", default=None)
    ap.add_argument("--frappe", action="store_true", help="quantization AUC on Frappe only")
    a = ap.parse_args()
    if a.frappe:
        print(frappe(a.json))
        return
    providers = a.providers.split(",")
    results = {"uptime": os.popen("uptime").read().strip(), "torch": torch.__version__,
               "latency": [], "throughput": [], "notes": []}
    print(results["uptime"], flush=True)
    for name in a.models.split(","):
        torch.manual_seed(0)
        model = build_model(name, criteo_schema(), embedding_dim=D, pooling="sum", **KW[name])
        model.eval()
        with tempfile.TemporaryDirectory() as tmp:
            path = save_checkpoint(Path(tmp) / name, model, rng=False)
            variants = [("scorer", None, None), ("scorer_fp16", "fp16", None),
                        ("scorer_int8", "int8", None)]
            variants.append(("scorer_bf16", None, "bf16"))  # DLRM and DCN-v2 both have it
            scorers = {p: Scorer.load(path, quantize=q, mlp=mlp) for p, q, mlp in variants
                       if p in providers}
        fns = {p: scorer_fn(s) for p, s in scorers.items()}
        if "adrec_model" in providers:
            fns["adrec_model"] = adrec_model_fn(model)
        for p, compiled, prec in (("eager", False, "fp32"), ("compile", True, "fp32"),
                                  ("eager_bf16", False, "bf16"), ("compile_bf16", True, "bf16"),
                                  ("eager_qint8", False, "qint8")):
            if p in providers:
                fns[p] = eager_fn(model, name, compiled, prec)
        if "fbgemm_int8" in providers:
            fn, note = fbgemm_fn(model, name)
            results["notes"].append(note)
            if fn is not None:
                fns["fbgemm_int8"] = fn
        # one correctness check per provider before timing
        chk = requests(64, 1, seed=99)[0]
        ref = adrec_model_fn(model)(*chk)
        for p, fn in fns.items():
            if p == "fbgemm_int8":
                fn(*chk)  # random tables: no value check
                continue
            err = float(np.abs(fn(*chk) - ref).max())
            results["notes"].append(f"{name} {p}: max |p - model forward| = {err:.2e} (N=64)")
            print(results["notes"][-1], flush=True)
        for threads, n in itertools.product((1, 2), NS):
            torch.set_num_threads(threads)
            reqs = requests(n, 8, seed=n)
            for p, fn in fns.items():
                r = latency(fn, reqs, a.seconds)
                row = {"model": name, "provider": p, "threads": threads, "N": n, **r}
                results["latency"].append(row)
                print(json.dumps(row), flush=True)
        torch.set_num_threads(1)
        reqs = requests(64, 16, seed=7)
        for p in [x for x in ("scorer", "scorer_int8", "scorer_bf16", "eager") if x in fns]:
            for clients in (2, 4, 8):
                r = throughput(fns[p], reqs, clients, a.tp_seconds)
                row = {"model": name, "provider": p, "clients": clients, "N": 64, **r}
                results["throughput"].append(row)
                print(json.dumps(row), flush=True)
        del fns, scorers, model
    results["uptime_end"] = os.popen("uptime").read().strip()
    print(results["uptime_end"])
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    print(report(results))
    print(targets(results))


TARGETS = {1: 10.0, 64: 3.0, 512: 1.5, 4096: 1.2}


def targets(res: dict, model: str = "dlrm", threads: int = 2) -> str:
    """p99 ratios against the best peer of the same run (the serving targets in ``TARGETS``)."""
    lat = [r for r in res["latency"] if r["model"] == model and r["threads"] == threads]
    if not lat:
        return ""
    p99 = {(r["provider"], r["N"]): r["p99_us"] for r in lat}
    out = [f"\n{model}, {threads} threads, p99 in µs: ours / best peer = ratio (target)\n",
           ("| N | scorer | best fp32 peer | ratio | scorer_bf16 | ratio vs fp32 peer "
            "| best bf16/int8 peer | ratio vs it | target |"), "|---|---|---|---|---|---|---|---|---|"]

    def best(peers, n):
        got = [(p99[(p, n)], p) for p in peers if (p, n) in p99]
        return min(got) if got else (float("nan"), "-")

    for n in NS:
        f, fp = best(FP32_PEERS, n)
        lo, lp = best(LOW_PEERS, n)
        s32 = p99.get(("scorer", n), float("nan"))
        s16 = p99.get(("scorer_bf16", n), float("nan"))
        out.append(f"| {n} | {s32:.0f} | {f:.0f} ({fp}) | {f / s32:.2f}x | {s16:.0f} | "
                   f"{f / s16:.2f}x | {lo:.0f} ({lp}) | {lo / s16:.2f}x | {TARGETS[n]}x |")
    return "\n".join(out)


def report(res: dict) -> str:
    out = []
    lat = res["latency"]
    for name in sorted({r["model"] for r in lat}):
        for threads in (1, 2):
            rows = [r for r in lat if r["model"] == name and r["threads"] == threads]
            provs = list(dict.fromkeys(r["provider"] for r in rows))
            out.append(f"\n{name}, {threads} thread(s): p50 / p99 in µs\n")
            out.append("| N | " + " | ".join(provs) + " |")
            out.append("|---|" + "---|" * len(provs))
            for n in NS:
                cells = []
                for p in provs:
                    r = next((x for x in rows if x["provider"] == p and x["N"] == n), None)
                    cells.append(f"{r['p50_us']:.0f} / {r['p99_us']:.0f}" if r else "-")
                out.append(f"| {n} | " + " | ".join(cells) + " |")
    tp = res["throughput"]
    if tp:
        out.append("\nclosed-loop throughput, N=64, intra-op threads 1: requests/s (p99 µs)\n")
        out.append("| model | provider | 2 clients | 4 clients | 8 clients | errors |")
        out.append("|---|---|---|---|---|---|")
        for (m, p), grp in itertools.groupby(tp, key=lambda r: (r["model"], r["provider"])):
            grp = list(grp)
            cells = [f"{r['req_per_s']:.0f} ({r['p99_us']:.0f})" for r in grp]
            out.append(f"| {m} | {p} | " + " | ".join(cells) + f" | {sum(r['errors'] for r in grp)} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
