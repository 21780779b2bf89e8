# SPDX-License-Identifier: Apache-2.0
"""Delta export during online training: the rows each delta holds (exactly those trained since
the previous one, with the model's values), the dense part every K-th delta, the manifest and
its checksum, atomic files, and no effect on training."""

import hashlib
import json
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from adrec_fast.models.checkpoint import read_meta
from adrec_fast.models.registry import build_model
from adrec_fast.training.export import DeltaExporter, dense_state
from adrec_fast.training.loop import Trainer
from adrec_fast.training.online import train_online
from tests.streams import drifting

N = 1200
EVERY = 300  # not a multiple of the batch: a delta is written after the step that reaches it
BS = 128


@pytest.fixture(scope="module")
def data():
    return drifting(seed=7, period_rows=600, n=N)


def _model(schema, name="deepfm", **kw):
    torch.manual_seed(0)
    kw = {"hidden": (16,), "batch_norm": True} if name == "deepfm" and not kw else kw
    return build_model(name, schema, embedding_dim=8, **kw)


def _run(schema, table, model, directory=None, **ex_kw):
    ex = None if directory is None else DeltaExporter(model, directory, every_rows=EVERY,
                                                      **ex_kw)
    res = train_online(model, [table], schema=schema, batch_size=BS, exporter=ex,
                       trainer=Trainer(model, progress=False, lr=3e-3))
    return res, ex


def _manifests(directory):
    return [json.loads(p.read_text()) for p in sorted((directory / "deltas").glob("*.json"))]


@pytest.mark.parametrize("name,kw", [("deepfm", {}), ("fm", {"embedding_l2": 1e-3})])
def test_export_does_not_change_training(data, tmp_path, name, kw):
    schema, table = data
    plain = _model(schema, name, **kw)
    r0, _ = _run(schema, table, plain)
    model = _model(schema, name, **kw)
    r1, ex = _run(schema, table, model, tmp_path)
    assert ex.seq == 4
    np.testing.assert_array_equal(r0.probs, r1.probs)
    for (k, a), b in zip(plain.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k


def test_delta_rows_values_and_dense(data, tmp_path):
    """Each delta holds exactly the rows the batches since the previous delta looked up (bags
    and histories, mapped to rows as the schema lays the tables out), with the model's values
    at the export; every row that changed is among them; the dense part is the model's."""
    schema, table = data
    model = _model(schema, "din")
    snaps = {}

    def on_export(man):
        snaps[man["seq"]] = {k: v.clone() for k, v in model.state_dict().items()}

    res, ex = _run(schema, table, model, tmp_path, on_export=on_export)
    mans = _manifests(tmp_path)
    assert [m["seq"] for m in mans] == [1, 2, 3, 4]
    # positions: the first step boundary at or after each multiple of EVERY, then the end
    assert [m["position"] for m in mans] == [384, 768, 1152, 1200]
    base = read_meta(tmp_path / "base")["delta_base"]
    assert base["position"] == 0 and {m["base"] for m in mans} == {base["id"]}
    tofs = schema.table_offsets()
    prev = {k: v for k, v in _model(schema, "din").state_dict().items()}
    start = 0
    for m in mans:
        data_file = tmp_path / "deltas" / m["file"]
        blob = data_file.read_bytes()
        assert len(blob) == m["bytes"] and hashlib.sha256(blob).hexdigest() == m["sha256"]
        t = load_file(str(data_file))
        snap = snaps[m["seq"]]
        # the reference: every id of the rows [start, position), table by table
        enc = schema.encode(table.slice(start, m["position"] - start))
        B, ids = enc.batch_size, set()
        for i, (_, tab) in enumerate(schema.sparse_fields()):
            lo, hi = int(enc.offsets[i * B]), int(enc.offsets[(i + 1) * B])
            ids |= set((enc.indices[lo:hi] + int(tofs[tab])).tolist())
        for name, tab in schema.sequence_fields():
            ids |= set((enc.seq_indices[name] + int(tofs[tab])).tolist())
        for key in ("lookup.ebc.weight",):
            rows = t[f"rows/{key}"]
            assert sorted(rows.tolist()) == sorted(ids)
            assert torch.equal(t[f"values/{key}"], snap[key][rows])
            changed = (snap[key] != prev[key]).any(dim=1).nonzero().view(-1)
            assert set(changed.tolist()) <= set(rows.tolist())
            assert m["tables"][key] == {"rows": rows.numel(), "full": False}
        dense = {k[len("dense/"):]: v for k, v in t.items() if k.startswith("dense/")}
        assert set(dense) == set(dense_state(model)) and dense
        assert not any(k.endswith(("ebc.weight", "ebc.state")) for k in dense)
        for k, v in dense.items():
            assert torch.equal(v, snap[k]), k
        prev, start = snap, m["position"]


def test_dense_every_k(data, tmp_path):
    schema, table = data
    _, ex = _run(schema, table, _model(schema), tmp_path, dense_every=3)
    mans = _manifests(tmp_path)
    assert [m["dense"] for m in mans] == [False, False, True, True]  # 3rd, and the last
    for m in mans:
        keys = load_file(str(tmp_path / "deltas" / m["file"])).keys()
        assert any(k.startswith("dense/") for k in keys) == m["dense"]
    assert [s["seq"] for s in ex.stats] == [1, 2, 3, 4]


def test_last_delta_carries_dense(data, tmp_path):
    """The stream ends on a delta without the dense part: one more, dense, follows."""
    schema, table = data
    model = _model(schema)
    ex = DeltaExporter(model, tmp_path, every_rows=BS, dense_every=100)
    train_online(model, [table.slice(0, 3 * BS)], schema=schema, batch_size=BS, exporter=ex,
                 trainer=Trainer(model, progress=False))
    mans = _manifests(tmp_path)
    assert [m["dense"] for m in mans] == [False, False, False, True]
    assert mans[-1]["tables"]["lookup.ebc.weight"]["rows"] == 0 and mans[-1]["position"] == 384


def test_lazy_l2_tables_go_whole(data, tmp_path):
    """Lazy L2 decays every row at every step: such a table's deltas hold all its rows, at
    their decayed values (the stored rows times the pending scale)."""
    schema, table = data
    model = _model(schema, "fm", embedding_l2=1e-3)
    got = {}

    def on_export(man):
        ebc = model.lookup.ebc
        assert ebc.l2_scale != 1.0  # a pending scale, not folded by the export
        got[man["seq"]] = (ebc.weight * ebc.l2_scale).clone()

    _run(schema, table, model, tmp_path, on_export=on_export)
    for m in _manifests(tmp_path):
        t = load_file(str(tmp_path / "deltas" / m["file"]))
        rows = t["rows/lookup.ebc.weight"]
        assert torch.equal(rows, torch.arange(model.lookup.ebc.weight.shape[0]))
        assert m["tables"]["lookup.ebc.weight"]["full"] is True
        assert torch.equal(t["values/lookup.ebc.weight"], got[m["seq"]])


@pytest.fixture(scope="module")
def exported(data, tmp_path_factory):
    """One online run of DeepFM with a delta every EVERY rows (read-only for the tests)."""
    schema, table = data
    d = tmp_path_factory.mktemp("exported")
    model = _model(schema)
    _run(schema, table, model, d)
    return model, d


def test_restart_writes_new_base_and_clears_deltas(exported, tmp_path):
    import shutil

    model, d = exported
    d = shutil.copytree(d, tmp_path / "x")
    first = read_meta(d / "base")["delta_base"]["id"]
    ex = DeltaExporter(model, d, every_rows=EVERY)
    ex.start(N)
    assert read_meta(d / "base")["delta_base"] == {"id": ex.base_id, "position": N}
    assert ex.base_id != first
    assert list((d / "deltas").iterdir()) == []
    assert ex.start(N) == d / "base" and ex.base_id == read_meta(
        d / "base")["delta_base"]["id"]  # started, nothing written: the same base


def test_no_temporary_files_left(exported):
    _, d = exported
    names = sorted(p.name for p in (d / "deltas").iterdir())
    assert names == [f"delta-{i:06d}.{ext}" for i in range(1, 5) for ext in ("json",
                                                                            "safetensors")]
    assert sorted(p.name for p in d.iterdir()) == ["base", "deltas"]


def test_bad_arguments(data, tmp_path):
    schema, _ = data
    model = _model(schema)
    for kw, match in (({"every_rows": 0}, "every_rows"), ({"every_rows": 1.5}, "every_rows"),
                      ({"every_rows": 10, "dense_every": 0}, "dense_every"),
                      ({"every_rows": 10, "rebase_every": 0}, "rebase_every"),
                      ({"every_rows": 10, "rebase_every": True}, "rebase_every")):
        with pytest.raises(ValueError, match=match):
            DeltaExporter(model, tmp_path, **kw)
    with pytest.raises(RuntimeError, match="before start"):
        DeltaExporter(model, tmp_path, every_rows=10).observe(None, 10)


def test_cli_export_every(data, tmp_path, capsys):
    """``train --online --export-every``: DIR/base and the deltas, which bring a Scorer on the
    base to the saved model exactly; bad values are refused by name."""
    import pyarrow.csv as pcsv

    from adrec_fast.cli import main
    from adrec_fast.serving import Scorer

    _, table = data
    pcsv.write_csv(table.drop_columns(["hist"]), tmp_path / "s.csv")
    out, export = tmp_path / "run", tmp_path / "deltas"
    args = ["train", str(tmp_path / "s.csv"), "--online", "--model", "fm", "--out", str(out),
            "--batch-size", "128", "--no-progress", "--json"]
    assert main(args + ["--export-every", "400", "--export-dir", str(export)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["export"] == {"dir": str(export), "deltas": 3,  # at rows 512, 1024, 1200 (end)
                             "rebases": 0}
    with pytest.warns(UserWarning, match="dynamic tables"):  # --online: dynamic by default
        sc, want = Scorer.load(export / "base"), Scorer.load(out / "best")
    with sc.follow(export, poll_s=0.005) as f:
        t0 = time.monotonic()
        while f.applied < 3 and time.monotonic() - t0 < 10:
            time.sleep(0.005)
    assert f.applied == 3 and f.errors == []
    user = {"user": table["user"][0].as_py()}
    cands = table.drop_columns(["user", "hist", "label"]).slice(0, 20).to_pylist()
    np.testing.assert_array_equal(sc.score(user, cands), want.score(user, cands))
    for extra, match in ((["--export-every", "0"], "--export-every must be >= 1"),
                         (["--export-every", "9", "--export-dense-every", "0"],
                          "--export-dense-every must be >= 1"),
                         (["--export-every", "9", "--export-rebase-every", "0"],
                          "--export-rebase-every must be >= 1"),
                         (["--export-rebase-every", "2"], "applies to the deltas of")):
        assert main(args + ["--overwrite"] + extra) == 2
        assert match in capsys.readouterr().err
    no_online = [a for a in args if a != "--online"]
    assert main(no_online + ["--overwrite", "--export-every", "9"]) == 2
    assert "add --online" in capsys.readouterr().err
    # an export directory that cannot be made (under a file) is named with its flag, before
    # any training, and no model is left behind
    (tmp_path / "a_file").write_text("x")
    bad = tmp_path / "a_file" / "deltas"
    out2 = tmp_path / "run2"
    args2 = [out2 if a == str(out) else a for a in args]
    assert main([str(a) for a in args2] + ["--export-every", "9", "--export-dir", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"--export-dir {bad}: cannot create it" in err and "Traceback" not in err
    assert not out2.exists()


def test_dynamic_table_deltas(tmp_path):
    """A dynamic table's delta: the keys read since the previous delta that hold a row at the
    export, their rows and last-seen times, the keys evicted since (exactly those the map
    evicted), row 0; exporting leaves training as it is."""
    import pyarrow as pa

    from adrec_fast.data.schema import Schema

    schema = Schema([{"name": "user", "type": "categorical", "vocab": "dynamic"},
                     {"name": "item", "type": "categorical", "vocab": "dynamic"},
                     {"name": "price", "type": "dense"}])
    rng = np.random.default_rng(0)
    n = 900
    table = pa.table({"user": [f"u{int(u)}" for u in rng.integers(0, 20, n)],
                      "item": [f"i{r // 10 + int(j)}" for r, j in
                               enumerate(rng.integers(0, 30, n))],
                      "price": rng.normal(size=n), "label": rng.integers(0, 2, n)})
    opts = {"capacity": 40, "eviction": "lfu", "evict_fraction": 0.25, "ttl": 6}

    def build():
        torch.manual_seed(0)
        return build_model("fm", schema, embedding_dim=4, dynamic_tables=opts)

    plain = build()
    r0 = train_online(plain, [table], schema=schema, batch_size=100,
                      trainer=Trainer(plain, progress=False))
    model = build()
    dyn = model.lookup.dyn
    got, seen, evicted = {}, [], []
    real_take = dyn.take_evicted

    def spy():  # what the map reports, as the exporter reads it
        out = real_take()
        evicted.append(out.clone())
        return out

    dyn.take_evicted = spy

    def on_export(man):
        keys = torch.cat(seen).unique()
        rows = dyn.rows(keys)
        st = dyn._map.state()
        got[man["seq"]] = (keys[rows > 0], dyn.weight[rows[rows > 0]].clone(),
                           torch.from_numpy(st["row_last_seen"])[rows[rows > 0]],
                           evicted[-1], dyn.weight[0].clone(), int(dyn._map.clock))
        seen.clear()

    ex = DeltaExporter(model, tmp_path, every_rows=300, on_export=on_export)
    real_observe = ex.observe

    def observe(batch, position):
        seen.append(batch.indices)  # every bag is dynamic here: the ids are the keys
        return real_observe(batch, position)

    ex.observe = observe
    r1 = train_online(model, [table], schema=schema, batch_size=100, exporter=ex,
                      trainer=Trainer(model, progress=False))
    np.testing.assert_array_equal(r0.probs, r1.probs)
    for (k, a), b in zip(plain.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    mans = _manifests(tmp_path)
    assert len(mans) == 3 and sum(m["tombstones"]["lookup.dyn.weight"] for m in mans) > 0
    for m in mans:
        t = load_file(str(tmp_path / "deltas" / m["file"]))
        keys, vals, last, tomb, row0, clock = got[m["seq"]]
        key = "lookup.dyn.weight"
        order = torch.argsort(t[f"keys/{key}"])
        assert torch.equal(t[f"keys/{key}"][order], keys)  # unique() sorts
        assert torch.equal(t[f"values/{key}"][order], vals)
        assert torch.equal(t[f"last_seen/{key}"][order], last)
        assert torch.equal(t[f"tombstones/{key}"], tomb)
        assert torch.equal(t[f"unadmitted/{key}"][0], row0)
        assert m["clock"][key] == clock and m["tables"][key] == {"keys": keys.numel(),
                                                                 "dynamic": True}


def test_resumed_run_exports_from_its_position(data, tmp_path):
    """A resumed run writes its base at the resumed stream position, and its deltas bring a
    Scorer on that base to the model at the end (bit for bit)."""
    from adrec_fast.serving import Scorer
    from adrec_fast.serving.deltas import pending

    schema, table = data
    model = _model(schema)
    train_online(model, [table.slice(0, 640)], schema=schema, batch_size=BS,
                 checkpoint_dir=tmp_path / "ck", checkpoint_every=BS,
                 trainer=Trainer(model, progress=False, lr=3e-3))
    model = _model(schema)
    ex = DeltaExporter(model, tmp_path / "export", every_rows=EVERY)
    train_online(model, [table], schema=schema, batch_size=BS, checkpoint_dir=tmp_path / "ck",
                 resume=True, exporter=ex, trainer=Trainer(model, progress=False, lr=3e-3))
    assert read_meta(tmp_path / "export" / "base")["delta_base"]["position"] == 640
    assert [m["position"] for m in _manifests(tmp_path / "export")] == [1024, N]
    sc = Scorer.load(tmp_path / "export" / "base")
    for _, path in pending(tmp_path / "export", 0):
        sc.apply_delta(path)
    from adrec_fast.models.checkpoint import save_checkpoint

    want = Scorer.load(save_checkpoint(tmp_path / "end", model, rng=False))
    user = {"user": table["user"][0].as_py(), "hist": table["hist"][0].as_py()}
    cands = table.drop_columns(["user", "hist", "label"]).slice(0, 9).to_pylist()
    np.testing.assert_array_equal(sc.score(user, cands), want.score(user, cands))
