# SPDX-License-Identifier: Apache-2.0
"""Two gloo ranks on localhost against one process: sharded embeddings + DDP towers train a
small DLRM for 50 synchronous steps of the same global batches from the same seed.

What may differ, and why: each rank sums its own rows' gradients first and the ranks' sums are
then added (the owner's fused update for the tables, DDP's all-reduce for the dense layers),
where one process adds all rows in one pass. The two association orders round differently in
the last bits (measured: losses within 6e-8, tables within 3e-7), well inside the 1e-5 asked
of the loss and fp32's default tolerance for the parameters.

Each launch is two ``python -m tests.distributed._worker`` processes with torchrun's environment
(a free port on 127.0.0.1). Three launches: the training one (a refused mismatched start, then
the runs of ``RUNS``: the probed all_to_all_single path and the forced scatter fallback, one id
per bag and ragged bags over a shared table), a rank killed mid-step, a rank stopped mid-step
(only the timeout can end the wait).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from adrec_fast.data.batch import Batch
from adrec_fast.data.metrics import auc
from adrec_fast.data.schema import Schema
from adrec_fast.data.synthetic import SyntheticCTR
from adrec_fast.distributed import DistContext, local_rows, plan_tables
from adrec_fast.distributed.process_group import init_from_env

from ._worker import train_single

REPO = Path(__file__).resolve().parents[2]
STEPS, GLOBAL_B, EVAL_ROWS = 50, 256, 4096
FAULT_TIMEOUT_S = 3.0
#: a launch that takes longer than this is a hang
LAUNCH_LIMIT_S = 120.0
#: data set : exchange path, one training run each in the same launch
RUNS = ("plain:auto", "plain:scatter", "bags:auto")


def _encode(gen: SyntheticCTR, schema, name: str) -> dict:
    rows = Batch.concat(list(gen.batches(STEPS * GLOBAL_B + EVAL_ROWS, schema=schema)))
    return {"name": name, "schema": schema.to_dict(), "seed": 0,
            "batches": [rows.slice(i * GLOBAL_B, (i + 1) * GLOBAL_B) for i in range(STEPS)],
            "eval": rows.slice(STEPS * GLOBAL_B, STEPS * GLOBAL_B + EVAL_ROWS)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two data sets on disk (every rank reads the same file) and their one-process runs.

    ``plain``: one id per bag in 16 tables (the sharded lookup picks rows). ``bags``: the same
    rows with the behaviour history pooled as a bag of 0-20 ids that shares the item table, so
    the model takes the one-table path of global row ids with ragged (and empty) mean-pooled
    bags.
    """
    gen = SyntheticCTR(n_rows=STEPS * GLOBAL_B + EVAL_ROWS, seed=0)
    plain = gen.schema()
    spec = plain.to_dict()
    for f in spec["fields"]:
        if f["name"] == "hist":
            f["sequence"] = False
    sets = {"plain": _encode(gen, plain, "plain"),
            "bags": _encode(gen, Schema.from_dict(spec), "bags")}
    path = tmp_path_factory.mktemp("dist") / "data.pt"
    torch.save(sets, path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ref = {"path": path}
    try:
        for name, d in sets.items():
            losses, model = train_single(Schema.from_dict(d["schema"]), d["batches"], seed=0)
            ref[name] = {"losses": losses, "state": model.state_dict(),
                         "auc": auc(d["eval"].labels.numpy(),
                                    model.predict(d["eval"]).numpy())}
    finally:
        torch.set_num_threads(threads)
    return ref


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir: Path, data_path: Path, *args: str, peer_wait_s: float = 30.0) -> list[dict]:
    """Start both ranks, wait for rank 0, then up to ``peer_wait_s`` for rank 1, which is
    killed if still there (a fault test stops it on purpose); returns per rank its exit code,
    JSON result (if any) and stderr."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        err = open(workdir / f"stderr{rank}.txt", "w")
        procs.append((subprocess.Popen(
            [sys.executable, "-m", "tests.distributed._worker", "--data", str(data_path),
             "--out", str(workdir / f"rank{rank}.json"), *args],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err), err))
    try:
        procs[0][0].wait(timeout=LAUNCH_LIMIT_S)
        try:
            procs[1][0].wait(timeout=peer_wait_s)
        except subprocess.TimeoutExpired:
            procs[1][0].kill()  # the rank a fault test stopped on purpose
            procs[1][0].wait()
    finally:
        for p, err in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            err.close()
    out = []
    for rank, (p, _) in enumerate(procs):
        res = workdir / f"rank{rank}.json"
        out.append({"rc": p.returncode,
                    "result": json.loads(res.read_text()) if res.exists() else None,
                    "stderr": (workdir / f"stderr{rank}.txt").read_text()})
    return out


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("train")
    ranks = _launch(workdir, data["path"], "--mode", "train", "--runs", ",".join(RUNS))
    for rank, r in enumerate(ranks):
        assert r["rc"] == 0, f"rank {rank} failed:\n{r['stderr'][-3000:]}"
    return workdir, [r["result"] for r in ranks]


@pytest.mark.parametrize("run", RUNS)
def test_two_ranks_match_one_process(data, trained, run):
    workdir, results = trained
    name, path = run.split(":")
    ref = data[name]
    runs = [r["runs"][run] for r in results]
    # the probe finds gloo's all_to_all_single in this torch; "scatter" forces the fallback
    assert [r["exchange"] for r in runs] == ["all_to_all" if path == "auto" else "scatter"] * 2
    want = np.array(ref["losses"])
    for r in runs:
        got = np.array(r["losses"])
        assert got.shape == (STEPS,)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert want[-1] < want[0] - 0.05  # it learned something: the comparison is not vacuous
    state = torch.load(workdir / f"state_{name}_{path}.pt")
    assert set(state) == set(ref["state"])
    for key, value in ref["state"].items():
        torch.testing.assert_close(state[key], value, msg=lambda m, k=key: f"{k}: {m}")
    for r in runs:
        assert abs(r["auc"] - ref["auc"]) <= 1e-5, (r["auc"], ref["auc"])
        assert abs(r["auc_sharded"] - ref["auc"]) <= 1e-5, (r["auc_sharded"], ref["auc"])
        stats = r["exchange_stats"]
        # per step: counts, ids, rows out, gradients back (and the scatter path's size gather)
        assert stats["calls"] == 4 * STEPS
        assert stats["bytes_sent"] > 0
        assert (stats["padding_bytes"] == 0) == (path == "auto")
        assert r["bad_id_error"] is not None and "outside table 15" in r["bad_id_error"]


def test_mismatched_configuration_is_refused_on_every_rank(trained):
    _, results = trained
    for r in results:
        msg = r["mismatch_error"]
        assert msg is not None, "a rank accepted a mismatched configuration"
        assert "seed: rank 0 has 0, rank 1 has 1" in msg
        assert "model: top: rank 0 has [32, 16], rank 1 has [32, 8]" in msg
        assert "schema" not in msg and "embedding_dim" not in msg  # only what differs


@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_lost_rank_ends_the_run_with_a_clear_error(data, tmp_path, fault):
    ranks = _launch(tmp_path, data["path"], "--mode", fault, "--runs", "plain:auto",
                    "--timeout", str(FAULT_TIMEOUT_S), peer_wait_s=0.5)
    r0 = ranks[0]
    assert r0["rc"] == 3, f"rank 0 did not stop with a PeerFailure:\n{r0['stderr'][-3000:]}"
    res = r0["result"]
    assert res["error_type"] == "PeerFailure"
    assert res["error"].startswith("rank 0 of 2: ")
    assert "another rank died or did not answer within the 3 s timeout" in res["error"]
    fault_time = float((tmp_path / "fault_time").read_text())
    waited = res["error_time"] - fault_time
    # a killed peer closes its sockets (noticed at once); a stopped one needs the timeout
    # (rank 0 may have started waiting a little before rank 1 stopped: a loose lower bound)
    assert waited < FAULT_TIMEOUT_S + 3.0, waited
    if fault == "hang":
        assert waited > FAULT_TIMEOUT_S * 0.5, waited
    assert ranks[1]["rc"] == -signal.SIGKILL


# ------------------------------------------------------------- pieces that need no process group
def test_planner_balances_rows_and_lookups_and_is_deterministic():
    rows = [1000, 1000, 10, 10, 10, 10]
    plan = plan_tables(rows, 2, embedding_dim=4)
    assert plan == plan_tables(rows, 2, embedding_dim=4)
    assert plan.owner[0] != plan.owner[1]  # the two big tables go to different ranks
    est = plan.estimate()
    assert sorted(t for e in est for t in e["tables"]) == list(range(6))
    assert sum(e["rows"] for e in est) == sum(rows)
    assert est[0]["bytes"] == est[0]["rows"] * 5 * 4
    assert all(abs(e["cost"] - 1.0) < 0.05 for e in est), est
    # the lookups count as much as the rows: a hot small table balances a cold big one
    hot = plan_tables([1000, 10, 10], 2, embedding_dim=4, access=[1, 1000, 1])
    assert hot.owner[0] != hot.owner[1]
    assert "rank 1:" in hot.report()
    three = plan_tables([5], 3, embedding_dim=4, row_wise="never")  # some ranks own none
    assert three.tables_of(0) == [0] and three.tables_of(1) == three.tables_of(2) == []


@pytest.mark.parametrize("bad, match", [
    ({"num_embeddings": [], "world": 2}, "no tables"),
    ({"num_embeddings": [3, 0], "world": 2}, "every table needs >= 1 row"),
    ({"num_embeddings": [3], "world": 0}, "world must be >= 1"),
    ({"num_embeddings": [3, 4], "world": 2, "access": [1.0]}, "1 entries for 2 tables"),
    ({"num_embeddings": [3], "world": 2, "access": [-1.0]}, "must be >= 0"),
])
def test_planner_names_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        plan_tables(embedding_dim=4, **bad)


def test_local_rows_split_the_global_batch_in_rank_order():
    def ctx(rank, world):
        return DistContext(rank=rank, world=world, local_rank=rank, backend="gloo",
                           device=torch.device("cpu"), timeout_s=1.0, group=None,
                           emb_group=None)

    assert [local_rows(6, ctx(r, 3)) for r in range(3)] == [slice(0, 2), slice(2, 4),
                                                            slice(4, 6)]
    with pytest.raises(ValueError, match="global batch of 7 rows does not split evenly"):
        local_rows(7, ctx(0, 2))


@pytest.mark.parametrize("env, match", [
    ({}, "MASTER_ADDR is not set"),
    ({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "RANK is not set"),
    ({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", "RANK": "x", "WORLD_SIZE": "2"},
     "RANK='x' is not an integer"),
    ({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", "RANK": "2", "WORLD_SIZE": "2"},
     r"RANK=2 is outside \[0, WORLD_SIZE=2\)"),
])
def test_init_from_env_names_the_missing_or_bad_variable(monkeypatch, env, match):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(RuntimeError, match=match):
        init_from_env(device="cpu")
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        init_from_env(device="cpu", timeout_s=0)


# ------------------------------------------------------- the sharded lookup itself, on one rank
@pytest.fixture(scope="module")
def one_rank():
    """A one-rank gloo group in this process: the whole lookup path (keys, de-duplication,
    exchange with itself, owner lookup, pooling, backward) without a second process."""
    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(_free_port()))
    try:
        ctx = init_from_env(device="cpu", timeout_s=30)
        yield ctx
        ctx.destroy()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _ragged(rows, B, seed, max_len):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 1, (len(rows) * B,), generator=g)
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.long)
    torch.cumsum(lengths, 0, out=offsets[1:])
    table = torch.arange(len(rows)).repeat_interleave(B).repeat_interleave(lengths)
    indices = (torch.rand(int(offsets[-1]), generator=g) * torch.tensor(rows)[table]).long()
    return indices, offsets


@pytest.mark.parametrize("opt", ["rowwise_adagrad", "sgd"])
@pytest.mark.parametrize("pooling", ["sum", "mean"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("max_len, B", [(1, 5), (3, 4), (3, 1), (1, 0)])
def test_sharded_lookup_matches_the_plain_collection(one_rank, opt, pooling, weighted,
                                                     max_len, B):
    """Forward, then the fused update of one backward, against ``EmbeddingBagCollection``:
    one id per bag (rows picked) and ragged bags with repeats and empty bags, per-sample
    weights, B = 1 and an empty batch."""
    from adrec_fast.distributed import Exchange, ShardedEmbeddingBagCollection
    from adrec_fast.models.base import fused_optimizer
    from adrec_fast.nn import EmbeddingBagCollection

    rows, D = [7, 3, 11], 5
    torch.manual_seed(3)
    plain = EmbeddingBagCollection(rows, D, pooling=pooling, optimizer=fused_optimizer(opt, 0.1))
    plain.state.uniform_(0.0, 1.0)
    ref = EmbeddingBagCollection(rows, D, pooling=pooling, optimizer=fused_optimizer(opt, 0.1))
    ref.load_state_dict(plain.state_dict())
    sharded = ShardedEmbeddingBagCollection(plain, one_rank, exchange=Exchange(one_rank))
    indices, offsets = _ragged(rows, B, seed=max_len * 10 + B, max_len=max_len)
    if max_len == 1:  # every bag exactly one id
        indices, offsets = (torch.arange(len(rows) * B) % 3), torch.arange(len(rows) * B + 1)
    psw = torch.rand(indices.numel()) if weighted else None
    want = ref(indices, offsets, psw)
    got = sharded(indices, offsets, psw)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(want)
    want.backward(g)
    got.backward(g)
    weight, state = sharded.gather()
    torch.testing.assert_close(weight, ref.weight)
    torch.testing.assert_close(state, ref.state)


def test_sharded_lookup_over_the_one_table_layout_and_bad_input(one_rank):
    """``lookup`` with global row ids over the whole buffer (the shared-table path of the
    models), and the errors a bad call gets (before any exchange)."""
    from adrec_fast.distributed import ShardedEmbeddingBagCollection
    from adrec_fast.nn import EmbeddingBagCollection
    from adrec_fast.optim import FusedSGD

    rows, D = [4, 6], 3
    plain = EmbeddingBagCollection(rows, D, optimizer=FusedSGD(0.1))
    want_w = plain.weight.clone()
    sharded = ShardedEmbeddingBagCollection(plain, one_rank)
    one = torch.tensor([0, 10])
    idx, ofs = torch.tensor([9, 0, 9, 4]), torch.tensor([0, 2, 2, 4])
    torch.testing.assert_close(sharded.lookup(one, idx, ofs),
                               torch.stack([want_w[9] + want_w[0], torch.zeros(D),
                                            want_w[9] + want_w[4]]))
    with pytest.raises(IndexError, match="index 4 at position 1 is outside table 0"):
        sharded(torch.tensor([0, 4, 0, 0]), torch.arange(5))
    with pytest.raises(IndexError, match="index -1 at position 0"):
        sharded(torch.tensor([-1, 0]), torch.arange(3))
    with pytest.raises(ValueError, match="expected T\\*B\\+1 with T=2"):
        sharded(torch.tensor([0, 0]), torch.arange(3)[:2])
    with pytest.raises(ValueError, match="offsets must run from 0 to nnz=2"):
        sharded(torch.tensor([0, 0]), torch.tensor([0, 1, 3]))
    with pytest.raises(RuntimeError, match="tables are sharded over 1 ranks; gather them"):
        sharded.weight
    with pytest.raises(ValueError, match="need a fused optimizer"):
        ShardedEmbeddingBagCollection(EmbeddingBagCollection(rows, D), one_rank)
    with pytest.raises(ValueError, match="the plan is for 2 ranks"):
        ShardedEmbeddingBagCollection(plain, one_rank, plan=plan_tables(rows, 2, D))
