# SPDX-License-Identifier: Apache-2.0
"""Online training: progressive validation (scored before trained), Arrow or Batch streams,
windows, checkpoint + resume without training a row twice, bad input."""

import copy

import numpy as np
import pyarrow as pa
import pytest
import torch

from adrec_fast.data.batch import Batch
from adrec_fast.data.metrics import auc, logloss
from adrec_fast.data.synthetic import SyntheticCTR
from adrec_fast.models.registry import build_model
from adrec_fast.training.loop import Trainer
from adrec_fast.training.online import (load_position, scores_in_train_mode, train_online)

N = 3000
BS = 256


@pytest.fixture(scope="module")
def data():
    gen = SyntheticCTR(seed=5, drift=True, period_rows=1000, n_sparse=6, max_len=5)
    schema = gen.schema()
    table = gen.generate(N)
    return schema, table


def _model(schema, name="fm", **kw):
    torch.manual_seed(0)
    return build_model(name, schema, embedding_dim=8, **kw)


def _reference(model, trainer, batches):
    """Score each batch in eval mode, then take the trainer's step on it (the definition)."""
    probs = []
    for b in batches:
        model.eval()
        with torch.no_grad():
            probs.append(torch.sigmoid(model(b)).float().numpy())
        model.train()
        logits = model(b)
        loss = model.loss(logits, b.labels)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.optimizer.step()
    return np.concatenate(probs)


@pytest.mark.parametrize("name,kw", [("fm", {}), ("deepfm", {"hidden": (16,), "dropout": 0.3})])
def test_progressive_scores_match_definition(data, name, kw):
    schema, table = data
    batches = [schema.encode(table.slice(s, BS)) for s in range(0, N, BS)]
    ref_model = _model(schema, name, **kw)
    ref = _reference(ref_model, Trainer(ref_model, progress=False, batch_size=BS), batches)
    model = _model(schema, name, **kw)
    assert scores_in_train_mode(model) == (name == "fm")
    res = train_online(model, batches, trainer=Trainer(model, progress=False, batch_size=BS),
                       window_rows=1000)
    torch.testing.assert_close(torch.from_numpy(res.probs), torch.from_numpy(ref))
    y = table.column("label").to_numpy().astype(np.float32)
    np.testing.assert_array_equal(res.labels, y)
    assert res.rows == N
    assert res.progressive_auc == auc(y, res.probs)
    assert res.progressive_logloss == logloss(y, res.probs)
    assert [(w["start"], w["stop"]) for w in res.windows] == [(0, 1000), (1000, 2000),
                                                            (2000, 3000)]
    for w in res.windows:
        assert w["auc"] == auc(y[w["start"]:w["stop"]], res.probs[w["start"]:w["stop"]])
    # the parameters end where the reference's do
    for a, b in zip(model.state_dict().values(), ref_model.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_first_batch_scored_before_training(data):
    schema, table = data
    model = _model(schema)
    untouched = copy.deepcopy(model).eval()
    first = schema.encode(table.slice(0, BS))
    res = train_online(model, [table], schema=schema, batch_size=BS, lr=1e-2, progress=False)
    with torch.no_grad():
        p0 = torch.sigmoid(untouched(first)).float().numpy()
    np.testing.assert_array_equal(res.probs[:BS], p0)
    # and the model did learn: its later scores are not the untouched model's
    with torch.no_grad():
        later = schema.encode(table.slice(N - BS, BS))
        assert not np.allclose(res.probs[-BS:], torch.sigmoid(untouched(later)).numpy())


def test_arrow_chunks_and_batches_give_the_same_run(data):
    schema, table = data
    # uneven chunk sizes (not multiples of the batch), RecordBatches and Tables mixed
    cuts = [0, 100, 101, 700, 1900, N]
    chunks = [table.slice(a, b - a) for a, b in zip(cuts, cuts[1:])]
    chunks = [c.to_batches()[0] if i % 2 else c for i, c in enumerate(chunks)]
    m1 = _model(schema)
    r1 = train_online(m1, iter(chunks), schema=schema, batch_size=BS)
    m2 = _model(schema)
    batches = [schema.encode(table.slice(s, BS)) for s in range(0, N, BS)]
    r2 = train_online(m2, batches, batch_size=BS)
    np.testing.assert_array_equal(r1.probs, r2.probs)
    assert r1.progressive_auc == r2.progressive_auc


def test_resume_trains_no_row_twice(data, tmp_path):
    schema, table = data
    whole = train_online(_model(schema), [table], schema=schema, batch_size=BS)

    class Killed(Exception):
        pass

    def dies_after(rows):
        for s in range(0, N, 500):
            if s >= rows:
                raise Killed
            yield table.slice(s, 500)

    model = _model(schema)
    with pytest.raises(Killed):
        train_online(model, dies_after(2000), schema=schema, batch_size=BS,
                     checkpoint_dir=tmp_path, checkpoint_every=700)
    pos = load_position(tmp_path)
    assert pos == 1536  # whole steps: checkpoints at 768 and 1536 (the step after 2000 died)
    model = _model(schema)  # a fresh process: state comes from the checkpoint only
    trainer = Trainer(model, progress=False, batch_size=BS)
    res = train_online(model, [table], schema=schema, trainer=trainer, checkpoint_dir=tmp_path,
                       checkpoint_every=700, resume=True)
    assert res.resumed_from == 1536 and res.rows == N
    assert trainer.global_step == -(-N // BS) == 12  # each row trained once: 12 steps in all
    np.testing.assert_array_equal(res.probs, whole.probs)
    assert res.progressive_auc == whole.progressive_auc
    assert load_position(tmp_path) == N
    # resuming a finished run trains nothing more
    again = train_online(model, [table], schema=schema, trainer=trainer,
                         checkpoint_dir=tmp_path, resume=True)
    assert again.rows == N and trainer.global_step == 12


def test_corrupt_checkpoint_refused(data, tmp_path):
    schema, table = data
    train_online(_model(schema), [table.slice(0, 600)], schema=schema, batch_size=BS,
                 checkpoint_dir=tmp_path, checkpoint_every=BS)
    np.savez(tmp_path / "online" / "progressive.npz", probs=np.zeros(3), labels=np.zeros(3))
    with pytest.raises(ValueError, match="3 scores for stream position 600"):
        train_online(_model(schema), [table], schema=schema, batch_size=BS,
                     checkpoint_dir=tmp_path, resume=True)


def test_bad_input(data):
    schema, table = data
    model = _model(schema)
    with pytest.raises(TypeError, match="stream item 1 is a dict"):
        train_online(model, [table.slice(0, 10), {"a": 1}], schema=schema)
    with pytest.raises(ValueError, match="needs a schema"):
        train_online(model, [table])
    with pytest.raises(ValueError, match="no label"):
        train_online(model, [table.drop(["label"])], schema=schema)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        train_online(model, [table], schema=schema, batch_size=0)
    with pytest.raises(ValueError, match="need a checkpoint_dir"):
        train_online(model, [table], schema=schema, resume=True)
    with pytest.raises(ValueError, match="window_rows"):
        train_online(model, [table], schema=schema, window_rows=0)
    other = _model(schema)
    with pytest.raises(ValueError, match="trainer.model"):
        train_online(model, [table], schema=schema, trainer=Trainer(other, progress=False))


def test_empty_stream_and_batch_of_one(data):
    schema, table = data
    res = train_online(_model(schema), [], schema=schema)
    assert res.rows == 0 and np.isnan(res.progressive_auc) and res.windows == []
    res = train_online(_model(schema), [table.slice(0, 5)], schema=schema, batch_size=1)
    assert res.rows == 5 and res.probs.shape == (5,)


def test_plot(data, tmp_path):
    pytest.importorskip("matplotlib")
    schema, table = data
    path = tmp_path / "online.png"
    train_online(_model(schema), [table], schema=schema, batch_size=BS, window_rows=1000,
                 plot=path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_batch_input_is_recut(data):
    schema, table = data
    big = schema.encode(table)
    res = train_online(_model(schema), [big], batch_size=1000)
    assert isinstance(big, Batch) and res.rows == N
    # one Batch cut into steps of 1000 = the same rows handed over as three Batches
    parts = [big.slice(s, s + 1000) for s in range(0, N, 1000)]
    np.testing.assert_array_equal(train_online(_model(schema), parts, batch_size=1000).probs,
                                  res.probs)


# ---------------------------------------------------------------------------- the CLI
def _csv(path, table, times):
    import pyarrow.csv as pcsv

    t = table.drop_columns(["hist"]).append_column("ts", pa.array(times))
    pcsv.write_csv(t, path)


def _last_json(out: str) -> dict:
    import json

    return json.loads(out.strip().splitlines()[-1])


def test_cli_online_in_time_order(data, tmp_path, capsys):
    from adrec_fast.cli import main
    from adrec_fast.models.checkpoint import load_model

    _, table = data
    table = table.slice(0, 1200)
    ts = np.arange(1200, dtype=np.int64) * 10
    ts[[5, 900]] = ts[[900, 5]]  # two rows out of order
    d = tmp_path / "a.csv"
    _csv(d, table, ts)
    argv = ["train", str(d), "--online", "--time-col", "ts", "--model", "lr", "--batch-size",
            "128", "--out", str(tmp_path / "run"), "--json", "--no-progress"]
    assert main(argv) == 0
    cap = capsys.readouterr()
    res = _last_json(cap.out)
    assert res["rows"] == 1200 and 0.3 < res["progressive_auc"] < 1
    assert res["progressive_logloss"] > 0
    assert "2 rows out of 'ts' order; sorted (stable)" in cap.err
    model, schema, _ = load_model(tmp_path / "run")
    assert "ts" not in schema.raw_columns()
    # the same rows already in order (the CSV sorted by hand) give the same run
    order = np.argsort(ts, kind="stable")
    _csv(tmp_path / "b.csv", table.take(pa.array(order)), ts[order])
    argv2 = ["train", str(tmp_path / "b.csv"), "--online", "--time-col", "ts", "--model", "lr",
             "--batch-size", "128", "--out", str(tmp_path / "run2"), "--json", "--no-progress"]
    assert main(argv2) == 0
    cap = capsys.readouterr()
    assert _last_json(cap.out)["progressive_auc"] == res["progressive_auc"]
    assert "out of" not in cap.err


def test_cli_online_bad_input(data, tmp_path, capsys):
    from adrec_fast.cli import main

    _, table = data
    table = table.slice(0, 50)
    d = tmp_path / "bad.csv"
    _csv(d, table, [f"2024-01-01T00:00:{i:02d}" for i in range(30)] + ["soon"]
         + [f"2024-01-01T00:01:{i:02d}" for i in range(19)])
    base = ["--online", "--model", "lr", "--out", str(tmp_path / "r")]
    assert main(["train", str(d), "--time-col", "ts"] + base) == 2
    err = capsys.readouterr().err
    # header = line 1, so data row 31 is line 32
    assert "bad.csv, line 32, field 'ts': unparsable timestamp" in err and "'soon'" in err
    assert not (tmp_path / "r").exists()
    assert main(["train", str(d), "--time-col", "nope"] + base) == 2
    assert "--time-col 'nope': " + str(d) + " has no such column" in capsys.readouterr().err
    assert main(["train", str(d), "--time-col", "ts", "--model", "lr", "--out",
                 str(tmp_path / "r")]) == 2
    assert "--time-col orders the stream of --online" in capsys.readouterr().err
    assert main(["train", str(d), "--epochs", "2"] + base) == 2
    assert "--epochs does not apply to --online" in capsys.readouterr().err


def test_order_by_time_forms_and_errors():
    from adrec_fast.data.errors import DataError
    from adrec_fast.training.online import order_by_time

    a = pa.table({"x": [0, 1, 2], "t": ["2024-01-01T00:00:02Z", "2024-01-01T00:00:00Z",
                                       "2024-01-01T00:00:02Z"]})
    b = pa.table({"x": [3, 4], "t": ["2024-01-01T00:00:01Z", "2024-01-01T00:00:03Z"]})
    table, moved = order_by_time([a, b], "t")
    assert table.column_names == ["x"] and table.column("x").to_pylist() == [1, 3, 0, 2, 4]
    assert moved == 4  # stable: the two rows at 00:00:02 keep their order
    nums = pa.table({"x": [0, 1], "t": [5.5, 5.5]})
    assert order_by_time([nums], "t") == (pa.table({"x": [0, 1]}), 0)
    assert order_by_time([], "t")[1] == 0
    # rows count across chunks: the bad value is the 4th row of the stream
    with pytest.raises(DataError, match=r"<stream>, row 4, field 't': missing timestamp"):
        order_by_time([a, pa.table({"x": [3], "t": pa.array([None], pa.string())})], "t")
    with pytest.raises(DataError, match=r"row 2, field 't': unparsable timestamp .*'tomorrow'"):
        order_by_time([pa.table({"x": [0, 1], "t": ["2024-01-01", "tomorrow"]})], "t")
    with pytest.raises(DataError, match=r"row 1, field 't': timestamps mix numbers and date"):
        order_by_time([pa.table({"x": [0, 1], "t": ["12", "2024-01-01"]})], "t")
    with pytest.raises(DataError, match="no time column 'q'"):
        order_by_time([a], "q")
    with pytest.raises(DataError, match="must hold numbers or date-times"):
        order_by_time([pa.table({"t": pa.array([[1]])})], "t")


def test_rates_are_the_trainers(data):
    schema, table = data
    model = _model(schema)
    trainer = Trainer(model, progress=False, lr=0.004, embedding_lr=0.7, batch_size=BS)
    trainer.plateau_scale = 0.5  # a batch run that reduced its rates once
    train_online(model, [table.slice(0, 600)], schema=schema, trainer=trainer)
    assert {c.optimizer.lr for c in model.embedding_collections()} == {0.35}
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [0.002]


def test_plot_skipped_with_a_note_without_matplotlib(data, tmp_path, monkeypatch, capsys):
    from adrec_fast.training import plots

    schema, table = data
    monkeypatch.setattr(plots, "missing_matplotlib", lambda: "matplotlib is not installed")
    res = train_online(_model(schema), [table.slice(0, 600)], schema=schema, batch_size=BS,
                       plot=tmp_path / "online.png")
    assert res.rows == 600 and not (tmp_path / "online.png").exists()
    assert "matplotlib is not installed" in capsys.readouterr().err
