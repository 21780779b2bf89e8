# SPDX-License-Identifier: Apache-2.0
"""adrec_fast.serving.Scorer: every zoo model on the executor, equivalence with the model's own
forward and with the spec reference (fp32, bf16), quantization bounds, bad requests, threads, the
GIL, hot swap."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import adrec_fast  # noqa: F401
from adrec_fast import _C
from adrec_fast.data.schema import Schema
from adrec_fast.models.registry import build_model
from adrec_fast.serving import Scorer, dequantize_rows, quantize_rows
from adrec_fast.models.checkpoint import save_checkpoint

from .spec_reference import serve as spec_serve

USER = ["user", "age", "hour"]  # user/context fields of the synthetic schema
CAND = ["item", "adcat", "price"]
MODELS = {
    "dlrm": ("dlrm", {}),
    "dlrm_self": ("dlrm", {"self_interaction": True, "bottom": (8, 4)}),
    "dcnv2": ("dcnv2", {}),
    "dcnv2_stacked": ("dcnv2", {"structure": "stacked", "batch_norm": True}),
    "dcnv2_linear": ("dcnv2", {"linear": True}),
    "deepfm": ("deepfm", {}),
    "fm": ("fm", {}),
    "lr": ("lr", {}),
}
ZOO = ["dlrm", "dcnv2", "deepfm", "fm", "lr"]  # one of each zoo model on the plain schema


def _raw(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "user": [f"u{i}" for i in rng.integers(0, 50, n)],
        "age": rng.integers(0, 8, n).tolist(),
        "hour": rng.integers(0, 24, n).astype(float).tolist(),
        "item": [f"i{i}" for i in rng.integers(0, 300, n)],
        "adcat": rng.integers(0, 20, n).tolist(),
        "price": (rng.random(n) * 100).tolist(),
        "label": rng.integers(0, 2, n).tolist(),
    }


@pytest.fixture(scope="module")
def schema():
    fields = [{"name": "user", "type": "categorical"}, {"name": "age", "type": "categorical"},
              {"name": "hour", "type": "dense", "transform": "standardize"},
              {"name": "item", "type": "categorical"}, {"name": "adcat", "type": "categorical"},
              {"name": "price", "type": "dense", "transform": "log1p_standardize", "fill": 1.0}]
    return Schema(fields).fit(_raw(3000, 0))


def _model(schema, key, seed=0):
    name, kw = MODELS[key]
    torch.manual_seed(seed)
    m = build_model(name, schema, embedding_dim=8, init_std=0.5, **kw)
    if kw.get("batch_norm"):  # non-trivial running statistics, so the folding is exercised
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm1d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.data.uniform_(0.5, 1.5)
                mod.bias.data.uniform_(-0.2, 0.2)
    for ebc in m.embedding_collections():  # first-order tables start at zero: make them count
        if ebc.embedding_dim == 1:
            ebc.weight.normal_(0, 0.3)
    return m.eval()


@pytest.fixture(scope="module")
def ckpts(schema, tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    out = {}
    for key in MODELS:
        m = _model(schema, key)
        out[key] = (save_checkpoint(root / key, m, rng=False), m)
    return out


def _request(rng, n, cand_fields):
    """A random request: unseen values, missing values and numbers given as ints included."""
    raw = _raw(n, int(rng.integers(1 << 30)))
    raw["item"][0] = "never-seen"
    if n > 2:
        raw["adcat"][1] = None
        raw["price"][2] = None
    user = {k: raw[k][0] for k in raw if k not in cand_fields and k != "label"}
    if "age" in user:
        user["age"] = int(user["age"])
    cands = {k: raw[k] for k in cand_fields}
    return user, cands


def _expected(model, schema, user, cands):
    n = len(next(iter(cands.values())))
    rows = [{**user, **{k: v[i] for k, v in cands.items()}} for i in range(n)]
    return model.predict(schema.encode_rows(rows)).numpy()


@pytest.mark.parametrize("key", list(MODELS))
def test_equivalence_random(schema, ckpts, key):
    path, model = ckpts[key]
    sc = Scorer.load(path)
    assert sc.native  # every zoo model runs on the executor, none on the torch path
    rng = np.random.default_rng(1)
    splits = [CAND, ["item"], ["item", "adcat", "price", "age"], ["item", "hour"], USER + CAND]
    for cand_fields in splits:
        for n in (1, 3, 37, 200):
            user, cands = _request(rng, n, cand_fields)
            got = sc.score(user, cands)
            assert got.dtype == np.float32 and got.shape == (n,)
            want = _expected(model, schema, user, cands)
            assert np.abs(got - want).max() <= 1e-5, (cand_fields, n)
            rows = [{k: v[i] for k, v in cands.items()} for i in range(n)]
            np.testing.assert_array_equal(sc.score(user, rows), got)


def test_score_ids_and_top_k(schema, ckpts):
    sc = Scorer.load(ckpts["dlrm"][0])
    user, cands = _request(np.random.default_rng(2), 50, CAND)
    p = sc.score(user, cands)
    b = schema.encode_rows([{**user, **{k: v[i] for k, v in cands.items()}} for i in range(50)])
    ids = b.indices.view(4, 50)  # bags: user, age, item, adcat
    dense = b.dense.numpy()  # [50, 2]
    got = sc.score_ids({"user": int(ids[0, 0]), "age": int(ids[1, 0])},
                       {"item": ids[2].numpy(), "adcat": ids[3].numpy()}, dense)
    assert np.abs(got - p).max() <= 1e-6
    idx, top = sc.top_k(user, cands, 5)
    assert idx.tolist() == np.argsort(-p, kind="stable")[:5].tolist()
    np.testing.assert_array_equal(top, p[idx])
    idx, _ = sc.top_k(user, cands, 500)
    assert sorted(idx.tolist()) == list(range(50))


def test_frappe_rows(shared_data, tmp_path):
    """Real rows: every zoo model but DIN trained briefly on 4000 Frappe rows; every test row is
    scored as one request (user/context fields once, item and cost per candidate) and as one
    user against 200 real candidates."""
    path = shared_data / "frappe" / "valid.csv.gz"
    if not path.is_file():
        pytest.skip(f"Frappe data not found at {path}")
    import pyarrow as pa
    import pyarrow.csv as pcsv

    from adrec_fast.training.loop import fit

    table = pcsv.read_csv(path).slice(0, 5000)
    fields = [{"name": c, "type": "categorical"} for c in table.column_names if c != "label"]
    train = table.slice(0, 4000)
    sch = Schema(fields, label="label").fit(train)
    cols = {c: table.column(c).to_pylist() for c in table.column_names if c != "label"}
    cand_fields = ["item", "cost"]
    for name in ("dlrm", "dcnv2", "deepfm", "fm", "lr"):
        torch.manual_seed(0)
        kw = ({"top": (32,)} if name == "dlrm" else {"hidden": (32,)}
              if name in ("dcnv2", "deepfm") else {})
        model = build_model(name, sch, embedding_dim=8, **kw)
        fit(model, sch.encode(train), epochs=1, batch_size=256, progress=False)
        model.eval()
        sc = Scorer.load(save_checkpoint(tmp_path / name, model, rng=False))
        assert sc.native
        test = {k: v[4000:] for k, v in cols.items()}
        want = model.predict(sch.encode(pa.table(test))).numpy()
        got = np.array([sc.score({k: test[k][i] for k in test if k not in cand_fields},
                                 {k: [test[k][i]] for k in cand_fields})[0] for i in range(300)])
        assert np.abs(got - want[:300]).max() <= 1e-5
        user = {k: test[k][0] for k in test if k not in cand_fields}
        cands = {k: test[k][:200] for k in cand_fields}
        assert np.abs(sc.score(user, cands) - _expected(model, sch, user, cands)).max() <= 1e-5


def test_quantize_rows_bounds():
    w = torch.randn(300, 17) * torch.rand(300, 1) * 3
    w[5] = 0.25  # a constant row
    q, sb = quantize_rows(w, "int8")
    assert q.dtype == torch.uint8 and sb.shape == (300, 2)
    err = (dequantize_rows(q, sb) - w).abs()
    assert (err <= sb[:, :1] / 2 + 1e-6).all()
    assert err[5].max() == 0
    h, none = quantize_rows(w, "fp16")
    assert none is None and h.dtype == torch.float16
    assert ((h.float() - w).abs() <= w.abs() * 2.0**-11 + 1e-7).all()
    with pytest.raises(ValueError, match="quantize"):
        quantize_rows(w, "int4")


@pytest.mark.parametrize("mode", ["fp16", "int8"])
@pytest.mark.parametrize("key", ["dlrm", "dcnv2", "deepfm", "fm"])
def test_quantized_scorer(schema, ckpts, key, mode):
    """The quantized scorer equals the model with the dequantized tables (the kernel
    dequantizes on lookup) and stays near fp32."""
    path, model = ckpts[key]
    sc = Scorer.load(path, quantize=mode)
    deq = _model(schema, key)
    for ebc in deq.embedding_collections():
        if ebc.embedding_dim > 1:  # first-order weights stay float32
            ebc.weight.copy_(dequantize_rows(*quantize_rows(ebc.weight, mode)))
    rng = np.random.default_rng(3)
    user, cands = _request(rng, 64, CAND)
    got = sc.score(user, cands)
    assert np.abs(got - _expected(deq, schema, user, cands)).max() <= 1e-5
    fp32 = _expected(model, schema, user, cands)
    assert np.abs(got - fp32).max() <= (1e-3 if mode == "fp16" else 1e-2)
    w = sc._version.weights
    assert w.dtype == (torch.float16 if mode == "fp16" else torch.uint8)


@pytest.mark.parametrize("key", ["dlrm", "deepfm"])
def test_bad_requests(ckpts, key):
    sc = Scorer.load(ckpts[key][0])
    user = {"user": "u1", "age": 3, "hour": 4.0}
    cands = {"item": ["i1", "i2"], "adcat": [1, 2], "price": [1.0, 2.0]}
    sc.score(user, cands)
    with pytest.raises(ValueError, match="'colour'"):
        sc.score({**user, "colour": "red"}, cands)
    with pytest.raises(ValueError, match="'colour'"):
        sc.score(user, {**cands, "colour": ["a", "b"]})
    with pytest.raises(ValueError, match="empty"):
        sc.score(user, [])
    with pytest.raises(ValueError, match="empty"):
        sc.score(user, {"item": []})
    with pytest.raises(ValueError, match="empty"):
        sc.score(user, {})
    with pytest.raises(ValueError, match="NaN"):
        sc.score({**user, "hour": float("nan")}, cands)
    with pytest.raises(ValueError, match="NaN"):
        sc.score(user, {**cands, "price": [1.0, float("nan")]})
    with pytest.raises(ValueError, match="NaN"):
        sc.score(user, {**cands, "price": np.array([1.0, np.nan])})
    with pytest.raises(TypeError, match="'user'"):
        sc.score({**user, "user": {"a": 1}}, cands)
    with pytest.raises(TypeError, match="'item'"):
        sc.score(user, {**cands, "item": ["i1", ["x"]]})
    with pytest.raises(TypeError, match="'hour'"):
        sc.score({**user, "hour": [1.0]}, cands)
    with pytest.raises(TypeError, match="'price'"):
        sc.score(user, {**cands, "price": ["cheap", "dear"]})
    with pytest.raises(TypeError):
        sc.score(["u1"], cands)
    with pytest.raises(TypeError):
        sc.score(user, "item")
    with pytest.raises(ValueError, match="both"):
        sc.score(user, {**cands, "user": ["u1", "u2"]})
    with pytest.raises(ValueError, match="'adcat'"):
        sc.score(user, {**cands, "adcat": [1]})
    # None and unseen values are documented defaults, not errors: None dense -> fill,
    # unseen -> OOV; a field left out is an error naming it unless missing="default"
    p = sc.score({**user, "user": "nobody", "hour": None}, {**cands, "item": ["i1", "zz"]})
    assert p.shape == (2,) and np.isfinite(p).all()
    with pytest.raises(ValueError, match=r"missing fields 'age', 'hour'"):
        sc.score({"user": "u1"}, cands)
    with pytest.raises(ValueError, match=r"missing fields? 'price'"):
        sc.score(user, {"item": ["i1", "i2"], "adcat": [1, 2]})
    lax = Scorer.load(ckpts[key][0], missing="default")
    got = lax.score({"user": "u1"}, {"item": ["i1", "i2"]})
    want = sc.score({"user": "u1", "age": None, "hour": None},
                    {"item": ["i1", "i2"], "adcat": [None, None], "price": [None, None]})
    np.testing.assert_allclose(got, want, atol=1e-6)  # the dense split differs: fp32 rounding
    with pytest.raises(ValueError, match="missing must be"):
        Scorer.load(ckpts[key][0], missing="zero")
    # fast path
    d = np.zeros(2, dtype=np.float32)
    sc.score_ids({"user": 1}, {"item": np.array([1, 2])}, d)
    with pytest.raises(IndexError, match="'item'"):
        sc.score_ids({"user": 1}, {"item": np.array([1, 10**6])}, d)
    with pytest.raises(IndexError, match="'user'"):
        sc.score_ids({"user": -1}, {"item": np.array([1, 2])}, d)
    with pytest.raises(ValueError, match="empty"):
        sc.score_ids({"user": 1}, {"item": np.array([], dtype=np.int64)}, d)
    with pytest.raises(ValueError, match="NaN"):
        sc.score_ids({"user": 1}, {"item": np.array([1])}, np.array([0.0, np.nan]))
    with pytest.raises(TypeError, match="'item'"):
        sc.score_ids({"user": 1}, {"item": np.array([1.5])}, d)
    with pytest.raises(ValueError, match="'hour'"):
        sc.score_ids({"hour": 1}, {"item": np.array([1])}, d)
    with pytest.raises(ValueError, match="k must be"):
        sc.top_k(user, cands, 0)
    # the kernel checks its own ids too (never a crash on a bad direct call)
    v = sc._version
    meta, blob = v.packed_for([2])
    with pytest.raises(IndexError):
        torch.ops.adrec.serving_forward(
            meta, blob, v.weights, None, v.lin, torch.zeros(3, dtype=torch.long),
            torch.full((1, 1), 10**9), torch.zeros(1, 2), torch.zeros(0, dtype=torch.long),
            torch.zeros(0, dtype=torch.long))


def test_gil_released(ckpts):
    """While one thread is inside the native call, another Python thread runs: with a huge
    switch interval the interpreter hands the GIL over only when it is released."""
    sc = Scorer.load(ckpts["dlrm"][0])
    n = 60000
    ids = {"item": np.random.default_rng(0).integers(0, 300, n), "adcat": np.zeros(n, np.int64)}
    d = np.zeros(2, np.float32)
    sc.score_ids({"user": 1}, ids, d)
    t = {}

    def call():
        t["start"] = time.perf_counter()
        sc.score_ids({"user": 1}, ids, d)
        t["end"] = time.perf_counter()

    old = sys.getswitchinterval()
    sys.setswitchinterval(100.0)
    try:
        th = threading.Thread(target=call)
        th.start()
        time.sleep(0.002)  # releases the GIL: the worker starts and enters the kernel
        t["main"] = time.perf_counter()  # runs only once the worker released the GIL
        th.join()
    finally:
        sys.setswitchinterval(old)
    assert t["main"] < t["end"], "the native serving call holds the GIL"


@pytest.mark.parametrize("key", ZOO)
def test_threads_and_hot_swap(schema, tmp_path, key):
    """Client threads score while the main thread swaps between two checkpoints whose answers
    differ: no request fails, and every answer equals one version's answer in full."""
    a, b = _model(schema, key, seed=0), _model(schema, key, seed=1)
    rng = np.random.default_rng(5)
    reqs = [_request(rng, int(rng.integers(1, 40)), CAND) for _ in range(16)]
    _hot_swap(schema, tmp_path, a, b, reqs)


def _hot_swap(schema, tmp_path, a, b, reqs):
    pa_, pb = save_checkpoint(tmp_path / "a", a, rng=False), save_checkpoint(tmp_path / "b", b,
                                                                             rng=False)
    want_a = [_expected(a, schema, u, c) for u, c in reqs]
    want_b = [_expected(b, schema, u, c) for u, c in reqs]
    for x, y in zip(want_a, want_b):
        assert np.abs(x - y).max() > 1e-4  # every request tells the versions apart
    sc = Scorer.load(pa_)
    assert sc.native
    stop = threading.Event()
    stats = {"ok": 0, "a": 0, "b": 0, "mixed": 0, "errors": []}
    lock = threading.Lock()

    def client(seed):
        r = np.random.default_rng(seed)
        while not stop.is_set():
            i = int(r.integers(len(reqs)))
            try:
                p = sc.score(*reqs[i])
            except Exception as e:  # noqa: BLE001 - every failure is counted
                with lock:
                    stats["errors"].append(repr(e))
                continue
            is_a = np.abs(p - want_a[i]).max() <= 1e-5
            is_b = np.abs(p - want_b[i]).max() <= 1e-5
            with lock:
                stats["ok"] += 1
                stats["a"] += is_a
                stats["b"] += is_b
                stats["mixed"] += not (is_a or is_b)

    threads = [threading.Thread(target=client, args=(s,)) for s in range(6)]
    for th in threads:
        th.start()
    try:
        for k in range(6):
            time.sleep(0.15)
            sc.swap(pb if k % 2 == 0 else pa_)
        time.sleep(0.15)
    finally:
        stop.set()
        for th in threads:
            th.join()
    assert stats["errors"] == []
    assert stats["mixed"] == 0
    assert stats["a"] > 0 and stats["b"] > 0 and stats["ok"] == stats["a"] + stats["b"]
    assert sc.version[0] == 6


def test_swap_failure_keeps_version(ckpts, tmp_path):
    sc = Scorer.load(ckpts["dlrm"][0])
    before = sc.version
    with pytest.raises(FileNotFoundError):
        sc.swap(tmp_path / "missing")
    assert sc.version == before
    sc.score({"user": "u1", "age": 1, "hour": 2.0}, {"item": ["i1"], "adcat": [1], "price": [3]})


# ---------------------------------------------------------------------------- packed DLRM path
def _ids_request(schema, rng, n, cand_fields=("item", "adcat")):
    """Encoded ids of a random request for ``ids_path(cand_fields)`` + its Batch (the model's
    input: user values repeated per candidate)."""
    user, cands = _request(rng, n, [*cand_fields, "price"] if n > 0 else list(cand_fields))
    user.pop("price", None)
    cands.pop("price", None)
    user["price"] = 3.5  # every dense field user-side: the packed path
    rows = [{**user, **{k: v[i] for k, v in cands.items()}} for i in range(n)]
    b = schema.encode_rows(rows)
    ids = b.indices.view(4, n)  # bags: user, age, item, adcat
    pos = {"user": 0, "age": 1, "item": 2, "adcat": 3}
    uf = [f for f in pos if f not in cand_fields]
    u = np.array([int(ids[pos[f], 0]) for f in uf], dtype=np.int64)
    c = np.ascontiguousarray(np.stack([ids[pos[f]].numpy() for f in cand_fields], axis=1))
    d = np.ascontiguousarray(b.dense[0].numpy())
    return u, c, d, b


@pytest.fixture
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("key", list(MODELS))
def test_ids_path_equivalence(schema, ckpts, key, threads):
    """fp32 executor == model forward (<= 1e-5) for every way the work is split: one row,
    rows per thread below / at / above the row-split threshold (16), tile edges (32)."""
    path, model = ckpts[key]
    sc = Scorer.load(path)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_ids_path(schema, sc, model, 11, (1, 2, 3, 15, 16, 31, 32, 33, 64, 65, 200))
    finally:
        torch.set_num_threads(old)


def _check_ids_path(schema, sc, model, seed, sizes):
    """ids_path == model forward (<= 1e-5) for three field splits and every size in ``sizes``."""
    rng = np.random.default_rng(seed)
    for cand_fields in (("item", "adcat"), ("item",), ("adcat", "item", "user", "age")):
        fp = sc.ids_path(cand_fields)
        assert fp.cand_fields == cand_fields
        assert set(fp.user_fields) | set(cand_fields) == {"user", "age", "item", "adcat"}
        for n in sizes:
            u, c, d, b = _ids_request(schema, rng, n, cand_fields)
            got = fp(u, c, d)
            assert got.dtype == np.float32 and got.shape == (n,)
            want = model.predict(b).numpy()
            assert np.abs(got - want).max() <= 1e-5, (cand_fields, n)


def _ref(model, schema, batch, bf16=False, table=None, seqs=()):
    """The spec reference (tests/serving/spec_reference.py) on the rows of ``batch`` (every
    field per candidate) -> [B] probabilities; ``table`` replaces the spec's embedding rows."""
    spec = model.serving_spec()
    if table is not None:
        spec.table = table
    tofs = schema.table_offsets()
    base = [int(tofs[t]) for _, t in schema.sparse_fields()]
    seq_base = [int(tofs[dict(schema.sequence_fields())[s]]) for s, _ in spec.sequences]
    T, B = len(base), batch.batch_size
    ids = batch.indices.view(T, B).T.numpy()
    return spec_serve(spec, base, seq_base, np.zeros(T, np.int64), list(range(T)), ids,
                      batch.dense.numpy(), seqs, bf16=bf16)


# Scores the saved requests with the bf16 executor in a child process (ADREC_CPU_ISA is read
# once per process): argv = checkpoint, requests .npz, threads, output .npy.
_BF16_CHILD = r"""
import sys, numpy as np, torch
from adrec_fast.serving import Scorer
path, req, threads, out = sys.argv[1:]
torch.set_num_threads(int(threads))
fp = Scorer.load(path, mlp="bf16").ids_path(["item", "adcat"])  # noqa
r = np.load(req)
np.save(out, np.concatenate([fp(r[f"u{i}"], r[f"c{i}"], r[f"d{i}"])
                             for i in range(int(r["n"]))]))
"""


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("key", list(MODELS))
def test_bf16_mlp(schema, ckpts, key, threads, tmp_path):
    """mlp="bf16" computes the bf16-weight/bf16-activation model: it matches the float64
    emulation (the spec reference with bf16 rounding) far closer than it matches fp32, for the
    layer and the row split; and the two bf16 kernels (AVX512_BF16 where the CPU has it, the
    portable one under ADREC_CPU_ISA=avx2) agree."""
    path, model = ckpts[key]
    sc = Scorer.load(path, mlp="bf16")
    layers = model.serving_spec().deep or model.serving_spec().cross
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    reqs, outs = {}, []
    try:
        rng = np.random.default_rng(12)
        fp = sc.ids_path(["item", "adcat"])
        for i, n in enumerate((1, 3, 20, 64, 200)):
            u, c, d, b = _ids_request(schema, rng, n)
            reqs.update({f"u{i}": u, f"c{i}": c, f"d{i}": d})
            got = fp(u, c, d)
            outs.append(got)
            emu = _ref(model, schema, b, bf16=True)
            fp32 = model.predict(b).numpy()
            err, err32 = np.abs(got - emu).max(), np.abs(got - fp32).max()
            assert err <= 5e-5, n
            if layers:
                assert err < err32 / 5, (n, err, err32)  # the layers really run in bf16
            # score() and score_ids() take the same bf16 path
            np.testing.assert_allclose(sc._version.forward_ids(
                np.array([u[0], u[1], 0, 0]), [2, 3], c, d[None]), got, atol=1e-7)
    finally:
        torch.set_num_threads(old)
    if key not in ("dlrm", "dcnv2"):
        return
    np.savez(tmp_path / "req.npz", n=len(outs), **reqs)
    env = {k: v for k, v in os.environ.items() if k != "ADREC_CPU_ISA"}
    res = subprocess.run([sys.executable, "-c", _BF16_CHILD, str(path), str(tmp_path / "req.npz"),
                          str(threads), str(tmp_path / "port.npy")], capture_output=True,
                         text=True, timeout=600, env={**env, "ADREC_CPU_ISA": "avx2"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert np.abs(np.load(tmp_path / "port.npy") - np.concatenate(outs)).max() <= 1e-6


@pytest.mark.parametrize("key", ["dlrm", "dcnv2"])
def test_bf16_mlp_with_int8_tables(schema, ckpts, key):
    path, model = ckpts[key]
    sc = Scorer.load(path, quantize="int8", mlp="bf16")
    table = dequantize_rows(*quantize_rows(model.lookup.ebc.weight, "int8"))
    u, c, d, b = _ids_request(schema, np.random.default_rng(13), 50)
    got = sc.ids_path(["item", "adcat"])(u, c, d)
    assert np.abs(got - _ref(model, schema, b, bf16=True, table=table)).max() <= 5e-5


def test_model_without_spec(schema, ckpts, tmp_path):
    """A model the executor cannot run (a LayerNorm MLP has no serving spec) is served by its
    own forward, with a warning at load; bf16 and ids_path need the executor."""
    torch.manual_seed(0)
    m = build_model("deepfm", schema, embedding_dim=8, layer_norm=True).eval()
    assert m.serving_spec() is None
    p = save_checkpoint(tmp_path / "ln", m, rng=False)
    with pytest.warns(UserWarning, match="torch forward"):
        sc = Scorer.load(p)
    assert not sc.native
    user, cands = _request(np.random.default_rng(4), 5, CAND)
    assert np.abs(sc.score(user, cands) - _expected(m, schema, user, cands)).max() <= 1e-5
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="executor"):
        Scorer.load(p, mlp="bf16")
    with pytest.raises(NotImplementedError, match="executor"):
        sc.ids_path(["item"])
    with pytest.raises(ValueError, match="mlp"):
        Scorer.load(ckpts["dlrm"][0], mlp="int4")


@pytest.mark.parametrize("key", ["dlrm", "dcnv2", "deepfm"])
def test_ids_path_bad_requests(schema, ckpts, key):
    """Bad requests get the same errors whatever the model."""
    sc = Scorer.load(ckpts[key][0])
    with pytest.raises(ValueError, match="'colour'"):
        sc.ids_path(["item", "colour"])
    with pytest.raises(ValueError, match="repeat"):
        sc.ids_path(["item", "item"])
    fp = sc.ids_path(["item", "adcat"])
    u, c, d, _ = _ids_request(schema, np.random.default_rng(14), 5)
    fp(u, c, d)
    with pytest.raises(IndexError, match="'item'"):
        bad = c.copy()
        bad[3, 0] = 10**6
        fp(u, bad, d)
    with pytest.raises(IndexError, match="'adcat'"):
        bad = c.copy()
        bad[0, 1] = -1
        fp(u, bad, d)
    with pytest.raises(IndexError, match="'age'"):
        fp(np.array([u[0], 10**6]), c, d)
    with pytest.raises(ValueError, match="empty"):
        fp(u, c[:0], d)
    with pytest.raises(ValueError, match="NaN"):
        fp(u, c, np.array([0.0, np.nan], dtype=np.float32))
    with pytest.raises(TypeError, match="int64"):
        fp(u, c.astype(np.int32), d)
    with pytest.raises(TypeError, match="float32"):
        fp(u, c, d.astype(np.float64))
    with pytest.raises(TypeError, match="numpy"):
        fp(u.tolist(), c, d)
    with pytest.raises(ValueError, match="cand_ids"):
        fp(u, c[:, :1], d)
    with pytest.raises(ValueError, match="user_ids"):
        fp(u[:1], c, d)
    with pytest.raises(ValueError, match="dense"):
        fp(u, c)  # the schema has dense fields
    # non-contiguous arrays are fine
    np.testing.assert_array_equal(fp(u, np.asfortranarray(c), d), fp(u, c, d))


def _packed_call(schema, ckpts, seed, key="dlrm"):
    """(op, meta, blob, weights): the serving_forward op bound to one valid request of
    ids_path(["item", "adcat"]); op(meta, blob, weights) runs it."""
    sc = Scorer.load(ckpts[key][0])
    fp = sc.ids_path(["item", "adcat"])
    u, c, d, _ = _ids_request(schema, np.random.default_rng(seed), 3)
    fp(u, c, d)
    v = fp._bound[0]
    meta, blob = v.packed_for([2, 3])
    U, C, Dn = torch.from_numpy(u), torch.from_numpy(c), torch.from_numpy(d)[None]
    e = torch.zeros(0, dtype=torch.long)

    def op(m, b, w):
        return torch.ops.adrec.serving_forward.default(m, b, w, v.scale_bias, v.lin, U, C, Dn,
                                                       e, e)
    return op, meta, blob, v.weights


@pytest.mark.parametrize("key", ["dlrm", "dcnv2"])
def test_packed_model_checks(schema, ckpts, key):
    """The kernel validates the packed model (never a crash on a damaged one)."""
    op, meta, blob, w = _packed_call(schema, ckpts, 15, key)
    op(meta, blob, w)
    for pos, val in [(0, 1), (1, 7), (2, 5), (3, 99), (len(meta) - 2, 10**9),
                     (len(meta) - 5, 4), (len(meta) - 4, 3)]:
        m = meta.clone()
        m[pos] = val
        with pytest.raises(ValueError):
            op(m, blob, w)
    with pytest.raises(ValueError):
        op(meta, blob[:-64], w)
    with pytest.raises(ValueError):
        op(meta[:-1], blob, w)
    with pytest.raises(ValueError):  # a table smaller than the packed row ranges
        op(meta, blob, w[:10])


@pytest.mark.parametrize("key", ["dlrm", "deepfm"])
def test_swap_frees_replaced_versions(schema, ckpts, key):
    """A replaced version (its tables, packed models and native front) is freed once no
    request holds it: nothing of the version refers back to it strongly."""
    import gc
    import weakref

    path, _ = ckpts[key]
    sc = Scorer.load(path)
    user, cands = _request(np.random.default_rng(41), 5, CAND)
    want = sc.score(user, cands)
    old = []
    for _ in range(3):
        old.append(weakref.ref(sc._version))
        sc.ids_path(["item"])(np.zeros(3, np.int64), np.zeros((2, 1), np.int64),
                              np.zeros(2, np.float32))  # a packed split of the version
        sc.swap(path)
        np.testing.assert_array_equal(sc.score(user, cands), want)
    gc.collect()
    assert all(r() is None for r in old)


def test_ids_path_follows_swap(schema, tmp_path):
    a, b = _model(schema, "dlrm", seed=0), _model(schema, "dlrm", seed=1)
    pa_ = save_checkpoint(tmp_path / "a", a, rng=False)
    pb = save_checkpoint(tmp_path / "b", b, rng=False)
    sc = Scorer.load(pa_, mlp="bf16")
    fp = sc.ids_path(["item", "adcat"])
    u, c, d, batch = _ids_request(schema, np.random.default_rng(16), 40)
    assert np.abs(fp(u, c, d) - _ref(a, schema, batch, bf16=True)).max() <= 5e-5
    sc.swap(pb)
    assert np.abs(fp(u, c, d) - _ref(b, schema, batch, bf16=True)).max() <= 5e-5


@pytest.mark.parametrize("mlp", [None, "bf16"])
@pytest.mark.parametrize("shape", ["no_dense", "no_top"])
def test_packed_dlrm_shapes(tmp_path, mlp, shape):
    """DLRM without a bottom MLP (no dense field: the fields are the embeddings only) and
    without a top MLP (the head is the first top layer, split into its shared and candidate
    columns), D = 16 and 5, through the layer and the row split."""
    raw = _raw(2000, 7)
    fields = [{"name": "user", "type": "categorical"}, {"name": "age", "type": "categorical"},
              {"name": "item", "type": "categorical"}, {"name": "adcat", "type": "categorical"}]
    if shape == "no_top":
        fields.append({"name": "price", "type": "dense", "transform": "log1p_standardize"})
    sch = Schema(fields).fit(raw)
    for D in (16, 5):
        torch.manual_seed(D)
        kw = {"top": ()} if shape == "no_top" else {}
        m = build_model("dlrm", sch, embedding_dim=D, init_std=0.5, **kw).eval()
        assert (m.bottom is None) == (shape == "no_dense")
        sc = Scorer.load(save_checkpoint(tmp_path / f"{shape}{D}", m, rng=False), mlp=mlp)
        fp = sc.ids_path(["item", "adcat"])
        rng = np.random.default_rng(D)
        for n in (1, 7, 40):
            user = {"user": f"u{int(rng.integers(50))}", "age": int(rng.integers(8))}
            if shape == "no_top":
                user["price"] = float(rng.random() * 100)
            cands = {"item": [f"i{i}" for i in rng.integers(0, 300, n)],
                     "adcat": rng.integers(0, 20, n).tolist()}
            b = sch.encode_rows([{**user, **{k: v[i] for k, v in cands.items()}}
                                 for i in range(n)])
            ids = b.indices.view(4, n)
            got = fp(ids[:2, 0].numpy().copy(), np.ascontiguousarray(ids[2:].T.numpy()),
                     b.dense[0].numpy().copy() if shape == "no_top" else None)
            want = m.predict(b).numpy() if mlp is None else _ref(m, sch, b, bf16=True)
            assert np.abs(got - want).max() <= (1e-5 if mlp is None else 5e-5), (D, n)
            np.testing.assert_allclose(sc.score(user, cands), got, atol=1e-6)


@pytest.mark.parametrize("key", ["dlrm", "dcnv2"])
def test_packed_model_checks_extreme_values(schema, ckpts, key):
    """Huge or negative counts, sizes and offsets in a damaged meta: a ValueError (the checks
    bound every value before any arithmetic on it)."""
    op, meta, blob, w = _packed_call(schema, ckpts, 17, key)
    big = 2**62
    L = int(meta[10] + meta[11] + meta[12])  # bottom + shared + tower layers
    layer0 = len(meta) - 7 * L
    T = int(meta[4])
    header = [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 19, 20, 21, 22, 23, 24]
    G = int(meta[24])  # gathered bags: [candidate column, table size, offset, offset] each
    assert (G > 0) == (key == "dcnv2")  # its small bags are gathered; DLRM gathers none
    gathered = [layer0 - 4 * G + k for k in range(4 * G)]
    for pos in header + [25, 25 + T, layer0, layer0 + 1, layer0 + 3, layer0 + 5,
                         layer0 + 6] + gathered:
        for val in (big, -big, -1, 3) if pos in gathered else (big, -big, -1):
            m = meta.clone()
            m[pos] = val
            with pytest.raises(ValueError):
                op(m, blob, w)


# ---------------------------------------------------------------------------- numpy entry point
def _handle(sc, cand_fields=("item", "adcat")):
    """(handle, op arguments) of a Scorer's packed model for one split: the numpy entry point
    (ops.scorer.serving_handle) and what torch.ops.adrec.serving_forward takes for it."""
    v = sc._version
    slots = [v.bag_pos[f] for f in cand_fields]
    meta, blob = v.packed_for(slots)
    return v.handle_for(slots), (meta, blob, v.weights, v.scale_bias, v.lin)


@pytest.mark.parametrize("quantize", [None, "fp16", "int8"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("key", ["dlrm", "dcnv2", "deepfm"])
def test_handle_equivalence(schema, ckpts, quantize, threads, key):
    """The numpy entry point gives the op's answer bit for bit (one kernel), and in fp32 the
    model's forward within 1e-5, on random requests split every way the kernel splits them."""
    path, model = ckpts[key]
    sc = Scorer.load(path, quantize=quantize)
    deq = model
    if quantize is not None:
        deq = _model(schema, key)
        for ebc in deq.embedding_collections():
            if ebc.embedding_dim > 1:  # first-order weights stay float32
                ebc.weight.copy_(dequantize_rows(*quantize_rows(ebc.weight, quantize)))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rng = np.random.default_rng(21)
        for cand_fields in (("item", "adcat"), ("adcat", "item", "user")):
            h, args = _handle(sc, cand_fields)
            assert (h.num_user, h.num_cand, h.num_dense) == (4 - len(cand_fields),
                                                            len(cand_fields), 2)
            for n in (1, 2, 15, 16, 33, 200):
                u, c, d, b = _ids_request(schema, rng, n, cand_fields)
                c = np.ascontiguousarray(c[:, np.argsort([sc._version.bag_pos[f]
                                                          for f in cand_fields])])
                got = h(u, c, d)
                assert got.dtype == np.float32 and got.shape == (n,)
                e = torch.zeros(0, dtype=torch.long)
                op = torch.ops.adrec.serving_forward.default(
                    *args, *(torch.from_numpy(x) for x in (u, c, d[None])), e, e).numpy()
                np.testing.assert_array_equal(got, op)
                assert np.abs(got - deq.predict(b).numpy()).max() <= 1e-5, (cand_fields, n)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize("key", ["deepfm", "dcnv2", "dcnv2_stacked", "dcnv2_linear", "fm"])
def test_gathered_bags(schema, ckpts, monkeypatch, key, quantize):
    """Candidate bags gathered from projected rows (every one, some, none: the budget
    ``GATHER_BYTES``) give the model's forward within 1e-5, through the layer and the row
    split, with the candidates' dense values shared or not."""
    import adrec_fast.serving.scorer as S

    path, model = ckpts[key]
    deq = model
    if quantize is not None:
        deq = copy.deepcopy(model)
        for ebc in deq.embedding_collections():
            if ebc.embedding_dim > 1:
                ebc.weight.copy_(dequantize_rows(*quantize_rows(ebc.weight, quantize)))
    cand_fields = ("adcat", "item", "user")
    rng = np.random.default_rng(31)
    seen = set()
    for budget in (0, 20_000, 60_000, 200_000, 4 << 20):
        monkeypatch.setattr(S, "GATHER_BYTES", budget)
        v = Scorer.load(path, quantize=quantize)._version
        slots = sorted(v.bag_pos[f] for f in cand_fields)
        for dense_cand in ((), (0, 1)):
            meta, blob = v.packed_for(slots, dense_cand)
            G = int(meta[S._HEADER.index("G")])
            seen.add(min(G, 1) + (G == len(slots)))  # 0 none, 1 some, 2 all
            h = _op_handle(v, meta, blob)
            for n in (1, 5, 40):
                u, c, d, b = _ids_request(schema, rng, n, cand_fields)
                c = np.ascontiguousarray(c[:, np.argsort([v.bag_pos[f] for f in cand_fields])])
                if dense_cand:
                    d = np.ascontiguousarray(b.dense.numpy())  # [N, K_d] (the same values)
                want = deq.predict(b).numpy()
                with torch.inference_mode():
                    for threads in (1, 2):
                        old = torch.get_num_threads()
                        torch.set_num_threads(threads)
                        try:
                            got = h(u, c, d)
                        finally:
                            torch.set_num_threads(old)
                        assert np.abs(got - want).max() <= 1e-5, (budget, dense_cand, n, G)
    if key != "fm":  # FM has no layer: nothing to gather
        assert seen == {0, 1, 2}
    else:
        assert seen == {0}


def _op_handle(v, meta, blob):
    from adrec_fast.ops import scorer as op

    return op.serving_handle(meta, blob, v.weights, v.scale_bias, v.lin)


def test_handle_bad_inputs(schema, ckpts):
    """Wrong dtype, shape, type or value: a Python exception naming the argument, never a
    crash; strided arrays are copied, not rejected."""
    sc = Scorer.load(ckpts["dlrm"][0])
    h, (meta, blob, w, _, _) = _handle(sc)
    u, c, d, _ = _ids_request(schema, np.random.default_rng(22), 5)
    want = h(u, c, d)
    bad_calls = [
        (TypeError, "user_ids must be a numpy int64", (u.astype(np.int32), c, d)),
        (TypeError, "user_ids must be a numpy int64", (u.astype(np.float64), c, d)),
        (TypeError, "user_ids .* got list", (u.tolist(), c, d)),
        (TypeError, "cand_ids must be a numpy int64", (u, c.astype(np.uint64), d)),
        (TypeError, "cand_ids .* got NoneType", (u, None, d)),
        (TypeError, "dense must be a numpy float32", (u, c, d.astype(np.float64))),
        (TypeError, "dense must be a numpy float32", (u, c, torch.from_numpy(d))),
        (ValueError, r"user_ids must have 2 \(user slots\) or 4 \(all slots\) entries, got 3",
         (np.zeros(3, np.int64), c, d)),
        (ValueError, r"user_ids must be \[Tu\]", (u[None], c, d)),
        (ValueError, r"cand_ids must be \[N, 2\]", (u, c[:, :1], d)),
        (ValueError, r"cand_ids must be \[N, Tc\]", (u, c.reshape(-1), d)),
        (ValueError, r"dense must be \[2\]", (u, c, d[:1])),
        (ValueError, "dense values needed", (u, c, None)),
        (ValueError, "empty candidate list", (u, c[:0], d)),
        (ValueError, r"dense\[0, 1\] is NaN", (u, c, np.array([0.0, np.nan], np.float32))),
        (IndexError, r"user_ids\[1\] = 1000000 is out of range", (np.array([u[0], 10**6]), c, d)),
        (IndexError, r"cand_ids\[3, 0\] = -1 is out of range",
         (u, np.where(np.arange(5)[:, None] * [1, 0] == 3, -1, c), d)),
    ]
    for exc, msg, args in bad_calls:
        with pytest.raises(exc, match=msg):
            h(*args)
    # strided inputs are copied, and the handle still answers afterwards
    np.testing.assert_array_equal(h(u, np.asfortranarray(c), d), want)
    np.testing.assert_array_equal(h(np.repeat(u, 2)[::2], c, np.repeat(d, 2)[::2]), want)
    np.testing.assert_array_equal(h(u, c, d), want)
    with pytest.raises(TypeError, match="meta must be a numpy int64"):
        _C.ServingModel(meta.numpy().astype(np.int32), blob.numpy(), w.numpy(), None)
    with pytest.raises(TypeError, match="weights must be float32, float16 or uint8"):
        _C.ServingModel(meta.numpy(), blob.numpy(), w.double().numpy(), None)
    with pytest.raises(ValueError, match="weights must be a C-contiguous"):
        _C.ServingModel(meta.numpy(), blob.numpy(), w.numpy().T, None)
    with pytest.raises(ValueError, match="uint8 weights need scale_bias"):
        _C.ServingModel(meta.numpy(), blob.numpy(), np.zeros(w.shape, np.uint8), None)
    with pytest.raises(ValueError, match=r"scale_bias must be \[R, 2\]"):
        _C.ServingModel(meta.numpy(), blob.numpy(), w.numpy(), np.zeros((3, 2), np.float32))
    damaged = meta.numpy().copy()
    damaged[0] = 1
    with pytest.raises(ValueError, match="not a packed model"):
        _C.ServingModel(damaged, blob.numpy(), w.numpy(), None)
    with pytest.raises(ValueError, match="meta has"):
        _C.ServingModel(meta.numpy()[:-1], blob.numpy(), w.numpy(), None)
    with pytest.raises(ValueError):  # a table smaller than the packed row ranges
        _C.ServingModel(meta.numpy(), blob.numpy(), w.numpy()[:10], None)


def test_handle_threads(schema, ckpts, two_threads):
    """Client threads share one handle (each request on its own OpenMP team and buffers): every
    answer equals the one-thread answer of the same request."""
    sc = Scorer.load(ckpts["dlrm"][0])
    h, _ = _handle(sc)
    rng = np.random.default_rng(23)
    reqs = [_ids_request(schema, rng, n)[:3] for n in (1, 2, 7, 16, 40, 100, 1, 33)]
    want = [h(*r) for r in reqs]
    errors, mismatches = [], []

    def client(k):
        try:
            for i in range(200):
                j = (k + i) % len(reqs)
                if not np.array_equal(h(*reqs[j]), want[j]):
                    mismatches.append(j)
        except Exception as e:  # noqa: BLE001 - every failure is counted
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == [] and mismatches == []


# ---------------------------------------------------------------------------- DIN: histories
@pytest.fixture(scope="module")
def din_schema():
    raw = _raw(3000, 0)
    rng = np.random.default_rng(3)
    raw["hist"] = ["|".join(f"i{j}" for j in rng.integers(0, 300, rng.integers(0, 9)))
                   for _ in range(3000)]
    fields = [{"name": "user", "type": "categorical"}, {"name": "age", "type": "categorical"},
              {"name": "hour", "type": "dense", "transform": "standardize"},
              {"name": "item", "type": "categorical"}, {"name": "adcat", "type": "categorical"},
              {"name": "price", "type": "dense", "transform": "log1p_standardize", "fill": 1.0},
              {"name": "hist", "type": "multi_categorical", "sequence": True,
               "share_with": "item", "max_len": 6, "sep": "|"}]
    return Schema(fields).fit(raw)


def _din(din_schema, seed=0, **kw):
    torch.manual_seed(seed)
    m = build_model("din", din_schema, embedding_dim=8, init_std=0.5, **kw).eval()
    for ebc in m.embedding_collections():
        if ebc.embedding_dim == 1:
            ebc.weight.normal_(0, 0.3)
    return m


def _din_request(rng, n, cand_fields, hist_len=None):
    user, cands = _request(rng, n, cand_fields)
    L = int(rng.integers(0, 12)) if hist_len is None else hist_len
    user["hist"] = "|".join(f"i{j}" for j in rng.integers(0, 300, L))
    return user, cands


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kw", [{}, {"fm": False, "linear": False}])
def test_din_equivalence(din_schema, tmp_path, kw, threads):
    """DIN on the executor == its own forward (<= 1e-5): histories empty, short and longer than
    max_len (the last 6 kept), the target item per candidate (attention per candidate) or
    user-side (attention once), every size the executor splits differently."""
    m = _din(din_schema, **kw)
    sc = Scorer.load(save_checkpoint(tmp_path / "din", m, rng=False))
    assert sc.native
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rng = np.random.default_rng(31)
        for cand_fields in (CAND, ["item"], ["adcat", "price"]):
            for n, L in ((1, 0), (3, 4), (17, 9), (40, 1), (200, 6)):
                user, cands = _din_request(rng, n, cand_fields, L)
                got = sc.score(user, cands)
                want = _expected(m, din_schema, user, cands)
                assert np.abs(got - want).max() <= 1e-5, (cand_fields, n, L)
    finally:
        torch.set_num_threads(old)
    with pytest.raises(ValueError, match="'hist'"):
        sc.score({k: v for k, v in user.items() if k != "hist"}, cands)
    with pytest.raises(ValueError, match="'hist'"):
        sc.score({k: v for k, v in user.items() if k != "hist"},
                 {**cands, "hist": ["i1"] * len(next(iter(cands.values())))})


def test_din_ids_path_and_bf16(din_schema, tmp_path):
    """ids_path with the history ids == score(); bf16 == the spec reference with bf16 rounding."""
    m = _din(din_schema)
    path = save_checkpoint(tmp_path / "din", m, rng=False)
    sc, sb = Scorer.load(path), Scorer.load(path, mlp="bf16")
    rng = np.random.default_rng(32)
    for n in (1, 20, 64):
        user, cands = _din_request(rng, n, ["item", "adcat"])
        rows = [{**user, **{k: v[i] for k, v in cands.items()}} for i in range(n)]
        b = din_schema.encode_rows(rows)
        ids = b.indices.view(4, n)
        hist = b.seq_indices["hist"][b.seq_offsets["hist"][0]:b.seq_offsets["hist"][1]].numpy()
        u, c = ids[:2, 0].numpy().copy(), np.ascontiguousarray(ids[2:].T.numpy())
        d = b.dense[0].numpy().copy()
        got = sc.ids_path(["item", "adcat"])(u, c, d, [hist])
        np.testing.assert_allclose(got, sc.score(user, cands), atol=1e-6)
        emu = _ref(m, din_schema, b, bf16=True, seqs=[hist])
        assert np.abs(sb.ids_path(["item", "adcat"])(u, c, d, [hist]) - emu).max() <= 5e-5
        with pytest.raises(IndexError):
            sc.ids_path(["item", "adcat"])(u, c, d, [np.array([10**6])])


def test_din_hot_swap(din_schema, tmp_path):
    a, b = _din(din_schema, seed=0), _din(din_schema, seed=1)
    rng = np.random.default_rng(33)
    reqs = [_din_request(rng, int(rng.integers(1, 40)), CAND) for _ in range(16)]
    _hot_swap(din_schema, tmp_path, a, b, reqs)


@pytest.mark.parametrize("key", ["dlrm", "deepfm"])
def test_model_without_attention_on_a_schema_with_histories(din_schema, tmp_path, key):
    """A model that reads no history, on a schema that has one: the executor runs it (the
    request's history is encoded and ignored), equal to its forward."""
    torch.manual_seed(0)
    m = build_model(key, din_schema, embedding_dim=8, init_std=0.5).eval()
    sc = Scorer.load(save_checkpoint(tmp_path / key, m, rng=False))
    assert sc.native
    rng = np.random.default_rng(34)
    for n in (1, 20):
        user, cands = _din_request(rng, n, CAND)
        assert np.abs(sc.score(user, cands) - _expected(m, din_schema, user, cands)).max() <= 1e-5


def test_din_on_some_of_the_histories(tmp_path):
    """DIN attending to one of two histories: served by its own forward, with a warning."""
    raw = _raw(2000, 0)
    rng = np.random.default_rng(35)
    for h in ("h1", "h2"):
        raw[h] = ["|".join(f"i{j}" for j in rng.integers(0, 300, 4)) for _ in range(2000)]
    fields = [{"name": "user", "type": "categorical"}, {"name": "item", "type": "categorical"},
              {"name": "h1", "type": "multi_categorical", "sequence": True, "share_with": "item",
               "sep": "|"},
              {"name": "h2", "type": "multi_categorical", "sequence": True, "share_with": "item",
               "sep": "|"}]
    sch = Schema(fields).fit(raw)
    torch.manual_seed(0)
    m = build_model("din", sch, embedding_dim=8, sequences=["h2"]).eval()
    with pytest.warns(UserWarning, match="histories"):
        sc = Scorer.load(save_checkpoint(tmp_path / "din", m, rng=False))
    assert not sc.native
    user = {"user": "u1", "h1": "i1|i2", "h2": "i3|i4|i5"}
    cands = {"item": ["i1", "i2", "i9"]}
    assert np.abs(sc.score(user, cands) - _expected(m, sch, user, cands)).max() <= 1e-5
