# SPDX-License-Identifier: Apache-2.0
"""Pretrain, then fine-tune on 10% of a target: fine-tuning against training from scratch, and
LoRA against full fine-tuning.

How source and target are made (``SyntheticCTR``, one world per seed):

* one stream of ``--rows`` rows; its users are split in two populations by the parity of the
  user id: rows of even users form the **source**, rows of odd users the **target**. Items and
  the ad-side fields (c2, c3, ...) are shared; every target user is new to the source model
  (their ids are absent from the source vocabulary, so they start fresh);
* the target's click model is **shifted**: its labels are drawn again from
  ``sigmoid(logit_true + s2[c2] + s3[c3])`` with per-value offsets ``s ~ N(0, --shift)`` drawn
  per seed, so the target's ad-side click rates differ from the source's;
* the source schema is fitted on the source rows, the target schema on the fine-tuning rows
  only (as a real target would be): vocabularies differ, and ``init_from`` maps the values.

The target pool is cut in order: the first 10% (``--fraction``) are the fine-tuning rows, then
``--valid`` rows for early stopping (the same for every arm), then ``--test`` rows for the
reported AUC. The arms, per seed (model, widths and optimizer settings shared):

  pretrained   trained on the source (90/10 split, early stopping)
  zero-shot    the pretrained model scored on the target test rows as it is
  scratch      a fresh model trained on the fine-tuning rows
  fine-tune    ``init_from`` the pretrained model, every weight trains
  freeze-dense ``init_from``, dense part frozen (embeddings only)
  lora:R       ``init_from``, LoRA rank R on the MLP towers (base frozen, head bias trains),
               embeddings train; adapters merged before scoring
  lora:R+biases  the same, with every bias and norm vector of the dense part training
               (``--lora-biases on``)

and the gain of an arm is its test AUC minus the zero-shot AUC (the fine-tuning's own gain;
the gain over scratch is printed beside it). ``LoRA / full`` is the LoRA arm's gain over full
fine-tuning's, both over zero-shot.

    python bench/bench_transfer.py                       # 3 seeds, DeepFM, LoRA ranks 2 and 4
    python bench/bench_transfer.py --quick               # a small check that it runs
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from adrec_fast.data.synthetic import SyntheticCTR
from adrec_fast.models.registry import build_model
from adrec_fast.nn.lora import merge_lora
from adrec_fast.training import transfer as T
from adrec_fast.training.loop import evaluate, fit


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def make_split(seed: int, rows: int, shift: float, fraction: float, n_valid: int,
               n_test: int) -> dict:
    gen = SyntheticCTR(n_rows=rows, seed=seed, n_sparse=8, n_dense=4, n_users=2000,
                       n_items=1000, max_cardinality=1000)
    table, p = next(gen.chunks(rows, chunk_rows=rows, with_probability=True))
    user = pc.cast(table.column("user"), pa.int64()).to_numpy()
    src_rows = np.flatnonzero(user % 2 == 0)
    tgt_rows = np.flatnonzero(user % 2 == 1)
    source = table.take(pa.array(src_rows))
    target = table.take(pa.array(tgt_rows))
    rng = np.random.default_rng([seed, 77])
    logit = np.log(p[tgt_rows]) - np.log1p(-p[tgt_rows])
    for f in ("c2", "c3"):
        ids = pc.cast(target.column(f), pa.int64()).to_numpy()
        logit = logit + rng.normal(0.0, shift, int(ids.max()) + 1)[ids]
    p_t = _sigmoid(logit)
    y = (rng.random(p_t.size) < p_t).astype(np.int64)
    target = target.set_column(target.column_names.index("label"), "label", pa.array(y))
    n_ft = int(round(fraction * target.num_rows))
    if n_ft + n_valid + n_test > target.num_rows:
        raise SystemExit(f"--rows {rows}: the target has {target.num_rows:,} rows, fewer than "
                         f"{n_ft:,} + {n_valid:,} + {n_test:,}")
    ft = target.slice(0, n_ft)
    valid = target.slice(n_ft, n_valid)
    test = target.slice(target.num_rows - n_test, n_test)
    from adrec_fast.data.metrics import auc

    oracle = auc(y[-n_test:], p_t[-n_test:])
    src_schema = gen.schema(fit=False).fit(source)
    tgt_schema = gen.schema(fit=False).fit(ft)
    n_src = source.num_rows
    cut = int(0.9 * n_src)
    return {"gen": gen, "src_schema": src_schema, "tgt_schema": tgt_schema,
            "src_train": src_schema.encode(source.slice(0, cut)),
            "src_valid": src_schema.encode(source.slice(cut)),
            "ft": tgt_schema.encode(ft), "valid": tgt_schema.encode(valid),
            "test": tgt_schema.encode(test), "test_as_source": src_schema.encode(test),
            "oracle": oracle, "n_source": n_src, "n_target": target.num_rows, "n_ft": n_ft}


def _model(args, schema, seed):
    torch.manual_seed(seed)
    return build_model(args.model, schema, embedding_dim=args.embedding_dim,
                       hidden=args.hidden)


def _fit(model, train, valid, args, seed, lr):
    return fit(model, train, valid, epochs=args.epochs, batch_size=args.batch_size, lr=lr,
               embedding_lr=args.embedding_lr, patience=args.patience, seed=seed,
               progress=False)


def run_seed(seed: int, args) -> dict:
    t0 = time.perf_counter()
    d = make_split(seed, args.rows, args.shift, args.fraction, args.valid, args.test)
    out = {"seed": seed, "oracle": d["oracle"], "n_source": d["n_source"],
           "n_target": d["n_target"], "n_ft": d["n_ft"]}
    pre = _model(args, d["src_schema"], seed)
    _fit(pre, d["src_train"], d["src_valid"], args, seed, args.lr)
    out["pretrained_source_auc"] = evaluate(pre, d["src_valid"])["auc"]
    out["zero-shot"] = evaluate(pre, d["test_as_source"])["auc"]
    tgt = d["tgt_schema"]

    def arm(name, prepare, lr):
        m = _model(args, tgt, seed + 1000)
        info = {}
        if prepare is not None:
            info = prepare(m) or {}
        c = T.trainable_counts(m)
        res = _fit(m, d["ft"], d["valid"], args, seed, lr)
        merge_lora(m)
        out[name] = evaluate(m, d["test"])["auc"]
        out[name + "_trainable"] = c
        out[name + "_epochs"] = res.best_epoch
        out.update({f"{name}_{k}": v for k, v in info.items()})

    arm("scratch", None, args.lr)
    arm("fine-tune", lambda m: {"matched_rows": sum(
        f.get("rows") or 0 for f in T.init_from(m, pre).fields.values())}, args.lr)
    arm("freeze-dense", lambda m: (T.init_from(m, pre), T.freeze(m, "dense")) and None, args.lr)
    for r, lr, b in lora_arms(args):
        arm(lora_name(args, r, lr, b),
            lambda m, r=r, b=b: (T.init_from(m, pre),
                                 T.add_adapters(m, r, train_biases=b)) and None, lr)
    out["wall_s"] = time.perf_counter() - t0
    return out


def lora_arms(args):
    return [(r, lr, b) for r in args.ranks for lr in args.lora_lr for b in args.lora_biases]


def lora_name(args, r, lr, biases=False):
    return (f"lora:{r}" + ("+biases" if biases else "")
            + (f"@{lr:g}" if len(args.lora_lr) > 1 else ""))


def _ms(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rows", type=int, default=600_000,
                   help="rows of the stream (about half source, half target)")
    p.add_argument("--fraction", type=float, default=0.1,
                   help="the fine-tuning share of the target pool")
    p.add_argument("--valid", type=int, default=10_000)
    p.add_argument("--test", type=int, default=50_000)
    p.add_argument("--shift", type=float, default=0.5,
                   help="std of the target's per-value logit offsets on c2 and c3")
    p.add_argument("--model", default="deepfm")
    p.add_argument("--hidden", default="256,128")
    p.add_argument("--embedding-dim", type=int, default=16)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--patience", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--embedding-lr", type=float, default=0.05)
    p.add_argument("--lora-lr", default="5e-3",
                   help="learning rate(s) of the LoRA arms (a comma list: one arm per rank and lr)")
    p.add_argument("--ranks", default="2,4")
    p.add_argument("--lora-biases", default="off",
                   help="off, on or off,on: LoRA arms without / with every bias and norm "
                        "vector of the dense part training (add_adapters(train_biases=...))")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the per-seed results here")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.valid, args.test, args.epochs = 120_000, 3000, 10_000, 2
    args.hidden = [int(x) for x in args.hidden.split(",") if x]
    args.ranks = [int(x) for x in args.ranks.split(",") if x]
    args.lora_lr = [float(x) for x in args.lora_lr.split(",") if x]
    try:
        args.lora_biases = [{"off": False, "on": True}[x] for x in args.lora_biases.split(",")]
    except KeyError:
        p.error(f"--lora-biases {args.lora_biases!r}: expected off, on or off,on")
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    results = []
    for s in seeds:
        r = run_seed(s, args)
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if not k.endswith("_trainable")},
                         default=float), flush=True)
    loras = [lora_name(args, r, lr, b) for r, lr, b in lora_arms(args)]
    arms = ["zero-shot", "scratch", "fine-tune", "freeze-dense"] + loras
    print(f"\n{args.model} {args.hidden}, D={args.embedding_dim}; source "
          f"~{results[0]['n_source']:,} rows, fine-tuning on {results[0]['n_ft']:,} target rows "
          f"({args.fraction:.0%}); {len(seeds)} seeds; "
          f"oracle AUC on the target test {_ms([r['oracle'] for r in results])[0]:.4f}")
    print(f"{'arm':18s} {'test AUC':>18s} {'gain vs zero-shot':>20s} {'gain vs scratch':>18s} "
          f"{'dense trained':>14s}")
    full = [r["fine-tune"] - r["zero-shot"] for r in results]
    for a in arms:
        auc_m, auc_s = _ms([r[a] for r in results])
        g0 = _ms([r[a] - r["zero-shot"] for r in results])
        gs = _ms([r[a] - r["scratch"] for r in results])
        tr = results[0].get(a + "_trainable")
        frac = f"{tr['dense_trainable'] / tr['dense']:.2%}" if tr else "-"
        print(f"{a:18s} {auc_m:.4f} ± {auc_s:.4f}  {g0[0]:+.4f} ± {g0[1]:.4f}  "
              f"{gs[0]:+.4f} ± {gs[1]:.4f}  {frac:>14s}")
    for a in loras:
        ratio = [(r[a] - r["zero-shot"]) / g for r, g in zip(results, full)]
        ratio_s = [(r[a] - r["scratch"]) / (r["fine-tune"] - r["scratch"]) for r in results]
        m0, s0 = _ms(ratio)
        m1, s1 = _ms(ratio_s)
        print(f"{a}: gain / full fine-tuning's gain = {m0:.1%} ± {s0:.1%} over zero-shot "
              f"(per seed {', '.join(f'{x:.1%}' for x in ratio)}); over scratch {m1:.1%} ± "
              f"{s1:.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
