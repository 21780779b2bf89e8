// SPDX-License-Identifier: Apache-2.0
#include "common/cpu_isa.h"

#include <algorithm>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace adrec {
namespace {

Isa detect() {
#if ADREC_ISA_X86
  __builtin_cpu_init();
  // libgcc's checks include the OS's support for the wider register state (XCR0).
  if (__builtin_cpu_supports("x86-64-v4")) return Isa::avx512;
  if (__builtin_cpu_supports("x86-64-v3")) return Isa::avx2;
#endif
  return Isa::base;
}

Isa resolve() {
  const Isa best = detect();
  const char* e = std::getenv("ADREC_CPU_ISA");
  if (e == nullptr || *e == '\0') return best;
  const std::string v(e);
  Isa want;
  if (v == "native") return best;
  if (v == "base") want = Isa::base;
  else if (v == "avx2") want = Isa::avx2;
  else if (v == "avx512") want = Isa::avx512;
  else
    throw std::invalid_argument("ADREC_CPU_ISA='" + v +
                                "' is not one of: base, avx2, avx512, native (or unset)");
  return std::min(want, best);
}

}  // namespace

Isa cpu_isa_supported() {
  static const Isa v = detect();
  return v;
}

Isa cpu_isa() {
  static const Isa v = resolve();
  return v;
}

bool cpu_has_avx512_bf16() {
  static const bool v = [] {
#if ADREC_ISA_X86
    __builtin_cpu_init();
    return cpu_isa() >= Isa::avx512 && __builtin_cpu_supports("avx512bf16");
#else
    return false;
#endif
  }();
  return v;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "base";
  }
}

}  // namespace adrec
