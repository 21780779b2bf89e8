# SPDX-License-Identifier: Apache-2.0
"""The Frappe check with DeepCTR-Torch 0.3.0: the same split as bench/frappe_models.py (its
``split_frappe``), the same embedding size, batch size, epoch cap, early-stopping rule and the
same number of tuned configurations (three learning rates per model).

Run with a separate interpreter that has DeepCTR-Torch (it needs ``requests`` at import):

    python -m venv --system-site-packages /tmp/dctr
    /tmp/dctr/bin/pip install deepctr-torch==0.3.0 requests scikit-learn
    /tmp/dctr/bin/python bench/frappe_deepctr.py

Models: LR = DeepFM(use_fm=False, no DNN) (the linear part only), FM = DeepFM(no DNN),
DeepFM, DCN-v2 = DCN(cross_parameterization="matrix"). DeepCTR-Torch has no DLRM. DeepCTR's
defaults are kept otherwise (Adam on all parameters, l2_reg_embedding=1e-5, init_std=1e-4).
Ids are the row ids of our fitted schema (vocabulary from the fit rows, 0 = unseen).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frappe_models import BATCH_SIZE, EMBEDDING_DIM, MAX_EPOCHS, PATIENCE, SEED, split_frappe

LRS = (3e-4, 1e-3, 3e-3)  # Adam learning rates: the same grid size as ours


def encode(table, rows_fit, parts):
    """Per column: vocabulary of the fit rows (1..V, 0 = unseen), like our schema."""
    cols = [c for c in table.column_names if c != "label"]
    out = [{} for _ in parts]
    vocab = {}
    for c in cols:
        raw = np.asarray(table.column(c).to_numpy(zero_copy_only=False)).astype(str)
        uniq = np.unique(raw[rows_fit])
        vocab[c] = len(uniq) + 1
        for d, r in zip(out, parts):
            pos = np.searchsorted(uniq, raw[r])
            pos = np.minimum(pos, len(uniq) - 1)
            d[c] = np.where(uniq[pos] == raw[r], pos + 1, 0).astype(np.int64)
    y = table.column("label").to_numpy().astype(np.float32)
    return cols, vocab, out, [y[r] for r in parts]


def main() -> None:
    import torch
    from deepctr_torch.callbacks import EarlyStopping
    from deepctr_torch.inputs import SparseFeat
    from deepctr_torch.models import DCN, DeepFM
    from sklearn.metrics import log_loss, roc_auc_score

    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    table, (fit_r, stop_r, test_r) = split_frappe()
    cols, vocab, (x_fit, x_stop, x_test), (y_fit, y_stop, y_test) = encode(
        table, fit_r, (fit_r, stop_r, test_r))
    fc = [SparseFeat(c, vocabulary_size=vocab[c], embedding_dim=EMBEDDING_DIM) for c in cols]
    makers = {
        "lr": lambda: DeepFM(fc, fc, use_fm=False, dnn_hidden_units=(), seed=SEED),
        "fm": lambda: DeepFM(fc, fc, use_fm=True, dnn_hidden_units=(), seed=SEED),
        "deepfm": lambda: DeepFM(fc, fc, dnn_hidden_units=(256, 128), seed=SEED),
        "dcnv2": lambda: DCN(fc, fc, cross_num=3, cross_parameterization="matrix",
                             dnn_hidden_units=(256, 128), seed=SEED),
    }
    results = []
    for name, make in makers.items():
        best = None
        for lr in LRS:
            torch.manual_seed(SEED)
            model = make()
            model.compile(torch.optim.Adam(model.parameters(), lr=lr), "binary_crossentropy",
                          metrics=["auc"])
            es = EarlyStopping(monitor="val_auc", patience=PATIENCE, mode="max",
                               restore_best_weights=True)
            t0 = time.perf_counter()
            hist = model.fit(x_fit, y_fit, batch_size=BATCH_SIZE, epochs=MAX_EPOCHS, verbose=0,
                             validation_data=(x_stop, y_stop), callbacks=[es])
            dt = time.perf_counter() - t0
            val = hist.history["val_auc"]
            p = model.predict(x_test, batch_size=4096).reshape(-1)
            row = {"model": name, "lr": lr, "stop_auc": float(max(val)),
                   "best_epoch": int(np.argmax(val)) + 1, "epochs_run": len(val),
                   "test_auc": float(roc_auc_score(y_test, p)),
                   "test_logloss": float(log_loss(y_test, np.clip(p, 1e-7, 1 - 1e-7))),
                   "time_s": dt, "samples_per_s": len(y_fit) * len(val) / dt}
            print(json.dumps(row), flush=True)
            if best is None or row["stop_auc"] > best["stop_auc"]:
                best = row
        results.append(best)
    print()
    print("| model | DeepCTR-Torch test AUC | test logloss | Adam lr | best epoch | samples/s |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['test_auc']:.4f} | {r['test_logloss']:.4f} | {r['lr']} | "
              f"{r['best_epoch']} | {r['samples_per_s']:,.0f} |")


if __name__ == "__main__":
    main()
