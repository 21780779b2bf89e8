// SPDX-License-Identifier: Apache-2.0
// Sigmoid + binary cross-entropy on CUDA: the mean loss and its gradient in one pass, and the
// fused linear + sigmoid score for inference.
//
// Determinism: the loss is reduced in a fixed tree (per block in shared memory, then one ATen
// sum over the per-block partials); the grid size depends only on B. No atomics.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "common/acc_type.h"
#include "common/checks.h"

namespace adrec {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 1024;
constexpr int kWarp = 32;

// Grid-stride over the batch; each thread writes the gradient of its elements and adds their
// losses; the block reduces in shared memory and writes one partial sum.
// loss = w * (max(z, 0) - z*y + log1p(exp(-|z|))), grad = (sigmoid(z) - y) * w / B.
template <typename scalar_t, bool HAS_W>
__global__ void sigmoid_bce_kernel(const scalar_t* __restrict__ z,    // [B]
                                   const scalar_t* __restrict__ y,    // [B]
                                   const scalar_t* __restrict__ w,    // [B]
                                   scalar_t* __restrict__ grad,       // [B]
                                   acc_t<scalar_t>* __restrict__ part,  // [gridDim.x]
                                   int64_t n) {
  using acc = acc_t<scalar_t>;
  __shared__ acc sh[kThreads];
  const acc inv_n = acc(1) / static_cast<acc>(n);
  acc local = acc(0);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const acc zi = static_cast<acc>(z[i]);
    const acc yi = static_cast<acc>(y[i]);
    const acc e = exp(-fabs(zi));
    acc l = (zi > acc(0) ? zi : acc(0)) - zi * yi + log1p(e);
    acc s = zi >= acc(0) ? acc(1) / (acc(1) + e) : e / (acc(1) + e);
    acc g = s - yi;
    if (HAS_W) {
      const acc wi = static_cast<acc>(w[i]);
      l *= wi;
      g *= wi;
    }
    grad[i] = static_cast<scalar_t>(g * inv_n);
    local += l;
  }
  sh[threadIdx.x] = local;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s /= 2) {
    if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) part[blockIdx.x] = sh[0];
}

// One warp per row: lanes stride over K, butterfly-reduce, lane 0 writes sigmoid(x.w + b).
template <typename scalar_t>
__global__ void score_kernel(const scalar_t* __restrict__ x,  // [B, K]
                             const scalar_t* __restrict__ w,  // [K]
                             const scalar_t* __restrict__ b,  // [1]
                             scalar_t* __restrict__ out,      // [B]
                             int64_t B, int64_t K) {
  using acc = acc_t<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / kWarp) + threadIdx.x / kWarp;
  if (row >= B) return;
  const scalar_t* xr = x + row * K;
  acc s = acc(0);
  for (int64_t k = lane; k < K; k += kWarp) s += static_cast<acc>(xr[k]) * static_cast<acc>(w[k]);
#pragma unroll
  for (int m = kWarp / 2; m > 0; m /= 2) s += __shfl_xor_sync(0xffffffffu, s, m);
  if (lane == 0) {
    const acc zz = s + static_cast<acc>(b[0]);
    out[row] = static_cast<scalar_t>(acc(1) / (acc(1) + exp(-zz)));
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sigmoid_bce_cuda(const at::Tensor& logits,
                                                    const at::Tensor& labels_,
                                                    const c10::optional<at::Tensor>& weight_) {
  constexpr const char* op = "sigmoid_bce";
  check_floating(logits, op, "logits");
  check_dim(logits, 1, op, "logits", "[B]");
  TORCH_CHECK_VALUE(labels_.sizes() == logits.sizes(), op, ": labels has shape ", labels_.sizes(),
                    " but logits has shape ", logits.sizes());
  check_same_device(labels_, logits, op, "labels", "logits");
  c10::cuda::CUDAGuard guard(logits.device());
  auto z = logits.contiguous();
  auto y = labels_.to(logits.scalar_type()).contiguous();
  at::Tensor w;
  if (weight_.has_value()) {
    TORCH_CHECK_VALUE(weight_->sizes() == logits.sizes(), op, ": weight has shape ",
                      weight_->sizes(), " but logits has shape ", logits.sizes());
    check_same_device(*weight_, logits, op, "weight", "logits");
    w = weight_->to(logits.scalar_type()).contiguous();
  }
  const int64_t n = z.numel();
  auto grad = at::empty_like(z);
  const bool reduced = z.scalar_type() == at::kHalf || z.scalar_type() == at::kBFloat16;
  const auto acc_type = reduced ? at::kFloat : z.scalar_type();
  const int64_t blocks64 = (n + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(blocks64 < kMaxBlocks ? (blocks64 > 0 ? blocks64 : 1) : kMaxBlocks);
  auto part = at::zeros({blocks}, z.options().dtype(acc_type));
  if (n > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "sigmoid_bce_cuda", [&] {
      using acc = acc_t<scalar_t>;
      const scalar_t* wp = w.defined() ? w.data_ptr<scalar_t>() : nullptr;
      auto launch = [&](auto has_w) {
        sigmoid_bce_kernel<scalar_t, decltype(has_w)::value><<<blocks, kThreads, 0, stream>>>(
            z.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), wp, grad.data_ptr<scalar_t>(),
            part.data_ptr<acc>(), n);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (wp != nullptr) launch(std::true_type());
      else launch(std::false_type());
    });
  }
  // Mean over an empty batch is NaN, as in torch.
  auto loss = (part.sum() / static_cast<double>(n)).to(z.scalar_type());
  return {loss, grad};
}

at::Tensor score_cuda(const at::Tensor& x_, const at::Tensor& w_, const at::Tensor& b_) {
  constexpr const char* op = "score";
  check_floating(x_, op, "x");
  check_dim(x_, 2, op, "x", "[B, K]");
  check_dim(w_, 1, op, "w", "[K]");
  TORCH_CHECK_VALUE(w_.size(0) == x_.size(1), op, ": w has ", w_.size(0), " entries but x has K=",
                    x_.size(1));
  TORCH_CHECK_VALUE(b_.numel() == 1, op, ": b must have one element, got shape ", b_.sizes());
  check_same_dtype(w_, x_, op, "w", "x");
  check_same_device(w_, x_, op, "w", "x");
  check_same_device(b_, x_, op, "b", "x");
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous();
  auto w = w_.contiguous();
  auto b = b_.to(x.scalar_type()).reshape({1}).contiguous();
  const int64_t B = x.size(0), K = x.size(1);
  auto out = at::empty({B}, x.options());
  if (B == 0) return out;
  const int64_t rows_per_block = kThreads / kWarp;
  const int blocks = static_cast<int>((B + rows_per_block - 1) / rows_per_block);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "score_cuda", [&] {
    score_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(),
        out.data_ptr<scalar_t>(), B, K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

TORCH_LIBRARY_IMPL(adrec, CUDA, m) {
  m.impl("sigmoid_bce", &sigmoid_bce_cuda);
  m.impl("score", &score_cuda);
}

}  // namespace adrec
