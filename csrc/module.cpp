// SPDX-License-Identifier: Apache-2.0
// The pybind11 module: non-tensor utilities only. Ops are registered through torch.library
// by static registrars in registration.cpp and the per-device files.
#include <pybind11/pybind11.h>

#include <string>

#ifndef ADREC_TORCH_VERSION
#define ADREC_TORCH_VERSION "unknown"
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "adrec_fast native core";
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
