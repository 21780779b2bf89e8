# SPDX-License-Identifier: Apache-2.0
"""The adrec-fast command line: train/eval/predict on a small generated CSV, --json output,
malformed inputs (clear error, no checkpoint left), --help, and a tiny demo."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest

import adrec_fast  # noqa: F401
from adrec_fast.cli import main
from adrec_fast.data.synthetic import SyntheticCTR


@pytest.fixture(scope="module")
def csvs(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    gen = SyntheticCTR(n_rows=4000, seed=0, n_sparse=4, n_dense=2, max_cardinality=50,
                       n_users=30, n_items=40)
    gen.write_csv(d / "all.csv", n=4000)
    lines = (d / "all.csv").read_text().splitlines()
    header = lines[0]
    (d / "train.csv").write_text("\n".join(lines[:3001]) + "\n")
    (d / "test.csv").write_text("\n".join([header] + lines[3001:]) + "\n")
    return d, lines


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def _no_leftovers(d, name):
    return not any(p.name.startswith(f".{name}") for p in d.iterdir())


def test_train_eval_predict(csvs, capsys):
    d, _ = csvs
    out = d / "run"
    rc = main(["train", str(d / "train.csv"), "--model", "fm", "--out", str(out), "--epochs", "2",
               "--batch-size", "256", "--no-progress", "--json"])
    assert rc == 0
    res = _last_json(capsys.readouterr().out)
    assert {"auc", "logloss", "calibration", "best_epoch"} <= set(res)
    assert 0.5 < res["auc"] <= 1.0 and res["rows_train"] == 2700 and res["rows_valid"] == 300
    for f in ("best/model.safetensors", "best/checkpoint.json", "last/optimizer.safetensors",
              "metrics.json", "learning_curves.png", "calibration.png"):
        assert (out / f).is_file(), f
    assert _no_leftovers(d, "run")

    assert main(["eval", str(out), str(d / "test.csv"), "--json"]) == 0
    ev = _last_json(capsys.readouterr().out)
    assert ev["rows"] == 1000 and 0.5 < ev["auc"] <= 1.0 and ev["logloss"] > 0

    for name in ("pred.csv", "pred.parquet"):
        assert main(["predict", str(out), str(d / "test.csv"), "--out", str(d / name)]) == 0
    capsys.readouterr()
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    a = pcsv.read_csv(d / "pred.csv")
    b = pq.read_table(d / "pred.parquet")
    assert a.num_rows == b.num_rows == 1000
    assert a.column("prediction").to_pylist() == pytest.approx(b.column("prediction").to_pylist())
    p = b.column("prediction").to_numpy()
    assert ((p > 0) & (p < 1)).all()

    # retraining into the same directory is refused, then replaces it with --overwrite
    again = ["train", str(d / "train.csv"), "--model", "lr", "--out", str(out), "--epochs", "1",
             "--no-progress", "--valid", str(d / "test.csv"), "--json"]
    assert main(again) == 2
    assert f"--out {out} already holds a model; pass --overwrite" in capsys.readouterr().err
    assert json.loads((out / "best" / "checkpoint.json").read_text())["model"]["name"] == "fm"
    assert main(again + ["--overwrite"]) == 0
    assert _last_json(capsys.readouterr().out)["rows_valid"] == 1000
    assert json.loads((out / "best" / "checkpoint.json").read_text())["model"]["name"] == "lr"


def test_train_with_schema_file_and_drop(csvs, capsys, tmp_path):
    d, _ = csvs
    out = tmp_path / "run"
    assert main(["train", str(d / "train.csv"), "--model", "deepfm", "--out", str(out),
                 "--epochs", "1", "--drop", "c3,d1", "--no-progress"]) == 0
    capsys.readouterr()
    schema = json.loads((out / "best" / "schema.json").read_text())
    names = [f["name"] for f in schema["fields"]]
    assert "c3" not in names and "d1" not in names and "user" in names
    out2 = tmp_path / "run2"
    assert main(["train", str(d / "train.csv"), "--model", "dcnv2", "--out", str(out2),
                 "--schema", str(out / "best" / "schema.json"), "--epochs", "1",
                 "--no-progress", "--json"]) == 0
    assert "auc" in _last_json(capsys.readouterr().out)


def _bad_files(d, lines):
    header = lines[0].replace('"', "").split(",")
    di, li = header.index("d0"), header.index("label")
    files = {}
    bad = list(lines)
    bad[5] = bad[5] + ",extra"
    files["columns.csv"] = (bad, "line 6", "expected")
    bad = list(lines)
    r = bad[7].split(",")
    r[li] = "2"
    bad[7] = ",".join(r)
    files["label.csv"] = (bad, "line 8", "label")
    bad = list(lines)
    r = bad[9].split(",")
    r[di] = "abc"
    bad[9] = ",".join(r)
    files["dense.csv"] = (bad, "line 10", "d0")
    out = {}
    for name, (rows, where, what) in files.items():
        (d / name).write_text("\n".join(rows) + "\n")
        out[name] = (where, what)
    blob = gzip.compress(("\n".join(lines) + "\n").encode())
    (d / "trunc.csv.gz").write_bytes(blob[: len(blob) // 2])
    out["trunc.csv.gz"] = ("trunc.csv.gz", "gzip")
    return out


def test_malformed_inputs(csvs, capsys, tmp_path):
    d, lines = csvs
    schema_run = tmp_path / "schema_run"
    assert main(["train", str(d / "train.csv"), "--model", "lr", "--out", str(schema_run),
                 "--epochs", "1", "--no-progress"]) == 0
    schema_file = schema_run / "best" / "schema.json"
    capsys.readouterr()
    for name, (where, what) in _bad_files(tmp_path, lines).items():
        out = tmp_path / f"out_{name}"
        extra = ["--schema", str(schema_file)] if name == "dense.csv" else []
        rc = main(["train", str(tmp_path / name), "--model", "fm", "--out", str(out),
                   "--no-progress"] + extra)
        err = capsys.readouterr().err
        assert rc == 2, name
        assert name in err and where in err and what in err, err
        assert "Traceback" not in err
        assert not out.exists(), f"partial checkpoint left for {name}"
        assert _no_leftovers(tmp_path, f"out_{name}")
    # --skip-bad-rows trains through the bad label row and reports it
    out = tmp_path / "skipped"
    assert main(["train", str(tmp_path / "label.csv"), "--model", "lr", "--out", str(out),
                 "--epochs", "1", "--no-progress", "--skip-bad-rows", "--json"]) == 0
    cap = capsys.readouterr()
    assert "skipped 1 bad rows" in cap.err
    assert _last_json(cap.out)["rows_train"] + _last_json(cap.out)["rows_valid"] == 3999


def test_skip_bad_rows_skips_a_short_row_and_warns_once(csvs, capsys, tmp_path):
    d, lines = csvs
    rows = list(lines)
    rows[1233] = rows[1233].rsplit(",", 1)[0]  # line 1234: one column short
    label = lines[0].replace('"', "").split(",").index("label")
    r = rows[1500].split(",")
    r[label] = "x"
    rows[1500] = ",".join(r)  # line 1501: bad label
    (tmp_path / "bad.csv").write_text("\n".join(rows) + "\n")
    rc = main(["train", str(tmp_path / "bad.csv"), "--model", "lr", "--out", str(tmp_path / "o"),
               "--epochs", "1", "--no-progress", "--skip-bad-rows", "--json"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    res = _last_json(cap.out)
    assert res["rows_train"] + res["rows_valid"] == 3998
    assert cap.err.count("skipped 2 bad rows") == 1, cap.err
    assert "first: line 1234: expected" in cap.err


def test_predict_keep_matches_rows_after_skipped_ones(csvs, capsys, tmp_path):
    import pyarrow.csv as pcsv

    d, lines = csvs
    run = tmp_path / "run"
    assert main(["train", str(d / "train.csv"), "--model", "lr", "--out", str(run), "--epochs",
                 "1", "--no-progress"]) == 0
    body = lines[3001:3101]
    keyed = ["rid," + lines[0]] + [f"r{i:03d},{row}" for i, row in enumerate(body)]
    keyed[6] = keyed[6].rsplit(",", 1)[0]  # row r005 is short: skipped
    (tmp_path / "keyed.csv").write_text("\n".join(keyed) + "\n")
    (tmp_path / "plain.csv").write_text("\n".join([lines[0]] + body) + "\n")
    capsys.readouterr()
    assert main(["predict", str(run), str(tmp_path / "keyed.csv"), "--out",
                 str(tmp_path / "k.csv"), "--keep", "rid", "--skip-bad-rows"]) == 0
    assert main(["predict", str(run), str(tmp_path / "plain.csv"), "--out",
                 str(tmp_path / "p.csv")]) == 0
    k = pcsv.read_csv(tmp_path / "k.csv").to_pydict()
    p = pcsv.read_csv(tmp_path / "p.csv").to_pydict()
    assert list(k) == ["prediction", "rid", "label"]
    assert k["rid"] == [f"r{i:03d}" for i in range(100) if i != 5]
    assert k["prediction"] == pytest.approx([x for i, x in enumerate(p["prediction"]) if i != 5])
    capsys.readouterr()
    assert main(["predict", str(run), str(tmp_path / "keyed.csv"), "--out",
                 str(tmp_path / "n.csv"), "--keep", "rid,nope"]) == 2
    err = capsys.readouterr().err
    assert "keyed.csv, line 1: no column 'nope' to keep (columns: rid," in err, err
    assert not (tmp_path / "n.csv").exists()


def test_train_without_matplotlib_skips_the_plots(csvs, capsys, tmp_path, monkeypatch):
    d, _ = csvs
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "run"
    assert main(["train", str(d / "train.csv"), "--model", "lr", "--out", str(out), "--epochs",
                 "1", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert err.count("matplotlib is not installed: no plots written") == 1, err
    assert (out / "metrics.json").is_file() and not list(out.glob("*.png"))


def test_eval_errors(csvs, capsys, tmp_path):
    d, _ = csvs
    assert main(["eval", str(tmp_path / "nothing"), str(d / "test.csv")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # refused by the argument parser, before any reading
        main(["train", str(tmp_path / "absent.csv"), "--model", "nope", "--out",
              str(tmp_path / "r")])
    assert e.value.code == 2
    assert "argument --model: invalid choice: 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_model_names_are_the_registry_names():
    from adrec_fast.cli import MODEL_NAMES
    from adrec_fast.models import model_names

    assert sorted(MODEL_NAMES) == model_names()


@pytest.mark.parametrize("args", [["--help"], ["train", "x.csv", "--model", "nope", "--out", "o"]])
def test_help_and_argument_errors_do_not_load_torch(args):
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "adrec_fast", *args],
                       check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == (0 if args == ["--help"] else 2), r.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines()
                if line.startswith("import time:")}
    assert "adrec_fast.cli" in imported
    assert not {"torch", "adrec_fast._C", "pyarrow", "numpy"} & imported


def test_help_is_complete(capsys):
    r = subprocess.run([sys.executable, "-m", "adrec_fast", "--help"], check=False,
                       capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "usage: adrec-fast" in r.stdout and "demo" in r.stdout and "predict" in r.stdout
    for cmd in ("demo", "train", "eval", "predict"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert f"usage: adrec-fast {cmd}" in out and "example" in out
        if cmd == "train":
            for opt in ("--model", "--out", "--label", "--schema", "--drop", "--valid",
                        "--epochs", "--batch-size", "--lr", "--embedding-dim", "--skip-bad-rows",
                        "--seed", "--json"):
                assert opt in out, opt
    assert main([]) == 2


def test_demo_tiny(capsys, tmp_path):
    import time

    t0 = time.perf_counter()
    rc = main(["demo", "--rows", "20000", "--epochs", "1", "--no-progress", "--json", "--out",
               str(tmp_path / "demo")])
    elapsed = time.perf_counter() - t0
    assert rc == 0
    res = _last_json(capsys.readouterr().out)
    assert 0 < res["wall_s"] <= elapsed  # the command's own time, not the process's age
    assert (tmp_path / "demo" / "checkpoint.json").is_file()
    # a second demo into the same --out is refused before it generates any data
    t0 = time.perf_counter()
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 2
    assert time.perf_counter() - t0 < 5
    assert "already holds a model; pass --overwrite" in capsys.readouterr().err
    assert {"auc", "logloss", "oracle_auc", "samples_per_s"} <= set(res)
    assert 0.6 < res["auc"] < res["oracle_auc"] + 0.02
    assert res["samples_per_s"] > 0


def test_train_din_reads_the_history_column_as_a_sequence(csvs, capsys):
    """``train --model din`` on a CSV with a '|'-joined history of items infers the history as
    the item field's behaviour sequence, so the saved model attends over it (a pooled bag would
    leave DIN without attention); eval and the Scorer load it. Other models keep the bag."""
    from adrec_fast.models.checkpoint import load_model
    from adrec_fast.serving import Scorer

    d, lines = csvs
    for model, attends in (("din", True), ("deepfm", False)):
        out = d / f"run_hist_{model}"
        assert main(["train", str(d / "train.csv"), "--model", model, "--out", str(out),
                     "--epochs", "1", "--batch-size", "256", "--no-progress", "--json"]) == 0
        assert "behaviour-history" not in capsys.readouterr().err
        m = load_model(out)[0]
        hist = m.schema.field("hist")
        assert (hist.sequence, hist.share_with) == ((True, "item") if attends else (False, None))
        if attends:
            assert m.sequences == ["hist"]
            assert m.schema.table_of("hist") == m.schema.table_of("item")
    # without the history column DIN has nothing to attend over: said on stderr, not silent
    assert main(["train", str(d / "train.csv"), "--model", "din", "--out", str(d / "run_nohist"),
                 "--drop", "hist", "--epochs", "1", "--batch-size", "256", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning: --model din: the schema has no behaviour-history (sequence) field" in err
    assert main(["eval", str(d / "run_hist_din"), str(d / "test.csv"), "--json"]) == 0
    assert 0.5 < _last_json(capsys.readouterr().out)["auc"] <= 1.0
    import pyarrow.csv as pcsv

    row = pcsv.read_csv(d / "test.csv").slice(0, 1).to_pylist()[0]
    sc = Scorer.load(d / "run_hist_din")
    user = {k: row[k] for k in ("user", "hist")}
    cand = {k: v for k, v in row.items() if k not in ("user", "hist", "label")}
    p = sc.score(user, [cand, cand])
    assert p.shape == (2,) and 0 < p[0] < 1 and p[0] == p[1]
