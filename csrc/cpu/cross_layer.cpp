// SPDX-License-Identifier: Apache-2.0
// DCN-v2 cross layer on the CPU: the matrix products go to at::addmm / at::mm (BLAS, threaded
// by ATen); the elementwise epilogues run as one fused pass, at::parallel_for over row blocks.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "common/acc_type.h"
#include "common/checks.h"
#include "common/simd.h"

namespace adrec {
namespace {

constexpr const char* kOp = "cross_layer";
constexpr const char* kOpBwd = "cross_layer_bwd";

// out = x0 * xw + x over n elements.
template <typename scalar_t>
ADREC_CPU_CLONES void cross_epilogue(const scalar_t* x0, const scalar_t* xw, const scalar_t* x,
                                     scalar_t* out, int64_t n) {
  using acc = acc_t<scalar_t>;
  for (int64_t k = 0; k < n; ++k)
    out[k] = static_cast<scalar_t>(static_cast<acc>(x0[k]) * static_cast<acc>(xw[k]) +
                                   static_cast<acc>(x[k]));
}

// g_xw = g * x0 and g_x0 = g * xw over n elements, one read of g.
template <typename scalar_t>
ADREC_CPU_CLONES void cross_bwd_epilogue(const scalar_t* g, const scalar_t* x0, const scalar_t* xw,
                                         scalar_t* g_xw, scalar_t* g_x0, int64_t n) {
  using acc = acc_t<scalar_t>;
  for (int64_t k = 0; k < n; ++k) {
    const acc gk = static_cast<acc>(g[k]);
    g_xw[k] = static_cast<scalar_t>(gk * static_cast<acc>(x0[k]));
    g_x0[k] = static_cast<scalar_t>(gk * static_cast<acc>(xw[k]));
  }
}

// Checks x0 / x / weight (and bias or xw) and returns K.
int64_t check_args(const at::Tensor& x0, const at::Tensor& x, const at::Tensor& weight,
                   const char* op) {
  check_floating(x, op, "x");
  check_dim(x0, 2, op, "x0", "[B, K]");
  check_dim(x, 2, op, "x", "[B, K]");
  check_dim(weight, 2, op, "weight", "[K, K]");
  check_same_dtype(x0, x, op, "x0", "x");
  check_same_dtype(weight, x, op, "weight", "x");
  check_same_device(x0, x, op, "x0", "x");
  check_same_device(weight, x, op, "weight", "x");
  const int64_t K = x.size(1);
  TORCH_CHECK_VALUE(x0.sizes() == x.sizes(), op, ": x0 has shape ", x0.sizes(),
                    " but x has shape ", x.sizes());
  TORCH_CHECK_VALUE(weight.size(0) == K && weight.size(1) == K, op, ": weight must be [K, K] = [",
                    K, ", ", K, "], got ", weight.sizes());
  return K;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cross_layer_cpu(const at::Tensor& x0_, const at::Tensor& x_,
                                                   const at::Tensor& weight,
                                                   const at::Tensor& bias) {
  const int64_t K = check_args(x0_, x_, weight, kOp);
  check_dim(bias, 1, kOp, "bias", "[K]");
  check_same_dtype(bias, x_, kOp, "bias", "x");
  check_same_device(bias, x_, kOp, "bias", "x");
  TORCH_CHECK_VALUE(bias.size(0) == K, kOp, ": bias must be [K] = [", K, "], got ", bias.sizes());
  auto x0 = x0_.contiguous();                    // [B, K]
  auto x = x_.contiguous();                      // [B, K]
  auto xw = at::addmm(bias, x, weight.t());      // [B, K] = x @ W.T + b
  auto out = at::empty_like(x);                  // [B, K]
  const int64_t n = x.numel();
  if (n == 0) return {out, xw};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cross_layer_cpu", [&] {
    const scalar_t* px0 = x0.template data_ptr<scalar_t>();
    const scalar_t* pxw = xw.template data_ptr<scalar_t>();
    const scalar_t* px = x.template data_ptr<scalar_t>();
    scalar_t* po = out.template data_ptr<scalar_t>();
    at::parallel_for(0, n, at::internal::GRAIN_SIZE, [&](int64_t k0, int64_t k1) {
      cross_epilogue<scalar_t>(px0 + k0, pxw + k0, px + k0, po + k0, k1 - k0);
    });
  });
  return {out, xw};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_layer_bwd_cpu(
    const at::Tensor& grad_out_, const at::Tensor& x0_, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& xw_) {
  check_args(x0_, x, weight, kOpBwd);
  check_same_dtype(grad_out_, x, kOpBwd, "grad_out", "x");
  check_same_dtype(xw_, x, kOpBwd, "xw", "x");
  check_same_device(grad_out_, x, kOpBwd, "grad_out", "x");
  check_same_device(xw_, x, kOpBwd, "xw", "x");
  TORCH_CHECK_VALUE(grad_out_.sizes() == x.sizes(), kOpBwd, ": grad_out has shape ",
                    grad_out_.sizes(), " but x has shape ", x.sizes());
  TORCH_CHECK_VALUE(xw_.sizes() == x.sizes(), kOpBwd, ": xw has shape ", xw_.sizes(),
                    " but x has shape ", x.sizes());
  auto g = grad_out_.contiguous();  // [B, K]
  auto x0 = x0_.contiguous();       // [B, K]
  auto xw = xw_.contiguous();       // [B, K]
  auto g_xw = at::empty_like(g);    // [B, K] = g * x0, the gradient of x @ W.T + b
  auto g_x0 = at::empty_like(g);    // [B, K] = g * xw
  const int64_t n = g.numel();
  if (n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "cross_layer_bwd_cpu", [&] {
      const scalar_t* pg = g.template data_ptr<scalar_t>();
      const scalar_t* px0 = x0.template data_ptr<scalar_t>();
      const scalar_t* pxw = xw.template data_ptr<scalar_t>();
      scalar_t* pgxw = g_xw.template data_ptr<scalar_t>();
      scalar_t* pgx0 = g_x0.template data_ptr<scalar_t>();
      at::parallel_for(0, n, at::internal::GRAIN_SIZE, [&](int64_t k0, int64_t k1) {
        cross_bwd_epilogue<scalar_t>(pg + k0, px0 + k0, pxw + k0, pgxw + k0, pgx0 + k0, k1 - k0);
      });
    });
  }
  auto g_x = at::addmm(g, g_xw, weight);    // [B, K] = g_xw @ W + g (the residual)
  auto g_w = at::mm(g_xw.t(), x);           // [K, K]
  auto g_b = g_xw.sum(0);                   // [K]
  return {g_x0, g_x, g_w, g_b};
}

TORCH_LIBRARY_IMPL(adrec, CPU, m) {
  m.impl("cross_layer", &cross_layer_cpu);
  m.impl("cross_layer_bwd", &cross_layer_bwd_cpu);
}

}  // namespace adrec
