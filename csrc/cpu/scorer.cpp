// SPDX-License-Identifier: Apache-2.0
// The serving executor: one user against N candidates, every zoo model, one native call.
//
// A model is packed once per field split by adrec_fast/serving/scorer.py (pack): `meta` int64
// describes the slots, the split, the interaction and the layers; `blob` uint8 holds the
// blocked layer weights (common/linear_blocked.h) and a few float vectors. Per request:
//   stage A (once): the user-side embeddings, the user's history keys, DLRM's bottom MLP when
//     the dense input is shared, the first-layer input s of everything shared (shared fields,
//     shared dense values, DLRM dots of two shared fields) and its products u_j = W_sj s + b_j,
//     the user part of the scalar terms (first order, dense linear, FM sums, bias);
//   stage B (per candidate): the candidate rows, target attention over the history, the
//     varying first-layer input zv and, for the cross network, the full x0; then the tower:
//     cross layers, MLP, head (its first layers take u_j as their bias, plus, for a bag of a
//     small table, the candidate's row of that bag's precomputed products: it is gathered, not
//     multiplied, and its columns are not in zv), sigmoid.
// Every logit is  side + head(tower)  with side = bias + first order + dense linear + FM
// (+ the head's cross columns for a parallel DCN-v2).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <thread>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "common/cpu_isa.h"
#include "common/linear_blocked.h"
#include "cpu/scorer.h"

namespace adrec {
namespace {

constexpr const char* kOp = "serving_forward";
constexpr int64_t kMagic = 0x4144524543534532LL;  // "ADRECSE2"
// meta header (adrec_fast/serving/scorer.py writes the same fields)
enum : int64_t {
  H_MAGIC, H_PREC, H_KIND, H_D, H_T, H_S, H_KD, H_TU, H_TC, H_HB, H_NB, H_NF, H_LT, H_NCROSS,
  H_PS, H_PV, H_FLAGS, H_DENSE_W, H_CROSS_HEAD, H_BIAS, H_KS, H_KV, H_KX, H_DVAR, H_G, H_SIZE
};
enum : int64_t { kConcat = 0, kDot = 1 };
enum : int64_t { kActNone = 0, kActRelu = 1, kActCross = 2 };  // layer activation
enum : int64_t { kInZv = 0, kInPrev = 1, kInCross = 2 };        // tower layer input
constexpr int64_t kMaxLayers = 64;
// From this many rows per thread on, threads split the candidates (each runs the whole tower on
// its rows, no barrier); below it they split every layer's outputs (the weights, read once per
// request, are then spread over the cores' caches) with a barrier per layer.
constexpr int64_t kRowsPerThread = 16;
constexpr int64_t kTile = 32;  // candidate rows per tile in the row split
// Weight bytes up to which every thread computes a whole stage-A layer itself (in its own
// buffers) rather than its share of the outputs followed by a barrier.
constexpr int64_t kPrivateLayerBytes = 32 * 1024;
// Floats of candidate inputs (N rows of the first layer's varying columns and x0) up to which,
// in the layer split, every thread builds all of them rather than its share and a barrier.
constexpr int64_t kPrivateCandFloats = 2048;

inline int64_t pad16(int64_t k) { return (k + 15) / 16 * 16; }
inline int64_t pad32(int64_t k) { return (k + 31) / 32 * 32; }

// One embedding buffer [R, D] in one of three storages; row() writes a float32 copy.
struct RowReader {
  const float* f32 = nullptr;
  const at::Half* f16 = nullptr;
  const uint8_t* q8 = nullptr;
  const float* scale_bias = nullptr;  // [R, 2]: x = q * scale + bias (int8 row-wise)
  int64_t R = 0, D = 0;

  // Asks for row r's cache lines (and its scale and bias) ahead of row(r).
  inline void prefetch(int64_t r) const {
    const char* p = f32 ? reinterpret_cast<const char*>(f32 + r * D)
                    : f16 ? reinterpret_cast<const char*>(f16 + r * D)
                          : reinterpret_cast<const char*>(q8 + r * D);
    const int64_t bytes = D * (f32 ? 4 : f16 ? 2 : 1);
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
    _mm_prefetch(p + bytes - 1, _MM_HINT_T0);  // a row that straddles a line
    if (q8) _mm_prefetch(reinterpret_cast<const char*>(scale_bias + 2 * r), _MM_HINT_T0);
  }

  inline void row(int64_t r, float* out) const {
    if (f32) {
      std::memcpy(out, f32 + r * D, sizeof(float) * D);  // bit-exact with the fp32 lookup
    } else if (f16) {
      const at::Half* p = f16 + r * D;
      for (int64_t d = 0; d < D; ++d) out[d] = static_cast<float>(p[d]);
    } else {
      const uint8_t* p = q8 + r * D;
      const float s = scale_bias[2 * r], b = scale_bias[2 * r + 1];
      for (int64_t d = 0; d < D; ++d) out[d] = static_cast<float>(p[d]) * s + b;
    }
  }
};

RowReader reader_of(const void* weights, TableDtype dtype, int64_t R, int64_t D,
                    const float* scale_bias) {
  TORCH_CHECK_VALUE(R >= 0 && D >= 1, kOp, ": weights must be [R, D] with D >= 1");
  RowReader rr;
  rr.R = R, rr.D = D;
  switch (dtype) {
    case TableDtype::kFloat32: rr.f32 = static_cast<const float*>(weights); break;
    case TableDtype::kFloat16: rr.f16 = static_cast<const at::Half*>(weights); break;
    case TableDtype::kUInt8:
      TORCH_CHECK_VALUE(scale_bias != nullptr, kOp, ": uint8 weights need scale_bias [R, 2]");
      rr.q8 = static_cast<const uint8_t*>(weights);
      rr.scale_bias = scale_bias;
      break;
    default: TORCH_CHECK_TYPE(false, kOp, ": weights must be float32, float16 or uint8");
  }
  return rr;
}

struct Layer {
  int64_t Kp = 0, Ob = 0, act = 0, in = 0, ubias = -1;
  const void* w = nullptr;
  const float* b = nullptr;
};

// The parsed packed model; it points into meta and blob.
struct Spec {
  bool bf16 = false, hb = false, lin = false, fm = false;
  int64_t kind = 0, D = 0, T = 0, S = 0, F = 0, Kd = 0, Tu = 0, Tc = 0, nb = 0, nf = 0, lt = 0;
  int64_t ncross = 0, Ps = 0, Pv = 0, Ks = 0, Kv = 0, Kx = 0, dvar = 0, G = 0, maxw = 16;
  const int64_t *base, *card, *side, *dense_var, *sbase, *scard, *starget, *psi, *psj, *pvi,
      *pvj;
  const float* dense_w = nullptr;     // [Kd] or null
  const float* cross_head = nullptr;  // [Kx] or null
  float bias = 0.f;
  std::array<Layer, kMaxLayers> L;  // [0, nb) bottom, [nb, nb + nf) the u_j, then the tower
  std::vector<int64_t> uslot, cslot;  // user / candidate slots in order
  std::vector<int64_t> vfield;        // fields that vary per candidate (after the slots)
  std::vector<int64_t> zfield;        // those of vfield whose columns are in zv (not gathered)
  // gathered bags g < G: candidate column gcol[g]; gtab[j][g]: [card][Ob_j * 16] products of
  // first layer j with each row of the bag's table, added to that layer's output per candidate
  std::vector<int64_t> gcol;
  std::array<std::vector<const float*>, 2> gtab;
  std::vector<char> shared;           // [F] field is the same for every candidate
  std::vector<int64_t> gidx;          // dot: [Pv] where pair q is in the Gram rows, or -1
  std::vector<int64_t> all_fields;    // 0, 1, ..., F - 1
  int64_t field_of_slot(int64_t t) const { return t + (kind == kDot && hb ? 1 : 0); }
  const Layer& tower(int64_t l) const { return L[nb + nf + l]; }
};

Spec parse(const int64_t* h, int64_t n, const uint8_t* blob, int64_t bytes, int64_t R,
           int64_t D) {
  TORCH_CHECK_VALUE(n >= H_SIZE && h[H_MAGIC] == kMagic, kOp, ": meta is not a packed model");
  Spec P;
  TORCH_CHECK_VALUE(h[H_PREC] == 0 || h[H_PREC] == 1, kOp, ": bad precision ", h[H_PREC]);
  TORCH_CHECK_VALUE(h[H_KIND] == kConcat || h[H_KIND] == kDot, kOp, ": bad kind ", h[H_KIND]);
  TORCH_CHECK_VALUE((h[H_HB] == 0 || h[H_HB] == 1) && h[H_FLAGS] >= 0 && h[H_FLAGS] <= 3, kOp,
                    ": inconsistent meta header");
  P.bf16 = h[H_PREC] == 1, P.kind = h[H_KIND], P.D = h[H_D], P.T = h[H_T], P.S = h[H_S];
  P.Kd = h[H_KD], P.Tu = h[H_TU], P.Tc = h[H_TC], P.hb = h[H_HB] != 0, P.nb = h[H_NB];
  P.nf = h[H_NF], P.lt = h[H_LT], P.ncross = h[H_NCROSS], P.Ps = h[H_PS], P.Pv = h[H_PV];
  P.lin = (h[H_FLAGS] & 1) != 0, P.fm = (h[H_FLAGS] & 2) != 0;
  P.Ks = h[H_KS], P.Kv = h[H_KV], P.Kx = h[H_KX], P.dvar = h[H_DVAR], P.G = h[H_G];
  TORCH_CHECK_VALUE(P.D == D, kOp, ": packed for D = ", P.D, " but the table has D = ", D);
  // every count is bounded by the meta's length before any arithmetic on it (no overflow)
  for (int64_t k :
       {P.T, P.S, P.Kd, P.Tu, P.Tc, P.nb, P.nf, P.lt, P.ncross, P.Ps, P.Pv, P.dvar, P.G})
    TORCH_CHECK_VALUE(k >= 0 && k <= n, kOp, ": inconsistent meta header");
  TORCH_CHECK_VALUE(P.Tu + P.Tc == P.T && P.nb + P.nf + P.lt <= kMaxLayers && P.nf <= 2 &&
                        P.dvar <= P.Kd && P.ncross <= P.lt && P.Ks >= 0 && P.Kv >= 0 &&
                        P.Kx >= 0 && P.Ks <= bytes && P.Kv <= bytes && P.Kx <= bytes &&
                        (P.kind == kDot || (!P.hb && P.nb == 0 && P.Ps + P.Pv == 0)) &&
                        (P.kind == kConcat || (P.S == 0 && P.ncross == 0 && !P.fm)) &&
                        (P.hb == (P.nb > 0)) && (P.lt > 0 || P.nf == 0) && P.G <= P.Tc &&
                        (P.G == 0 || (P.kind == kConcat && P.nf > 0)),
                    kOp, ": inconsistent meta header");
  const int64_t need = H_SIZE + 3 * P.T + P.Kd + 3 * P.S + 2 * (P.Ps + P.Pv) + 4 * P.G +
                       7 * (P.nb + P.nf + P.lt);
  TORCH_CHECK_VALUE(n == need, kOp, ": meta has ", n, " entries, expected ", need);
  const int64_t* a = h + H_SIZE;
  P.base = a, P.card = a + P.T, P.side = a + 2 * P.T;
  a += 3 * P.T;
  P.dense_var = a;
  a += P.Kd;
  P.sbase = a, P.scard = a + P.S, P.starget = a + 2 * P.S;
  a += 3 * P.S;
  P.psi = a, P.psj = a + P.Ps, P.pvi = a + 2 * P.Ps, P.pvj = a + 2 * P.Ps + P.Pv;
  a += 2 * (P.Ps + P.Pv);
  const int64_t* gm = a;  // [G][4]: candidate column, table size, offsets of layers 0 and 1
  a += 4 * P.G;
  for (int64_t t = 0; t < P.T; ++t) {
    TORCH_CHECK_VALUE(P.base[t] >= 0 && P.base[t] <= R && P.card[t] >= 1 &&
                          P.card[t] <= R - P.base[t] && (P.side[t] == 0 || P.side[t] == 1),
                      kOp, ": bad slot ", t, " in meta");
    (P.side[t] ? P.cslot : P.uslot).push_back(t);
  }
  TORCH_CHECK_VALUE(static_cast<int64_t>(P.uslot.size()) == P.Tu, kOp, ": bad slot sides");
  int64_t dv = 0;
  for (int64_t j = 0; j < P.Kd; ++j) {
    TORCH_CHECK_VALUE(P.dense_var[j] == 0 || P.dense_var[j] == 1, kOp, ": bad dense flag");
    dv += P.dense_var[j];
  }
  TORCH_CHECK_VALUE(dv == P.dvar, kOp, ": dense flags do not match the header");
  for (int64_t s = 0; s < P.S; ++s)
    TORCH_CHECK_VALUE(P.sbase[s] >= 0 && P.sbase[s] <= R && P.scard[s] >= 1 &&
                          P.scard[s] <= R - P.sbase[s] && P.starget[s] >= 0 &&
                          P.starget[s] < P.T,
                      kOp, ": bad sequence ", s, " in meta");
  // fields and which of them vary per candidate
  P.F = P.kind == kDot ? P.T + (P.hb ? 1 : 0) : P.T + P.S;
  P.shared.assign(P.F, 1);
  if (P.kind == kDot && P.hb) P.shared[0] = P.dvar == 0;
  for (int64_t t = 0; t < P.T; ++t) P.shared[P.field_of_slot(t)] = P.side[t] == 0;
  for (int64_t s = 0; s < P.S; ++s) P.shared[P.T + s] = P.side[P.starget[s]] == 0;
  for (int64_t f = 0; f < P.F; ++f)
    if (!P.shared[f]) P.vfield.push_back(f);
  const int64_t nvf = static_cast<int64_t>(P.vfield.size());
  std::vector<char> gathered(P.F, 0);
  for (int64_t g = 0; g < P.G; ++g) {
    const int64_t c = gm[4 * g];
    TORCH_CHECK_VALUE(c >= 0 && c < P.Tc && (g == 0 || c > gm[4 * (g - 1)]) &&
                          gm[4 * g + 1] == P.card[P.cslot[c]],
                      kOp, ": bad gathered bag ", g, " in meta");
    P.gcol.push_back(c);
    gathered[P.field_of_slot(P.cslot[c])] = 1;
  }
  for (int64_t f : P.vfield)
    if (!gathered[f]) P.zfield.push_back(f);
  for (int64_t q = 0; q < P.Ps + P.Pv; ++q) {
    const int64_t i = q < P.Ps ? P.psi[q] : P.pvi[q - P.Ps], j = q < P.Ps ? P.psj[q] : P.pvj[q - P.Ps];
    TORCH_CHECK_VALUE(i >= 0 && i < P.F && j >= 0 && j < P.F &&
                          (q < P.Ps) == (P.shared[i] && P.shared[j]),
                      kOp, ": bad pair ", q, " in meta");
  }
  if (P.kind == kConcat) {
    TORCH_CHECK_VALUE(P.Ks == (P.F - nvf) * P.D + P.Kd - P.dvar &&
                          P.Kv == (nvf - P.G) * P.D + P.dvar &&
                          P.Kx == (P.ncross ? P.F * P.D + P.Kd : 0),
                      kOp, ": first-layer widths do not match the split");
  } else {
    const int64_t d = P.hb ? P.D : 0;
    TORCH_CHECK_VALUE(P.Ks == (P.dvar ? 0 : d) + P.Ps && P.Kv == (P.dvar ? d : 0) + P.Pv &&
                          P.Kx == 0,
                      kOp, ": first-layer widths do not match the split");
  }
  auto vec = [&](int64_t off, int64_t len, const char* what) -> const float* {
    if (off < 0) return nullptr;
    TORCH_CHECK_VALUE(off % 4 == 0 && off <= bytes && len <= (bytes - off) / 4, kOp, ": bad ",
                      what, " offset in meta");
    return reinterpret_cast<const float*>(blob + off);
  };
  P.dense_w = vec(h[H_DENSE_W], P.Kd, "dense_w");
  P.cross_head = vec(h[H_CROSS_HEAD], P.Kx, "cross_head");
  const float* bias = vec(h[H_BIAS], 1, "bias");
  TORCH_CHECK_VALUE(bias != nullptr, kOp, ": meta has no bias");
  P.bias = *bias;
  const int64_t per = P.bf16 ? 32 : 64;  // weight bytes per (padded input, output block)
  for (int64_t l = 0; l < P.nb + P.nf + P.lt; ++l, a += 7) {
    Layer& y = P.L[l];
    y.Kp = a[0], y.Ob = a[1], y.act = a[2], y.in = a[3], y.ubias = a[4];
    const int64_t wo = a[5], bo = a[6];
    TORCH_CHECK_VALUE(y.Kp >= 0 && y.Kp % 16 == 0 && y.Kp <= bytes && y.Ob >= 1 &&
                          y.Ob <= bytes / 64 && (y.Kp == 0 || y.Ob <= bytes / (y.Kp * per)) &&
                          wo >= 0 && bo >= 0 && wo <= bytes && bo <= bytes && wo % 64 == 0 &&
                          bo % 64 == 0 && y.Ob * y.Kp * per <= bytes - wo &&
                          y.Ob * 64 <= bytes - bo && y.act >= 0 && y.act <= 2 && y.in >= 0 &&
                          y.in <= 2 && y.ubias >= -1 && y.ubias < P.nf,
                      kOp, ": bad layer ", l, " in meta");
    y.w = blob + wo;
    y.b = reinterpret_cast<const float*>(blob + bo);
    P.maxw = std::max(P.maxw, std::max(y.Kp, y.Ob * 16));
  }
  // chain shapes
  const int64_t Kxp = pad16(P.Kx);
  for (int64_t l = 0; l < P.nb; ++l)
    TORCH_CHECK_VALUE(P.L[l].Kp == (l ? P.L[l - 1].Ob * 16 : pad16(P.Kd)) && P.L[l].act == kActRelu,
                      kOp, ": bottom layer ", l, " shape");
  if (P.hb) TORCH_CHECK_VALUE(P.L[P.nb - 1].Ob * 16 >= P.D, kOp, ": bottom output < D");
  for (int64_t j = 0; j < P.nf; ++j)
    TORCH_CHECK_VALUE(P.L[P.nb + j].Kp == pad16(P.Ks) && P.L[P.nb + j].act == kActNone, kOp,
                      ": shared layer ", j, " shape");
  std::vector<char> used(P.nf, 0);
  int64_t prev = -1;  // Ob * 16 of the last non-cross tower layer
  for (int64_t l = 0; l < P.lt; ++l) {
    const Layer& y = P.tower(l);
    const bool cross = l < P.ncross;
    TORCH_CHECK_VALUE(cross == (y.act == kActCross), kOp, ": tower layer ", l, " activation");
    bool ok = false;
    if (y.in == kInZv) {
      ok = y.Kp == pad16(P.Kv) && y.ubias >= 0 && !used[y.ubias] &&
           P.L[P.nb + y.ubias].Ob == y.Ob && (l == 0 || (l == P.ncross && P.ncross > 0));
      if (ok) used[y.ubias] = 1;
    } else if (y.in == kInPrev) {
      ok = y.ubias < 0 && prev >= 0 && y.Kp == prev;
    } else {
      ok = y.ubias < 0 && P.ncross > 0 && l > 0 && y.Kp == Kxp && (cross || l == P.ncross);
    }
    if (cross) ok = ok && y.Ob * 16 == Kxp;
    TORCH_CHECK_VALUE(ok, kOp, ": tower layer ", l, " shape or input");
    if (!cross) prev = y.Ob * 16;
  }
  for (int64_t j = 0; j < P.nf; ++j) TORCH_CHECK_VALUE(used[j], kOp, ": shared layer unused");
  for (int64_t g = 0; g < P.G; ++g)
    for (int64_t j = 0; j < 2; ++j) {
      const int64_t off = gm[4 * g + 2 + j], card = gm[4 * g + 1];
      if (j >= P.nf) {
        TORCH_CHECK_VALUE(off == -1, kOp, ": bad gathered bag ", g, " in meta");
        continue;
      }
      const int64_t row = P.L[P.nb + j].Ob * 64;  // bytes of one projected row
      TORCH_CHECK_VALUE(off >= 0 && off % 64 == 0 && off <= bytes && card <= (bytes - off) / row,
                        kOp, ": bad gathered bag ", g, " in meta");
      P.gtab[j].push_back(reinterpret_cast<const float*>(blob + off));
    }
  if (P.lt) {
    const Layer& hd = P.tower(P.lt - 1);
    TORCH_CHECK_VALUE(hd.Ob == 1 && hd.act == kActNone && P.lt > P.ncross, kOp,
                      ": the last layer must be the head (one output, no activation)");
  }
  TORCH_CHECK_VALUE(P.cross_head == nullptr || P.ncross > 0, kOp, ": cross_head without cross");
  P.all_fields.resize(P.F);
  for (int64_t f = 0; f < P.F; ++f) P.all_fields[f] = f;
  if (P.kind == kDot) {  // where pair q sits in the candidates' Gram rows
    const int64_t Fp = pad32(P.F);
    std::vector<int64_t> vrow(P.F, -1);
    for (int64_t r = nvf - 1; r >= 0; --r) vrow[P.vfield[r]] = r;
    P.gidx.resize(P.Pv);
    for (int64_t q = 0; q < P.Pv; ++q) {
      const int64_t i = P.pvi[q], j = P.pvj[q];
      P.gidx[q] = vrow[i] >= 0 ? vrow[i] * Fp + j : vrow[j] * Fp + i;
    }
  }
  return P;
}

// A 64-byte aligned bump allocator over a thread's reusable buffer.
struct Arena {
  std::vector<char> buf;
  size_t used = 0;
  void reserve(int64_t floats) {
    const size_t bytes = static_cast<size_t>(floats) * 4 + 64 * 48;
    if (buf.size() < bytes + 64) buf.assign(bytes + 64, 0);
    used = 0;
  }
  template <typename T>
  T* take(int64_t n) {
    const uintptr_t p0 = reinterpret_cast<uintptr_t>(buf.data()) + used;
    const uintptr_t p = (p0 + 63) & ~uintptr_t(63);
    used = p - reinterpret_cast<uintptr_t>(buf.data()) + ((sizeof(T) * n + 63) & ~size_t(63));
    return reinterpret_cast<T*>(p);
  }
};
// The buffers of a block of candidate rows: the inputs zv [rows][Kvp] and x0 [rows][Kxp], the
// cross state (ping, pong), the MLP activations (ping, pong) [rows][W], the cross product and
// the scalar terms.
struct RowBufs {
  float *zv, *x0, *xa, *xc, *h0, *h1, *yc, *side;
  void take(Arena& A, int64_t rows, int64_t Kvp, int64_t Kxp, int64_t W, bool cross) {
    const int64_t kx = cross ? rows * Kxp : 0;
    zv = A.take<float>(rows * Kvp);
    x0 = A.take<float>(kx), xa = A.take<float>(kx), xc = A.take<float>(kx);
    h0 = A.take<float>(rows * W), h1 = A.take<float>(rows * W);
    yc = A.take<float>(cross ? rows * W : 0);
    side = A.take<float>(rows);
  }
};
thread_local Arena t_request;  // the calling thread's per-request buffers (shared with its team)
thread_local Arena t_private;  // every team thread's own buffers

ADREC_INLINE float dot(const float* a, const float* b, int64_t D) {
  float acc = 0.f;
  for (int64_t k = 0; k < D; ++k) acc += a[k] * b[k];
  return acc;
}

// DLRM's pair dot products through a small Gram matrix: FT [D][Fp] holds the fields transposed
// (Fp = F padded to 32, zero columns), and G[r][j] = <field rowf[r], field j> for every j comes
// from D vector FMAs per 16 columns, instead of one horizontal dot product per pair.
ADREC_INLINE void transpose_fields(const float* fields, int64_t F, int64_t D, int64_t Fp,
                                   float* FT) {
  for (int64_t k = 0; k < D; ++k)
    for (int64_t f = 0; f < Fp; ++f) FT[k * Fp + f] = f < F ? fields[f * D + k] : 0.f;
}

// G [nr][Fp]; R rows x two 16-column blocks per pass (2R independent FMA chains).
template <int R>
ADREC_INLINE void gram_pass(const float* fields, const float* FT, int64_t D, int64_t Fp,
                            const int64_t* rowf, float* G) {
  const float* a[R];
  for (int r = 0; r < R; ++r) a[r] = fields + rowf[r] * D;
  for (int64_t j = 0; j < Fp; j += 32) {
    v16f c0[R], c1[R];
    for (int r = 0; r < R; ++r) c0[r] = c1[r] = v16f{};
    for (int64_t k = 0; k < D; ++k) {
      const v16f t0 = *reinterpret_cast<const v16f*>(FT + k * Fp + j);
      const v16f t1 = *reinterpret_cast<const v16f*>(FT + k * Fp + j + 16);
      for (int r = 0; r < R; ++r) {
        c0[r] += t0 * a[r][k];
        c1[r] += t1 * a[r][k];
      }
    }
    for (int r = 0; r < R; ++r) {
      *reinterpret_cast<v16f*>(G + r * Fp + j) = c0[r];
      *reinterpret_cast<v16f*>(G + r * Fp + j + 16) = c1[r];
    }
  }
}

ADREC_INLINE void gram_rows(const float* fields, const float* FT, int64_t D, int64_t Fp,
                            const int64_t* rowf, int64_t nr, float* G) {
  int64_t r = 0;
  for (; r + 4 <= nr; r += 4) gram_pass<4>(fields, FT, D, Fp, rowf + r, G + r * Fp);
  for (; r < nr; ++r) gram_pass<1>(fields, FT, D, Fp, rowf + r, G + r * Fp);
}

// softmax(K q / sqrt(D)) K over the L keys K [L][D] -> out [D] (zeros when L = 0), as
// adrec::attention_pooling
ADREC_INLINE void attend(const float* K, int64_t L, const float* q, int64_t D, float* sc,
                         float* out) {
  for (int64_t d = 0; d < D; ++d) out[d] = 0.f;
  if (L == 0) return;
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  float mx = -INFINITY;
  for (int64_t l = 0; l < L; ++l) mx = std::max(mx, sc[l] = dot(K + l * D, q, D) * scale);
  float z = 0.f;
  for (int64_t l = 0; l < L; ++l) z += sc[l] = std::exp(sc[l] - mx);
  for (int64_t l = 0; l < L; ++l) {
    const float p = sc[l] / z;
    for (int64_t d = 0; d < D; ++d) out[d] += p * K[l * D + d];
  }
}

// What every thread knows after stage A.
struct UserSide {
  float* fields;      // [F, D] shared fields; the varying ones are overwritten per candidate
  float* FT;          // dot: [D, Fp] fields transposed
  float* G;           // dot: [F or nvf, Fp] Gram rows
  const float* keys;  // [sum L, D] history rows
  const int64_t* seq_off;  // [S + 1]
  float* sc;          // [max L] attention scratch
  float* su;          // [D] FM: sum of the shared fields
  float qu = 0.f;     // FM: sum of their squared norms
  float side = 0.f;   // bias + shared first order + shared dense linear
};

// Candidate n's embedding rows (and first-order weights) into the cache: the rows of a request
// are random reads of tables far larger than the caches, each a miss to memory, and a candidate
// reads them kAhead candidates after asking (stage A asks for the first candidates' rows).
constexpr int64_t kAhead = 4;
ADREC_INLINE void prefetch_candidate(const Spec& P, const RowReader& rr, const float* lin,
                                     const int64_t* cid, int64_t n) {
  const int64_t* ids = cid + n * P.Tc;
  for (int64_t c = 0; c < P.Tc; ++c) {
    const int64_t r = P.base[P.cslot[c]] + ids[c];
    rr.prefetch(r);
    if (P.lin) _mm_prefetch(reinterpret_cast<const char*>(lin + r), _MM_HINT_T0);
  }
}

// The per-candidate inputs of rows [m0, m0 + M): zv [M][ldz] (the varying first-layer
// columns, zero padded), x0 [M][ldx] (cross network: [fields, dense], zero padded) and side [M].
// dbot [M][ldb]: DLRM's bottom MLP output per candidate when the dense input varies.
ADREC_INLINE void candidate_rows_body(const Spec& P, const RowReader& rr, const float* lin,
                                      const int64_t* cid, const float* dense, int64_t Nd,
                                      int64_t m0, int64_t M, UserSide& U, const float* dbot,
                                      int64_t ldb, float* zv, int64_t ldz, float* x0,
                                      int64_t ldx, float* side) {
  const int64_t D = P.D, Kd = P.Kd, Fp = pad32(P.F), nvf = static_cast<int64_t>(P.vfield.size());
  float* fields = U.fields;
  for (int64_t m = 0; m < std::min(kAhead, M); ++m) prefetch_candidate(P, rr, lin, cid, m0 + m);
  for (int64_t m = 0; m < M; ++m) {
    const int64_t n = m0 + m;
    const int64_t* ids = cid + n * P.Tc;
    if (m + kAhead < M) prefetch_candidate(P, rr, lin, cid, n + kAhead);
    const float* drow = dense + (Nd > 1 ? n : 0) * Kd;
    float s = U.side;
    for (int64_t c = 0; c < P.Tc; ++c) {
      const int64_t t = P.cslot[c], r = P.base[t] + ids[c];
      rr.row(r, fields + P.field_of_slot(t) * D);
      if (P.lin) s += lin[r];
    }
    if (P.dense_w)
      for (int64_t j = 0; j < Kd; ++j)
        if (P.dense_var[j]) s += P.dense_w[j] * drow[j];
    float* z = zv + m * ldz;
    int64_t k = 0;
    if (P.kind == kConcat) {
      for (int64_t i = 0; i < P.S; ++i)
        if (!P.shared[P.T + i])
          attend(U.keys + U.seq_off[i] * D, U.seq_off[i + 1] - U.seq_off[i],
                 fields + P.starget[i] * D, D, U.sc, fields + (P.T + i) * D);
      for (const int64_t f : P.zfield) {
        std::memcpy(z + k, fields + f * D, sizeof(float) * D);
        k += D;
      }
      for (int64_t j = 0; j < Kd; ++j)
        if (P.dense_var[j]) z[k++] = drow[j];
      if (P.fm) {
        float q = U.qu, ss = 0.f;
        for (int64_t d = 0; d < D; ++d) {
          float a = U.su[d];
          for (int64_t v = 0; v < nvf; ++v) a += fields[P.vfield[v] * D + d];
          ss += a * a;
        }
        for (int64_t v = 0; v < nvf; ++v) {
          const float* e = fields + P.vfield[v] * D;
          q += dot(e, e, D);
        }
        s += 0.5f * (ss - q);
      }
      if (x0) {
        float* x = x0 + m * ldx;
        std::memcpy(x, fields, sizeof(float) * P.F * D);
        std::memcpy(x + P.F * D, drow, sizeof(float) * Kd);
        for (int64_t i = P.Kx; i < ldx; ++i) x[i] = 0.f;
      }
    } else {
      if (P.hb && P.dvar) {  // field 0: this candidate's bottom MLP output
        std::memcpy(fields, dbot + m * ldb, sizeof(float) * D);
        std::memcpy(z, fields, sizeof(float) * D);
        k = D;
      }
      for (int64_t v = 0; v < nvf; ++v) {
        const int64_t f = P.vfield[v];
        for (int64_t d = 0; d < D; ++d) U.FT[d * Fp + f] = fields[f * D + d];
      }
      gram_rows(fields, U.FT, D, Fp, P.vfield.data(), nvf, U.G);
      for (int64_t q = 0; q < P.Pv; ++q) z[k + q] = U.G[P.gidx[q]];
      k += P.Pv;
    }
    for (; k < ldz; ++k) z[k] = 0.f;
    side[m] = s;
  }
}

void candidate_rows(const Spec& P, const RowReader& rr, const float* lin, const int64_t* cid,
                    const float* dense, int64_t Nd, int64_t m0, int64_t M, UserSide& U,
                    const float* dbot, int64_t ldb, float* zv, int64_t ldz, float* x0,
                    int64_t ldx, float* side) {
  isa_dispatch([&](auto) ADREC_LAMBDA_INLINE {
    candidate_rows_body(P, rr, lin, cid, dense, Nd, m0, M, U, dbot, ldb, zv, ldz, x0, ldx, side);
  });
}

// dot: the shared pairs of stage A into s[k...], through the Gram matrix of every field
void shared_pairs(const Spec& P, UserSide& U, float* s) {
  isa_dispatch([&](auto) ADREC_LAMBDA_INLINE {
    const int64_t D = P.D, F = P.F, Fp = pad32(F);
    transpose_fields(U.fields, F, D, Fp, U.FT);
    gram_rows(U.fields, U.FT, D, Fp, P.all_fields.data(), F, U.G);
    for (int64_t q = 0; q < P.Ps; ++q) s[q] = U.G[P.psi[q] * Fp + P.psj[q]];
  });
}

// Rows [0, M) of y [M][ldy], columns of output blocks [ob0, ob1) of first layer j: (init, when
// given, else y itself) + the projected rows of candidates [m0, m0 + M) of every gathered bag,
// then relu when asked.
void add_gathered(const Spec& P, int64_t j, const int64_t* cid, int64_t m0, int64_t M,
                  int64_t ob0, int64_t ob1, const float* init, bool relu, float* y,
                  int64_t ldy) {
  isa_dispatch([&](auto) ADREC_LAMBDA_INLINE {
    const int64_t ld = P.L[P.nb + j].Ob * 16, c0 = ob0 * 16, c1 = ob1 * 16;
    for (int64_t m = 0; m < M; ++m) {
      float* yr = y + m * ldy;
      const int64_t* ids = cid + (m0 + m) * P.Tc;
      if (init) std::memcpy(yr + c0, init + c0, sizeof(float) * (c1 - c0));
      for (int64_t g = 0; g < P.G; ++g) {
        const float* pr = P.gtab[j][g] + ids[P.gcol[g]] * ld;
        for (int64_t c = c0; c < c1; ++c) yr[c] += pr[c];
      }
      if (relu)
        for (int64_t c = c0; c < c1; ++c) yr[c] = std::max(yr[c], 0.f);
    }
  });
}

// act(x W^T + b) for rows [0, M) and output blocks [ob0, ob1) of layer l; bf16 models read x
// through xb (x packed to bfloat16 pairs by the caller).
inline void run_layer(const Spec& P, const Layer& l, const float* x, const uint32_t* xb,
                      int64_t ldx, int64_t M, int64_t ob0, int64_t ob1, const float* bias,
                      float* y, int64_t ldy) {
  if (ob0 >= ob1 || M == 0) return;
  LayerCall c{l.w, bias ? bias : l.b, l.Kp, P.bf16 ? static_cast<const void*>(xb) : x,
              P.bf16 ? ldx / 2 : ldx, M, ob0, ob1, l.act == kActRelu, y, ldy, nullptr, 0};
  blocked_linear(c, P.bf16);
}

inline void pack_rows(const float* x, int64_t ldx, int64_t M, int64_t Kp, uint32_t* xb) {
  for (int64_t m = 0; m < M; ++m) pack_bf16(x + m * ldx, Kp, xb + m * (ldx / 2));
}

inline float sigmoidf(float z) { return 1.f / (1.f + std::exp(-z)); }

// The team's barrier (a generation counter), ~0.05-0.1 us where `omp barrier` took ~0.2 us. A
// thread that has waited kYieldSpins idle spins yields its core: its partner may have been
// descheduled by another process. Waiting threads prefetch the weights they read next: at one
// candidate a request is bound by how fast the cores pull the weights from L3.
struct TeamBarrier {
  alignas(64) std::atomic<int> arrived{0};
  alignas(64) std::atomic<int> gen{0};
};
constexpr int64_t kYieldSpins = 1 << 14;

inline void team_wait(TeamBarrier& b, int T, const char* pf, const char* pf_end) {
  if (T == 1) return;
  const int g = b.gen.load(std::memory_order_acquire);  // gen moves only once all T arrived
  if (b.arrived.fetch_add(1, std::memory_order_acq_rel) == T - 1) {
    b.arrived.store(0, std::memory_order_relaxed);  // ordered before the release of gen
    b.gen.store(g + 1, std::memory_order_release);
    return;
  }
  int64_t idle = 0;
  while (b.gen.load(std::memory_order_acquire) == g) {
    if (pf < pf_end) {
      _mm_prefetch(pf, _MM_HINT_T0);
      pf += 64;
      continue;
    }
    _mm_pause();
    if (++idle > kYieldSpins) std::this_thread::yield();
  }
}

// The forward; every argument was checked by the caller (nothing may throw inside the team).
//
// Threads. One OpenMP team per request, not a team of the kernels' pool (common/parallel.h):
// a request lasts 10-400 us, and OpenMP's threads spin for the next region where the pool's
// workers sleep on a futex once idle, so the pool's team adds the wake-up of its second thread to
// every request (DLRM, 2 threads, three back-to-back pairs, bench/RESULTS_serving.md: p99 at N=1
// 22-38 us with OpenMP, 60-68 us with the pool team).
// Stage A: small layers are computed by every thread (no barrier), large ones split by output
// blocks (a barrier after each); the u_j are split like the tower layer that reads them, so in
// the layer split below a thread needs only its own blocks of them. Stage B: below
// kRowsPerThread rows per thread every tower layer is split by output blocks, with a barrier
// per layer; from kRowsPerThread rows per thread on, each thread runs the whole tower on its own
// rows, tile by tile.
void forward(const Spec& P, const RowReader& rr, const float* lin, const int64_t* uid,
             bool uid_full, const int64_t* cid, const float* dense, int64_t Nd,
             const int64_t* seq_ids, const int64_t* seq_off, int64_t N, float* out) {
  const int64_t D = P.D, F = P.F, W = P.maxw, Fp = pad32(F);
  const int64_t Kvp = pad16(P.Kv), Ksp = pad16(P.Ks), Kxp = pad16(P.Kx), Kdp = pad16(P.Kd);
  const int64_t nvf = static_cast<int64_t>(P.vfield.size()), Lsum = seq_off[P.S];
  const int64_t wbytes = P.bf16 ? 32 : 64;
  int nt = omp_in_parallel() ? 1 : at::get_num_threads();
  const bool row_split = N >= kRowsPerThread * nt;
  if (row_split) nt = static_cast<int>(std::min<int64_t>(nt, N / kRowsPerThread));
  const bool vbottom = P.hb && P.dvar;  // the bottom MLP runs per candidate
  // layer split: candidates cheap enough to build in every thread (no barrier before the tower)
  const bool cand_private = !row_split && N * (Kvp + Kxp) <= kPrivateCandFloats;
  const int64_t nl = row_split ? 0 : N;  // rows of the shared (layer split) buffers
  // every row the request reads first, and the first candidates' rows: their misses overlap
  // one another and stage A instead of each stalling the thread that reads it
  for (int64_t i = 0; i < P.Tu; ++i) {
    const int64_t r = P.base[P.uslot[i]] + uid[uid_full ? P.uslot[i] : i];
    rr.prefetch(r);
    if (P.lin) _mm_prefetch(reinterpret_cast<const char*>(lin + r), _MM_HINT_T0);
  }
  for (int64_t i = 0; i < P.S; ++i)
    for (int64_t l = seq_off[i]; l < seq_off[i + 1]; ++l) rr.prefetch(P.sbase[i] + seq_ids[l]);
  for (int64_t n = 0; n < std::min(kAhead, N); ++n) prefetch_candidate(P, rr, lin, cid, n);
  Arena& A = t_request;
  int64_t uw = 0;
  for (int64_t j = 0; j < P.nf; ++j) uw += P.L[P.nb + j].Ob * 16 + 16;
  A.reserve(2 * W + uw + 64 + nl * (Kvp + 3 * Kxp + 3 * W + 16 + 1));
  float* s0 = A.take<float>(W);  // stage-A outputs of split layers (ping, pong)
  float* s1 = A.take<float>(W);
  float* u[2] = {nullptr, nullptr};
  for (int64_t j = 0; j < P.nf; ++j) u[j] = A.take<float>(P.L[P.nb + j].Ob * 16);
  RowBufs L;  // the layer split's rows, shared by the team
  L.take(A, nl, Kvp, Kxp, W, P.ncross > 0);
  TeamBarrier* bar = new (A.take<TeamBarrier>(1)) TeamBarrier();

#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int tid = omp_get_thread_num(), T = omp_get_num_threads();
    auto split = [&](int64_t n) { return std::make_pair(n * tid / T, n * (tid + 1) / T); };
    auto barrier = [&](const Layer* next) {
      const char *pf = nullptr, *pe = nullptr;
      if (next) {  // this thread's first output block of the next layer
        const auto r = split(next->Ob);
        pf = static_cast<const char*>(next->w) + r.first * next->Kp * wbytes;
        pe = r.first < r.second ? pf + next->Kp * wbytes : pf;
      }
      team_wait(*bar, T, pf, pe);
    };
    const int64_t rows = row_split ? kTile : N;  // rows of this thread's candidate buffers
    Arena& PA = t_private;
    PA.reserve(2 * F * D + D * Fp + F * Fp + (Lsum + 1) * D + Lsum + 4 * W + 2 * Ksp + D +
               (vbottom ? 2 * rows * W : 0) + rows * W +
               (row_split ? kTile * (Kvp + 3 * Kxp + 3 * W + 16 + 1) : 0) +
               (cand_private ? N * (Kvp + Kxp + 1) : 0));
    UserSide U;
    U.fields = PA.take<float>(F * D);
    U.FT = PA.take<float>(D * Fp);
    U.G = PA.take<float>(F * Fp);
    float* keys = PA.take<float>(Lsum * D);
    U.keys = keys, U.seq_off = seq_off;
    U.sc = PA.take<float>(Lsum + 1);
    U.su = PA.take<float>(D);
    float* p0 = PA.take<float>(W);
    float* p1 = PA.take<float>(W);
    uint32_t* pb = PA.take<uint32_t>(W);  // a bf16 copy of one stage-A input
    float* s = PA.take<float>(Ksp);
    uint32_t* xbuf = PA.take<uint32_t>(rows * W / 2 + 16);  // bf16 copy of a tower input

    // ---- stage A: the user/context side, once per request
    std::memset(U.fields, 0, sizeof(float) * F * D);
    float sd = P.bias;
    for (int64_t i = 0; i < P.Tu; ++i) {
      const int64_t t = P.uslot[i], r = P.base[t] + uid[uid_full ? t : i];
      rr.row(r, U.fields + P.field_of_slot(t) * D);
      if (P.lin) sd += lin[r];
    }
    for (int64_t i = 0; i < P.S; ++i)
      for (int64_t l = seq_off[i]; l < seq_off[i + 1]; ++l)
        rr.row(P.sbase[i] + seq_ids[l], keys + l * D);
    for (int64_t i = 0; i < P.S; ++i)
      if (P.shared[P.T + i])
        attend(keys + seq_off[i] * D, seq_off[i + 1] - seq_off[i],
               U.fields + P.starget[i] * D, D, U.sc, U.fields + (P.T + i) * D);
    if (P.dense_w)
      for (int64_t j = 0; j < P.Kd; ++j)
        if (!P.dense_var[j]) sd += P.dense_w[j] * dense[j];
    U.side = sd;
    if (P.fm) {
      for (int64_t d = 0; d < D; ++d) U.su[d] = 0.f;
      float q = 0.f;
      for (int64_t f = 0; f < F; ++f)
        if (P.shared[f]) {
          const float* e = U.fields + f * D;
          for (int64_t d = 0; d < D; ++d) U.su[d] += e[d];
          q += dot(e, e, D);
        }
      U.qu = q;
    }
    if (P.hb && !P.dvar) {  // DLRM's bottom MLP on the shared dense input
      const float* x = p1;
      std::memset(p1, 0, sizeof(float) * Kdp);
      std::memcpy(p1, dense, sizeof(float) * P.Kd);
      int flip = 0;
      for (int64_t l = 0; l < P.nb; ++l) {
        const Layer& ly = P.L[l];
        const bool priv = ly.Kp * ly.Ob * wbytes <= kPrivateLayerBytes;
        float* y = priv ? (x == p0 ? p1 : p0) : (flip++ % 2 ? s1 : s0);
        const auto r = priv ? std::make_pair(int64_t(0), ly.Ob) : split(ly.Ob);
        if (P.bf16) pack_bf16(x, ly.Kp, pb);
        run_layer(P, ly, x, pb, ly.Kp, 1, r.first, r.second, nullptr, y, W);
        if (!priv) barrier(l + 1 < P.nb ? &P.L[l + 1] : nullptr);
        x = y;
      }
      std::memcpy(U.fields, x, sizeof(float) * D);  // field 0
    }
    // s: the shared first-layer columns
    int64_t k = 0;
    if (P.kind == kConcat) {
      for (int64_t f = 0; f < F; ++f)
        if (P.shared[f]) {
          std::memcpy(s + k, U.fields + f * D, sizeof(float) * D);
          k += D;
        }
      for (int64_t j = 0; j < P.Kd; ++j)
        if (!P.dense_var[j]) s[k++] = dense[j];
    } else {
      if (P.hb && !P.dvar) {
        std::memcpy(s, U.fields, sizeof(float) * D);
        k = D;
      }
      shared_pairs(P, U, s + k);  // also leaves FT for the candidates' Gram rows
      k += P.Ps;
    }
    for (; k < Ksp; ++k) s[k] = 0.f;
    if (P.bf16) pack_bf16(s, Ksp, pb);
    for (int64_t j = 0; j < P.nf; ++j) {  // u_j = W_sj s + b_j, this thread's blocks
      const auto r = split(P.L[P.nb + j].Ob);
      run_layer(P, P.L[P.nb + j], s, pb, Ksp, 1, r.first, r.second, nullptr, u[j], 0);
    }

    // ---- stage B: the candidates
    // the tower on M rows of inputs z / x0r and scalar terms sidev, in the buffers of B; each
    // layer's output blocks are this thread's share (all of them when `whole`)
    // act(x W^T + bias) of tower layer ly into y, output blocks r, rows [0, M) = candidates
    // [m0, m0 + M); a first layer with gathered bags adds each candidate's projected rows
    // before its activation
    auto product = [&](const Layer& ly, const float* x, int64_t ldx, int64_t M, int64_t m0,
                       std::pair<int64_t, int64_t> r, const float* bias, float* y) {
      if (ly.in != kInZv || P.G == 0) {
        run_layer(P, ly, x, xbuf, ldx, M, r.first, r.second, bias, y, W);
        return;
      }
      if (ly.Kp > 0) {
        Layer lz = ly;
        lz.act = kActNone;
        run_layer(P, lz, x, xbuf, ldx, M, r.first, r.second, bias, y, W);
      }
      add_gathered(P, ly.ubias, cid, m0, M, r.first, r.second, ly.Kp > 0 ? nullptr : bias,
                   ly.act == kActRelu, y, W);
    };
    auto tower = [&](int64_t M, int64_t m0, bool whole, const float* z, const float* x0r,
                     const float* sidev, const RowBufs& B, float* outv) {
      float *xs0 = B.xa, *xs1 = B.xc, *hp0 = B.h0, *hp1 = B.h1, *yc = B.yc;
      const float* prevh = nullptr;
      const float* xcur = x0r;  // cross state
      for (int64_t l = 0; l < P.lt; ++l) {
        const Layer& ly = P.tower(l);
        const bool last = l == P.lt - 1;
        const auto r = whole ? std::make_pair(int64_t(0), ly.Ob) : split(ly.Ob);
        const float* x;
        int64_t ldx;
        if (ly.in == kInZv) x = z, ldx = Kvp;
        else if (ly.in == kInPrev) x = prevh, ldx = W;
        else x = xcur, ldx = Kxp;
        if (P.bf16) pack_rows(x, ldx, M, ly.Kp, xbuf);
        const float* bias = ly.ubias >= 0 ? u[ly.ubias] : nullptr;
        if (ly.act == kActCross) {
          product(ly, x, ldx, M, m0, r, bias, yc);
          float* xn = (l % 2 == 0) ? xs0 : xs1;
          for (int64_t m = 0; m < M; ++m)
            for (int64_t c = r.first * 16; c < r.second * 16; ++c)
              xn[m * Kxp + c] = x0r[m * Kxp + c] * yc[m * W + c] + xcur[m * Kxp + c];
          xcur = xn;
        } else {
          float* y = (l % 2 == 0) ? hp0 : hp1;
          product(ly, x, ldx, M, m0, r, bias, y);
          prevh = y;
        }
        if (!last && !whole) barrier(&P.tower(l + 1));
      }
      const auto r = whole ? std::make_pair(int64_t(0), int64_t(1)) : split(1);
      if (r.first < r.second)  // the thread that holds the head's block
        for (int64_t m = 0; m < M; ++m) {
          float lg = sidev[m] + prevh[m * W];
          if (P.cross_head) lg += dot(P.cross_head, xcur + m * Kxp, P.Kx);
          outv[m] = sigmoidf(lg);
        }
    };
    // DLRM with a varying dense input: the bottom MLP on rows [m0, m0 + M)
    float* db0 = vbottom ? PA.take<float>(rows * W) : nullptr;
    float* db1 = vbottom ? PA.take<float>(rows * W) : nullptr;
    auto bottom_rows = [&](int64_t m0, int64_t M) -> const float* {
      if (!vbottom) return nullptr;
      for (int64_t m = 0; m < M; ++m) {
        float* x = db1 + m * W;
        std::memset(x, 0, sizeof(float) * Kdp);
        std::memcpy(x, dense + (m0 + m) * P.Kd, sizeof(float) * P.Kd);
      }
      const float* x = db1;
      for (int64_t l = 0; l < P.nb; ++l) {
        float* y = x == db0 ? db1 : db0;
        if (P.bf16) pack_rows(x, W, M, P.L[l].Kp, xbuf);
        run_layer(P, P.L[l], x, xbuf, W, M, 0, P.L[l].Ob, nullptr, y, W);
        x = y;
      }
      return x;
    };
    if (!row_split && cand_private) {
      // every thread builds every candidate's inputs in its own buffers: no barrier (a thread
      // reads its own columns of zv and x0, and the head's thread reads side)
      float* pz = PA.take<float>(N * Kvp);
      float* px = PA.take<float>(P.ncross ? N * Kxp : 0);
      float* ps = PA.take<float>(N);
      candidate_rows(P, rr, lin, cid, dense, Nd, 0, N, U, bottom_rows(0, N), W, pz, Kvp,
                     P.ncross ? px : nullptr, Kxp, ps);
      if (P.lt == 0) {
        const auto r = split(N);
        for (int64_t m = r.first; m < r.second; ++m) out[m] = sigmoidf(ps[m]);
      } else {
        tower(N, 0, false, pz, px, ps, L, out);
      }
    } else if (!row_split) {
      const auto r = split(N);
      const float* db = bottom_rows(r.first, r.second - r.first);
      candidate_rows(P, rr, lin, cid, dense, Nd, r.first, r.second - r.first, U, db, W,
                     L.zv + r.first * Kvp, Kvp, P.ncross ? L.x0 + r.first * Kxp : nullptr, Kxp,
                     L.side + r.first);
      if (P.lt == 0) {
        for (int64_t m = r.first; m < r.second; ++m) out[m] = sigmoidf(L.side[m]);
      } else {
        barrier(&P.tower(0));
        tower(N, 0, false, L.zv, L.x0, L.side, L, out);
      }
    } else {
      barrier(nullptr);  // every u_j complete
      RowBufs Tb;  // this thread's tile
      Tb.take(PA, kTile, Kvp, Kxp, W, P.ncross > 0);
      const auto r = split(N);
      for (int64_t m0 = r.first; m0 < r.second; m0 += kTile) {
        const int64_t M = std::min(kTile, r.second - m0);
        const float* db = bottom_rows(m0, M);
        candidate_rows(P, rr, lin, cid, dense, Nd, m0, M, U, db, W, Tb.zv, Kvp,
                       P.ncross ? Tb.x0 : nullptr, Kxp, Tb.side);
        if (P.lt == 0) {
          for (int64_t m = 0; m < M; ++m) out[m0 + m] = sigmoidf(Tb.side[m]);
        } else {
          tower(M, m0, true, Tb.zv, Tb.x0, Tb.side, Tb, out + m0);
        }
      }
    }
  }
}

// Every id and dense value of a request is checked before the team starts (nothing may throw
// inside it).
void check_request(const Spec& P, const int64_t* uid, bool uid_full, const int64_t* cid,
                   int64_t N, const float* dense, int64_t Nd, const int64_t* seq_ids,
                   const int64_t* seq_off) {
  TORCH_CHECK_VALUE(N >= 1, kOp, ": empty candidate list");
  TORCH_CHECK_VALUE(Nd == 1 || Nd == N, kOp, ": dense must have 1 or N = ", N, " rows, got ", Nd);
  TORCH_CHECK_VALUE(!P.dvar || Nd == N || N == 1, kOp, ": this split has candidate-side dense "
                    "fields: dense must be [N, ", P.Kd, "] = [", N, ", ", P.Kd, "]");
  for (int64_t i = 0; i < P.Tu; ++i) {
    const int64_t t = P.uslot[i], id = uid[uid_full ? t : i];
    TORCH_CHECK_INDEX(id >= 0 && id < P.card[t], kOp, ": user_ids[", uid_full ? t : i, "] = ",
                      id, " is out of range [0, ", P.card[t], ")");
  }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < P.Tc; ++c) {
      const int64_t id = cid[n * P.Tc + c], card = P.card[P.cslot[c]];
      TORCH_CHECK_INDEX(id >= 0 && id < card, kOp, ": cand_ids[", n, ", ", c, "] = ", id,
                        " is out of range [0, ", card, ")");
    }
  for (int64_t i = 0; i < Nd * P.Kd; ++i)
    TORCH_CHECK_VALUE(!std::isnan(dense[i]), kOp, ": dense[", i / std::max<int64_t>(P.Kd, 1),
                      ", ", i % std::max<int64_t>(P.Kd, 1), "] is NaN");
  for (int64_t s = 0; s < P.S; ++s)
    for (int64_t l = seq_off[s]; l < seq_off[s + 1]; ++l)
      TORCH_CHECK_INDEX(seq_ids[l] >= 0 && seq_ids[l] < P.scard[s], kOp, ": history ", s,
                        " id ", seq_ids[l], " is out of range [0, ", P.scard[s], ")");
}

// Shared by the op and the handle: checks, then the forward.
void run(const Spec& P, const RowReader& rr, const float* lin, const int64_t* uid,
         int64_t n_user, const int64_t* cid, int64_t N, const float* dense, int64_t Nd,
         const int64_t* seq_ids, const int64_t* seq_lengths, float* out) {
  TORCH_CHECK_VALUE(n_user == P.Tu || n_user == P.T, kOp, ": user_ids must have ", P.Tu,
                    " (user slots) or ", P.T, " (all slots) entries, got ", n_user);
  TORCH_CHECK_VALUE(!P.lin || lin != nullptr, kOp, ": this model needs its first-order weights");
  const bool full = n_user == P.T && P.T != P.Tu;
  thread_local std::vector<int64_t> off;  // [S + 1] history offsets, reused
  off.assign(P.S + 1, 0);
  for (int64_t s = 0; s < P.S; ++s) {
    TORCH_CHECK_VALUE(seq_lengths[s] >= 0, kOp, ": seq_lengths[", s, "] < 0");
    off[s + 1] = off[s] + seq_lengths[s];
  }
  static const float kNoDense = 0.f;
  if (P.Kd == 0) dense = &kNoDense, Nd = 1;
  const int64_t nd = P.dvar ? Nd : 1;  // rows of dense that differ
  check_request(P, uid, full, cid, N, dense, Nd, seq_ids, off.data());
  forward(P, rr, lin, uid, full, cid, dense, nd, seq_ids, off.data(), N, out);
}

RowReader tensor_reader(const at::Tensor& w, const std::optional<at::Tensor>& scale_bias) {
  check_dim(w, 2, kOp, "weights", "[R, D]");
  TORCH_CHECK_VALUE(w.is_contiguous(), kOp, ": weights must be contiguous");
  const float* sbp = nullptr;
  TableDtype dt;
  if (w.scalar_type() == at::kFloat) {
    dt = TableDtype::kFloat32;
  } else if (w.scalar_type() == at::kHalf) {
    dt = TableDtype::kFloat16;
  } else if (w.scalar_type() == at::kByte) {
    dt = TableDtype::kUInt8;
    TORCH_CHECK_VALUE(scale_bias.has_value(), kOp, ": uint8 weights need scale_bias [R, 2]");
    const auto& sb = *scale_bias;
    TORCH_CHECK_TYPE(sb.scalar_type() == at::kFloat, kOp, ": scale_bias must be float32");
    TORCH_CHECK_VALUE(sb.dim() == 2 && sb.size(0) == w.size(0) && sb.size(1) == 2 &&
                          sb.is_contiguous(),
                      kOp, ": scale_bias must be contiguous [R, 2] = [", w.size(0), ", 2], got ",
                      sb.sizes());
    sbp = sb.data_ptr<float>();
  } else {
    TORCH_CHECK_TYPE(false, kOp, ": weights must be float32, float16 or uint8, got ",
                     w.scalar_type());
  }
  return reader_of(w.data_ptr(), dt, w.size(0), w.size(1), sbp);
}

}  // namespace

// meta [H] int64 + blob [bytes] uint8: the packed model (adrec_fast.serving.scorer.pack);
// weights [R, D] float32 / float16 / uint8 (+ scale_bias [R, 2]); lin [R] float32 first-order
// weights or None; user_ids [Tu] (or [T]) int64, cand_ids [N, Tc] int64 ids within their
// tables; dense [Nd, Kd] float32; seq_ids [sum L] int64, seq_lengths [S] int64 ->
// probabilities [N] float32.
at::Tensor serving_forward_cpu(const at::Tensor& meta, const at::Tensor& blob,
                               const at::Tensor& weights,
                               const std::optional<at::Tensor>& scale_bias,
                               const std::optional<at::Tensor>& lin, const at::Tensor& user_ids,
                               const at::Tensor& cand_ids, const at::Tensor& dense,
                               const at::Tensor& seq_ids, const at::Tensor& seq_lengths) {
  const RowReader rr = tensor_reader(weights, scale_bias);
  TORCH_CHECK_TYPE(meta.scalar_type() == at::kLong && meta.dim() == 1 && meta.is_contiguous(),
                   kOp, ": meta must be a contiguous 1-D int64 tensor");
  TORCH_CHECK_TYPE(blob.scalar_type() == at::kByte && blob.dim() == 1 && blob.is_contiguous(),
                   kOp, ": blob must be a contiguous 1-D uint8 tensor");
  const Spec P = parse(meta.data_ptr<int64_t>(), meta.numel(), blob.data_ptr<uint8_t>(),
                       blob.numel(), rr.R, rr.D);
  for (const auto* t : {&user_ids, &cand_ids, &seq_ids, &seq_lengths})
    TORCH_CHECK_TYPE(t->scalar_type() == at::kLong, kOp,
                     ": user_ids, cand_ids, seq_ids and seq_lengths must be int64");
  TORCH_CHECK_TYPE(dense.scalar_type() == at::kFloat, kOp, ": dense must be float32");
  check_dim(user_ids, 1, kOp, "user_ids", "[Tu]");
  check_dim(cand_ids, 2, kOp, "cand_ids", "[N, Tc]");
  check_dim(dense, 2, kOp, "dense", "[Nd, Kd]");
  check_dim(seq_ids, 1, kOp, "seq_ids", "[sum L]");
  check_dim(seq_lengths, 1, kOp, "seq_lengths", "[S]");
  TORCH_CHECK_VALUE(cand_ids.size(1) == P.Tc, kOp, ": cand_ids must be [N, ", P.Tc, "], got ",
                    cand_ids.sizes());
  TORCH_CHECK_VALUE(dense.size(1) == P.Kd, kOp, ": dense must be [Nd, ", P.Kd, "], got ",
                    dense.sizes());
  TORCH_CHECK_VALUE(seq_lengths.size(0) == P.S, kOp, ": seq_lengths must be [", P.S, "], got ",
                    seq_lengths.sizes());
  const auto sl = seq_lengths.contiguous();
  int64_t Ltot = 0;
  for (int64_t s = 0; s < P.S; ++s) Ltot += std::max<int64_t>(sl.data_ptr<int64_t>()[s], 0);
  TORCH_CHECK_VALUE(seq_ids.size(0) == Ltot, kOp, ": seq_ids has ", seq_ids.size(0),
                    " entries, seq_lengths sum to ", Ltot);
  const float* pl = nullptr;
  at::Tensor lc;
  if (lin.has_value()) {
    lc = lin->contiguous();
    TORCH_CHECK_TYPE(lc.scalar_type() == at::kFloat && lc.dim() == 1 && lc.size(0) == rr.R, kOp,
                     ": lin must be float32 [", rr.R, "]");
    pl = lc.data_ptr<float>();
  }
  const auto u = user_ids.contiguous(), c = cand_ids.contiguous(), d = dense.contiguous();
  const auto q = seq_ids.contiguous();
  auto out = at::empty({c.size(0)}, at::TensorOptions().dtype(at::kFloat));
  run(P, rr, pl, u.data_ptr<int64_t>(), u.size(0), c.data_ptr<int64_t>(), c.size(0),
      d.data_ptr<float>(), d.size(0), q.data_ptr<int64_t>(), sl.data_ptr<int64_t>(),
      out.data_ptr<float>());
  return out;
}

// ---------------------------------------------------------------------------- ServingModel
struct ServingModel::Impl {
  Spec P;
  RowReader rr;
  const float* lin;
};

ServingModel::ServingModel(const int64_t* meta, int64_t n_meta, const uint8_t* blob,
                           int64_t n_blob, const void* weights, TableDtype dtype, int64_t R,
                           int64_t D, const float* scale_bias, const float* lin)
    : impl_(std::make_unique<Impl>()) {
  impl_->rr = reader_of(weights, dtype, R, D, scale_bias);
  impl_->P = parse(meta, n_meta, blob, n_blob, R, D);
  impl_->lin = lin;
  TORCH_CHECK_VALUE(!impl_->P.lin || lin != nullptr, kOp,
                    ": this model needs its first-order weights lin [R]");
}

ServingModel::~ServingModel() = default;

int64_t ServingModel::num_slots() const { return impl_->P.T; }
int64_t ServingModel::num_user() const { return impl_->P.Tu; }
int64_t ServingModel::num_cand() const { return impl_->P.Tc; }
int64_t ServingModel::num_dense() const { return impl_->P.Kd; }
int64_t ServingModel::num_seq() const { return impl_->P.S; }
bool ServingModel::dense_varies() const { return impl_->P.dvar > 0; }

void ServingModel::score(const int64_t* user_ids, int64_t n_user, const int64_t* cand_ids,
                         int64_t N, const float* dense, int64_t Nd, const int64_t* seq_ids,
                         const int64_t* seq_lengths, float* out) const {
  run(impl_->P, impl_->rr, impl_->lin, user_ids, n_user, cand_ids, N, dense, Nd, seq_ids,
      seq_lengths, out);
}

TORCH_LIBRARY_IMPL(adrec, CPU, m) { m.impl("serving_forward", &serving_forward_cpu); }

}  // namespace adrec
