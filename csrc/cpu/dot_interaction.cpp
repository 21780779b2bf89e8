// SPDX-License-Identifier: Apache-2.0
// DLRM pairwise dot interaction on the CPU: adrec::parallel_for over blocks of samples; per sample
// a small Gram product in a per-thread buffer, vectorised over 16-wide chunks (of fields j in the
// forward, of columns d in the backward), accumulating in acc_t.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/acc_type.h"
#include "common/checks.h"
#include "common/cpu_isa.h"
#include "common/parallel.h"

namespace adrec {
namespace {

constexpr const char* kOp = "dot_interaction";
constexpr const char* kOpBwd = "dot_interaction_bwd";
// Vector chunk width: one AVX-512 register of floats. Fields are padded to a multiple of it.
constexpr int64_t kW = 16;
// Rows computed together: independent accumulator chains hide the FMA latency.
constexpr int64_t kR = 4;

int64_t num_pairs(int64_t F, bool self) { return self ? F * (F + 1) / 2 : F * (F - 1) / 2; }

// Start of row i's pairs (i, j0..F-1) in the row-major pair list, j0 = i (self) or i + 1.
ADREC_INLINE int64_t row_start(int64_t i, int64_t F, bool self) {
  return self ? i * F - i * (i - 1) / 2 : i * (F - 1) - i * (i - 1) / 2;
}

// Forward for samples [b0, b1). et [D, Fp] holds the sample transposed (zero-padded fields) so
// the inner loop runs over 16 consecutive j with e[i, d] broadcast; only the column chunks that
// reach the upper triangle are computed, then the pairs j >= j0 of each row are copied out.
template <typename scalar_t>
ADREC_INLINE void dot_fwd_block(const scalar_t* emb /* [B, F, D] */, scalar_t* out /* [B, P] */,
                                acc_t<scalar_t>* et /* [D, Fp] */, int64_t b0, int64_t b1,
                                int64_t F, int64_t D, bool self) {
  using acc = acc_t<scalar_t>;
  const int64_t Fp = (F + kW - 1) / kW * kW;
  const int64_t P = num_pairs(F, self);
  const int64_t off = self ? 0 : 1;
  for (int64_t d = 0; d < D; ++d)
    for (int64_t j = F; j < Fp; ++j) et[d * Fp + j] = acc(0);
  for (int64_t b = b0; b < b1; ++b) {
    const scalar_t* e = emb + b * F * D;  // [F, D]
    scalar_t* o = out + b * P;            // [P]
    for (int64_t j = 0; j < F; ++j)
      for (int64_t d = 0; d < D; ++d) et[d * Fp + j] = static_cast<acc>(e[j * D + d]);
    for (int64_t i0 = 0; i0 < F; i0 += kR) {
      const int64_t nr = std::min(kR, F - i0);
      // Chunks left of i0 + off hold no pair of these rows.
      for (int64_t c = (i0 + off) / kW * kW; c < F; c += kW) {
        acc a[kR][kW];  // [kR, kW] gram rows i0.., columns c..c+kW
        for (int64_t r = 0; r < kR; ++r)
          for (int64_t jj = 0; jj < kW; ++jj) a[r][jj] = acc(0);
        for (int64_t d = 0; d < D; ++d) {
          const acc* col = et + d * Fp + c;  // [kW]
          for (int64_t r = 0; r < kR; ++r) {
            // Rows past F (last block) repeat row F-1; their results are not stored.
            const acc x = et[d * Fp + std::min(i0 + r, F - 1)];
            for (int64_t jj = 0; jj < kW; ++jj) a[r][jj] += x * col[jj];
          }
        }
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t i = i0 + r;
          const int64_t j_lo = std::max(c, i + off), j_hi = std::min(c + kW, F);
          scalar_t* dst = o + row_start(i, F, self) - (i + off);
          for (int64_t j = j_lo; j < j_hi; ++j) dst[j] = static_cast<scalar_t>(a[r][j - c]);
        }
      }
    }
  }
}

// grad_emb[i, :] = sum_j G[i, j] e[j, :] with G the symmetric [F, F] matrix of pair gradients
// (diagonal 2 * g(i, i) with self interaction, else 0). Chunks of 16 columns, kR rows at once.
template <bool FULL, typename scalar_t>
ADREC_INLINE void dot_bwd_chunk(const acc_t<scalar_t>* G /* [F, F] */,
                                const scalar_t* e /* [F, D] at d0 */, scalar_t* ge /* [F, D] at d0 */,
                                int64_t F, int64_t D, int64_t n) {
  using acc = acc_t<scalar_t>;
  const int64_t m = FULL ? kW : n;
  for (int64_t i0 = 0; i0 < F; i0 += kR) {
    const int64_t nr = std::min(kR, F - i0);
    acc a[kR][kW];  // [kR, kW]
    for (int64_t r = 0; r < kR; ++r)
      for (int64_t d = 0; d < kW; ++d) a[r][d] = acc(0);
    for (int64_t j = 0; j < F; ++j) {
      const scalar_t* ej = e + j * D;
      acc ev[kW];
      for (int64_t d = 0; d < kW; ++d) ev[d] = d < m ? static_cast<acc>(ej[d]) : acc(0);
      for (int64_t r = 0; r < kR; ++r) {
        const acc g = G[std::min(i0 + r, F - 1) * F + j];
        for (int64_t d = 0; d < kW; ++d) a[r][d] += g * ev[d];
      }
    }
    for (int64_t r = 0; r < nr; ++r) {
      scalar_t* dst = ge + (i0 + r) * D;
      for (int64_t d = 0; d < m; ++d) dst[d] = static_cast<scalar_t>(a[r][d]);
    }
  }
}

template <typename scalar_t>
ADREC_INLINE void dot_bwd_block(const scalar_t* grad_out /* [B, P], row stride ldg */, int64_t ldg,
                                const scalar_t* emb /* [B, F, D] */,
                                scalar_t* grad_emb /* [B, F, D] */,
                                acc_t<scalar_t>* G /* [F, F] */, int64_t b0, int64_t b1,
                                int64_t F, int64_t D, bool self) {
  using acc = acc_t<scalar_t>;
  const int64_t P = num_pairs(F, self);
  const int64_t off = self ? 0 : 1;
  if (!self)
    for (int64_t i = 0; i < F; ++i) G[i * F + i] = acc(0);
  for (int64_t b = b0; b < b1; ++b) {
    const scalar_t* g = grad_out + b * ldg;  // [P]
    for (int64_t i = 0; i < F; ++i) {
      const scalar_t* gi = g + row_start(i, F, self) - (i + off);
      for (int64_t j = i + off; j < F; ++j) {
        const acc v = static_cast<acc>(gi[j]);
        G[i * F + j] = v;
        G[j * F + i] = v;
      }
      if (self) G[i * F + i] = acc(2) * static_cast<acc>(gi[i]);
    }
    const scalar_t* e = emb + b * F * D;
    scalar_t* ge = grad_emb + b * F * D;
    int64_t d0 = 0;
    for (; d0 + kW <= D; d0 += kW) dot_bwd_chunk<true>(G, e + d0, ge + d0, F, D, kW);
    if (d0 < D) dot_bwd_chunk<false>(G, e + d0, ge + d0, F, D, D - d0);
  }
}

// float32 fast paths: the same loops with GCC vector types, so the kR accumulators stay in
// registers (the array versions above keep them in memory and run several times slower).
typedef float vf16 __attribute__((vector_size(64)));

template <bool FULL>
ADREC_INLINE void load16(vf16& v, const float* p, int64_t n) {
  if (FULL) {
    std::memcpy(&v, p, sizeof(v));
  } else {
    float tmp[kW] = {};
    std::memcpy(tmp, p, n * sizeof(float));
    std::memcpy(&v, tmp, sizeof(v));
  }
}

ADREC_INLINE void dot_fwd_block_f32(const float* emb /* [B, F, D] */, float* out /* [B, P] */,
                                    float* et /* [D, Fp] */, int64_t b0, int64_t b1,
                                    int64_t F, int64_t D, bool self) {
  const int64_t Fp = (F + kW - 1) / kW * kW;
  const int64_t P = num_pairs(F, self);
  const int64_t off = self ? 0 : 1;
  for (int64_t d = 0; d < D; ++d)
    for (int64_t j = F; j < Fp; ++j) et[d * Fp + j] = 0.0f;
  for (int64_t b = b0; b < b1; ++b) {
    const float* e = emb + b * F * D;  // [F, D]
    float* o = out + b * P;            // [P]
    for (int64_t j = 0; j < F; ++j)
      for (int64_t d = 0; d < D; ++d) et[d * Fp + j] = e[j * D + d];
    for (int64_t i0 = 0; i0 < F; i0 += kR) {
      const int64_t nr = std::min(kR, F - i0);
      int64_t rows[kR];  // rows past F (last block) repeat row F-1; not stored
      for (int64_t r = 0; r < kR; ++r) rows[r] = std::min(i0 + r, F - 1);
      for (int64_t c = (i0 + off) / kW * kW; c < F; c += kW) {
        vf16 a0 = {}, a1 = {}, a2 = {}, a3 = {}, col;  // gram rows i0..i0+3, columns c..c+15
        for (int64_t d = 0; d < D; ++d) {
          const float* et_d = et + d * Fp;
          std::memcpy(&col, et_d + c, sizeof(col));
          a0 += et_d[rows[0]] * col;
          a1 += et_d[rows[1]] * col;
          a2 += et_d[rows[2]] * col;
          a3 += et_d[rows[3]] * col;
        }
        float a[kR][kW];
        std::memcpy(a[0], &a0, sizeof(a0));
        std::memcpy(a[1], &a1, sizeof(a1));
        std::memcpy(a[2], &a2, sizeof(a2));
        std::memcpy(a[3], &a3, sizeof(a3));
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t i = i0 + r;
          const int64_t j_lo = std::max(c, i + off), j_hi = std::min(c + kW, F);
          float* dst = o + row_start(i, F, self) - (i + off);
          for (int64_t j = j_lo; j < j_hi; ++j) dst[j] = a[r][j - c];
        }
      }
    }
  }
}

template <bool FULL>
ADREC_INLINE void dot_bwd_f32_chunk(const float* G /* [F, F] */, const float* e /* [F, D] at d0 */,
                                    float* ge /* [F, D] at d0 */, int64_t F, int64_t D, int64_t n) {
  for (int64_t i0 = 0; i0 < F; i0 += kR) {
    const int64_t nr = std::min(kR, F - i0);
    const float* g[kR];  // rows of G; rows past F repeat row F-1 and are not stored
    for (int64_t r = 0; r < kR; ++r) g[r] = G + std::min(i0 + r, F - 1) * F;
    vf16 a0 = {}, a1 = {}, a2 = {}, a3 = {}, ev;
    for (int64_t j = 0; j < F; ++j) {
      load16<FULL>(ev, e + j * D, n);
      a0 += g[0][j] * ev;
      a1 += g[1][j] * ev;
      a2 += g[2][j] * ev;
      a3 += g[3][j] * ev;
    }
    const vf16* acc[kR] = {&a0, &a1, &a2, &a3};
    for (int64_t r = 0; r < nr; ++r)
      std::memcpy(ge + (i0 + r) * D, acc[r], (FULL ? kW : n) * sizeof(float));
  }
}

ADREC_INLINE void dot_bwd_block_f32(const float* grad_out /* [B, P], row stride ldg */, int64_t ldg,
                                    const float* emb /* [B, F, D] */,
                                    float* grad_emb /* [B, F, D] */, float* G /* [F, F] */,
                                    int64_t b0, int64_t b1, int64_t F, int64_t D, bool self) {
  const int64_t P = num_pairs(F, self);
  const int64_t off = self ? 0 : 1;
  if (!self)
    for (int64_t i = 0; i < F; ++i) G[i * F + i] = 0.0f;
  for (int64_t b = b0; b < b1; ++b) {
    const float* gp = grad_out + b * ldg;  // [P]
    for (int64_t i = 0; i < F; ++i) {
      const float* gi = gp + row_start(i, F, self) - (i + off);
      for (int64_t j = i + off; j < F; ++j) G[i * F + j] = G[j * F + i] = gi[j];
      if (self) G[i * F + i] = 2.0f * gi[i];
    }
    const float* e = emb + b * F * D;
    float* ge = grad_emb + b * F * D;
    int64_t d0 = 0;
    for (; d0 + kW <= D; d0 += kW) dot_bwd_f32_chunk<true>(G, e + d0, ge + d0, F, D, kW);
    if (d0 < D) dot_bwd_f32_chunk<false>(G, e + d0, ge + d0, F, D, D - d0);
  }
}

int64_t grain_for(int64_t per_sample) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, per_sample));
}

}  // namespace

at::Tensor dot_interaction_cpu(const at::Tensor& emb_, bool self_interaction) {
  check_floating(emb_, kOp, "emb");
  check_dim(emb_, 3, kOp, "emb", "[B, F, D]");
  auto emb = emb_.contiguous();  // [B, F, D]
  const int64_t B = emb.size(0), F = emb.size(1), D = emb.size(2);
  const int64_t P = num_pairs(F, self_interaction);
  auto out = at::empty({B, P}, emb.options());  // [B, P]
  if (B == 0 || P == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emb.scalar_type(), "dot_interaction_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* e = emb.template data_ptr<scalar_t>();
    scalar_t* o = out.template data_ptr<scalar_t>();
    const int64_t Fp = (F + kW - 1) / kW * kW;
    parallel_for(0, B, grain_for(F * F * D), [&](int64_t b0, int64_t b1) {
      isa_dispatch([&](auto) ADREC_LAMBDA_INLINE {
        std::vector<acc> et(std::max<int64_t>(1, D * Fp));  // [D, Fp] per task
        if constexpr (std::is_same_v<scalar_t, float>) {
          // (casts: scalar_t is not a parameter of this lambda, so every dtype compiles both)
          dot_fwd_block_f32(reinterpret_cast<const float*>(e), reinterpret_cast<float*>(o),
                            reinterpret_cast<float*>(et.data()), b0, b1, F, D, self_interaction);
        } else {
          dot_fwd_block<scalar_t>(e, o, et.data(), b0, b1, F, D, self_interaction);
        }
      });
    });
  });
  return out;
}

at::Tensor dot_interaction_bwd_cpu(const at::Tensor& grad_out_, const at::Tensor& emb_,
                                   bool self_interaction) {
  check_floating(emb_, kOpBwd, "emb");
  check_dim(emb_, 3, kOpBwd, "emb", "[B, F, D]");
  check_same_dtype(grad_out_, emb_, kOpBwd, "grad_out", "emb");
  check_same_device(grad_out_, emb_, kOpBwd, "grad_out", "emb");
  const int64_t B = emb_.size(0), F = emb_.size(1), D = emb_.size(2);
  const int64_t P = num_pairs(F, self_interaction);
  TORCH_CHECK_VALUE(grad_out_.dim() == 2 && grad_out_.size(0) == B && grad_out_.size(1) == P,
                    kOpBwd, ": grad_out must have shape [B, P] = [", B, ", ", P, "], got ",
                    grad_out_.sizes());
  auto emb = emb_.contiguous();            // [B, F, D]
  // [B, P] with rows at any stride: the model's top MLP input is [dense, pairs], whose gradient
  // arrives as a column slice; reading it in place saves a copy of [B, P]
  const bool rows_ok = grad_out_.stride(1) == 1 || P <= 1;
  auto grad_out = rows_ok ? grad_out_ : grad_out_.contiguous();
  const int64_t ldg = B > 1 ? grad_out.stride(0) : P;
  auto grad_emb = at::empty_like(emb);     // [B, F, D]
  if (B == 0 || F == 0 || D == 0) return grad_emb;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emb.scalar_type(), "dot_interaction_bwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* g = grad_out.template data_ptr<scalar_t>();
    const scalar_t* e = emb.template data_ptr<scalar_t>();
    scalar_t* ge = grad_emb.template data_ptr<scalar_t>();
    parallel_for(0, B, grain_for(F * F * D), [&](int64_t b0, int64_t b1) {
      isa_dispatch([&](auto) ADREC_LAMBDA_INLINE {
        std::vector<acc> G(F * F);  // [F, F] per task
        if constexpr (std::is_same_v<scalar_t, float>) {
          dot_bwd_block_f32(reinterpret_cast<const float*>(g), ldg, reinterpret_cast<const float*>(e),
                            reinterpret_cast<float*>(ge), reinterpret_cast<float*>(G.data()), b0, b1,
                            F, D, self_interaction);
        } else {
          dot_bwd_block<scalar_t>(g, ldg, e, ge, G.data(), b0, b1, F, D, self_interaction);
        }
      });
    });
  });
  return grad_emb;
}

TORCH_LIBRARY_IMPL(adrec, CPU, m) {
  m.impl("dot_interaction", &dot_interaction_cpu);
  m.impl("dot_interaction_bwd", &dot_interaction_bwd_cpu);
}

}  // namespace adrec
