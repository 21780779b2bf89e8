# SPDX-License-Identifier: Apache-2.0
"""Reduce-lr-on-plateau, gradient clipping, and the per-model default recipes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import adrec_fast  # noqa: F401
from adrec_fast.data.synthetic import SyntheticCTR
from adrec_fast.training import recipes
from adrec_fast.models.registry import build_model, model_names
from adrec_fast.training.loop import Trainer, evaluate


def _deepfm(schema):
    torch.manual_seed(0)
    return build_model("deepfm", schema, embedding_dim=8, hidden=(16,))


def test_plateau_schedule(small):
    """Every epoch without a better validation value multiplies every lr (dense and fused) by
    the factor; an improving epoch leaves it."""
    schema, train, valid = small
    model = _deepfm(schema)
    tr = Trainer(model, lr=1e-3, embedding_lr=0.05, batch_size=1000, patience=None,
                 plateau_factor=0.1, progress=False)
    verdicts = iter([True, False, True, False, False])  # improved? per epoch
    tr._is_better = lambda v: next(verdicts)
    seen = []

    def record(trainer, metrics):  # the lrs the epoch just finished trained with
        seen.append((trainer.optimizer.param_groups[0]["lr"],
                     [c.optimizer.lr for c in model.embedding_collections()],
                     metrics["lr_factor"]))

    tr.fit(train, valid, epochs=5, callbacks=[record])
    want = [1.0, 1.0, 0.1, 0.1, 0.01]
    for (lr, elrs, f), w in zip(seen, want):
        assert lr == pytest.approx(1e-3 * w)
        assert all(e == pytest.approx(0.05 * w) for e in elrs)
        assert f == pytest.approx(w)
    assert tr.plateau_scale == pytest.approx(0.001)
    assert tr._trainer_state()["plateau_scale"] == pytest.approx(0.001)


def test_plateau_scale_resumes(small, tmp_path):
    schema, train, valid = small
    tr = Trainer(_deepfm(schema), batch_size=1000, plateau_factor=0.5, progress=False,
                 checkpoint_dir=tmp_path)
    tr._is_better = lambda v: False
    tr.fit(train, valid, epochs=2)
    tr2 = Trainer(_deepfm(schema), batch_size=1000, plateau_factor=0.5, progress=False,
                  checkpoint_dir=tmp_path)
    assert tr2.resume()
    assert tr2.plateau_scale == pytest.approx(0.25)


def test_clip_grad_norm(small):
    """With a tiny clip norm every dense step is clipped: one SGD step moves the dense
    parameters by exactly lr * clip in total norm."""
    schema, train, _ = small
    model = _deepfm(schema)
    before = [p.detach().clone() for p in model.dense_parameters()]
    tr = Trainer(model, lr=0.1, optimizer="sgd", batch_size=5000, clip_grad_norm=1e-3,
                 progress=False)
    tr.fit(train, epochs=1)
    moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum()
                           for p, b in zip(model.dense_parameters(), before)))
    assert moved.item() == pytest.approx(0.1 * 1e-3, rel=1e-3)


@pytest.mark.parametrize("kw,match", [
    ({"plateau_factor": 0.0}, "plateau_factor"),
    ({"plateau_factor": 1.5}, "plateau_factor"),
    ({"clip_grad_norm": -1.0}, "clip_grad_norm"),
    ({"weight_decay": -1e-5}, "weight_decay"),
    ({"patience": 0}, "patience"),
])
def test_bad_trainer_options(small, kw, match):
    schema, _, _ = small
    with pytest.raises(ValueError, match=match):
        Trainer(_deepfm(schema), progress=False, **kw)


def test_every_model_has_a_recipe(small):
    schema, _, _ = small
    assert sorted(recipes.RECIPES) == model_names()
    for name in model_names():
        torch.manual_seed(0)
        model, trainer, epochs = recipes.build(name, schema, progress=False)
        r = recipes.recipe(name)
        assert epochs == r.epochs
        for k, v in r.model.items():
            if k == "embedding_l2":  # in the config only when > 0
                assert all(c.l2 == v for c in model.embedding_collections())
            elif k != "embedding_dim":
                assert model.config[k] == (list(v) if isinstance(v, tuple) else v), k
        assert model.embedding_dim == r.model.get("embedding_dim", 16)
        for k, v in r.trainer.items():
            assert trainer.settings()[k] == v, k


def test_recipe_overrides_route_by_name(small):
    schema, _, _ = small
    model, trainer, epochs = recipes.build("deepfm", schema, progress=False, dropout=0.0,
                                           batch_size=64, epochs=3, embedding_dim=4)
    assert model.config["dropout"] == 0.0 and trainer.batch_size == 64 and epochs == 3
    assert model.embedding_dim == 4
    with pytest.raises(ValueError, match="unknown model"):
        recipes.build("nope", schema)


def test_default_recipe_beats_unregularised():
    """Fixed seed, a small synthetic set with many rare ids (2000-row tables, 20k training
    rows): DeepFM's recipe (embedding L2 + dropout) beats the same recipe without them in test
    AUC and logloss. (Smaller batch and MLP than the recipe's, for test time: both arms alike.)"""
    n = 20_000
    gen = SyntheticCTR(n_rows=n, seed=1, n_sparse=8, n_dense=3, max_len=8,
                       max_cardinality=2000, n_users=2000, n_items=2000)
    schema = gen.schema()
    data = schema.encode(gen.generate(n + 4000))
    train, valid, test = data.slice(0, n), data.slice(n, n + 2000), data.slice(n + 2000, n + 4000)
    res = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic summation order; fast on a shared machine
    try:
        for arm, kw in (("recipe", {}), ("plain", {"embedding_l2": 0.0, "dropout": 0.0})):
            torch.manual_seed(0)
            model, trainer, epochs = recipes.build("deepfm", schema, seed=0, progress=False,
                                                   batch_size=512, hidden=(64, 64), **kw)
            trainer.fit(train, valid, epochs=epochs)
            res[arm] = evaluate(model, test)
    finally:
        torch.set_num_threads(threads)
    assert recipes.recipe("deepfm").model["embedding_l2"] > 0
    assert recipes.recipe("deepfm").model["dropout"] > 0
    assert res["recipe"]["auc"] > res["plain"]["auc"] + 0.002, res
    assert res["recipe"]["logloss"] < res["plain"]["logloss"] - 0.002, res


def test_intercept_shift():
    from adrec_fast.training.loop import intercept_shift

    rng = np.random.default_rng(0)
    z = rng.normal(-1, 1.5, 5000)
    y = (rng.random(5000) < 1 / (1 + np.exp(-z))).astype(float)
    p = 1 / (1 + np.exp(-(z + 0.7)))  # over-confident by a constant offset
    d = intercept_shift(p, y)
    q = 1 / (1 + np.exp(-(np.log(p / (1 - p)) + d)))
    assert q.mean() == pytest.approx(y.mean(), rel=1e-9)
    assert d == pytest.approx(-0.7, abs=0.1)
    assert intercept_shift(p, np.zeros(5000)) == 0.0


def test_calibrate_shifts_the_head_bias(small, tmp_path):
    """calibrate=True: mean validation prediction == positive rate, ranking unchanged, and the
    best/ checkpoint carries the shifted bias."""
    from adrec_fast.models import checkpoint as ckpt
    from adrec_fast.training.loop import predict

    schema, train, valid = small
    model = _deepfm(schema)
    tr = Trainer(model, batch_size=1000, progress=False, checkpoint_dir=tmp_path)
    tr.fit(train, valid, epochs=2)
    p0, y = predict(model, valid)
    model2 = _deepfm(schema)
    tr2 = Trainer(model2, batch_size=1000, progress=False, calibrate=True,
                  checkpoint_dir=tmp_path / "cal")
    tr2.fit(train, valid, epochs=2)
    p1, _ = predict(model2, valid)
    assert p1.mean() == pytest.approx(y.mean(), rel=1e-6)
    assert abs(p0.mean() - y.mean()) > 1e-4  # there was something to correct
    assert tr2.logit_shift != 0.0
    from adrec_fast.data.metrics import auc

    assert auc(y, p1) == pytest.approx(auc(y, p0), abs=1e-6)
    loaded, _, _ = ckpt.load_model(tmp_path / "cal")
    np.testing.assert_allclose(predict(loaded, valid)[0], p1, rtol=1e-6)
