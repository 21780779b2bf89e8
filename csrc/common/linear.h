// SPDX-License-Identifier: Apache-2.0
#pragma once
// The one place that decides how a dense matrix product runs on the CPU. adrec::linear and
// adrec::linear_bwd, the cross layer (csrc/cpu/cross_layer.cpp) and the Scorer's serving
// forward (csrc/cpu/scorer.cpp) all call these functions; the policy itself (row threshold,
// oneDNN or ATen, the small-batch kernel, padding of K, the ADREC_DENSE switch) lives in
// csrc/cpu/linear.cpp.
#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <array>
#include <optional>
#include <tuple>

namespace adrec {

// The activation fused into a product's epilogue.
enum class Activation { kNone, kRelu };

// "none" | "relu" -> Activation; any other name is a ValueError naming `op`.
Activation parse_activation(c10::string_view name, const char* op);

// act(x @ w.T + b) for x [M, K], w [N, K] (may be a strided view), b [N] or none -> [M, N].
// x, w and b share a dtype, except in the serving towers' bf16 mode: w bfloat16 with x float32
// or bfloat16 and b float32 or bfloat16. There the result is float32 below the oneDNN row
// minimum (the small-batch kernel widens the weights) and bfloat16 from it on. Shapes and the
// dtype combination are checked (ValueError / TypeError naming "linear").
at::Tensor linear_forward(const at::Tensor& x, const at::Tensor& w,
                          const std::optional<at::Tensor>& b, Activation act);

// (grad_x [M, K], grad_w [N, K], grad_b [N]) of out = act(x @ w.T + b), given grad_out [M, N];
// `out` (the forward's result) is read for the ReLU's mask. An output whose mask entry is false
// comes back as an empty tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w,
    const std::optional<at::Tensor>& out, Activation act, std::array<bool, 3> mask);

// The width at which a model should store activations of k columns that go into products of
// `rows` rows in `dtype`: k rounded up to the next multiple the float32 GEMMs run fastest at
// (zero columns appended), or k where padding does not pay (other dtypes, small batches).
int64_t gemm_width(int64_t k, at::ScalarType dtype, int64_t rows);

// a @ b.T (+ add [M, N], summed in the product's epilogue) for a [M, K], b [N, K]; a and b may
// be strided views such as transposes (a transposed `a`, the weight gradient's g.T, is read in
// place, never copied). The building block of backward passes.
at::Tensor matmul_t(const at::Tensor& a, const at::Tensor& b,
                    const std::optional<at::Tensor>& add = std::nullopt);

// c += a @ b.T in place, for a buffer c [M, N] (contiguous) that the caller owns: the product
// adds into c inside its kernel, so no fresh [M, N] block is written (matmul_t with a summand
// copies the summand first). a and b as for matmul_t.
void matmul_t_add_(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b);

}  // namespace adrec
