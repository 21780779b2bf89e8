// SPDX-License-Identifier: Apache-2.0
#pragma once
// The one place that decides which instruction set the CPU kernels use. The build uses portable
// flags (no -march=native); a kernel's hot loop is compiled once per ISA level and the level is
// chosen at run time by cpu_isa(): the best level the CPU supports, lowered by ADREC_CPU_ISA.
//
//   ADREC_CPU_ISA=base    x86-64 baseline (SSE2)
//   ADREC_CPU_ISA=avx2    x86-64-v3 (AVX2, FMA, BMI2, F16C)
//   ADREC_CPU_ISA=avx512  x86-64-v4 (AVX-512 F/BW/DQ/VL; the bf16 dot product where the CPU has
//                         AVX512_BF16)
//   unset or "native"     the best level the CPU supports
// A level above what the CPU supports is lowered to it; any other value is an error.
//
// How a kernel uses it:
//   isa_dispatch([&](auto isa) ADREC_LAMBDA_INLINE { block(...); });
// compiles the lambda, and everything it inlines, once per level (ADREC_TARGET_AVX2 /
// ADREC_TARGET_AVX512 wrappers) and runs the copy for cpu_isa(). Helpers called from the lambda
// are ADREC_INLINE so that they are compiled with the wrapper's ISA; decltype(isa)::value is the
// level, for code whose source differs by level. Hand-written intrinsics live in functions marked
// ADREC_TARGET_AVX2 / ADREC_TARGET_AVX512 and are called only when cpu_isa() reaches that level.
#include <type_traits>

#define ADREC_INLINE inline __attribute__((always_inline))
#define ADREC_LAMBDA_INLINE __attribute__((always_inline))

#if defined(__GNUC__) && defined(__x86_64__)
#define ADREC_ISA_X86 1
#define ADREC_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#define ADREC_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
// x86-64-v4 plus the bfloat16 dot product (vdpbf16ps); call only where cpu_has_avx512_bf16()
#define ADREC_TARGET_AVX512_BF16 __attribute__((target("arch=x86-64-v4,avx512bf16")))
#else
#define ADREC_ISA_X86 0
#define ADREC_TARGET_AVX2
#define ADREC_TARGET_AVX512
#define ADREC_TARGET_AVX512_BF16
#endif

namespace adrec {

enum class Isa : int { base = 0, avx2 = 1, avx512 = 2 };

// The level every kernel uses: resolved once (first call), thread-safe. Throws
// std::invalid_argument for an unknown ADREC_CPU_ISA (the module resolves it at import).
Isa cpu_isa();
// The best level this CPU supports, whatever ADREC_CPU_ISA says.
Isa cpu_isa_supported();
// AVX512_BF16 (vdpbf16ps) may be used: cpu_isa() is avx512 and the CPU has it.
bool cpu_has_avx512_bf16();
const char* isa_name(Isa isa);

template <Isa I>
using IsaTag = std::integral_constant<Isa, I>;

namespace isa_detail {
template <typename F>
__attribute__((noinline)) auto run_base(const F& f) {
  return f(IsaTag<Isa::base>());
}
#if ADREC_ISA_X86
template <typename F>
ADREC_TARGET_AVX2 __attribute__((noinline)) auto run_avx2(const F& f) {
  return f(IsaTag<Isa::avx2>());
}
template <typename F>
ADREC_TARGET_AVX512 __attribute__((noinline)) auto run_avx512(const F& f) {
  return f(IsaTag<Isa::avx512>());
}
#endif
}  // namespace isa_detail

// Runs f(IsaTag<level>) compiled for min(cpu_isa(), Max). Max caps the levels a kernel is built
// for, where a wider level buys nothing (it saves a third copy of the code).
template <Isa Max = Isa::avx512, typename F>
auto isa_dispatch(const F& f) {
#if ADREC_ISA_X86
  const Isa isa = cpu_isa();
  if constexpr (Max >= Isa::avx512) {
    if (isa >= Isa::avx512) return isa_detail::run_avx512(f);
  }
  if constexpr (Max >= Isa::avx2) {
    if (isa >= Isa::avx2) return isa_detail::run_avx2(f);
  }
#endif
  return isa_detail::run_base(f);
}

}  // namespace adrec
