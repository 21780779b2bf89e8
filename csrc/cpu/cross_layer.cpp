// SPDX-License-Identifier: Apache-2.0
// DCN-v2 cross layer on the CPU. The matrix products go through the linear op's policy
// (common/linear.h: oneDNN, ATen or the small-batch kernel). The elementwise epilogues run as one
// fused pass each, adrec::parallel_for over row blocks; the backward's pass also produces the bias
// gradient.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/acc_type.h"
#include "common/checks.h"
#include "common/linear.h"
#include "common/cpu_isa.h"
#include "common/parallel.h"

namespace adrec {
namespace {

constexpr const char* kOp = "cross_layer";
constexpr const char* kOpBwd = "cross_layer_bwd";

// out = x0 * xw + x over n elements.
template <typename scalar_t>
ADREC_INLINE void cross_epilogue(const scalar_t* x0, const scalar_t* xw, const scalar_t* x,
                                 scalar_t* out, int64_t n) {
  using acc = acc_t<scalar_t>;
  for (int64_t k = 0; k < n; ++k)
    out[k] = static_cast<scalar_t>(static_cast<acc>(x0[k]) * static_cast<acc>(xw[k]) +
                                   static_cast<acc>(x[k]));
}

// Rows per block of the backward epilogue. The bias gradient is summed per block, then over
// blocks in order, so it does not depend on the thread count.
constexpr int64_t kRowsPerBlock = 64;

// For `rows` rows of K: g_xw = g * x0 and g_x0 = g * xw (one read of g), and colsum[k] = the sum
// of g_xw[:, k] over these rows. ACC: g_x0 += instead of =; LAST (the net's first layer, whose x
// is x0): g_x0 also takes g, the residual's share.
template <typename scalar_t, bool ACC, bool LAST>
ADREC_INLINE void cross_bwd_epilogue(const scalar_t* g, const scalar_t* x0, const scalar_t* xw,
                                     scalar_t* g_xw, scalar_t* g_x0, acc_t<scalar_t>* colsum,
                                     int64_t rows, int64_t K) {
  using acc = acc_t<scalar_t>;
  for (int64_t k = 0; k < K; ++k) colsum[k] = acc(0);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t o = r * K;
    // No two of the six arrays overlap. Unsaid, the compiler would need more run-time overlap
    // checks than it makes (GCC: 10) and keeps the loop scalar.
#pragma GCC ivdep
    for (int64_t k = 0; k < K; ++k) {
      const acc gk = static_cast<acc>(g[o + k]);
      const scalar_t gxw = static_cast<scalar_t>(gk * static_cast<acc>(x0[o + k]));
      g_xw[o + k] = gxw;
      acc v = gk * static_cast<acc>(xw[o + k]);
      if constexpr (LAST) v += gk;
      if constexpr (ACC) v += static_cast<acc>(g_x0[o + k]);
      g_x0[o + k] = static_cast<scalar_t>(v);
      colsum[k] += static_cast<acc>(gxw);
    }
  }
}

// The backward's elementwise pass over [B, K] (cross_bwd_epilogue on row blocks) -> grad_bias [K].
at::Tensor run_bwd_epilogue(const at::Tensor& g, const at::Tensor& x0, const at::Tensor& xw,
                            const at::Tensor& g_xw, const at::Tensor& g_x0, bool accumulate,
                            bool last) {
  const int64_t B = g.size(0), K = g.size(1);
  if (B == 0 || K == 0) {
    if (!accumulate) g_x0.zero_();
    return at::zeros({K}, g.options());
  }
  at::Tensor g_b;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "cross_layer_bwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* pg = g.template const_data_ptr<scalar_t>();
    const scalar_t* px0 = x0.template const_data_ptr<scalar_t>();
    const scalar_t* pxw = xw.template const_data_ptr<scalar_t>();
    scalar_t* pgxw = g_xw.template data_ptr<scalar_t>();
    scalar_t* pgx0 = g_x0.template data_ptr<scalar_t>();
    const int64_t nblocks = (B + kRowsPerBlock - 1) / kRowsPerBlock;
    std::vector<acc> partial(static_cast<size_t>(nblocks * K));  // [nblocks, K]
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (kRowsPerBlock * K));
    auto blocks = [&](auto acc_tag, auto last_tag) {
      constexpr bool kAcc = decltype(acc_tag)::value, kLast = decltype(last_tag)::value;
      parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
        isa_dispatch([&](auto) ADREC_LAMBDA_INLINE {
          for (int64_t blk = b0; blk < b1; ++blk) {
            const int64_t r0 = blk * kRowsPerBlock;
            const int64_t rows = std::min(kRowsPerBlock, B - r0);
            const int64_t o = r0 * K;
            cross_bwd_epilogue<scalar_t, kAcc, kLast>(pg + o, px0 + o, pxw + o, pgxw + o,
                                                      pgx0 + o, partial.data() + blk * K, rows,
                                                      K);
          }
        });
      });
    };
    using T = std::true_type;
    using F = std::false_type;
    if (accumulate)
      last ? blocks(T{}, T{}) : blocks(T{}, F{});
    else
      last ? blocks(F{}, T{}) : blocks(F{}, F{});
    auto gb_acc = at::empty({K}, g.options().dtype(c10::CppTypeToScalarType<acc>::value));
    acc* pb = gb_acc.template data_ptr<acc>();
    for (int64_t k = 0; k < K; ++k) pb[k] = acc(0);
    for (int64_t blk = 0; blk < nblocks; ++blk)
      for (int64_t k = 0; k < K; ++k) pb[k] += partial[blk * K + k];
    g_b = gb_acc.to(g.scalar_type());
  });
  return g_b;
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
  auto xw = linear_forward(x, weight, bias, Activation::kNone);  // [B, K] = x @ W.T + b
  auto out = at::empty_like(x);                  // [B, K]
  const int64_t n = x.numel();
  if (n == 0) return {out, xw};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cross_layer_cpu", [&] {
    const scalar_t* px0 = x0.template data_ptr<scalar_t>();
    const scalar_t* pxw = xw.template data_ptr<scalar_t>();
    const scalar_t* px = x.template data_ptr<scalar_t>();
    scalar_t* po = out.template data_ptr<scalar_t>();
    parallel_for(0, n, at::internal::GRAIN_SIZE, [&](int64_t k0, int64_t k1) {
      isa_dispatch([&](auto) ADREC_LAMBDA_INLINE {
        cross_epilogue<scalar_t>(px0 + k0, pxw + k0, px + k0, po + k0, k1 - k0);
      });
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
  auto g_b = run_bwd_epilogue(g, x0, xw, g_xw, g_x0, /*accumulate=*/false, /*last=*/false);
  // g_x = g_xw @ W + g (the residual), g_w = g_xw.T @ x (g_xw.T read in place)
  auto g_x = matmul_t(g_xw, weight.t(), g);  // [B, K]
  auto g_w = matmul_t(g_xw.t(), x.t());       // [K, K]
  return {g_x0, g_x, g_w, g_b};
}

// The cross net's layer backward on the caller's buffers: the residual's gradient is added into
// g (or, for the first layer, into gx0) by the product itself, and x0's gradients from every
// layer meet in one buffer, so the net's backward writes no [B, K] copy of g per layer and
// autograd sums no gradients of x0 (ops/cross_layer.py, _CrossNet).
std::tuple<at::Tensor, at::Tensor> cross_layer_bwd_inplace_cpu(
    at::Tensor g, at::Tensor gx0, const at::Tensor& x0_, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& xw_, bool accumulate, bool last) {
  constexpr const char* op = "cross_layer_bwd_";
  check_args(x0_, x, weight, op);
  for (auto [t, name] : {std::pair<const at::Tensor&, const char*>{g, "g"}, {gx0, "gx0"},
                         {xw_, "xw"}}) {
    check_same_dtype(t, x, op, name, "x");
    check_same_device(t, x, op, name, "x");
    TORCH_CHECK_VALUE(t.sizes() == x.sizes(), op, ": ", name, " has shape ", t.sizes(),
                      " but x has shape ", x.sizes());
  }
  TORCH_CHECK_VALUE(g.is_contiguous() && gx0.is_contiguous(), op,
                    ": g and gx0 must be contiguous (they are written in place)");
  TORCH_CHECK_VALUE(g.numel() == 0 || !g.is_alias_of(gx0), op,
                    ": g and gx0 must be different buffers");
  auto x0 = x0_.contiguous();
  auto xw = xw_.contiguous();
  auto g_xw = at::empty_like(g);
  auto g_b = run_bwd_epilogue(g, x0, xw, g_xw, gx0, accumulate, last);
  auto g_w = matmul_t(g_xw.t(), x.t());  // [K, K]
  if (g.numel() > 0) matmul_t_add_(last ? gx0 : g, g_xw, weight.t());
  return {g_w, g_b};
}

TORCH_LIBRARY_IMPL(adrec, CPU, m) {
  m.impl("cross_layer", &cross_layer_cpu);
  m.impl("cross_layer_bwd", &cross_layer_bwd_cpu);
  m.impl("cross_layer_bwd_", &cross_layer_bwd_inplace_cpu);
}

}  // namespace adrec
