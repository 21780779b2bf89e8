// SPDX-License-Identifier: Apache-2.0
// adrec::linear and adrec::linear_bwd on the CPU, and the policy behind every dense product of
// the CPU kernels (common/linear.h). Which engine runs a product:
//   * fewer than kMinRows rows, float32 input (float32 or bfloat16 weights): the small-batch
//     kernel below, adrec::parallel_for over output rows;
//   * float32 or bfloat16 from kMinRows rows on: torch's bundled oneDNN, reached through the
//     dispatcher (`mkldnn::_linear_pointwise`, registered by every x86 torch build; no oneDNN
//     headers or link flags needed), with bias and activation fused into its epilogue;
//   * anything else (other dtypes, a torch without oneDNN, `torch.backends.mkldnn` disabled,
//     ADREC_DENSE=aten): ATen, with K padded to kGemmAlign for float32;
//   * the packed serving model's layers, whose weights are blocked ahead of time
//     (common/linear_blocked.h): the blocked kernels of linear_blocked.inc, fp32, or bf16 through
//     AVX512_BF16 where cpu_isa() allows it and the portable bf16 kernel elsewhere.
// The backward's elementwise work (the ReLU's mask, the bias gradient) is one pass over the
// output gradient (bwd_pass); its two products follow the policy above, the weight gradient's
// g.T @ x through ATen, which reads g.T in place (matmul_uses_onednn).
// GCC 12 reports a false -Wmaybe-uninitialized inside its own avx512fintrin.h for the AVX-512
// intrinsics of linear_blocked.inc (the header's _mm512_undefined idiom); the state must cover the
// header's locations, hence file-wide.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include "common/linear.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "common/acc_type.h"
#include "common/checks.h"
#include "common/cpu_isa.h"
#include "common/linear_blocked.h"
#include "common/parallel.h"

namespace adrec {
namespace {

constexpr const char* kOp = "linear";
constexpr const char* kOpBwd = "linear_bwd";

// Below this many rows oneDNN's fixed per-call cost outweighs its faster kernel: [M, 512] x
// [512, 256] + ReLU on 2 threads takes 24.8 us through oneDNN and 8.7 us through ATen at M = 1,
// 39.9 vs 38.6 at 16, 53.5 vs 59.1 at 32. Those smaller products go to the small-batch kernel.
constexpr int64_t kMinRows = 32;

// ATen sends float32 products to BLAS (MKL on x86), which runs 15-30% slower when the inner
// width is not a multiple of 16 ([4096, 429] x [429, 429]: 143 GFLOP/s, at K = 432 205 GFLOP/s).
// oneDNN's kernels handle the tail themselves (at 429 within 5% of 432, about what the padding
// copies cost), so only the ATen path pads, and only from kMinRows rows on, where the copies are
// repaid.
constexpr int64_t kGemmAlign = 16;

// ADREC_DENSE=aten sends to ATen every product that would go to oneDNN (for comparisons; the
// small-batch kernel stays); "onednn" (the default) lets the policy above choose. Read once, here.
bool dense_onednn_allowed() {
  static const bool allowed = [] {
    const char* v = std::getenv("ADREC_DENSE");
    if (v == nullptr || *v == '\0' || std::strcmp(v, "onednn") == 0) return true;
    TORCH_CHECK_VALUE(std::strcmp(v, "aten") == 0,
                      "ADREC_DENSE must be 'onednn' or 'aten', got '", v, "'");
    return false;
  }();
  return allowed;
}

// oneDNN may run a product of `rows` rows in `dtype` (float32, or bfloat16 in the forward).
bool onednn_for(at::ScalarType dtype, int64_t rows, bool bf16_ok) {
  return (dtype == at::kFloat || (bf16_ok && dtype == at::kBFloat16)) && rows >= kMinRows &&
         dense_onednn_allowed() && at::hasMKLDNN() && at::globalContext().userEnabledMkldnn();
}

// mkldnn::_linear_pointwise(a, b, bias, act) = act(a @ b.T + bias); undefined when this torch
// has no such op.
at::Tensor pointwise_call(const at::Tensor& a, const at::Tensor& b,
                          const std::optional<at::Tensor>& bias, c10::string_view act) {
  static const auto op =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  if (!op.has_value()) return {};
  static const auto typed =
      op->typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           c10::string_view, c10::List<std::optional<at::Scalar>>,
                           std::optional<c10::string_view>)>();
  return typed.call(a, b, bias, act, c10::List<std::optional<at::Scalar>>(), "");
}

// a @ b.T + other through oneDNN's binary post-op; undefined without the op.
at::Tensor pointwise_add_call(const at::Tensor& a, const at::Tensor& b, const at::Tensor& other) {
  static const auto op =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", "binary"});
  if (!op.has_value()) return {};
  static const auto typed =
      op->typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const std::optional<at::Tensor>&, c10::string_view)>();
  return typed.call(a, other, b, std::nullopt, "add");
}

// ---------------------------------------------------------------------------- small batches
// A weight element as float32: float32 as it is, bfloat16 by placing its bits in the high half.
ADREC_INLINE float weight_f32(float w) { return w; }
ADREC_INLINE float weight_f32(uint16_t w) {
  const uint32_t u = static_cast<uint32_t>(w) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// y[m, o] = act(x[m, :] . w[o, :] + b[o]) for m in [0, M), o in [o0, o1): one weight row at a
// time against every input row (M is small: the rows stay in L1), 16-lane partial sums in
// float32 (bfloat16 weights are widened exactly; the inputs stay float32). b may be null.
// x and w are contiguous: separate row strides for them cost ~9% (M = 1, [429, 429] fp32
// weights: 104 vs 95 us per DCN-v2 request).
template <typename wt>
ADREC_INLINE void small_linear_rows(const float* x, const wt* w, const float* b, float* y,
                                        int64_t M, int64_t K, int64_t O, int64_t o0, int64_t o1,
                                        bool relu) {
  for (int64_t o = o0; o < o1; ++o) {
    const wt* wr = w + o * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      float acc[16] = {};
      int64_t k = 0;
      for (; k + 16 <= K; k += 16)
        for (int l = 0; l < 16; ++l) acc[l] += weight_f32(wr[k + l]) * xr[k + l];
      for (; k < K; ++k) acc[k & 15] += weight_f32(wr[k]) * xr[k];
      float v = b ? b[o] : 0.f;
      for (int l = 0; l < 16; ++l) v += acc[l];
      y[m * O + o] = relu && v < 0.f ? 0.f : v;
    }
  }
}

// The products of a few rows (one serving request, a small training tail): each thread streams
// its share of the weight rows once. BLAS's single-row path ran one DCN-v2 request (3.6 MB of
// weights) in ~100 us on 2 threads; the weights are read in ~20 us at this machine's L3 rate.
bool small_ok(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  return x.scalar_type() == at::kFloat &&
         (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16) &&
         (!b.has_value() || b->scalar_type() == at::kFloat) && x.size(0) < kMinRows &&
         x.size(0) > 0 && w.size(0) > 0 && x.device().is_cpu();
}

at::Tensor small_linear(const at::Tensor& x_, const at::Tensor& w_,
                        const std::optional<at::Tensor>& b_, bool relu) {
  const auto x = x_.contiguous();  // [M, K]
  const auto w = w_.contiguous();  // [O, K]
  at::Tensor b;
  if (b_.has_value()) b = b_->contiguous();                 // [O]
  const int64_t M = x.size(0), K = x.size(1), O = w.size(0);
  auto y = at::empty({M, O}, x.options());
  const float* px = x.data_ptr<float>();
  const float* pb = b.defined() ? b.data_ptr<float>() : nullptr;
  float* py = y.data_ptr<float>();
  // ~64 KB of weight rows per task at least: fewer parallel regions for narrow layers.
  const int64_t grain =
      std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(1, K * w.element_size()));
  auto run = [&](const auto* pw) {
    parallel_for(0, O, grain, [&](int64_t o0, int64_t o1) {
      isa_dispatch([&](auto) ADREC_LAMBDA_INLINE {
        small_linear_rows(px, pw, pb, py, M, K, O, o0, o1, relu);
      });
    });
  };
  if (w.scalar_type() == at::kBFloat16)
    run(reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()));
  else
    run(w.data_ptr<float>());
  return y;
}

// ---------------------------------------------------------------------------- ATen
at::Tensor aten_linear(const at::Tensor& x, const at::Tensor& w,
                       const std::optional<at::Tensor>& b, bool relu) {
  const int64_t pad = (kGemmAlign - x.size(1) % kGemmAlign) % kGemmAlign;  // zero columns
  at::Tensor y;
  if (pad && x.scalar_type() == at::kFloat && x.size(0) >= kMinRows && w.size(0) > 0) {
    // zero columns in x and w leave every dot product unchanged
    y = at::linear(at::constant_pad_nd(x, {0, pad}), at::constant_pad_nd(w, {0, pad}), b);
  } else {
    y = at::linear(x, w, b);
  }
  return relu ? y.relu_() : y;
}

}  // namespace

Activation parse_activation(c10::string_view name, const char* op) {
  if (name == "none") return Activation::kNone;
  TORCH_CHECK_VALUE(name == "relu", op, ": activation must be 'none' or 'relu', got '",
                    std::string(name.data(), name.size()), "'");
  return Activation::kRelu;
}

at::Tensor linear_forward(const at::Tensor& x_, const at::Tensor& w,
                          const std::optional<at::Tensor>& b_, Activation act) {
  const bool relu = act == Activation::kRelu;
  // the small-batch kernel trusts these shapes: checked for every caller
  TORCH_CHECK_VALUE(x_.dim() == 2 && w.dim() == 2 && w.size(1) == x_.size(1), kOp,
                    ": x must be [M, K] and weight [N, K], got ", x_.sizes(), " and ", w.sizes());
  TORCH_CHECK_VALUE(!b_.has_value() || (b_->dim() == 1 && b_->size(0) == w.size(0)), kOp,
                    ": bias must be [N] = [", w.size(0), "], got ", b_->sizes());
  if (small_ok(x_, w, b_)) return small_linear(x_, w, b_, relu);
  // One output (a model's head): a matrix-vector product. oneDNN's GEMM takes milliseconds
  // here (bench/RESULTS.md, "Dense products with one output"), BLAS's gemv runs at memory speed.
  if (w.size(0) == 1 && x_.scalar_type() == w.scalar_type() && x_.size(1) > 0) {
    auto y = at::mv(x_, w[0]);  // [M]
    if (b_.has_value()) y.add_(*b_);
    if (relu) y.relu_();
    return y.unsqueeze(1);
  }
  // Serving's bf16 towers: float32 activations and biases meet bfloat16 weights; the product
  // runs in bfloat16 (float32 accumulation) and its result stays bfloat16 for the next layer.
  const bool bf16_w = w.scalar_type() == at::kBFloat16;
  TORCH_CHECK_TYPE(
      x_.scalar_type() == w.scalar_type() || (bf16_w && x_.scalar_type() == at::kFloat), kOp,
      ": x has dtype ", x_.scalar_type(), " but weight has dtype ", w.scalar_type());
  const at::Tensor x = x_.scalar_type() == w.scalar_type() ? x_ : x_.to(w.scalar_type());
  std::optional<at::Tensor> b = b_;
  if (b.has_value() && b->scalar_type() != w.scalar_type()) {
    TORCH_CHECK_TYPE(bf16_w && b->scalar_type() == at::kFloat, kOp, ": bias has dtype ",
                     b->scalar_type(), " but weight has dtype ", w.scalar_type());
    b = b->to(w.scalar_type());
  }
  if (x.device().is_cpu() && x.size(1) > 0 && w.size(0) > 0 &&
      onednn_for(x.scalar_type(), x.size(0), /*bf16_ok=*/true)) {
    std::optional<at::Tensor> bc;
    if (b.has_value()) bc = b->contiguous();
    auto y = pointwise_call(x.contiguous(), w, bc, relu ? "relu" : "none");
    if (y.defined()) return y;
  }
  return aten_linear(x, w, b, relu);
}

// A first operand that is not row-major (a transposed view: the weight gradient's g.T) goes to
// ATen, whose BLAS reads it in place; oneDNN would need a transposed copy first. Writing that
// copy, even fused into the backward's elementwise pass, cost more than it saved on a 2-core
// Xeon with AMX (bench/RESULTS_models.md: DLRM and DCN-v2 steps about 5% faster without it).
namespace {
bool matmul_uses_onednn(const at::Tensor& a) {
  return a.device().is_cpu() && a.dim() == 2 && a.size(1) > 0 && a.is_contiguous() &&
         onednn_for(a.scalar_type(), a.size(0), /*bf16_ok=*/false);
}
}  // namespace

int64_t gemm_width(int64_t k, at::ScalarType dtype, int64_t rows) {
  if (dtype != at::kFloat || rows < kMinRows || k <= 0) return k;
  return (k + kGemmAlign - 1) / kGemmAlign * kGemmAlign;
}

at::Tensor matmul_t(const at::Tensor& a, const at::Tensor& b,
                    const std::optional<at::Tensor>& add) {
  // A float32 product with a summand whose inner and output widths are whole multiples of
  // kGemmAlign (activations stored at gemm_width) goes to BLAS, which adds the summand inside
  // its kernel: [4096, 432] x [432, 432] + [4096, 432] takes 4.8 ms there against 5.4 ms through
  // oneDNN's binary post-op (2-core Xeon with AMX, interleaved medians, bench/RESULTS_models.md).
  const bool aligned = a.size(1) % kGemmAlign == 0 && b.size(0) % kGemmAlign == 0;
  if (add.has_value() && aligned && a.scalar_type() == at::kFloat)
    return at::addmm(*add, a, b.t());
  if (matmul_uses_onednn(a) && b.size(0) > 0) {
    at::Tensor y;
    if (!add.has_value()) {
      y = pointwise_call(a, b, std::nullopt, "none");
    } else if (add->scalar_type() == at::kFloat) {
      y = pointwise_add_call(a, b, add->contiguous());
    }
    if (y.defined()) return y;
  }
  return add.has_value() ? at::addmm(*add, a, b.t()) : at::mm(a, b.t());
}

void matmul_t_add_(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b) {
  TORCH_INTERNAL_ASSERT(c.is_contiguous() && c.size(0) == a.size(0) && c.size(1) == b.size(0));
  // BLAS (ATen's addmm_ for float32; oneDNN's matmul for the reduced types) with beta = 1
  // reads c in its kernel: the summand is never copied.
  at::Tensor out = c;
  out.addmm_(a, b.t());
}

namespace {

// ---------------------------------------------------------------------------- backward
// Rows per block of the backward's elementwise pass. The bias gradient is summed per block, then
// over blocks in order, so it does not depend on the thread count.
constexpr int64_t kBwdRows = 64;

// The elementwise part of the backward for `rows` rows of N, reading go (grad_out, row stride N)
// and, for the ReLU, out:
//   g     = go where out > 0, else 0 (threshold_backward's rule, so a NaN output passes its
//           gradient); written to g for the ReLU, which may be a block scratch;
//   colsum[n] = the sum of g[:, n] over these rows, when colsum is not null.
template <typename scalar_t, bool RELU>
ADREC_INLINE void bwd_block(const scalar_t* go, const scalar_t* out, scalar_t* g,
                            acc_t<scalar_t>* colsum, int64_t rows, int64_t N) {
  using acc = acc_t<scalar_t>;
  if (colsum != nullptr)
    for (int64_t n = 0; n < N; ++n) colsum[n] = acc(0);
  if constexpr (RELU) {
    const scalar_t zero(0);
    if (colsum != nullptr) {
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t n = 0; n < N; ++n) {
          const scalar_t v = out[r * N + n] <= zero ? zero : go[r * N + n];
          g[r * N + n] = v;
          colsum[n] += static_cast<acc>(v);
        }
    } else {
      for (int64_t i = 0; i < rows * N; ++i) g[i] = out[i] <= zero ? zero : go[i];
    }
  } else if (colsum != nullptr) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t n = 0; n < N; ++n) colsum[n] += static_cast<acc>(go[r * N + n]);
  }
}

struct BwdPass {
  at::Tensor g;   // [M, N] the gradient of the product (grad_out itself without the ReLU);
                  // with the ReLU undefined unless asked for
  at::Tensor gb;  // [N] the bias gradient; undefined unless asked for
};

// One pass over grad_out (and the ReLU's out) by blocks of rows, producing what the products
// and the bias gradient need: it replaces a threshold pass and a reduction, each of which would
// read the whole [M, N] again. want_g: g must be in memory (for the products); without the ReLU
// it is grad_out and costs nothing.
BwdPass bwd_pass(const at::Tensor& go, const at::Tensor& out, bool relu, bool want_g,
                 bool want_gb) {
  const int64_t M = go.size(0), N = go.size(1);
  BwdPass r;
  if (!relu) r.g = go;
  else if (want_g) r.g = at::empty_like(go);
  if (want_gb && (M == 0 || N == 0)) {
    r.gb = at::zeros({N}, go.options());
    want_gb = false;
  }
  if (M == 0 || N == 0 || !(want_gb || (relu && want_g))) return r;
  const int64_t nblocks = (M + kBwdRows - 1) / kBwdRows;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(), "linear_bwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* pgo = go.template data_ptr<scalar_t>();
    const scalar_t* pout = relu ? out.template data_ptr<scalar_t>() : nullptr;
    scalar_t* pg = relu && want_g ? r.g.template data_ptr<scalar_t>() : nullptr;
    std::vector<acc> partial(want_gb ? static_cast<size_t>(nblocks * N) : 0);  // [nblocks, N]
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (kBwdRows * N));
    parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
      // the ReLU's masked block when g itself is not kept (only the bias gradient is wanted)
      std::vector<scalar_t> scratch(relu && pg == nullptr ? kBwdRows * N : 0);
      isa_dispatch([&](auto) ADREC_LAMBDA_INLINE {
        for (int64_t blk = b0; blk < b1; ++blk) {
          const int64_t r0 = blk * kBwdRows;
          const int64_t rows = std::min(kBwdRows, M - r0);
          const int64_t o = r0 * N;
          scalar_t* dst = pg != nullptr ? pg + o : scratch.data();
          acc* cs = want_gb ? partial.data() + blk * N : nullptr;
          if (relu)
            bwd_block<scalar_t, true>(pgo + o, pout + o, dst, cs, rows, N);
          else
            bwd_block<scalar_t, false>(pgo + o, nullptr, nullptr, cs, rows, N);
        }
      });
    });
    if (want_gb) {
      auto gb = at::zeros({N}, go.options().dtype(c10::CppTypeToScalarType<acc>::value));
      acc* pb = gb.template data_ptr<acc>();
      for (int64_t blk = 0; blk < nblocks; ++blk)
        for (int64_t n = 0; n < N; ++n) pb[n] += partial[blk * N + n];
      r.gb = gb.to(go.scalar_type());
    }
  });
  return r;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w,
    const std::optional<at::Tensor>& out, Activation act, std::array<bool, 3> mask) {
  const bool relu = act == Activation::kRelu;
  TORCH_CHECK_VALUE(!relu || out.has_value(), kOpBwd,
                    ": activation 'relu' needs the forward's result");
  const at::Tensor go = grad_out.contiguous();  // [M, N]
  const at::Tensor res = relu ? out->contiguous() : at::Tensor();
  const int64_t M = go.size(0), N = go.size(1), K = x.size(1);
  if (N == 1 && K > 0 && x.scalar_type() == w.scalar_type()) {  // one output, as the forward
    const BwdPass p = bwd_pass(go, res, relu, /*want_g=*/true, mask[2]);
    const auto g1 = p.g.select(1, 0);  // [M]
    auto gx = mask[0] ? at::outer(g1, w[0]) : at::empty({0}, x.options());  // [M, K]
    auto gw = mask[1] ? at::mv(x.t(), g1).unsqueeze(0) : at::empty({0}, w.options());  // [1, K]
    auto gb = mask[2] ? p.gb : at::empty({0}, go.options());
    return {gx, gw, gb};
  }
  // The weight gradient [N, K] = g.T @ x reads g transposed in place (matmul_uses_onednn).
  const BwdPass p = bwd_pass(go, res, relu, mask[0] || mask[1], mask[2]);
  at::Tensor gx = mask[0] ? matmul_t(p.g, w.t()) : at::empty({0}, x.options());  // [M, K] = g @ w
  at::Tensor gw = mask[1] ? matmul_t(p.g.t(), x.t()) : at::empty({0}, w.options());  // [N, K]
  at::Tensor gb = mask[2] ? p.gb : at::empty({0}, go.options());  // [N]
  return {gx, gw, gb};
}

namespace {

void check_args(const at::Tensor& x, const at::Tensor& w, const char* op) {
  check_floating(x, op, "x");
  check_dim(x, 2, op, "x", "[M, K]");
  check_dim(w, 2, op, "weight", "[N, K]");
  check_same_dtype(w, x, op, "weight", "x");
  check_same_device(w, x, op, "weight", "x");
  TORCH_CHECK_VALUE(w.size(1) == x.size(1), op, ": weight must be [N, K] with K = ", x.size(1),
                    " (x's columns), got ", w.sizes());
}

}  // namespace

// x [M, K], weight [N, K], bias [N]? -> act(x @ weight.T + bias) [M, N]
at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, c10::string_view activation) {
  const Activation act = parse_activation(activation, kOp);
  check_args(x, weight, kOp);
  if (bias.has_value()) {
    check_dim(*bias, 1, kOp, "bias", "[N]");
    check_same_dtype(*bias, x, kOp, "bias", "x");
    check_same_device(*bias, x, kOp, "bias", "x");
    TORCH_CHECK_VALUE(bias->size(0) == weight.size(0), kOp, ": bias must be [N] = [",
                      weight.size(0), "], got ", bias->sizes());
  }
  return linear_forward(x, weight, bias, act);
}

// -> (grad_x [M, K], grad_weight [N, K], grad_bias [N]); outputs not in output_mask are empty
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& out, c10::string_view activation,
    std::array<bool, 3> output_mask) {
  const Activation act = parse_activation(activation, kOpBwd);
  check_args(x, weight, kOpBwd);
  check_dim(grad_out, 2, kOpBwd, "grad_out", "[M, N]");
  check_same_dtype(grad_out, x, kOpBwd, "grad_out", "x");
  check_same_device(grad_out, x, kOpBwd, "grad_out", "x");
  TORCH_CHECK_VALUE(grad_out.size(0) == x.size(0) && grad_out.size(1) == weight.size(0), kOpBwd,
                    ": grad_out must be [M, N] = [", x.size(0), ", ", weight.size(0), "], got ",
                    grad_out.sizes());
  if (out.has_value()) {
    check_same_dtype(*out, x, kOpBwd, "out", "x");
    TORCH_CHECK_VALUE(out->sizes() == grad_out.sizes(), kOpBwd, ": out has shape ", out->sizes(),
                      " but grad_out has shape ", grad_out.sizes());
  }
  return linear_backward(grad_out, x, weight, out, act, output_mask);
}

// ---------------------------------------------------------------------------- blocked layers
namespace {
#include "cpu/linear_blocked.inc"
}  // namespace

void blocked_linear(const LayerCall& a, bool bf16) {
  static const LayerFn bf16_layer = pick_bf16_layer();  // cpu_isa() is fixed for the process
  if (bf16) bf16_layer(a);
  else layer_f32(a);
}

TORCH_LIBRARY_IMPL(adrec, CPU, m) {
  m.impl("linear", &linear_cpu);
  m.impl("linear_bwd", &linear_bwd_cpu);
}

}  // namespace adrec
