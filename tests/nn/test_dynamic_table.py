# SPDX-License-Identifier: Apache-2.0
"""DynamicEmbedding and its native key -> row map: collisions, admission, TTL, LFU, growth,
reset on reuse, concurrent reads, bad input, equivalence with a static table, checkpoints."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from adrec_fast import _C
from adrec_fast.nn import EmbeddingBagCollection
from adrec_fast.nn.dynamic_table import UNADMITTED_ROW, DynamicEmbedding
from adrec_fast.optim import FusedRowwiseAdagrad, FusedSGD


def _keys(*v):
    return np.array(v, dtype=np.int64)


def _init(keys):
    """A deterministic row for every key: the same whichever row the key lands in."""
    k = keys.double().unsqueeze(1)
    return (torch.sin(k * 1e-3 + torch.arange(4.0)) * 0.1).float()


# ------------------------------------------------------------------ the map
@pytest.mark.slow
def test_zero_collisions_on_10m_keys():
    """10M distinct random keys get 10M distinct rows, each found again at its row."""
    n = 10_000_000
    rng = np.random.default_rng(7)
    keys = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, n, dtype=np.int64)
    s = np.sort(keys)
    assert (np.diff(s) != 0).all()  # distinct (a repeat has odds ~3e-6 at this seed: none)
    t = _C.DynamicTable(n)
    rows = np.empty(n, dtype=np.int64)
    for b in range(0, n, 1 << 20):
        r, fresh, fresh_keys = t.lookup(keys[b:b + (1 << 20)], 1)
        rows[b:b + r.size] = r
        assert np.array_equal(fresh_keys, keys[b:b + r.size])  # every key new, in order
    assert t.size == n
    assert rows.min() == 1 and rows.max() == n
    assert np.bincount(rows, minlength=n + 1)[1:].min() == 1  # no two keys share a row
    assert np.array_equal(t.find(keys), rows)
    t.check()


def test_edge_keys_and_clustered_keys_are_distinct():
    """0, -1, the int64 extremes, sequential ids and keys equal in their low 32 bits."""
    keys = np.concatenate([
        _keys(0, -1, np.iinfo(np.int64).min, np.iinfo(np.int64).max),
        np.arange(1, 5000, dtype=np.int64),
        np.arange(1, 5000, dtype=np.int64) << 32,
    ])
    keys = np.unique(keys)
    t = _C.DynamicTable(4)  # grows from 4 keys: rehashes on the way
    rows, _, _ = t.lookup(keys, 1)
    assert np.unique(rows).size == keys.size and rows.min() == 1
    assert np.array_equal(t.find(keys), rows)
    assert np.array_equal(t.lookup(keys, 2)[0], rows)  # hits keep their rows
    t.check()


def test_duplicates_in_a_batch_share_one_row():
    t = _C.DynamicTable(8)
    rows, fresh, fk = t.lookup(_keys(5, 9, 5, 5, 9), 1)
    assert rows.tolist() == [1, 2, 1, 1, 2]
    assert fresh.tolist() == [1, 2] and fk.tolist() == [5, 9]


# ------------------------------------------------------------------ admission
def test_admission_by_count():
    t = _C.DynamicTable(100, min_count=3, sketch_width=1 << 12)
    assert t.lookup(_keys(11), 1)[0].tolist() == [UNADMITTED_ROW]
    assert t.lookup(_keys(11, 12), 2)[0].tolist() == [UNADMITTED_ROW, UNADMITTED_ROW]
    assert t.find(_keys(11)).tolist() == [UNADMITTED_ROW]
    rows, fresh, fk = t.lookup(_keys(11, 12, 12, 11), 3)  # 11: 3rd sight; 12: 2nd, then 3rd
    assert rows.tolist() == [1, UNADMITTED_ROW, 2, 1]
    assert fk.tolist() == [11, 12]
    assert t.size == 2


def test_admission_by_probability_is_seeded():
    keys = np.arange(20_000, dtype=np.int64) * 7919
    admitted = []
    for seed in (3, 3, 4):
        t = _C.DynamicTable(keys.size, admit_prob=0.25, seed=seed)
        admitted.append(t.lookup(keys, 1)[0] != UNADMITTED_ROW)
    assert np.array_equal(admitted[0], admitted[1])  # same seed, same keys admitted
    assert not np.array_equal(admitted[0], admitted[2])
    frac = admitted[0].mean()
    assert abs(frac - 0.25) < 0.02, frac  # binomial sd 0.003
    # a key's coin depends on the seed, the key and the call, not on the keys beside it: a
    # table that sees only every third key (one shard of a table split by key) admits the same
    part = np.ascontiguousarray(keys[::3])
    t = _C.DynamicTable(keys.size, admit_prob=0.25, seed=3)
    assert np.array_equal(t.lookup(part, 1)[0] != UNADMITTED_ROW, admitted[0][::3])
    # a key that lost its coin may win it later
    t = _C.DynamicTable(8, admit_prob=0.5, seed=1)
    seen = [int(t.lookup(_keys(42), s)[0][0]) for s in range(1, 40)]
    assert seen[0] == UNADMITTED_ROW or seen.count(UNADMITTED_ROW) == 0
    assert seen[-1] != UNADMITTED_ROW and len(set(seen) - {UNADMITTED_ROW}) == 1


# ------------------------------------------------------------------ TTL, LFU, growth
def test_ttl_expiry_in_steps():
    t = _C.DynamicTable(8, ttl=2)
    a = int(t.lookup(_keys(100), 1)[0][0])
    t.lookup(_keys(200), 3)
    assert t.find(_keys(100)).tolist() == [a]  # unseen for 2 steps: still live
    t.lookup(_keys(200), 4)
    assert t.find(_keys(100)).tolist() == [UNADMITTED_ROW]  # unseen for 3 > ttl: expired
    rows, fresh, fk = t.lookup(_keys(100), 5)  # a new key again: a fresh row
    assert fk.tolist() == [100] and fresh.tolist() == rows.tolist()
    t.check()
    assert t.expire(100) == 2 and t.size == 0
    t.check()


def test_lfu_eviction_when_full():
    t = _C.DynamicTable(4, eviction="lfu")
    for step, keys in enumerate([[1, 2, 3, 4], [1, 3, 4], [1, 4], [4]], start=1):
        t.lookup(np.array(keys, dtype=np.int64), step)  # counts: 1:3, 2:1, 3:2, 4:4
    before = t.find(_keys(1, 2, 3, 4))
    rows, fresh, fk = t.lookup(_keys(5), 5)
    assert fresh.tolist() == [before[1]]  # key 2, the least used, gave its row
    assert t.find(_keys(2)).tolist() == [UNADMITTED_ROW]
    rows, fresh, _ = t.lookup(_keys(6), 6)  # now 5 (count 1, newest) and 3 (count 2)
    assert t.find(_keys(5)).tolist() == [UNADMITTED_ROW]
    assert t.find(_keys(1, 3, 4)).tolist() == before[[0, 2, 3]].tolist()
    assert t.size == 4
    t.check()


def test_age_order_eviction_when_full_and_keys_of_the_call_are_kept():
    t = _C.DynamicTable(3, eviction="ttl")
    t.lookup(_keys(1, 1, 1, 2), 1)
    t.lookup(_keys(3), 2)
    t.lookup(_keys(2), 3)
    r = t.find(_keys(1, 2, 3))
    t.record_evictions = True
    rows, fresh, _ = t.lookup(_keys(9), 4)
    assert fresh.tolist() == [r[0]]  # key 1, seen most but longest ago
    assert t.take_evicted().tolist() == [1]
    # a call with more new keys than rows: the surplus reads row 0, the call's keys stay
    rows, _, _ = t.lookup(_keys(20, 21, 22, 23), 5)
    assert rows[:3].tolist() != [0, 0, 0] and rows[3] == UNADMITTED_ROW
    assert t.overflow == 1
    t.check()


def test_growth_keeps_rows_and_values():
    emb = DynamicEmbedding(4, 4, optimizer=FusedSGD(lr=0.1), initializer=_init)
    first = torch.arange(1, 5) * 1000
    r0 = emb.rows(first, train=True)
    w0 = emb.weight[r0].clone()
    keys = torch.arange(1, 301) * 1000
    for b in range(0, 300, 50):
        emb.rows(keys[b:b + 50], train=True)
    assert emb.num_keys == 300 and emb.num_rows >= 301
    assert torch.equal(emb.rows(first), r0)
    assert torch.equal(emb.weight[r0], w0)
    rows = emb.rows(keys)
    assert rows.unique().numel() == 300 and int(rows.min()) >= 1
    torch.testing.assert_close(emb.weight[rows], _init(keys))
    emb.check()


def test_reuse_resets_row_and_optimizer_state():
    emb = DynamicEmbedding(4, 2, eviction="lfu", optimizer=FusedRowwiseAdagrad(lr=0.5),
                           initializer=_init)
    for _ in range(3):
        out = emb(torch.tensor([10, 20, 10]))
        out.sum().backward()
    r = emb.rows(torch.tensor([10, 20]))
    assert (emb.state[r] > 0).all()
    assert not torch.allclose(emb.weight[r], _init(torch.tensor([10, 20])))
    new = emb.rows(torch.tensor([30]), train=True)  # evicts 20 (fewer lookups)
    assert new.tolist() == [int(r[1])]
    assert emb.rows(torch.tensor([20])).tolist() == [UNADMITTED_ROW]
    torch.testing.assert_close(emb.weight[new], _init(torch.tensor([30])))
    assert emb.state[new].tolist() == [0.0]
    assert emb.state[r[0]] > 0  # the kept key keeps its state


def test_unadmitted_row_is_a_trained_row_of_the_table():
    emb = DynamicEmbedding(4, 8, min_count=5, optimizer=FusedSGD(lr=1.0))
    out = emb(torch.tensor([1, 2]))
    assert torch.equal(out, torch.zeros(2, 4))  # row 0 starts at zero
    out.sum().backward()
    assert torch.equal(emb.weight[UNADMITTED_ROW], torch.full((4,), -2.0))  # both grads landed


# ------------------------------------------------------------------ concurrency
@pytest.mark.parametrize("eviction", ["grow", "lfu"])
def test_lookups_while_training_inserts(eviction):
    """Readers see the stable keys at their rows, and only valid rows, while a trainer grows
    the table (rehashes, reallocates) or evicts (the stable keys, used by every call, have the
    most lookups and stay)."""
    emb = DynamicEmbedding(4, 64 if eviction == "grow" else 6000, ttl=1_000_000,
                           eviction=eviction, optimizer=FusedSGD(lr=0.01))
    stable = torch.arange(1, 65) * -3
    want = emb.rows(stable, train=True)
    emb.eval()
    stop = threading.Event()
    errors = []

    def trainer():
        try:
            g = torch.Generator().manual_seed(0)
            step = 2
            while not stop.is_set() and emb.num_keys < 400_000:
                k = torch.randint(1, 1 << 62, (4096,), generator=g)
                k[:64] = stable  # keep the stable keys alive
                emb.rows(k, now=step, train=True)
                step += 1
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    def reader():
        try:
            g = torch.Generator().manual_seed(1)
            while not stop.is_set():
                probe = torch.cat([stable, torch.randint(1, 1 << 62, (1000,), generator=g)])
                with torch.no_grad():
                    rows = emb.rows(probe)
                    out = emb(probe)  # reads the storage after the map
                assert torch.equal(rows[:64], want), "a stable key moved"
                assert int(rows.min()) >= 0 and int(rows.max()) < emb.num_rows
                assert out.shape == (probe.numel(), 4)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=trainer), threading.Thread(target=reader),
               threading.Thread(target=reader)]
    for th in threads:
        th.start()
    time.sleep(2.0)
    stop.set()
    for th in threads:
        th.join(timeout=60)
    assert not errors, errors
    assert emb.num_keys > 64
    assert torch.equal(emb.rows(stable), want)
    emb.check()


# ------------------------------------------------------------------ bad input
def test_bad_input_is_named():
    t = _C.DynamicTable(8)
    with pytest.raises(TypeError, match="keys must be a numpy int64 or uint64 array"):
        t.lookup(np.zeros(3, dtype=np.float64), 1)
    with pytest.raises(TypeError, match="keys must be a numpy int64"):
        t.find([1, 2])
    with pytest.raises(ValueError, match="keys must be contiguous"):
        t.find(np.arange(10, dtype=np.int64)[::2])
    with pytest.raises(ValueError, match="keys must be 1-D"):
        t.find(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="capacity must be > 0"):
        _C.DynamicTable(-1)
    with pytest.raises(ValueError, match="min_count must be in"):
        _C.DynamicTable(8, min_count=0)
    with pytest.raises(ValueError, match="evict_fraction must be in"):
        _C.DynamicTable(8, evict_fraction=0.0)
    emb = DynamicEmbedding(4, 8)
    with pytest.raises(TypeError, match="keys must be a CPU int64 tensor"):
        emb(torch.tensor([1, 2], dtype=torch.int32))
    with pytest.raises(TypeError, match="keys must be an int64 tensor"):
        emb([1, 2])
    with pytest.raises(ValueError, match="keys must be contiguous"):
        emb.rows(torch.arange(10)[::2])
    with pytest.raises(ValueError, match="capacity must be > 0"):
        DynamicEmbedding(4, -5)
    with pytest.raises(ValueError, match="eviction must be one of"):
        DynamicEmbedding(4, 8, eviction="lru")
    with pytest.raises(ValueError, match="ttl must be a positive int"):
        DynamicEmbedding(4, 8, ttl=0)
    with pytest.raises(ValueError, match="admit_prob must be in"):
        DynamicEmbedding(4, 8, admit_prob=1.5)
    with pytest.raises(TypeError, match="optimizer must be"):
        DynamicEmbedding(4, 8, optimizer=torch.optim.SGD)
    bad = DynamicEmbedding(4, 8, initializer=lambda k: torch.zeros(k.numel(), 3))
    with pytest.raises(ValueError, match="initializer"):
        bad.rows(torch.tensor([1]), train=True)


# ------------------------------------------------------------------ equals a static table
@pytest.mark.parametrize("opt", [FusedSGD(lr=0.3), FusedRowwiseAdagrad(lr=0.3, eps=1e-6)])
def test_training_equals_a_static_table(opt):
    """Without eviction a dynamic table trains exactly as a static one whose id for a key is
    1 + the rank of its first sighting (the row order the map gives): same forward, same
    updates, same optimizer state."""
    g = torch.Generator().manual_seed(5)
    vocab = torch.randint(-(1 << 62), 1 << 62, (30,), generator=g)
    B, L, D, steps = 8, 3, 4, 12
    batches = [(vocab[torch.randint(0, 30, (B * L,), generator=g)],
                torch.randint(0, 2, (B,), generator=g).float()) for _ in range(steps)]
    order = list(dict.fromkeys(torch.cat([k for k, _ in batches]).tolist()))  # first sightings
    ids = {k: i + 1 for i, k in enumerate(order)}
    dyn = DynamicEmbedding(D, 4, optimizer=opt, initializer=_init)  # grows from 4 keys
    static = EmbeddingBagCollection([len(order) + 1], D, optimizer=opt)
    with torch.no_grad():
        static.weight.zero_()
        static.weight[1:] = _init(torch.tensor(order))
    head_d, head_s = torch.nn.Linear(D, 1), torch.nn.Linear(D, 1)
    head_s.load_state_dict(head_d.state_dict())
    opt_d = torch.optim.SGD(head_d.parameters(), lr=0.1)
    opt_s = torch.optim.SGD(head_s.parameters(), lr=0.1)
    offsets = torch.arange(0, B * L + 1, L)
    for keys, y in batches:
        out_d = dyn(keys, offsets)
        out_s = static(torch.tensor([ids[k] for k in keys.tolist()]), offsets)
        torch.testing.assert_close(out_d, out_s)
        for head, out, o in ((head_d, out_d, opt_d), (head_s, out_s, opt_s)):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(head(out).squeeze(1), y)
            o.zero_grad()
            loss.backward()
            o.step()
    rows = dyn.rows(torch.tensor(order))
    assert rows.tolist() == list(range(1, len(order) + 1))
    torch.testing.assert_close(dyn.weight[rows], static.weight[rows])
    assert not torch.equal(static.weight[rows], _init(torch.tensor(order)))  # it trained
    if isinstance(opt, FusedRowwiseAdagrad):
        torch.testing.assert_close(dyn.state[rows], static.state[rows])


# ------------------------------------------------------------------ checkpoints
def test_checkpoint_round_trip(tmp_path):
    def batches(seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(6):
            yield torch.randint(0, 50, (64,), generator=g) * 1_000_003

    emb = DynamicEmbedding(8, 16, min_count=2, ttl=5, eviction="lfu",
                           optimizer=FusedRowwiseAdagrad(lr=0.2), seed=11)
    for k in batches(0):
        emb(k).square().sum().backward()
    path = tmp_path / "table.safetensors"
    emb.save(path)
    back = DynamicEmbedding.load(path)
    assert back.config() == emb.config()
    a, b = emb.state_tensors(), back.state_tensors()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    back.check()
    for k in batches(1):  # both continue alike: rows, evictions, inits, updates
        emb(k).square().sum().backward()
        back(k).square().sum().backward()
    a, b = emb.state_tensors(), back.state_tensors()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    with pytest.raises(ValueError, match="dim 4"):
        DynamicEmbedding(4, 16, min_count=2).load_state_tensors(a)


def test_checkpoint_of_a_grown_table(tmp_path):
    emb = DynamicEmbedding(4, 4, optimizer=FusedSGD(lr=0.1), seed=2)
    keys = torch.arange(1, 201) * 12345
    emb(keys).sum().backward()
    assert emb.num_keys == 200 and emb.num_rows > 5
    emb.save(tmp_path / "t.safetensors")
    back = DynamicEmbedding.load(tmp_path / "t.safetensors")
    back.check()
    assert torch.equal(back.rows(keys), emb.rows(keys))
    assert torch.equal(back.weight, emb.weight)
    with pytest.raises(ValueError, match="not a table"):
        from safetensors.torch import save_file
        save_file({"x": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
        DynamicEmbedding.load(tmp_path / "x.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((tmp_path / "t.safetensors").read_bytes()[:50])
    with pytest.raises(ValueError, match="cut.safetensors: not a readable safetensors file"):
        DynamicEmbedding.load(cut)


def test_growth_waits_for_a_pending_backward():
    """Growing moves the rows: with a backward still to run (its update bound to the old
    storage) it is refused by name; after that backward, or once the graph is dropped, it runs."""
    emb = DynamicEmbedding(4, 4, optimizer=FusedSGD(lr=1.0), initializer=_init)
    first = emb(torch.tensor([1, 2]))
    with pytest.raises(RuntimeError, match="backward of an earlier training forward"):
        emb(torch.arange(10, 20))
    first.sum().backward()
    torch.testing.assert_close(emb.weight[emb.rows(torch.tensor([1, 2]))],
                               _init(torch.tensor([1, 2])) - 1.0)  # the update was kept
    out = emb(torch.arange(10, 20))  # grows
    assert emb.num_rows > 5
    del out  # a graph dropped without backward does not hold growth back
    emb(torch.arange(100, 140)).sum().backward()
    assert emb.num_keys == 52


def test_eviction_spares_the_rows_of_a_pending_backward():
    """Two forwards before one backward: the second may not evict (and reset) a row the first
    one's update is bound to."""
    emb = DynamicEmbedding(4, 3, eviction="lfu", optimizer=FusedSGD(lr=1.0), initializer=_init)
    emb(torch.tensor([1, 1, 1, 2, 2, 2, 3])).sum().backward()  # counts: 1:3, 2:3, 3:1
    r1, r2, r3 = emb.rows(torch.tensor([1, 2, 3])).tolist()
    first = emb(torch.tensor([3]))  # pending; key 3 (count 2) is still the least used
    w3 = emb.weight[r3].clone()
    with torch.no_grad():
        second = emb.rows(torch.tensor([4]), train=True)  # LFU would take key 3's row
    assert second.tolist() == [r1]  # the next in LFU order (ties: older, then lower row)
    assert emb.rows(torch.tensor([1, 2])).tolist() == [UNADMITTED_ROW, r2]
    first.sum().backward()
    torch.testing.assert_close(emb.weight[r3], w3 - 1.0)  # key 3 got its update
    assert emb.rows(torch.tensor([3])).tolist() == [r3]
