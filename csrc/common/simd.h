// SPDX-License-Identifier: Apache-2.0
#pragma once
// Run-time ISA choice for hot loops, with portable build flags (no -march=native): a function
// marked ADREC_CPU_CLONES is compiled three times (AVX-512, AVX2+FMA, baseline x86-64) and the
// loader picks the best clone for the CPU it runs on (GCC ifunc). Loops inside it are written
// with fixed-width inner loops so the compiler vectorises them for each clone. Helpers called
// from a clone must be ADREC_INLINE so that they are compiled with the clone's ISA too.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define ADREC_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ADREC_CPU_CLONES
#endif
#define ADREC_INLINE inline __attribute__((always_inline))

#include <cstdlib>
#include <cstring>

namespace adrec {
// ADREC_CPU_ISA=base: the kernels with a hand-written wider-ISA path (embedding_bag's AVX2,
// sigmoid_bce's AVX-512) take their portable one instead (tests compare the two). Read once.
inline bool isa_base_forced() {
  static const bool v = [] {
    const char* e = std::getenv("ADREC_CPU_ISA");
    return e != nullptr && std::strcmp(e, "base") == 0;
  }();
  return v;
}
}  // namespace adrec
