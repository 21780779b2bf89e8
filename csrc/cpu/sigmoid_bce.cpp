// SPDX-License-Identifier: Apache-2.0
// Sigmoid + BCE on the CPU: adrec::parallel_for over fixed 2048-element chunks, at least 16 per
// task (partial loss sums are combined in chunk order, so the loss does not depend on the thread
// count); loss and gradient from one exp and one log1p per element (float32: AVX-512 intrinsics
// where cpu_isa() is avx512, else the auto-vectorised loop for that ISA). Score: one task per block of rows, row
// dot products in 16 lanes, then the sigmoid.
#include <ATen/ATen.h>
#include <torch/library.h>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
// GCC 12 flags the _mm512_undefined_ps inside avx512fintrin.h's intrinsics as maybe
// uninitialized: a false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/acc_type.h"
#include "common/checks.h"
#include "common/cpu_isa.h"
#include "common/fast_math.h"
#include "common/parallel.h"

namespace adrec {
namespace {

constexpr const char* kOp = "sigmoid_bce";
constexpr const char* kOpScore = "score";
constexpr int64_t kChunk = 2048;  // elements per loss partial sum
constexpr int64_t kW = 16;        // lanes of the score dot product

// float32 and below use the vectorisable forms; float64 (gradcheck, tests) uses libm.
ADREC_INLINE float exp_neg_abs(float z) { return exp_nonpos(-std::fabs(z)); }
ADREC_INLINE double exp_neg_abs(double z) { return std::exp(-std::fabs(z)); }
ADREC_INLINE float log1p_t(float t, float u, float r) { return log1p_01(t, u, r); }
ADREC_INLINE double log1p_t(double t, double, double) { return std::log1p(t); }

// One element: writes grad = (sigmoid(z) - y) w / B and returns w l with
// l = max(z, 0) - z y + log1p(e^-|z|), which neither overflows nor cancels for large |z|.
// With t = e^-|z| and r = 1 / (1 + t): sigmoid(z) = r for z >= 0, t r below, and r also serves
// log1p's rounding correction, so an element costs two divisions.
template <bool HAS_W, typename scalar_t>
ADREC_INLINE acc_t<scalar_t> bce_elem(const scalar_t* z, const scalar_t* y, const scalar_t* w,
                                      scalar_t* grad, int64_t i, acc_t<scalar_t> inv_b) {
  using acc = acc_t<scalar_t>;
  const acc zi = static_cast<acc>(z[i]), yi = static_cast<acc>(y[i]);
  const acc wi = HAS_W ? static_cast<acc>(w[i]) : acc(1);
  const acc t = exp_neg_abs(zi);  // e^-|z| in (0, 1]
  const acc u = acc(1) + t;
  const acc r = acc(1) / u;
  const acc sig = zi >= acc(0) ? r : t * r;  // sigmoid(z)
  grad[i] = static_cast<scalar_t>((sig - yi) * wi * inv_b);
  return wi * (std::max(zi, acc(0)) - zi * yi + log1p_t(t, u, r));
}

// One chunk of n elements; returns sum_i w_i l_i. The sum runs in kW lanes (vertical adds), so
// the loop vectorises without reassociating a single scalar sum.
template <bool HAS_W, typename scalar_t>
ADREC_INLINE double bce_chunk(const scalar_t* z, const scalar_t* y, const scalar_t* w,
                                  scalar_t* grad, int64_t n, double inv_b) {
  using acc = acc_t<scalar_t>;
  const acc ib = static_cast<acc>(inv_b);
  acc lanes[kW];  // [kW]
  for (int64_t l = 0; l < kW; ++l) lanes[l] = acc(0);
  int64_t i0 = 0;
  for (; i0 + kW <= n; i0 += kW)
    for (int64_t l = 0; l < kW; ++l) lanes[l] += bce_elem<HAS_W>(z, y, w, grad, i0 + l, ib);
  for (int64_t i = i0; i < n; ++i) lanes[i - i0] += bce_elem<HAS_W>(z, y, w, grad, i, ib);
  double sum = 0;
  for (int64_t l = 0; l < kW; ++l) sum += static_cast<double>(lanes[l]);
  return sum;
}

#if defined(__GNUC__) && defined(__x86_64__)
#define ADREC_HAVE_BCE_AVX512 1
// 1 / d for d in [1, 4]: vrcp14ps and one Newton step.
ADREC_TARGET_AVX512 ADREC_INLINE __m512 recip(__m512 d) {
  const __m512 r0 = _mm512_rcp14_ps(d);
  return _mm512_mul_ps(r0, _mm512_fnmadd_ps(d, r0, _mm512_set1_ps(2.0f)));
}

// One vector of 16 elements (lanes outside m are neither read nor written); returns the lanes'
// w l, zero outside m.
template <bool HAS_W>
ADREC_TARGET_AVX512 ADREC_INLINE __m512 bce_vec16(
    const float* z, const float* y, const float* w, float* grad, int64_t i, __mmask16 m,
    __m512 ib) {
  z += i, y += i, grad += i;
  const __m512 one = _mm512_set1_ps(1.0f), two = _mm512_set1_ps(2.0f), zero = _mm512_setzero_ps();
  const __m512 zi = _mm512_maskz_loadu_ps(m, z), yi = _mm512_maskz_loadu_ps(m, y);
  // t = e^x, x = -|z| clamped at -87 (as exp_nonpos): x = k ln2 + r, e^r by Taylor to r^7
  // (Estrin's scheme: shorter dependency chains than Horner's).
  // (vmaxps returns its second operand when either is NaN: -|z| goes second, so a NaN logit
  // gives a NaN loss and a NaN gradient, as in the reference.)
  const __m512 x = _mm512_max_ps(_mm512_set1_ps(-87.0f), _mm512_sub_ps(zero, _mm512_abs_ps(zi)));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.428606765330187045e-06f), r);
  const __m512 r2 = _mm512_mul_ps(r, r), r4 = _mm512_mul_ps(r2, r2);
  const __m512 p01 = _mm512_fmadd_ps(r, one, one);                                  // 1 + r
  const __m512 p23 = _mm512_fmadd_ps(r, _mm512_set1_ps(1.0f / 6.0f), _mm512_set1_ps(0.5f));
  const __m512 p45 = _mm512_fmadd_ps(r, _mm512_set1_ps(1.0f / 120.0f), _mm512_set1_ps(1.0f / 24.0f));
  const __m512 p67 = _mm512_fmadd_ps(r, _mm512_set1_ps(1.0f / 5040.0f), _mm512_set1_ps(1.0f / 720.0f));
  const __m512 p03 = _mm512_fmadd_ps(r2, p23, p01);
  const __m512 p47 = _mm512_fmadd_ps(r2, p67, p45);
  const __m512 t = _mm512_scalef_ps(_mm512_fmadd_ps(r4, p47, p03), k);  // e^-|z| in (0, 1]
  const __m512 u = _mm512_add_ps(one, t);
  const __m512 ru = recip(u);  // 1 / (1 + t)
  const __mmask16 pos = _mm512_cmp_ps_mask(zi, zero, _CMP_GE_OQ);
  const __m512 sig = _mm512_mask_blend_ps(pos, _mm512_mul_ps(t, ru), ru);  // sigmoid(z)
  __m512 gi = _mm512_mul_ps(_mm512_sub_ps(sig, yi), ib);
  __m512 wi = one;
  if (HAS_W) {
    wi = _mm512_maskz_loadu_ps(m, w + i);
    gi = _mm512_mul_ps(gi, wi);
  }
  _mm512_mask_storeu_ps(grad, m, gi);
  // log1p(t) as log1p_01(t, u, ru): f = (u - c)/(u + c), c = 2 above sqrt 2, else 1.
  const __mmask16 big = _mm512_cmp_ps_mask(u, _mm512_set1_ps(1.41421356f), _CMP_GT_OQ);
  const __m512 c = _mm512_mask_blend_ps(big, one, two);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(u, c), recip(_mm512_add_ps(u, c)));
  const __m512 f2 = _mm512_mul_ps(f, f), f4 = _mm512_mul_ps(f2, f2);
  // 1 + f2/3 + f4/5 + f6/7 + f8/9, Estrin
  const __m512 s01 = _mm512_fmadd_ps(f2, _mm512_set1_ps(1.0f / 3.0f), one);
  const __m512 s23 = _mm512_fmadd_ps(f2, _mm512_set1_ps(1.0f / 7.0f), _mm512_set1_ps(1.0f / 5.0f));
  const __m512 s = _mm512_fmadd_ps(f4, _mm512_fmadd_ps(f4, _mm512_set1_ps(1.0f / 9.0f), s23), s01);
  const __m512 logu = _mm512_fmadd_ps(_mm512_add_ps(f, f), s,
                                      _mm512_maskz_mov_ps(big, _mm512_set1_ps(0.693147180559945309f)));
  const __m512 l1p = _mm512_fmadd_ps(_mm512_sub_ps(t, _mm512_sub_ps(u, one)), ru, logu);
  // l = max(z, 0) - z y + log1p(e^-|z|), times w; masked-off lanes are zero.
  __m512 li = _mm512_add_ps(_mm512_fnmadd_ps(zi, yi, _mm512_max_ps(zi, zero)), l1p);
  if (HAS_W) li = _mm512_mul_ps(li, wi);
  return _mm512_maskz_mov_ps(m, li);
}

// float32 chunk with AVX-512 intrinsics (when cpu_isa() is avx512). The auto-vectorised
// bce_chunk above computes the same formulas, but GCC if-converts its clamps and selects into
// masked divisions (four per vector); here each vector of 16 costs no division: e^-|z| from a
// degree-7 polynomial scaled by vscalefps, and 1 / (1 + t) and log's 1 / (u + c) from vrcp14ps
// plus one Newton step (relative error ~2^-28, below float's rounding). bench/RESULTS.md
// ("Tuning constants") has the two loops' times.
// Four independent vectors per step (their chains overlap), then the masked tail. Lane sums:
// a_j holds vectors i = 4q + j, combined in fixed order, and the chunks' sums in chunk order, so
// the loss does not depend on the thread count.
template <bool HAS_W>
ADREC_TARGET_AVX512 double bce_chunk_f32_avx512(const float* z, const float* y, const float* w, float* grad,
                            int64_t n, double inv_b) {
  const __m512 ib = _mm512_set1_ps(static_cast<float>(inv_b));
  const __mmask16 all = 0xFFFF;
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    a0 = _mm512_add_ps(a0, bce_vec16<HAS_W>(z, y, w, grad, i, all, ib));
    a1 = _mm512_add_ps(a1, bce_vec16<HAS_W>(z, y, w, grad, i + 16, all, ib));
    a2 = _mm512_add_ps(a2, bce_vec16<HAS_W>(z, y, w, grad, i + 32, all, ib));
    a3 = _mm512_add_ps(a3, bce_vec16<HAS_W>(z, y, w, grad, i + 48, all, ib));
  }
  for (; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? all : __mmask16((1u << (n - i)) - 1u);
    a0 = _mm512_add_ps(a0, bce_vec16<HAS_W>(z, y, w, grad, i, m, ib));
  }
  const __m512 acc = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, acc);
  double sum = 0;
  for (int l = 0; l < 16; ++l) sum += static_cast<double>(lanes[l]);
  return sum;
}

// The float32 chunk on the AVX-512 path; other dtypes have none (never called for them).
ADREC_INLINE double bce_chunk_fast(const float* z, const float* y, const float* w, float* g,
                                   int64_t n, double inv_b) {
  return w != nullptr ? bce_chunk_f32_avx512<true>(z, y, w, g, n, inv_b)
                      : bce_chunk_f32_avx512<false>(z, y, w, g, n, inv_b);
}
template <typename scalar_t>
double bce_chunk_fast(const scalar_t*, const scalar_t*, const scalar_t*, scalar_t*, int64_t,
                      double) {
  TORCH_INTERNAL_ASSERT(false, "sigmoid_bce: no AVX-512 path for this dtype");
  return 0;
}
#endif

template <typename scalar_t>
ADREC_INLINE void score_block(const scalar_t* x /* [B, K] */, const scalar_t* w /* [K] */,
                                  acc_t<scalar_t> bias, scalar_t* out /* [B] */, int64_t b0,
                                  int64_t b1, int64_t K) {
  using acc = acc_t<scalar_t>;
  for (int64_t b = b0; b < b1; ++b) {
    const scalar_t* xb = x + b * K;
    acc s[kW];  // [kW] lane partial sums
    for (int64_t l = 0; l < kW; ++l) s[l] = acc(0);
    int64_t k0 = 0;
    for (; k0 + kW <= K; k0 += kW)
      for (int64_t l = 0; l < kW; ++l) s[l] += static_cast<acc>(xb[k0 + l]) * static_cast<acc>(w[k0 + l]);
    for (int64_t k = k0; k < K; ++k) s[k - k0] += static_cast<acc>(xb[k]) * static_cast<acc>(w[k]);
    acc zb = bias;
    for (int64_t l = 0; l < kW; ++l) zb += s[l];
    const acc t = exp_neg_abs(zb);
    out[b] = static_cast<scalar_t>((zb >= acc(0) ? acc(1) : t) / (acc(1) + t));
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sigmoid_bce_cpu(const at::Tensor& logits_,
                                                   const at::Tensor& labels_,
                                                   const c10::optional<at::Tensor>& weight_) {
  check_floating(logits_, kOp, "logits");
  check_dim(logits_, 1, kOp, "logits", "[B]");
  TORCH_CHECK_TYPE(!at::isComplexType(labels_.scalar_type()), kOp,
                   ": labels must be a real tensor (0/1 or soft labels), got ", labels_.scalar_type());
  check_dim(labels_, 1, kOp, "labels", "[B]");
  check_same_device(labels_, logits_, kOp, "labels", "logits");
  const int64_t B = logits_.size(0);
  TORCH_CHECK_VALUE(labels_.size(0) == B, kOp, ": labels has ", labels_.size(0),
                    " entries but logits has ", B);
  if (weight_.has_value()) {
    check_dim(*weight_, 1, kOp, "weight", "[B]");
    check_same_dtype(*weight_, logits_, kOp, "weight", "logits");
    check_same_device(*weight_, logits_, kOp, "weight", "logits");
    TORCH_CHECK_VALUE(weight_->size(0) == B, kOp, ": weight has ", weight_->size(0),
                      " entries but logits has ", B);
  }
  auto logits = logits_.contiguous();                                 // [B]
  auto labels = (labels_.scalar_type() == logits.scalar_type() ? labels_  // [B], in logits'
                 : labels_.to(logits.scalar_type())).contiguous();       // dtype as the reference
  c10::optional<at::Tensor> weight;
  if (weight_.has_value()) weight = weight_->contiguous();            // [B]
  auto grad = at::empty_like(logits);                                 // [B]
  auto loss = at::empty({}, logits.options());                        // []
  const int64_t nchunks = (B + kChunk - 1) / kChunk;
  std::vector<double> partial(nchunks, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sigmoid_bce_cpu", [&] {
    const scalar_t* z = logits.template data_ptr<scalar_t>();
    const scalar_t* y = labels.template data_ptr<scalar_t>();
    const scalar_t* w = weight.has_value() ? weight->template data_ptr<scalar_t>() : nullptr;
    scalar_t* g = grad.template data_ptr<scalar_t>();
    const double inv_b = B > 0 ? 1.0 / static_cast<double>(B) : 0.0;
#ifdef ADREC_HAVE_BCE_AVX512
    const bool avx512 = std::is_same_v<scalar_t, float> && cpu_isa() >= Isa::avx512;
#endif
    // Up to GRAIN_SIZE elements run inline: at B=4096 the whole pass takes a few microseconds,
    // less than waking a second thread.
    parallel_for(0, nchunks, at::internal::GRAIN_SIZE / kChunk, [&](int64_t c0, int64_t c1) {
#ifdef ADREC_HAVE_BCE_AVX512
      if (avx512) {
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t i0 = c * kChunk, n = std::min(kChunk, B - i0);
          partial[c] = bce_chunk_fast(z + i0, y + i0, w ? w + i0 : nullptr, g + i0, n, inv_b);
        }
        return;
      }
#endif
      isa_dispatch([&](auto) ADREC_LAMBDA_INLINE {
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t i0 = c * kChunk, n = std::min(kChunk, B - i0);
          partial[c] = w ? bce_chunk<true>(z + i0, y + i0, w + i0, g + i0, n, inv_b)
                         : bce_chunk<false>(z + i0, y + i0, w, g + i0, n, inv_b);
        }
      });
    });
    double total = 0;
    for (double p : partial) total += p;
    // The mean over an empty batch is NaN, as in torch's mean reduction.
    // (Written in place: a fill_ would be one more dispatched op on this overhead-bound path.)
    *loss.template data_ptr<scalar_t>() = static_cast<scalar_t>(
        B > 0 ? total / static_cast<double>(B) : std::numeric_limits<double>::quiet_NaN());
  });
  return {loss, grad};
}

at::Tensor score_cpu(const at::Tensor& x_, const at::Tensor& w_, const at::Tensor& b) {
  check_floating(x_, kOpScore, "x");
  check_dim(x_, 2, kOpScore, "x", "[B, K]");
  check_dim(w_, 1, kOpScore, "w", "[K]");
  check_same_dtype(w_, x_, kOpScore, "w", "x");
  check_same_dtype(b, x_, kOpScore, "b", "x");
  check_same_device(w_, x_, kOpScore, "w", "x");
  check_same_device(b, x_, kOpScore, "b", "x");
  const int64_t B = x_.size(0), K = x_.size(1);
  TORCH_CHECK_VALUE(w_.size(0) == K, kOpScore, ": w has ", w_.size(0), " entries but x has K=", K);
  TORCH_CHECK_VALUE(b.numel() == 1 && b.dim() <= 1, kOpScore, ": b must be a scalar ([] or [1]), got shape ",
                    b.sizes());
  auto x = x_.contiguous();  // [B, K]
  auto w = w_.contiguous();  // [K]
  auto out = at::empty({B}, x.options());  // [B]
  if (B == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "score_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const acc bias = static_cast<acc>(b.item<scalar_t>());
    const scalar_t* px = x.template data_ptr<scalar_t>();
    const scalar_t* pw = w.template data_ptr<scalar_t>();
    scalar_t* po = out.template data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, K));
    parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
      isa_dispatch([&](auto) ADREC_LAMBDA_INLINE { score_block<scalar_t>(px, pw, bias, po, b0, b1, K); });
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(adrec, CPU, m) {
  m.impl("sigmoid_bce", &sigmoid_bce_cpu);
  m.impl("score", &score_cpu);
}

}  // namespace adrec
