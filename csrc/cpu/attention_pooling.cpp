// SPDX-License-Identifier: Apache-2.0
// Target attention pooling on the CPU: adrec::parallel_for over blocks of samples; per sample the
// scores, a max-subtracted softmax and the weighted key sum in acc_t, with per-task buffers of
// the longest sequence; dot products per key, weighted sums vectorised over D.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "common/acc_type.h"
#include "common/checks.h"
#include "common/fast_math.h"
#include "common/cpu_isa.h"
#include "common/parallel.h"

namespace adrec {
namespace {

constexpr const char* kOp = "attention_pooling";
constexpr const char* kOpBwd = "attention_pooling_bwd";

// e^x for x <= 0 (scores minus their maximum).
ADREC_INLINE float exp_shifted(float x) { return exp_nonpos(x); }
ADREC_INLINE double exp_shifted(double x) { return std::exp(x); }

template <typename scalar_t>
ADREC_INLINE acc_t<scalar_t> dot(const acc_t<scalar_t>* q /* [D] */, const scalar_t* k /* [D] */,
                                 int64_t D) {
  using acc = acc_t<scalar_t>;
  acc s = 0;
  for (int64_t d = 0; d < D; ++d) s += q[d] * static_cast<acc>(k[d]);
  return s;
}

// Validated offsets as an int64 host copy [B+1].
struct Seqs {
  at::Tensor offsets;  // [B+1] int64, contiguous
  int64_t max_len = 0;
};

Seqs check_inputs(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& offsets,
                  const char* op) {
  check_floating(query, op, "query");
  check_dim(query, 2, op, "query", "[B, D]");
  check_dim(keys, 2, op, "keys", "[L_total, D]");
  check_same_dtype(keys, query, op, "keys", "query");
  check_same_device(keys, query, op, "keys", "query");
  check_index_dtype(offsets, op, "offsets");
  check_dim(offsets, 1, op, "offsets", "[B+1]");
  check_same_device(offsets, query, op, "offsets", "query");
  const int64_t B = query.size(0), L = keys.size(0);
  TORCH_CHECK_VALUE(keys.size(1) == query.size(1), op, ": keys has D=", keys.size(1),
                    " but query has D=", query.size(1));
  TORCH_CHECK_VALUE(offsets.numel() == B + 1, op, ": offsets must have B+1 = ", B + 1,
                    " entries, got ", offsets.numel());
  Seqs s;
  s.offsets = offsets.to(at::kLong).contiguous();
  const int64_t* o = s.offsets.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(o[0] == 0, op, ": offsets[0] must be 0, got ", o[0]);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(o[b + 1] >= o[b], op, ": offsets must be non-decreasing, but offsets[",
                      b + 1, "]=", o[b + 1], " < offsets[", b, "]=", o[b]);
    s.max_len = std::max(s.max_len, o[b + 1] - o[b]);
  }
  TORCH_CHECK_VALUE(o[B] == L, op, ": offsets[-1]=", o[B], " must equal keys.size(0)=", L);
  return s;
}

template <typename scalar_t>
ADREC_INLINE void attn_fwd_block(const scalar_t* query /* [B, D] */,
                                 const scalar_t* keys /* [L_total, D] */,
                                 const int64_t* o /* [B+1] */, scalar_t* out /* [B, D] */,
                                 scalar_t* probs /* [L_total] */,
                                 acc_t<scalar_t>* buf /* [max_len + D] */, int64_t b0,
                                 int64_t b1, int64_t D) {
  using acc = acc_t<scalar_t>;
  const acc scale = D > 0 ? acc(1) / std::sqrt(static_cast<acc>(D)) : acc(1);
  acc* q = buf;      // [D] scaled query
  acc* p = buf + D;  // [max_len] scores, then probabilities
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t l0 = o[b], n = o[b + 1] - o[b];
    const scalar_t* k = keys + l0 * D;  // [n, D]
    scalar_t* ob = out + b * D;         // [D]
    for (int64_t d = 0; d < D; ++d) q[d] = scale * static_cast<acc>(query[b * D + d]);
    acc m = -std::numeric_limits<acc>::infinity();
    for (int64_t l = 0; l < n; ++l) {
      p[l] = dot(q, k + l * D, D);
      m = std::max(m, p[l]);
    }
    for (int64_t l = 0; l < n; ++l) p[l] = exp_shifted(p[l] - m);  // vectorised for float
    acc z = 0;
    for (int64_t l = 0; l < n; ++l) z += p[l];
    const acc inv = n > 0 ? acc(1) / z : acc(0);
    // The pooled vector accumulates in q's place (q is no longer needed).
    for (int64_t d = 0; d < D; ++d) q[d] = acc(0);
    for (int64_t l = 0; l < n; ++l) {
      p[l] *= inv;
      probs[l0 + l] = static_cast<scalar_t>(p[l]);
      const scalar_t* kl = k + l * D;
      for (int64_t d = 0; d < D; ++d) q[d] += p[l] * static_cast<acc>(kl[d]);
    }
    for (int64_t d = 0; d < D; ++d) ob[d] = static_cast<scalar_t>(q[d]);
  }
}

// With s_l = q.k_l / sqrt(D), p = softmax(s), out = sum_l p_l k_l and g = d loss / d out:
//   gp_l = g.k_l, gs_l = p_l (gp_l - sum_m p_m gp_m),
//   grad_q = sum_l gs_l k_l / sqrt(D), grad_k_l = p_l g + gs_l q / sqrt(D).
template <typename scalar_t>
ADREC_INLINE void attn_bwd_block(const scalar_t* grad_out /* [B, D] */,
                                 const scalar_t* query /* [B, D] */,
                                 const scalar_t* keys /* [L_total, D] */,
                                 const int64_t* o /* [B+1] */,
                                 const scalar_t* probs /* [L_total] */,
                                 scalar_t* grad_q /* [B, D] */,
                                 scalar_t* grad_k /* [L_total, D] */,
                                 acc_t<scalar_t>* buf /* [max_len + 3D] */, int64_t b0,
                                 int64_t b1, int64_t D) {
  using acc = acc_t<scalar_t>;
  const acc scale = D > 0 ? acc(1) / std::sqrt(static_cast<acc>(D)) : acc(1);
  acc* g = buf;           // [D]
  acc* qs = buf + D;      // [D] query / sqrt(D)
  acc* gq = buf + 2 * D;  // [D]
  acc* gs = buf + 3 * D;  // [max_len]
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t l0 = o[b], n = o[b + 1] - o[b];
    const scalar_t* k = keys + l0 * D;  // [n, D]
    const scalar_t* pb = probs + l0;    // [n]
    for (int64_t d = 0; d < D; ++d) {
      g[d] = static_cast<acc>(grad_out[b * D + d]);
      qs[d] = scale * static_cast<acc>(query[b * D + d]);
      gq[d] = acc(0);
    }
    acc c = 0;
    for (int64_t l = 0; l < n; ++l) {
      gs[l] = dot(g, k + l * D, D);
      c += static_cast<acc>(pb[l]) * gs[l];
    }
    for (int64_t l = 0; l < n; ++l) {
      const acc pl = static_cast<acc>(pb[l]);
      const acc gsl = pl * (gs[l] - c);
      const scalar_t* kl = k + l * D;
      scalar_t* gkl = grad_k + (l0 + l) * D;
      for (int64_t d = 0; d < D; ++d) {
        gq[d] += gsl * static_cast<acc>(kl[d]);
        gkl[d] = static_cast<scalar_t>(pl * g[d] + gsl * qs[d]);
      }
    }
    for (int64_t d = 0; d < D; ++d) grad_q[b * D + d] = static_cast<scalar_t>(scale * gq[d]);
  }
}

int64_t grain_for(int64_t B, int64_t L, int64_t D) {
  const int64_t per_sample = std::max<int64_t>(1, (L / std::max<int64_t>(1, B) + 1) * D);
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / per_sample);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_pooling_cpu(const at::Tensor& query_,
                                                         const at::Tensor& keys_,
                                                         const at::Tensor& offsets) {
  Seqs s = check_inputs(query_, keys_, offsets, kOp);
  auto query = query_.contiguous();  // [B, D]
  auto keys = keys_.contiguous();    // [L_total, D]
  const int64_t B = query.size(0), D = query.size(1), L = keys.size(0);
  auto out = at::empty({B, D}, query.options());  // [B, D]
  auto probs = at::empty({L}, query.options());   // [L_total]
  if (B == 0) return {out, probs};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "attention_pooling_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* pq = query.template data_ptr<scalar_t>();
    const scalar_t* pk = keys.template data_ptr<scalar_t>();
    const int64_t* o = s.offsets.data_ptr<int64_t>();
    scalar_t* po = out.template data_ptr<scalar_t>();
    scalar_t* pp = probs.template data_ptr<scalar_t>();
    parallel_for(0, B, grain_for(B, L, D), [&](int64_t b0, int64_t b1) {
      isa_dispatch([&](auto) ADREC_LAMBDA_INLINE {
        std::vector<acc> buf(s.max_len + D + 1);
        attn_fwd_block<scalar_t>(pq, pk, o, po, pp, buf.data(), b0, b1, D);
      });
    });
  });
  return {out, probs};
}

std::tuple<at::Tensor, at::Tensor> attention_pooling_bwd_cpu(const at::Tensor& grad_out_,
                                                             const at::Tensor& query_,
                                                             const at::Tensor& keys_,
                                                             const at::Tensor& offsets,
                                                             const at::Tensor& probs_) {
  Seqs s = check_inputs(query_, keys_, offsets, kOpBwd);
  check_same_dtype(grad_out_, query_, kOpBwd, "grad_out", "query");
  check_same_dtype(probs_, query_, kOpBwd, "probs", "query");
  check_same_device(grad_out_, query_, kOpBwd, "grad_out", "query");
  check_same_device(probs_, query_, kOpBwd, "probs", "query");
  TORCH_CHECK_VALUE(grad_out_.sizes() == query_.sizes(), kOpBwd, ": grad_out has shape ",
                    grad_out_.sizes(), " but query has shape ", query_.sizes());
  TORCH_CHECK_VALUE(probs_.dim() == 1 && probs_.size(0) == keys_.size(0), kOpBwd,
                    ": probs must be [L_total] = [", keys_.size(0), "], got ", probs_.sizes());
  auto grad_out = grad_out_.contiguous();  // [B, D]
  auto query = query_.contiguous();        // [B, D]
  auto keys = keys_.contiguous();          // [L_total, D]
  auto probs = probs_.contiguous();        // [L_total]
  const int64_t B = query.size(0), D = query.size(1), L = keys.size(0);
  auto grad_q = at::empty_like(query);  // [B, D]
  auto grad_k = at::empty_like(keys);   // [L_total, D]; offsets cover every key, so all written
  if (B == 0) return {grad_q, grad_k};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "attention_pooling_bwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* pg = grad_out.template data_ptr<scalar_t>();
    const scalar_t* pq = query.template data_ptr<scalar_t>();
    const scalar_t* pk = keys.template data_ptr<scalar_t>();
    const scalar_t* pp = probs.template data_ptr<scalar_t>();
    const int64_t* o = s.offsets.data_ptr<int64_t>();
    scalar_t* pgq = grad_q.template data_ptr<scalar_t>();
    scalar_t* pgk = grad_k.template data_ptr<scalar_t>();
    parallel_for(0, B, grain_for(B, L, D), [&](int64_t b0, int64_t b1) {
      isa_dispatch([&](auto) ADREC_LAMBDA_INLINE {
        std::vector<acc> buf(s.max_len + 3 * D + 1);
        attn_bwd_block<scalar_t>(pg, pq, pk, o, pp, pgq, pgk, buf.data(), b0, b1, D);
      });
    });
  });
  return {grad_q, grad_k};
}

TORCH_LIBRARY_IMPL(adrec, CPU, m) {
  m.impl("attention_pooling", &attention_pooling_cpu);
  m.impl("attention_pooling_bwd", &attention_pooling_bwd_cpu);
}

}  // namespace adrec
