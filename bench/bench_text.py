# SPDX-License-Identifier: Apache-2.0
"""Cold start from item text: the id-only model vs the same model with the item's title.

The synthetic generator with ``item_text=True`` and ``item_effect=ITEM_EFFECT`` (titles: topic
words of the item's interest cluster, words of the tercile of its own click effect, and noise:
brands, names, years, punctuation, case). ``item_effect`` is the logit standard deviation of
the item's own term (an effect per interest cluster plus one per item, equal halves), beside
the generator's other components (first order of all 16 fields 1.0, FM 0.6, dense 0.5, history
attention 0.5): at 1.0 the item term is about a third of the logit's variance, as an ad's
creative and category drive a large share of its click rate. The title shows exactly the
item's latent properties: its cluster (topic words) and the tercile of its own effect (quality
words, with probability 0.7). Both models see the same rows.
10% of the items are cold (``cold_items``): the training rows hold none of them, not even in
the histories (``cold_split``). Rows [0, TRAIN) minus the cold items' rows are the training
data (the last 10% of them the validation rows of early stopping); rows [TRAIN, TRAIN + TEST)
are the test rows, sliced into warm (item seen in training: in the fitted vocabulary) and cold
(the rest), as ``adrec-fast eval --cold-col item`` slices them. Both models train with the
model's default recipe (``training.recipes``) on the schema fitted on the training rows (so a
cold item is out of vocabulary); the text model has one more field, ``title``, encoded by the
real all-MiniLM-L6-v2.

    python bench/bench_text.py [--model deepfm] [--seeds 0 1 2] [--rows 300000] [--hist] [--json]
                               [--item-effect 1.0]

Also times the Scorer at N=64 known items with and without the title field
(``--serving``): p50/p99 of ``score`` over interleaved rounds, and the load time.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from adrec_fast.data.schema import Schema
from adrec_fast.data.synthetic import SyntheticCTR
from adrec_fast.training import recipes
from adrec_fast.training.loop import metrics_of, predict

# the item term's logit standard deviation (SyntheticCTR's item_effect); 0: the item is one of
# the 16 fields' first-order and FM terms and the history attention only
ITEM_EFFECT = 1.0


def split(g: SyntheticCTR, rows: int, test_rows: int, hist: bool = False):
    t = g.generate(rows + test_rows)
    t = t if hist else t.drop_columns(["hist"])
    cold = g.cold_items(0.1)
    train, _ = g.cold_split(t.slice(0, rows), cold)
    return train, t.slice(rows), cold


def schema_for(g: SyntheticCTR, train, text: bool, min_count: int = 1) -> Schema:
    d = g.schema(fit=False).to_dict()
    fields = [f for f in d["fields"] if (f["name"] != "hist" or "hist" in train.column_names)
              and (text or f["type"] != "text")]
    for f in fields:
        if f["name"] == "item":  # rarer items are out of vocabulary: the OOV row trains
            f["min_count"] = min_count
    return Schema(fields, label="label").fit(train)


def run(model_name: str, seed: int, rows: int, test_rows: int, epochs: int,
        hist: bool = False, min_count: int = 1, item_effect: float = ITEM_EFFECT,
        overrides: dict | None = None) -> dict:
    g = SyntheticCTR(n_rows=rows, seed=seed, item_text=True, item_effect=item_effect)
    train, test, cold = split(g, rows, test_rows, hist)
    n_valid = train.num_rows // 10
    out = {"seed": seed, "item_effect": item_effect, "train_rows": train.num_rows - n_valid,
           "test_rows": test.num_rows}
    for text in (False, True):
        t0 = time.perf_counter()
        schema = schema_for(g, train.slice(0, train.num_rows - n_valid), text, min_count)
        enc = time.perf_counter() - t0
        tr = schema.encode(train.slice(0, train.num_rows - n_valid))
        va = schema.encode(train.slice(train.num_rows - n_valid))
        te = schema.encode(test)
        torch.manual_seed(seed)
        model, trainer, ep = recipes.build(model_name, schema, seed=seed, progress=False,
                                           **(overrides or {}))
        t1 = time.perf_counter()
        trainer.fit(tr, va, epochs=min(ep, epochs))
        fit_s = time.perf_counter() - t1
        p, y = predict(model, te)
        # warm: the item occurs in the training rows (with min_count 1, in the vocabulary)
        seen = pa.array(sorted(set(train.column("item").to_pylist())))
        warm = pc.is_in(test.column("item"), value_set=seen).to_numpy(zero_copy_only=False)
        key = "text" if text else "id_only"
        out[key] = {"auc": metrics_of(y, p)["auc"],
                    "warm_auc": metrics_of(y[warm], p[warm])["auc"],
                    "cold_auc": metrics_of(y[~warm], p[~warm])["auc"],
                    "warm_rows": int(warm.sum()), "cold_rows": int((~warm).sum()),
                    "fit_s": round(fit_s, 1), "schema_fit_s": round(enc, 1)}
        print(f"seed {seed} {key}: {out[key]}", flush=True)
    out["cold_gain"] = out["text"]["cold_auc"] - out["id_only"]["cold_auc"]
    out["warm_gain"] = out["text"]["warm_auc"] - out["id_only"]["warm_auc"]
    return out


def serving(model_name: str, rows: int, rounds: int, tmp: str) -> dict:
    """p50/p99 of Scorer.score at N=64 known items, with and without the title field, the two
    alternating round by round; and each version's load time."""
    from adrec_fast.models import build_model
    from adrec_fast.models.checkpoint import save_checkpoint
    from adrec_fast.serving.scorer import Scorer

    g = SyntheticCTR(n_rows=rows, seed=0, item_text=True)
    train, _, _ = split(g, rows, 0)
    rng = np.random.default_rng(0)
    res, scorers = {}, {}
    for text in (False, True):
        schema = schema_for(g, train, text)
        torch.manual_seed(0)
        model_kw, _, _ = recipes.resolve(model_name)
        m = build_model(model_name, schema, **model_kw).eval()
        path = f"{tmp}/{'text' if text else 'id'}"
        save_checkpoint(path, m)
        t0 = time.perf_counter()
        scorers[text] = Scorer.load(path, threads=1)
        res[("text" if text else "id_only") + "_load_s"] = round(time.perf_counter() - t0, 3)
    cols = [f.source for f in scorers[False].schema.fields]
    items = np.array([str(i) for i in range(g.cardinalities[1])])
    known = set(scorers[True].schema.field("item").vocabulary)
    items = np.array([i for i in items if i in known])
    user_cols = [c for c in cols if c not in ("item",)]
    times = {False: [], True: []}
    for r in range(rounds):
        row = g.generate(1).to_pylist()[0] if r == 0 else row
        user = {c: row[c] for c in user_cols if c != "title"}
        pick = rng.choice(items, 64)
        cands = {"item": list(pick)}
        titles = {"title": [g.titles[int(i)] for i in pick]}
        for text in ((False, True) if r % 2 else (True, False)):
            c = {**cands, **titles} if text else cands
            t0 = time.perf_counter_ns()
            scorers[text].score(user, c)
            times[text].append(time.perf_counter_ns() - t0)
    for text in (False, True):
        x = np.array(times[text][rounds // 10:]) / 1e3
        key = "text" if text else "id_only"
        res[key + "_p50_us"] = round(float(np.percentile(x, 50)), 1)
        res[key + "_p99_us"] = round(float(np.percentile(x, 99)), 1)
    res["p99_ratio"] = round(res["text_p99_us"] / res["id_only_p99_us"], 3)
    res["p50_ratio"] = round(res["text_p50_us"] / res["id_only_p50_us"], 3)
    # a title never cached: the first request encodes it and runs the torch path; the next
    # request with it finds it cached but still runs the torch path (until a reload)
    first, again = [], []
    for i in range(20):
        pick = rng.choice(items, 64)
        c = {"item": list(pick), "title": [g.titles[int(j)] for j in pick]}
        c["title"][0] = f"Brand-new listing {i}: {g.titles[int(pick[0])]} (2026)"
        for out in (first, again):
            t0 = time.perf_counter_ns()
            scorers[True].score(user, c)
            out.append((time.perf_counter_ns() - t0) / 1e3)
    res["new_title_first_us"] = round(float(np.median(first)), 1)
    res["new_title_cached_torch_us"] = round(float(np.median(again)), 1)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="deepfm")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--test-rows", type=int, default=200_000)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--hist", action="store_true",
                    help="keep the behaviour history (for din): cold items are scrubbed from "
                         "the training rows' histories")
    ap.add_argument("--min-count", type=int, default=1,
                    help="the item vocabulary's min_count: items seen fewer times in training "
                         "share the out-of-vocabulary row, which then trains")
    ap.add_argument("--item-effect", type=float, default=ITEM_EFFECT,
                    help="logit std of the item's own term (SyntheticCTR item_effect)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="recipe overrides for both arms (numbers parsed as floats)")
    ap.add_argument("--serving", action="store_true")
    ap.add_argument("--rounds", type=int, default=20_000)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.serving:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            r = serving(a.model, 50_000, a.rounds, tmp)
        print(json.dumps(r) if a.json else r)
        return
    overrides = {}
    for kv in a.set:
        k, _, v = kv.partition("=")
        try:
            overrides[k] = float(v)
        except ValueError:
            overrides[k] = v
    results = [run(a.model, s, a.rows, a.test_rows, a.epochs, a.hist, a.min_count,
                   a.item_effect, overrides) for s in a.seeds]
    cold = [r["cold_gain"] for r in results]
    warm = [r["warm_gain"] for r in results]
    summary = {"model": a.model, "seeds": a.seeds, "item_effect": a.item_effect,
               "overrides": overrides, "cold_gain": cold, "warm_gain": warm,
               "cold_gain_mean": float(np.mean(cold)), "warm_gain_mean": float(np.mean(warm))}
    # mean and standard deviation over the seeds (ddof 1) of every arm's warm and cold AUC
    for arm in ("id_only", "text"):
        for k in ("warm_auc", "cold_auc"):
            x = [r[arm][k] for r in results]
            summary[f"{arm}_{k}"] = [round(float(np.mean(x)), 4),
                                     round(float(np.std(x, ddof=1)) if len(x) > 1 else 0.0, 4)]
    print(json.dumps({"runs": results, **summary}) if a.json else summary)


if __name__ == "__main__":
    main()
