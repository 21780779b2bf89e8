# SPDX-License-Identifier: Apache-2.0
"""``adrec-fast train ... --nproc 2`` end to end: two gloo ranks launched by the command itself,
each reading its half of a synthetic CSV, against the same command in one process; the
2-rank run directory is then evaluated in one process with ``adrec-fast eval`` and the Scorer.

The two runs train on the same global batches in the same order, with the global batch's
dropout masks and batch-norm statistics; they differ in the order of summation only, which
five epochs of training amplify to about 1e-3 of AUC. So the test AUCs are compared within a
tolerance (``test_two_ranks`` checks the sharded step itself to 1e-5).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
ROWS, TEST_ROWS = 8_000, 4_000
ARGS = ["--model", "deepfm", "--epochs", "5", "--batch-size", "256", "--json", "--no-progress"]
#: a broken path (a wrong shard, gradient scale or batch share) costs far more than this
AUC_TOLERANCE = 0.01


def _write_csv(path: Path, n: int, seed: int) -> None:
    """A CTR file whose clicks follow a logistic model of 6 categorical and 2 dense columns."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    weights = np.random.default_rng(0)  # the click model: the same for every file
    rng = np.random.default_rng(seed)
    cols, logit = {}, np.zeros(n)
    for j, card in enumerate([50, 200, 30, 1000, 10, 500]):
        w = weights.normal(0, 1, card)
        ids = (np.minimum(rng.zipf(1.3, n) - 1, card - 1) if j % 2
               else rng.integers(0, card, n))
        logit += 0.7 * w[ids]
        cols[f"c{j}"] = ids
    for j in range(2):
        x = rng.normal(0, 1, n)
        logit += 0.5 * x
        cols[f"d{j}"] = np.round(x, 4)
    y = (rng.random(n) < 1 / (1 + np.exp(-(logit - 0.5)))).astype(np.int64)
    pcsv.write_csv(pa.table({"label": y, **cols}), path)


def _cli(*args, timeout=150):
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run([sys.executable, "-m", "adrec_fast", *map(str, args)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


def _last_json(done) -> dict:
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_train")
    _write_csv(d / "train.csv", ROWS, seed=1)
    _write_csv(d / "test.csv", TEST_ROWS, seed=2)
    return d


def test_train_nproc_2_matches_one_process_and_loads_in_one(files):
    two = _last_json(_cli("train", files / "train.csv", "--out", files / "two", "--nproc", 2,
                          *ARGS))
    one = _last_json(_cli("train", files / "train.csv", "--out", files / "one", "--threads", 1,
                          *ARGS))
    assert set(two) == set(one)
    assert (two["rows_train"], two["rows_valid"]) == (one["rows_train"], one["rows_valid"])
    assert {p.name for p in (files / "two").iterdir()} == {p.name for p in
                                                           (files / "one").iterdir()}
    manifest = json.loads((files / "two" / "best" / "manifest.json").read_text())
    assert manifest["world"] == 2  # the tables really were sharded over two ranks
    ev_two = _last_json(_cli("eval", files / "two", files / "test.csv", "--json"))
    ev_one = _last_json(_cli("eval", files / "one", files / "test.csv", "--json"))
    assert ev_two["rows"] == ev_one["rows"] == TEST_ROWS
    assert ev_one["auc"] > 0.75  # the data is learnable: the comparison below means something
    assert abs(ev_two["auc"] - ev_one["auc"]) < AUC_TOLERANCE, (ev_two, ev_one)

    # the Scorer loads the sharded run as it is and scores as eval does
    import pyarrow.csv as pcsv

    from adrec_fast.data.metrics import auc
    from adrec_fast.serving import Scorer

    table = pcsv.read_csv(files / "test.csv")
    scorer = Scorer.load(files / "two")
    cands = {c: table[c].to_pylist() for c in table.column_names if c != "label"}
    p = np.asarray(scorer.score({}, cands), dtype=np.float64)
    assert auc(table["label"].to_numpy(), p) == pytest.approx(ev_two["auc"], abs=1e-4)


def test_train_nproc_errors_are_named_and_end_every_rank(files):
    # refused before any rank starts
    done = _cli("train", files / "train.csv", "--out", files / "bad", "--nproc", 2,
                "--model", "fm", "--batch-size", "255", timeout=60)
    assert done.returncode == 2
    assert "--batch-size 255 does not split evenly over 2 ranks" in done.stderr
    # rank 0 refuses --out while rank 1 waits for its schema: both end, with rank 0's message
    (files / "bad").mkdir()
    (files / "bad" / "notes.txt").write_text("not a model")
    done = _cli("train", files / "train.csv", "--out", files / "bad", "--nproc", 2,
                "--model", "fm", "--epochs", "1", timeout=90)
    assert done.returncode != 0
    assert "does not look like a model directory" in done.stderr
    assert "(reported by rank 0)" in done.stderr
    assert sorted(p.name for p in (files / "bad").iterdir()) == ["notes.txt"]


def test_ranks_started_with_different_arguments_are_refused(files):
    """Two ranks started by hand (torchrun's environment), rank 1 with another seed: both
    stop at start with an error naming the argument and each rank's value."""
    from .test_two_ranks import _free_port

    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "adrec_fast", "train", str(files / "train.csv"), "--out",
             str(files / "mismatch"), "--model", "fm", "--seed", str(rank)],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    errs = [p.communicate(timeout=120)[1] for p in procs]  # every rank waited on, pass or fail
    for p, err in zip(procs, errs):
        assert p.returncode == 2, err[-2000:]
        assert "different configurations" in err and "arguments: seed" in err, err[-2000:]
        assert "rank 0 has 0, rank 1 has 1" in err, err[-2000:]
    assert not (files / "mismatch").exists()
