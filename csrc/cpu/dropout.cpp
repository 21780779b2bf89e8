// SPDX-License-Identifier: Apache-2.0
// adrec::dropout on the CPU: y[i] = x[i] * keep(seed, offset + i) / (1 - p), where keep is a
// counter-based hash of the element's index, so the mask needs no generator state and no
// storage: the backward is the same op on the gradient (same seed and offset), a rank of a
// distributed run draws its rows of the global batch's mask by its offset, and
// adrec_fast/reference/dropout.py computes the same mask with integer tensor ops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/checks.h"
#include "common/cpu_isa.h"
#include "common/parallel.h"

namespace adrec {
namespace {

constexpr const char* kOp = "dropout";

ADREC_INLINE uint32_t fmix32(uint32_t h) {  // murmur3's finaliser: full avalanche
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// The mask's hash of element i (seed s): fmix32((lo(i) ^ lo(s)) * 0x9E3779B1 + fmix32(hi(i) ^
// hi(s))); the element is kept when the hash is >= threshold = floor(p * 2^32). Scaled in float
// (double for double tensors).
// y may be x itself (dropout_): each element is read before it is written. The in-place call
// passes one pointer as both, so the loop has no overlap for the vectoriser to check.
template <typename scalar_t>
ADREC_INLINE void dropout_block(const scalar_t* x, scalar_t* y, int64_t i0, int64_t i1,
                                int64_t offset, uint64_t seed, uint32_t threshold, double scale_) {
  using acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const acc scale = static_cast<acc>(scale_);
  const uint32_t s_lo = uint32_t(seed), s_hi = uint32_t(seed >> 32);
  int64_t i = i0;
  while (i < i1) {
    // elements whose global index shares its upper 32 bits: one inner hash for the run
    const uint64_t g = uint64_t(offset + i);
    const int64_t run =
        std::min<int64_t>(i1 - i, int64_t((uint64_t(1) << 32) - (g & 0xFFFFFFFFu)));
    const uint32_t a = fmix32(uint32_t(g >> 32) ^ s_hi);
    const uint32_t lo0 = uint32_t(g);
    const scalar_t* xr = x + i;
    scalar_t* yr = y + i;
    for (int64_t k = 0; k < run; ++k) {
      const uint32_t h = fmix32(((lo0 + uint32_t(k)) ^ s_lo) * 0x9E3779B1u + a);
      const acc v = static_cast<acc>(xr[k]) * scale;
      yr[k] = static_cast<scalar_t>(h >= threshold ? v : acc(0));
    }
    i += run;
  }
}

void check_dropout_args(const at::Tensor& x, double p, int64_t offset, const char* op) {
  check_floating(x, op, "x");
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0, op, ": p must be in [0, 1], got ", p);
  TORCH_CHECK_VALUE(offset >= 0, op, ": offset must be >= 0, got ", offset);
}

// y = dropout(x) for contiguous x and y of x's shape; y may be x.
void run_dropout(const at::Tensor& x, const at::Tensor& y, double p, int64_t seed,
                 int64_t offset) {
  const int64_t n = x.numel();
  if (n == 0) return;
  if (p == 1.0) {
    y.zero_();
    return;
  }
  // keep when hash >= threshold: P(keep) = 1 - threshold / 2^32, p to within 2^-32
  const uint32_t threshold = uint32_t(std::min(std::floor(p * 4294967296.0), 4294967295.0));
  const double scale = 1.0 / (1.0 - p);
  const bool in_place = x.data_ptr() == y.data_ptr();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_cpu", [&] {
    scalar_t* py = y.template data_ptr<scalar_t>();
    const scalar_t* px = in_place ? py : x.template const_data_ptr<scalar_t>();
    parallel_for(0, n, at::internal::GRAIN_SIZE, [&](int64_t i0, int64_t i1) {
      isa_dispatch([&](auto) ADREC_LAMBDA_INLINE {
        if (in_place)
          dropout_block<scalar_t>(py, py, i0, i1, offset, uint64_t(seed), threshold, scale);
        else
          dropout_block<scalar_t>(px, py, i0, i1, offset, uint64_t(seed), threshold, scale);
      });
    });
  });
}

}  // namespace

at::Tensor dropout_cpu(const at::Tensor& x_, double p, int64_t seed, int64_t offset) {
  check_dropout_args(x_, p, offset, kOp);
  const at::Tensor x = x_.contiguous();
  auto y = at::empty_like(x);
  run_dropout(x, y, p, seed, offset);
  return y;
}

// In place, for a tensor nobody else reads (the fused Linear + ReLU + dropout's fresh ReLU
// output): no second [M, N] block to allocate and write.
void dropout_inplace_cpu(at::Tensor x, double p, int64_t seed, int64_t offset) {
  check_dropout_args(x, p, offset, "dropout_");
  TORCH_CHECK_VALUE(x.is_contiguous(), "dropout_: x must be contiguous, got strides ",
                    x.strides(), " for shape ", x.sizes());
  run_dropout(x, x, p, seed, offset);
}

TORCH_LIBRARY_IMPL(adrec, CPU, m) {
  m.impl("dropout", &dropout_cpu);
  m.impl("dropout_", &dropout_inplace_cpu);
}

}  // namespace adrec
