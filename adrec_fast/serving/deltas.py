# SPDX-License-Identifier: Apache-2.0
"""Row deltas applied to a live Scorer: ``Scorer.apply_delta(path)`` and ``Scorer.follow(DIR)``.

Online training with an exporter (``training/export.py``, ``adrec-fast train --online
--export-every ROWS``) writes ``DIR/base`` (a checkpoint) and ``DIR/deltas/delta-<seq>.json``
manifests with their ``.safetensors`` rows; that module's doc gives the format. A Scorer loaded
from ``DIR/base`` applies them in sequence order:

* ``apply_delta(path)`` (a manifest, or its ``.safetensors``) reads and checks one delta and
  makes the next version from the current one: the served tables are copied (copy on write),
  the delta's rows written into the copy (quantized as the Scorer was loaded), the dense part
  re-laid out from the updated weights (batch norm folded again), and the packed handles built
  afresh; a model served by its torch forward (dynamic tables among them) is copied whole.
  Dynamic tables drop their tombstoned keys, then take the delta's keys with their rows and
  last-seen times (a new key takes a free row; the table grows when none is left), so a key
  evicted in training is unknown to the Scorer too and scores as a new key (the unadmitted
  row). Then the version is swapped in as ``swap`` does. A request reads the version once at
  its start, so it sees the model of one delta or of the next, never a mix.
* ``follow(DIR, poll_s=1.0)`` starts a daemon thread (a :class:`Follower`, returned; ``stop()``
  or a ``with`` block ends it) that every ``poll_s`` seconds applies, in order, every delta of
  ``DIR/deltas`` after the current one. When ``DIR/base`` has become another base (the exporter
  rebased, or a new run started) while the Scorer serves an earlier one, it first loads the new
  base (as ``swap``), whose deltas start again at 1; a previous base's deltas still on disk
  (the exporter removes them right after writing the new base) are passed over.

Refused (``DeltaError``, a ``ValueError`` whose message names the file), the Scorer keeping the
version it serves: a manifest that is not JSON or lacks a field; a tensor file missing, of
another size or sha256 than the manifest says (truncated, partial or corrupt); a delta for
another base (its ``base`` is not the id in the checkpoint.json of the base the Scorer loaded,
or the Scorer was loaded from a checkpoint that is no delta base, or the base directory it
was loaded from has been replaced since); out of sequence (``seq`` is
not the current one + 1); a table or dense tensor that the model lacks, of the wrong shape, or
rows out of range. ``follow`` records each refusal (``Follower.errors``: (file, message)),
logs it once (logger ``adrec_fast.serving.deltas``) and goes on polling; a refused file is
tried again only when it changes.

Cost: the Scorer keeps a second copy of the model (the ``shadow``: the base plus every delta
applied, from which the dense layers are laid out again), and each delta copies the served
tables once (memory bandwidth: about 0.1 s per GB), plus the rows and the packing of the dense
part. A ``swap`` to another checkpoint drops the shadow; the next delta must then belong to that
checkpoint.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import threading
from pathlib import Path

import numpy as np
import torch

from ..models.checkpoint import META_FILE, load_model, read_meta
from ..nn.dynamic_table import DynamicEmbedding
from .quantize import dequantize_rows, own_rows, quantize_rows

FORMAT = "adrec_fast.delta"
VERSION = 1
BASE_DIR = "base"
DELTAS_DIR = "deltas"
_log = logging.getLogger(__name__)


class DeltaError(ValueError):
    """A delta that cannot be applied; the message names its file."""


# ---------------------------------------------------------------------------- reading
class Delta:
    """One delta read and checked against its manifest: ``seq``, ``base``, ``position``,
    ``dense`` ({state key: tensor}, empty when the delta has none), ``tables`` ({state key:
    (rows [n] int64, values [n, D] float32)}), ``manifest`` (the dict), ``path`` (the
    manifest)."""

    def __init__(self, path: Path, manifest: dict, tensors: dict):
        self.path = path
        self.manifest = manifest
        self.seq = int(manifest["seq"])
        self.base = str(manifest["base"])
        self.position = int(manifest["position"])
        self.dense = {k[len("dense/"):]: v for k, v in tensors.items() if k.startswith("dense/")}
        self.tables = {}
        self.dynamic = {}  # state key -> {"keys", "values", "last_seen", "tombstones", ...}
        clocks = manifest.get("clock") or {}
        for k, v in tensors.items():
            if k.startswith("keys/"):
                key = k[len("keys/"):]
                got = {n: tensors.get(f"{n}/{key}") for n in _DYNAMIC}
                lacking = [f"{n}/{key}" for n, t in got.items() if t is None]
                if lacking or key not in clocks:
                    raise DeltaError(f"{path}: keys/{key} without "
                                     f"{lacking or ['its clock in the manifest']}")
                n, vals = v.shape[0] if v.dim() == 1 else -1, got["values"]
                if any(t.dtype != torch.int64 or t.dim() != 1 for t in
                       (v, got["last_seen"], got["tombstones"])) or got["last_seen"].shape[0] \
                        != n or vals.dim() != 2 or vals.shape[0] != n \
                        or tuple(got["unadmitted"].shape) != (1, vals.shape[1]):
                    raise DeltaError(f"{path}: the tensors of dynamic table {key} do not match "
                                     "(want keys, last_seen [n] int64, values [n, D], "
                                     "tombstones [k] int64, unadmitted [1, D])")
                got["values"] = vals.float()
                got["unadmitted"] = got["unadmitted"].float()
                got["keys"] = v
                got["clock"] = int(clocks[key])
                self.dynamic[key] = got
                continue
            if k.startswith("rows/"):
                key = k[len("rows/"):]
                vals = tensors.get(f"values/{key}")
                if vals is None:
                    raise DeltaError(f"{path}: rows/{key} without values/{key}")
                if v.dtype != torch.int64 or v.dim() != 1 or vals.dim() != 2 \
                        or vals.shape[0] != v.shape[0]:
                    raise DeltaError(f"{path}: rows/{key} {v.dtype} {list(v.shape)} and "
                                     f"values/{key} {list(vals.shape)} do not match (want "
                                     "int64 [n] and [n, D])")
                self.tables[key] = (v, vals.float())
            elif not k.startswith(("dense/",) + tuple(f"{n}/" for n in _DYNAMIC)):
                raise DeltaError(f"{path}: unknown tensor {k!r} in the delta")
        for k in tensors:
            if k.startswith("values/") and k[len("values/"):] not in self.tables \
                    and k[len("values/"):] not in self.dynamic:
                raise DeltaError(f"{path}: {k} without rows/{k[len('values/'):]}")


#: a dynamic table's tensors besides its keys
_DYNAMIC = ("values", "last_seen", "tombstones", "unadmitted")


def manifest_path(path) -> Path:
    """A delta's manifest from its manifest or its tensor file's path."""
    path = Path(path)
    return path.with_suffix(".json") if path.suffix == ".safetensors" else path


def read_manifest(path) -> dict:
    path = manifest_path(path)
    if not path.is_file():
        raise DeltaError(f"{path}: no such delta manifest")
    try:
        man = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DeltaError(f"{path}: the delta manifest is not valid JSON ({e}); partial or "
                         "corrupt file") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise DeltaError(f"{path}: not an adrec_fast delta manifest (format "
                         f"{man.get('format') if isinstance(man, dict) else None!r})")
    if man.get("version") != VERSION:
        raise DeltaError(f"{path}: delta version {man.get('version')!r} is not supported "
                         f"(expected {VERSION})")
    need = {"seq": int, "base": str, "position": int, "file": str, "bytes": int, "sha256": str}
    missing = [k for k in need if k not in man]
    if missing:
        raise DeltaError(f"{path}: the delta manifest lacks {missing}")
    bad = [k for k, t in need.items() if not isinstance(man[k], t) or isinstance(man[k], bool)]
    if bad or man["seq"] < 1 or Path(man["file"]).name != man["file"]:
        raise DeltaError(f"{path}: the delta manifest's {bad or ['seq', 'file']} are not valid "
                         "(seq >= 1, a file name beside the manifest)")
    return man


def read_delta(path) -> Delta:
    """Read and check one delta (see the module doc); raises ``DeltaError`` naming the file."""
    from safetensors.torch import load

    path = manifest_path(path)
    man = read_manifest(path)
    file = path.parent / str(man["file"])
    if not file.is_file():
        raise DeltaError(f"{file}: the tensor file of delta {man['seq']} is missing "
                         f"(manifest {path})")
    data = file.read_bytes()
    if len(data) != int(man["bytes"]):
        raise DeltaError(f"{file}: {len(data)} bytes, the manifest says {man['bytes']} "
                         "(truncated or partial file)")
    if hashlib.sha256(data).hexdigest() != man["sha256"]:
        raise DeltaError(f"{file}: contents differ from the manifest's sha256 (corrupt file)")
    try:
        tensors = load(data)
    except Exception as e:  # the checksum matched: a writer bug, still named
        raise DeltaError(f"{file}: not a safetensors file ({e})") from None
    return Delta(path, man, tensors)


def base_id(checkpoint_path) -> str | None:
    """The delta-base id of a checkpoint (``DIR/base`` of an exporter), None for another."""
    doc = read_meta(checkpoint_path)
    b = doc.get("delta_base")
    return str(b["id"]) if isinstance(b, dict) and "id" in b else None


def _manifest_base(path: Path) -> str | None:
    """The base id a delta manifest names; None when it cannot be read (``apply`` then names
    what is wrong with it)."""
    try:
        return str(json.loads(path.read_text(encoding="utf-8"))["base"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def pending(directory, after: int) -> list[tuple[int, Path]]:
    """(seq, manifest) of the deltas in ``directory/deltas`` (or ``directory`` itself when it
    holds them) with seq > ``after``, in order."""
    d = Path(directory)
    if (d / DELTAS_DIR).is_dir():
        d = d / DELTAS_DIR
    out = []
    for f in d.glob("delta-*.json"):
        try:
            seq = int(f.stem[len("delta-"):])
        except ValueError:
            continue
        if seq > after:
            out.append((seq, f))
    return sorted(out)


# ---------------------------------------------------------------------------- applying
class _Shadow:
    """The model behind a Scorer's current version (base + deltas applied): where a delta's
    rows and dense weights are written before the next version is laid out from it."""

    def __init__(self, version, path: Path):
        self.version = version  # the Scorer version this shadow equals
        self.base = getattr(version, "delta_base", None)
        self.seq = 0
        self.position = None
        model, _, _ = load_model(version.path)
        if self.base is not None and base_id(version.path) != self.base:
            # the shadow must be the model the version serves, or the deltas' rows would land
            # on one base and the rest of the served tables come from another
            raise DeltaError(f"{path}: {version.path} was replaced since the Scorer loaded it "
                             "(a new run or a rebase of the exporter): swap to it first "
                             "(Scorer.follow does)")
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self.state = dict(model.named_parameters()) | dict(model.named_buffers())
        self.persistent = set(model.state_dict().keys())

    def check(self, delta: Delta, path: Path) -> None:
        if self.base is None:
            raise DeltaError(f"{path}: the Scorer serves {self.version.path}, which is not a "
                             "delta base (load the exporter's DIR/base)")
        if delta.base != self.base:
            raise DeltaError(f"{path}: delta for base {delta.base}, but the Scorer serves base "
                             f"{self.base} ({self.version.path}); wrong base")
        if delta.seq != self.seq + 1:
            raise DeltaError(f"{path}: delta {delta.seq} out of sequence: the Scorer is at "
                             f"delta {self.seq} and needs delta {self.seq + 1}")
        for key, (rows, vals) in delta.tables.items():
            t = self.state.get(key)
            if t is None or t.dim() != 2 or key not in self.persistent or self.in_dynamic(key):
                raise DeltaError(f"{path}: rows for {key!r}, which is not an embedding table of "
                                 f"model {self.version.name!r}")
            if vals.shape[1] != t.shape[1]:
                raise DeltaError(f"{path}: values/{key} has width {vals.shape[1]}, the table "
                                 f"{t.shape[1]}")
            if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= t.shape[0]):
                raise DeltaError(f"{path}: rows/{key} out of range [0, {t.shape[0]})")
        for key, got in delta.dynamic.items():
            dyn = self.dynamic(key)
            if dyn is None:
                raise DeltaError(f"{path}: keys for {key!r}, which is not a dynamic table of "
                                 f"model {self.version.name!r}")
            if got["values"].shape[1] != dyn.embedding_dim:
                raise DeltaError(f"{path}: values/{key} has width {got['values'].shape[1]}, "
                                 f"the table {dyn.embedding_dim}")
        for key, v in delta.dense.items():
            t = self.state.get(key)
            if t is None or key not in self.persistent or self.in_dynamic(key):
                raise DeltaError(f"{path}: dense/{key}: model {self.version.name!r} has no "
                                 "such dense weight")
            if tuple(v.shape) != tuple(t.shape):
                raise DeltaError(f"{path}: dense/{key} is {list(v.shape)}, the model's "
                                 f"{list(t.shape)}")

    def in_dynamic(self, key: str) -> bool:
        """Whether the state entry ``key`` belongs to a DynamicEmbedding (whose tensors a
        delta changes only through keys)."""
        mod = key.rsplit(".", 1)[0] if "." in key else ""
        try:
            return isinstance(self.model.get_submodule(mod), DynamicEmbedding)
        except AttributeError:
            return False

    def dynamic(self, key: str):
        """The DynamicEmbedding whose weight is the state entry ``key``, or None."""
        if not key.endswith(".weight"):
            return None
        try:
            m = self.model.get_submodule(key[: -len(".weight")])
        except AttributeError:
            return None
        return m if isinstance(m, DynamicEmbedding) else None

    @torch.no_grad()
    def write(self, delta: Delta) -> None:
        for key, (rows, vals) in delta.tables.items():
            t = self.state[key]
            t.index_copy_(0, rows, vals.to(t.dtype))
        for key, got in delta.dynamic.items():
            _write_dynamic(self.dynamic(key), got)
        for key, v in delta.dense.items():
            self.state[key].copy_(v.to(self.state[key].dtype))
        self.seq = delta.seq
        self.position = delta.position


@torch.no_grad()
def _write_dynamic(dyn: DynamicEmbedding, got: dict) -> None:
    """A dynamic table's delta into ``dyn``: the tombstoned keys leave (their rows freed),
    then every key of the delta holds its row (a new key takes a free row; the table grows
    when none is left), with its values and last-seen time; row 0 and the clock as in
    training. The map is rebuilt from the edited state (``load_state_tensors``), so a key is
    found exactly when training finds it."""
    st = dyn.state_tensors()
    rk = st["row_keys"].numpy().copy()  # [U] the key of each used row
    cnt = st["row_counts"].numpy().copy()  # [U] > 0: the row holds its key
    last = st["row_last_seen"].numpy().copy()  # [U]
    free = st["free_rows"].numpy().tolist()
    scalars = st["scalars"].clone()
    weight, state = st["weight"], st["state"]

    def rows_of(keys: np.ndarray) -> np.ndarray:  # [n] row of each key, 0 when none holds it
        live = np.flatnonzero(cnt > 0)
        live = live[live > 0]
        order = np.argsort(rk[live], kind="stable")
        sk, sr = rk[live][order], live[order]
        pos = np.minimum(np.searchsorted(sk, keys), max(sk.size - 1, 0))
        hit = (sk[pos] == keys) if sk.size else np.zeros(keys.shape, bool)
        return np.where(hit, sr[pos] if sk.size else 0, 0)

    gone = rows_of(got["tombstones"].numpy())
    gone = np.unique(gone[gone > 0])
    cnt[gone] = 0
    rk[gone] = 0
    free.extend(gone.tolist())
    keys = got["keys"].numpy()
    rows = rows_of(keys)
    new = np.flatnonzero(rows == 0)
    U, R = rk.size, int(scalars[0])
    take = min(len(free), new.size)
    fresh = free[len(free) - take:][::-1]
    del free[len(free) - take:]
    extra = new.size - take  # rows beyond the used ones
    if U + extra > R:  # grow as training does: at least double
        R = max(2 * R, U + extra)
    fresh += list(range(U, U + extra))
    rows[new] = np.asarray(fresh, dtype=np.int64)
    if extra:
        rk = np.concatenate([rk, np.zeros(extra, np.int64)])
        cnt = np.concatenate([cnt, np.zeros(extra, np.int64)])
        last = np.concatenate([last, np.zeros(extra, np.int64)])
    rk[rows] = keys
    cnt[rows] = np.maximum(cnt[rows], 1)
    last[rows] = got["last_seen"].numpy()
    if R > weight.shape[0]:
        w = weight.new_zeros(R, weight.shape[1])
        w[: weight.shape[0]] = weight
        weight = w
        if state.numel():
            s = state.new_zeros(R)
            s[: state.shape[0]] = state
            state = s
    rt = torch.from_numpy(rows)
    weight.index_copy_(0, rt, got["values"].to(weight.dtype))
    weight[0] = got["unadmitted"][0]
    scalars[0] = R
    scalars[1] = got["clock"]
    dyn.load_state_tensors({**st, "weight": weight, "state": state,
                            "row_keys": torch.from_numpy(rk), "row_counts": torch.from_numpy(cnt),
                            "row_last_seen": torch.from_numpy(last),
                            "free_rows": torch.tensor(free, dtype=torch.long),
                            "scalars": scalars})


def _next_version(v, shadow: _Shadow, delta: Delta, serial: int):
    """The version after ``delta``: ``v`` copied on write (``shadow`` already holds the delta)."""
    new = copy.copy(v)
    new.serial = serial
    new.handles = {}
    new.delta_seq = delta.seq
    new.delta_position = delta.position
    model = shadow.model
    if v.spec is None:  # the torch forward: the version holds its own model
        m = copy.deepcopy(model)
        if v.quantize is not None:
            for ebc in m.embedding_collections():
                ebc.weight.copy_(dequantize_rows(*quantize_rows(ebc.weight, v.quantize)))
        new.model = m
        new.bind()
        return new
    spec = model.serving_spec()

    def view_of(t) -> str | None:  # the state entry the spec tensor t is a view of, if any
        for key, x in shadow.state.items():
            if x.data_ptr() == t.data_ptr() and x.numel() == t.numel():
                return key
        return None

    table_key = view_of(spec.table)
    lin_key = None if spec.lin is None else view_of(spec.lin)
    # the spec reads the delta's tables directly: only their rows change (an LR model's
    # table and first-order weights are one tensor); otherwise (a table the spec builds, such
    # as text rows after the tables) it is laid out whole again
    direct = (table_key is not None and (spec.lin is None or lin_key is not None)
              and set(delta.tables) <= {table_key, lin_key})
    if not direct:
        st, sb = quantize_rows(spec.table, v.quantize)
        new.weights = own_rows(st)
        new.scale_bias = sb
        new.lin = None if spec.lin is None else spec.lin.float().contiguous().clone()
    else:
        if table_key in delta.tables:
            rows = delta.tables[table_key][0]
            st, sb = quantize_rows(spec.table.index_select(0, rows), v.quantize)
            new.weights = own_rows(v.weights)
            new.weights.index_copy_(0, rows, st)
            if sb is not None:
                new.scale_bias = v.scale_bias.clone()
                new.scale_bias.index_copy_(0, rows, sb)
        if lin_key is not None and lin_key in delta.tables:
            rows = delta.tables[lin_key][0]
            new.lin = v.lin.clone()
            new.lin.index_copy_(0, rows, spec.lin.index_select(0, rows).float())
    if delta.dense:
        # the version's own copy of the dense layers: its handles are packed lazily, and the
        # shadow's weights change with the next delta
        s = copy.copy(spec)
        s.table = s.lin = None
        s = copy.deepcopy(s)
        s.lin = new.lin
    else:
        s = copy.copy(v.spec)
    s.table = new.weights  # packing reads only its width
    new.spec = s
    new.bind()
    return new


def apply(scorer, path):
    """``Scorer.apply_delta``: the next version of ``scorer`` after the delta at ``path``;
    the caller swaps it in. Raises ``DeltaError`` (the current version stays)."""
    path = manifest_path(path)
    v = scorer._version
    shadow = getattr(scorer, "_shadow", None)
    if shadow is None or shadow.version is not v:  # first delta, or a swap since the last
        if getattr(v, "delta_seq", 0):
            raise DeltaError(f"{path}: the Scorer lost its delta state in a failed apply; "
                             f"swap to {v.path} and follow again")
        shadow = _Shadow(v, path)
    delta = read_delta(path)
    shadow.check(delta, path)
    scorer._shadow = shadow
    # the shadow advances first; if building the version failed half-way it would be ahead of
    # the served version, so it is dropped then (the next delta rebuilds it from the base)
    try:
        shadow.write(delta)
        new = _next_version(v, shadow, delta, v.serial + 1)
    except BaseException:
        scorer._shadow = None
        raise
    shadow.version = new
    return new


# ---------------------------------------------------------------------------- following
class Follower:
    """The thread of ``Scorer.follow``: applies the deltas of ``directory`` in order every
    ``poll_s`` seconds. ``errors``: [(file, message)] of refused deltas; ``applied``: the seq of
    the last delta applied; ``poll()`` runs one round in the caller's thread."""

    def __init__(self, scorer, directory, poll_s: float = 1.0):
        if not float(poll_s) > 0:
            raise ValueError(f"follow: poll_s must be > 0 seconds, got {poll_s}")
        self.scorer = scorer
        self.directory = Path(directory)
        self.poll_s = float(poll_s)
        self.errors: list[tuple[str, str]] = []
        self.rebases = 0  # new bases of the directory loaded
        self._base_stamp: tuple | None = None  # DIR/base's manifest when last read
        self._refused: dict[Path, tuple] = {}  # file -> (mtime, size) when it was refused
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def applied(self) -> int:
        return getattr(self.scorer._version, "delta_seq", 0)

    def start(self) -> Follower:
        self._thread = threading.Thread(target=self._run, name="adrec-delta-follow",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> Follower:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception as e:  # never let the thread die: record and go on
                self._record(str(self.directory), f"{type(e).__name__}: {e}")
            self._stop.wait(self.poll_s)

    def _stamp(self, path: Path) -> tuple:
        man = path.with_suffix(".safetensors")
        return tuple((f.stat().st_mtime_ns, f.stat().st_size) if f.exists() else None
                     for f in (path, man))

    def _record(self, file: str, msg: str) -> None:
        self.errors.append((file, msg))
        _log.warning("delta refused: %s", msg)

    def _base_dir(self) -> Path:
        d = self.directory
        if d.name == DELTAS_DIR and not (d / DELTAS_DIR).is_dir():
            d = d.parent  # given DIR/deltas
        return d / BASE_DIR

    def _follow_base(self) -> bool:
        """When the Scorer serves an exporter base and ``DIR/base`` is now another one (the
        exporter rebased, or a new run started), load it (``Scorer.swap``): its deltas start
        again at 1. A base that cannot be read yet (being replaced) is tried at the next poll;
        one that fails to load is recorded once. Returns whether it swapped."""
        served = getattr(self.scorer._version, "delta_base", None)
        if served is None:
            return False
        base = self._base_dir()
        try:  # the manifest holds the schema (vocabularies): parsed only when the file changed
            st = (base / META_FILE).stat()
            stamp = (served, st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp == self._base_stamp:
                return False
            new = base_id(base)
        except (OSError, ValueError):  # absent or half-replaced: the next poll sees it whole
            return False
        self._base_stamp = stamp
        if new is None or new == served or self._refused.get(base) == new:
            return False
        try:
            self.scorer.swap(base)
        except Exception as e:  # the version stays
            self._refused[base] = new
            self._record(str(base), f"{base}: new base {new} could not be loaded: "
                         f"{type(e).__name__}: {e}")
            return False
        _log.info("following the new base %s of %s", new, base)
        self.rebases += 1
        return True

    def poll(self) -> int:
        """Load a new base of the directory when there is one, then apply every pending delta
        in order; returns how many deltas were applied."""
        n = 0
        with self._lock:
            self._follow_base()
            served = getattr(self.scorer._version, "delta_base", None)
            for seq, path in pending(self.directory, self.applied):
                if self._stop.is_set():
                    break
                if seq != self.applied + 1:  # a gap: wait for the missing one, say so once
                    gap = self.directory / f"delta-{self.applied + 1:06d}"
                    if gap not in self._refused:
                        self._refused[gap] = ()
                        self._record(str(path), f"{path}: delta {seq} out of sequence: "
                                     f"delta {self.applied + 1} is missing")
                    break
                stamp = self._stamp(path)
                if self._refused.get(path) == stamp:
                    break  # refused before and unchanged
                if served is not None and _manifest_base(path) not in (served, None):
                    break  # a previous base's delta that the exporter is about to remove
                try:
                    self.scorer.apply_delta(path)
                except Exception as e:  # the version stays; tried again once the file changes
                    self._refused[path] = stamp
                    self._record(str(path), str(e) if isinstance(e, DeltaError)
                                 else f"{path}: {type(e).__name__}: {e}")
                    break
                n += 1
        return n


__all__ = ["Delta", "DeltaError", "Follower", "apply", "base_id", "manifest_path", "pending",
           "read_delta", "read_manifest"]
