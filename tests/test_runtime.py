# SPDX-License-Identifier: Apache-2.0
"""The CPU runtime: one ISA switch (ADREC_CPU_ISA, common/cpu_isa.h) for every kernel, and the
thresholds it reports. ADREC_CPU_ISA is read once per process, so the levels run in children."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from adrec_fast import _C

LEVELS = ["base", "avx2", "avx512"]

# Runs every CPU kernel that has ISA-specific code on fixed inputs and saves the results.
_KERNELS_CHILD = r"""
import sys, torch
import adrec_fast
from adrec_fast import _C
torch.manual_seed(0)
torch.set_num_threads(2)
ops = torch.ops.adrec
out = {"isa": _C.runtime_info()["cpu_isa"]}
for D in (16, 64, 17):  # the float32 row kernels (16, 64) and the generic path (17)
    rows = [50, 7, 300, 1000]
    T, B = len(rows), 300
    tofs = torch.tensor([0] + torch.tensor(rows).cumsum(0).tolist())
    lengths = torch.randint(0, 4, (T * B,))
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    t_of = torch.arange(T).repeat_interleave(B).repeat_interleave(lengths)
    idx = (torch.rand(int(offsets[-1])) * torch.tensor(rows)[t_of]).long()
    w = torch.randn(sum(rows), D)
    psw = torch.rand(idx.numel())
    ones = torch.arange(T * B + 1)
    idx1 = torch.cat([torch.randint(0, r, (B,)) for r in rows])
    g = torch.randn(B, T * D)
    out[f"eb{D}"] = ops.embedding_bag(w, tofs, idx, offsets, psw, 0)
    out[f"eb_mean{D}"] = ops.embedding_bag(w, tofs, idx, offsets, None, 1)
    out[f"eb_ones{D}"] = ops.embedding_bag(w, tofs, idx1, ones, None, 0)
    out[f"ebb{D}"] = ops.embedding_bag_bwd(g, w, tofs, idx, offsets, psw, 0)
    for opt in (0, 1):
        w2, st = w.clone(), torch.zeros(w.size(0))
        ops.embedding_bag_bwd_update(g, w2, st if opt else torch.zeros(0), tofs, idx, offsets,
                                     None, 0, opt, 0.1, 1e-8)
        out[f"ebu{opt}_{D}"] = (w2, st)
for dt in (torch.float32, torch.float64):
    emb = torch.randn(33, 27, 17, dtype=dt)
    out[f"fm{dt}"] = ops.fm_interaction(emb)
    out[f"fm_bwd{dt}"] = ops.fm_interaction_bwd(torch.randn(33, 1, dtype=dt), emb)
    p = ops.dot_interaction(emb, False)
    out[f"dot{dt}"] = p
    out[f"dot_bwd{dt}"] = ops.dot_interaction_bwd(torch.randn_like(p), emb, False)
    q, keys = torch.randn(9, 17, dtype=dt), torch.randn(40, 17, dtype=dt)
    offs = torch.tensor([0, 0, 3, 10, 11, 20, 25, 30, 39, 40])
    o, probs = ops.attention_pooling(q, keys, offs)
    out[f"attn{dt}"] = (o, probs)
    out[f"attn_bwd{dt}"] = ops.attention_pooling_bwd(torch.randn_like(o), q, keys, offs, probs)
    z = torch.randn(70001, dtype=dt) * 5  # several chunks and a vector tail
    y = torch.randint(0, 2, (70001,)).to(dt)
    out[f"bce{dt}"] = ops.sigmoid_bce(z, y, None)
    out[f"bce_w{dt}"] = ops.sigmoid_bce(z, y, torch.rand(70001, dtype=dt))
    x = torch.randn(100, 37, dtype=dt)
    out[f"score{dt}"] = ops.score(x, torch.randn(37, dtype=dt), torch.tensor(0.3, dtype=dt))
    x0, xl = torch.randn(70, 37, dtype=dt), torch.randn(70, 37, dtype=dt)
    cw, cb = torch.randn(37, 37, dtype=dt), torch.randn(37, dtype=dt)
    co, cxw = ops.cross_layer(x0, xl, cw, cb)
    out[f"cross{dt}"] = co
    out[f"cross_bwd{dt}"] = ops.cross_layer_bwd(torch.randn_like(co), x0, xl, cw, cxw)
for M in (1, 5, 31):  # the small-batch kernel of adrec::linear
    x, w, b = torch.randn(M, 45), torch.randn(40, 45), torch.randn(40)
    out[f"lin{M}"] = ops.linear(x, w, b, "relu")
torch.save(out, sys.argv[1])
"""


def _child(code: str, *args: str, isa: str | None = None,
           threads: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("ADREC_CPU_ISA", None)
    env.pop("ADREC_THREADS", None)
    if isa is not None:
        env["ADREC_CPU_ISA"] = isa
    if threads is not None:
        env["ADREC_THREADS"] = threads
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=600, env=env)


def _run_kernels(tmp_path, isa, threads=None):
    path = tmp_path / f"{isa}-{threads}.pt"
    res = _child(_KERNELS_CHILD, str(path), isa=isa, threads=threads)
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(path)


def test_runtime_info_reports_the_resolved_isa():
    info = _C.runtime_info()
    assert info["cpu_isa_supported"] in LEVELS
    assert info["cpu_isa"] in LEVELS
    assert LEVELS.index(info["cpu_isa"]) <= LEVELS.index(info["cpu_isa_supported"])
    if info["avx512_bf16"]:
        assert info["cpu_isa"] == "avx512"
    assert info["l3_bytes"] >= 0
    assert info["stream_out_bytes"] > 0 and info["direct_min_bytes"] > 0
    assert info["threads"] == ("pool" if os.environ.get("ADREC_THREADS") == "pool" else "openmp")


@pytest.mark.parametrize("level", LEVELS)
def test_isa_level_is_clamped_to_the_cpu(level):
    supported = _C.runtime_info()["cpu_isa_supported"]
    res = _child("from adrec_fast import _C; print(_C.runtime_info()['cpu_isa'])", isa=level)
    assert res.returncode == 0, res.stderr[-3000:]
    expect = LEVELS[min(LEVELS.index(level), LEVELS.index(supported))]
    assert res.stdout.split()[-1] == expect


def test_native_and_unset_mean_the_best_level():
    supported = _C.runtime_info()["cpu_isa_supported"]
    for isa in ("native", None):
        res = _child("from adrec_fast import _C; print(_C.runtime_info()['cpu_isa'])", isa=isa)
        assert res.returncode == 0, res.stderr[-3000:]
        assert res.stdout.split()[-1] == supported


def test_unknown_isa_fails_the_import_with_its_name():
    res = _child("import adrec_fast", isa="avx3")
    assert res.returncode != 0
    assert "ADREC_CPU_ISA='avx3'" in res.stderr and "base, avx2, avx512" in res.stderr


def test_every_isa_level_gives_the_default_results(tmp_path):
    """Every kernel with per-ISA code, run at each level the CPU supports, against the default
    level: equal to float rounding (the levels differ in FMA contraction and vector width)."""
    supported = _C.runtime_info()["cpu_isa_supported"]
    default = _run_kernels(tmp_path, None)
    assert default["isa"] == supported
    for level in LEVELS[: LEVELS.index(supported)]:
        got = _run_kernels(tmp_path, level)
        assert got.pop("isa") == level
        assert got.keys() == {k for k in default if k != "isa"}
        for key, value in got.items():
            torch.testing.assert_close(value, default[key], msg=lambda m, k=key: f"{k}: {m}")


def test_set_tuning_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown setting 'prefetch_bytes'"):
        _C._set_tuning(prefetch_bytes=1)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n,grain", [(0, 1), (1, 1), (7, 1), (1000, 1), (1000, 300), (100_003, 64)])
def test_parallel_for_visits_every_index_once(threads, n, grain):
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(3):  # back to back: the workers are still polling, or asleep
            assert _C._pool_for(n, grain) == [1] * n
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("threads", [1, 2])
def test_an_exception_in_a_task_reaches_the_caller(threads):
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for bad in (0, 5, 39):
            with pytest.raises(RuntimeError, match=f"task {bad} failed"):
                _C._pool_throw(40, bad)
        assert _C._pool_for(100, 1) == [1] * 100  # the pool still works
    finally:
        torch.set_num_threads(prev)



def test_unknown_thread_runtime_fails_the_import_with_its_name():
    res = _child("import adrec_fast", threads="tbb")
    assert res.returncode != 0
    assert "ADREC_THREADS='tbb'" in res.stderr and "openmp or pool" in res.stderr


def test_both_thread_runtimes_give_the_same_results(tmp_path):
    """ADREC_THREADS=pool and the default (torch's OpenMP team) split the same items; every
    kernel's result is the same to the bit."""
    default = _run_kernels(tmp_path, "native")
    pool = _run_kernels(tmp_path, "native", threads="pool")
    assert default.keys() == pool.keys()
    for k in default:
        if k != "isa":
            a, b = default[k], pool[k]
            a, b = (a, b) if isinstance(a, (tuple, list)) else ((a,), (b,))
            assert all(torch.equal(x, y) for x, y in zip(a, b)), k


def test_the_pool_runtime_visits_every_index_once_and_reports_errors():
    code = (
        "import torch, adrec_fast\n"
        "from adrec_fast import _C\n"
        "assert _C.runtime_info()['threads'] == 'pool'\n"
        "torch.set_num_threads(2)\n"
        "for n, grain in ((1, 1), (7, 1), (1000, 1), (100003, 64)):\n"
        "    assert _C._pool_for(n, grain) == [1] * n\n"
        "for bad in (0, 5, 39):\n"
        "    try:\n"
        "        _C._pool_throw(40, bad)\n"
        "        raise SystemExit('no error')\n"
        "    except RuntimeError as e:\n"
        "        assert f'task {bad} failed' in str(e), e\n"
        "print('ok')\n")
    res = _child(code, threads="pool")
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
