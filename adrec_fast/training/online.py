# SPDX-License-Identifier: Apache-2.0
"""Online training: one pass over a stream in order, with progressive validation.

Every mini-batch is scored before it is trained on, so the predictions of the whole stream are
out-of-sample and their AUC and logloss (``progressive_auc``, ``progressive_logloss``) measure
the model as it would have served at that moment. The stream is any iterator of pyarrow
RecordBatches / Tables (encoded with the schema) or of encoded ``Batch``es; nothing is held
but the current chunk and one probability and label per row seen.

    result = train_online(model, chunks, schema=schema, trainer=Trainer(model, ...))
    result.progressive_auc, result.windows        # per window of ``window_rows`` rows

Checkpoints (``checkpoint_dir``, every ``checkpoint_every`` rows) hold the trainer's state, the
stream position (rows consumed) and the progressive scores so far; ``resume=True`` restores
them and skips the rows already trained on, so a killed run that is handed the same stream
again trains no row twice and reports the same metrics as an uninterrupted run.

Dynamic tables (``online_schema``: categorical fields without a vocabulary become
``vocab: dynamic``) need no vocabulary pass: a new value gets its own row once admitted. Their
clock is the stream time of ``time_col`` (each step at the latest time seen so far, so a row
that arrives late does not turn the clock back; such rows are counted in ``out_of_order``), or
else the step count. A key first seen in a batch is scored by that batch's training forward,
which admits it, so it is scored with its freshly initialised row (the unadmitted row when
admission waits for more sightings).
"""
from __future__ import annotations

import json
import math
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.batch import Batch
from ..data.metrics import auc, logloss
from ..models import checkpoint as ckpt
from .loop import Trainer, _is_arange

STATE_DIR = "online"  # the checkpoint's directory inside checkpoint_dir
SCORES_FILE = "progressive.npz"
#: rows of the stream's start that fit the dense statistics of a run without a vocabulary pass
STATS_ROWS = 65536


def online_schema(schema, dynamic: bool = True, keep_vocabularies: bool = True):
    """The schema of an online run: a copy in which every categorical table that would learn a
    vocabulary in a pass over the data (``vocab: build`` and no vocabulary given; with
    ``keep_vocabularies=False`` also one given) is a dynamic table (``dynamic``: True; False
    returns ``schema`` as it is). Hashed tables stay as declared, dense statistics as fitted."""
    if not dynamic:
        return schema
    from ..data.schema import Schema

    d = schema.to_dict()
    for f in d["fields"]:
        if not keep_vocabularies:
            f.pop("vocabulary", None)
        if (f["type"] in ("categorical", "multi_categorical") and not f.get("share_with")
                and f.get("vocab", "build") == "build" and f.get("vocabulary") is None):
            f["vocab"] = "dynamic"
            f.pop("min_count", None)
    return Schema.from_dict(d)


@dataclass
class OnlineResult:
    """What one online pass measured.

    progressive_auc / progressive_logloss: over every row of the stream, each scored before the
        model trained on it; windows: the same per window of ``window_rows`` rows
        ([{"start", "stop", "auc", "logloss", "ctr", "mean_prediction"}]); rows: rows trained on
        (this run and any it resumed); samples_per_s: rows per second of this run's loop
        (scoring and training, excluding the stream's own time where it is a generator).
    """

    progressive_auc: float = float("nan")
    progressive_logloss: float = float("nan")
    rows: int = 0
    windows: list[dict] = field(default_factory=list)
    samples_per_s: float = float("nan")
    train_time_s: float = 0.0
    resumed_from: int = 0
    out_of_order: int = 0  # rows whose time_col was earlier than a row before them
    probs: np.ndarray | None = None  # [rows] float32 progressive scores
    labels: np.ndarray | None = None  # [rows] float32

    def metrics(self) -> dict:
        return {"progressive_auc": self.progressive_auc,
                "progressive_logloss": self.progressive_logloss, "rows": self.rows,
                "samples_per_s": self.samples_per_s, "train_time_s": self.train_time_s,
                "resumed_from": self.resumed_from, "out_of_order": self.out_of_order,
                "windows": self.windows}


def scores_in_train_mode(model) -> bool:
    """True when the model's train-mode forward equals its eval-mode forward (no active
    dropout, no batch norm), so the training step's own logits, computed before the update,
    are the progressive scores and progressive validation costs no second forward."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            return False
        if isinstance(m, torch.nn.Dropout) and m.p > 0:
            return False
    return True


def _mini_batches(stream: Iterable, schema, batch_size: int, skip: int,
                  time_col: str | None = None):
    """(Batch of at most ``batch_size`` rows, its rows' times [n] float64 or None) from
    ``stream``, in order, after skipping its first ``skip`` rows. Arrow chunks are encoded with
    ``schema`` and re-cut; a ``Batch`` is cut into pieces of ``batch_size`` rows. A chunk that
    does not encode raises ``DataError`` naming the chunk, its rows in the stream and the field.
    """
    import pyarrow as pa

    from ..data.errors import DataError

    carry: Batch | None = None
    carry_t = None
    seen = 0  # rows of the stream so far, skipped ones included
    for i, item in enumerate(stream):
        t = None
        if isinstance(item, Batch):
            if time_col is not None:
                raise ValueError(f"train_online: time_col {time_col!r} needs Arrow chunks; "
                                 f"stream item {i} is an encoded Batch")
            enc = item
        elif isinstance(item, (pa.RecordBatch, pa.Table)):
            if schema is None:
                raise ValueError("train_online: the stream yields Arrow chunks, so it needs a "
                                 "schema (schema=...) to encode them")
            first = seen
            seen += item.num_rows
            if skip >= item.num_rows:  # skipped without encoding
                skip -= item.num_rows
                continue
            chunk = item.slice(skip) if skip else item
            try:
                if time_col is not None:
                    if time_col not in chunk.column_names:
                        raise DataError(f"no time column (columns: "
                                        f"{', '.join(chunk.column_names)})", field=time_col)
                    t = _times_of(chunk.column(time_col), time_col, None, 0)
                enc = schema.encode(chunk)
            except DataError as e:
                row = f", row {first + skip + e.line}" if e.line is not None else ""
                raise DataError(f"stream chunk {i} (rows {first + skip + 1}-{seen} of the "
                                f"stream{row}): {e.reason}", field=e.field) from None
            skip = 0
        else:
            raise TypeError(f"train_online: stream item {i} is a {type(item).__name__}; "
                            "expected a pyarrow RecordBatch/Table or an adrec_fast Batch")
        if skip:
            if skip >= enc.batch_size:
                skip -= enc.batch_size
                continue
            enc = enc.slice(skip, enc.batch_size)
            skip = 0
        if torch.isnan(enc.labels).any():  # once per chunk, not per step
            bad = int(torch.isnan(enc.labels).nonzero()[0, 0])
            raise ValueError(f"train_online: stream item {i} has no label at its row {bad + 1}; "
                             "an online stream needs the label column")
        if carry is not None:
            enc = Batch.concat([carry, enc])
            t = None if t is None else np.concatenate([carry_t, t])
            carry = carry_t = None
        full = enc.batch_size // batch_size * batch_size
        if full:
            cut = _Cutter(enc, batch_size, full // batch_size)
            for k, start in enumerate(range(0, full, batch_size)):
                yield cut(k), None if t is None else t[start:start + batch_size]
        if full < enc.batch_size:
            carry = enc.slice(full, enc.batch_size)
            carry_t = None if t is None else t[full:]
    if carry is not None and carry.batch_size:
        yield carry, carry_t


class _Cutter:
    """The first ``count`` runs of ``size`` consecutive rows of one encoded ``Batch`` as
    Batches (``cut(k)``: rows [k*size, (k+1)*size)), which the stream path needs rather than a
    gather of arbitrary rows. With one id per bag, everything a step needs is laid out once
    per chunk, so a step takes views: the ids as [count, T, size], each history's offsets
    rebased to each run's start as [count, size + 1] (one gather) and its run boundaries as
    ints; features and labels are slices."""

    def __init__(self, b: Batch, size: int, count: int):
        self.b, self.size = b, size
        T, n = b.num_bags, b.batch_size
        self.one = b.indices.numel() == T * n and _is_arange(b.offsets)
        if not self.one:
            return
        # [count, T, size]: run k's bags, table-major, one contiguous block
        self.ids = b.indices.view(T, n)[:, : count * size].view(T, count, size).transpose(0, 1)
        self.ids = self.ids.contiguous()
        self.offsets = torch.arange(T * size + 1)  # every run's: one id per bag
        at = torch.arange(count + 1) * size  # run boundaries [count + 1]
        pos = at[:-1, None] + torch.arange(size + 1)  # [count, size + 1]
        self.seq = {}  # name -> (run boundaries in its elements, offsets per run)
        for name, so in b.seq_offsets.items():
            runs = so[pos]  # [count, size + 1]
            self.seq[name] = (so[at].tolist(), runs - runs[:, :1])

    def __call__(self, k: int) -> Batch:
        b, size = self.b, self.size
        start, stop = k * size, (k + 1) * size
        if not self.one:
            return b.take(torch.arange(start, stop))
        seq_i, seq_o = {}, {}
        for name, (bounds, rel) in self.seq.items():
            seq_i[name] = b.seq_indices[name][bounds[k]:bounds[k + 1]]
            seq_o[name] = rel[k]
        return Batch(indices=self.ids[k].view(-1), offsets=self.offsets,
                     dense=b.dense[start:stop], labels=b.labels[start:stop],
                     vectors=b.vectors[start:stop], num_bags=b.num_bags,
                     seq_indices=seq_i, seq_offsets=seq_o)


def _window_metrics(y: np.ndarray, p: np.ndarray, start: int) -> dict:
    return {"start": start, "stop": start + int(y.size), "auc": auc(y, p),
            "logloss": logloss(y, p), "ctr": float(y.mean()) if y.size else float("nan"),
            "mean_prediction": float(p.mean()) if p.size else float("nan")}


def _save_state(trainer: Trainer, directory: Path, position: int, probs: list, labels: list,
                extra: dict) -> None:
    """Trainer checkpoint + position + scores so far, written to a temporary directory and
    moved into place in one rename: a kill leaves the previous checkpoint or this one."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / STATE_DIR
    tmp = directory / f".{STATE_DIR}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        trainer.save(tmp, {"online": {"position": int(position), **extra}})
        p = np.concatenate(probs) if probs else np.zeros(0, np.float32)
        y = np.concatenate(labels) if labels else np.zeros(0, np.float32)
        with open(tmp / SCORES_FILE, "wb") as f:
            np.savez(f, probs=p, labels=y)
        ckpt.replace_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_position(checkpoint_dir) -> int | None:
    """The stream position (rows trained on) of ``checkpoint_dir``'s online checkpoint, or
    None when there is none."""
    path = Path(checkpoint_dir) / STATE_DIR / ckpt.META_FILE
    if not path.is_file():
        return None
    doc = json.loads(path.read_text(encoding="utf-8"))
    try:
        return int(doc["metrics"]["online"]["position"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path}: not an online checkpoint (no metrics.online.position)") \
            from None


def _advance_clock(model, times, clock: float, late: int) -> tuple[float, int]:
    """The stream time after a batch with row times ``times`` (None: no time column): counts the
    rows earlier than a time already seen (``late``) and sets the model's stream time (TTL)."""
    if times is not None and times.size:
        late += int((times < np.maximum.accumulate(np.maximum(times, clock))).sum())
        clock = max(clock, float(times.max()))
        model.set_stream_time(math.floor(clock))
    return clock, late


def _score_then_step(model, batch, step, in_train_mode: bool) -> torch.Tensor:
    """The progressive score of ``batch`` (logits, before the model trains on it), then the
    training ``step(batch) -> logits``: a model with dropout or batch norm scores in eval mode
    first; otherwise the step's own forward is the score."""
    if in_train_mode:
        return step(batch)
    model.eval()
    with torch.no_grad():
        score = model(batch)
    model.train()
    step(batch)
    return score


def train_online(model, stream: Iterable, *, schema=None, trainer: Trainer | None = None,
                 batch_size: int | None = None, window_rows: int = 100_000,
                 checkpoint_dir=None, checkpoint_every: int | None = None, resume: bool = False,
                 plot=None, progress: bool = False, exporter=None, time_col: str | None = None,
                 **trainer_kw) -> OnlineResult:
    """One pass over ``stream`` in order with progressive validation (see the module doc).

    Args:
        model: a ``CTRModel`` (trained further in place).
        stream: any iterable of pyarrow RecordBatches/Tables (needs ``schema``; e.g. a Kafka or
            Flink consumer's batches, read as they come) or of ``Batch``es.
        trainer: the ``Trainer`` whose optimizers (and their state) take the steps; default a
            new ``Trainer(model, **trainer_kw)``. The steps run at its base learning rates
            (``lr``, ``embedding_lr``) times its plateau scale; its schedule does not apply.
        batch_size: rows per step (default ``trainer.batch_size``).
        window_rows: rows per window of the windowed metrics.
        checkpoint_dir, checkpoint_every: write ``checkpoint_dir/online`` every that many rows
            (rounded up to whole steps) and at the end; ``resume``: continue from it.
        plot: a PNG path for rolling AUC and logloss per window (skipped with a note on stderr
            when matplotlib is missing).
        exporter: a ``training.export.DeltaExporter``: writes its base at the start position,
            a row delta for serving every ``every_rows`` rows, and a last one at the end.
        time_col: a column of the Arrow chunks (numbers or date-times) that is the clock of the
            model's dynamic tables (their ``ttl`` in its units); rows are trained in the order
            they come, and those earlier than a row before them are counted (``out_of_order``).
    Returns an ``OnlineResult``. Deterministic for a given model, trainer and stream.
    """
    if trainer is None:
        trainer = Trainer(model, progress=False, **trainer_kw)
    elif trainer_kw:
        raise TypeError(f"train_online: pass either trainer or trainer options, not both "
                        f"({sorted(trainer_kw)})")
    if trainer.model is not model:
        raise ValueError("train_online: trainer.model is not the model being trained")
    bs = int(batch_size if batch_size is not None else trainer.batch_size)
    if bs < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if window_rows < 1:
        raise ValueError(f"window_rows must be >= 1, got {window_rows}")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1 rows, got {checkpoint_every}")
    if (checkpoint_every is not None or resume) and checkpoint_dir is None:
        raise ValueError("checkpoint_every and resume need a checkpoint_dir")
    ckdir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    probs: list[np.ndarray] = []  # float32 per step
    labels: list[np.ndarray] = []
    position = 0
    if resume and load_position(ckdir) is not None:
        position = load_position(ckdir)
        trainer.resume(ckdir / STATE_DIR)
        with np.load(ckdir / STATE_DIR / SCORES_FILE) as z:
            if z["probs"].size != position or z["labels"].size != position:
                raise ValueError(f"{ckdir / STATE_DIR / SCORES_FILE}: {z['probs'].size} scores "
                                 f"for stream position {position}; the checkpoint is corrupt")
            probs, labels = [z["probs"]], [z["labels"]]
    resumed_from = position
    # the trainer's base rates (dense and fused embedding) times its plateau scale: an
    # open-ended stream has no total step count for a schedule to decay over
    trainer._set_lr(1.0)
    in_train_mode = scores_in_train_mode(model)
    model.train()
    next_ckpt = position + checkpoint_every if checkpoint_every else None
    t_loop, trained = 0.0, 0
    if exporter is not None:
        exporter.start(position)
    clock, late = -math.inf, 0  # the latest stream time so far; rows earlier than it
    it = _mini_batches(stream, schema, bs, position, time_col)
    while True:
        got = next(it, None)  # the stream's own time (reading, encoding) is not the loop's
        if got is None:
            break
        batch, times = got
        clock, late = _advance_clock(model, times, clock, late)
        y = batch.labels
        t0 = time.perf_counter()
        score = _score_then_step(model, batch, lambda b: trainer.step(b)[0], in_train_mode)
        probs.append(torch.sigmoid(score).float().numpy())
        labels.append(y.float().numpy())
        t_loop += time.perf_counter() - t0
        position += batch.batch_size
        trained += batch.batch_size
        if exporter is not None:
            exporter.observe(batch, position)
        if next_ckpt is not None and position >= next_ckpt:
            _save_state(trainer, ckdir, position, probs, labels, {})
            next_ckpt = position + checkpoint_every
    if exporter is not None:
        exporter.finish(position)
    if ckdir is not None and (checkpoint_every is not None or resume):
        _save_state(trainer, ckdir, position, probs, labels, {"done": True})
    p = np.concatenate(probs) if probs else np.zeros(0, np.float32)
    y = np.concatenate(labels) if labels else np.zeros(0, np.float32)
    windows = [_window_metrics(y[s:s + window_rows], p[s:s + window_rows], s)
               for s in range(0, y.size, window_rows)]
    nan = {"auc": float("nan"), "logloss": float("nan")}
    # the whole stream; with one window, that window
    whole = windows[0] if len(windows) == 1 else _window_metrics(y, p, 0) if y.size else nan
    result = OnlineResult(progressive_auc=whole["auc"], progressive_logloss=whole["logloss"],
                          rows=int(y.size), windows=windows,
                          samples_per_s=trained / t_loop if t_loop > 0 else float("nan"),
                          train_time_s=t_loop, resumed_from=resumed_from, out_of_order=late,
                          probs=p, labels=y)
    if plot is not None:
        plot_online(result, plot)
    if progress:
        print(f"online: {result.rows:,} rows, progressive AUC {result.progressive_auc:.4f}, "
              f"logloss {result.progressive_logloss:.4f}, {result.samples_per_s:,.0f} samples/s",
              flush=True)
    return result


@dataclass
class Freshness:
    """What :func:`freshness` measured. AUCs on the streamed rows: ``frozen_auc`` (the batch
    model, never updated), ``online.progressive_auc`` (a copy trained on them in order, each
    batch scored before its step); ``frozen_windows`` / ``online.windows``: the same per window;
    ``oracle_*``: the AUC of the true click probabilities (per period, and on the streamed
    rows). ``trainer``: the batch model's trainer as the batch part left it; ``tail``: the
    streamed rows, encoded; ``online_model``: the model after the stream."""

    oracle_auc_per_period: list
    oracle_auc_tail: float
    frozen_auc: float
    frozen_windows: list
    online: OnlineResult
    batch_rows: int
    data_s: float
    batch_s: float
    trainer: Trainer
    tail: list
    online_model: object

    @property
    def gain_points(self) -> float:
        """online - frozen, in AUC points (x100)."""
        return 100.0 * (self.online.progressive_auc - self.frozen_auc)

    def metrics(self) -> dict:
        return {"oracle_auc_per_period": self.oracle_auc_per_period,
                "oracle_auc_tail": self.oracle_auc_tail, "frozen_auc": self.frozen_auc,
                "frozen_auc_per_window": self.frozen_windows,
                "online_auc_per_window": [w["auc"] for w in self.online.windows],
                "progressive_auc": self.online.progressive_auc,
                "progressive_logloss": self.online.progressive_logloss,
                "gain_points": self.gain_points, "batch_rows": self.batch_rows,
                "stream_rows": self.online.rows}


def freshness(model: str = "din", *, period_rows: int = 100_000, periods: int = 7,
              batch_periods: int = 5, epochs: int = 2, batch_size: int = 512, lr: float = 2e-3,
              embedding_lr: float = 0.05, seed: int = 0, drift: bool = True,
              dynamic: bool = True, model_kw: dict | None = None,
              window_rows: int | None = None) -> Freshness:
    """Monolith's protocol on the synthetic stream (``SyntheticCTR(drift=drift)``: ads born
    and retired, click rates and interests that move): ``periods`` periods ("days") of
    ``period_rows`` rows; a model (``build_model(model, **model_kw)``, D=16 unless given) is
    trained as a batch on the first ``batch_periods`` (``Trainer.fit``, ``epochs`` shuffled
    epochs); on the rest, the frozen batch model is scored against a copy of it (optimizer
    state included) trained online in one pass (``train_online``, windows of ``window_rows``,
    default a quarter period). ``dynamic``: dynamic tables (the ``train --online`` default;
    else the generator's full vocabularies). Deterministic for a seed."""
    import copy

    from ..data.synthetic import SyntheticCTR
    from ..models.registry import build_model
    from .loop import predict

    P = int(period_rows)
    if P < 1 or not 0 < batch_periods < periods:
        raise ValueError(f"freshness: need period_rows >= 1 and 0 < batch_periods < periods, "
                         f"got {period_rows}, {batch_periods}, {periods}")
    t0 = time.perf_counter()
    gen = SyntheticCTR(seed=seed, drift=drift, period_rows=P, drift_periods=periods)
    schema = online_schema(gen.schema(), dynamic, keep_vocabularies=False)
    batches, probs = [], []
    for table, p in gen.chunks(periods * P, chunk_rows=P, with_probability=True):
        batches.append(schema.encode(table))
        probs.append(p)
    head = Batch.concat(batches[:batch_periods])
    tail = batches[batch_periods:]  # the streamed part, in order
    y_tail = np.concatenate([b.labels.numpy() for b in tail])
    oracle = [auc(b.labels.numpy(), p) for b, p in zip(batches, probs)]
    oracle_tail = auc(y_tail, np.concatenate(probs[batch_periods:]))
    t_data = time.perf_counter() - t0

    torch.manual_seed(seed)
    m = build_model(model, schema, **{"embedding_dim": 16, **(model_kw or {})})
    trainer = Trainer(m, lr=lr, embedding_lr=embedding_lr, batch_size=batch_size, seed=seed,
                      progress=False)
    t1 = time.perf_counter()
    trainer.fit(head, epochs=epochs)
    t_batch = time.perf_counter() - t1
    frozen_p, _ = predict(m, tail)
    w = int(window_rows) if window_rows is not None else max(P // 4, 1)
    tr = copy.deepcopy(trainer)  # the model and its optimizers stay bound to each other
    online = train_online(tr.model, tail, trainer=tr, window_rows=w)
    return Freshness(
        oracle_auc_per_period=oracle, oracle_auc_tail=oracle_tail,
        frozen_auc=auc(y_tail, frozen_p),
        frozen_windows=[auc(y_tail[s:s + w], frozen_p[s:s + w]) for s in range(0, y_tail.size, w)],
        online=online, batch_rows=head.batch_size, data_s=t_data, batch_s=t_batch,
        trainer=trainer, tail=tail, online_model=tr.model)


def _parse_strings(col) -> np.ndarray | None:
    """Strings as float64: numbers, else ISO-8601 date-times (naive, or with a zone such as
    'Z', in seconds since the epoch); None when the whole column reads as neither."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for to in (pa.float64(), pa.timestamp("ns"), pa.timestamp("ns", tz="UTC")):
        try:
            v = pc.cast(col, to)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue
        return v.to_numpy() if to == pa.float64() else pc.cast(v, pa.int64()).to_numpy() / 1e9
    return None


def _times_of(col, col_name: str, path, first_row: int) -> np.ndarray:
    """[rows] float64 seconds (or the plain numbers) of a time column chunk; raises
    ``DataError`` naming the first value that is missing or does not parse (its data row,
    1-based, in ``line``; ``order_by_time`` turns it into a file line where it can)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from ..data.errors import DataError

    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col

    def bad(i: int, why: str):
        v = col[i].as_py()
        return DataError(f"{why}: {v!r}" if v is not None else why, path=path,
                         line=first_row + i + 1, field=col_name, line_kind="row")

    if col.null_count:
        raise bad(int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0]),
                  "missing timestamp")
    t = col.type
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        out = pc.cast(col, pa.float64()).to_numpy()
    elif pa.types.is_timestamp(t) or pa.types.is_date(t):
        out = pc.cast(pc.cast(col, pa.timestamp("ns")), pa.int64()).to_numpy() / 1e9
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        out = _parse_strings(col)
        if out is None:
            for i in range(len(col)):  # the first value that no form reads
                if _parse_strings(col.slice(i, 1)) is None:
                    raise bad(i, "unparsable timestamp (want a number or an ISO-8601 "
                                 "date-time)")
            raise bad(0, "timestamps mix numbers and date-times")
    else:
        raise DataError(f"a time column must hold numbers or date-times, not {t}", path=path,
                        field=col_name)
    if np.isnan(out).any():
        raise bad(int(np.flatnonzero(np.isnan(out))[0]), "timestamp is NaN")
    return out


def _line_of_row(path, row: int) -> int | None:
    """The file line of data row ``row`` (1-based) of a CSV file with a header, counting as
    the reader does (blank lines skipped), or None for other formats. Only on the error path."""
    import gzip

    name = str(path).lower().removesuffix(".gz")
    if not name.endswith((".csv", ".tsv", ".txt")):
        return None
    opener = gzip.open if str(path).lower().endswith(".gz") else open
    seen = 0
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            if line_no == 1 or not line.strip():
                continue
            seen += 1
            if seen == row:
                return line_no
    return None


def order_by_time(chunks, col: str, path="<stream>", rows_are_lines: bool = True,
                  drop: bool = True):
    """All of ``chunks`` (pyarrow Tables) as one Table, stably sorted by the time column
    ``col`` (numbers, or date-times: ISO-8601 strings or Arrow timestamps), which is dropped
    (``drop``; kept, it can be the clock of ``train_online(time_col=col)``).
    Returns (table, rows that moved: 0 when the input was already in order). A missing or
    unparsable timestamp raises ``DataError`` naming the file, the column and the line of a
    CSV file (``rows_are_lines``: no row was skipped, so the n-th row is the n-th non-blank
    line after the header), else the row (1-based, among the rows the chunks hold)."""
    import pyarrow as pa

    from ..data.errors import DataError

    tables, times, n = [], [], 0
    for chunk in chunks:
        if col not in chunk.column_names:
            raise DataError(f"no time column {col!r} (columns: {', '.join(chunk.column_names)})",
                            path=path, field=col)
        try:
            times.append(_times_of(chunk.column(col), col, path, n))
        except DataError as e:
            line = (_line_of_row(path, e.line) if e.line is not None and rows_are_lines
                    else None)
            if line is None:
                raise
            raise DataError(e.reason, path=path, line=line, field=col) from None
        tables.append(chunk.drop_columns([col]) if drop else chunk)
        n += chunk.num_rows
    if not tables:
        return pa.table({}), 0
    table = pa.concat_tables(tables, promote_options="permissive").combine_chunks()
    t = np.concatenate(times)  # [rows]
    order = np.argsort(t, kind="stable")
    moved = int((order != np.arange(order.size)).sum())
    return (table.take(pa.array(order)) if moved else table), moved


def plot_online(result: OnlineResult, path, points: int = 40) -> Path | None:
    """PNG of AUC (left) and logloss (right) over the stream, per window of about
    rows / ``points`` rows (at least 200; ``result.windows`` when the scores are not kept), with
    the progressive values over the whole stream; None (and a note on stderr) without
    matplotlib."""
    import sys

    from .plots import _pyplot, _save, missing_matplotlib

    note = missing_matplotlib()
    if note:
        print(note, file=sys.stderr)
        return None
    windows = result.windows
    if result.probs is not None and result.rows:
        w = max(result.rows // points, min(200, result.rows))
        y, p = result.labels, result.probs
        windows = [_window_metrics(y[s:s + w], p[s:s + w], s) for s in range(0, y.size, w)]
    plt = _pyplot()
    x = [w["stop"] for w in windows]
    size = windows[0]["stop"] - windows[0]["start"] if windows else 0
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    try:
        a.plot(x, [w["auc"] for w in windows], ".-", label=f"AUC per {size:,} rows")
        a.axhline(result.progressive_auc, ls="--", color="gray",
                  label=f"progressive AUC {result.progressive_auc:.4f}")
        b.plot(x, [w["logloss"] for w in windows], ".-", color="C1",
               label=f"logloss per {size:,} rows")
        b.axhline(result.progressive_logloss, ls="--", color="gray",
                  label=f"progressive logloss {result.progressive_logloss:.4f}")
        for ax, name in ((a, "AUC"), (b, "logloss")):
            ax.set_xlabel("rows streamed")
            ax.set_ylabel(name)
            ax.legend()
            ax.grid(alpha=0.3)
        fig.suptitle("online training: progressive validation (each batch scored before its step)")
        return _save(fig, path)
    finally:
        plt.close(fig)
