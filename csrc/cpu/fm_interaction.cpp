// SPDX-License-Identifier: Apache-2.0
// FM second-order term on the CPU: adrec::parallel_for over blocks of samples; per sample one pass
// over its [F, D] embeddings in 16-wide column chunks (vectorised over D), float32 summed in
// double in the forward, acc_t otherwise.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/acc_type.h"
#include "common/checks.h"
#include "common/cpu_isa.h"
#include "common/parallel.h"

namespace adrec {
namespace {

constexpr const char* kOp = "fm_interaction";
constexpr const char* kOpBwd = "fm_interaction_bwd";
// Column chunk: D is walked in chunks of kW columns with a fixed-width inner loop (one AVX-512
// register of floats), so every D vectorises; a shorter tail chunk covers odd D.
constexpr int64_t kW = 16;

// The forward subtracts two sums of squares that are ~F times larger than their difference, so
// float32 inputs accumulate in double: the result is then accurate to float32 rounding (the
// float32 reference is not), at no cost that shows in a memory-bound pass.
template <typename scalar_t>
using fwd_acc_t = std::conditional_t<std::is_same_v<scalar_t, float>, double, acc_t<scalar_t>>;

// sum_{d in chunk} (sum_f e[f, d])^2 - sum_f e[f, d]^2 for the columns [0, n) of `e`.
template <bool FULL, typename scalar_t>
ADREC_INLINE fwd_acc_t<scalar_t> fm_chunk(const scalar_t* e /* [F, D] at column d0 */, int64_t F,
                                          int64_t D, int64_t n) {
  using acc = fwd_acc_t<scalar_t>;
  const int64_t m = FULL ? kW : n;
  acc s[kW], q[kW];  // [kW] sum and sum of squares over fields
  for (int64_t d = 0; d < kW; ++d) s[d] = q[d] = acc(0);
  for (int64_t f = 0; f < F; ++f) {
    const scalar_t* r = e + f * D;
    for (int64_t d = 0; d < m; ++d) {
      const acc v = static_cast<acc>(r[d]);
      s[d] += v;
      q[d] += v * v;
    }
  }
  acc t = 0;
  for (int64_t d = 0; d < m; ++d) t += s[d] * s[d] - q[d];
  return t;
}

template <typename scalar_t>
ADREC_INLINE void fm_fwd_block(const scalar_t* emb /* [B, F, D] */, scalar_t* out /* [B] */,
                               int64_t b0, int64_t b1, int64_t F, int64_t D) {
  using acc = fwd_acc_t<scalar_t>;
  for (int64_t b = b0; b < b1; ++b) {
    const scalar_t* e = emb + b * F * D;  // [F, D]
    acc t = 0;
    int64_t d0 = 0;
    for (; d0 + kW <= D; d0 += kW) t += fm_chunk<true>(e + d0, F, D, kW);
    if (d0 < D) t += fm_chunk<false>(e + d0, F, D, D - d0);
    out[b] = static_cast<scalar_t>(acc(0.5) * t);
  }
}

// grad_emb[f, d] = g * (sum_f' e[f', d] - e[f, d]) for the columns [0, n).
template <bool FULL, typename scalar_t>
ADREC_INLINE void fm_bwd_chunk(const scalar_t* e /* [F, D] at d0 */, scalar_t* ge /* [F, D] at d0 */,
                               acc_t<scalar_t> g, int64_t F, int64_t D, int64_t n) {
  using acc = acc_t<scalar_t>;
  const int64_t m = FULL ? kW : n;
  acc s[kW];  // [kW] sum over fields
  for (int64_t d = 0; d < kW; ++d) s[d] = acc(0);
  for (int64_t f = 0; f < F; ++f) {
    const scalar_t* r = e + f * D;
    for (int64_t d = 0; d < m; ++d) s[d] += static_cast<acc>(r[d]);
  }
  for (int64_t f = 0; f < F; ++f) {
    const scalar_t* r = e + f * D;
    scalar_t* w = ge + f * D;
    for (int64_t d = 0; d < m; ++d) w[d] = static_cast<scalar_t>(g * (s[d] - static_cast<acc>(r[d])));
  }
}

template <typename scalar_t>
ADREC_INLINE void fm_bwd_block(const scalar_t* grad_out /* [B] */,
                               const scalar_t* emb /* [B, F, D] */,
                               scalar_t* grad_emb /* [B, F, D] */, int64_t b0, int64_t b1,
                               int64_t F, int64_t D) {
  using acc = acc_t<scalar_t>;
  for (int64_t b = b0; b < b1; ++b) {
    const scalar_t* e = emb + b * F * D;
    scalar_t* ge = grad_emb + b * F * D;
    const acc g = static_cast<acc>(grad_out[b]);
    int64_t d0 = 0;
    for (; d0 + kW <= D; d0 += kW) fm_bwd_chunk<true>(e + d0, ge + d0, g, F, D, kW);
    if (d0 < D) fm_bwd_chunk<false>(e + d0, ge + d0, g, F, D, D - d0);
  }
}

// float32 fast path. The generic loops above leave their accumulator arrays in memory (or fully
// unroll them to scalars), which makes this pass compute-bound; GCC vector types keep one
// 16-column chunk per register (4 SSE / 2 AVX2 / 1 AVX-512 registers, per clone).
typedef float vf16 __attribute__((vector_size(64)));
typedef float vf8 __attribute__((vector_size(32)));
typedef double vd8 __attribute__((vector_size(64)));

// v = row[0:n], zero-filled to 16 lanes (n < 16 only for the tail chunk of an odd D). FULL is a
// template flag, not a test on n: a branch here keeps v out of registers and halves the speed.
template <bool FULL>
ADREC_INLINE void load16(vf16& v, const float* row, int64_t n) {
  if (FULL) {
    std::memcpy(&v, row, sizeof(v));
  } else {
    float tmp[kW] = {};
    std::memcpy(tmp, row, n * sizeof(float));
    std::memcpy(&v, tmp, sizeof(v));
  }
}

template <bool FULL>
ADREC_INLINE void store16(float* row, const vf16& v, int64_t n) {
  std::memcpy(row, &v, (FULL ? kW : n) * sizeof(float));
}

// NS samples at once (independent accumulator chains hide the add latency); sums in double
// (see fwd_acc_t). tot[s] += sum_d (sum_f e)^2 - sum_f e^2 over the chunk's columns.
template <int NS, bool FULL>
ADREC_INLINE void fm_fwd_f32_chunk(const float* e /* sample 0, [F, D] at d0 */, int64_t sample_stride,
                                   int64_t F, int64_t D, int64_t n, double* tot) {
  vd8 s_lo[NS], s_hi[NS], q_lo[NS], q_hi[NS];  // [NS] x 8 lanes: columns 0-7 and 8-15
  for (int s = 0; s < NS; ++s) s_lo[s] = s_hi[s] = q_lo[s] = q_hi[s] = vd8{};
  for (int64_t f = 0; f < F; ++f) {
    for (int s = 0; s < NS; ++s) {
      vf16 v;
      load16<FULL>(v, e + s * sample_stride + f * D, n);
      const vf8 lo = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
      const vf8 hi = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
      const vd8 dl = __builtin_convertvector(lo, vd8), dh = __builtin_convertvector(hi, vd8);
      s_lo[s] += dl;
      s_hi[s] += dh;
      q_lo[s] += dl * dl;
      q_hi[s] += dh * dh;
    }
  }
  for (int s = 0; s < NS; ++s) {
    const vd8 t = s_lo[s] * s_lo[s] - q_lo[s] + (s_hi[s] * s_hi[s] - q_hi[s]);
    double r = 0;
    for (int i = 0; i < 8; ++i) r += t[i];
    tot[s] += r;
  }
}

template <int NS>
ADREC_INLINE void fm_fwd_f32_samples(const float* emb, float* out, int64_t b, int64_t F, int64_t D) {
  double tot[NS] = {};
  int64_t d0 = 0;
  for (; d0 + kW <= D; d0 += kW) fm_fwd_f32_chunk<NS, true>(emb + b * F * D + d0, F * D, F, D, kW, tot);
  if (d0 < D) fm_fwd_f32_chunk<NS, false>(emb + b * F * D + d0, F * D, F, D, D - d0, tot);
  for (int s = 0; s < NS; ++s) out[b + s] = static_cast<float>(0.5 * tot[s]);
}

ADREC_INLINE void fm_fwd_block_f32(const float* emb /* [B, F, D] */, float* out /* [B] */,
                                   int64_t b0, int64_t b1, int64_t F, int64_t D) {
  int64_t b = b0;
  for (; b + 2 <= b1; b += 2) fm_fwd_f32_samples<2>(emb, out, b, F, D);
  for (; b < b1; ++b) fm_fwd_f32_samples<1>(emb, out, b, F, D);
}

// grad[f, :] = g * (s - e[f, :]) on one chunk. Two partial sums over fields (even / odd f)
// halve the add-latency chain.
template <bool FULL>
ADREC_INLINE void fm_bwd_f32_chunk(const float* e /* [F, D] at d0 */, float* ge /* [F, D] at d0 */,
                                   float g, int64_t F, int64_t D, int64_t n) {
  vf16 s0 = {}, s1 = {}, v, w;
  int64_t f = 0;
  for (; f + 2 <= F; f += 2) {
    load16<FULL>(v, e + f * D, n);
    load16<FULL>(w, e + (f + 1) * D, n);
    s0 += v;
    s1 += w;
  }
  if (f < F) {
    load16<FULL>(v, e + f * D, n);
    s0 += v;
  }
  const vf16 s = s0 + s1;
  for (f = 0; f < F; ++f) {
    load16<FULL>(v, e + f * D, n);
    store16<FULL>(ge + f * D, g * (s - v), n);
  }
}

ADREC_INLINE void fm_bwd_block_f32(const float* grad_out /* [B] */, const float* emb /* [B, F, D] */,
                                   float* grad_emb /* [B, F, D] */, int64_t b0, int64_t b1,
                                   int64_t F, int64_t D) {
  for (int64_t b = b0; b < b1; ++b) {
    const float* e = emb + b * F * D;
    float* ge = grad_emb + b * F * D;
    int64_t d0 = 0;
    for (; d0 + kW <= D; d0 += kW) fm_bwd_f32_chunk<true>(e + d0, ge + d0, grad_out[b], F, D, kW);
    if (d0 < D) fm_bwd_f32_chunk<false>(e + d0, ge + d0, grad_out[b], F, D, D - d0);
  }
}

// Samples per task: about at::internal::GRAIN_SIZE elements each, so tiny batches stay serial.
int64_t grain_for(int64_t per_sample) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, per_sample));
}

void check_emb(const at::Tensor& emb, const char* op) {
  check_floating(emb, op, "emb");
  check_dim(emb, 3, op, "emb", "[B, F, D]");
}

}  // namespace

at::Tensor fm_interaction_cpu(const at::Tensor& emb_) {
  check_emb(emb_, kOp);
  auto emb = emb_.contiguous();  // [B, F, D]
  const int64_t B = emb.size(0), F = emb.size(1), D = emb.size(2);
  auto out = at::empty({B, 1}, emb.options());  // [B, 1]
  if (B == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emb.scalar_type(), "fm_interaction_cpu", [&] {
    const scalar_t* e = emb.template data_ptr<scalar_t>();
    scalar_t* o = out.template data_ptr<scalar_t>();
    parallel_for(0, B, grain_for(F * D), [&](int64_t b0, int64_t b1) {
      isa_dispatch([&](auto) ADREC_LAMBDA_INLINE {
        if constexpr (std::is_same_v<scalar_t, float>) {
          // (a cast, not a branch on a template: this lambda is compiled for every dtype)
          fm_fwd_block_f32(reinterpret_cast<const float*>(e), reinterpret_cast<float*>(o), b0, b1, F, D);
        } else {
          fm_fwd_block<scalar_t>(e, o, b0, b1, F, D);
        }
      });
    });
  });
  return out;
}

at::Tensor fm_interaction_bwd_cpu(const at::Tensor& grad_out_, const at::Tensor& emb_) {
  check_emb(emb_, kOpBwd);
  check_same_dtype(grad_out_, emb_, kOpBwd, "grad_out", "emb");
  check_same_device(grad_out_, emb_, kOpBwd, "grad_out", "emb");
  const int64_t B = emb_.size(0);
  TORCH_CHECK_VALUE(grad_out_.dim() == 2 && grad_out_.size(0) == B && grad_out_.size(1) == 1,
                    kOpBwd, ": grad_out must have shape [B, 1] = [", B, ", 1], got ",
                    grad_out_.sizes());
  auto emb = emb_.contiguous();            // [B, F, D]
  auto grad_out = grad_out_.contiguous();  // [B, 1]
  const int64_t F = emb.size(1), D = emb.size(2);
  auto grad_emb = at::empty_like(emb);  // [B, F, D]
  if (B == 0) return grad_emb;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emb.scalar_type(), "fm_interaction_bwd_cpu", [&] {
    const scalar_t* g = grad_out.template data_ptr<scalar_t>();
    const scalar_t* e = emb.template data_ptr<scalar_t>();
    scalar_t* ge = grad_emb.template data_ptr<scalar_t>();
    parallel_for(0, B, grain_for(F * D), [&](int64_t b0, int64_t b1) {
      isa_dispatch([&](auto) ADREC_LAMBDA_INLINE {
        if constexpr (std::is_same_v<scalar_t, float>) {
          fm_bwd_block_f32(reinterpret_cast<const float*>(g), reinterpret_cast<const float*>(e),
                           reinterpret_cast<float*>(ge), b0, b1, F, D);
        } else {
          fm_bwd_block<scalar_t>(g, e, ge, b0, b1, F, D);
        }
      });
    });
  });
  return grad_emb;
}

TORCH_LIBRARY_IMPL(adrec, CPU, m) {
  m.impl("fm_interaction", &fm_interaction_cpu);
  m.impl("fm_interaction_bwd", &fm_interaction_bwd_cpu);
}

}  // namespace adrec
