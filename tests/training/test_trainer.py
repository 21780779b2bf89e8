# SPDX-License-Identifier: Apache-2.0
"""The trainer: end-to-end AUC on synthetic data, schedules, early stopping, checkpoints (round
trip, atomic replace), exact resume, plots."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

import adrec_fast  # noqa: F401
from adrec_fast.data.schema import Schema
from adrec_fast.data.synthetic import SyntheticCTR
from adrec_fast.models.registry import build_model
from adrec_fast.models import checkpoint as ckpt
from adrec_fast.training.loop import InMemory, Trainer, evaluate, fit, lr_factor, predict
from adrec_fast.training.plots import plot_calibration, plot_learning_curves, reliability


def _model(schema, name="deepfm", seed=0, **kw):
    torch.manual_seed(seed)
    if name in ("deepfm", "dcnv2", "din"):
        kw.setdefault("hidden", (32, 16))
    return build_model(name, schema, embedding_dim=8, **kw)


def test_end_to_end_reaches_auc():
    """A fixed small run on the default synthetic data reaches a fixed AUC (oracle ~0.80)."""
    gen = SyntheticCTR(seed=0)
    schema = gen.schema()
    data = schema.encode(gen.generate(60_000))
    train, valid = data.slice(0, 50_000), data.slice(50_000, 60_000)
    model = _model(schema, "din", hidden=(64,))
    result = fit(model, train, valid, epochs=2, batch_size=1024, lr=2e-3, seed=0,
                 progress=False)
    assert len(result.history) == 2
    m = evaluate(model, valid)
    assert m["auc"] > 0.72, m
    assert 0.8 < m["calibration"] < 1.2, m
    assert result.history[-1]["samples_per_s"] > 0


def test_history_and_metrics(small):
    schema, train, valid = small
    model = _model(schema, "fm")
    r = fit(model, train, valid, epochs=2, batch_size=512, progress=False)
    h = r.history[-1]
    for k in ("epoch", "train_loss", "samples_per_s", "valid_auc", "valid_logloss",
              "valid_calibration", "valid_mean_prediction", "valid_positive_rate"):
        assert k in h
    assert math.isclose(h["valid_calibration"],
                        h["valid_mean_prediction"] / h["valid_positive_rate"], rel_tol=1e-9)
    p, y = predict(model, valid)
    assert p.shape == (valid.batch_size,) and np.array_equal(y, valid.labels.double().numpy())


def test_lr_schedules_and_fused_lr(small):
    assert lr_factor("constant", 50, 100, 0) == 1.0
    assert lr_factor("cosine", 0, 100, 0) == pytest.approx(1.0)
    assert lr_factor("cosine", 50, 100, 0) == pytest.approx(0.5)
    assert 0 < lr_factor("cosine", 99, 100, 0) < 0.01
    assert lr_factor("linear", 25, 100, 0) == pytest.approx(0.75)
    assert lr_factor("step", 0, 100, 3, gamma=0.5, step_epochs=2) == pytest.approx(0.5)
    assert lr_factor("constant", 0, 100, 0, warmup_steps=4) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        lr_factor("exp", 0, 1, 0)
    schema, train, _ = small
    model = _model(schema, "fm")
    tr = Trainer(model, lr=1e-3, embedding_lr=0.2, schedule="cosine", batch_size=1000,
                 progress=False)
    tr.fit(train, epochs=1)
    # the fused optimizer's lr followed the schedule: last step 4 of 5 -> cosine factor
    want = 0.2 * lr_factor("cosine", 4, 5, 0)
    for c in model.embedding_collections():
        assert c.optimizer.lr == pytest.approx(want)
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_factor("cosine", 4, 5, 0))


def test_seed_reproducible(small):
    schema, train, valid = small
    runs = []
    for _ in range(2):
        model = _model(schema, "dcnv2", seed=5)
        fit(model, train, None, epochs=1, batch_size=512, seed=7, progress=False)
        runs.append(predict(model, valid)[0])
    assert np.array_equal(runs[0], runs[1])


def test_early_stopping_and_restore_best(small):
    schema, train, valid = small
    model = _model(schema, "deepfm")
    tr = Trainer(model, lr=1e-3, batch_size=512, patience=1, progress=False)
    # force "no improvement" after the first epoch: a monitored value nobody can beat
    orig = tr._is_better
    tr._is_better = lambda v: orig(v) if tr.best_value is None else False
    r = tr.fit(train, valid, epochs=6)
    assert len(r.history) == 2 and r.stopped_early
    assert r.best_epoch == 1
    # restore_best put epoch 1's weights back
    p, _ = predict(model, valid)
    assert evaluate(model, valid)["auc"] == pytest.approx(r.history[0]["valid_auc"])
    assert p.shape == (valid.batch_size,)


def test_checkpoint_round_trip(small, tmp_path):
    schema, train, valid = small
    model = _model(schema, "din")
    fit(model, train, valid, epochs=1, batch_size=512, progress=False,
        checkpoint_dir=tmp_path / "run")
    assert (tmp_path / "run" / "last" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "best" / "checkpoint.json").is_file()
    loaded, schema2, config = ckpt.load_model(tmp_path / "run")
    assert schema2.to_dict() == schema.to_dict()
    assert config == json.loads(json.dumps(model.config))
    assert not loaded.training
    np.testing.assert_array_equal(predict(loaded, valid)[0], predict(model, valid)[0])
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    # the fused row-wise Adagrad state is part of the checkpoint
    assert loaded.lookup.ebc.state.abs().sum() > 0
    doc = json.loads((tmp_path / "run" / "last" / "checkpoint.json").read_text())
    assert doc["format"] == ckpt.FORMAT and doc["epoch"] == 1
    assert doc["optimizer"]["class"] == "Adam"
    assert Schema.load(tmp_path / "run" / "last" / "schema.json").to_dict() == schema.to_dict()


def test_checkpoint_atomic_replace(small, tmp_path):
    schema, _, _ = small
    a, b = _model(schema, "lr", seed=1), _model(schema, "lr", seed=2)
    path = tmp_path / "ck"
    ckpt.save_checkpoint(path, a)
    ckpt.save_checkpoint(path, b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"], "temporary directories left"
    loaded, _, _ = ckpt.load_model(path)
    for k, v in b.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)

    class Boom(RuntimeError):
        pass

    def bad_write(tmp):
        (tmp / "x").write_text("partial")
        raise Boom

    with pytest.raises(Boom):
        ckpt._atomic_dir(path, bad_write)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert not (path / "x").exists()
    with pytest.raises(FileNotFoundError, match="not an adrec_fast checkpoint"):
        ckpt.load_model(tmp_path)


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.safetensors"])
def test_corrupt_tensor_file_is_an_error_naming_it(small, tmp_path, victim):
    """A truncated or overwritten tensor file of a checkpoint: load_model, the Scorer and
    Trainer.resume raise a ValueError naming the file (safetensors' own error reached the user
    as a traceback)."""
    from adrec_fast.serving import Scorer

    schema, train, _ = small
    model = _model(schema, "deepfm")
    t = Trainer(model, batch_size=512, progress=False, checkpoint_dir=tmp_path / "run")
    t.fit(train, epochs=1)
    file = tmp_path / "run" / "last" / victim
    for damage in (file.read_bytes()[:100], b"not tensors at all"):
        file.write_bytes(damage)
        msg = re.escape(str(file)) + ": not a readable safetensors file"
        with pytest.raises(ValueError, match=msg):
            Trainer(_model(schema, "deepfm"), batch_size=512, progress=False,
                    checkpoint_dir=tmp_path / "run").resume()
        if victim == "model.safetensors":
            with pytest.raises(ValueError, match=msg):
                ckpt.load_model(tmp_path / "run" / "last")
            with pytest.raises(ValueError, match=msg):
                Scorer.load(tmp_path / "run" / "last")


@pytest.mark.parametrize("name", ["deepfm", "din", "fm-sparse"])
def test_resume_equals_uninterrupted(small, tmp_path, name, interrupt_after):
    schema, train, valid = small
    kw = {"epochs": 3, "batch_size": 700, "lr": 2e-3, "schedule": "cosine", "seed": 11,
          "patience": 5, "progress": False}
    # fm-sparse: tables as Parameters with sparse gradients, trained by torch's SparseAdam
    mk = {"fm-sparse": ("fm", {"embedding_optimizer": "none"})}.get(name, (name, {"dropout": 0.1}))
    name, extra = mk
    full = _model(schema, name, seed=0, **extra)
    r_full = fit(full, train, valid, checkpoint_dir=tmp_path / "full", **kw)

    part = _model(schema, name, seed=0, **extra)
    with pytest.raises(interrupt_after.error):
        fit(part, train, valid, checkpoint_dir=tmp_path / "part",
            callbacks=[interrupt_after(1)], **kw)
    # a fresh process would build the model anew (other init); resume overwrites everything
    resumed = _model(schema, name, seed=123, **extra)
    torch.manual_seed(999)
    r_res = fit(resumed, train, valid, checkpoint_dir=tmp_path / "part", resume=True, **kw)
    assert [h["valid_auc"] for h in r_res.history] == [h["valid_auc"] for h in r_full.history]
    assert [h["train_loss"] for h in r_res.history] == [h["train_loss"] for h in r_full.history]
    sd_full, sd_res = full.state_dict(), resumed.state_dict()
    for k in sd_full:
        assert torch.equal(sd_full[k], sd_res[k]), k


def test_inmemory_fast_take_matches_batch_take(small):
    _, train, _ = small
    src = InMemory(train)
    assert src.one_per_bag
    rows = torch.tensor([5, 0, 17, 17, 4999])
    a, b = src.take(rows), train.take(rows)
    for f in ("indices", "offsets", "dense", "labels", "vectors"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    for s in b.seq_indices:
        assert torch.equal(a.seq_indices[s], b.seq_indices[s])
        assert torch.equal(a.seq_offsets[s], b.seq_offsets[s])


def test_plots(small, tmp_path):
    hist = [{"epoch": 1, "train_loss": 0.6, "valid_logloss": 0.55, "valid_auc": 0.7},
            {"epoch": 2, "train_loss": 0.5, "valid_logloss": 0.52, "valid_auc": 0.72}]
    p1 = plot_learning_curves(hist, tmp_path / "lc.png")
    rng = np.random.default_rng(0)
    probs = rng.random(500)
    labels = (rng.random(500) < probs).astype(float)
    p2 = plot_calibration(labels, probs, tmp_path / "cal.png")
    for p in (p1, p2):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mp, rate, count = reliability(labels, probs, bins=5)
    assert count.sum() == 500 and np.all(np.abs(mp - rate) < 0.15)


def test_frappe_fm(shared_data):
    """A quick real-data check: FM on the Frappe file (fit 80% / test 10%)."""
    path = shared_data / "frappe" / "valid.csv.gz"
    if not path.is_file():
        pytest.skip(f"Frappe data not found at {path}")
    from adrec_fast.data import infer_schema, load_all

    schema = infer_schema(path, label="label")
    data = load_all(path, schema)
    perm = torch.randperm(data.batch_size, generator=torch.Generator().manual_seed(0))
    n = data.batch_size
    train = data.take(perm[: int(0.8 * n)])
    test = data.take(perm[int(0.9 * n):])
    torch.manual_seed(0)
    model = build_model("fm", schema, embedding_dim=16)
    fit(model, train, None, epochs=3, batch_size=512, progress=False)
    assert evaluate(model, test)["auc"] > 0.9


def test_training_blocks_stay_below_the_mmap_threshold(small, monkeypatch):
    """A model's training forward raises glibc's mmap threshold above the step's largest block
    (the widest layer or the fields' embeddings side by side), whoever runs the loop, so large
    batches are not mapped and faulted in anew at every step; eval and no-grad calls do not,
    and a batch no larger than one before asks nothing again."""
    from adrec_fast.models import base

    schema, train, _ = small
    model = _model(schema, "deepfm", hidden=(48, 24))
    fields = model.num_fields * model.embedding_dim + model.dense_in
    assert model.step_block_bytes(100) == 100 * max(48, fields) * 4
    wide = _model(schema, "deepfm", hidden=(fields + 3,))
    assert wide.step_block_bytes(7) == 7 * (fields + 3) * 4
    seen = []
    monkeypatch.setattr(base, "map_large_blocks", seen.append)
    small_batch, big_batch = train.slice(0, 64), train.slice(0, 200)
    model.eval()
    model(big_batch)
    model.train()
    with torch.no_grad():
        model(big_batch)
    assert seen == []
    model(small_batch)
    model(small_batch)
    model(big_batch)
    model(small_batch)
    assert seen == [model.step_block_bytes(64), model.step_block_bytes(200)]
    seen.clear()
    Trainer(model, batch_size=512, progress=False).fit(train, epochs=1)
    assert seen == [model.step_block_bytes(512)]


def test_map_large_blocks_rounds_up_caps_and_never_lowers():
    """In a fresh process (the setting is process-wide): the default, a threshold just above
    the block, glibc's cap, and no lowering afterwards."""
    import subprocess
    import sys

    code = ("from adrec_fast.data import allocator as m\n"
            "M = 1 << 20\n"
            "print(m.map_large_blocks(), m.map_large_blocks(20 * M),"
            " m.map_large_blocks(20 * M - 1), m.map_large_blocks(0),"
            " m.map_large_blocks(100 * M))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    M = 1 << 20
    assert [int(v) for v in out] == [16 * M, 21 * M, 21 * M, 21 * M, 32 * M]


def test_map_large_blocks_keeps_freed_heap_resident():
    """With the threshold set, blocks below it that a step frees stay in the process (glibc
    would otherwise return the heap's free top to the system, and the next step fault every
    page in again): resident memory after freeing 24 blocks of 8 MiB, in a fresh process."""
    import subprocess
    import sys

    code = ("import ctypes, sys\n"
            "from adrec_fast.data import allocator as m\n"
            "libc = ctypes.CDLL('libc.so.6'); libc.malloc.restype = ctypes.c_void_p\n"
            "libc.free.argtypes = [ctypes.c_void_p]\n"
            "if sys.argv[1] == 'set': m.map_large_blocks()\n"
            "def rss():\n"
            "    return int(open('/proc/self/statm').read().split()[1]) * 4096\n"
            "blocks = [libc.malloc(8 << 20) for _ in range(24)]\n"
            "for b in blocks: ctypes.memset(b, 1, 8 << 20)\n"
            "before = rss()\n"
            "for b in reversed(blocks): libc.free(b)\n"
            "print(before - rss())\n")
    released = {mode: int(subprocess.run([sys.executable, "-c", code, mode], capture_output=True,
                                         text=True, check=True).stdout)
                for mode in ("set", "default")}
    # glibc's default (dynamic) rule keeps twice its mmap threshold: 8 MiB blocks come from the
    # heap only once a mapped one was freed, so the default process maps and unmaps them
    assert released["set"] < 8 << 20, released
    assert released["default"] > 100 << 20, released
