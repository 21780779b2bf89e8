// SPDX-License-Identifier: Apache-2.0
// Serving forward of DLRM and DCN-v2 in one native call: row lookup (fp32, fp16 or int8
// row-wise tables, dequantized on lookup), interaction, MLPs (through the linear op's policy,
// common/linear.h), head and sigmoid. The user/context side (user-slot embeddings, the bottom MLP
// when the dense input is shared, DLRM dot products between two shared fields) is computed once
// per request and copied into every candidate row as a template; only the candidate slots are
// read per candidate.
// Candidate rows are filled by adrec::parallel_for over row blocks.
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
#include <cstdlib>
#include <cstring>
#include <new>
#include <thread>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "common/linear.h"
#include "common/linear_blocked.h"
#include "common/cpu_isa.h"
#include "common/parallel.h"
#include "cpu/scorer.h"

namespace adrec {
namespace {

constexpr const char* kOp = "serving_forward";
constexpr int64_t kDLRM = 0, kDCNParallel = 1, kDCNStacked = 2;
// From this many candidates on, the first layer's shared columns are split off (the column
// gathers of the weight cost more than they save on smaller requests).
constexpr int64_t kSplitMin = 128;

at::Tensor index_tensor(const std::vector<int64_t>& v) {
  return at::tensor(at::ArrayRef<int64_t>(v), at::TensorOptions().dtype(at::kLong));
}

// One embedding buffer [R, D] in one of three storages; row() writes a float32 copy.
struct RowReader {
  const float* f32 = nullptr;
  const at::Half* f16 = nullptr;
  const uint8_t* q8 = nullptr;
  const float* scale_bias = nullptr;  // [R, 2]: x = q * scale + bias (int8 row-wise)
  int64_t D = 0;

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

// A reader over raw storage `weights` [R, D] of `dtype` (+ scale_bias [R, 2] for uint8); `op`
// names the caller in the error.
RowReader reader_of(const void* weights, TableDtype dtype, int64_t D, const float* scale_bias,
                    const char* op) {
  RowReader rr;
  rr.D = D;
  switch (dtype) {
    case TableDtype::kFloat32: rr.f32 = static_cast<const float*>(weights); break;
    case TableDtype::kFloat16: rr.f16 = static_cast<const at::Half*>(weights); break;
    case TableDtype::kUInt8:
      TORCH_CHECK_VALUE(scale_bias != nullptr, op, ": uint8 weights need scale_bias [R, 2]");
      rr.q8 = static_cast<const uint8_t*>(weights);
      rr.scale_bias = scale_bias;
      break;
    default: TORCH_CHECK_TYPE(false, op, ": weights must be float32, float16 or uint8");
  }
  return rr;
}

RowReader make_reader(const at::Tensor& w, const std::optional<at::Tensor>& scale_bias) {
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
  return reader_of(w.data_ptr(), dt, w.size(1), sbp, kOp);
}

// (relu)(x @ w.T + b) under the linear op's policy (common/linear.h). bf16 weights (the Scorer's
// mlp="bf16" for DCN-v2) give a bf16 result from the oneDNN row minimum on, which the next deep
// layer takes as it is; the elementwise steps that read it (cross epilogue, concatenation, head)
// compute in float32.
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, bool relu) {
  return linear_forward(x, w, b, relu ? Activation::kRelu : Activation::kNone);
}

at::Tensor mlp_relu(at::Tensor x, at::TensorList wb, size_t begin, size_t end) {
  for (size_t i = begin; i + 1 < end; i += 2) x = linear(x, wb[i], wb[i + 1], true);  // [B, out]
  return x;
}

}  // namespace

// weights [R, D] float32/float16/uint8 (+ scale_bias [R, 2]); user_rows [T] int64 global rows
// (read only for slots not in cand_slots); cand_rows [N, Tc] int64 global rows of the candidate
// slots cand_slots [Tc]; dense [Nd, K_d] float32 with Nd in {1, N} (1 = shared by every
// candidate). kind 0 = DLRM (bottom: bottom MLP (w, b) pairs, layers: top MLP pairs),
// 1 / 2 = DCN-v2 parallel / stacked (layers: n_cross cross (w, b) pairs, then the deep MLP's).
// Returns probabilities [N] float32.
at::Tensor serving_forward_cpu(const at::Tensor& weights,
                               const std::optional<at::Tensor>& scale_bias,
                               const at::Tensor& user_rows_, const at::Tensor& cand_rows_,
                               const at::Tensor& cand_slots_, const at::Tensor& dense_,
                               at::TensorList bottom, at::TensorList layers,
                               const at::Tensor& head_w, const at::Tensor& head_b, int64_t kind,
                               int64_t n_cross, bool self_interaction) {
  TORCH_CHECK_VALUE(kind == kDLRM || kind == kDCNParallel || kind == kDCNStacked, kOp,
                    ": kind must be 0 (DLRM), 1 or 2 (DCN-v2), got ", kind);
  const RowReader rr = make_reader(weights, scale_bias);
  const int64_t R = weights.size(0), D = rr.D;
  TORCH_CHECK_TYPE(user_rows_.scalar_type() == at::kLong && cand_rows_.scalar_type() == at::kLong &&
                       cand_slots_.scalar_type() == at::kLong,
                   kOp, ": user_rows, cand_rows and cand_slots must be int64");
  check_dim(user_rows_, 1, kOp, "user_rows", "[T]");
  check_dim(cand_rows_, 2, kOp, "cand_rows", "[N, Tc]");
  check_dim(cand_slots_, 1, kOp, "cand_slots", "[Tc]");
  check_dim(dense_, 2, kOp, "dense", "[Nd, K_d]");
  TORCH_CHECK_TYPE(dense_.scalar_type() == at::kFloat, kOp, ": dense must be float32");
  const auto user_rows = user_rows_.contiguous();    // [T]
  const auto cand_rows = cand_rows_.contiguous();    // [N, Tc]
  const auto cand_slots = cand_slots_.contiguous();  // [Tc]
  const auto dense = dense_.contiguous();            // [Nd, K_d]
  const int64_t T = user_rows.size(0), N = cand_rows.size(0), Tc = cand_rows.size(1);
  const int64_t Nd = dense.size(0), Kd = dense.size(1);
  TORCH_CHECK_VALUE(N >= 1, kOp, ": no candidates");
  TORCH_CHECK_VALUE(cand_slots.size(0) == Tc, kOp, ": cand_slots has ", cand_slots.size(0),
                    " entries but cand_rows has ", Tc, " columns");
  TORCH_CHECK_VALUE(Nd == 1 || Nd == N, kOp, ": dense must have 1 or N = ", N, " rows, got ", Nd);
  TORCH_CHECK_VALUE(layers.size() % 2 == 0 && bottom.size() % 2 == 0, kOp,
                    ": bottom and layers are (weight, bias) pairs");

  // Slot kinds; every row id is checked before any parallel work (no throw inside it).
  const int64_t* slots = cand_slots.data_ptr<int64_t>();
  std::vector<char> is_cand(T, 0);
  for (int64_t c = 0; c < Tc; ++c) {
    TORCH_CHECK_INDEX(slots[c] >= 0 && slots[c] < T, kOp, ": cand_slots[", c, "] = ", slots[c],
                      " is not a slot in [0, ", T, ")");
    is_cand[slots[c]] = 1;
  }
  const int64_t* urows = user_rows.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK_INDEX(is_cand[t] || (urows[t] >= 0 && urows[t] < R), kOp, ": user_rows[", t,
                      "] = ", urows[t], " is out of range [0, ", R, ")");
  const int64_t* crows = cand_rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < N * Tc; ++i)
    TORCH_CHECK_INDEX(crows[i] >= 0 && crows[i] < R, kOp, ": cand_rows[", i / Tc, ", ", i % Tc,
                      "] = ", crows[i], " is out of range [0, ", R, ")");
  const float* pdense = dense.data_ptr<float>();
  const auto fopt = at::TensorOptions().dtype(at::kFloat);
  at::Tensor top_in;  // [N, K] input of the per-candidate layers

  if (kind == kDLRM) {
    const bool has_bottom = !bottom.empty();
    // Bottom MLP once when the dense input is shared (Nd == 1), else per candidate.
    at::Tensor d;  // [Nd, D]
    if (has_bottom) {
      d = linear(dense, bottom[0], bottom[1], true);
      d = mlp_relu(d, bottom, 2, bottom.size()).contiguous();
      TORCH_CHECK_VALUE(d.size(1) == D, kOp, ": bottom MLP output width ", d.size(1),
                        " != embedding dim ", D);
    }
    const int64_t F = T + (has_bottom ? 1 : 0), off = has_bottom ? 1 : 0;
    const int64_t P = self_interaction ? F * (F + 1) / 2 : F * (F - 1) / 2;
    const int64_t Kd_top = has_bottom ? D : 0, K = Kd_top + P;
    // Field f is shared when it is the dense vector with Nd == 1, or a user slot.
    std::vector<char> shared(F);
    for (int64_t f = 0; f < F; ++f)
      shared[f] = (has_bottom && f == 0) ? (Nd == 1) : !is_cand[f - off];
    std::vector<int64_t> vi, vj, vp;  // pairs that vary per candidate -> output column
    std::vector<float> fields0(F * D, 0.f);  // [F, D] shared fields
    for (int64_t t = 0; t < T; ++t)
      if (!is_cand[t]) rr.row(urows[t], fields0.data() + (t + off) * D);
    if (has_bottom && Nd == 1) std::memcpy(fields0.data(), d.data_ptr<float>(), sizeof(float) * D);
    std::vector<float> row0(K, 0.f);  // [K] template row: shared dense vector and shared pairs
    if (has_bottom && Nd == 1) std::memcpy(row0.data(), d.data_ptr<float>(), sizeof(float) * D);
    {
      int64_t p = Kd_top;
      for (int64_t i = 0; i < F; ++i)
        for (int64_t j = self_interaction ? i : i + 1; j < F; ++j, ++p) {
          // pair order (i, j) row-major, j > i (or >= i), as adrec::dot_interaction
          if (shared[i] && shared[j]) {
            float acc = 0.f;
            const float* a = fields0.data() + i * D;
            const float* b = fields0.data() + j * D;
            for (int64_t k = 0; k < D; ++k) acc += a[k] * b[k];
            row0[p] = acc;
          } else {
            vi.push_back(i);
            vj.push_back(j);
            vp.push_back(p);
          }
        }
    }
    top_in = at::empty({N, K}, fopt);
    float* pz = top_in.data_ptr<float>();
    const float* pd = has_bottom ? d.data_ptr<float>() : nullptr;
    const int64_t nv = static_cast<int64_t>(vp.size());
    parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      std::vector<float> fields(fields0);  // [F, D] this task's copy
      for (int64_t n = n0; n < n1; ++n) {
        for (int64_t c = 0; c < Tc; ++c) rr.row(crows[n * Tc + c], fields.data() + (slots[c] + off) * D);
        float* z = pz + n * K;
        std::memcpy(z, row0.data(), sizeof(float) * K);
        if (has_bottom && Nd != 1) {
          std::memcpy(fields.data(), pd + n * D, sizeof(float) * D);
          std::memcpy(z, pd + n * D, sizeof(float) * D);
        }
        for (int64_t q = 0; q < nv; ++q) {
          const float* a = fields.data() + vi[q] * D;
          const float* b = fields.data() + vj[q] * D;
          float acc = 0.f;
          for (int64_t k = 0; k < D; ++k) acc += a[k] * b[k];
          z[vp[q]] = acc;
        }
      }
    });
    // Large N: the first top layer's product with the shared columns (dense vector when
    // shared, pairs of two shared fields) is one matrix-vector product per request; the GEMM
    // sees only the columns that vary per candidate.
    bool done = false;
    if (N >= kSplitMin && layers.size() >= 2) {
      std::vector<char> col_var(K, 0);
      if (has_bottom && Nd != 1)
        for (int64_t k = 0; k < D; ++k) col_var[k] = 1;
      for (int64_t q = 0; q < nv; ++q) col_var[vp[q]] = 1;
      std::vector<int64_t> sc, vc;
      for (int64_t k = 0; k < K; ++k) (col_var[k] ? vc : sc).push_back(k);
      if (!sc.empty() && !vc.empty()) {
        const auto S = index_tensor(sc), V = index_tensor(vc);
        const auto r0 = at::from_blob(row0.data(), {K}, fopt);
        const auto u =  // [O]: the shared columns' product, a bias of the per-candidate one
            linear(r0.index_select(0, S).unsqueeze(0), layers[0].index_select(1, S), layers[1],
                   false).squeeze(0);
        auto h = linear(top_in.index_select(1, V), layers[0].index_select(1, V), u, true);
        top_in = mlp_relu(h, layers, 2, layers.size());
        done = true;
      }
    }
    if (!done) top_in = mlp_relu(top_in, layers, 0, layers.size());
  } else {
    // DCN-v2: x0 = [flattened embeddings, dense] [N, K]
    const int64_t K = T * D + Kd;
    TORCH_CHECK_VALUE(static_cast<int64_t>(layers.size()) >= 2 * n_cross, kOp,
                      ": layers holds fewer than n_cross (weight, bias) pairs");
    std::vector<float> row0(K, 0.f);  // [K] template: user slots and shared dense
    for (int64_t t = 0; t < T; ++t)
      if (!is_cand[t]) rr.row(urows[t], row0.data() + t * D);
    if (Nd == 1 && Kd) std::memcpy(row0.data() + T * D, pdense, sizeof(float) * Kd);
    at::Tensor x0 = at::empty({N, K}, fopt);
    float* px = x0.data_ptr<float>();
    parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        float* x = px + n * K;
        std::memcpy(x, row0.data(), sizeof(float) * K);
        for (int64_t c = 0; c < Tc; ++c) rr.row(crows[n * Tc + c], x + slots[c] * D);
        if (Nd != 1 && Kd) std::memcpy(x + T * D, pdense + n * Kd, sizeof(float) * Kd);
      }
    });
    // Large N: the first cross layer and (parallel) the first deep layer multiply x0, whose
    // user-side columns are shared: their part is one matrix-vector product per request.
    const size_t di = static_cast<size_t>(2 * n_cross);  // first deep layer in `layers`
    at::Tensor xw0, h0;
    if (N >= kSplitMin) {
      std::vector<int64_t> sc, vc;
      for (int64_t t = 0; t < T; ++t)
        for (int64_t k = 0; k < D; ++k) (is_cand[t] ? vc : sc).push_back(t * D + k);
      for (int64_t k = 0; k < Kd; ++k) (Nd != 1 ? vc : sc).push_back(T * D + k);
      if (!sc.empty() && !vc.empty()) {
        const auto S = index_tensor(sc), V = index_tensor(vc);
        const auto r0s = at::from_blob(row0.data(), {K}, fopt).index_select(0, S);  // [Ks]
        const auto x0v = x0.index_select(1, V);                                      // [N, Kv]
        auto first = [&](size_t i, bool relu) {  // x0 @ W_i.T + b_i, shared part as a bias
          const auto u =  // [O]; bf16 weights are widened inside the product
              linear(r0s.unsqueeze(0), layers[i].index_select(1, S), layers[i + 1], false)
                  .squeeze(0);
          const auto wv = layers[i].index_select(1, V);
          return linear(x0v, wv, u, relu);
        };
        if (n_cross > 0) xw0 = first(0, false);
        if (kind == kDCNParallel && layers.size() > di) h0 = first(di, true);
      }
    }
    at::Tensor x = x0;
    for (int64_t l = 0; l < n_cross; ++l) {
      const auto xw = (l == 0 && xw0.defined()) ? xw0
                                                : linear(x, layers[2 * l], layers[2 * l + 1], false);
      x = at::addcmul(x, x0, xw);  // x0 * xw + x
    }
    if (kind == kDCNParallel) {
      at::Tensor h = h0.defined() ? mlp_relu(h0, layers, di + 2, layers.size())
                                  : mlp_relu(x0, layers, di, layers.size());
      top_in = at::cat({x, h}, 1);
    } else {
      top_in = mlp_relu(x, layers, 2 * n_cross, layers.size());
    }
  }
  if (top_in.scalar_type() != at::kFloat) top_in = top_in.to(at::kFloat);  // bf16 deep output
  TORCH_CHECK_VALUE(head_w.dim() == 1 && head_w.size(0) == top_in.size(1), kOp,
                    ": head_w must be [", top_in.size(1), "], got ", head_w.sizes());
  return at::sigmoid(at::add(at::mv(top_in, head_w), head_b));  // [N]
}

// ============================================================================ packed DLRM path
// adrec::serving_dlrm: DLRM with the user/context side shared, on a model packed once per
// (checkpoint, field split) by adrec_fast/serving/scorer.py (pack_dlrm): `meta` int64 describes
// the split and the layers, `blob` uint8 holds the blocked MLP weights (common/linear_blocked.h).
namespace {

constexpr const char* kOpP = "serving_dlrm";
constexpr int64_t kMagic = 0x4144524543534431LL;  // "ADRECSD1"
enum : int64_t {
  H_MAGIC, H_PREC, H_D, H_F, H_HB, H_KD, H_TU, H_TC, H_PS, H_PV, H_L, H_NB, H_SIZE = 16
};
constexpr int64_t kMaxLayers = 64;
// From this many rows per thread on, threads split the candidates (each runs the whole tower on
// its rows, no barrier); below it they split every layer's outputs (the weights, read once per
// request, are then spread over the cores' caches) with a barrier per layer.
constexpr int64_t kRowsPerThread = 16;
constexpr int64_t kTile = 32;  // candidate rows per tile in the row split

inline int64_t pad16(int64_t k) { return (k + 15) / 16 * 16; }

struct Layer {
  int64_t Kp = 0, Ob = 0;
  bool relu = false;
  const void* w = nullptr;
  const float* b = nullptr;
};

// The parsed packed model. Layers: [0, nb) bottom MLP; nb: first top layer's shared columns
// (the dense vector and the pairs of two shared fields); nb + 1: its candidate columns; then
// the rest of the top MLP; the last layer is the head (one output, no relu).
struct Packed {
  bool bf16 = false, hb = false;
  int64_t D = 0, F = 0, Kd = 0, Tu = 0, Tc = 0, Ps = 0, Pv = 0, L = 0, nb = 0, maxw = 16;
  const int64_t *ufield, *ubase, *ucard, *cfield, *cbase, *ccard, *psi, *psj, *pvi, *pvj;
  std::array<Layer, kMaxLayers> layers;
  // [Pv] where candidate pair q sits in the candidates' Gram rows [Tc][Fp] (candidate_pairs),
  // -1 when neither of its fields is a candidate field
  std::vector<int64_t> gidx;
};

// meta h [n] int64 and blob base [bytes] (pack_dlrm) over a table of R rows of width D. The
// result points into both buffers.
Packed parse(const int64_t* h, int64_t n, const uint8_t* base, int64_t bytes, int64_t R,
             int64_t D) {
  TORCH_CHECK_VALUE(n >= H_SIZE && h[H_MAGIC] == kMagic, kOpP, ": meta is not a packed model");
  Packed P;
  P.bf16 = h[H_PREC] == 1;
  TORCH_CHECK_VALUE(h[H_PREC] == 0 || h[H_PREC] == 1, kOpP, ": bad precision ", h[H_PREC]);
  P.D = h[H_D], P.F = h[H_F], P.hb = h[H_HB] != 0, P.Kd = h[H_KD], P.Tu = h[H_TU];
  P.Tc = h[H_TC], P.Ps = h[H_PS], P.Pv = h[H_PV], P.L = h[H_L], P.nb = h[H_NB];
  TORCH_CHECK_VALUE(P.D == D, kOpP, ": packed for D = ", P.D, " but the table has D = ", D);
  // every count is bounded by the meta's length before any arithmetic on it (no overflow)
  TORCH_CHECK_VALUE(P.Tu >= 0 && P.Tc >= 0 && P.Ps >= 0 && P.Pv >= 0 && P.Kd >= 0 &&
                        P.Tu <= n && P.Tc <= n && P.Ps <= n && P.Pv <= n && P.D >= 1 &&
                        P.Kd <= bytes && P.nb >= 0 && P.nb <= kMaxLayers &&
                        P.L <= kMaxLayers && P.F == P.Tu + P.Tc + (P.hb ? 1 : 0) &&
                        P.hb == (P.Kd > 0) && (P.hb || P.nb == 0) && P.nb >= (P.hb ? 1 : 0) &&
                        P.L >= P.nb + 2,
                    kOpP, ": inconsistent meta header");
  const int64_t need = H_SIZE + 3 * (P.Tu + P.Tc) + 2 * (P.Ps + P.Pv) + 5 * P.L;
  TORCH_CHECK_VALUE(n == need, kOpP, ": meta has ", n, " entries, expected ", need);
  const int64_t* a = h + H_SIZE;
  P.ufield = a, P.ubase = a + P.Tu, P.ucard = a + 2 * P.Tu;
  a += 3 * P.Tu;
  P.cfield = a, P.cbase = a + P.Tc, P.ccard = a + 2 * P.Tc;
  a += 3 * P.Tc;
  P.psi = a, P.psj = a + P.Ps;
  a += 2 * P.Ps;
  P.pvi = a, P.pvj = a + P.Pv;
  a += 2 * P.Pv;
  const int64_t F0 = P.hb ? 1 : 0;  // field 0 is the bottom MLP's output when there is one
  for (int64_t i = 0; i < P.Tu; ++i)
    TORCH_CHECK_VALUE(P.ufield[i] >= F0 && P.ufield[i] < P.F && P.ubase[i] >= 0 &&
                          P.ubase[i] <= R && P.ucard[i] >= 1 && P.ucard[i] <= R - P.ubase[i],
                      kOpP, ": bad user slot ", i, " in meta");
  for (int64_t i = 0; i < P.Tc; ++i)
    TORCH_CHECK_VALUE(P.cfield[i] >= F0 && P.cfield[i] < P.F && P.cbase[i] >= 0 &&
                          P.cbase[i] <= R && P.ccard[i] >= 1 && P.ccard[i] <= R - P.cbase[i],
                      kOpP, ": bad candidate slot ", i, " in meta");
  for (int64_t q = 0; q < P.Ps; ++q)
    TORCH_CHECK_VALUE(P.psi[q] >= 0 && P.psi[q] < P.F && P.psj[q] >= 0 && P.psj[q] < P.F, kOpP,
                      ": bad shared pair ", q);
  for (int64_t q = 0; q < P.Pv; ++q)
    TORCH_CHECK_VALUE(P.pvi[q] >= 0 && P.pvi[q] < P.F && P.pvj[q] >= 0 && P.pvj[q] < P.F, kOpP,
                      ": bad candidate pair ", q);
  for (int64_t l = 0; l < P.L; ++l, a += 5) {
    Layer& y = P.layers[l];
    y.Kp = a[0], y.Ob = a[1], y.relu = a[2] != 0;
    const int64_t wo = a[3], bo = a[4], per = P.bf16 ? 32 : 64;  // weight bytes per (k, block)
    TORCH_CHECK_VALUE(y.Kp >= 0 && y.Kp % 16 == 0 && y.Kp <= bytes && y.Ob >= 1 &&
                          y.Ob <= bytes / 64 && (y.Kp == 0 || y.Ob <= bytes / (y.Kp * per)) &&
                          wo >= 0 && bo >= 0 && wo <= bytes && bo <= bytes && wo % 64 == 0 &&
                          bo % 64 == 0 && y.Ob * y.Kp * per <= bytes - wo &&
                          y.Ob * 64 <= bytes - bo,
                      kOpP, ": bad layer ", l, " in meta");
    y.w = base + wo;
    y.b = reinterpret_cast<const float*>(base + bo);
    P.maxw = std::max(P.maxw, std::max(y.Kp, y.Ob * 16));
  }
  // chain shapes: each layer's padded input is the previous layer's padded output
  const auto& Ls = P.layers;
  if (P.hb) {
    TORCH_CHECK_VALUE(Ls[0].Kp == pad16(P.Kd) && Ls[P.nb - 1].Ob * 16 >= P.D, kOpP,
                      ": bottom MLP shapes do not match the dense width / D");
    for (int64_t l = 1; l < P.nb; ++l)
      TORCH_CHECK_VALUE(Ls[l].Kp == Ls[l - 1].Ob * 16, kOpP, ": bottom layer ", l, " shape");
  }
  const Layer &s = Ls[P.nb], &v = Ls[P.nb + 1];
  TORCH_CHECK_VALUE(s.Kp == pad16((P.hb ? P.D : 0) + P.Ps) && v.Kp == pad16(P.Pv) && s.Ob == v.Ob,
                    kOpP, ": first top layer shapes do not match the pairs");
  for (int64_t l = P.nb + 2; l < P.L; ++l)
    TORCH_CHECK_VALUE(Ls[l].Kp == Ls[l - 1].Ob * 16, kOpP, ": top layer ", l, " shape");
  TORCH_CHECK_VALUE(Ls[P.L - 1].Ob == 1 && !Ls[P.L - 1].relu, kOpP, ": the last layer must be "
                    "the head (one output, no relu)");
  const int64_t Fp = (P.F + 31) / 32 * 32;  // pad32
  std::vector<int64_t> crow(P.F, -1);       // field -> its first candidate slot
  for (int64_t c = P.Tc - 1; c >= 0; --c) crow[P.cfield[c]] = c;
  P.gidx.resize(P.Pv);
  for (int64_t q = 0; q < P.Pv; ++q) {
    const int64_t i = P.pvi[q], j = P.pvj[q];
    P.gidx[q] = crow[i] >= 0 ? crow[i] * Fp + j : (crow[j] >= 0 ? crow[j] * Fp + i : -1);
  }
  return P;
}

Packed parse(const at::Tensor& meta, const at::Tensor& blob, int64_t R, int64_t D) {
  TORCH_CHECK_TYPE(meta.scalar_type() == at::kLong && meta.dim() == 1 && meta.is_contiguous(),
                   kOpP, ": meta must be a contiguous 1-D int64 tensor (from pack_dlrm)");
  TORCH_CHECK_TYPE(blob.scalar_type() == at::kByte && blob.dim() == 1 && blob.is_contiguous(),
                   kOpP, ": blob must be a contiguous 1-D uint8 tensor (from pack_dlrm)");
  return parse(meta.data_ptr<int64_t>(), meta.numel(), blob.data_ptr<uint8_t>(), blob.numel(), R,
               D);
}

// A 64-byte aligned bump allocator over a thread's reusable buffer.
struct Arena {
  std::vector<char> buf;
  size_t used = 0;
  void reserve(size_t bytes) {
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
size_t arena_bytes(int64_t floats) { return static_cast<size_t>(floats) * 4 + 64 * 32; }

ADREC_INLINE float dot(const float* a, const float* b, int64_t D) {
  float acc = 0.f;
  for (int64_t k = 0; k < D; ++k) acc += a[k] * b[k];
  return acc;
}

// One tile of candidates: their varying pairs zv [M][Kvp] (float32, zero padded), and their bf16
// pairs zb [M][Kvp / 2] when the model is bf16. fields [F, D] holds the shared fields on entry.
// Pair dot products through a small Gram matrix: FT [D][Fp] holds the fields transposed
// (Fp = F padded to 32, zero columns), and G[r][j] = <field rowf[r], field j> for every j comes
// from D vector FMAs per 16 columns, instead of one horizontal dot product per pair.
inline int64_t pad32(int64_t k) { return (k + 31) / 32 * 32; }

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

// Stage A: the shared columns s [Ksp] (the dense vector d when there is a bottom MLP, then the
// pairs of two shared fields) and FT for the candidates. fields [F, D] holds the shared fields
// (field 0 = d); G is scratch [F][Fp]; rowf [F] scratch.
ADREC_INLINE void shared_pairs_body(const Packed& P, const float* fields, float* FT, int64_t Fp,
                                    float* G, int64_t* rowf, float* s, int64_t Ksp) {
  const int64_t D = P.D, F = P.F;
  transpose_fields(fields, F, D, Fp, FT);
  for (int64_t f = 0; f < F; ++f) rowf[f] = f;
  gram_rows(fields, FT, D, Fp, rowf, F, G);
  int64_t k = 0;
  if (P.hb) {
    for (int64_t i = 0; i < D; ++i) s[i] = fields[i];
    k = D;
  }
  for (int64_t q = 0; q < P.Ps; ++q) s[k + q] = G[P.psi[q] * Fp + P.psj[q]];
  for (int64_t q = k + P.Ps; q < Ksp; ++q) s[q] = 0.f;
}

// One tile of candidates: their varying pairs zv [M][Kvp] (float32, zero padded), and their bf16
// pairs zb [M][Kvp / 2] when the model is bf16. fields [F, D] and FT hold the shared fields on
// entry; G [Tc][Fp] scratch; gidx [Pv]: where pair q is in G (-1: no candidate field in it).
ADREC_INLINE void candidate_pairs_body(const Packed& P, const RowReader& rr, const int64_t* cid,
                                       int64_t m0, int64_t M, float* fields, float* FT,
                                       int64_t Fp, float* G, const int64_t* gidx, float* zv,
                                       uint32_t* zb) {
  const int64_t D = P.D, Kvp = pad16(P.Pv);
  for (int64_t m = 0; m < M; ++m) {
    const int64_t* ids = cid + (m0 + m) * P.Tc;
    for (int64_t c = 0; c < P.Tc; ++c) {
      const int64_t f = P.cfield[c];
      float* row = fields + f * D;
      rr.row(P.cbase[c] + ids[c], row);
      for (int64_t k = 0; k < D; ++k) FT[k * Fp + f] = row[k];
    }
    gram_rows(fields, FT, D, Fp, P.cfield, P.Tc, G);
    float* z = zv + m * Kvp;
    for (int64_t q = 0; q < P.Pv; ++q)
      z[q] = gidx[q] >= 0 ? G[gidx[q]] : dot(fields + P.pvi[q] * D, fields + P.pvj[q] * D, D);
    for (int64_t q = P.Pv; q < Kvp; ++q) z[q] = 0.f;
    if (zb) pack_bf16(z, Kvp, zb + m * (Kvp / 2));
  }
}

// The two stages' entry points, compiled per ISA level (common/cpu_isa.h).
void shared_pairs(const Packed& P, const float* fields, float* FT, int64_t Fp, float* G,
                  int64_t* rowf, float* s, int64_t Ksp) {
  isa_dispatch([&](auto) ADREC_LAMBDA_INLINE { shared_pairs_body(P, fields, FT, Fp, G, rowf, s, Ksp); });
}
void candidate_pairs(const Packed& P, const RowReader& rr, const int64_t* cid, int64_t m0,
                     int64_t M, float* fields, float* FT, int64_t Fp, float* G,
                     const int64_t* gidx, float* zv, uint32_t* zb) {
  isa_dispatch([&](auto) ADREC_LAMBDA_INLINE {
    candidate_pairs_body(P, rr, cid, m0, M, fields, FT, Fp, G, gidx, zv, zb);
  });
}

inline void run_layer(const Packed& P, const Layer& l, const void* x, int64_t ldx,
                      int64_t M, int64_t ob0, int64_t ob1, const float* bias, float* y,
                      int64_t ldy, uint32_t* yb, int64_t ldyb) {
  if (ob0 >= ob1 || M == 0) return;
  LayerCall c{l.w, bias ? bias : l.b, l.Kp, x, ldx, M, ob0, ob1, l.relu, y, ldy, yb, ldyb};
  blocked_linear(c, P.bf16);
}

inline float sigmoidf(float z) { return 1.f / (1.f + std::exp(-z)); }

// The weights a thread reads next, prefetched while it waits at a barrier: at one candidate the
// request is bound by how fast both cores pull the MLP weights from L3, and a waiting core's
// share of that bandwidth is otherwise lost. The layer kernels read the first blocks of a
// thread's range side by side, each from its start: those are the streams, one cache line at a
// time, round robin.
struct WeightPrefetch {
  const char* cur[4] = {};
  const char* end[4] = {};
  int n = 0, next = 0;
  // output blocks [r.first, r.second) of layer l, wbytes weight bytes per (input, block)
  void set(const Layer& l, std::pair<int64_t, int64_t> r, int64_t wbytes) {
    n = 0, next = 0;
    const int64_t bs = l.Kp * wbytes;
    for (int64_t ob = r.first; ob < r.second && n < 4; ++ob, ++n) {
      cur[n] = static_cast<const char*>(l.w) + ob * bs;
      end[n] = cur[n] + bs;
    }
  }
  // one line of the next unfinished stream; false when every stream is done
  inline bool step() {
    for (int i = 0; i < n; ++i) {
      const int k = next;
      next = next + 1 == n ? 0 : next + 1;
      if (cur[k] < end[k]) {
        _mm_prefetch(cur[k], _MM_HINT_T0);
        cur[k] += 64;
        return true;
      }
    }
    return false;
  }
};

// The team's barrier (a generation counter): ~0.05-0.1 us where `omp barrier` took ~0.2 us here,
// and its waiting threads prefetch (WeightPrefetch). A thread that has waited kYieldSpins idle
// spins yields its core: its partner may have been descheduled by another process.
struct TeamBarrier {
  alignas(64) std::atomic<int> arrived{0};
  alignas(64) std::atomic<int> gen{0};
};
constexpr int64_t kYieldSpins = 1 << 14;

inline void team_wait(TeamBarrier& b, int T, WeightPrefetch& pf) {
  if (T == 1) return;
  const int g = b.gen.load(std::memory_order_acquire);  // gen moves only once all T arrived
  if (b.arrived.fetch_add(1, std::memory_order_acq_rel) == T - 1) {
    b.arrived.store(0, std::memory_order_relaxed);  // ordered before the release of gen
    b.gen.store(g + 1, std::memory_order_release);
    return;
  }
  int64_t idle = 0;
  while (b.gen.load(std::memory_order_acquire) == g) {
    if (pf.step()) continue;
    _mm_pause();
    if (++idle > kYieldSpins) std::this_thread::yield();
  }
}

thread_local Arena t_request;  // the calling thread's per-request buffers (shared with its team)
thread_local Arena t_private;  // every team thread's own buffers

// Weight bytes up to which every thread computes a whole stage-A layer itself (in its own
// buffers) rather than its share of the outputs followed by a barrier.
constexpr int64_t kPrivateLayerBytes = 32 * 1024;

// The forward itself; every argument was checked by the caller (no throw in the team).
//
// Threads. One OpenMP team per request, not a team of the kernels' pool (common/parallel.h):
// a request lasts 10-400 us, and OpenMP's threads spin for the next region where the pool's
// workers sleep on a futex once idle, so the pool's team adds the wake-up of its second thread to
// every request (DLRM, 2 threads, three back-to-back pairs, bench/RESULTS_serving.md: p99 at N=1
// 22-38 us with OpenMP, 60-68 us with the pool team; p50 at N=64 193-202 vs 222-242 us).
// Stage A (user side, one row): small layers are computed by every thread (no barrier), large
// ones are split by output blocks (a barrier after each); each thread always gets the same
// blocks, so its share of the weights stays in its core's cache from request to request. Stage
// B (candidates): below kRowsPerThread rows per thread the layers are split by output blocks
// too, with a barrier per layer; the first top layer's shared part u is then needed only for the
// thread's own blocks, so it needs no barrier of its own. From kRowsPerThread rows per thread on,
// each thread runs the whole tower on its own rows.
void dlrm_forward(const Packed& P, const RowReader& rr, const int64_t* uid, const int64_t* cid,
                  const float* dense, int64_t N, float* out) {
  const int64_t D = P.D, F = P.F, W = P.maxw, Kvp = pad16(P.Pv), Fp = pad32(F);
  const int64_t Ksp = P.layers[P.nb].Kp, O1 = P.layers[P.nb].Ob * 16;
  const bool bf = P.bf16;
  const Layer* Ls = P.layers.data();
  const int64_t wbytes = bf ? 32 : 64;  // weight bytes per (padded input, output block)
  int nt = omp_in_parallel() ? 1 : at::get_num_threads();
  const bool row_split = N >= kRowsPerThread * nt;
  if (row_split) nt = static_cast<int>(std::min<int64_t>(nt, N / kRowsPerThread));
  // candidate pairs of the layer split: every thread computes all of them when that is cheap
  const bool zv_private = !row_split && N * P.Pv <= 1024;
  Arena& A = t_request;
  A.reserve(arena_bytes(3 * W + O1 + sizeof(TeamBarrier) / 4 +
                       (row_split ? 0 : N * (3 * W + 2 * Kvp + 16))));
  float* s0 = A.take<float>(W);               // [W] stage-A outputs of split layers (ping)
  float* s1 = A.take<float>(W);               // (pong)
  float* u = A.take<float>(O1);               // [O1] first top layer, shared part (+ bias)
  const int64_t nzv = row_split || zv_private ? 0 : N;
  float* zv = A.take<float>(nzv * Kvp);       // [N, Kvp] candidate pairs (layer split)
  uint32_t* zb = A.take<uint32_t>(nzv * Kvp / 2);
  const int64_t nh = row_split ? 0 : N;
  float* h0 = A.take<float>(nh * W);          // [N, W] activations (layer split)
  float* h1 = A.take<float>(nh * W);
  uint32_t* g0 = A.take<uint32_t>(nh * W / 2);
  uint32_t* g1 = A.take<uint32_t>(nh * W / 2);
  float* head = A.take<float>(nh * 16);       // [N, 16] head outputs
  // shared bf16 stage-A outputs live right after the float ones: [W / 2] each
  uint32_t* sb0 = A.take<uint32_t>(W / 2);
  uint32_t* sb1 = A.take<uint32_t>(W / 2);
  TeamBarrier* bar = new (A.take<TeamBarrier>(1)) TeamBarrier();
  const int64_t* gidx = P.gidx.data();

#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int tid = omp_get_thread_num(), T = omp_get_num_threads();
    auto split = [&](int64_t n) { return std::make_pair(n * tid / T, n * (tid + 1) / T); };
    // the team barrier, prefetching this thread's blocks of layer l (none when l == P.L)
    WeightPrefetch pf;
    auto barrier_before = [&](int64_t l) {
      pf.n = 0;
      if (l < P.L) {
        const bool priv = l < P.nb && Ls[l].Kp * Ls[l].Ob * wbytes <= kPrivateLayerBytes;
        pf.set(Ls[l], priv ? std::make_pair(int64_t(0), Ls[l].Ob) : split(Ls[l].Ob), wbytes);
      }
      team_wait(*bar, T, pf);
    };
    Arena& PA = t_private;
    const int64_t tile = row_split ? kTile : 0, zrows = zv_private ? N : 0;
    PA.reserve(arena_bytes(F * D + 4 * W + 2 * Ksp + (zrows + tile) * 2 * Kvp +
                           tile * (3 * W + 16) + (D + 2 * F + 2) * Fp + 2 * F));
    float* fields = PA.take<float>(F * D);    // [F, D] shared fields, then candidate rows
    float* FT = PA.take<float>(D * Fp);       // [D, Fp] fields transposed
    float* G = PA.take<float>(F * Fp);        // [F, Fp] Gram rows
    int64_t* rowf = PA.take<int64_t>(F);
    float* p0 = PA.take<float>(W);            // [W] private stage-A activations (ping)
    float* p1 = PA.take<float>(W);
    uint32_t* pb0 = PA.take<uint32_t>(W / 2);
    uint32_t* pb1 = PA.take<uint32_t>(W / 2);
    float* s = PA.take<float>(Ksp);           // [Ksp] shared columns: dense vector, shared pairs
    uint32_t* sb = PA.take<uint32_t>(Ksp / 2);

    // ---- stage A: the user/context side, once per request
    std::memset(fields, 0, sizeof(float) * F * D);
    for (int64_t i = 0; i < P.Tu; ++i) rr.row(P.ubase[i] + uid[i], fields + P.ufield[i] * D);
    const float* xa = p1;
    const uint32_t* xb = pb1;
    if (P.hb) {
      const int64_t Kp = Ls[0].Kp;
      std::memset(p1, 0, sizeof(float) * Kp);
      std::memcpy(p1, dense, sizeof(float) * P.Kd);
      if (bf) pack_bf16(p1, Kp, pb1);
    }
    int split_count = 0;
    for (int64_t l = 0; l < P.nb; ++l) {
      const Layer& ly = Ls[l];
      const bool last = l == P.nb - 1;
      const bool priv = ly.Kp * ly.Ob * wbytes <= kPrivateLayerBytes;
      float* ya;
      uint32_t* yb;
      int64_t ob0 = 0, ob1 = ly.Ob;
      if (priv) {
        ya = (xa == p0) ? p1 : p0;
        yb = (xa == p0) ? pb1 : pb0;
      } else {
        ya = (split_count % 2 == 0) ? s0 : s1;
        yb = (split_count % 2 == 0) ? sb0 : sb1;
        ++split_count;
        const auto r = split(ly.Ob);
        ob0 = r.first, ob1 = r.second;
      }
      run_layer(P, ly, bf ? static_cast<const void*>(xb) : xa, 0, 1, ob0, ob1, nullptr,
                (!bf || last) ? ya : nullptr, 0, bf && !last ? yb : nullptr, 0);
      if (!priv) barrier_before(l + 1);  // l + 1 == P.nb: u, split as the layer split
      xa = ya, xb = yb;
    }
    if (P.hb) std::memcpy(fields, xa, sizeof(float) * D);  // field 0: the bottom MLP's output
    shared_pairs(P, fields, FT, Fp, G, rowf, s, Ksp);
    if (bf) pack_bf16(s, Ksp, sb);
    // u = W_s s + b for this thread's blocks of the first top layer
    const auto r1 = split(Ls[P.nb].Ob);
    run_layer(P, Ls[P.nb], bf ? static_cast<const void*>(sb) : s, 0, 1, r1.first,
              r1.second, nullptr, u, 0, nullptr, 0);

    // ---- stage B: the candidates
    const int64_t Lh = P.L - 1;
    if (!row_split) {
      const void* x;
      int64_t ldx = bf ? Kvp / 2 : Kvp;
      if (zv_private) {
        float* pz = PA.take<float>(N * Kvp);
        uint32_t* pzb = PA.take<uint32_t>(N * Kvp / 2);
        candidate_pairs(P, rr, cid, 0, N, fields, FT, Fp, G, gidx, pz, bf ? pzb : nullptr);
        x = bf ? static_cast<const void*>(pzb) : pz;
      } else {
        const auto r = split(N);
        candidate_pairs(P, rr, cid, r.first, r.second - r.first, fields, FT, Fp, G, gidx,
                        zv + r.first * Kvp, bf ? zb + r.first * (Kvp / 2) : nullptr);
        x = bf ? static_cast<const void*>(zb) : zv;
        barrier_before(P.nb + 1);
      }
      for (int64_t l = P.nb + 1; l <= Lh; ++l) {
        const bool ping = (l - P.nb) % 2 == 1, is_head = l == Lh;
        float* y = is_head ? head : (ping ? h0 : h1);
        uint32_t* yb = ping ? g0 : g1;
        // the first candidate layer keeps the blocks of u this thread computed
        const auto r = (l == P.nb + 1) ? r1 : split(Ls[l].Ob);
        run_layer(P, Ls[l], x, ldx, N, r.first, r.second, l == P.nb + 1 ? u : nullptr,
                  (!bf || is_head) ? y : nullptr, is_head ? 16 : W,
                  (bf && !is_head) ? yb : nullptr, W / 2);
        if (is_head) {
          if (r.first == 0 && r.second > 0)
            for (int64_t m = 0; m < N; ++m) out[m] = sigmoidf(head[m * 16]);
        } else {
          x = bf ? static_cast<const void*>(yb) : y;
          ldx = bf ? W / 2 : W;
          barrier_before(l + 1);
        }
      }
    } else {
      barrier_before(P.L);
      // row split: each thread runs the whole tower on its rows, tile by tile (u is complete)
      float* tz = PA.take<float>(kTile * Kvp);
      uint32_t* tzb = PA.take<uint32_t>(kTile * Kvp / 2);
      float* t0 = PA.take<float>(kTile * W);
      uint32_t* tb0 = PA.take<uint32_t>(kTile * W / 2);
      uint32_t* tb1 = PA.take<uint32_t>(kTile * W / 2);
      float* t1 = PA.take<float>(kTile * W);
      float* th = PA.take<float>(kTile * 16);
      const auto r = split(N);
      for (int64_t m0 = r.first; m0 < r.second; m0 += kTile) {
        const int64_t M = std::min(kTile, r.second - m0);
        candidate_pairs(P, rr, cid, m0, M, fields, FT, Fp, G, gidx, tz, bf ? tzb : nullptr);
        const void* x = bf ? static_cast<const void*>(tzb) : tz;
        int64_t ldx = bf ? Kvp / 2 : Kvp;
        for (int64_t l = P.nb + 1; l <= Lh; ++l) {
          const bool ping = (l - P.nb) % 2 == 1, is_head = l == Lh;
          float* y = is_head ? th : (ping ? t0 : t1);
          uint32_t* yb = ping ? tb0 : tb1;
          run_layer(P, Ls[l], x, ldx, M, 0, Ls[l].Ob, l == P.nb + 1 ? u : nullptr,
                    (!bf || is_head) ? y : nullptr, is_head ? 16 : W,
                    (bf && !is_head) ? yb : nullptr, W / 2);
          x = bf ? static_cast<const void*>(yb) : y;
          ldx = bf ? W / 2 : W;
        }
        for (int64_t m = 0; m < M; ++m) out[m0 + m] = sigmoidf(th[m * 16]);
      }
    }
  }
}

// Every id and dense value of a request is checked before the team starts (nothing may throw
// inside it): uid [Tu], cid [N, Tc], dense [Kd].
void check_request(const Packed& P, const int64_t* uid, const int64_t* cid, int64_t N,
                   const float* dense) {
  for (int64_t i = 0; i < P.Tu; ++i)
    TORCH_CHECK_INDEX(uid[i] >= 0 && uid[i] < P.ucard[i], kOpP, ": user_ids[", i, "] = ", uid[i],
                      " is out of range [0, ", P.ucard[i], ")");
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < P.Tc; ++c) {
      const int64_t id = cid[n * P.Tc + c];
      TORCH_CHECK_INDEX(id >= 0 && id < P.ccard[c], kOpP, ": cand_ids[", n, ", ", c, "] = ", id,
                        " is out of range [0, ", P.ccard[c], ")");
    }
  for (int64_t k = 0; k < P.Kd; ++k)
    TORCH_CHECK_VALUE(!std::isnan(dense[k]), kOpP, ": dense[", k, "] is NaN");
}

}  // namespace

// meta [H] int64 + blob [bytes] uint8: the packed model (pack_dlrm); weights [R, D] float32 /
// float16 / uint8 (+ scale_bias [R, 2]); user_ids [Tu] int64 ids within their tables, in the
// packed user-slot order; cand_ids [N, Tc] int64 likewise; dense [Kd] float32 (shared by every
// candidate) -> probabilities [N] float32.
at::Tensor serving_dlrm_cpu(const at::Tensor& meta, const at::Tensor& blob, const at::Tensor& weights,
                            const std::optional<at::Tensor>& scale_bias, const at::Tensor& user_ids_,
                            const at::Tensor& cand_ids_, const at::Tensor& dense_) {
  const RowReader rr = make_reader(weights, scale_bias);
  const Packed P = parse(meta, blob, weights.size(0), rr.D);
  TORCH_CHECK_TYPE(user_ids_.scalar_type() == at::kLong && cand_ids_.scalar_type() == at::kLong,
                   kOpP, ": user_ids and cand_ids must be int64, got ", user_ids_.scalar_type(),
                   " and ", cand_ids_.scalar_type());
  TORCH_CHECK_TYPE(dense_.scalar_type() == at::kFloat, kOpP, ": dense must be float32, got ",
                   dense_.scalar_type());
  TORCH_CHECK_VALUE(user_ids_.dim() == 1 && user_ids_.size(0) == P.Tu, kOpP, ": user_ids must be [",
                    P.Tu, "], got ", user_ids_.sizes());
  TORCH_CHECK_VALUE(cand_ids_.dim() == 2 && cand_ids_.size(1) == P.Tc, kOpP,
                    ": cand_ids must be [N, ", P.Tc, "], got ", cand_ids_.sizes());
  TORCH_CHECK_VALUE(dense_.dim() == 1 && dense_.size(0) == P.Kd, kOpP, ": dense must be [", P.Kd,
                    "] (shared by every candidate), got ", dense_.sizes());
  const int64_t N = cand_ids_.size(0);
  TORCH_CHECK_VALUE(N >= 1, kOpP, ": empty candidate list");
  const auto user_ids = user_ids_.contiguous();
  const auto cand_ids = cand_ids_.contiguous();
  const auto dense = dense_.contiguous();
  const int64_t* uid = user_ids.data_ptr<int64_t>();
  const int64_t* cid = cand_ids.data_ptr<int64_t>();
  const float* pd = dense.data_ptr<float>();
  check_request(P, uid, cid, N, pd);
  auto out = at::empty({N}, at::TensorOptions().dtype(at::kFloat));
  dlrm_forward(P, rr, uid, cid, pd, N, out.data_ptr<float>());
  return out;
}

// ---------------------------------------------------------------------------- ServingDLRM
struct ServingDLRM::Impl {
  Packed P;
  RowReader rr;
};

ServingDLRM::ServingDLRM(const int64_t* meta, int64_t n_meta, const uint8_t* blob, int64_t n_blob,
                         const void* weights, TableDtype dtype, int64_t R, int64_t D,
                         const float* scale_bias)
    : impl_(std::make_unique<Impl>()) {
  TORCH_CHECK_VALUE(R >= 0 && D >= 1, kOpP, ": weights must be [R, D] with D >= 1");
  impl_->rr = reader_of(weights, dtype, D, scale_bias, kOpP);
  impl_->P = parse(meta, n_meta, blob, n_blob, R, D);
}

ServingDLRM::~ServingDLRM() = default;

int64_t ServingDLRM::num_user() const { return impl_->P.Tu; }
int64_t ServingDLRM::num_cand() const { return impl_->P.Tc; }
int64_t ServingDLRM::num_dense() const { return impl_->P.Kd; }

void ServingDLRM::score(const int64_t* user_ids, const int64_t* cand_ids, int64_t N,
                        const float* dense, float* out) const {
  TORCH_CHECK_VALUE(N >= 1, kOpP, ": empty candidate list");
  check_request(impl_->P, user_ids, cand_ids, N, dense);
  dlrm_forward(impl_->P, impl_->rr, user_ids, cand_ids, dense, N, out);
}

TORCH_LIBRARY_IMPL(adrec, CPU, m) {
  m.impl("serving_forward", &serving_forward_cpu);
  m.impl("serving_dlrm", &serving_dlrm_cpu);
}

}  // namespace adrec
