// SPDX-License-Identifier: Apache-2.0
#pragma once
// fp32 matrix products through torch's bundled oneDNN (the `mkldnn::_linear_pointwise` op that
// every x86 torch build registers), reached through the dispatcher so that no oneDNN headers or
// link flags are needed here.
//
// Why: ATen's fp32 mm/addmm on x86 go to MKL, which on the project's AMD benchmark machine runs
// at about half oneDNN's rate (2 threads, [4096, 432] x [432, 432]: MKL 7.4 ms, oneDNN 3.1 ms;
// see bench/RESULTS_interaction.md). Results are IEEE fp32 either way; they differ from MKL's by
// summation order only.
//
// onednn_linear_t(a, b, bias) = a @ b.T (+ bias) for a [M, K], b [N, K] (b may be a strided view
// such as a transpose) -> [M, N]. Returns an undefined tensor when oneDNN cannot or should not
// serve the call (torch built without it, `torch.backends.mkldnn` disabled, ADREC_DENSE=aten, not
// fp32 CPU, fewer than kOneDnnMinRows rows); callers then take their ATen path.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdlib>
#include <cstring>
#include <optional>

namespace adrec {

// Below this many rows oneDNN's per-call cost outweighs its faster kernel (measured, 2 threads,
// [M, 512] x [512, 256]: 24.8 vs 8.7 us for ATen at M = 1, 39.9 vs 38.6 at 16, 53.5 vs 59.1 at
// 32). The same minimum as adrec_fast/models/_dense.py's MIN_ROWS.
constexpr int64_t kOneDnnMinRows = 32;

// oneDNN may serve a product of `a` in `dtype` (float32, or bf16 for the bf16 variant below).
inline bool onednn_usable_for(const at::Tensor& a, at::ScalarType dtype) {
  static const bool env_on = [] {
    const char* v = std::getenv("ADREC_DENSE");
    return v == nullptr || std::strcmp(v, "aten") != 0;
  }();
  return env_on && at::hasMKLDNN() && at::globalContext().userEnabledMkldnn() &&
         a.device().is_cpu() && a.scalar_type() == dtype && a.dim() == 2 &&
         a.size(0) >= kOneDnnMinRows && a.size(1) > 0;
}

inline bool onednn_linear_usable(const at::Tensor& a) {
  return onednn_usable_for(a, at::kFloat);
}

// mkldnn::_linear_pointwise(a, b, bias, act), no checks; undefined without the op.
inline at::Tensor linear_pointwise_call(const at::Tensor& a, const at::Tensor& b,
                                        const std::optional<at::Tensor>& bias,
                                        c10::string_view act) {
  static const auto op =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  if (!op.has_value()) return {};
  static const auto typed =
      op->typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           c10::string_view, c10::List<std::optional<at::Scalar>>,
                           std::optional<c10::string_view>)>();
  return typed.call(a, b, bias, act, c10::List<std::optional<at::Scalar>>(), "");
}

// act(a @ b.T + bias), act a oneDNN post-op name ("none", "relu"), or undefined when oneDNN
// cannot serve it (see above).
inline at::Tensor onednn_linear_t_act(const at::Tensor& a, const at::Tensor& b,
                                      const std::optional<at::Tensor>& bias, c10::string_view act) {
  if (!onednn_linear_usable(a)) return {};
  return linear_pointwise_call(a, b, bias, act);
}

// act(a @ b.T + bias) in bfloat16 (a, b and bias bf16, float32 accumulation, bf16 result), or
// undefined when oneDNN cannot serve it (as above, for bf16 operands).
inline at::Tensor onednn_linear_t_bf16(const at::Tensor& a, const at::Tensor& b,
                                       const at::Tensor& bias, c10::string_view act) {
  if (!onednn_usable_for(a, at::kBFloat16) || b.scalar_type() != at::kBFloat16 ||
      bias.scalar_type() != at::kBFloat16)
    return {};
  return linear_pointwise_call(a, b, bias, act);
}

// a @ b.T + bias, or undefined as above.
inline at::Tensor onednn_linear_t(const at::Tensor& a, const at::Tensor& b,
                                  const std::optional<at::Tensor>& bias) {
  return onednn_linear_t_act(a, b, bias, "none");
}

// relu(a @ b.T + bias), the ReLU fused into the product's epilogue, or undefined as above.
inline at::Tensor onednn_linear_t_relu(const at::Tensor& a, const at::Tensor& b,
                                       const std::optional<at::Tensor>& bias) {
  return onednn_linear_t_act(a, b, bias, "relu");
}

// a @ b.T + other (other [M, N], added in the product's epilogue), or undefined as above.
inline at::Tensor onednn_linear_t_add(const at::Tensor& a, const at::Tensor& b,
                                      const at::Tensor& other) {
  if (!onednn_linear_usable(a) || other.scalar_type() != at::kFloat) return {};
  static const auto op =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", "binary"});
  if (!op.has_value()) return {};
  static const auto typed =
      op->typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const std::optional<at::Tensor>&, c10::string_view)>();
  return typed.call(a, other, b, std::nullopt, "add");
}

}  // namespace adrec
