// SPDX-License-Identifier: Apache-2.0
#pragma once
// Branch-free, call-free float32 exp / log1p on the ranges the kernels need, so loops over them
// vectorise in every ISA clone (libm's expf / log1pf do not without -ffast-math).
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common/cpu_isa.h"

namespace adrec {

// e^x for x <= 0, written without calls or branches so loops over it vectorise (libm's expf
// does not without -ffast-math). Cody-Waite: x = n ln2 + r with |r| <= ln2/2, e^r by a degree-7
// Taylor polynomial (error < 1e-8 relative), 2^n built in the exponent bits. x is clamped at -87,
// where e^x = 1.6e-38 is still a normal float; below it the callers' results are already exact
// to within that.
ADREC_INLINE float exp_nonpos(float x) {
  x = std::max(x, -87.0f);
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float nf = x * kLog2e + kMagic;
  int32_t nbits;
  std::memcpy(&nbits, &nf, sizeof(nbits));  // low mantissa bits hold n
  nf -= kMagic;
  float r = x - nf * 0.693145751953125f;  // ln2, high part (exact product for |n| < 2^11)
  r = r - nf * 1.428606765330187045e-06f;  // ln2, low part
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t sbits = (nbits - 0x4B400000 + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &sbits, sizeof(scale));
  return p * scale;
}

// log(1 + t) for t in [0, 1], vectorisable, given u = fl(1 + t) and r = 1 / u (callers that
// also need the sigmoid 1 / (1 + t) have both already). log(u), u = m 2^e, m in [1, sqrt 2), as
// e ln2 + 2 atanh(f) with f = (m - 1)/(m + 1) <= 0.172 (series to f^9: error < 3e-9); then
// log1p(t) = log(u) + (t - (u - 1)) / u to first order, which undoes the rounding of 1 + t, so
// tiny t (u == 1) stay accurate. One division.
ADREC_INLINE float log1p_01(float t, float u, float r) {
  const bool big = u > 1.41421356f;
  // m = u / c with c = 2 (big) or 1, and f = (m - 1)/(m + 1) = (u - c)/(u + c): the selection
  // is on a constant, so the compiler emits one unmasked division (a select of m before the
  // division made GCC split it into two masked ones).
  const float c = big ? 2.0f : 1.0f;
  const float f = (u - c) / (u + c);
  const float f2 = f * f;
  float s = 1.0f / 9.0f;
  s = s * f2 + 1.0f / 7.0f;
  s = s * f2 + 1.0f / 5.0f;
  s = s * f2 + 1.0f / 3.0f;
  s = s * f2 + 1.0f;
  const float logu = (big ? 0.693147180559945309f : 0.0f) + 2.0f * f * s;
  return logu + (t - (u - 1.0f)) * r;
}

ADREC_INLINE float log1p_01(float t) {
  const float u = 1.0f + t;
  return log1p_01(t, u, 1.0f / u);
}

}  // namespace adrec
