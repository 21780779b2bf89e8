# SPDX-License-Identifier: Apache-2.0
"""Model quality against FuxiCTR 2.3.10 with its BARS recipe: same split, same run, several seeds.

For every (data set, model, seed) it trains our model with the CLI's default recipe
(``adrec_fast.models.recipes``: what ``adrec-fast train DATA --model NAME`` uses) and the peer's
model, early-stops both on the same validation rows and scores both on the same test rows with
the same metric code (AUC, logloss, calibration = mean prediction / positive rate). The table
gives mean +- std over the seeds, and the validation AUC of the restored best epoch beside the
test metrics: a recipe is chosen by the validation rows, the test rows only report it.

Data sets:
  frappe     ../shared/data/frappe/valid.csv.gz split 80/10/10 as bench/frappe_models.py does
             (``split_frappe``), all ten columns categorical, vocabularies from the fit rows.
  synthetic  adrec_fast's generator (``SyntheticCTR``, no dense features) with its history
             column used as a multi-valued categorical field (a list of items sharing the item
             table, pooled by mean on both sides); 200k fit, 20k valid, 20k test rows.

The peer: FuxiCTR's model classes are not in its wheel, so LR, FM, DeepFM and DCNv2 are
assembled here from ``fuxictr.pytorch.layers`` (FeatureEmbedding, LogisticRegression,
FactorizationMachine, MLP_Block, CrossNetV2) on ``fuxictr.pytorch.models.rank_model.BaseModel``
as FuxiCTR's model zoo defines them, and trained by BaseModel.fit itself: its loss + embedding /
net regularizers over the whole tables, gradient clipping at 10, evaluation each epoch, lr x0.1
on plateau, early stop after 2 bad epochs, best weights restored. Only its data pipeline
(polars/ray preprocessing into parquet files) is replaced by in-memory tensors of the same
encoded ids, reshuffled each epoch like its training loader. The BARS Frappe_x1 recipe: embedding
dim 10, Adam 1e-3, batch 4096, up to 100 epochs; DeepFM / DCNv2: MLP 400-400-400, dropout 0.2,
batch norm, embedding L2 0.05; FM L2 5e-6; LR L2 1e-5; embeddings N(0, 1e-4), Xavier dense.

    python bench/quality.py                                  # frappe, lr,fm,deepfm,dcnv2, 3 seeds
    python bench/quality.py --data synthetic --models deepfm --seeds 1
    python bench/quality.py --models deepfm --peer none --set embedding_l2=0.01   # ours only
    python bench/quality.py --json out.json                  # also the per-run rows
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

PEER_MODELS = ("lr", "fm", "deepfm", "dcnv2")
#: the BARS Frappe_x1 settings of the peer (FuxiCTR units)
PEER = {
    "embedding_dim": 10, "lr": 1e-3, "batch_size": 4096, "epochs": 100, "patience": 2,
    "clip": 10.0, "hidden": [400, 400, 400], "dropout": 0.2, "batch_norm": True,
    "embedding_l2": {"lr": 1e-5, "fm": 5e-6, "deepfm": 0.05, "dcnv2": 0.05},
    "net_l2": {"lr": 1e-5, "fm": 5e-6, "deepfm": 0.0, "dcnv2": 0.0},
}
SYNTH_ROWS = (200_000, 20_000, 20_000)


# ---------------------------------------------------------------------------------- data
def load_frappe():
    """(schema, fit, valid, test) Batches of the Frappe 80/10/10 split."""
    import pyarrow as pa
    from frappe_models import FRAPPE, split_frappe

    from adrec_fast.data.schema import Schema

    if not FRAPPE.is_file():
        raise SystemExit(f"Frappe data not found at {FRAPPE}")
    table, (fit_rows, stop_rows, test_rows) = split_frappe()
    table = table.cast(pa.schema([(c, pa.string() if c != "label" else pa.int64())
                                  for c in table.column_names]))
    fields = [{"name": c, "type": "categorical"} for c in table.column_names if c != "label"]
    schema = Schema(fields, label="label").fit(table.take(pa.array(fit_rows)))
    parts = [schema.encode(table.take(pa.array(r))) for r in (fit_rows, stop_rows, test_rows)]
    return (schema, *parts)


def load_synthetic():
    """(schema, fit, valid, test): the generator's rows with ``hist`` as a pooled bag field."""
    from adrec_fast.data.batch import Batch
    from adrec_fast.data.schema import Schema
    from adrec_fast.data.synthetic import SyntheticCTR

    n_fit, n_valid, n_test = SYNTH_ROWS
    # no dense features: the peer's numeric fields would start from a Xavier-initialised
    # Linear(1, D) (std 1 for its LR), which its recipe does not recover from (test AUC < 0.5)
    gen = SyntheticCTR(n_rows=n_fit, seed=0, n_dense=0)
    d = gen.schema().to_dict()
    for f in d["fields"]:
        if f["name"] == "hist":
            f["sequence"] = False  # a multi-valued categorical field, mean-pooled
    schema = Schema.from_dict(d)
    parts = [schema.encode(t) for t in gen.chunks(n_fit + n_valid + n_test, chunk_rows=n_valid)]

    fit = Batch.concat(parts[: n_fit // n_valid])
    return schema, fit, parts[n_fit // n_valid], parts[n_fit // n_valid + 1]


DATASETS = {"frappe": load_frappe, "synthetic": load_synthetic}


# ---------------------------------------------------------------------------------- ours
def run_ours(name, schema, fit, valid, test, seed, overrides):
    import torch

    from adrec_fast.training import recipes
    from adrec_fast.training.loop import evaluate

    torch.manual_seed(seed)
    model, trainer, epochs = recipes.build(name, schema, seed=seed, progress=False, **overrides)
    t0 = time.perf_counter()
    r = trainer.fit(fit, valid, epochs=epochs)
    dt = time.perf_counter() - t0
    m = evaluate(model, test)
    # the best epoch's validation AUC: what a recipe is chosen by (the test rows only report)
    va = r.best["valid_auc"] if r.best else float("nan")
    return {"best_epoch": r.best_epoch, "epochs": len(r.history), "time_s": dt, "valid_auc": va,
            **m}


# ---------------------------------------------------------------------------------- peer
def _peer_inputs(schema, batch):
    """{field: LongTensor} of one Batch in FuxiCTR's layout: ids + 1 (0 is its padding id),
    categorical [B], multi-valued [B, L] zero-padded; numeric fields [B] float; label [B]."""
    import torch

    B, out = batch.batch_size, {}
    lengths = batch.bag_lengths()  # [T, B]
    for t, (fname, _) in enumerate(schema.sparse_fields()):
        lo = int(batch.offsets[t * B])
        hi = int(batch.offsets[(t + 1) * B])
        ids = batch.indices[lo:hi] + 1
        L = lengths[t]
        if int(L.max()) == 1 and int(L.min()) == 1:
            out[fname] = ids
        else:
            width = max(int(L.max()), 1)
            pad = torch.zeros(B, width, dtype=torch.long)
            pos = torch.arange(ids.numel()) - torch.repeat_interleave(
                torch.cumsum(L, 0) - L, L)
            pad[torch.repeat_interleave(torch.arange(B), L), pos] = ids
            out[fname] = pad
    for j, fname in enumerate(schema.dense_fields()):
        out[fname] = batch.dense[:, j].contiguous()
    out["label"] = batch.labels
    return out


class _PeerData:
    """FuxiCTR's data generator contract: ``len`` = batches per epoch, iteration yields dicts;
    the training copy reshuffles every epoch (its loader's shuffle=True), eval is in order."""

    def __init__(self, inputs, batch_size, shuffle, seed=0):
        self.x, self.bs, self.shuffle, self.seed, self.epoch = inputs, batch_size, shuffle, seed, 0
        self.n = int(inputs["label"].shape[0])

    def __len__(self):
        return math.ceil(self.n / self.bs)

    def __iter__(self):
        import torch

        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
            order = torch.randperm(self.n, generator=g)
            self.epoch += 1
        else:
            order = torch.arange(self.n)
        for s in range(0, self.n, self.bs):
            rows = order[s: s + self.bs]
            yield {k: v[rows] for k, v in self.x.items()}


def _feature_map(schema, fit_inputs):
    from collections import OrderedDict

    from fuxictr.features import FeatureMap

    fm = FeatureMap("quality", tempfile.gettempdir())
    tables = dict(schema.tables())
    feats = OrderedDict()
    first_of_table = {}
    for fname, t in schema.sparse_fields():
        owner = schema.owner(fname).name
        vocab = schema.cardinality(owner) + 1
        x = fit_inputs[fname]
        spec = {"source": "", "vocab_size": vocab, "padding_idx": 0}
        if x.dim() == 2:
            spec.update(type="sequence", feature_encoder="layers.MaskedAveragePooling()")
        else:
            spec["type"] = "categorical"
        if t in first_of_table:
            spec["share_embedding"] = first_of_table[t]
        else:
            first_of_table[t] = fname
        feats[fname] = spec
    del tables
    for fname in schema.dense_fields():
        feats[fname] = {"source": "", "type": "numeric"}
    fm.features = feats
    fm.labels = ["label"]
    fm.num_fields = len(feats)
    return fm


def _peer_model(name, feature_map, model_dir):
    import torch
    from fuxictr.pytorch.layers import (CrossNetV2, FactorizationMachine, FeatureEmbedding,
                                        LogisticRegression, MLP_Block)
    from fuxictr.pytorch.models.rank_model import BaseModel
    from torch import nn

    P = PEER
    D = P["embedding_dim"]
    in_dim = feature_map.num_fields * D

    class PeerModel(BaseModel):
        def __init__(self):
            super().__init__(feature_map, model_id=f"{name}", gpu=-1, monitor="AUC",
                             monitor_mode="max", early_stop_patience=P["patience"],
                             embedding_regularizer=P["embedding_l2"][name],
                             net_regularizer=P["net_l2"][name] or None,
                             reduce_lr_on_plateau=True, verbose=0, model_root=model_dir,
                             metrics=["AUC", "logloss"])
            if name == "lr":
                self.lr_layer = LogisticRegression(feature_map, use_bias=True)
            else:
                self.embedding_layer = FeatureEmbedding(feature_map, D)
            if name in ("fm", "deepfm"):
                self.fm = FactorizationMachine(feature_map)
            if name == "deepfm":
                self.mlp = MLP_Block(input_dim=in_dim, output_dim=1, hidden_units=P["hidden"],
                                     hidden_activations="ReLU", output_activation=None,
                                     dropout_rates=P["dropout"], batch_norm=P["batch_norm"])
            if name == "dcnv2":
                self.crossnet = CrossNetV2(in_dim, 3)
                self.parallel_dnn = MLP_Block(input_dim=in_dim, output_dim=None,
                                              hidden_units=P["hidden"],
                                              hidden_activations="ReLU", output_activation=None,
                                              dropout_rates=P["dropout"],
                                              batch_norm=P["batch_norm"])
                self.fc = nn.Linear(in_dim + P["hidden"][-1], 1)
            self.compile("adam", "binary_crossentropy", P["lr"])
            self.reset_parameters()
            self.model_to_device()

        def forward(self, inputs):
            X = self.get_inputs(inputs)
            if name == "lr":
                y = self.lr_layer(X)
            elif name in ("fm", "deepfm"):
                emb = self.embedding_layer(X)
                y = self.fm(X, emb)
                if name == "deepfm":
                    y = y + self.mlp(emb.flatten(start_dim=1))
            else:
                emb = self.embedding_layer(X, flatten_emb=True)
                y = self.fc(torch.cat([self.crossnet(emb), self.parallel_dnn(emb)], dim=-1))
            return {"y_pred": self.output_activation(y)}

    model = PeerModel()
    _init_unshared_copies(model, feature_map)
    return model


def _init_unshared_copies(model, feature_map):
    """FuxiCTR's FeatureEmbeddingDict skips the initializer for every feature that declares
    ``share_embedding``, also where it builds its own table (the width-1 tables of LR and of
    FM's linear part, built with use_sharing=False): those keep nn.Embedding's N(0, 1). On the
    synthetic set (the history shares the item table) that made the peer's LR diverge (test AUC
    0.46); such tables get the peer's own initializer here, N(0, 1e-4) with the padding row 0."""
    import torch
    from fuxictr.pytorch.layers import FeatureEmbeddingDict
    from torch import nn

    for mod in model.modules():
        if not isinstance(mod, FeatureEmbeddingDict):
            continue
        for f, layer in mod.embedding_layers.items():
            src = feature_map.features[f].get("share_embedding")
            if src and isinstance(layer, nn.Embedding) and layer is not mod.embedding_layers[src]:
                with torch.no_grad():
                    nn.init.normal_(layer.weight[1:], std=1e-4)


def run_peer(name, schema, fit, valid, test, seed):
    import logging

    import torch
    from fuxictr.pytorch.torch_utils import seed_everything

    from adrec_fast.training.loop import metrics_of

    logging.getLogger().setLevel(logging.WARNING)
    seed_everything(seed)
    fx, vx, tx = (_peer_inputs(schema, b) for b in (fit, valid, test))
    fmap = _feature_map(schema, fx)
    with tempfile.TemporaryDirectory() as tmp:
        fmap.dataset_id = "quality"
        Path(tmp, "quality").mkdir()
        model = _peer_model(name, fmap, tmp)
        t0 = time.perf_counter()
        model.fit(_PeerData(fx, PEER["batch_size"], True, seed), epochs=PEER["epochs"],
                  validation_data=_PeerData(vx, 16384, False), max_gradient_norm=PEER["clip"])
        dt = time.perf_counter() - t0
        p = model.predict(_PeerData(tx, 16384, False))
        pv = model.predict(_PeerData(vx, 16384, False))  # best weights restored by its fit
    y = test.labels.double().numpy()
    va = metrics_of(valid.labels.double().numpy(), pv)["auc"]
    return {"best_epoch": None, "epochs": model._epoch_index + 1, "time_s": dt, "valid_auc": va,
            **metrics_of(y, p)}


# ---------------------------------------------------------------------------------- table
def _ms(xs, digits=4):
    xs = np.asarray(xs, dtype=np.float64)
    sd = xs.std(ddof=1) if xs.size > 1 else 0.0
    return f"{xs.mean():.{digits}f} ± {sd:.{digits}f}"


def table(rows):
    out = ["| data | model | side | valid AUC | test AUC | test logloss | calibration | epochs "
           "| s/run |", "|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["data"], r["model"], r["side"]) for r in rows},
                  key=lambda k: (k[0], k[1], k[2] != "ours"))
    for d, m, s in keys:
        rs = [r for r in rows if (r["data"], r["model"], r["side"]) == (d, m, s)]
        out.append(f"| {d} | {m} | {s} | {_ms([r['valid_auc'] for r in rs])} | "
                   f"{_ms([r['auc'] for r in rs])} | "
                   f"{_ms([r['logloss'] for r in rs])} | {_ms([r['calibration'] for r in rs], 3)} "
                   f"| {np.mean([r['epochs'] for r in rs]):.1f} | "
                   f"{np.mean([r['time_s'] for r in rs]):.0f} |")
    diffs = []
    for d, m, s in keys:
        if s != "ours":
            continue
        o = [r for r in rows if (r["data"], r["model"], r["side"]) == (d, m, "ours")]
        p = [r for r in rows if (r["data"], r["model"], r["side"]) == (d, m, "fuxictr")]
        if o and p:
            da = np.mean([r["auc"] for r in o]) - np.mean([r["auc"] for r in p])
            dl = np.mean([r["logloss"] for r in o]) - np.mean([r["logloss"] for r in p])
            diffs.append(f"| {d} | {m} | {da:+.4f} | {dl:+.4f} | "
                         f"{'yes' if da >= -0.001 and dl <= 0.005 else 'no'} |")
    if diffs:
        out += ["", "| data | model | AUC ours − peer | logloss ours − peer | within target |",
                "|---|---|---|---|---|", *diffs]
    return "\n".join(out)


def _parse_set(items):
    out = {}
    for it in items:
        k, _, v = it.partition("=")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:  # a bare string such as touched
            out[k] = v
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="frappe", help="frappe,synthetic")
    ap.add_argument("--models", default=",".join(PEER_MODELS))
    ap.add_argument("--seeds", type=int, default=3, help="seeds 1..N (from --first-seed)")
    ap.add_argument("--first-seed", type=int, default=1,
                    help="the first seed: fresh seeds check a choice made on others")
    ap.add_argument("--peer", default="fuxictr", choices=["fuxictr", "none"])
    ap.add_argument("--ours", default="yes", choices=["yes", "no"])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe setting of ours (JSON value), e.g. embedding_l2=0.01")
    ap.add_argument("--peer-set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a key of the peer's recipe (PEER), e.g. batch_size=1024 (the "
                         "BARS range is 1024-4096): a strong peer gets its best setting too")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    for k, v in _parse_set(a.peer_set).items():
        if k not in PEER:
            raise SystemExit(f"--peer-set: unknown key {k!r}; keys: {sorted(PEER)}")
        PEER[k] = v
    import torch

    import adrec_fast  # noqa: F401

    torch.set_num_threads(a.threads)
    overrides = _parse_set(a.set)
    rows = []
    for dname in a.data.split(","):
        schema, fit, valid, test = DATASETS[dname]()
        print(f"{dname}: fit {fit.batch_size}, valid {valid.batch_size}, test "
              f"{test.batch_size} rows", flush=True)
        for name in a.models.split(","):
            for seed in range(a.first_seed, a.first_seed + a.seeds):
                sides = []
                if a.ours == "yes":
                    sides.append("ours")
                if a.peer == "fuxictr" and name in PEER_MODELS:
                    sides.append("fuxictr")
                for side in sides:
                    if side == "ours":
                        r = run_ours(name, schema, fit, valid, test, seed, overrides)
                    else:
                        r = run_peer(name, schema, fit, valid, test, seed)
                    r.update(data=dname, model=name, side=side, seed=seed)
                    rows.append(r)
                    print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v)
                                      for k, v in r.items()}), flush=True)
    print()
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps({"argv": sys.argv[1:], "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
