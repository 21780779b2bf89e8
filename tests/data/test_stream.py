# SPDX-License-Identifier: Apache-2.0
"""Streaming training data: the same rows as in memory, the split, the shuffle, the background
thread (errors, bounded queue, stopping) and the edge cases of files."""

import gzip
import threading
import time
from collections import Counter

import numpy as np
import pytest
import torch

from adrec_fast.data import DataError, Schema, SyntheticCTR
from adrec_fast.data.stream import (
    EncodedCache,
    EncodedRows,
    StreamedRows,
    background,
    load_training_data,
    n_valid_rows,
    should_stream,
    valid_mask,
)

SCHEMA = [
    {"name": "rid", "type": "dense", "transform": "none"},  # the row number: rows are unique
    {"name": "user", "type": "categorical"},
    {"name": "tags", "type": "multi_categorical", "max_len": 4},
    {"name": "x", "type": "dense", "transform": "standardize"},
]


def write_csv(path, n, bad_line=None, gz=False):
    """n rows: rid, user u0..u6, 0-3 tags, x; line ``bad_line`` (1-based, header = 1) gets the
    label 7."""
    rng = np.random.default_rng(n)
    lines = ["label,rid,user,tags,x"]
    for i in range(n):
        tags = "|".join(f"t{k}" for k in rng.integers(0, 9, rng.integers(0, 4)))
        label = 7 if bad_line == i + 2 else int(rng.random() < 0.3)
        lines.append(f"{label},{i},u{rng.integers(0, 7)},{tags},{rng.normal():.4f}")
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def row_keys(batches) -> list[tuple]:
    """One hashable key per row: label, dense values and the ids of every bag."""
    keys = []
    for b in batches:
        B, T = b.batch_size, b.num_bags
        off = b.offsets.tolist()
        ids = b.indices.tolist()
        for r in range(B):
            bags = tuple(tuple(ids[off[t * B + r]:off[t * B + r + 1]]) for t in range(T))
            keys.append((float(b.labels[r]), tuple(b.dense[r].tolist()), bags))
    return keys


def load(path, mode, **kw):
    schema = Schema(SCHEMA)
    kw.setdefault("chunk_rows", 700)
    return load_training_data(path, schema, stream=mode, **kw), schema


def rids(batches) -> list[int]:
    return [int(v) for b in batches for v in b.dense[:, 0].tolist()]


# ---------------------------------------------------------------- same rows as in memory
@pytest.mark.parametrize("gz", [False, True])
def test_streamed_epoch_has_the_in_memory_rows(tmp_path, gz):
    p = write_csv(tmp_path / ("d.csv.gz" if gz else "d.csv"), 5000, gz=gz)
    mem, s1 = load(p, "off")
    st, s2 = load(p, "on", buffer_chunks=2)
    assert not mem.streamed and st.streamed and s1 == s2
    assert isinstance(mem.train, EncodedRows) and isinstance(st.train, StreamedRows)
    for side in ("train", "valid"):
        a = row_keys(getattr(mem, side).batches(256, shuffle=True, seed=3, epoch=1))
        b = row_keys(getattr(st, side).batches(256, shuffle=True, seed=3, epoch=1))
        assert len(a) == len(getattr(st, side)) and Counter(a) == Counter(b)
    assert len(mem.train) + len(mem.valid) == 5000 and len(mem.valid) == 500


def test_in_memory_rows_equal_the_encoded_file(tmp_path):
    from adrec_fast.data import load_all

    p = write_csv(tmp_path / "d.csv", 1200)
    data, schema = load(p, "off", valid_fraction=0.25)
    whole = load_all(p, schema)
    got = row_keys([data.train.take(torch.arange(len(data.train))),
                    data.valid.take(torch.arange(len(data.valid)))])
    assert Counter(got) == Counter(row_keys([whole]))


# ---------------------------------------------------------------- the validation split
def test_valid_mask_is_exact_stable_and_chunk_independent():
    n, f = 50_000, 0.1
    whole = valid_mask(0, n, n, f, seed=5)
    assert whole.sum() == n_valid_rows(n, f) == 5000
    cuts = np.r_[0, np.sort(np.random.default_rng(0).choice(n, 30, replace=False)), n]
    pieces = np.concatenate([valid_mask(a, b - a, n, f, 5) for a, b in zip(cuts[:-1], cuts[1:])])
    assert np.array_equal(whole, pieces)
    assert np.array_equal(whole, valid_mask(0, n, n, f, seed=5))
    assert not np.array_equal(whole, valid_mask(0, n, n, f, seed=6))
    # every block of 4096 rows holds its share: no long runs without validation rows
    assert whole[:4096].sum() == round(4096 * f)
    assert valid_mask(0, 3000, 3000, 0.1, 0).sum() == 300


@pytest.mark.parametrize("mode", ["off", "on"])
def test_split_is_disjoint_and_the_same_in_both_paths(tmp_path, mode):
    p = write_csv(tmp_path / "d.csv", 3000)
    data, _ = load(p, mode, seed=11)
    train = rids(data.train.batches(512))
    valid = rids(data.valid.batches(512))
    assert not set(train) & set(valid) and sorted(train + valid) == list(range(3000))
    expect = np.flatnonzero(valid_mask(0, 3000, 3000, 0.1, 11)).tolist()
    assert sorted(valid) == expect


# ---------------------------------------------------------------- the shuffle
def test_shuffle_is_a_permutation_that_changes_by_epoch(tmp_path):
    p = write_csv(tmp_path / "d.csv", 4000)
    data, _ = load(p, "on", chunk_rows=300, buffer_chunks=3)
    train = data.train
    e0 = rids(train.batches(128, shuffle=True, seed=1, epoch=0))
    e1 = rids(train.batches(128, shuffle=True, seed=1, epoch=1))
    again = rids(train.batches(128, shuffle=True, seed=1, epoch=0))
    plain = rids(train.batches(128))
    assert sorted(e0) == sorted(e1) == sorted(plain) and len(set(e0)) == len(train)
    assert e0 == again and e0 != e1 and e0 != plain and plain == sorted(plain)
    sizes = [b.batch_size for b in train.batches(128, shuffle=True, seed=1, epoch=0)]
    assert all(s == 128 for s in sizes[:-1]) and 0 < sizes[-1] <= 128


# ---------------------------------------------------------------- the background thread
def test_worker_error_surfaces_with_file_and_line(tmp_path):
    p = write_csv(tmp_path / "bad.csv", 3000, bad_line=2345)
    for mode in ("on", "off"):
        with pytest.raises(DataError, match=r"bad\.csv, line 2345, field 'label'"):
            load(p, mode)


def test_background_reraises_and_stops():
    def gen():
        yield 1
        raise KeyError("boom")

    it = background(gen, maxsize=2)
    assert next(it) == 1
    with pytest.raises(KeyError, match="boom"):
        next(it)

    before = threading.active_count()
    it = background(lambda: iter(range(10**9)), maxsize=2)
    next(it)
    it.close()  # what an error or Ctrl-C in the consumer does
    deadline = time.time() + 5
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before


def test_background_queue_is_bounded():
    made = []

    def gen():
        for i in range(100):
            made.append(i)
            yield i

    it = background(gen, maxsize=3)
    next(it)
    time.sleep(0.5)
    # one handed over, three queued, one waiting to be queued
    assert len(made) <= 5
    assert list(it) == list(range(1, 100))


# ---------------------------------------------------------------- files
def test_short_file(tmp_path):
    p = write_csv(tmp_path / "short.csv", 12)
    data, _ = load(p, "on", valid_fraction=0.25)
    assert (len(data.train), len(data.valid)) == (9, 3)
    assert [b.batch_size for b in data.train.batches(1024, shuffle=True)] == [9]
    with pytest.raises(ValueError, match="cannot hold out 10% of 3 rows"):
        load(write_csv(tmp_path / "three.csv", 3), "on")


@pytest.mark.parametrize("mode", ["on", "off"])
def test_empty_file(tmp_path, mode):
    p = tmp_path / "empty.csv"
    p.write_text("label,rid,user,tags,x\n")
    schema = Schema(SCHEMA)
    schema.fit([{"rid": [0.0], "user": ["u"], "tags": ["a"], "x": [1.0]}])
    with pytest.raises(DataError, match=r"empty\.csv: no data rows"):
        load_training_data(p, schema, stream=mode)


@pytest.mark.parametrize("mode", ["on", "off"])
def test_skip_bad_rows_warns_once(tmp_path, mode):
    p = write_csv(tmp_path / "bad.csv", 2000, bad_line=1500)
    with pytest.warns(RuntimeWarning, match="skipped 1 bad rows") as caught:
        data, _ = load(p, mode, skip_bad_rows=True)
    assert sum("skipped" in str(w.message) for w in caught) == 1
    got = rids(data.train.batches(512)) + rids(data.valid.batches(512))
    assert sorted(got) == [i for i in range(2000) if i != 1498]


def test_separate_valid_file(tmp_path):
    tr, va = write_csv(tmp_path / "tr.csv", 900), write_csv(tmp_path / "va.csv", 200)
    for mode in ("on", "off"):
        data, _ = load(tr, mode, valid_path=va)
        assert (len(data.train), len(data.valid)) == (900, 200)
        assert sorted(rids(data.valid.batches(64))) == list(range(200))


def test_no_label_column(tmp_path):
    p = tmp_path / "nolabel.csv"
    p.write_text("rid,user,tags,x\n" + "".join(f"{i},u1,a,1.5\n" for i in range(50)))
    with pytest.raises(DataError, match="no label column 'label'"):
        load(p, "on")


# ---------------------------------------------------------------- compact rows and the cache
def test_cache_round_trip_with_sequences():
    gen = SyntheticCTR(n_rows=3000, seed=0, n_sparse=4, n_dense=2, max_cardinality=50,
                       n_users=30, n_items=40)
    schema = gen.schema()
    batch = next(gen.batches(3000, schema=schema))
    rows = EncodedRows.from_batch(batch, torch.int16)
    assert rows.ids.dtype == torch.int16 and rows.one_per_bag and rows.nbytes() < 3000 * 80
    cache = EncodedCache()
    cache.append(rows)
    cache.append(rows.select(np.arange(3000) % 3 == 0))
    back = cache.read(0).take(torch.arange(3000))
    for name in ("indices", "offsets", "dense", "labels"):
        assert torch.equal(getattr(back, name), getattr(batch, name)), name
    assert torch.equal(back.seq_indices["hist"], batch.seq_indices["hist"])
    assert torch.equal(back.seq_offsets["hist"], batch.seq_offsets["hist"])
    assert row_keys([cache.read(1).take(torch.arange(1000))]) == row_keys(
        [batch.take(torch.arange(0, 3000, 3))])
    assert cache.rows == 4000 and len(cache) == 2
    cache.close()


def test_stream_choice(tmp_path):
    p = write_csv(tmp_path / "d.csv", 100)
    assert should_stream([p], "on") and not should_stream([p], "off")
    assert not should_stream([p, None], "auto")
    with pytest.raises(ValueError, match="stream mode"):
        should_stream([p], "sometimes")


def test_compact_rows_give_the_batches_of_in_memory_training():
    """The demo holds its rows as EncodedRows: every epoch's batches equal InMemory's."""
    from adrec_fast.training.loop import InMemory

    gen = SyntheticCTR(n_rows=2500, seed=1, n_sparse=3, n_dense=2, max_cardinality=40,
                       n_users=20, n_items=30)
    batch = next(gen.batches(2500))
    compact = EncodedRows.from_batch(batch, torch.int16)
    for epoch in (0, 1):
        ours = list(compact.batches(600, shuffle=True, seed=4, epoch=epoch))
        ref = list(InMemory(batch).batches(600, shuffle=True, seed=4, epoch=epoch))
        assert len(ours) == len(ref) == 5
        for a, b in zip(ours, ref):
            for name in ("indices", "offsets", "dense", "labels", "vectors"):
                assert torch.equal(getattr(a, name), getattr(b, name)), name
            assert a.indices.dtype == torch.long
            assert torch.equal(a.seq_indices["hist"], b.seq_indices["hist"])
            assert torch.equal(a.seq_offsets["hist"], b.seq_offsets["hist"])
