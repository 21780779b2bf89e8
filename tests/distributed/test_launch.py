# SPDX-License-Identifier: Apache-2.0
"""``python -m adrec_fast.distributed.launch``: the torchrun command it builds, and a real
two-rank launch of a probe module (environment, arguments, a failing rank's exit code)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adrec_fast.distributed.launch import rank_threads, torchrun_command

REPO = Path(__file__).resolve().parents[2]


def test_one_machine_is_standalone_and_rendezvous_flags_pass_through():
    cmd = torchrun_command(2, ["train", "x.csv", "--out", "r"])
    assert cmd[1:] == ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                       "-m", "adrec_fast", "train", "x.csv", "--out", "r"]
    cmd = torchrun_command(4, ["train"], nnodes=2, node_rank=1, rdzv_backend="c10d",
                           rdzv_endpoint="host0:29400", rdzv_id="job")
    assert "--standalone" not in cmd
    i = cmd.index("--nnodes")
    assert cmd[i:i + 10] == ["--nnodes", "2", "--node-rank", "1", "--rdzv-backend", "c10d",
                             "--rdzv-endpoint", "host0:29400", "--rdzv-id", "job"]
    assert cmd[-3:] == ["-m", "adrec_fast", "train"]
    assert torchrun_command(1, ["a"], module=None, script="s.py")[-2:] == ["s.py", "a"]
    assert rank_threads(10**6) == 1 and rank_threads(1) == (os.cpu_count() or 1)


@pytest.mark.parametrize("kw, match", [
    ({"nproc": 0}, "--nproc must be >= 1"),
    ({"nproc": 2, "rdzv_timeout": 3}, "unknown torchrun flags"),
    ({"nproc": 2, "module": None}, "exactly one of a module and a script"),
])
def test_bad_launch_arguments_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        torchrun_command(argv=[], **kw)


def _launch(*args):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return subprocess.run([sys.executable, "-m", "adrec_fast.distributed.launch", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_two_ranks_get_torchruns_environment_and_the_arguments(tmp_path):
    done = _launch("--nproc", "2", "--module", "tests.distributed._launch_probe", "--",
                   str(tmp_path), "train", "--out", "x")
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["args"] == ["train", "--out", "x"]
        env = got["env"]
        assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == (str(rank), "2",
                                                                        str(rank))
        assert env["MASTER_ADDR"] and env["MASTER_PORT"]
        assert env["OMP_NUM_THREADS"] == str(rank_threads(2))


def test_a_failing_rank_fails_the_launch_and_nothing_to_run_is_refused(tmp_path):
    done = _launch("--nproc", "2", "--module", "tests.distributed._launch_probe", "--",
                   str(tmp_path), "fail")
    assert done.returncode != 0
    done = _launch("--nproc", "2")
    assert done.returncode == 2 and "nothing to run" in done.stderr
