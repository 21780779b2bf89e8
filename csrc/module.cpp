// SPDX-License-Identifier: Apache-2.0
// The pybind11 module: non-tensor utilities only. Ops are registered through torch.library
// by static registrars in registration.cpp and the per-device files.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#ifndef ADREC_TORCH_VERSION
#define ADREC_TORCH_VERSION "unknown"
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "adrec_fast native core";
  // Asks the kernel to back the 2 MiB-aligned interior of [address, address + nbytes) with
  // transparent huge pages (madvise MADV_HUGEPAGE; Linux only). Call it on a fresh allocation
  // before its first write. A pooled lookup reads random rows of a table of hundreds of MB: with
  // 4 KiB pages nearly every row costs a TLB miss and a page walk. Returns whether the advice
  // was taken; it never changes what the memory holds.
  m.def(
      "advise_huge_pages",
      [](std::uintptr_t address, std::size_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
        constexpr std::uintptr_t kHuge = std::uintptr_t(1) << 21;
        const std::uintptr_t a = (address + kHuge - 1) & ~(kHuge - 1);
        const std::uintptr_t e = (address + nbytes) & ~(kHuge - 1);
        if (e <= a) return false;
        return madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE) == 0;
#else
        (void)address;
        (void)nbytes;
        return false;
#endif
      },
      py::arg("address"), py::arg("nbytes"));
  m.def("build_info", [] {
    py::dict d;
    d["torch"] = std::string(ADREC_TORCH_VERSION);
#ifdef ADREC_WITH_CUDA
    d["cuda"] = true;
#else
    d["cuda"] = false;
#endif
#ifdef _OPENMP
    d["openmp"] = true;
#else
    d["openmp"] = false;
#endif
    d["compiler"] = std::string(__VERSION__);
    return d;
  });
}
