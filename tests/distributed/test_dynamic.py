# SPDX-License-Identifier: Apache-2.0
"""Dynamic tables sharded by key over two gloo ranks against one process: the same global
batches from the same seed give the same losses (within 1e-5 over 30 steps), the same admitted
keys with the same rows, the same scores; the sharded checkpoint loads into one process
(``load_model``, the Scorer) with those scores; a capacity below the number of ranks is
refused naming the table.

Two runs in one launch: ``din`` (every table dynamic, admission after 2 sightings, a TTL, the
behaviour history looked up element by element; the probed all_to_all_single path) and
``mixed`` (two hashed static tables beside dynamic ones, the history pooled as a ragged bag
over the shared item table; DeepFM, whose first-order lookup is a second dynamic table; the
forced scatter fallback). The same launch saves a model with a text field (its encoder's cache
must travel with the sharded checkpoint), trains a full table that evicts (``lfu``: per shard),
and tries a capacity below the number of ranks. Through the command line: ``train --online
--nproc 2`` against one process, and options refused before any rank starts.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from adrec_fast.data.schema import Schema
from adrec_fast.models.checkpoint import load_model
from adrec_fast.training.online import online_schema

from ..streams import drifting
from ._dynamic_worker import DYNAMIC, train_single
from .test_two_ranks import _free_port

REPO = Path(__file__).resolve().parents[2]
STEPS, GLOBAL_B, EVAL_ROWS = 30, 64, 256
LAUNCH_LIMIT_S = 150.0
RUNS = ("din:auto", "mixed:scatter")


def _sets():
    schema, table = drifting(seed=3, period_rows=400, n=STEPS * GLOBAL_B + EVAL_ROWS)
    din = online_schema(schema, keep_vocabularies=False)
    spec = din.to_dict()
    for f in spec["fields"]:
        if f["name"] in ("user", "c2"):  # static: hashed into 97 rows
            f.update(vocab="hash", hash_size=97)
        if f["name"] == "hist":
            f["sequence"] = False
    mixed = Schema.from_dict(spec)
    out = {}
    for name, model, s in (("din", "din", din), ("mixed", "deepfm", mixed)):
        rows = s.encode(table)
        out[name] = {"name": name, "model": model, "schema": s.to_dict(), "seed": 0,
                     "batches": [rows.slice(i * GLOBAL_B, (i + 1) * GLOBAL_B)
                                 for i in range(STEPS)],
                     "eval": rows.slice(STEPS * GLOBAL_B, STEPS * GLOBAL_B + EVAL_ROWS)}
    return out


def _live_keys(state: dict, prefix: str) -> dict[int, torch.Tensor]:
    """key -> row of every key of a saved dynamic table that holds a row and has not expired."""
    keys, counts = state[f"{prefix}.row_keys"], state[f"{prefix}.row_counts"]
    last, clock = state[f"{prefix}.row_last_seen"], int(state[f"{prefix}.scalars"][1])
    weight = state[f"{prefix}.weight"]
    return {int(keys[r]): weight[r] for r in range(1, keys.numel())
            if counts[r] > 0 and clock - int(last[r]) <= DYNAMIC["ttl"]}


TITLES = ["red shoe", "blue hat", "garden hose 2021", "tomato sauce", "new guitar", None]


def _text_set(work: Path) -> dict | None:
    """Raw rows with a text field (a tiny random encoder written to ``work``) beside a dynamic
    table: 3 steps of 8 rows, then 8 rows to score; None without transformers."""
    try:
        from ..data._tiny_encoder import tiny_encoder
        enc = tiny_encoder(work / "tiny_encoder", hidden=8, seed=2)
    except ImportError:
        return None
    g = np.random.default_rng(0)
    n = 32
    raw = {"user": [f"u{i}" for i in g.integers(0, 6, n)],
           "title": [TITLES[i] for i in g.integers(0, len(TITLES), n)],
           "d": g.normal(size=n).tolist(), "label": g.integers(0, 2, n).tolist()}
    schema = Schema([{"name": "user", "type": "categorical", "vocab": "dynamic"},
                     {"name": "title", "type": "text", "encoder": str(enc)},
                     {"name": "d", "type": "dense", "transform": "standardize"}])
    schema.fit(raw)
    return {"schema": schema.to_dict(), "raw": raw, "steps": 3, "batch": 8}


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    sets = _sets()
    work = tmp_path_factory.mktemp("dyn")
    text = _text_set(work)
    if text is not None:
        sets["text"] = text
    path = work / "data.pt"
    torch.save(sets, path)
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        err = open(work / f"stderr{rank}.txt", "w")
        procs.append((subprocess.Popen(
            [sys.executable, "-m", "tests.distributed._dynamic_worker", "--data", str(path),
             "--out", str(work / f"rank{rank}.json"), "--runs", ",".join(RUNS)],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err), err))
    # the one-process references run while the ranks start
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ref = {}
    try:
        for name, d in sets.items():
            if name == "text":
                continue
            losses, model = train_single(d)
            ref[name] = {"losses": losses, "state": model.state_dict(),
                         "scores": model.predict(d["eval"])}
    finally:
        torch.set_num_threads(threads)
    try:
        for p, _ in procs:
            p.wait(timeout=LAUNCH_LIMIT_S)
    finally:
        for p, err in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            err.close()
    for rank, (p, _) in enumerate(procs):
        assert p.returncode == 0, (f"rank {rank} failed:\n"
                                   f"{(work / f'stderr{rank}.txt').read_text()[-3000:]}")
    results = [json.loads((work / f"rank{r}.json").read_text()) for r in range(2)]
    return work, sets, ref, results


@pytest.mark.parametrize("run", RUNS)
def test_two_ranks_match_one_process(launched, run):
    work, sets, ref, results = launched
    name, path = run.split(":")
    runs = [r["runs"][run] for r in results]
    assert [r["exchange"] for r in runs] == ["all_to_all" if path == "auto" else "scatter"] * 2
    want = np.array(ref[name]["losses"])
    for r in runs:
        np.testing.assert_allclose(np.array(r["losses"]), want, rtol=0, atol=1e-5)
    assert want[-5:].mean() < want[:5].mean() - 0.02  # it learned: the comparison is not vacuous
    # each rank holds a part of the keys, and together all of them
    state = torch.load(work / f"state_{name}.pt")
    for prefix in [k[:-len(".row_keys")] for k in ref[name]["state"] if k.endswith("row_keys")]:
        one, two = _live_keys(ref[name]["state"], prefix), _live_keys(state, prefix)
        assert len(one) > 50
        assert set(two) == set(one), prefix
        for k, row in one.items():
            torch.testing.assert_close(two[k], row, msg=lambda m, k=k: f"{prefix} key {k}: {m}")
        held = [r["local_keys"][prefix] for r in runs]
        assert all(0 < h < sum(held) for h in held), held
    for key, value in ref[name]["state"].items():
        if ".dyn." not in key:
            torch.testing.assert_close(state[key], value, msg=lambda m, k=key: f"{k}: {m}")
    scores = ref[name]["scores"]
    for r in runs:
        torch.testing.assert_close(torch.tensor(r["scores_sharded"]), scores)
        # save_sharded, then load_sharded onto the two ranks again
        torch.testing.assert_close(torch.tensor(r["scores_reloaded"]), scores)


@pytest.mark.parametrize("run", RUNS)
def test_sharded_checkpoint_loads_in_one_process(launched, run):
    from adrec_fast.serving import Scorer

    work, sets, ref, _ = launched
    name = run.split(":")[0]
    ck = work / f"ckpt_{name}"
    model, schema, _ = load_model(ck)
    torch.testing.assert_close(model.predict(sets[name]["eval"]), ref[name]["scores"])
    with pytest.warns(UserWarning, match="dynamic tables: requests run the model's torch"):
        scorer = Scorer.load(ck)
    assert scorer.version[1] == str(ck)


def test_sharded_checkpoint_carries_the_text_cache(launched):
    """save_sharded writes the text encoder's cache (and lists it in the manifest) as one
    process's checkpoint does; load_model reads it back and scores as the sharded model."""
    work, sets, _, results = launched
    if "text" not in sets:
        pytest.skip("the text fields need transformers")
    ck = work / "ckpt_text"
    files = json.loads((ck / "manifest.json").read_text())["files"]
    assert {"text_cache.0.safetensors", "text_cache.0.json"} <= set(files)
    model, schema, _ = load_model(ck)
    d = sets["text"]
    n = d["steps"] * d["batch"]
    rows = schema.encode({k: v[n:] for k, v in d["raw"].items()})
    torch.testing.assert_close(model.predict(rows), torch.tensor(results[0]["text"]["scores"]))


def test_full_table_evicts_within_each_shard(launched):
    """eviction="lfu" at capacity 16 on 2 ranks: each shard keeps at most 8 keys in 9 rows
    (it never grows), and training goes on."""
    for r in launched[3]:
        lfu = r["lfu"]
        assert np.isfinite(lfu["losses"]).all()
        assert 0 < lfu["keys"] <= 8 and lfu["rows"] == 9, lfu


def test_capacity_below_the_ranks_is_refused_naming_the_table(launched):
    for r in launched[3]:
        msg = r["capacity_error"]
        assert msg is not None and "dynamic table 'lookup.dyn'" in msg, msg
        assert "capacity 1 is smaller than the 2 ranks" in msg


def test_cli_online_nproc_2_matches_one_process(tmp_path):
    """``train --online --nproc 2`` through the CLI on a schema that mixes hashed static tables
    with dynamic ones, against the same command in one process; the 2-rank run evaluates in
    one process as the one-process run does."""
    from adrec_fast import cli
    from adrec_fast.data.pipeline import infer_schema, iter_batches

    from .test_cli_train import _cli, _last_json, _write_csv

    _write_csv(tmp_path / "train.csv", 3000, seed=1)
    _write_csv(tmp_path / "test.csv", 1000, seed=2)
    spec = infer_schema(tmp_path / "train.csv", label="label").to_dict()
    for f in spec["fields"]:
        if f["name"] in ("c0", "c1"):
            f.update(vocab="hash", hash_size=101)
    (tmp_path / "schema.json").write_text(json.dumps(spec))
    args = ["train", tmp_path / "train.csv", "--online", "--schema", tmp_path / "schema.json",
            "--model", "fm", "--batch-size", "128", "--min-count", "2", "--json"]
    two = _last_json(_cli(*args, "--out", tmp_path / "two", "--nproc", 2))
    one = _last_json(_cli(*args, "--out", tmp_path / "one", "--threads", 1))
    assert two["rows"] == one["rows"] == 3000
    assert abs(two["progressive_auc"] - one["progressive_auc"]) < 1e-5, (two, one)
    assert abs(two["progressive_logloss"] - one["progressive_logloss"]) < 1e-5, (two, one)
    doc = json.loads((tmp_path / "two" / "best" / "checkpoint.json").read_text())
    assert doc["distributed"]["dynamic"] == ["linear.dyn", "lookup.dyn"]
    assert doc["distributed"]["plans"]  # the hashed tables, sharded by the planner
    scores = {}
    for run in ("one", "two"):
        model, schema, _ = load_model(tmp_path / run)
        scores[run] = torch.cat([model.predict(b) for b in
                                 iter_batches(tmp_path / "test.csv", schema, 4096)])
    torch.testing.assert_close(scores["two"], scores["one"], rtol=0, atol=1e-5)
    assert cli.main(["eval", str(tmp_path / "two"), str(tmp_path / "test.csv")]) == 0


@pytest.mark.parametrize("flags,message", [
    (["--capacity", "1"], "--capacity 1: each dynamic table is sharded by key over the 2 ranks"),
    (["--epochs", "2"], "--epochs does not apply to --online"),
])
def test_cli_online_nproc_bad_options_are_refused_before_launch(tmp_path, capsys, flags,
                                                                message):
    from adrec_fast import cli

    rc = cli.main(["train", str(tmp_path / "missing.csv"), "--online", "--nproc", "2", "--out",
                   str(tmp_path / "out"), *flags])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
