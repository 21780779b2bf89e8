// SPDX-License-Identifier: Apache-2.0
// Sigmoid + BCE on the CPU: at::parallel_for over fixed 2048-element chunks, at least 16 per
// task (partial loss sums are combined in chunk order, so the loss does not depend on the thread
// count); loss and gradient from one exp and one log1p per element. Score: one task per block of
// rows, row dot products in 16 lanes, then the sigmoid.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "common/acc_type.h"
#include "common/checks.h"
#include "common/fast_math.h"
#include "common/simd.h"

namespace adrec {
namespace {

constexpr const char* kOp = "sigmoid_bce";
constexpr const char* kOpScore = "score";
constexpr int64_t kChunk = 2048;  // elements per loss partial sum
constexpr int64_t kW = 16;        // lanes of the score dot product

// float32 and below use the vectorisable forms; float64 (gradcheck, tests) uses libm.
ADREC_INLINE float exp_neg_abs(float z) { return exp_nonpos(-std::fabs(z)); }
ADREC_INLINE double exp_neg_abs(double z) { return std::exp(-std::fabs(z)); }
ADREC_INLINE float log1p_t(float t) { return log1p_01(t); }
ADREC_INLINE double log1p_t(double t) { return std::log1p(t); }

// One element: writes grad = (sigmoid(z) - y) w / B and returns w l with
// l = max(z, 0) - z y + log1p(e^-|z|), which neither overflows nor cancels for large |z|.
template <bool HAS_W, typename scalar_t>
ADREC_INLINE acc_t<scalar_t> bce_elem(const scalar_t* z, const scalar_t* y, const scalar_t* w,
                                      scalar_t* grad, int64_t i, acc_t<scalar_t> inv_b) {
  using acc = acc_t<scalar_t>;
  const acc zi = static_cast<acc>(z[i]), yi = static_cast<acc>(y[i]);
  const acc wi = HAS_W ? static_cast<acc>(w[i]) : acc(1);
  const acc t = exp_neg_abs(zi);                               // e^-|z| in (0, 1]
  const acc sig = (zi >= acc(0) ? acc(1) : t) / (acc(1) + t);  // sigmoid(z)
  grad[i] = static_cast<scalar_t>((sig - yi) * wi * inv_b);
  return wi * (std::max(zi, acc(0)) - zi * yi + log1p_t(t));
}

// One chunk of n elements; returns sum_i w_i l_i. The sum runs in kW lanes (vertical adds), so
// the loop vectorises without reassociating a single scalar sum.
template <bool HAS_W, typename scalar_t>
ADREC_CPU_CLONES double bce_chunk(const scalar_t* z, const scalar_t* y, const scalar_t* w,
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

template <typename scalar_t>
ADREC_CPU_CLONES void score_block(const scalar_t* x /* [B, K] */, const scalar_t* w /* [K] */,
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
    // Up to GRAIN_SIZE elements run inline: at B=4096 the whole pass takes a few microseconds,
    // less than waking a second thread.
    at::parallel_for(0, nchunks, at::internal::GRAIN_SIZE / kChunk, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t i0 = c * kChunk, n = std::min(kChunk, B - i0);
        partial[c] = w ? bce_chunk<true>(z + i0, y + i0, w + i0, g + i0, n, inv_b)
                       : bce_chunk<false>(z + i0, y + i0, w, g + i0, n, inv_b);
      }
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
    at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
      score_block<scalar_t>(px, pw, bias, po, b0, b1, K);
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(adrec, CPU, m) {
  m.impl("sigmoid_bce", &sigmoid_bce_cpu);
  m.impl("score", &score_cpu);
}

}  // namespace adrec
