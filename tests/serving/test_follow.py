# SPDX-License-Identifier: Apache-2.0
"""Serving follows training: a Scorer applies the row deltas of online training (apply_delta,
follow) while requests run, and refuses corrupt, partial, out-of-sequence and wrong-base
deltas, serving the previous version."""

import json
import threading
import time
import warnings

import numpy as np
import pyarrow as pa
import pytest
import torch

from adrec_fast.models.checkpoint import save_checkpoint
from adrec_fast.models.registry import build_model
from adrec_fast.serving import Scorer
from adrec_fast.serving.deltas import DeltaError, pending, read_delta
from adrec_fast.training.export import DeltaExporter
from adrec_fast.training.loop import Trainer
from adrec_fast.training.online import train_online
from tests.streams import drifting

N = 1200
EVERY = 400
BS = 100
USER = ("user", "hist")  # the user side of a request; every other column is per candidate
MODELS = {  # executor (batch norm folded; attention over histories; LR's one table read as
    # both the table and the first-order weights), torch forward
    "deepfm_bn": ("deepfm", {"hidden": (16,), "batch_norm": True}),
    "din": ("din", {}),
    "lr": ("lr", {}),
    "deepfm_ln": ("deepfm", {"hidden": (16,), "layer_norm": True}),
}


@pytest.fixture(scope="module")
def data():
    return drifting(seed=3, period_rows=800, n=N)


def _model(schema, key):
    name, kw = MODELS[key]
    torch.manual_seed(0)
    return build_model(name, schema, embedding_dim=8, **kw)


def _requests(table, n_req=6, n_cand=7):
    rows = table.to_pylist()
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n_req):
        pick = rng.choice(len(rows), n_cand, replace=False)
        user = {k: rows[int(pick[0])][k] for k in USER}
        cands = [{k: v for k, v in rows[int(i)].items() if k not in USER and k != "label"}
                 for i in pick]
        out.append((user, cands))
    return out


def _model_scores(model, schema, req) -> np.ndarray:
    """The torch model's probabilities for a request (its rows expanded)."""
    user, cands = req
    rows = [{**c, **user, "label": 0} for c in cands]
    return model.predict(schema.encode(pa.Table.from_pylist(rows))).numpy()


def _train(schema, table, model, directory, on_export=None, dense_every=1):
    ex = DeltaExporter(model, directory, every_rows=EVERY, dense_every=dense_every,
                       on_export=on_export)
    trainer = Trainer(model, progress=False, batch_size=BS, lr=3e-3)
    train_online(model, [table], schema=schema, trainer=trainer, exporter=ex)
    return ex


@pytest.fixture(scope="module")
def exported(data, tmp_path_factory):
    """One online run per model: DIR (base + deltas), and per delta the model's scores of the
    requests and a checkpoint of the model at the export."""
    schema, table = data
    reqs = _requests(table)
    out = {}
    for key in MODELS:
        d = tmp_path_factory.mktemp(key)
        model = _model(schema, key)
        snaps = {0: [_model_scores(model, schema, r) for r in reqs]}

        def on_export(man, model=model, d=d, snaps=snaps):
            snaps[man["seq"]] = [_model_scores(model, schema, r) for r in reqs]
            save_checkpoint(d / f"snap{man['seq']}", model, rng=False)

        _train(schema, table, model, d / "export", on_export)
        out[key] = (d, snaps)
    return reqs, out


@pytest.mark.parametrize("key", list(MODELS))
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_apply_delta_equals_exported_model(data, exported, key, quantize):
    """After each delta the Scorer answers as the training model at that export (within 1e-5;
    bit for bit as a Scorer loaded from a checkpoint of it), and the answers move."""
    reqs, runs = exported
    d, snaps = runs[key]
    deltas = pending(d / "export", 0)
    assert [s for s, _ in deltas] == list(range(1, N // EVERY + 1))
    if key == "deepfm_ln":
        with pytest.warns(UserWarning, match="torch forward"):
            sc = Scorer.load(d / "export" / "base", quantize=quantize)
    else:
        sc = Scorer.load(d / "export" / "base", quantize=quantize)
    prev = [sc.score(*r) for r in reqs]
    if quantize is None:
        for p, want in zip(prev, snaps[0]):
            np.testing.assert_allclose(p, want, rtol=0, atol=1e-5)
    for seq, path in deltas:
        assert sc.apply_delta(path)[0] == seq
        got = [sc.score(*r) for r in reqs]
        if quantize is None:
            for p, want in zip(got, snaps[seq]):
                np.testing.assert_allclose(p, want, rtol=0, atol=1e-5)
        with pytest.warns(UserWarning) if key == "deepfm_ln" else _nothing():
            fresh = Scorer.load(d / f"snap{seq}", quantize=quantize)
        for p, want in zip(got, [fresh.score(*r) for r in reqs]):
            np.testing.assert_array_equal(p, want)
        assert max(np.abs(a - b).max() for a, b in zip(got, prev)) > 1e-4
        prev = got


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("tables", ["static", "dynamic"])
def test_serving_follows_training(data, tmp_path, tables):
    """Training in one thread, a Scorer following its deltas in another, requests in a third:
    no request fails, every answer is one exported version's answer in full (bit for bit), and
    the Scorer ends at the last delta. Dynamic: small LFU tables, so keys are evicted as the
    items drift."""
    if tables == "static":
        schema, table = data
        model = _model(schema, "deepfm_bn")
    else:
        schema, table = _dynamic_schema(), _dynamic_rows(N)
        torch.manual_seed(0)
        model = build_model("deepfm", schema, embedding_dim=4, hidden=(8,),
                            dynamic_tables={"capacity": 48, "eviction": "lfu",
                                            "evict_fraction": 0.25})
    reqs = _requests(table)
    snaps = {}
    lock = threading.Lock()

    def on_export(man):
        save_checkpoint(tmp_path / f"snap{man['seq']}", model, rng=False)
        with lock:
            snaps[man["seq"]] = man
        time.sleep(0.03)  # let the follower and the clients interleave with training

    export = tmp_path / "export"
    ex = DeltaExporter(model, export, every_rows=EVERY, on_export=on_export)
    ex.start(0)
    sc = _load(export / "base")
    trainer = Trainer(model, progress=False, batch_size=BS, lr=3e-3)
    follower = sc.follow(export, poll_s=0.005)
    clients = _Clients(sc, reqs)
    answers, errors = clients.answers, clients.errors
    try:
        train_online(model, [table], schema=schema, trainer=trainer, exporter=ex)
        last = max(snaps)
        _wait(lambda: follower.applied >= last)
    finally:
        clients.stop()
        follower.stop()
    assert errors == [] and follower.errors == []
    assert follower.applied == last == N // EVERY
    versions = [_load(export / "base")] + [_load(tmp_path / f"snap{s}")
                                            for s in range(1, last + 1)]
    want = [[v.score(*r) for r in reqs] for v in versions]
    seen = set()
    for i, p in answers:
        match = [k for k, w in enumerate(want) if np.array_equal(p, w[i])]
        assert match, f"request {i}: an answer of no exported version (half-applied?)"
        seen.update(match)
    assert len(answers) > 50 and len(seen) >= 2
    for p, w in zip([sc.score(*r) for r in reqs], want[-1]):
        np.testing.assert_array_equal(p, w)


def _wait(done, timeout_s: float = 20.0) -> None:
    """Poll ``done()`` until it holds or ``timeout_s`` passes, then let the clients run on a
    little (the caller's assertions say whether it held)."""
    t0 = time.monotonic()
    while not done() and time.monotonic() - t0 < timeout_s:
        time.sleep(0.01)
    time.sleep(0.05)


class _Clients:
    """Two threads scoring ``reqs`` on ``sc`` in a loop until ``stop()``: ``answers`` [(request
    index, scores)], ``errors`` [repr of each failure]."""

    def __init__(self, sc, reqs, n: int = 2):
        self.answers, self.errors = [], []
        self._stop = threading.Event()

        def client():
            while not self._stop.is_set():
                for i, r in enumerate(reqs):
                    try:
                        self.answers.append((i, sc.score(*r)))
                    except Exception as e:  # noqa: BLE001 - every failure is counted
                        self.errors.append(repr(e))

        self._threads = [threading.Thread(target=client) for _ in range(n)]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def _load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamic tables: served by the torch forward
        return Scorer.load(path)


# ---------------------------------------------------------------------------- bad deltas
@pytest.fixture
def run(data, exported, tmp_path):
    """A copy of deepfm_bn's export directory and a Scorer on its base."""
    import shutil

    reqs, runs = exported
    d, _ = runs["deepfm_bn"]
    shutil.copytree(d / "export", tmp_path / "export")
    return reqs, tmp_path / "export", Scorer.load(tmp_path / "export" / "base")


def _same(sc, reqs, before):
    for r, b in zip(reqs, before):
        np.testing.assert_array_equal(sc.score(*r), b)


def test_bad_deltas_refused(run, tmp_path):
    reqs, export, sc = run
    deltas = dict(pending(export, 0))
    data1 = deltas[1].with_suffix(".safetensors").read_bytes()

    def refused(path, match):
        version, before = sc.version, [sc.score(*r) for r in reqs]
        with pytest.raises(DeltaError, match=match) as e:
            sc.apply_delta(path)
        assert path.name in str(e.value) or path.with_suffix(".safetensors").name in str(e.value)
        assert sc.version == version
        _same(sc, reqs, before)

    refused(deltas[2], "out of sequence")  # 2 before 1
    tensors = deltas[1].with_suffix(".safetensors")
    tensors.write_bytes(data1[: len(data1) // 2])  # truncated
    refused(deltas[1], "truncated")
    flipped = bytearray(data1)
    flipped[-5] ^= 0xFF
    tensors.write_bytes(bytes(flipped))  # same size, one byte changed
    refused(deltas[1], "corrupt")
    tensors.unlink()
    refused(deltas[1], "missing")
    tensors.write_bytes(data1)
    text = deltas[1].read_text()
    deltas[1].write_text(text[: len(text) // 2])  # partial manifest
    refused(deltas[1], "not valid JSON")
    man = json.loads(text)
    deltas[1].write_text(json.dumps({**man, "base": "0" * 32}))
    refused(deltas[1], "wrong base")
    for field, value in (("seq", "1"), ("file", "../x.safetensors"), ("bytes", True)):
        deltas[1].write_text(json.dumps({**man, field: value}))
        refused(deltas[1], "not valid")
    deltas[1].write_text(text)
    assert sc.apply_delta(deltas[1])[0] == 1
    refused(deltas[1], "out of sequence")  # the same delta twice
    refused(export / "deltas" / "delta-999999.json", "no such delta manifest")


def test_bad_tensors_refused(run, tmp_path):
    """A delta whose checksums match but whose tensors do not fit the model."""
    from safetensors.torch import save

    reqs, export, sc = run
    path = dict(pending(export, 0))[1]
    man = json.loads(path.read_text())
    good = read_delta(path)
    key = "lookup.ebc.weight"  # width 8: a width-1 slice of it is the wrong width
    rows, vals = good.tables[key]
    cases = {
        "out of range": {f"rows/{key}": rows + 10**6, f"values/{key}": vals},
        "width": {f"rows/{key}": rows, f"values/{key}": vals[:, :1].contiguous()},
        "not an embedding table": {"rows/nope.weight": rows, "values/nope.weight": vals},
        "has no such dense weight": {"dense/nope.bias": torch.zeros(3)},
        "without values": {f"rows/{key}": rows},
    }
    for match, tensors in cases.items():
        data = save(tensors)
        path.with_suffix(".safetensors").write_bytes(data)
        import hashlib

        path.write_text(json.dumps({**man, "bytes": len(data),
                                    "sha256": hashlib.sha256(data).hexdigest()}))
        with pytest.raises(DeltaError, match=match):
            sc.apply_delta(path)
        assert sc.version[0] == 0


def test_follow_records_refusal_and_goes_on(run):
    reqs, export, sc = run
    deltas = dict(pending(export, 0))
    tensors = deltas[1].with_suffix(".safetensors")
    good = tensors.read_bytes()
    tensors.write_bytes(good[:100])
    before = [sc.score(*r) for r in reqs]
    f = sc.follow(export, poll_s=0.005)
    try:
        t0 = time.monotonic()
        while not f.errors and time.monotonic() - t0 < 10:
            time.sleep(0.005)
        time.sleep(0.05)
        assert len(f.errors) == 1 and "delta-000001" in f.errors[0][1]  # once, not per poll
        assert f.applied == 0
        _same(sc, reqs, before)
        tensors.write_bytes(good)  # repaired: applied, then the rest
        t0 = time.monotonic()
        while f.applied < len(deltas) and time.monotonic() - t0 < 10:
            time.sleep(0.005)
    finally:
        f.stop()
    assert f.applied == len(deltas) and sc.version[0] == len(deltas)


def test_swap_drops_the_delta_state(run, tmp_path, data):
    """After a swap to a checkpoint that is no delta base, deltas are refused (wrong base);
    back on the base, they apply from the first."""
    reqs, export, sc = run
    schema, _ = data
    other = save_checkpoint(tmp_path / "other", _model(schema, "deepfm_bn"), rng=False)
    deltas = dict(pending(export, 0))
    sc.apply_delta(deltas[1])
    sc.swap(other)
    with pytest.raises(DeltaError, match="not a delta base"):
        sc.apply_delta(deltas[2])
    sc.swap(export / "base")
    with pytest.raises(DeltaError, match="out of sequence"):
        sc.apply_delta(deltas[2])
    sc.apply_delta(deltas[1])
    sc.apply_delta(deltas[2])


def test_follow_bad_poll(run):
    _, export, sc = run
    with pytest.raises(ValueError, match="poll_s"):
        sc.follow(export, poll_s=0)


# ---------------------------------------------------------------------------- dynamic tables
def _dynamic_schema():
    from adrec_fast.data.schema import Schema

    return Schema([
        {"name": "user", "type": "categorical", "vocab": "dynamic"},
        {"name": "item", "type": "categorical", "vocab": "dynamic"},
        {"name": "site", "type": "categorical", "vocab": "build",
         "vocabulary": ["s0", "s1", "s2"]},
        {"name": "hist", "type": "multi_categorical", "sequence": True, "share_with": "item",
         "max_len": 3},
        {"name": "price", "type": "dense"},
    ])


def _dynamic_rows(n: int, seed: int = 0) -> pa.Table:
    """Items drift: row r draws from the 40 items after r // 20, so old items go cold."""
    rng = np.random.default_rng(seed)
    item = [f"i{r // 20 + int(rng.integers(0, 40))}" for r in range(n)]
    hist = ["|".join(f"i{r // 20 + int(j)}" for j in rng.integers(0, 40, int(rng.integers(0, 4))))
            for r in range(n)]
    return pa.table({"user": [f"u{int(u)}" for u in rng.integers(0, 30, n)], "item": item,
                     "site": [f"s{int(s)}" for s in rng.integers(0, 3, n)], "hist": hist,
                     "price": rng.normal(size=n), "label": rng.integers(0, 2, n)})


@pytest.mark.parametrize("name", ["deepfm", "din"])
def test_dynamic_tables_follow_and_evicted_key_scores_as_new(tmp_path, name):
    """Deltas of a model with dynamic tables (keys, rows, tombstones of evicted keys) bring a
    Scorer on the base to the training model at every export (within 1e-5), and a key evicted
    in training then scores exactly as a value never seen, where it scored otherwise before."""
    from safetensors.torch import load_file

    schema = _dynamic_schema()
    table = _dynamic_rows(1200)
    torch.manual_seed(0)
    model = build_model(name, schema, embedding_dim=4, hidden=(8,),
                        dynamic_tables={"capacity": 48, "eviction": "lfu",
                                        "evict_fraction": 0.25})
    probe = [f"i{j}" for j in range(0, 100)] + ["never-seen"]
    user = {"user": "u1", "site": "s0", "hist": "i3|i5", "price": 0.5}
    cands = {"item": probe}
    snaps = {}

    def on_export(man):
        snaps[man["seq"]] = _dyn_expected(model, schema, user, cands)

    ex = DeltaExporter(model, tmp_path, every_rows=300, on_export=on_export)
    ex.start(0)
    snaps[0] = _dyn_expected(model, schema, user, cands)
    train_online(model, [table], schema=schema, batch_size=100, exporter=ex,
                 trainer=Trainer(model, progress=False, lr=3e-3))
    with pytest.warns(UserWarning, match="dynamic tables"):
        sc = Scorer.load(tmp_path / "base")
    np.testing.assert_allclose(sc.score(user, cands), snaps[0], rtol=0, atol=1e-5)
    item_keys = schema.encode(pa.table({"item": probe, "user": ["u1"] * len(probe),
                                        "site": ["s0"] * len(probe), "hist": [""] * len(probe),
                                        "price": [0.0] * len(probe),
                                        "label": [0] * len(probe)}))
    keys = item_keys.indices[len(probe): 2 * len(probe)]  # the item bag's keys
    tombstoned, scores = set(), {}
    for seq, path in pending(tmp_path, 0):
        sc.apply_delta(path)
        got = sc.score(user, cands)
        np.testing.assert_allclose(got, snaps[seq], rtol=0, atol=1e-5)
        scores[seq] = got
        t = load_file(str(path.with_suffix(".safetensors")))
        tombstoned |= {k for n, v in t.items() if n.startswith("tombstones/") for k in v.tolist()}
    assert len(tombstoned) > 10
    tables = model.dynamic_embeddings()  # the embeddings' and the first-order weights'

    def held(k):  # how many of the tables hold key k now
        return sum(int(d.rows(torch.tensor([k]))[0]) > 0 for d in tables)

    gone = [i for i, k in enumerate(keys.tolist()[:-1]) if k in tombstoned and held(k) == 0]
    final = scores[max(scores)]
    new = final[-1]
    assert gone, "no evicted item among the probes"
    for i in gone:
        assert final[i] == new  # evicted: the unadmitted rows, as a value never seen
    # and the evicted ones scored otherwise while they held rows
    assert any(scores[s][i] != scores[s][-1] for i in gone for s in scores)
    live = [i for i, k in enumerate(keys.tolist()[:-1]) if held(k) == len(tables)]
    assert live and all(final[i] != new for i in live)


def _dyn_expected(model, schema, user, cands) -> np.ndarray:
    n = len(next(iter(cands.values())))
    cols = {**cands, **{k: [v] * n for k, v in user.items()}, "label": [0] * n}
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.sigmoid(model(schema.encode(pa.table(cols)))).numpy()
    finally:
        model.train(was)


# ---------------------------------------------------------------------------- rebasing
def test_follow_loads_each_new_base(data, tmp_path):
    """An exporter with rebase_every=2 writes a new base after every second delta and drops the
    deltas before it; a follower polled at each export loads the new base and goes on with its
    deltas, without an error: after every export the Scorer answers as the training model."""
    from adrec_fast.serving.deltas import Follower

    schema, table = data
    model = _model(schema, "deepfm_bn")
    reqs = _requests(table)
    export = tmp_path / "export"
    ex = DeltaExporter(model, export, every_rows=EVERY // 2, rebase_every=2)
    ex.start(0)
    sc = Scorer.load(export / "base")
    f = Follower(sc, export)
    bases, checked = [], []

    def on_export(man):  # in the training thread, before a rebase that follows this delta
        f.poll()
        bases.append(sc._version.delta_base)
        assert f.applied == man["seq"] and man["base"] == bases[-1]
        for r in reqs:
            np.testing.assert_allclose(sc.score(*r), _model_scores(model, schema, r),
                                       rtol=0, atol=1e-5)
        checked.append(man["seq"])

    ex.on_export = on_export
    trainer = Trainer(model, progress=False, batch_size=BS, lr=3e-3)
    train_online(model, [table], schema=schema, trainer=trainer, exporter=ex)
    n = N // (EVERY // 2)
    assert checked == [1, 2] * (n // 2) + [1] * (n % 2)
    assert f.errors == [] and f.rebases == (n - 1) // 2
    assert len(set(bases)) == (n - 1) // 2 + 1  # one base per pair of deltas
    assert ex.rebases == n // 2  # the last pair's base is written after the last delta
    left = sorted(p.name for p in (export / "deltas").iterdir())
    assert left == [] if n % 2 == 0 else left == ["delta-000001.json", "delta-000001.safetensors"]
    # a Scorer started now loads the newest base and its deltas: the final model
    fresh = Scorer.load(export / "base")
    for _, path in pending(export, 0):
        fresh.apply_delta(path)
    for r in reqs:
        np.testing.assert_allclose(fresh.score(*r), _model_scores(model, schema, r),
                                   rtol=0, atol=1e-5)


def test_delta_of_a_replaced_base_is_refused(data, tmp_path):
    """A Scorer on base A whose DIR/base has since become base B: A's deltas and B's are
    refused (the shadow would be B's model under A's served tables), the message says to swap;
    the served version stays."""
    import shutil

    schema, table = data
    model = _model(schema, "deepfm_bn")
    export = tmp_path / "export"
    ex = DeltaExporter(model, export, every_rows=EVERY, rebase_every=2)
    saved = tmp_path / "kept"
    saved.mkdir()

    def keep(man):  # A's first delta, before the rebase removes it
        if man["seq"] == 1 and not any(saved.iterdir()):
            for suffix in (".json", ".safetensors"):
                shutil.copy(export / "deltas" / f"delta-000001{suffix}", saved)

    ex.on_export = keep
    ex.start(0)
    sc = Scorer.load(export / "base")
    reqs = _requests(table)
    before = [sc.score(*r) for r in reqs]
    trainer = Trainer(model, progress=False, batch_size=BS, lr=3e-3)
    train_online(model, [table], schema=schema, trainer=trainer, exporter=ex)
    assert ex.rebases == 1 and sc._version.delta_base != json.loads(
        (export / "base" / "checkpoint.json").read_text())["delta_base"]["id"]
    with pytest.raises(DeltaError, match="was replaced since the Scorer loaded it"):
        sc.apply_delta(saved / "delta-000001.json")
    with pytest.raises(DeltaError, match="was replaced since the Scorer loaded it"):
        sc.apply_delta(dict(pending(export, 0))[1])
    _same(sc, reqs, before)


def test_follow_rebasing_exporter_while_requests_run(data, tmp_path):
    """Training rebases after every delta while a follower thread polls and two clients score:
    no request fails, the follower records no error, every answer is one exported model's in
    full, and the Scorer ends on the final model."""
    schema, table = data
    model = _model(schema, "deepfm_bn")
    reqs = _requests(table)
    snaps = []

    def on_export(man):
        snaps.append(save_checkpoint(tmp_path / f"snap{len(snaps)}", model, rng=False))
        time.sleep(0.03)

    export = tmp_path / "export"
    ex = DeltaExporter(model, export, every_rows=EVERY, rebase_every=1, on_export=on_export)
    ex.start(0)
    sc = _load(export / "base")
    first = [sc.score(*r) for r in reqs]
    follower = sc.follow(export, poll_s=0.005)
    clients = _Clients(sc, reqs)
    answers, errors = clients.answers, clients.errors
    try:
        trainer = Trainer(model, progress=False, batch_size=BS, lr=3e-3)
        train_online(model, [table], schema=schema, trainer=trainer, exporter=ex)
        final = [_model_scores(model, schema, r) for r in reqs]
        _wait(lambda: all(np.allclose(sc.score(*r), w, rtol=0, atol=1e-5)
                          for r, w in zip(reqs, final)))
    finally:
        clients.stop()
        follower.stop()
    assert errors == [] and follower.errors == []
    assert ex.rebases == len(snaps) == N // EVERY and follower.rebases >= 1
    for r, w in zip(reqs, final):
        np.testing.assert_allclose(sc.score(*r), w, rtol=0, atol=1e-5)
    want = [first] + [[_load(s).score(*r) for r in reqs] for s in snaps]
    for i, p in answers:
        assert any(np.allclose(p, w[i], rtol=0, atol=1e-5) for w in want), (
            f"request {i}: an answer of no exported model (half-applied?)")
