# SPDX-License-Identifier: Apache-2.0
"""`adrec-fast train` uses the model's default recipe (models/recipes.py) when no tuning flag is
given; --embedding-l2 / --dropout / --batch-norm override it; out-of-range values are refused
with the flag named."""
from __future__ import annotations

import json

import pytest

import adrec_fast  # noqa: F401
from adrec_fast.cli import main
from adrec_fast.data.synthetic import SyntheticCTR
from adrec_fast.training import recipes


@pytest.fixture(scope="module")
def csv(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_recipe")
    SyntheticCTR(n_rows=1500, seed=0, n_sparse=4, n_dense=2, max_cardinality=50, n_users=30,
                 n_items=40).write_csv(d / "train.csv", n=1500)
    return d / "train.csv"


def _run(csv, out, *flags):
    return main(["train", str(csv), "--out", str(out), "--no-progress", "--epochs", "1", *flags])


def _saved(out):
    metrics = json.loads((out / "metrics.json").read_text())
    meta = json.loads((out / "last" / "checkpoint.json").read_text())
    return metrics["model"], meta["trainer"]["settings"]


def test_train_defaults_are_the_recipe(csv, tmp_path, capsys):
    out = tmp_path / "m"
    assert _run(csv, out, "--model", "deepfm") == 0, capsys.readouterr().err
    config, settings = _saved(out)
    r = recipes.recipe("deepfm")
    for k, v in r.model.items():
        if k != "embedding_dim":
            assert config[k] == (list(v) if isinstance(v, tuple) else v), k
    assert config["embedding_dim"] == r.model["embedding_dim"]
    for k, v in r.trainer.items():
        assert settings[k] == v, k


def test_flags_override_the_recipe(csv, tmp_path, capsys):
    out = tmp_path / "m"
    assert _run(csv, out, "--model", "dcnv2", "--embedding-l2", "0.01", "--dropout", "0.1",
                "--no-batch-norm", "--batch-size", "256", "--embedding-dim", "8") == 0, \
        capsys.readouterr().err
    config, settings = _saved(out)
    assert config["embedding_l2"] == 0.01 and config["dropout"] == 0.1
    assert config["batch_norm"] is False and config["embedding_dim"] == 8
    assert settings["batch_size"] == 256
    assert settings["plateau_factor"] == recipes.recipe("dcnv2").trainer["plateau_factor"]


@pytest.mark.parametrize("flags,msg", [
    (["--embedding-l2", "-0.5"], "--embedding-l2 must be >= 0"),
    (["--embedding-l2", "inf"], "--embedding-l2 must be >= 0"),
    (["--dropout", "1.0"], "--dropout must be in [0, 1)"),
    (["--dropout", "-0.1"], "--dropout must be in [0, 1)"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--patience", "0"], "--patience must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--threads", "-2"], "--threads must be >= 1, got -2"),
    (["--skip-bad-rows", "--max-bad-rows", "-1"], "max_bad_rows must be >= 0, got -1"),
])
def test_out_of_range_flags(csv, tmp_path, capsys, flags, msg):
    rc = _run(csv, tmp_path / "m", "--model", "deepfm", *flags)
    err = capsys.readouterr().err
    assert rc != 0 and msg in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "m").exists()


def test_flag_the_model_does_not_take(csv, tmp_path, capsys):
    rc = _run(csv, tmp_path / "m", "--model", "lr", "--dropout", "0.2")
    err = capsys.readouterr().err
    assert rc != 0 and "dropout" in err and "Traceback" not in err, err
