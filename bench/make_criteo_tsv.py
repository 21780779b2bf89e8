# SPDX-License-Identifier: Apache-2.0
"""Write a Criteo-format TSV (label, I1..I13, C1..C26; tab-separated, no header) drawn from a
known click model: ``adrec_fast.data.SyntheticCTR`` with 26 sparse and 13 dense fields.

Mapping: the 26 sparse fields become C1..C26 as 8-hex-digit tokens (a fixed per-field scramble
of the ids, as Criteo's hashed values look); the 13 dense fields become I1..I13 as integers
(the positive heavy-tailed "counts" rounded down, the Gaussian ones times 10, rounded); a missing
dense value is an empty field, as in Criteo. The click probability is the generator's true one
for the unrounded features. A JSON file beside the TSV records the rows, the click rate and the
oracle AUC (the AUC of the true probabilities).

    python bench/make_criteo_tsv.py /tmp/criteo_8m.tsv --rows 8000000
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def generator(seed: int):
    from adrec_fast.data.synthetic import SyntheticCTR

    # Criteo-like spread of cardinalities: a few fields with ~10 values, several with 1e4-1e5
    return SyntheticCTR(n_rows=0, seed=seed, n_sparse=26, n_dense=13, max_len=0,
                        max_cardinality=200_000, n_users=100_000, n_items=50_000)


def write(path: Path, rows: int, seed: int = 0, chunk_rows: int = 262_144) -> dict:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pcsv

    from adrec_fast.data.metrics import auc

    gen = generator(seed)
    # per field: id -> 8 hex digits, a bijection of the 32-bit ids (odd multiplier, salt)
    hex_of = []
    for f, card in enumerate(gen.cardinalities):
        k = np.arange(card, dtype=np.uint64)
        code = (k * np.uint64(2654435761) + np.uint64(f * 40503 + 1)) & np.uint64(0xFFFFFFFF)
        hex_of.append(pa.array([f"{int(c):08x}" for c in code]))
    names = ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
    opts = pcsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    probs, labels = [], []
    with open(path, "wb") as f:
        for table, p in gen.chunks(rows, chunk_rows=chunk_rows, with_probability=True):
            cols = [table.column("label")]
            for j, name in enumerate(gen.dense_names):
                x = table.column(name).to_numpy(zero_copy_only=False)
                v = np.floor(x) if gen._count_like[j] else np.round(10 * x)
                cols.append(pa.array(np.nan_to_num(v).astype(np.int64), mask=np.isnan(x)))
            for name, table_hex in zip(gen.sparse_names, hex_of):
                ids = pc.cast(table.column(name), pa.int64())
                cols.append(table_hex.take(ids))
            sink = pa.BufferOutputStream()
            pcsv.write_csv(pa.table(cols, names=names), sink, write_options=opts)
            f.write(sink.getvalue().to_pybytes())
            probs.append(p.astype(np.float32))
            labels.append(table.column("label").to_numpy().astype(np.int8))
    p, y = np.concatenate(probs), np.concatenate(labels)
    info = {"rows": int(rows), "seed": seed, "ctr": float(y.mean()),
            "oracle_auc": float(auc(y, p)), "bytes": path.stat().st_size}
    Path(str(path) + ".json").write_text(json.dumps(info, indent=1))
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", type=Path, help="output .tsv (keep it out of the repository: /tmp)")
    ap.add_argument("--rows", type=int, default=8_000_000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    t0 = time.perf_counter()
    info = write(a.path, a.rows, a.seed)
    print(json.dumps({**info, "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
