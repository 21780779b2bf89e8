# SPDX-License-Identifier: Apache-2.0
"""The ``train`` command on several ranks.

``adrec-fast train DATA --out DIR --nproc N`` starts N ranks of the same command on this machine
under torchrun (``launch_train``); ``torchrun ... -m adrec_fast train DATA --out DIR`` (one
machine or several) starts them directly. Each rank then runs ``run_train``:

1. all ranks check that they were started with the same arguments (``check_same_config``);
2. rank 0 checks ``--out``, infers or loads the schema, fits it on the whole of DATA (the pass a
   single process makes) and counts the rows; the other ranks receive the fitted schema, so
   every rank encodes ids alike;
3. each rank reads its own row range of DATA (rows ``[r*n/N, (r+1)*n/N)``; of ``--valid`` too)
   and keeps the rows of its range on each side of the validation split, which is the split a
   single process makes (``valid_mask`` of the row number, the total and the seed);
4. the model is built from the same seed on every rank, its tables sharded by the planner (from
   the ids per table and row of a sample batch, summed over the ranks), the towers put under
   DDP, dropout masks and batch-norm statistics taken over the whole global batch
   (``global_batch_dropout``, ``global_batch_norm``);
5. the global batches are the single process's, in its order (``GlobalOrder``), each rank
   training on ``batch_size / N`` rows of each; validation scores every rank's rows and
   gathers them, so every rank takes the same early-stopping, learning-rate and calibration
   decisions from the same AUC;
6. the run directory is the single process's: ``best/`` and ``last/`` as sharded checkpoints
   (``save_sharded``, which ``eval``, ``predict`` and the Scorer load in one process),
   ``metrics.json`` and the plots, written by rank 0.

``train --online`` on several ranks (``run_train_online``) makes the single process's one pass:
every rank reads the whole stream in its order (by ``--time-col`` when given) and trains on its
share of each global batch; dynamic tables are sharded by key (``distributed.dynamic``), and
the ranks' progressive scores, gathered in the stream's order, give the run's metrics.

The train command's own decisions (option checks, schema inference, the model's recipe, the
run files, the online stream) are taken by the CLI's functions, so the two paths cannot drift
apart.
"""
from __future__ import annotations

import contextlib
import datetime
import io
import json
import math
import os
import shutil
import sys
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .launch import launch, rank_threads
from .process_group import DEFAULT_TIMEOUT_S, DistContext, check_same_config, init_from_env

#: rank 0 fits the schema on the whole file while the others wait for it: on a large file that
#: takes far longer than a training step, so that one wait has its own, longer limit (a rank
#: that dies still ends it at once: its connection closes)
PREP_TIMEOUT_S = 4 * 3600.0
#: the run's collective timeout, overridable for slow machines
TIMEOUT_ENV = "ADREC_DIST_TIMEOUT_S"
#: train options whose paths have no distributed version yet (attribute, flag)
_ONE_PROCESS_ONLY = (("text", "--text"), ("text_encoder", "--text-encoder"),
                     ("init_from", "--init-from"), ("export_every", "--export-every"),
                     ("export_rebase_every", "--export-rebase-every"))
#: arguments that may differ between ranks (how a rank runs, not what the run is)
_LOCAL_ARGS = ("started", "argv", "threads", "no_progress", "nproc")


def torchrun_env() -> bool:
    """Whether this process is a rank of a torchrun launch (or was given its environment)."""
    return all(os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x == "--nproc":
            skip = True
        elif not x.startswith("--nproc="):
            out.append(x)
    return out


def check_options(a, world: int) -> None:
    """Refuse, before any rank starts work, what a distributed ``train`` cannot do."""
    from .. import _cli_common as cli

    if a.time_col and not a.online:
        raise cli.CLIError("--time-col orders the stream of --online; add --online")
    if a.online:
        _check_online(a, world)
    for attr, flag in _ONE_PROCESS_ONLY:
        if getattr(a, attr, None) not in (None, "", False):
            raise cli.CLIError(f"{flag} is not supported by distributed training; train in one "
                               "process (drop --nproc / torchrun)")
    if a.stream == "on":
        raise cli.CLIError("--stream on: a distributed run holds each rank's share of the rows "
                           "in memory; use --stream auto or off (or more ranks)")
    if not a.online and not a.valid and not 0 < a.valid_fraction < 1:
        raise cli.CLIError(f"the validation fraction must lie in (0, 1), got {a.valid_fraction}")
    B = int(cli._recipe(a)[1].get("batch_size", 1024))
    if B % world:
        raise cli.CLIError(f"--batch-size {B} does not split evenly over {world} ranks; use a "
                           f"multiple of {world}")


def _check_online(a, world: int) -> None:
    """``--online`` on several ranks: every rank reads the stream, so it is a file; the flags
    that one process refuses for --online are refused here too, before any rank starts."""
    from .. import _cli_common as cli

    if a.data == "-":
        raise cli.CLIError("DATA '-' (standard input) is read once, by one process: give a "
                           "file to train --online on several ranks")
    for flag, given in (("--valid", a.valid is not None), ("--epochs", a.epochs is not None),
                        ("--patience", a.patience is not None)):
        if given:
            raise cli.CLIError(f"{flag} does not apply to --online (one pass, progressive "
                               "validation on every row instead of held-out rows)")
    if not a.static_vocab and a.capacity is not None and a.capacity < world:
        raise cli.CLIError(f"--capacity {a.capacity}: each dynamic table is sharded by key over "
                           f"the {world} ranks, which hold capacity / {world} keys each; give "
                           f"at least {world}")


def launch_train(a) -> int:
    """``train ... --nproc N``: the same command on N local ranks under torchrun (``--standalone``),
    each with ``--threads`` threads, or this machine's cores / N; returns torchrun's exit code."""
    if a.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {a.nproc}")
    check_options(a, a.nproc)
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(a.threads or rank_threads(a.nproc))
    return launch(a.nproc, _without_nproc(list(a.argv)), env=env)


class _Rank0Failed(Exception):
    """Rank 0's preparation failed; its message reaches every rank."""


def _on_rank0(ctx: DistContext, group, fn):
    """``fn()`` on rank 0, its result broadcast to every rank; an exception in it is raised on
    rank 0 as it is and on the others as ``_Rank0Failed`` with its message (nobody waits)."""
    box: list = [None]
    err = None
    if ctx.rank == 0:
        try:
            box = [("ok", fn())]
        except Exception as e:  # every rank must hear of it
            err = e
            box = [("error", str(e))]
    with ctx.guard("waiting for rank 0 to read the schema"):
        dist.broadcast_object_list(box, src=0, group=group)
    if err is not None:
        raise err
    if box[0][0] == "error":
        raise _Rank0Failed(f"{box[0][1]} (reported by rank 0)")
    return box[0][1]


def _count_and_fit(path, schema, reader_kw: dict, fit: bool) -> int:
    """Rows of ``path`` as the training reader sees them (bad rows skipped when asked), fitting
    ``schema`` on them in the same pass when ``fit``."""
    from ..data.readers import open_reader
    from ..data.stream import CHUNK_ROWS

    seen = [0]

    def chunks():
        reader = open_reader(path, schema=schema, label=schema.label, chunk_rows=CHUNK_ROWS,
                             **reader_kw)
        with warnings.catch_warnings():  # the rows are read again for training, which warns
            warnings.filterwarnings("ignore", message=r".*skipped \d+ bad rows",
                                    category=RuntimeWarning)
            for chunk in reader:
                seen[0] += chunk.num_rows
                yield chunk

    if fit:
        schema.fit(chunks())
    else:
        for _ in chunks():
            pass
    return seen[0]


def read_range(path, schema, lo: int, hi: int, reader_kw: dict):
    """Rows ``[lo, hi)`` of ``path`` (0-based, bad rows skipped when asked) as ``EncodedRows``;
    the rows before ``lo`` are parsed and dropped, reading stops at ``hi``."""
    from ..data.errors import DataError
    from ..data.readers import open_reader
    from ..data.stream import CHUNK_ROWS, EncodedRows, index_dtype

    dtype = index_dtype(schema)
    parts, pos = [], 0
    if hi > lo:
        for chunk in open_reader(path, schema=schema, label=schema.label, chunk_rows=CHUNK_ROWS,
                                 **reader_kw):
            n = chunk.num_rows
            if pos + n > lo:
                start = max(lo - pos, 0)
                part = schema.encode(chunk.slice(start, min(hi, pos + n) - pos - start))
                if not parts and part.batch_size and bool(torch.isnan(part.labels).all()):
                    raise DataError(f"no label column {schema.label!r}", path=path)
                parts.append(EncodedRows.from_batch(part, dtype))
            pos += n
            if pos >= hi:
                break
    if not parts:
        parts = [EncodedRows.from_batch(schema.encode({c: [] for c in schema.raw_columns()}),
                                        dtype)]
    return EncodedRows.concat(parts)


def _share(total: int, ctx: DistContext) -> tuple[int, int]:
    return total * ctx.rank // ctx.world, total * (ctx.rank + 1) // ctx.world


def _access(schema, batch, ctx: DistContext) -> list[torch.Tensor]:
    """Per static table of the schema (the tables of the model's EmbeddingBagCollection, in
    order), [rows] the ids a sample looked up in each row: this rank's first batch, summed over
    the ranks (so every rank plans alike)."""
    tables = schema.tables()
    static = [t for t, (name, _) in enumerate(tables) if not schema.is_dynamic(name)]
    B = batch.batch_size
    counts = {t: torch.zeros(tables[t][1], dtype=torch.float64) for t in static}
    for b, (_, t) in enumerate(schema.sparse_fields()):
        if t in counts:  # a dynamic table's keys are not rows: it is sharded by key
            ids = batch.indices[int(batch.offsets[b * B]):int(batch.offsets[(b + 1) * B])]
            counts[t] += torch.bincount(ids, minlength=tables[t][1]).double()
    for name, t in schema.sequence_fields():
        if t in counts:
            counts[t] += torch.bincount(batch.seq_indices[name],
                                        minlength=tables[t][1]).double()
    flat = torch.cat([counts[t] for t in static]) if static else torch.zeros(0)
    with ctx.guard("counting the sample's ids"):
        dist.all_reduce(flat, group=ctx.group)
    return list(torch.split(flat, [tables[t][1] for t in static]))


@torch.no_grad()
def predict_all(model, rows, ctx: DistContext, batch_size: int, filler):
    """(probabilities, labels) of every rank's ``rows``, gathered in rank order on every rank.
    Every rank runs the same number of (collective) forwards: a rank out of rows scores
    ``filler`` (a one-row Batch) and drops the result."""
    n = len(rows)
    sizes: list = [None] * ctx.world
    with ctx.guard("validation"):
        dist.all_gather_object(sizes, n, group=ctx.group)
        steps = math.ceil(max(sizes) / batch_size)
        was = model.training
        model.eval()
        probs, labels = [], []
        try:
            for s in range(steps):
                lo = s * batch_size
                b = rows.slice(lo, min(lo + batch_size, n)).to_batch() if lo < n else filler
                p = torch.sigmoid(model(b)).double().numpy()
                if lo < n:
                    probs.append(p)
                    labels.append(b.labels.double().numpy())
        finally:
            model.train(was)
        mine = (np.concatenate(probs) if probs else np.zeros(0),
                np.concatenate(labels) if labels else np.zeros(0))
        everyone: list = [None] * ctx.world
        dist.all_gather_object(everyone, mine, group=ctx.group)
    return (np.concatenate([e[0] for e in everyone]), np.concatenate([e[1] for e in everyone]))


class GlobalOrder:
    """The single process's training batches, each rank getting its share of each.

    Epoch e visits the training rows in the order ``epoch_permutation(n, seed, e)`` over the
    rows of all ranks (numbered rank by rank, i.e. in file order: the single process's
    numbering) and cuts it into global batches of ``batch_size`` rows, as one process does;
    rank r trains on the r-th of ``world`` equal shares of each. The rows of a share live on
    whichever rank read them, so each step every rank sends the others the rows it holds of
    their shares (gathered as encoded rows; about a global batch of rows per rank per step,
    small next to the embedding exchange's rows of D floats). The last partial batch loses
    its rows beyond a multiple of ``world`` (at most ``world - 1``): the shares must be equal.
    """

    def __init__(self, train, counts: list[int], ctx: DistContext, batch_size: int, seed: int):
        self.train, self.ctx, self.B, self.seed = train, ctx, int(batch_size), int(seed)
        self.n = sum(counts)
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        self.first = starts[ctx.rank]
        self.ends = torch.tensor(starts[1:], dtype=torch.long)  # [world] end of each rank's rows

    def epoch(self, e: int):
        from ..data.batch import Batch
        from ..data.stream import epoch_permutation

        ctx, world, me = self.ctx, self.ctx.world, self.ctx.rank
        perm = epoch_permutation(self.n, self.seed, e)  # [n] global training row numbers
        for start in range(0, self.n, self.B):
            g = perm[start:start + self.B]
            g = g[:g.numel() - g.numel() % world]
            if not g.numel():
                break
            b = g.numel() // world
            holder = torch.searchsorted(self.ends, g, right=True)  # [m] rank that read the row
            parts = []
            for d in range(world):
                pos = torch.nonzero(holder[d * b:(d + 1) * b] == me).squeeze(1)  # in share d
                rows = g[d * b:(d + 1) * b][pos] - self.first
                parts.append((pos, self.train.take(rows) if pos.numel() else None))
            everyone: list = [None] * world
            dist.all_gather_object(everyone, parts, group=ctx.group)
            got = [everyone[src][me] for src in range(world) if everyone[src][me][1] is not None]
            batch = Batch.concat([p[1] for p in got]) if len(got) > 1 else got[0][1]
            order = torch.argsort(torch.cat([p[0] for p in got]))  # back to the share's order
            yield batch.take(order)


def _sync_dense_buffers(model, ctx: DistContext) -> None:
    """Average the floating buffers of the dense layers over the ranks (batch norm's running
    statistics, each rank's from its own rows), so every rank predicts alike and the saved
    model holds the estimate over all rows."""
    from .dynamic import ShardedDynamicEmbedding
    from .sharding import ShardedEmbeddingBagCollection

    skip = {f"{n}." for n, m in model.named_modules()
            if isinstance(m, (ShardedEmbeddingBagCollection, ShardedDynamicEmbedding))}
    with ctx.guard("averaging the batch-norm statistics"):
        for name, buf in model.named_buffers():
            if buf.is_floating_point() and not any(name.startswith(s) for s in skip):
                dist.all_reduce(buf, group=ctx.group)
                buf.div_(ctx.world)


def _step(ddp, model, batch, trainer, ctx) -> tuple[torch.Tensor, float]:
    """One synchronous step of this rank's share ``batch`` (forward through ``ddp``, the
    embedding exchange and the dense all-reduce in the backward, clipping, the dense optimizer)
    -> (the forward's logits, detached; the loss). A non-finite loss raises, naming the rank."""
    logits = ddp(batch)
    loss = model.loss(logits, batch.labels)
    opt = trainer.optimizer
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if trainer.clip_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], trainer.clip_grad_norm)
    opt.step()
    trainer.global_step += 1
    lv = float(loss.detach())
    if not math.isfinite(lv):
        raise FloatingPointError(f"rank {ctx.rank}: training loss is {lv} at step "
                                 f"{trainer.global_step}; lower the learning rates")
    return logits.detach(), lv


def run_train(a) -> int:
    """One rank of ``train`` (see the module docstring); rank 0 prints and writes the run."""
    from .. import _cli_common as cli
    from ..data.schema import Schema
    from ..data.stream import valid_mask
    from ..models.checkpoint import replace_dir
    from ..models.registry import build_model
    from ..nn import EmbeddingBagCollection
    from ..training.loop import FitResult, Trainer, intercept_shift, lr_factor, metrics_of
    from .checkpoint import save_sharded
    from .exchange import Exchange
    from .planner import plan_tables
    from .sharding import global_batch_dropout, global_batch_norm, shard_model, wrap_ddp

    check_options(a, int(os.environ["WORLD_SIZE"]))
    try:
        timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    except ValueError:
        raise cli.CLIError(f"{TIMEOUT_ENV}={os.environ[TIMEOUT_ENV]!r} is not a number") from None
    ctx = init_from_env(device="cpu", timeout_s=timeout)
    prep_group = dist.new_group(backend=ctx.backend,
                                timeout=datetime.timedelta(seconds=PREP_TIMEOUT_S))
    check_same_config(ctx, arguments={k: v for k, v in sorted(vars(a).items())
                                      if k not in _LOCAL_ARGS})
    lead = ctx.rank == 0
    if a.online:
        return run_train_online(a, ctx, prep_group)

    def prepare():
        out, drop, reader_kw = cli._train_setup(a)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            schema = cli._given_schema(a, drop) or cli._infer_schema(a.data, a.label, drop)
            rows = _count_and_fit(a.data, schema, reader_kw, fit=not schema.fitted)
            vrows = _count_and_fit(a.valid, schema, reader_kw, fit=False) if a.valid else None
        cli._report_warnings(caught)
        if rows == 0:
            raise cli.CLIError(f"{a.data}: no data rows")
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        return {"schema": schema.to_dict(), "rows": rows, "valid_rows": vrows,
                "reader_kw": reader_kw, "out": str(out), "tmp": str(tmp.absolute())}

    try:
        prep = _on_rank0(ctx, prep_group, prepare)
    except _Rank0Failed as e:
        raise cli.CLIError(str(e)) from None
    schema = Schema.from_dict(prep["schema"])
    out, tmp, reader_kw = Path(prep["out"]), Path(prep["tmp"]), prep["reader_kw"]
    total = prep["rows"]
    lo, hi = _share(total, ctx)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mine = read_range(a.data, schema, lo, hi, reader_kw)
        if a.valid:
            train = mine
            valid = read_range(a.valid, schema, *_share(prep["valid_rows"], ctx), reader_kw)
        else:
            m = valid_mask(lo, hi - lo, total, a.valid_fraction, a.seed)
            train, valid = mine.select(~m), mine.select(m)
        del mine
    if lead:
        cli._report_warnings(caught)
    sizes: list = [None] * ctx.world
    with ctx.guard("counting the ranks' rows"):
        dist.all_gather_object(sizes, (len(train), len(valid)), group=ctx.group)
    n_train, n_valid = sum(s[0] for s in sizes), sum(s[1] for s in sizes)
    if n_train < ctx.world:
        raise cli.CLIError(f"{a.data}: {n_train} training rows cannot be shared by "
                           f"{ctx.world} ranks")
    if n_valid == 0:
        raise cli.CLIError(f"{a.data}: cannot hold out {a.valid_fraction:.0%} of {total} rows "
                           "for validation; give a separate validation file")

    model_kw, trainer_kw, epochs = cli._recipe(a)
    B = int(trainer_kw.get("batch_size", 1024))  # divisible: check_options
    b = B // ctx.world
    batches = GlobalOrder(train, [s[0] for s in sizes], ctx, B, a.seed)
    if lead:
        print(f"{a.data}: {n_train:,} training rows, {n_valid:,} validation rows over "
              f"{ctx.world} ranks (rank 0: rows {lo:,}-{hi:,} of the file); "
              f"{len(schema.sparse_fields())} categorical, {schema.n_dense} dense fields",
              flush=True)
    torch.manual_seed(a.seed)
    try:
        model = build_model(a.model, schema, **model_kw)
    except (TypeError, ValueError) as e:
        raise cli.CLIError(str(e)) from None
    order0 = torch.randperm(len(train), generator=torch.Generator().manual_seed(a.seed + 1))
    access = _access(schema, train.take(order0[:b]), ctx)
    exchange = Exchange(ctx)
    plans = {name: plan_tables(ebc.num_embeddings, ctx.world, ebc.embedding_dim,
                               row_access=access)
             for name, ebc in model.named_modules() if isinstance(ebc, EmbeddingBagCollection)}
    shard_model(model, ctx, exchange, plans=plans)
    global_batch_dropout(model, ctx)
    global_batch_norm(model, ctx)
    ddp = wrap_ddp(model, ctx)
    trainer_kw.pop("batch_size", None)
    trainer = Trainer(model, seed=a.seed, progress=False, batch_size=B, **trainer_kw)
    progress = lead and not a.no_progress
    if lead:
        for name, plan in plans.items():
            print(f"{name}: " + plan.report(), flush=True)
    filler = train.slice(0, 1).to_batch()
    total_steps = math.ceil(n_train / B) * epochs  # the single process's schedule
    opt = trainer.optimizer
    best_state, best_valid, stopped = None, None, False
    meta_base = {"distributed": {"world": ctx.world, "global_batch": B, "rows_per_rank": sizes}}
    torch.manual_seed(a.seed)  # where the single process's fit starts its dropout draws
    while trainer.epoch < epochs and not stopped:
        e = trainer.epoch
        model.train()
        exchange.reset_stats()
        t0 = time.perf_counter()
        loss_sum = torch.zeros(1, dtype=torch.float64)  # sum over the rows trained
        steps = seen = 0
        with ctx.guard(f"training epoch {e + 1}"):
            for batch in batches.epoch(e):
                trainer._set_lr(lr_factor(trainer.schedule, trainer.global_step, total_steps, e,
                                          **trainer.schedule_kw))
                _, lv = _step(ddp, model, batch, trainer, ctx)
                loss_sum += lv * batch.batch_size
                steps, seen = steps + 1, seen + batch.batch_size * ctx.world
            dist.all_reduce(loss_sum, group=ctx.group)
        dt = time.perf_counter() - t0
        moved = exchange.stats()  # this rank's embedding exchange during the epoch's steps
        trainer.epoch = e + 1
        _sync_dense_buffers(model, ctx)
        p, y = predict_all(model, valid, ctx, trainer.eval_batch_size, filler)
        vm = metrics_of(y, p)
        metrics = {"epoch": trainer.epoch,
                   "train_loss": float(loss_sum) / max(seen, 1),
                   "samples_per_s": seen / max(dt, 1e-9), "train_time_s": dt,
                   "lr_factor": lr_factor(trainer.schedule, max(trainer.global_step - 1, 0),
                                          total_steps, e, **trainer.schedule_kw)
                   * trainer.plateau_scale,
                   "exchange_bytes_per_step": moved["bytes_sent"] / max(steps, 1),
                   "exchange_s_per_step": moved["seconds"] / max(steps, 1),
                   **{f"valid_{k}": v for k, v in vm.items()}}
        improved, stop = trainer.record_validation(vm[trainer.monitor], model)
        stopped = stopped or stop
        if improved:
            best_state, best_valid = trainer._best_state, (p, y)
        trainer.history.append(metrics)
        if progress:
            print(f"epoch {trainer.epoch}: loss {metrics['train_loss']:.4f}, "
                  f"{metrics['samples_per_s']:,.0f} samples/s, valid auc "
                  f"{metrics['valid_auc']:.4f} logloss {metrics['valid_logloss']:.4f} "
                  f"calibration {metrics['valid_calibration']:.3f}", flush=True)
        save_sharded(tmp / "last", ddp, ctx, optimizer=opt, meta={
            **meta_base, "epoch": trainer.epoch, "global_step": trainer.global_step,
            "metrics": metrics, "history": trainer.history,
            "trainer": {"settings": trainer.settings(), "state": trainer._trainer_state()}})
    if best_state is not None and trainer.best_epoch != trainer.epoch:
        model.load_state_dict(best_state)
    p, y = best_valid if best_valid is not None else (p, y)
    best = trainer.history[trainer.best_epoch - 1] if trainer.best_epoch else None
    shift = 0.0
    if trainer.calibrate and trainer.best_epoch is not None:
        shift = intercept_shift(p, y)  # the same arrays on every rank: the same shift
        model.shift_logit(shift)
        p, y = predict_all(model, valid, ctx, trainer.eval_batch_size, filler)
    save_sharded(tmp / "best", ddp, ctx, meta={
        **meta_base, "epoch": trainer.best_epoch, "global_step": trainer.global_step,
        "metrics": {**(best or {}), "logit_shift": shift}, "history": trainer.history})
    m = metrics_of(y, p)
    result = FitResult(history=list(trainer.history), best_epoch=trainer.best_epoch, best=best,
                       stopped_early=stopped and trainer.epoch < epochs)
    if lead:
        try:
            cli._write_run_files(tmp, result, (p, y), {
                "valid": m, "data": str(a.data), "model": model.config,
                "distributed": {**meta_base["distributed"],
                                "plans": {n: pl.to_dict() for n, pl in plans.items()}}})
            replace_dir(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        print(f"model {a.model}: valid AUC {cli._fmt(m['auc'])}, logloss "
              f"{cli._fmt(m['logloss'])}, calibration {cli._fmt(m['calibration'])} (best epoch "
              f"{result.best_epoch}); {ctx.world} ranks; saved to {out}", flush=True)
        if a.json:
            last = result.history[-1]["samples_per_s"] if result.history else None
            cli._json_line({"auc": m["auc"], "logloss": m["logloss"],
                            "calibration": m["calibration"], "best_epoch": result.best_epoch,
                            "epochs": len(result.history), "samples_per_s": last,
                            "rows_train": n_train, "rows_valid": n_valid, "out": str(out)})
    with ctx.guard("finishing the run"):
        dist.barrier(group=ctx.group)
    ctx.destroy()
    sys.stdout.flush()
    return 0


def run_train_online(a, ctx: DistContext, prep_group) -> int:
    """One rank of ``train --online``: the single process's pass over DATA (in --time-col
    order), each global batch of ``batch_size`` rows scored, then trained on, every rank on its
    share of it; dynamic tables sharded by key, static ones by the planner, the towers under
    DDP. The progressive scores of all ranks, gathered in the stream's order, give the single
    process's metrics; rank 0 writes the run (best/ and last/ as sharded checkpoints,
    metrics.json, online.png). Every rank reads the whole stream (its order is the run's), so
    a global batch's rows are each rank's without an exchange; a last batch keeps a multiple of
    the ranks' number of rows (at most ``world - 1`` dropped, counted in metrics.json)."""
    from .. import _cli_common as cli
    from ..models.registry import build_model
    from ..training.loop import Trainer
    from ..models.checkpoint import replace_dir
    from ..training.online import (OnlineResult, _advance_clock, _mini_batches,
                                   _score_then_step, _window_metrics, plot_online,
                                   scores_in_train_mode)
    from .checkpoint import save_sharded
    from .dynamic import ShardedDynamicEmbedding
    from .exchange import Exchange
    from .sharding import global_batch_dropout, global_batch_norm, shard_model, wrap_ddp

    lead = ctx.rank == 0
    dynamic = cli._online_options(a)

    def prepare():
        out, _, _ = cli._train_setup(a)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        return {"out": str(out), "tmp": str(tmp.absolute())}

    try:
        prep = _on_rank0(ctx, prep_group, prepare)
    except _Rank0Failed as e:
        raise cli.CLIError(str(e)) from None
    out, tmp = Path(prep["out"]), Path(prep["tmp"])
    _, drop, reader_kw = cli._train_setup(a)
    with warnings.catch_warnings(record=True) as caught, \
            contextlib.redirect_stderr(sys.stderr if lead else io.StringIO()):
        warnings.simplefilter("always")  # what it reports about the file, rank 0 says once
        schema, stream, clock_col = cli._online_data(a, drop, reader_kw)
    if lead:
        cli._report_warnings(caught)
    check_same_config(ctx, schema=schema.to_dict())  # every rank read the same stream
    model_kw, trainer_kw, _ = cli._recipe(a)
    B = int(trainer_kw.get("batch_size", 1024))  # divisible: check_options
    if schema.has_dynamic:
        if a.embedding_l2:
            raise cli.CLIError("--embedding-l2 applies to static tables; --online trains "
                               "dynamic ones: leave it out, or add --static-vocab")
        model_kw.update(embedding_l2=0.0, dynamic_tables=dynamic)
    torch.manual_seed(a.seed)
    try:
        model = build_model(a.model, schema, **model_kw)
    except (TypeError, ValueError) as e:
        raise cli.CLIError(str(e)) from None
    in_train_mode = scores_in_train_mode(model)  # before dropout and batch norm are replaced
    exchange = Exchange(ctx)
    try:
        sharded = shard_model(model, ctx, exchange)
    except ValueError as e:  # a dynamic table's capacity below the ranks, named
        raise cli.CLIError(str(e)) from None
    global_batch_dropout(model, ctx)
    global_batch_norm(model, ctx)
    ddp = wrap_ddp(model, ctx)
    for k in ("patience", "plateau_factor", "calibrate", "batch_size"):  # per-epoch settings
        trainer_kw.pop(k, None)
    trainer = Trainer(model, seed=a.seed, progress=False, batch_size=B, **trainer_kw)
    trainer._set_lr(1.0)  # the base rates: a stream has no schedule (as train_online)
    opt = trainer.optimizer
    if lead:
        for name, m in sharded.items():
            plan = getattr(m, "plan", None)
            print(f"{name}: " + (plan.report() if plan is not None
                                 else f"sharded by key over {ctx.world} ranks"), flush=True)
    model.train()
    probs, labels = [], []
    clock, late, rows, dropped, t_loop = -math.inf, 0, 0, 0, 0.0
    with ctx.guard("online training"):
        for batch, times in _mini_batches(stream, schema, B, 0, clock_col):
            clock, late = _advance_clock(model, times, clock, late)
            n = batch.batch_size - batch.batch_size % ctx.world
            dropped += batch.batch_size - n
            if not n:
                continue
            b = n // ctx.world
            part = batch.slice(ctx.rank * b, (ctx.rank + 1) * b)
            t0 = time.perf_counter()
            score = _score_then_step(model, part, lambda p: _step(ddp, model, p, trainer, ctx)[0],
                                     in_train_mode)
            probs.append(torch.sigmoid(score).float().numpy())
            labels.append(part.labels.float().numpy())
            t_loop += time.perf_counter() - t0
            rows += n
        everyone: list = [None] * ctx.world
        dist.all_gather_object(everyone, (probs, labels), group=ctx.group)
        slowest = torch.tensor([t_loop], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=ctx.group)
    if rows == 0:
        raise cli.CLIError(f"{a.data}: no data rows")
    # the stream's order: step by step, each step's shares in rank order
    p = np.concatenate([x for s in range(len(probs)) for x in (e[0][s] for e in everyone)])
    y = np.concatenate([x for s in range(len(probs)) for x in (e[1][s] for e in everyone)])
    window = 100_000
    windows = [_window_metrics(y[s:s + window], p[s:s + window], s)
               for s in range(0, y.size, window)]
    whole = windows[0] if len(windows) == 1 else _window_metrics(y, p, 0)
    res = OnlineResult(progressive_auc=whole["auc"], progressive_logloss=whole["logloss"],
                       rows=int(y.size), windows=windows,
                       samples_per_s=rows / float(slowest) if float(slowest) > 0 else math.nan,
                       train_time_s=float(slowest), out_of_order=late, probs=p, labels=y)
    _sync_dense_buffers(model, ctx)
    m = res.metrics()
    dist_meta = {"world": ctx.world, "global_batch": B, "dropped_rows": dropped}
    save_sharded(tmp / "best", ddp, ctx, meta={
        "metrics": {k: v for k, v in m.items() if k != "windows"}, "distributed": dist_meta})
    save_sharded(tmp / "last", ddp, ctx, optimizer=opt, meta={
        "metrics": {"online": {"position": res.rows}}, "global_step": trainer.global_step,
        "distributed": dist_meta})
    keys = [t.num_keys for t in model.modules()  # collectives: every rank asks
            if isinstance(t, ShardedDynamicEmbedding)]
    if lead:
        try:
            (tmp / "metrics.json").write_text(json.dumps(
                {**m, "data": str(a.data), "time_col": a.time_col, "model": model.config,
                 "distributed": dist_meta}, indent=1, default=float), encoding="utf-8")
            plot_online(res, tmp / "online.png")
            replace_dir(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        if res.out_of_order:
            print(f"{a.data}: {res.out_of_order:,} rows arrived before a later {clock_col!r}; "
                  "trained in arrival order (the tables' clock does not go back)",
                  file=sys.stderr)
        if keys:
            print(f"dynamic tables: {sum(keys):,} keys with rows "
                  f"({', '.join(f'{k:,}' for k in keys)} per lookup), sharded by key over "
                  f"{ctx.world} ranks")
        print(f"model {a.model}: online over {res.rows:,} rows: progressive AUC "
              f"{cli._fmt(res.progressive_auc)}, logloss {cli._fmt(res.progressive_logloss)}, "
              f"{res.samples_per_s:,.0f} samples/s; {ctx.world} ranks; saved to {out}",
              flush=True)
        if a.json:
            cli._json_line({"progressive_auc": res.progressive_auc,
                            "progressive_logloss": res.progressive_logloss, "rows": res.rows,
                            "samples_per_s": res.samples_per_s, "model": a.model,
                            "out": str(out)})
    with ctx.guard("finishing the run"):
        dist.barrier(group=ctx.group)
    ctx.destroy()
    sys.stdout.flush()
    return 0
