// SPDX-License-Identifier: Apache-2.0
#pragma once
// ADREC_CPU_CLONES: GCC target_clones (AVX-512, AVX2+FMA, baseline), resolved by the loader from
// the CPU alone, so ADREC_CPU_ISA does not reach it. Kept only for the files that have not moved
// to isa_dispatch (common/cpu_isa.h) yet: csrc/cpu/scorer.cpp, scorer_mlp.inc, cross_layer.cpp.
// New code uses isa_dispatch.
#include "common/cpu_isa.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define ADREC_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ADREC_CPU_CLONES
#endif
