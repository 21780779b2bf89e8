# SPDX-License-Identifier: Apache-2.0
"""Online training on dynamic tables: the CLI default (no vocabulary pass) and its options,
the tables' clock (--time-col, TTL), CSV from standard input as it arrives, Arrow streams from
the Python API, bad input."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pytest
import torch

from adrec_fast.data.errors import DataError
from adrec_fast.data.schema import Schema
from adrec_fast.data.stream import arrival_blocks, piped_csv
from adrec_fast.models.registry import build_model
from adrec_fast.training.loop import Trainer
from adrec_fast.training.online import online_schema, train_online


def _table(n: int, seed: int = 0, ts=None) -> pa.Table:
    """Rows whose click depends on the ad and the user: learnable per value."""
    rng = np.random.default_rng(seed)
    ad = rng.integers(0, 40, n)
    user = rng.integers(0, 25, n)
    p = 1 / (1 + np.exp(-(np.sin(ad * 1.7) * 2 + np.cos(user * 0.9))))
    cols = {"ad": [f"a{x}" for x in ad], "user": [f"u{x}" for x in user],
            "price": np.round(rng.normal(size=n), 3), "label": (rng.random(n) < p).astype(int)}
    if ts is not None:
        cols["ts"] = ts
    return pa.table(cols)


def _csv(path, table) -> None:
    pcsv.write_csv(table, path)


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


# ------------------------------------------------------------------ the CLI
def test_cli_online_trains_dynamic_tables_by_default(tmp_path, capsys):
    from adrec_fast.cli import main
    from adrec_fast.models.checkpoint import load_model

    d = tmp_path / "s.csv"
    _csv(d, _table(3000))
    argv = ["train", str(d), "--online", "--model", "fm", "--batch-size", "128", "--out",
            str(tmp_path / "run"), "--json", "--min-count", "2", "--ttl", "1000"]
    assert main(argv) == 0
    cap = capsys.readouterr()
    res = _last_json(cap.out)
    assert res["rows"] == 3000 and res["progressive_auc"] > 0.6
    assert "dynamic tables:" in cap.out
    model, schema, config = load_model(tmp_path / "run")
    assert schema.is_dynamic("ad") and schema.is_dynamic("user")
    assert schema.field("ad").vocabulary is None  # no vocabulary pass
    assert config["dynamic_tables"]["min_count"] == 2 and config["dynamic_tables"]["ttl"] == 1000
    assert 60 <= sum(t.num_keys for t in model.dynamic_embeddings()) // 2 <= 66  # 40 ads + 25
    # eval and predict read the run as any other
    assert main(["eval", str(tmp_path / "run"), str(d), "--json"]) == 0
    assert _last_json(capsys.readouterr().out)["auc"] > 0.6
    assert main(["predict", str(tmp_path / "run"), str(d), "--out",
                 str(tmp_path / "p.csv")]) == 0
    assert pcsv.read_csv(tmp_path / "p.csv").num_rows == 3000


def test_cli_static_vocab_keeps_the_vocabulary_pass(tmp_path, capsys):
    from adrec_fast.cli import main
    from adrec_fast.models.checkpoint import load_model

    d = tmp_path / "s.csv"
    _csv(d, _table(800))
    assert main(["train", str(d), "--online", "--static-vocab", "--model", "lr", "--out",
                 str(tmp_path / "run"), "--json"]) == 0
    assert "dynamic tables" not in capsys.readouterr().out
    model, schema, config = load_model(tmp_path / "run")
    assert not schema.has_dynamic and len(schema.field("ad").vocabulary) == 40
    assert "dynamic_tables" not in config and not model.dynamic_embeddings()


@pytest.mark.parametrize("args,message", [
    (["--min-count", "0"], "--min-count must be >= 1, got 0"),
    (["--admit-prob", "1.5"], "--admit-prob must be in (0, 1], got 1.5"),
    (["--admit-prob", "0"], "--admit-prob must be in (0, 1], got 0.0"),
    (["--ttl", "0"], "--ttl must be >= 1, got 0"),
    (["--capacity", "-3"], "--capacity must be >= 1, got -3"),
    (["--static-vocab", "--ttl", "5"], "--ttl sets the dynamic tables, and --static-vocab has"),
    (["--embedding-l2", "0.5"], "--embedding-l2 applies to static tables"),
])
def test_cli_online_options_are_checked(tmp_path, capsys, args, message):
    from adrec_fast.cli import main

    d = tmp_path / "s.csv"
    _csv(d, _table(50))
    assert main(["train", str(d), "--online", "--model", "lr", "--out", str(tmp_path / "r")]
                + args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args,message", [
    (["--min-count", "2"], "--min-count applies to --online training; add --online"),
    (["--static-vocab"], "--static-vocab applies to --online training"),
])
def test_cli_online_flags_need_online(tmp_path, capsys, args, message):
    from adrec_fast.cli import main

    d = tmp_path / "s.csv"
    _csv(d, _table(50))
    assert main(["train", str(d), "--model", "lr", "--out", str(tmp_path / "r")] + args) == 2
    assert message in capsys.readouterr().err


def test_cli_stdin_needs_online(capsys, tmp_path):
    from adrec_fast.cli import main

    assert main(["train", "-", "--model", "lr", "--out", str(tmp_path / "r")]) == 2
    assert "DATA '-' (standard input) is read once" in capsys.readouterr().err


# ------------------------------------------------------------------ stdin
def _run_cli(args, feed: bytes, pieces: int = 1, pause: float = 0.0):
    """``python -m adrec_fast`` with ``feed`` piped to its stdin in ``pieces`` writes."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "adrec_fast", *args], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    step = -(-len(feed) // pieces)
    pipe, p.stdin = p.stdin, None  # written by a thread while communicate() reads the output

    def write():
        try:
            for s in range(0, len(feed), step):
                pipe.write(feed[s:s + step])
                pipe.flush()
                time.sleep(pause)
            pipe.close()
        except BrokenPipeError:  # the process stopped reading (an error): its output says why
            pass

    writer = threading.Thread(target=write)
    writer.start()
    out, err = p.communicate(timeout=300)
    writer.join()
    return p.returncode, out.decode(), err.decode()


def test_cli_trains_on_rows_piped_to_stdin(tmp_path):
    buf = io.BytesIO()
    pcsv.write_csv(_table(2500, seed=3), buf)
    rc, out, err = _run_cli(["train", "-", "--online", "--model", "fm", "--batch-size", "100",
                             "--out", str(tmp_path / "run"), "--json", "--threads", "1"],
                            buf.getvalue(), pieces=7, pause=0.05)
    assert rc == 0, err
    res = _last_json(out)
    assert res["rows"] == 2500 and res["progressive_auc"] > 0.6
    from adrec_fast.models.checkpoint import load_model

    _, schema, _ = load_model(tmp_path / "run")
    assert schema.is_dynamic("ad") and schema.field("price").type == "dense"


def test_cli_stdin_bad_row_names_the_line(tmp_path):
    buf = io.BytesIO()
    pcsv.write_csv(_table(3000, seed=4), buf)
    lines = buf.getvalue().split(b"\n")
    lines[2600] = lines[2600] + b",extra"  # line 2601 of the input (header = line 1)
    rc, _, err = _run_cli(["train", "-", "--online", "--model", "lr", "--out",
                           str(tmp_path / "run"), "--threads", "1"], b"\n".join(lines))
    assert rc == 2
    assert "<stdin>, line 2601: expected 4 columns, found 5" in err
    assert not (tmp_path / "run").exists()


def test_arrival_blocks_hand_on_lines_before_the_input_ends():
    r, w = os.pipe()
    with os.fdopen(r, "rb") as rf, os.fdopen(w, "wb") as wf:
        wf.write(b"a,label\n1,0\n2,")
        wf.flush()
        blocks = arrival_blocks(rf, 100)
        got = []
        t = threading.Thread(target=lambda: got.append(next(blocks)))
        t.start()
        t.join(5)
        assert got == [(1, b"a,label\n1,0\n")]  # while the writer is still open
        wf.write(b"1\n" + b"3,0\n" * 250 + b"4,1")
        wf.close()
        rest = list(blocks)
    assert [first for first, _ in rest] == [3, 103, 203, 254]  # "2,1" is line 3
    assert rest[-1][1] == b"4,1\n"
    assert sum(b.count(b"\n") for _, b in rest) == 252


def test_piped_csv_infers_and_checks_like_a_file():
    buf = io.BytesIO()
    pcsv.write_csv(_table(300), buf)
    schema, reader = piped_csv(io.BytesIO(buf.getvalue()), chunk_rows=64)
    assert [f.type for f in schema.fields] == ["categorical", "categorical", "dense"]
    chunks = list(reader)
    assert sum(c.num_rows for c in chunks) == 300 and max(c.num_rows for c in chunks) <= 64
    bad = buf.getvalue().replace(b"\n", b"\nx,y,notanumber,1\n", 1)  # line 2
    schema2, reader2 = piped_csv(io.BytesIO(bad), schema=schema)
    with pytest.raises(DataError, match=r"<stdin>, line 2, field 'price'"):
        list(reader2)
    with pytest.raises(DataError, match="empty input: no header line"):
        piped_csv(io.BytesIO(b""))


# ------------------------------------------------------------------ the Python API
def _dyn_model(schema, **dyn):
    torch.manual_seed(0)
    return build_model("fm", schema, embedding_dim=4, embedding_l2=0.0,
                       dynamic_tables=dyn or None)


def _schema():
    s = Schema([{"name": "ad", "type": "categorical"}, {"name": "user", "type": "categorical"},
                {"name": "price", "type": "dense"}])
    return online_schema(s)


def test_any_iterator_of_record_batches():
    """A consumer's batches, as a generator: the same run as the table in one piece."""
    schema = _schema()
    table = _table(1000, seed=5)

    def consumer():
        for b in table.to_batches(max_chunksize=77):
            yield b

    runs = []
    for stream in (consumer(), [table]):
        m = _dyn_model(schema)
        runs.append(train_online(m, stream, schema=schema, batch_size=100,
                                 trainer=Trainer(m, progress=False, batch_size=100)))
    assert runs[0].rows == 1000
    np.testing.assert_array_equal(runs[0].probs, runs[1].probs)


def test_bad_chunk_names_the_rows_and_the_field():
    schema = _schema()
    good = _table(100)
    m = _dyn_model(schema)
    with pytest.raises(DataError, match=r"stream chunk 1 \(rows 101-200 of the stream\): input "
                                        r"has no column 'user'.*field 'user'|field 'user'.*"
                                        r"stream chunk 1"):
        train_online(m, [good, good.drop_columns(["user"])], schema=schema, batch_size=50)
    bad = good.set_column(3, "label", pa.array([0] * 99 + [7]))
    with pytest.raises(DataError, match=r"rows 1-100 of the stream\): row 100: label must be"):
        train_online(_dyn_model(schema), [bad], schema=schema, batch_size=50)
    t = _table(10, ts=[f"2024-01-01T00:00:0{i}" for i in range(9)] + ["later"])
    with pytest.raises(DataError, match=r"row 10\): unparsable timestamp.*'later'"):
        train_online(_dyn_model(schema), [t], schema=schema, batch_size=5, time_col="ts")


def test_the_stream_time_is_the_tables_clock():
    """TTL in --time-col units: a value not seen for longer than ttl loses its row; late rows
    are counted and do not turn the clock back."""
    schema = _schema()
    early = _table(200, seed=1, ts=np.arange(200) * 1.0)  # t = 0..199
    late_ads = _table(200, seed=2, ts=1000 + np.arange(200) * 1.0)
    late_ads = late_ads.set_column(0, "ad", pa.array(["fresh"] * 200))
    m = _dyn_model(schema, ttl=300)
    res = train_online(m, [early, late_ads], schema=schema, batch_size=50, time_col="ts")
    assert res.out_of_order == 0
    table = m.lookup.dyn
    old = torch.from_numpy(schema.lookup("ad", pa.array(["a1", "a2"])))
    fresh = torch.from_numpy(schema.lookup("ad", pa.array(["fresh"])))
    assert table.rows(old).tolist() == [0, 0]  # expired at t = 1199: serving reads row 0
    assert table.rows(fresh).item() > 0
    # the same stream on a step clock: 8 steps are within a ttl of 300 steps
    m2 = _dyn_model(schema, ttl=300)
    train_online(m2, [early, late_ads], schema=schema, batch_size=50)
    assert (m2.lookup.dyn.rows(old) > 0).all()
    # rows out of time order are trained as they come and counted
    shuffled = _table(100, seed=3, ts=[5.0, 1.0, 7.0, 6.0] + [10.0] * 96)
    res = train_online(_dyn_model(schema, ttl=5), [shuffled], schema=schema, batch_size=3,
                       time_col="ts")
    assert res.out_of_order == 2 and res.rows == 100


# ------------------------------------------------------------------ freshness, demo --online
def test_freshness_protocol_scores_the_same_rows():
    from adrec_fast.data.metrics import auc
    from adrec_fast.training.loop import predict
    from adrec_fast.training.online import freshness

    kw = dict(period_rows=1500, epochs=1, batch_size=256, model_kw={"hidden": []})
    r = freshness("din", **kw)
    assert r.batch_rows == 5 * 1500 and r.online.rows == 2 * 1500
    assert len(r.online.windows) == len(r.frozen_windows) == 8  # quarter periods
    assert r.trainer.model.dynamic_embeddings() and r.online_model is not r.trainer.model
    # the frozen model is the batch model, untouched by the stream
    p, y = predict(r.trainer.model, r.tail)
    assert r.frozen_auc == auc(y, p)
    np.testing.assert_array_equal(r.online.labels, y)
    assert r.gain_points == pytest.approx(100 * (r.online.progressive_auc - r.frozen_auc))
    again = freshness("din", **kw)  # deterministic
    assert again.online.progressive_auc == r.online.progressive_auc
    assert again.frozen_auc == r.frozen_auc
    static = freshness("din", dynamic=False, **kw)
    assert not static.trainer.model.dynamic_embeddings()


def test_cli_demo_online(tmp_path, capsys):
    from adrec_fast.cli import main
    from adrec_fast.models.checkpoint import load_model

    argv = ["demo", "--online", "--rows", "7000", "--epochs", "1", "--json",
            "--out", str(tmp_path / "m")]
    assert main(argv) == 0
    cap = capsys.readouterr().out
    res = _last_json(cap)
    assert res["stream_rows"] == 2000 and res["batch_rows"] == 5000
    assert res["gain_points"] == pytest.approx(
        100 * (res["progressive_auc"] - res["frozen_auc"]))
    assert "online - frozen" in cap and "online / frozen" in cap
    model, schema, _ = load_model(tmp_path / "m")
    assert schema.has_dynamic and model.dynamic_embeddings()
    assert main(["demo", "--online", "--rows", "500"]) == 2
    assert "--rows must be >= 7,000 with --online" in capsys.readouterr().err


def test_resume_on_dynamic_tables_trains_no_row_twice(tmp_path):
    """A killed run resumes from its checkpoint (keys, rows, counters, clocks included) and
    ends as the uninterrupted run: the same scores, the same table."""
    from adrec_fast.training.online import load_position

    schema = _schema()
    table = _table(1500, seed=8, ts=np.arange(1500) * 2.0)
    kw = dict(schema=schema, batch_size=100, time_col="ts")
    whole_model = _dyn_model(schema, ttl=400, min_count=2)
    whole = train_online(whole_model, [table], **kw)

    class Killed(Exception):
        pass

    def dies_after(rows):
        for s in range(0, 1500, 250):
            if s >= rows:
                raise Killed
            yield table.slice(s, 250)

    with pytest.raises(Killed):
        train_online(_dyn_model(schema, ttl=400, min_count=2), dies_after(1000),
                     checkpoint_dir=tmp_path, checkpoint_every=300, **kw)
    assert load_position(tmp_path) == 900
    model = _dyn_model(schema, ttl=400, min_count=2)  # a fresh process
    res = train_online(model, [table], checkpoint_dir=tmp_path, resume=True, **kw)
    assert res.resumed_from == 900 and res.rows == 1500
    np.testing.assert_array_equal(res.probs, whole.probs)
    for a, b in zip(model.dynamic_embeddings(), whole_model.dynamic_embeddings()):
        for k, v in a.state_tensors().items():
            assert torch.equal(v, b.state_tensors()[k]), k
