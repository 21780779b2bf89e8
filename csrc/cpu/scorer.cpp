// SPDX-License-Identifier: Apache-2.0
// Serving forward of DLRM and DCN-v2 in one native call: row lookup (fp32, fp16 or int8
// row-wise tables, dequantized on lookup), interaction, MLPs (at::linear -> BLAS), head and
// sigmoid. The user/context side (user-slot embeddings, the bottom MLP when the dense input is
// shared, DLRM dot products between two shared fields) is computed once per request and copied
// into every candidate row as a template; only the candidate slots are read per candidate.
// Candidate rows are filled by at::parallel_for over row blocks.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "common/checks.h"

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

RowReader make_reader(const at::Tensor& w, const std::optional<at::Tensor>& scale_bias) {
  check_dim(w, 2, kOp, "weights", "[R, D]");
  TORCH_CHECK_VALUE(w.is_contiguous(), kOp, ": weights must be contiguous");
  RowReader rr;
  rr.D = w.size(1);
  if (w.scalar_type() == at::kFloat) {
    rr.f32 = w.data_ptr<float>();
  } else if (w.scalar_type() == at::kHalf) {
    rr.f16 = w.data_ptr<at::Half>();
  } else if (w.scalar_type() == at::kByte) {
    TORCH_CHECK_VALUE(scale_bias.has_value(), kOp, ": uint8 weights need scale_bias [R, 2]");
    const auto& sb = *scale_bias;
    TORCH_CHECK_TYPE(sb.scalar_type() == at::kFloat, kOp, ": scale_bias must be float32");
    TORCH_CHECK_VALUE(sb.dim() == 2 && sb.size(0) == w.size(0) && sb.size(1) == 2 &&
                          sb.is_contiguous(),
                      kOp, ": scale_bias must be contiguous [R, 2] = [", w.size(0), ", 2], got ",
                      sb.sizes());
    rr.q8 = w.data_ptr<uint8_t>();
    rr.scale_bias = sb.data_ptr<float>();
  } else {
    TORCH_CHECK_TYPE(false, kOp, ": weights must be float32, float16 or uint8, got ",
                     w.scalar_type());
  }
  return rr;
}

at::Tensor mlp_relu(at::Tensor x, at::TensorList wb, size_t begin, size_t end) {
  for (size_t i = begin; i + 1 < end; i += 2) {
    x = at::linear(x, wb[i], wb[i + 1]);  // [B, out] = x @ W.T + b
    x.relu_();
  }
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
      d = at::linear(dense, bottom[0], bottom[1]).relu_();
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
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
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
        const auto u = at::addmv(layers[1], layers[0].index_select(1, S), r0.index_select(0, S));
        auto h = at::addmm(u, top_in.index_select(1, V), layers[0].index_select(1, V).t());
        top_in = mlp_relu(h.relu_(), layers, 2, layers.size());
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
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
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
        auto first = [&](size_t i) {  // x0 @ W_i.T + b_i with the shared part as a bias
          const auto u = at::addmv(layers[i + 1], layers[i].index_select(1, S), r0s);
          return at::addmm(u, x0v, layers[i].index_select(1, V).t());
        };
        if (n_cross > 0) xw0 = first(0);
        if (kind == kDCNParallel && layers.size() > di) h0 = first(di).relu_();
      }
    }
    at::Tensor x = x0;
    for (int64_t l = 0; l < n_cross; ++l) {
      const auto xw = (l == 0 && xw0.defined()) ? xw0
                                                : at::linear(x, layers[2 * l], layers[2 * l + 1]);
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
  TORCH_CHECK_VALUE(head_w.dim() == 1 && head_w.size(0) == top_in.size(1), kOp,
                    ": head_w must be [", top_in.size(1), "], got ", head_w.sizes());
  return at::sigmoid(at::add(at::mv(top_in, head_w), head_b));  // [N]
}

TORCH_LIBRARY_IMPL(adrec, CPU, m) { m.impl("serving_forward", &serving_forward_cpu); }

}  // namespace adrec
