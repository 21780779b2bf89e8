# SPDX-License-Identifier: Apache-2.0
"""Synthetic Criteo-like click data with a known true click model (the embedded default data).

Fields: ``user`` and ``item`` plus ``c2..c{n_sparse-1}`` categorical fields with Zipf-distributed
ids and cardinalities spread log-uniformly over [10, max_cardinality]; ``hist``, the user's
behaviour history (a sequence of items sharing the item table, 0..max_len long, most recent
last); ``d0..d{n_dense-1}`` dense features (half heavy-tailed positive "counts", half roughly
Gaussian, 5% missing). True model, per row:

    logit = bias + sum_f w_f[id_f]                              first order, every sparse field
          + sum_{f<g<n_interacting} <v_f[id_f], v_g[id_g]>     FM pairs, rank ``latent_dim``
          + sum_j a_j * z_j                                     dense, z = the schema's transform
          + gamma * mean_h <u[item], u[hist_h]>                 target attention on the history
    label ~ Bernoulli(sigmoid(logit))

Items belong to ``n_clusters`` interest clusters; a user's history and (more weakly) the
candidate item are drawn from the user's cluster, and u[item] is the item's cluster centre plus
noise, so the history term rewards candidates close to what the user clicked before. Component
scales are fixed on a calibration sample (``SCALES``: first order 1.0, FM 0.6, dense 0.5,
attention 0.5 in logit standard deviations) and the bias is bisected to give ``target_ctr``;
the oracle AUC is near 0.8. Everything is a deterministic function of ``seed``: row i is the
same whatever ``n`` or chunk size is asked for (rows are made in fixed blocks of ``BLOCK_ROWS``).

The item's share of the logit (``item_effect``, default 0): by default the item is one of the
16 fields of the first-order and FM terms and the candidate of the history attention, so it
carries little of the signal. ``item_effect > 0`` adds a fifth component, the item term

    + item_effect * (e[cluster of item] + b[item]) / std      e, b ~ N(0, 1), own stream

an effect per interest cluster and the item's own bias, equal halves of its variance, scaled to
a logit standard deviation of ``item_effect`` (as ``SCALES``); at 1.0 it is about a third of
the logit's variance, as an ad's creative and category drive much of its click rate. The other
columns are drawn exactly as without it (only the labels and the bias change), and
``item_effect=0`` gives the default generator's output bit for bit. The item term does not
drift.

Drift mode (``drift=True``): the stream has a clock, ``stream_time(row) = row / period_rows``
periods ("days"; constant within a block of ``BLOCK_ROWS`` rows), and over ``drift_periods``
periods the world changes:

- ads are born and retire: item i is alive on [birth_i, birth_i + life_i), births spread
  uniformly over [-2, drift_periods), lifetimes uniform in [1, 3] periods; candidates and
  histories draw only alive items (Zipf popularity renormalised over them), so a model
  trained on the early stream has never seen the late stream's ads;
- click rates change: the first-order effect of every item and of the ad-side fields c2, c3
  oscillates, ``w(t) = w + DRIFT_AMPLITUDE * std(w) * sin(2 pi t / P_id + phi_id)`` with a period
  P_id in [1, 4] periods per id;
- user interests shift: every user moves to a new interest cluster every ``INTEREST_PERIODS``
  periods (a random offset per user); the candidate item, the history and an extra term
  ``<u[item], centre[cluster of the user now]>`` (half the attention component) follow it.

After ``drift_periods`` no ad is born and the interests stay put (the oscillation goes on).

Item text (``item_text=True``): every item gets a title, a ``title`` column and a ``text`` field
of the schema. The title is 2-4 words of a topic vocabulary tied to the item's interest cluster
(cluster c uses topic c mod 16), with probability 0.7 a word of the tercile of the item's
own click effect (``item_own_effect``: its first-order weight, plus its bias b of the item
term with ``item_effect``; premium words for the top third, bargain words for the bottom), and
the noise of real titles: a brand or a person's name, a year, filler words, punctuation and
mixed case. So the text shows the item's latent properties (its cluster, the tercile of its
own effect) to a model that never saw its id. The click model itself is the same with or
without titles. ``cold_items`` / ``cold_split`` hold a
fraction of the items out: the training rows keep none of them (nor in their histories).
The scales and bias are fitted on a calibration sample spread over the drift horizon, so the
CTR stays near ``target_ctr`` on average but moves with time; ``window_oracle_auc`` reports
the oracle AUC per window of rows. Non-drift generators are unchanged by all this.
"""

from __future__ import annotations

import numpy as np

from .metrics import auc
from .pipeline import batches_from_chunks
from .schema import Schema

BLOCK_ROWS = 8192
_CAL_ROWS = 32768
# drift mode: amplitude of the click-rate oscillation in standard deviations of the field's
# first-order effect; periods between two interest shifts of a user; the ad-side fields whose
# click rates drift
DRIFT_AMPLITUDE = 1.0
INTEREST_PERIODS = 2.0
_DRIFT_FIELDS = (1, 2, 3)

# item titles: one topic vocabulary per interest cluster, the words of the first-order terciles,
# and the noise of real titles
_TOPICS = (
    "running shoes sneakers trail marathon jogging athletic sport laces cushioned".split(),
    "kitchen knife pan skillet cookware nonstick chef cooking stainless".split(),
    "laptop notebook keyboard processor ssd gaming monitor usb charger".split(),
    "lipstick mascara skincare serum moisturizer makeup foundation beauty".split(),
    "novel paperback thriller mystery fantasy author hardcover bestselling".split(),
    "guitar piano drum amplifier strings keyboard music studio microphone".split(),
    "tent sleeping bag camping hiking backpack lantern outdoor trek".split(),
    "dog puppy leash collar kibble treats pet chew toy".split(),
    "garden seeds soil planter hose shovel lawn flowers compost".split(),
    "sofa armchair cushion lamp rug curtain bedroom furniture decor".split(),
    "phone smartphone case screen protector earbuds bluetooth wireless".split(),
    "baby stroller diaper crib pacifier infant toddler bottle".split(),
    "coffee espresso beans grinder roast mug brew barista".split(),
    "bicycle helmet cycling pedals saddle gears mountain bike".split(),
    "yoga mat fitness dumbbell protein workout gym resistance".split(),
    "watch bracelet necklace earrings ring jewelry silver gold".split(),
)
_QUALITY = (
    "clearance used generic refurbished budget basic".split(),  # bottom third of w[item]
    "premium official original deluxe professional award".split(),  # top third
)
_BRANDS = ("Acme", "Nordic", "Sakura", "Zenith", "Maria's", "O'Brien", "Kraft & Co", "J. Smith",
           "Müller", "Björk", "Dr. Lee", "Rossi")
_FILLER = ("new", "for", "with", "set", "pack of 2", "edition", "the", "and", "xl", "v2")
_PUNCT = (", ", " - ", " | ", ": ", "! ", " / ", " (", ") ")


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


class SyntheticCTR:
    """Deterministic synthetic CTR data; see the module docstring for the true model.

    ``n_rows`` is the default size of ``generate``/``batches``/``oracle_auc``.
    """

    # logit standard deviation of: first order, FM pairs, dense, history attention
    SCALES = (1.0, 0.6, 0.5, 0.5)

    def __init__(
        self,
        n_rows: int = 200_000,
        seed: int = 0,
        n_sparse: int = 16,
        n_dense: int = 6,
        max_len: int = 20,
        latent_dim: int = 4,
        n_clusters: int = 16,
        target_ctr: float = 0.25,
        max_cardinality: int = 1000,
        n_users: int = 1000,
        n_items: int = 1000,
        n_interacting: int = 6,
        drift: bool = False,
        period_rows: int = 100_000,
        drift_periods: int = 7,
        item_text: bool = False,
        item_effect: float = 0.0,
    ):
        if n_sparse < 2:
            raise ValueError("n_sparse counts user and item, so it must be >= 2")
        if not 0.0 < target_ctr < 1.0:
            raise ValueError("target_ctr must lie in (0, 1)")
        if not (np.isfinite(item_effect) and item_effect >= 0.0):
            raise ValueError(f"item_effect must be a finite number >= 0, got {item_effect}")
        if drift and int(period_rows) < 1:
            raise ValueError(f"period_rows must be >= 1, got {period_rows}")
        if drift and int(drift_periods) < 1:
            raise ValueError(f"drift_periods must be >= 1, got {drift_periods}")
        self.drift = bool(drift)
        self.period_rows = int(period_rows)
        self.drift_periods = int(drift_periods)
        self.n_rows = int(n_rows)
        self.seed = int(seed)
        self.n_sparse = n_sparse
        self.n_dense = n_dense
        self.max_len = max_len
        self.latent_dim = latent_dim
        self.n_clusters = n_clusters
        self.target_ctr = target_ctr
        self.item_text = bool(item_text)
        self.item_effect = float(item_effect)
        rng = np.random.default_rng([self.seed, 0])
        self.sparse_names = ["user", "item"] + [f"c{i}" for i in range(2, n_sparse)]
        other = np.exp(rng.uniform(np.log(10), np.log(max_cardinality), n_sparse - 2)).astype(
            np.int64
        )
        self.cardinalities = [n_users, n_items] + [int(c) for c in other]
        self.zipf = [1.1, 1.05] + list(rng.uniform(1.1, 1.5, n_sparse - 2))
        # the FM term couples the first n_interacting fields (user, item, c2, ...)
        self.n_interacting = min(n_interacting, n_sparse)
        # popularity of every id: Zipf over a random permutation, so raw ids do not sort by rank
        self._cdf = []
        for card, a in zip(self.cardinalities, self.zipf):
            p = (np.arange(1, card + 1, dtype=np.float64) ** -a)[rng.permutation(card)]
            self._cdf.append(np.cumsum(p / p.sum()))
        self.dense_names = [f"d{j}" for j in range(n_dense)]
        self._count_like = np.arange(n_dense) < (n_dense + 1) // 2
        self._dense_mu = rng.uniform(0.0, 3.0, n_dense)
        self._dense_sigma = rng.uniform(0.5, 1.5, n_dense)
        # true parameters
        # per-id effects shrink with the field's cardinality (card^-0.35): high-cardinality
        # fields spread their signal over many rarely seen ids, which no model can learn from a
        # few hundred thousand rows, so most of the signal sits where the data can reveal it
        self.w = [rng.normal(0.0, card**-0.35, card) for card in self.cardinalities]
        self.v = [rng.normal(0.0, card**-0.35, (card, latent_dim)) for card in self.cardinalities]
        self.a = rng.normal(0.0, 1.0, n_dense)
        self.item_cluster = rng.integers(0, n_clusters, n_items)
        self.user_cluster = rng.integers(0, n_clusters, n_users)
        centres = rng.normal(0.0, 1.0, (n_clusters, latent_dim))
        u = centres[self.item_cluster] + 0.5 * rng.normal(0.0, 1.0, (n_items, latent_dim))
        self.u = u / np.linalg.norm(u, axis=1, keepdims=True)
        # the popularity of items within each cluster, for history / candidate sampling
        p_item = np.diff(np.r_[0.0, self._cdf[1]])
        self._cluster_items = []
        for c in range(n_clusters):
            items = np.flatnonzero(self.item_cluster == c)
            if items.size == 0:
                items = np.array([0])
            pc = p_item[items]
            self._cluster_items.append((items, np.cumsum(pc / pc.sum())))
        # moments of the transformed dense features (the schema's standardisation), fixed once
        tz = self._dense_term(self._dense_raw(np.random.default_rng([self.seed, 3]), _CAL_ROWS))
        self._tz_mean = tz.mean(0)
        self._tz_std = np.maximum(tz.std(0), 1e-12)
        if self.drift:
            self._init_drift(np.random.default_rng([self.seed, 4]), centres)
        # the item term (item_effect > 0), from its own stream so the rest is unchanged: an
        # effect per interest cluster and one per item, equal halves of its variance
        self.item_term = None
        if self.item_effect > 0:
            r = np.random.default_rng([self.seed, 8])
            self.cluster_effect = r.normal(0.0, 1.0, n_clusters)
            self.item_bias = r.normal(0.0, 1.0, n_items)
            self.item_term = self.cluster_effect[self.item_cluster] + self.item_bias
        target_std = np.array(self.SCALES + ((self.item_effect,) if self.item_effect else ()))
        # component scales and the bias, fixed on a calibration sample from its own stream
        self._scale = np.ones(target_std.size)
        self.bias = 0.0
        if self.drift:
            # spread over the drift horizon: 8 instants, a quarter-period apart in phase
            cal = np.random.default_rng([self.seed, 1])
            times = (np.arange(8) + 0.5) * self.drift_periods / 8
            parts = np.concatenate([self._rows(cal, _CAL_ROWS // 8, t)[1] for t in times])
        else:
            parts = self._rows(np.random.default_rng([self.seed, 1]), _CAL_ROWS)[1]
        self._scale = target_std / np.maximum(parts.std(axis=0), 1e-12)
        logit = (parts * self._scale).sum(axis=1)
        lo, hi = -20.0, 20.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if _sigmoid(logit + mid).mean() < target_ctr:
                lo = mid
            else:
                hi = mid
        self.bias = 0.5 * (lo + hi)

    # ------------------------------------------------------------------ item text
    @property
    def titles(self) -> list[str]:
        """The title of every item (``item_text``; see the module docstring), drawn once from
        its own random stream."""
        if getattr(self, "_titles", None) is None:
            self._titles = self._make_titles(np.random.default_rng([self.seed, 6]))
        return self._titles

    def item_own_effect(self) -> np.ndarray:
        """[n_items] the logit every item adds by itself, whoever sees it: its first-order
        effect, plus its own bias of the item term with ``item_effect`` (in logit units; without
        it the raw first-order weights, which rank the same)."""
        if self.item_term is None:
            return self.w[1]
        return self._scale[0] * self.w[1] + self._scale[4] * self.item_bias

    def _make_titles(self, rng) -> list[str]:
        w = self.item_own_effect()
        lo, hi = np.quantile(w, [1 / 3, 2 / 3])
        out = []
        for i in range(self.cardinalities[1]):
            topic = _TOPICS[int(self.item_cluster[i]) % len(_TOPICS)]
            words = list(rng.choice(topic, size=int(rng.integers(2, 5)), replace=False))
            if rng.random() < 0.7 and (w[i] < lo or w[i] > hi):
                q = _QUALITY[int(w[i] > hi)]
                words.insert(int(rng.integers(0, len(words) + 1)), q[int(rng.integers(len(q)))])
            if rng.random() < 0.3:
                words.insert(int(rng.integers(0, len(words) + 1)),
                             _FILLER[int(rng.integers(len(_FILLER)))])
            if rng.random() < 0.5:
                words.insert(0, _BRANDS[int(rng.integers(len(_BRANDS)))])
            if rng.random() < 0.3:
                words.append(str(int(rng.integers(1990, 2026))))
            case = rng.random()
            if case < 0.4:
                words = [x[:1].upper() + x[1:] for x in words]
            elif case < 0.5:
                words = [x.upper() for x in words]
            text = words[0]
            for x in words[1:]:
                sep = _PUNCT[int(rng.integers(len(_PUNCT)))] if rng.random() < 0.25 else " "
                text += sep + x
            if rng.random() < 0.2:
                text += "!" if rng.random() < 0.5 else "..."
            out.append(text)
        return out

    def cold_items(self, fraction: float = 0.1) -> np.ndarray:
        """A fixed random ``fraction`` of the item ids (sorted int64), to hold out of training."""
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
        n = self.cardinalities[1]
        rng = np.random.default_rng([self.seed, 7])
        return np.sort(rng.choice(n, size=max(1, int(round(fraction * n))), replace=False))

    def cold_split(self, table, items):
        """Rows of ``table`` -> (warm, cold): cold rows have an item in ``items`` (ids), warm
        rows do not, and their histories lose those items too, so training on the warm rows
        never sees a cold item."""
        import pyarrow as pa
        import pyarrow.compute as pc

        cold_ids = pa.array([str(int(i)) for i in items], type=pa.string())
        is_cold = pc.is_in(table.column("item"), value_set=cold_ids)
        warm = table.filter(pc.invert(is_cold))
        cold = table.filter(is_cold)
        if "hist" in warm.column_names:
            h = warm.column("hist").combine_chunks()
            flat = pc.list_flatten(h)
            keep = pc.invert(pc.is_in(flat, value_set=cold_ids))
            parent = pc.list_parent_indices(h).to_numpy()
            lengths = np.bincount(parent[keep.to_numpy(zero_copy_only=False)],
                                  minlength=len(h))
            offsets = np.r_[0, np.cumsum(lengths)].astype(np.int32)
            h2 = pa.ListArray.from_arrays(pa.array(offsets), flat.filter(keep))
            warm = warm.set_column(warm.column_names.index("hist"), "hist", h2)
        return warm, cold

    # ------------------------------------------------------------------ drift
    def _init_drift(self, rng, centres: np.ndarray) -> None:
        """The drift schedule, drawn once from its own stream (see the module docstring)."""
        n_items, n_users = self.cardinalities[1], self.cardinalities[0]
        self.item_birth = rng.uniform(-2.0, self.drift_periods, n_items)  # [n_items] periods
        self.item_life = rng.uniform(1.0, 3.0, n_items)
        self._osc = {}  # field -> (amplitude [card], period [card], phase [card])
        for f in _DRIFT_FIELDS:
            if f < self.n_sparse:
                card = self.cardinalities[f]
                amp = DRIFT_AMPLITUDE * self.w[f].std() * np.ones(card)
                self._osc[f] = (amp, rng.uniform(1.0, 4.0, card), rng.uniform(0, 2 * np.pi, card))
        n_slots = int(np.ceil(self.drift_periods / INTEREST_PERIODS)) + 2
        # [n_users, n_slots]: slot 0 is the cluster drawn above, then a new one per slot
        later = rng.integers(0, self.n_clusters, (n_users, n_slots - 1))
        self._interest = np.concatenate([self.user_cluster[:, None], later], axis=1)
        self._interest_offset = rng.uniform(0.0, INTEREST_PERIODS, n_users)
        c = centres / np.linalg.norm(centres, axis=1, keepdims=True)
        self._centre = c  # [n_clusters, latent_dim], unit length

    def stream_time(self, row: int) -> float:
        """The drift clock of ``row`` in periods: the start of its block (0 without drift)."""
        if not self.drift:
            return 0.0
        return (int(row) // BLOCK_ROWS) * BLOCK_ROWS / self.period_rows

    def alive_items(self, t: float) -> np.ndarray:
        """Bool [n_items]: the items (ads) alive at stream time ``t`` (all without drift)."""
        if not self.drift:
            return np.ones(self.cardinalities[1], dtype=bool)
        born = self.item_birth <= min(t, self.drift_periods)
        alive = born & (t < self.item_birth + self.item_life)
        if not alive.any():  # never an empty catalogue: keep the most recently born item
            alive[np.argmax(np.where(born, self.item_birth, -np.inf))] = True
        return alive

    def user_clusters(self, t: float) -> np.ndarray:
        """[n_users] the interest cluster of every user at stream time ``t``."""
        if not self.drift:
            return self.user_cluster
        tt = min(t, self.drift_periods)
        slot = np.floor((tt + self._interest_offset) / INTEREST_PERIODS).astype(np.int64)
        slot = np.minimum(slot, self._interest.shape[1] - 1)
        return self._interest[np.arange(self._interest.shape[0]), slot]

    def _state(self, t: float):
        """(item cdf, per-cluster (items, cdf), user clusters, first-order deltas) at ``t``."""
        alive = self.alive_items(t)
        p_item = np.diff(np.r_[0.0, self._cdf[1]]) * alive
        item_cdf = np.cumsum(p_item / p_item.sum())
        alive_ids = np.flatnonzero(alive)
        cluster_items = []
        for c in range(self.n_clusters):
            items = np.flatnonzero(alive & (self.item_cluster == c))
            if items.size == 0:  # a cluster without a live ad falls back to every live ad
                items = alive_ids
            pc = p_item[items]
            cluster_items.append((items, np.cumsum(pc / pc.sum())))
        deltas = {f: amp * np.sin(2 * np.pi * t / per + ph)
                  for f, (amp, per, ph) in self._osc.items()}
        return item_cdf, cluster_items, self.user_clusters(t), deltas

    # ------------------------------------------------------------------ generation
    def _draw(self, rng, f: int, size, cdf=None) -> np.ndarray:
        cdf = self._cdf[f] if cdf is None else cdf
        return np.minimum(np.searchsorted(cdf, rng.random(size)), cdf.size - 1)

    def _from_clusters(self, rng, clusters: np.ndarray, cluster_items=None) -> np.ndarray:
        out = np.empty(clusters.shape, dtype=np.int64)
        r = rng.random(clusters.shape)
        cluster_items = self._cluster_items if cluster_items is None else cluster_items
        for c, (items, cdf) in enumerate(cluster_items):
            m = clusters == c
            if m.any():
                out[m] = items[np.minimum(np.searchsorted(cdf, r[m]), items.size - 1)]
        return out

    def _rows(self, rng, n: int, t: float | None = None):
        """n rows -> (raw dict of numpy columns, logit parts [n, 4 or 5] unscaled); ``t``: the
        stream time of a drifting generator (None: no drift)."""
        if t is None:
            item_cdf, cl_items, user_cluster, deltas = None, None, self.user_cluster, {}
        else:
            item_cdf, cl_items, user_cluster, deltas = self._state(t)
        ids = [self._draw(rng, f, n, item_cdf if f == 1 else None)
               for f in range(self.n_sparse)]  # each [n]
        user = ids[0]
        ucl = user_cluster[user]  # [n]
        # the candidate item comes from the user's cluster 35% of the time
        in_cluster = rng.random(n) < 0.35
        ids[1] = np.where(in_cluster, self._from_clusters(rng, ucl, cl_items), ids[1])
        # history: 0..max_len items, 80% from the user's cluster
        L = rng.integers(0, self.max_len + 1, n)  # [n]
        rows = np.repeat(np.arange(n), L)  # [nnz]
        hist = np.where(
            rng.random(rows.size) < 0.8,
            self._from_clusters(rng, ucl[rows], cl_items),
            self._draw(rng, 1, rows.size, item_cdf),
        )
        raw = self._dense_raw(rng, n)
        # true model parts (using exactly the information the features carry)
        first = sum(self.w[f][ids[f]] for f in range(self.n_sparse))
        for f, d in deltas.items():
            first = first + d[ids[f]]
        vs = np.stack([self.v[f][ids[f]] for f in range(self.n_interacting)], axis=1)  # [n, F', k]
        fm = 0.5 * ((vs.sum(1) ** 2) - (vs**2).sum(1)).sum(1)
        dense_term = ((self._dense_term(raw) - self._tz_mean) / self._tz_std) @ self.a
        sims = (self.u[ids[1]][rows] * self.u[hist]).sum(1)  # [nnz]
        att = np.bincount(rows, weights=sims, minlength=n) / np.maximum(L, 1)
        if t is not None:
            # the user's interest now, which the history reveals only in part
            att = 0.5 * att + 0.5 * (self.u[ids[1]] * self._centre[ucl]).sum(1)
        cols = [first, fm, dense_term, att]
        if self.item_term is not None:
            cols.append(self.item_term[ids[1]])
        parts = np.stack(cols, axis=1)
        raw_cols = {"ids": ids, "hist": hist, "hist_len": L, "dense": raw}
        return raw_cols, parts

    def _dense_raw(self, rng, n: int) -> np.ndarray:
        """[n, n_dense] log-normal positive "counts" and Gaussians; 5% missing (NaN)."""
        x = self._dense_mu + self._dense_sigma * rng.normal(0.0, 1.0, (n, self.n_dense))
        raw = np.where(self._count_like, np.exp(x), x)
        return np.where(rng.random((n, self.n_dense)) < 0.05, np.nan, raw)

    def _dense_term(self, raw: np.ndarray) -> np.ndarray:
        """The schema's pre-standardisation transform: fill 0, then log1p on the counts."""
        filled = np.where(np.isnan(raw), 0.0, raw)
        return np.where(self._count_like, np.log1p(np.abs(filled)), filled)

    def _block(self, b: int):
        """Block b of BLOCK_ROWS rows -> (pyarrow Table, true probability [rows])."""
        import pyarrow as pa

        rng = np.random.default_rng([self.seed, 2, b])
        t = self.stream_time(b * BLOCK_ROWS) if self.drift else None
        raw, parts = self._rows(rng, BLOCK_ROWS, t)
        p = _sigmoid(self.bias + (parts * self._scale).sum(axis=1))
        y = (rng.random(BLOCK_ROWS) < p).astype(np.int64)
        cols = {"label": pa.array(y)}
        for name, ids in zip(self.sparse_names, raw["ids"]):
            cols[name] = pa.array(ids).cast(pa.string())
        offsets = np.r_[0, np.cumsum(raw["hist_len"])].astype(np.int32)
        if self.item_text:
            cols["title"] = pa.array(self.titles, type=pa.string()).take(pa.array(raw["ids"][1]))
        cols["hist"] = pa.ListArray.from_arrays(
            pa.array(offsets), pa.array(raw["hist"]).cast(pa.string())
        )
        for j, name in enumerate(self.dense_names):
            x = raw["dense"][:, j]
            cols[name] = pa.array(x, mask=np.isnan(x))
        return pa.table(cols), p

    def chunks(self, n: int | None = None, chunk_rows: int = 65536, with_probability: bool = False):
        """Yield raw pyarrow Tables (the readers' form) for rows [0, n); with_probability=True
        yields (table, true_probability) pairs."""
        import pyarrow as pa

        n = self.n_rows if n is None else int(n)
        buf, pbuf, have, b = [], [], 0, 0
        produced = 0
        while produced < n:
            while have < min(chunk_rows, n - produced):
                t, p = self._block(b)
                b += 1
                buf.append(t)
                pbuf.append(p)
                have += t.num_rows
            take = min(chunk_rows, n - produced)
            table = pa.concat_tables(buf).combine_chunks()
            p = np.concatenate(pbuf)
            out, rest = table.slice(0, take), table.slice(take)
            buf, pbuf = ([rest], [p[take:]]) if rest.num_rows else ([], [])
            have = rest.num_rows
            produced += take
            yield (out, p[:take]) if with_probability else out

    def generate(self, n: int | None = None):
        """Rows [0, n) as one raw pyarrow Table (label, user, item, c*, hist, d*)."""
        import pyarrow as pa

        n = self.n_rows if n is None else int(n)
        return pa.concat_tables(list(self.chunks(n, chunk_rows=max(n, 1)))).combine_chunks()

    def true_probability(self, n: int | None = None) -> np.ndarray:
        """[n] float64 click probability of rows [0, n) under the true model."""
        n = self.n_rows if n is None else int(n)
        return np.concatenate(
            [p for _, p in self.chunks(n, chunk_rows=max(n, 1), with_probability=True)]
        )

    def oracle_auc(self, n: int | None = None, offset: int = 0) -> float:
        """AUC of the true probabilities on rows [offset, offset + n)."""
        n = self.n_rows if n is None else int(n)
        table, p = next(self.chunks(offset + n, chunk_rows=offset + n, with_probability=True))
        y = table.column("label").to_numpy()
        return auc(y[offset:], p[offset:])

    def window_oracle_auc(self, n: int | None = None, window_rows: int = 100_000,
                          offset: int = 0) -> list[dict]:
        """The oracle AUC per window of ``window_rows`` rows over rows [offset, offset + n),
        generated chunk by chunk: [{"start", "stop", "oracle_auc", "ctr", "time"}] (``time``:
        the stream time of the window's first row; the last window may be shorter)."""
        n = self.n_rows if n is None else int(n)
        if window_rows < 1:
            raise ValueError(f"window_rows must be >= 1, got {window_rows}")
        out, ys, ps, start = [], [], [], offset
        pos = 0
        for table, p in self.chunks(offset + n, chunk_rows=window_rows, with_probability=True):
            lo = max(offset - pos, 0)
            pos += table.num_rows
            if lo >= table.num_rows:
                continue
            ys.append(table.column("label").to_numpy()[lo:])
            ps.append(p[lo:])
            have = sum(y.size for y in ys)
            while have >= window_rows or (pos == offset + n and have):
                y, q = np.concatenate(ys), np.concatenate(ps)
                k = min(window_rows, y.size)
                out.append({"start": start, "stop": start + k, "oracle_auc": auc(y[:k], q[:k]),
                            "ctr": float(y[:k].mean()), "time": self.stream_time(start)})
                start += k
                ys, ps = ([y[k:]], [q[k:]]) if y.size > k else ([], [])
                have = y.size - k
        return out

    # ------------------------------------------------------------------ schema and batches
    def schema(self, fit: bool = True, text_encoder: str | None = None):
        """A ready Schema: full vocabularies (id k -> k + 1) and dense statistics fitted on a
        calibration sample, so any row of this generator encodes without a fitting pass."""
        fields = []
        for name, card in zip(self.sparse_names, self.cardinalities):
            spec = {"name": name, "type": "categorical"}
            if fit:
                spec["vocabulary"] = [str(k) for k in range(card)]
            fields.append(spec)
        fields.append(
            {
                "name": "hist",
                "type": "multi_categorical",
                "sequence": True,
                "share_with": "item",
                "max_len": self.max_len,
            }
        )
        for j, name in enumerate(self.dense_names):
            transform = "log1p_standardize" if self._count_like[j] else "standardize"
            fields.append({"name": name, "type": "dense", "transform": transform, "fill": 0.0})
        if self.item_text:
            fields.append({"name": "title", "type": "text", "encoder": text_encoder})
        schema = Schema(fields, label="label")
        if fit:
            for j, name in enumerate(self.dense_names):
                f = schema.field(name)
                f.mean, f.std = float(self._tz_mean[j]), float(self._tz_std[j])
        return schema

    def batches(
        self,
        batch_size: int,
        n: int | None = None,
        schema=None,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
    ):
        """Encoded Batches of rows [0, n) through ``schema`` (default ``self.schema()``)."""
        schema = schema if schema is not None else self.schema()
        yield from batches_from_chunks(
            self.chunks(n), schema, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last
        )

    def write_csv(self, path, n: int | None = None, chunk_rows: int = 65536) -> None:
        """Write rows [0, n) as CSV with a header (hist joined with '|'; gzip if path ends .gz)."""
        import gzip

        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.csv as pcsv

        path = str(path)
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "wb") as f:
            for i, t in enumerate(self.chunks(n, chunk_rows=chunk_rows)):
                hist = pc.binary_join(t.column("hist"), "|")
                t = t.set_column(t.column_names.index("hist"), "hist", hist)
                sink = pa.BufferOutputStream()
                pcsv.write_csv(t, sink, write_options=pcsv.WriteOptions(include_header=(i == 0)))
                f.write(sink.getvalue().to_pybytes())
