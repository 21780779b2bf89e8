# SPDX-License-Identifier: Apache-2.0
"""Frappe check: LR, FM, DeepFM, DCN-v2, DLRM on ../shared/data/frappe/valid.csv.gz.

The file is split with a fixed seed into fit (80%), early-stop (10%) and test (10%) rows
(``split_frappe``; bench/frappe_deepctr.py uses the same function, so both see the same rows).
The schema (all ten columns categorical) is fitted on the fit rows only. Each model is trained
with every learning rate of a small grid (the same grid size for DeepCTR-Torch), early-stopped
on the early-stop rows; the configuration with the best early-stop AUC is scored on the test
rows.

    python bench/frappe_models.py                 # markdown table on stdout
    python bench/frappe_models.py --json out.json # also the raw numbers
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FRAPPE = (REPO.parent / "shared" / "data" / "frappe" / "valid.csv.gz").resolve()
SEED = 2024
EMBEDDING_DIM = 16
BATCH_SIZE = 256
MAX_EPOCHS = 30
PATIENCE = 2
# the tuning grid: (name, [per-model kwargs]); every model tries the same three learning rates
EMBEDDING_LRS = (0.02, 0.05, 0.1)
DENSE_LR = 1e-3
MODELS = {
    "lr": {},
    "fm": {},
    "deepfm": {"hidden": (256, 128)},
    "dcnv2": {"hidden": (256, 128), "cross_layers": 3, "linear": True},
    "dlrm": {"top": (256, 128)},
}


def split_frappe(path=FRAPPE, seed: int = SEED):
    """The raw Frappe table and (fit, early_stop, test) row indices (80/10/10, fixed seed)."""
    import pyarrow.csv as pcsv

    table = pcsv.read_csv(path)
    n = table.num_rows
    perm = np.random.default_rng(seed).permutation(n)
    a, b = int(0.8 * n), int(0.9 * n)
    return table, (np.sort(perm[:a]), np.sort(perm[a:b]), np.sort(perm[b:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if not FRAPPE.is_file():
        raise SystemExit(f"Frappe data not found at {FRAPPE}")
    import pyarrow as pa
    import torch

    import adrec_fast  # noqa: F401
    from adrec_fast.data.schema import Schema
    from adrec_fast.models.registry import build_model
    from adrec_fast.training.loop import Trainer, evaluate

    torch.set_num_threads(a.threads)
    table, (fit_rows, stop_rows, test_rows) = split_frappe()
    table = table.cast(pa.schema([(c, pa.string() if c != "label" else pa.int64())
                                  for c in table.column_names]))
    fields = [{"name": c, "type": "categorical"} for c in table.column_names if c != "label"]
    schema = Schema(fields, label="label").fit(table.take(pa.array(fit_rows)))
    fit_b, stop_b, test_b = (schema.encode(table.take(pa.array(r)))
                             for r in (fit_rows, stop_rows, test_rows))
    print(f"Frappe: fit {fit_b.batch_size}, early-stop {stop_b.batch_size}, test "
          f"{test_b.batch_size} rows; D={EMBEDDING_DIM}, batch {BATCH_SIZE}", flush=True)
    results = []
    for name in a.models.split(","):
        best = None
        for elr in EMBEDDING_LRS:
            torch.manual_seed(SEED)
            model = build_model(name, schema, embedding_dim=EMBEDDING_DIM, **MODELS[name])
            tr = Trainer(model, lr=DENSE_LR, embedding_lr=elr, batch_size=BATCH_SIZE,
                         seed=SEED, patience=PATIENCE, progress=False)
            t0 = time.perf_counter()
            r = tr.fit(fit_b, stop_b, epochs=MAX_EPOCHS)
            dt = time.perf_counter() - t0
            test = evaluate(model, test_b)
            row = {"model": name, "embedding_lr": elr, "stop_auc": r.best["valid_auc"],
                   "best_epoch": r.best_epoch, "test_auc": test["auc"],
                   "test_logloss": test["logloss"], "test_calibration": test["calibration"],
                   "time_s": dt,
                   "samples_per_s": float(np.mean([h["samples_per_s"] for h in r.history]))}
            print(json.dumps(row), flush=True)
            if best is None or row["stop_auc"] > best["stop_auc"]:
                best = row
        results.append(best)
    print()
    print("| model | test AUC | test logloss | calibration | embedding lr | best epoch | samples/s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['test_auc']:.4f} | {r['test_logloss']:.4f} | "
              f"{r['test_calibration']:.3f} | "
              f"{r['embedding_lr']} | {r['best_epoch']} | {r['samples_per_s']:,.0f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
