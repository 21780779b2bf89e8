# SPDX-License-Identifier: Apache-2.0
"""The parts of a ``train`` command that the one-process CLI (:mod:`adrec_fast.cli`) and the
distributed driver (:mod:`adrec_fast.distributed.train`) share: the one-line error, option and
output-directory checks, the recipe with the command line's flags applied, the schema given or
inferred, the stream and dynamic-table options of ``--online``, and the run's files. Both
import it, so neither imports the other."""
from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path


# The demo's default model: DIN-style target attention over the history, an FM over all fields
# (the pooled history included) and first-order weights, without an MLP (the synthetic truth
# has no deeper structure, so an MLP only adds variance).
DEMO_MODEL_KW = {"din": {"hidden": []}}


class CLIError(Exception):
    """An error reported as one line, without a traceback."""


def _fmt(x) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def _json_line(obj: dict) -> None:
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v

    print(json.dumps({k: clean(v) for k, v in obj.items()}), flush=True)


def _report_warnings(caught) -> None:
    """Print each distinct warning once (a file read twice, to fit and to train, warns twice)."""
    for message in dict.fromkeys(str(w.message) for w in caught):
        print(f"warning: {message}", file=sys.stderr)


def _infer_schema(path, label: str, drop: list[str], model: str | None = None):
    """``infer_schema`` (reading behaviour histories as sequences when ``model`` attends over
    them); when type sniffing fails on a malformed row, re-read the file with the validating
    reader so that the error names the exact line."""
    from .data.errors import DataError
    from .data.pipeline import infer_schema
    from .data.readers import open_reader

    try:
        return infer_schema(path, label=label, drop=drop, histories=_attends(model))
    except DataError:
        for _ in open_reader(path, label=label):  # raises DataError(path, line, field)
            pass
        raise


def _attends(model: str | None) -> bool:
    """Whether model ``model`` attends over behaviour histories (False for an unknown name:
    building the model reports that)."""
    from .models.registry import reads_histories

    try:
        return model is not None and reads_histories(model)
    except ValueError:
        return False


def _warn_without_history(schema, model: str) -> None:
    """A UserWarning when ``model`` attends over behaviour histories and ``schema`` has none: it
    would train without its attention, which is easy to miss."""
    if not _attends(model) or schema.sequence_fields():
        return
    warnings.warn(f"--model {model}: the schema has no behaviour-history (sequence) field, so "
                  "the model trains without target attention; a multi-valued column is read as "
                  "one when its values follow a categorical column's, or declare it in --schema "
                  "(sequence: true, share_with: that column)", UserWarning, stacklevel=2)


# Entries that mark a directory as a saved model: train's run directory, a demo checkpoint.
_MODEL_ENTRIES = {"best", "last", "metrics.json", "checkpoint.json"}


def _fresh_out(out: Path, overwrite: bool) -> None:
    """Refuse an --out that holds a model (unless ``overwrite``) or anything else."""
    if out.exists():
        if not out.is_dir():
            raise CLIError(f"--out {out} exists and is not a directory")
        entries = {p.name for p in out.iterdir()}
        if entries and not (entries & _MODEL_ENTRIES):
            raise CLIError(f"--out {out} exists and does not look like a model directory; "
                           "choose another path")
        if entries and not overwrite:
            raise CLIError(f"--out {out} already holds a model; pass --overwrite to replace it")


def _recipe(a, demo: bool = False) -> tuple[dict, dict, int]:
    """(model kwargs, Trainer kwargs, epochs): the model's default recipe
    (``training.recipes``) with the tuning flags given on the command line applied; the demo
    keeps its own settings (``_demo_settings``) and takes only the model flags."""
    from .training import recipes

    flags = {"embedding_dim": a.embedding_dim, "embedding_l2": a.embedding_l2,
             "dropout": a.dropout, "batch_norm": a.batch_norm}
    if demo:
        return ({"embedding_dim": 16, **DEMO_MODEL_KW.get(a.model, {}),
                 **{k: v for k, v in flags.items() if v is not None}}, {}, 0)
    flags.update(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, embedding_lr=a.embedding_lr,
                 schedule=a.schedule, patience=a.patience)
    try:
        return recipes.resolve(a.model, **{k: v for k, v in flags.items() if v is not None})
    except ValueError as e:
        raise CLIError(str(e)) from None


def _write_run_files(ckdir: Path, result, trainer_valid, extra: dict) -> None:
    from .training.plots import missing_matplotlib, plot_calibration, plot_learning_curves

    (ckdir / "metrics.json").write_text(json.dumps(
        {"history": result.history, "best_epoch": result.best_epoch, **extra}, indent=1,
        default=float), encoding="utf-8")
    note = missing_matplotlib()
    if note:
        print(note, file=sys.stderr)
        return
    if result.history:
        plot_learning_curves(result.history, ckdir / "learning_curves.png")
    if trainer_valid is not None:
        p, y = trainer_valid
        plot_calibration(y, p, ckdir / "calibration.png")


def _train_setup(a):
    """(output directory, made fresh; --drop columns; reader options) of a train command."""
    _check_transfer_options(a)
    out = Path(a.out)
    _fresh_out(out, a.overwrite)
    drop = [c.strip() for c in a.drop.split(",") if c.strip()]
    return out, drop, {"skip_bad_rows": a.skip_bad_rows, "max_bad_rows": a.max_bad_rows}


def _check_transfer_options(a) -> None:
    """--init-from and its companions, checked before any data is read; the target's
    embedding width defaults to the source's."""
    init = getattr(a, "init_from", None)
    for flag, given in (("--freeze", a.freeze), ("--adapter", a.adapter),
                        ("--rename-field", a.rename_field)):
        if given and not init:
            raise CLIError(f"{flag} applies to fine-tuning; add --init-from SOURCE_DIR")
    if not init:
        return
    if getattr(a, "nproc", None) is not None:
        raise CLIError("--init-from runs in one process; leave out --nproc")
    from .models import checkpoint as ckpt
    from .training import transfer

    try:
        if a.freeze is not None:
            transfer.parse_parts(a.freeze)
        if a.adapter is not None:
            transfer.parse_adapter(a.adapter)
    except ValueError as e:
        flag = "--freeze" if "freeze" in str(e) else "--adapter"
        raise CLIError(f"{flag}: {e}") from None
    a.renames = {}
    for item in a.rename_field or []:
        for pair in filter(None, (x.strip() for x in item.split(","))):
            src, eq, dst = pair.partition("=")
            if not eq or not src.strip() or not dst.strip():
                raise CLIError(f"--rename-field {pair!r}: expected SRC=DST")
            a.renames[src.strip()] = dst.strip()
    path = Path(init)
    try:
        doc = ckpt.read_meta(path)
    except (FileNotFoundError, ValueError):
        raise CLIError(f"--init-from {path}: not a trained model (expected a directory written "
                       "by `adrec-fast train`)") from None
    if a.embedding_dim is None:
        a.embedding_dim = int(doc["model"]["embedding_dim"])


def _given_schema(a, drop):
    """The --schema file's schema, or None when the schema is to be inferred."""
    if not a.schema:
        return None
    from .data.schema import Schema

    if drop:
        raise CLIError("--drop applies to an inferred schema; edit the --schema file")
    return Schema.load(a.schema)


def _online_options(a) -> dict | None:
    """The dynamic tables' options of ``train --online`` (None: --static-vocab); misplaced and
    out-of-range flags (DATA '-' included) named before any data is read."""
    flags = (("--min-count", "min_count"), ("--admit-prob", "admit_prob"), ("--ttl", "ttl"),
             ("--capacity", "capacity"), ("--eviction", "eviction"))
    given = [flag for flag, k in flags if getattr(a, k) is not None]
    if not a.online:
        for flag in given + (["--static-vocab"] if a.static_vocab else []):
            raise CLIError(f"{flag} applies to --online training; add --online")
        if a.data == "-":
            raise CLIError("DATA '-' (standard input) is read once, as it arrives: add --online")
    if a.static_vocab:
        if given:
            raise CLIError(f"{given[0]} sets the dynamic tables, and --static-vocab has none")
        return None
    checks = (("--min-count", a.min_count, lambda v: v >= 1, ">= 1"),
              ("--admit-prob", a.admit_prob, lambda v: 0 < v <= 1, "in (0, 1]"),
              ("--ttl", a.ttl, lambda v: v >= 1, ">= 1"),
              ("--capacity", a.capacity, lambda v: v >= 1, ">= 1"))
    for flag, v, ok, want in checks:
        if v is not None and not ok(v):
            raise CLIError(f"{flag} must be {want}, got {v}")
    return {"seed": a.seed, **{k: getattr(a, k) for _, k in flags if getattr(a, k) is not None}}


def _online_data(a, drop, reader_kw):
    """(schema, stream of raw chunks, clock column) of ``train --online``: DATA (a file, or
    '-': standard input as it arrives), in --time-col order for a file; the schema with
    dynamic tables unless --static-vocab, fitted (a vocabulary pass over a file with
    --static-vocab, else the dense statistics of the stream's first rows)."""
    import itertools

    from .data.pipeline import fit_schema
    from .data.readers import open_reader
    from .data.stream import HEAD_LINES, STDIN, piped_csv
    from .training.online import STATS_ROWS, online_schema, order_by_time

    piped = a.data == STDIN
    schema = _given_schema(a, drop)
    tc = a.time_col
    keep = [tc] if tc and (schema is None or tc not in schema.raw_columns()) else []
    if piped:
        if a.static_vocab and (schema is None or not schema.fitted):
            raise CLIError("--static-vocab learns the vocabularies in a pass over DATA, and "
                           "DATA '-' (standard input) is read once: give a file, or a --schema "
                           "with its vocabularies")
        schema, reader = piped_csv(schema=schema, label=a.label, drop=drop + keep, keep=keep,
                                   **reader_kw)
    else:
        if schema is None:
            if tc:  # name a missing --time-col before the schema inference does
                first = next(iter(open_reader(a.data, label=a.label, chunk_rows=16)), None)
                names = first.column_names if first is not None else []
                if tc not in names:
                    raise CLIError(f"--time-col {tc!r}: {a.data} has no such column "
                                   f"(columns: {', '.join(names)})")
            schema = _infer_schema(a.data, a.label, drop + ([tc] if tc else []), a.model)
        reader = None
    if tc and tc == schema.label:
        raise CLIError(f"--time-col {tc!r} is the label column")
    schema = online_schema(schema, dynamic=not a.static_vocab)
    stream = reader
    if not schema.fitted:
        if piped:  # the statistics of the first rows, which are then trained on as well
            it = iter(reader)
            head, n = [], 0
            for chunk in it:
                head.append(chunk)
                n += chunk.num_rows
                if n >= HEAD_LINES:
                    break
            schema.fit(head, max_rows=HEAD_LINES)
            stream = itertools.chain(head, it)
        elif a.static_vocab:  # the vocabularies: one pass over DATA first
            fit_schema(schema, a.data, **reader_kw)
        else:
            fit_schema(schema, a.data, max_rows=STATS_ROWS, **reader_kw)
    if not piped:
        stream = open_reader(a.data, schema=schema, label=schema.label, keep=keep, **reader_kw)
        if tc:
            table, moved = order_by_time(stream, tc, a.data, rows_are_lines=not a.skip_bad_rows,
                                         drop=False)
            if moved:
                print(f"{a.data}: {moved:,} rows out of {tc!r} order; sorted (stable)",
                      file=sys.stderr)
            stream = table.to_batches(max_chunksize=65536)
    return schema, stream, tc
