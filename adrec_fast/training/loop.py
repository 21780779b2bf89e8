# SPDX-License-Identifier: Apache-2.0
"""The training loop: mini-batches, fused + dense optimizers, lr schedules, per-epoch
evaluation, early stopping, checkpoints and exact resume."""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.batch import Batch, bag_take
from ..data.metrics import auc, calibration, logloss
from ..data.stream import epoch_permutation
from ..data.tensorfile import read_tensors
from ..models import checkpoint as ckpt

SCHEDULES = ("constant", "cosine", "step", "linear")
DENSE_OPTIMIZERS = ("adam", "adagrad", "sgd")
DEFAULT_EMBEDDING_LR = {"rowwise_adagrad": 0.05, "sgd": 0.1, None: 1e-3}


# ---------------------------------------------------------------------------- data access
class InMemory:
    """A ``Batch`` held in memory, cut into (optionally shuffled) mini-batches.

    The permutation of epoch e is drawn from ``torch.Generator().manual_seed(hash(seed, e))``,
    so epoch e's order does not depend on what ran before (resume needs no generator state).
    When every bag holds one id (plain categorical fields), a mini-batch is gathered from an
    [T, N] view of the ids instead of the general ragged take.
    """

    def __init__(self, batch: Batch):
        self.batch = batch
        self.n = batch.batch_size
        T = batch.num_bags
        self.T = T
        self.one_per_bag = batch.indices.numel() == T * self.n and _is_arange(batch.offsets)
        self.ids = batch.indices.view(T, self.n) if self.one_per_bag else None  # [T, N]

    def __len__(self) -> int:
        return self.n

    def take(self, rows: torch.Tensor) -> Batch:
        b = self.batch
        if not self.one_per_bag:
            return b.take(rows)
        B = rows.numel()
        seq_i, seq_o = {}, {}
        for name, so in b.seq_offsets.items():
            seq_i[name], seq_o[name] = bag_take(b.seq_indices[name], so, rows)
        return Batch(
            indices=self.ids[:, rows].reshape(-1),
            offsets=torch.arange(self.T * B + 1),
            dense=b.dense[rows],
            labels=b.labels[rows],
            vectors=b.vectors[rows],
            num_bags=self.T,
            seq_indices=seq_i,
            seq_offsets=seq_o,
        )

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, epoch: int = 0):
        order = epoch_permutation(self.n, seed, epoch) if shuffle else None
        for start in range(0, self.n, batch_size):
            stop = min(start + batch_size, self.n)
            rows = order[start:stop] if order is not None else torch.arange(start, stop)
            yield self.take(rows)


def _is_arange(x: torch.Tensor, block: int = 1 << 20) -> bool:
    """x == arange(len(x)), checked in blocks (no second full-size buffer)."""
    for start in range(0, x.numel(), block):
        part = x[start:start + block]
        if not torch.equal(part, torch.arange(start, start + part.numel(), dtype=x.dtype)):
            return False
    return True


def _as_source(data):
    """Batch -> InMemory; a list of Batches -> one InMemory; a callable(epoch) or re-iterable
    of Batches is kept as is (streamed)."""
    if data is None or isinstance(data, InMemory):
        return data
    if isinstance(data, Batch):
        return InMemory(data)
    if isinstance(data, (list, tuple)) and data and all(isinstance(b, Batch) for b in data):
        return InMemory(Batch.concat(list(data)))
    return data


def _iter_source(src, batch_size: int, shuffle: bool, seed: int, epoch: int) -> Iterable[Batch]:
    # InMemory and the data layer's sources (EncodedRows, StreamedRows) share this protocol
    if hasattr(src, "batches"):
        return src.batches(batch_size, shuffle=shuffle, seed=seed, epoch=epoch)
    if callable(src):
        return src(epoch)
    return iter(src)


def _source_len(src) -> int | None:
    return len(src) if hasattr(src, "batches") else None


@torch.no_grad()
def predict(model, data, batch_size: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities [N], labels [N]) of ``data`` (Batch, list of Batches or iterable)."""
    src = _as_source(data)
    was = model.training
    model.eval()
    probs, labels = [], []
    try:
        for b in _iter_source(src, batch_size, False, 0, 0):
            probs.append(torch.sigmoid(model(b)).double().numpy())
            labels.append(b.labels.double().numpy())
    finally:
        model.train(was)
    if not probs:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(probs), np.concatenate(labels)


def metrics_of(labels: np.ndarray, probs: np.ndarray) -> dict:
    """{"auc", "logloss", "calibration", "mean_prediction", "positive_rate", "rows"}."""
    return {
        "auc": auc(labels, probs),
        "logloss": logloss(labels, probs),
        "calibration": calibration(labels, probs),
        "mean_prediction": float(np.mean(probs)) if probs.size else float("nan"),
        "positive_rate": float(np.mean(labels)) if labels.size else float("nan"),
        "rows": int(labels.size),
    }


def evaluate(model, data, batch_size: int = 16384) -> dict:
    """AUC, logloss and calibration (mean prediction / positive rate) of ``model`` on ``data``."""
    p, y = predict(model, data, batch_size)
    return metrics_of(y, p)


def intercept_shift(probs: np.ndarray, labels: np.ndarray, iters: int = 30) -> float:
    """The logit offset d minimising the logloss of ``sigmoid(logit(probs) + d)`` on these
    rows, i.e. the d that makes the mean prediction equal the positive rate (Newton's method on
    a convex 1-D function; 0 when the labels are all one class or there are no rows)."""
    y = np.asarray(labels, dtype=np.float64)
    if y.size == 0 or y.min() == y.max():
        return 0.0
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7)
    z = np.log(p) - np.log1p(-p)
    rate, d = y.mean(), 0.0
    for _ in range(iters):
        s = 1.0 / (1.0 + np.exp(-(z + d)))
        g, h = s.mean() - rate, (s * (1 - s)).mean()
        step = g / max(h, 1e-12)
        d -= float(np.clip(step, -5.0, 5.0))
        if abs(step) < 1e-10:
            break
    return d


# ---------------------------------------------------------------------------- schedules
def lr_factor(schedule: str, step: int, total_steps: int, epoch: int, *, warmup_steps: int = 0,
              step_epochs: int = 1, gamma: float = 0.5, min_factor: float = 0.0) -> float:
    """Multiplier of the base learning rates at optimizer step ``step`` (0-based) of
    ``total_steps``: constant; cosine (to ``min_factor``); linear decay; step decay
    (``gamma ** (epoch // step_epochs)``); all after a linear warm-up of ``warmup_steps``."""
    if warmup_steps and step < warmup_steps:
        warm = (step + 1) / warmup_steps
    else:
        warm = 1.0
    total = max(total_steps, 1)
    frac = min(step / total, 1.0)
    if schedule == "constant":
        f = 1.0
    elif schedule == "cosine":
        f = min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * frac))
    elif schedule == "linear":
        f = min_factor + (1 - min_factor) * (1 - frac)
    elif schedule == "step":
        f = gamma ** (epoch // max(step_epochs, 1))
    else:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    return warm * max(f, 1e-8)


# ---------------------------------------------------------------------------- trainer
@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    best: dict | None = None
    stopped_early: bool = False

    @property
    def last(self) -> dict:
        return self.history[-1] if self.history else {}


class Trainer:
    """Trains a ``CTRModel``.

    Args:
        model: from :func:`adrec_fast.models.build_model`.
        lr: dense optimizer learning rate (``optimizer``: "adam" | "adagrad" | "sgd").
        embedding_lr: the fused embedding optimizer's learning rate (default 0.05 for row-wise
            Adagrad, 0.1 for SGD); it lives on ``ebc.optimizer.lr`` and follows the schedule.
        schedule: "constant" | "cosine" | "linear" | "step" (per optimizer step, ``step`` per
            epoch); ``warmup_steps``, ``step_epochs``, ``gamma``, ``min_factor`` tune it.
        batch_size, seed: mini-batch size; the seed of the shuffling (and torch's RNG state
            at the start of ``fit``, for dropout).
        patience: early stopping after that many epochs without improvement of ``monitor``
            ("auc" up or "logloss" down) on the validation data; None never stops.
        plateau_factor: reduce-lr-on-plateau: after every epoch whose validation ``monitor``
            did not improve, multiply every learning rate (dense and fused, on top of
            ``schedule``) by this factor (e.g. 0.1); None or 1 leaves them.
        clip_grad_norm: clip the dense parameters' gradient norm to this value each step
            (the fused embedding update never materialises its gradient, so it is not
            included); None does not clip.
        calibrate: after training (and restoring the best epoch), shift every logit by the
            offset that makes the mean prediction on the validation rows equal their positive
            rate (``intercept_shift``, folded into the head's bias; the ``best/`` checkpoint is
            rewritten with it). Regularisation, dropout and batch norm leave a model's mean
            prediction a few percent off; this removes that offset without touching the
            ranking (AUC unchanged).
        restore_best: load the best validation epoch's weights at the end.
        checkpoint_dir: writes ``last/`` every epoch and ``best/`` on improvement.
        progress: tqdm bar with samples/s and loss (on a terminal) and one line per epoch.
    """

    def __init__(self, model, *, lr: float = 1e-3, embedding_lr: float | None = None,
                 optimizer: str = "adam", weight_decay: float = 0.0, schedule: str = "constant",
                 warmup_steps: int = 0, step_epochs: int = 1, gamma: float = 0.5,
                 min_factor: float = 0.0, batch_size: int = 1024, seed: int = 0,
                 patience: int | None = None, monitor: str = "auc", restore_best: bool = True,
                 checkpoint_dir=None, progress: bool = True, eval_batch_size: int = 16384,
                 shuffle: bool = True, plateau_factor: float | None = None,
                 clip_grad_norm: float | None = None, calibrate: bool = False):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if optimizer not in DENSE_OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {DENSE_OPTIMIZERS}, got {optimizer!r}")
        if monitor not in ("auc", "logloss"):
            raise ValueError(f"monitor must be 'auc' or 'logloss', got {monitor!r}")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if plateau_factor is not None and not 0 < plateau_factor <= 1:
            raise ValueError(f"plateau_factor must be in (0, 1], got {plateau_factor}")
        if clip_grad_norm is not None and not clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm must be > 0, got {clip_grad_norm}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if patience is not None and patience < 1:
            raise ValueError(f"patience must be >= 1 (or None), got {patience}")
        self.model = model
        self.lr = float(lr)
        emb_opt = model.config.get("embedding_optimizer")
        emb_opt = None if emb_opt == "none" else emb_opt
        self.embedding_lr = float(embedding_lr if embedding_lr is not None
                                  else DEFAULT_EMBEDDING_LR.get(emb_opt, 0.05))
        self.optimizer_name = optimizer
        self.weight_decay = float(weight_decay)
        self.schedule = schedule
        self.schedule_kw = {"warmup_steps": int(warmup_steps), "step_epochs": int(step_epochs),
                            "gamma": float(gamma), "min_factor": float(min_factor)}
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.patience = patience
        self.monitor = monitor
        self.restore_best = restore_best
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.progress = progress
        self.eval_batch_size = int(eval_batch_size)
        self.shuffle = shuffle
        self.plateau_factor = plateau_factor
        self.clip_grad_norm = clip_grad_norm
        self.calibrate = bool(calibrate)
        self.logit_shift = 0.0  # applied by calibrate
        self.plateau_scale = 1.0  # product of the plateau reductions so far
        self.optimizer = self._make_optimizer()
        self.sparse_optimizer = (torch.optim.SparseAdam(model.sparse_parameters(), lr=self.embedding_lr)
                                 if model.sparse_parameters() else None)
        self.global_step = 0
        self.epoch = 0  # completed epochs
        self.history: list[dict] = []
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self.bad_epochs = 0
        self._best_state: dict | None = None
        self.last_valid: tuple[np.ndarray, np.ndarray] | None = None

    def _make_optimizer(self):
        params = self.model.dense_parameters()
        if not params:  # every dense weight frozen (fine-tuning): an optimizer over nothing
            params = [torch.nn.Parameter(torch.zeros(0), requires_grad=False)]
        # fused=True: one multi-tensor kernel per step instead of ~6 ops per parameter
        kw = {"lr": self.lr, "weight_decay": self.weight_decay, "fused": True}
        if self.optimizer_name == "adam":
            return torch.optim.Adam(params, **kw)
        if self.optimizer_name == "adagrad":
            return torch.optim.Adagrad(params, **kw)
        return torch.optim.SGD(params, **kw)

    def settings(self) -> dict:
        return {"lr": self.lr, "embedding_lr": self.embedding_lr, "optimizer": self.optimizer_name,
                "weight_decay": self.weight_decay, "schedule": self.schedule, **self.schedule_kw,
                "batch_size": self.batch_size, "seed": self.seed, "patience": self.patience,
                "monitor": self.monitor, "restore_best": self.restore_best,
                "plateau_factor": self.plateau_factor, "clip_grad_norm": self.clip_grad_norm,
                "calibrate": self.calibrate}

    # -- learning rates -------------------------------------------------------------------
    def _set_lr(self, factor: float) -> None:
        factor *= self.plateau_scale
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr * factor
        if self.sparse_optimizer is not None:
            for g in self.sparse_optimizer.param_groups:
                g["lr"] = self.embedding_lr * factor
        for c in self.model.embedding_collections():
            if c.optimizer is not None:
                c.optimizer.lr = self.embedding_lr * factor

    # -- state ----------------------------------------------------------------------------
    def record_validation(self, value: float, model) -> tuple[bool, bool]:
        """The end of an epoch's validation, for early stopping and the plateau schedule:
        a better ``value`` of the monitored metric makes this epoch the best (its weights kept
        when ``restore_best``); a worse one counts a bad epoch and, with ``plateau_factor``,
        scales the learning rates down. Returns (improved, stop: ``patience`` bad epochs in a
        row)."""
        improved = self._is_better(value)
        if improved:
            self.best_value, self.best_epoch, self.bad_epochs = value, self.epoch, 0
            if self.restore_best:
                self._best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.bad_epochs += 1
            if self.plateau_factor is not None:
                self.plateau_scale *= self.plateau_factor
        return improved, self.patience is not None and self.bad_epochs >= self.patience

    def _is_better(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best_value is None:
            return True
        return value > self.best_value if self.monitor == "auc" else value < self.best_value

    def _trainer_state(self) -> dict:
        return {"global_step": self.global_step, "epoch": self.epoch,
                "best_value": self.best_value, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs, "plateau_scale": self.plateau_scale}

    def save(self, path, metrics: dict | None = None) -> Path:
        """Full training checkpoint (weights, fused + dense optimizer state, RNG, history)."""
        return ckpt.save_checkpoint(path, self.model, optimizer=self.optimizer,
                                    sparse_optimizer=self.sparse_optimizer, meta={
            "epoch": self.epoch, "global_step": self.global_step, "metrics": metrics or {},
            "history": self.history, "trainer": {"settings": self.settings(),
                                                 "state": self._trainer_state()},
            "rng": {"seed": self.seed},
        })

    def resume(self, path=None) -> bool:
        """Restore the state of ``path`` (default ``checkpoint_dir/last``); False if absent."""
        path = Path(path) if path is not None else (self.checkpoint_dir / "last"
                                                    if self.checkpoint_dir else None)
        if path is None or not (path / ckpt.META_FILE).is_file():
            return False
        doc = ckpt.load_state(self.model, path)
        tensors = (read_tensors(path / ckpt.OPTIM_FILE)
                   if (path / ckpt.OPTIM_FILE).is_file() else {})
        if "optimizer" in doc:
            ckpt.load_optimizer_state(self.optimizer, tensors, doc["optimizer"])
        if "sparse_optimizer" in doc and self.sparse_optimizer is not None:
            ckpt.load_optimizer_state(self.sparse_optimizer, tensors, doc["sparse_optimizer"],
                                      "sparse_state.")
        if "rng.torch" in tensors:
            torch.set_rng_state(tensors["rng.torch"])
        st = doc["trainer"]["state"]
        self.global_step = int(st["global_step"])
        self.epoch = int(st["epoch"])
        self.best_value = st["best_value"]
        self.best_epoch = st["best_epoch"]
        self.bad_epochs = int(st["bad_epochs"])
        self.plateau_scale = float(st.get("plateau_scale", 1.0))
        self.history = list(doc.get("history", []))
        best = path.parent / "best"
        if self.best_epoch is not None and (best / ckpt.MODEL_FILE).is_file():
            self._best_state = ckpt.read_state(self.model, best)[0]
        return True

    # -- the loop -------------------------------------------------------------------------
    def step(self, batch: Batch) -> tuple[torch.Tensor, float]:
        """One optimizer step on ``batch`` (dense and sparse optimizers, gradient clipping) ->
        (the forward's logits [B], computed before the update; the loss). A non-finite loss
        raises ``FloatingPointError``. ``fit`` and online training take this step."""
        model = self.model
        logits = model(batch)  # [B]
        loss = model.loss(logits, batch.labels)
        self.optimizer.zero_grad(set_to_none=True)
        if self.sparse_optimizer is not None:
            self.sparse_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"],
                                           self.clip_grad_norm)
        self.optimizer.step()
        if self.sparse_optimizer is not None:
            self.sparse_optimizer.step()
        self.global_step += 1
        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise FloatingPointError(f"training loss is {lv} at step {self.global_step}; lower "
                                     "the learning rates")
        return logits.detach(), lv

    def fit(self, train, valid=None, epochs: int = 1, resume: bool = False,
            callbacks: Iterable[Callable] = ()) -> FitResult:
        """Train for ``epochs`` epochs (in total, counting resumed ones). ``train``/``valid``:
        a ``Batch`` (in memory, reshuffled every epoch), a list of Batches, or a callable
        ``epoch -> iterable of Batches`` (streaming). ``callbacks(trainer, metrics)`` run after
        each epoch's checkpoint. Returns the history."""
        from tqdm.auto import tqdm

        model = self.model
        train_src = _as_source(train)
        valid_src = _as_source(valid)
        if not (resume and self.resume()):
            torch.manual_seed(self.seed)
        n_train = _source_len(train_src)
        steps_per_epoch = math.ceil(n_train / self.batch_size) if n_train else None
        total_steps = steps_per_epoch * epochs if steps_per_epoch else max(self.global_step, 1)
        stopped = False
        if self.patience is not None and self.best_epoch is not None \
                and self.bad_epochs >= self.patience:
            stopped = True
        while self.epoch < epochs and not stopped:
            e = self.epoch
            model.train()
            t0 = time.perf_counter()
            seen, loss_sum, loss_n = 0, 0.0, 0
            # disable=None: the bar shows on a terminal only (no bar spam in logs)
            bar = tqdm(total=n_train, unit="samples", unit_scale=True,
                       disable=True if not self.progress else None,
                       desc=f"epoch {e + 1}/{epochs}", leave=False, mininterval=0.5)
            try:
                for batch in _iter_source(train_src, self.batch_size, self.shuffle, self.seed, e):
                    self._set_lr(lr_factor(self.schedule, self.global_step, total_steps, e,
                                           **self.schedule_kw))
                    _, lv = self.step(batch)
                    B = batch.batch_size
                    seen += B
                    loss_sum += lv * B
                    loss_n += B
                    bar.update(B)
                    if self.global_step % 20 == 0 and self.progress:
                        dt = time.perf_counter() - t0
                        bar.set_postfix(loss=f"{loss_sum / loss_n:.4f}",
                                        samples_s=f"{seen / max(dt, 1e-9):,.0f}", refresh=False)
            finally:
                bar.close()
            dt = time.perf_counter() - t0
            self.epoch = e + 1
            metrics = {"epoch": self.epoch, "train_loss": loss_sum / max(loss_n, 1),
                       "samples_per_s": seen / max(dt, 1e-9), "train_time_s": dt,
                       "lr_factor": lr_factor(self.schedule, max(self.global_step - 1, 0),
                                              total_steps, e, **self.schedule_kw)
                       * self.plateau_scale}
            improved = False
            if valid_src is not None:
                p, y = predict(model, valid_src, self.eval_batch_size)
                self.last_valid = (p, y)
                vm = metrics_of(y, p)
                metrics.update({f"valid_{k}": v for k, v in vm.items()})
                improved, stop = self.record_validation(vm[self.monitor], model)
                stopped = stopped or stop
            self.history.append(metrics)
            if self.progress:
                msg = f"epoch {self.epoch}: loss {metrics['train_loss']:.4f}, " \
                      f"{metrics['samples_per_s']:,.0f} samples/s"
                if valid_src is not None:
                    msg += (f", valid auc {metrics['valid_auc']:.4f} logloss "
                            f"{metrics['valid_logloss']:.4f} calibration "
                            f"{metrics['valid_calibration']:.3f}")
                tqdm.write(msg)
            if self.checkpoint_dir is not None:
                self.save(self.checkpoint_dir / "last", metrics)
                if improved:
                    self.save(self.checkpoint_dir / "best", metrics)
            for cb in callbacks:
                cb(self, metrics)
        if self.restore_best and self._best_state is not None and self.best_epoch != self.epoch:
            model.load_state_dict(self._best_state)
            if valid_src is not None:
                self.last_valid = predict(model, valid_src, self.eval_batch_size)
        best = None
        if self.best_epoch is not None and self.best_epoch <= len(self.history):
            best = self.history[self.best_epoch - 1]
        if self.calibrate and self.last_valid is not None and self.best_epoch is not None:
            p, y = self.last_valid
            d = intercept_shift(p, y)
            model.shift_logit(d)
            self.logit_shift += d
            self.last_valid = predict(model, valid_src, self.eval_batch_size)
            if self.checkpoint_dir is not None:
                self.save(self.checkpoint_dir / "best", {**(best or {}), "logit_shift": d})
        return FitResult(history=list(self.history), best_epoch=self.best_epoch, best=best,
                         stopped_early=stopped and self.epoch < epochs)


def fit(model, train, valid=None, *, epochs: int = 1, batch_size: int = 1024, lr: float = 1e-3,
        embedding_lr: float | None = None, schedule: str = "constant", seed: int = 0,
        patience: int | None = None, checkpoint_dir=None, resume: bool = False,
        progress: bool = True, callbacks: Iterable[Callable] = (), **trainer_kw) -> FitResult:
    """Train ``model`` on ``train`` (see :class:`Trainer` for every option); returns the
    per-epoch history (train loss, samples/s, valid AUC/logloss/calibration)."""
    trainer = Trainer(model, lr=lr, embedding_lr=embedding_lr, schedule=schedule,
                      batch_size=batch_size, seed=seed, patience=patience,
                      checkpoint_dir=checkpoint_dir, progress=progress, **trainer_kw)
    return trainer.fit(train, valid, epochs=epochs, resume=resume, callbacks=callbacks)
