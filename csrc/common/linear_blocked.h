// SPDX-License-Identifier: Apache-2.0
#pragma once
// Pre-blocked layers: the products of the packed serving model (adrec::serving_forward), whose
// weights are laid out once per model (adrec_fast/serving/scorer.py, pack) so that a
// request reads them in the order the kernels use. The kernels and the choice among them (fp32,
// bf16 with AVX512_BF16 where cpu_isa() allows it, portable bf16) live in csrc/cpu/linear.cpp with
// the rest of the dense-product policy (csrc/cpu/linear_blocked.inc).
//
// Weight layout. A layer with O outputs and K inputs is padded to Ob = ceil(O / 16) blocks of 16
// outputs and Kp = ceil(K / 16) * 16 inputs (zeros), and stored block by block, k-major inside a
// block, so that one 64-byte load holds the 16 outputs of one input:
//   fp32: [Ob][Kp][16] float
//   bf16: [Ob][Kp/2][16][2] bfloat16 = [Ob][Kp/2][16] uint32 pairs (k even in the low half), the
//         operand layout of AVX512_BF16 vdpbf16ps.
// Bias [Ob * 16] float32. Activations are rows of Kp floats (fp32) or Kp/2 uint32 bf16 pairs.
// Padded outputs are relu(0 + 0) = 0, so a layer's padded output is the next layer's padded input.
#include <cstdint>
#include <cstring>

#include "common/cpu_isa.h"

namespace adrec {

typedef float v16f __attribute__((vector_size(64), aligned(4), may_alias));
typedef uint32_t v16u __attribute__((vector_size(64), aligned(4), may_alias));
typedef int32_t v16i __attribute__((vector_size(64), aligned(4), may_alias));

struct LayerCall {
  const void* w;       // blocked weights (see above)
  const float* bias;   // [Ob * 16]
  int64_t Kp;          // padded inputs
  const void* x;       // [M][ldx] floats (fp32) or uint32 pairs (bf16)
  int64_t ldx;
  int64_t M, ob0, ob1;
  bool relu;
  float* y;            // [M][ldy] float32 output, or null
  int64_t ldy;
  uint32_t* yb;        // [M][ldyb] bf16 pairs output, or null
  int64_t ldyb;
};

// float32 -> bfloat16 bits, round to nearest even (as torch's .to(torch.bfloat16) for finite x).
ADREC_INLINE uint32_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}

// x [n] float32 (n even) -> [n / 2] bf16 pairs
ADREC_INLINE void pack_bf16(const float* x, int64_t n, uint32_t* out) {
  for (int64_t i = 0; i < n / 2; ++i)
    out[i] = bf16_bits(x[2 * i]) | (bf16_bits(x[2 * i + 1]) << 16);
}

// act(x @ W.T + b) for rows [0, a.M) and output blocks [a.ob0, a.ob1) of one blocked layer;
// bf16: the weights and activations are bf16 pairs (float32 accumulation).
void blocked_linear(const LayerCall& a, bool bf16);

}  // namespace adrec
