# SPDX-License-Identifier: Apache-2.0
"""Sharded checkpoints: two gloo ranks train a small DLRM, save (each rank its tables), and the
checkpoint is loaded back onto two ranks with every table moved to the other rank, onto one
rank of a process group, and into one process by ``load_model`` with no extra step.

The reference is one process training the same global batches from the same seed without any
save or load. The two-rank runs differ from it only in the order gradients are summed (see
``test_two_ranks``; within 1e-5 on the loss), and a reload with the dense optimizer's state must
reproduce the run that never stopped, while a reload without it must not (so the comparison
can fail). Damaged copies (a shard missing, truncated or altered, the manifest gone or
inconsistent) are refused with an error naming the file.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from adrec_fast.data.batch import Batch
from adrec_fast.data.schema import Schema
from adrec_fast.data.synthetic import SyntheticCTR
from adrec_fast.distributed import init_from_env, load_optimizer, load_sharded
from adrec_fast.models.checkpoint import load_model, read_meta, save_checkpoint

from ._worker import LR, build, step
from .test_two_ranks import _free_port, one_rank  # noqa: F401 - one_rank is a fixture

REPO = Path(__file__).resolve().parents[2]
BEFORE, AFTER, GLOBAL_B, EVAL_ROWS = 8, 4, 256, 2048
LAUNCH_LIMIT_S = 180.0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Global batches on disk and the one-process reference: probabilities and tables after
    ``BEFORE`` steps, losses of the ``AFTER`` steps that follow."""
    n = (BEFORE + AFTER) * GLOBAL_B + EVAL_ROWS
    gen = SyntheticCTR(n_rows=n, seed=1)
    spec = gen.schema().to_dict()  # without the behaviour history, which DLRM does not read
    spec["fields"] = [f for f in spec["fields"] if f["name"] != "hist"]
    schema = Schema.from_dict(spec)
    rows = Batch.concat(list(gen.batches(n, schema=schema)))
    steps = BEFORE + AFTER
    d = {"name": "plain", "schema": schema.to_dict(), "seed": 0,
         "batches": [rows.slice(i * GLOBAL_B, (i + 1) * GLOBAL_B) for i in range(steps)],
         "eval": rows.slice(steps * GLOBAL_B, n)}
    path = tmp_path_factory.mktemp("ckpt_data") / "data.pt"
    torch.save({"plain": d}, path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build(schema, 0)
        model.train()
        opt = torch.optim.Adam(model.dense_parameters(), lr=LR)
        for b in d["batches"][:BEFORE]:
            step(model, model, b, opt)
        probs = model.predict(d["eval"])
        state = {k: v.clone() for k, v in model.state_dict().items()}
        model.train()
        after = [float(step(model, model, b, opt)) for b in d["batches"][BEFORE:]]
    finally:
        torch.set_num_threads(threads)
    return {"path": path, "data": d, "schema": schema, "probs": probs, "state": state,
            "losses_after": after}


@pytest.fixture(scope="module")
def saved(data, tmp_path_factory):
    """Launch the two ranks (``_ckpt_worker``); returns (checkpoint dir, per-rank results)."""
    work = tmp_path_factory.mktemp("ckpt_run")
    ck = work / "run"
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        err = open(work / f"stderr{rank}.txt", "w")
        procs.append((subprocess.Popen(
            [sys.executable, "-m", "tests.distributed._ckpt_worker", "--data", str(data["path"]),
             "--out", str(work / f"rank{rank}.json"), "--ckpt", str(ck),
             "--before", str(BEFORE), "--after", str(AFTER)],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err), err))
    try:
        for p, _ in procs:
            p.wait(timeout=LAUNCH_LIMIT_S)
    finally:
        for p, err in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            err.close()
    results = []
    for rank, (p, _) in enumerate(procs):
        assert p.returncode == 0, (f"rank {rank} failed:\n"
                                   f"{(work / f'stderr{rank}.txt').read_text()[-3000:]}")
        results.append(json.loads((work / f"rank{rank}.json").read_text()))
    return ck, results


def test_two_rank_save_reloads_onto_two_ranks_with_another_placement(data, saved):
    ck, results = saved
    for r in results:
        # the checkpoint holds what one process holds after the same steps
        np.testing.assert_allclose(r["probs_saved"], data["probs"].numpy(), rtol=0, atol=1e-5)
        assert r["plan_loaded"] == [1 - o for o in r["saved_plan"]]
        assert 0 in r["saved_plan"] and 1 in r["saved_plan"]  # both ranks wrote tables
        # the reload under the other placement scores exactly as the saved model did
        np.testing.assert_array_equal(r["probs_loaded"], r["probs_saved"])
        # with the optimizer state: the run that never stopped; without it: another run
        np.testing.assert_allclose(r["losses_loaded"], r["losses_no_reload"], rtol=0,
                                   atol=1e-6)
        np.testing.assert_allclose(r["losses_loaded"], data["losses_after"], rtol=0, atol=1e-5)
        gap = np.abs(np.array(r["losses_fresh_optimizer"]) - r["losses_no_reload"]).max()
        assert gap > 1e-4, gap
        assert r["global_step"] == BEFORE
    files = json.loads((ck / "manifest.json").read_text())["files"]
    assert {"shard-0-of-2.safetensors", "shard-1-of-2.safetensors", "model.safetensors",
            "optimizer.safetensors", "checkpoint.json", "schema.json"} == set(files)
    plan = read_meta(ck)["distributed"]["plans"]["lookup.ebc"]
    assert plan["owner"] == results[0]["saved_plan"] and plan["bounds"] is None


def test_failed_save_on_one_rank_fails_everywhere_and_keeps_the_old_checkpoint(data, saved):
    ck, results = saved
    for r in results:
        msg = r["failed_save_error"]
        assert msg is not None and "was not written" in msg and "rank 1:" in msg, msg
    assert not [p.name for p in ck.parent.iterdir() if p.name.startswith(".run")]
    model, _, _ = load_model(ck)  # still the first save, whole
    np.testing.assert_array_equal(model.predict(data["data"]["eval"]).numpy(),
                                  results[0]["probs_saved"])


def _continue(model, data, opt) -> list[float]:
    model.train()
    return [float(step(model, model, b, opt)) for b in data["data"]["batches"][BEFORE:]]


def test_load_model_reads_the_sharded_run_in_one_process(data, saved):
    ck, results = saved
    model, schema, config = load_model(ck)
    assert config["name"] == "dlrm" and not model.training
    np.testing.assert_array_equal(model.predict(data["data"]["eval"]).numpy(),
                                  results[0]["probs_saved"])
    state = model.state_dict()
    assert set(state) == set(data["state"])
    for key, want in data["state"].items():  # tables and their Adagrad state included
        torch.testing.assert_close(state[key], want, msg=lambda m, k=key: f"{k}: {m}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        opt = torch.optim.Adam(model.dense_parameters(), lr=LR)
        load_optimizer(opt, ck)
        losses = _continue(model, data, opt)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_allclose(losses, results[0]["losses_no_reload"], rtol=0, atol=1e-5)
    # serving builds on load_model: the run directory loads as it is
    from adrec_fast.serving import Scorer

    assert Scorer.load(ck).version[1] == str(ck)


def test_load_sharded_onto_one_rank_and_from_a_single_process_checkpoint(data, saved, one_rank,
                                                                         tmp_path):
    from adrec_fast.distributed import wrap_ddp

    ck, results = saved
    model, _, _ = load_sharded(ck, one_rank)
    assert model.lookup.ebc.plan.owner == (0,) * model.lookup.ebc.num_tables
    np.testing.assert_array_equal(model.predict(data["data"]["eval"]).numpy(),
                                  results[0]["probs_saved"])
    ddp = wrap_ddp(model, one_rank)
    opt = torch.optim.Adam(ddp.parameters(), lr=LR)
    load_optimizer(opt, ck)
    losses = _continue(model, data, opt)
    np.testing.assert_allclose(losses, results[0]["losses_no_reload"], rtol=0, atol=1e-5)
    # a plain single-process checkpoint shards the same way
    plain, _, _ = load_model(ck)
    save_checkpoint(tmp_path / "plain", plain)
    again, _, _ = load_sharded(tmp_path / "plain", one_rank)
    np.testing.assert_array_equal(again.predict(data["data"]["eval"]).numpy(),
                                  results[0]["probs_saved"])


def _damage(ck: Path, tmp: Path, how: str) -> Path:
    bad = tmp / "bad"
    shutil.copytree(ck, bad)
    shard = bad / "shard-1-of-2.safetensors"
    if how == "missing shard":
        shard.unlink()
    elif how == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif how == "altered shard":
        raw = bytearray(shard.read_bytes())
        raw[-5] ^= 0xFF  # a bit flip in the table data: the file still parses
        shard.write_bytes(bytes(raw))
    elif how == "missing manifest":
        (bad / "manifest.json").unlink()
    elif how == "rows not covered":
        man = json.loads((bad / "manifest.json").read_text())
        man["tensors"]["lookup.ebc.weight"]["blocks"].pop()
        (bad / "manifest.json").write_text(json.dumps(man))
    return bad


@pytest.mark.parametrize("how, match", [
    ("missing shard", "shard-1-of-2.safetensors is missing"),
    ("truncated shard", "shard-1-of-2.safetensors: .* bytes, the manifest says .* \\(truncated"),
    ("altered shard", "shard-1-of-2.safetensors: contents differ .* \\(corrupt file\\)"),
    ("missing manifest", "without its manifest manifest.json"),
    ("rows not covered", "the row blocks of lookup.ebc.weight"),
])
def test_damaged_checkpoint_is_refused_by_name(saved, tmp_path, how, match):
    ck, _ = saved
    bad = _damage(ck, tmp_path, how)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_model(bad)


def test_two_collections_sgd_and_lazy_l2_round_trip_on_one_rank(data, one_rank, tmp_path):
    """DeepFM (``lookup.ebc`` and the width-1 ``linear.ebc``), fused SGD (no optimizer state
    rows) and lazy embedding L2 (a pending scale folded in at save): a sharded save equals the
    same training in one process, through ``load_model`` and ``load_sharded``."""
    from adrec_fast.distributed import save_sharded, shard_model, wrap_ddp
    from adrec_fast.models.registry import build_model

    kw = {"embedding_dim": 4, "hidden": (8,), "embedding_optimizer": "sgd",
          "embedding_l2": 0.5}
    batches = data["data"]["batches"][:3]

    def trained(sharded: bool):
        torch.manual_seed(5)
        model = build_model("deepfm", data["schema"], **kw)
        model.train()
        fwd = model
        if sharded:
            assert set(shard_model(model, one_rank)) == {"lookup.ebc", "linear.ebc"}
            fwd = wrap_ddp(model, one_rank)
        opt = torch.optim.Adam(list(fwd.parameters()), lr=LR)
        for b in batches:
            step(model, fwd, b, opt)
        return model, fwd, opt

    ref, _, _ = trained(False)
    model, ddp, opt = trained(True)
    assert model.lookup.ebc.local.l2_scale != 1.0  # a decay is pending when the save starts
    save_sharded(tmp_path / "run", ddp, one_rank, optimizer=opt)
    man = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert set(man["tensors"]) == {"lookup.ebc.weight", "linear.ebc.weight"}  # SGD: no state
    loaded, _, _ = load_model(tmp_path / "run")
    want = ref.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], msg=lambda m, k=key: f"{k}: {m}")
    again, _, _ = load_sharded(tmp_path / "run", one_rank)
    ev = data["data"]["eval"]
    torch.testing.assert_close(again.predict(ev), ref.predict(ev))
