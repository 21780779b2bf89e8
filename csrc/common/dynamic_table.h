// SPDX-License-Identifier: Apache-2.0
#pragma once
// The dynamic embedding table's key -> row map (csrc/cpu/dynamic_table.cpp): raw 64-bit keys to
// rows of a table whose rows the Python module adrec_fast.nn.dynamic_table owns, with admission,
// TTL expiry and LFU/age eviction. A non-tensor utility, so it is bound with pybind11.
#include <pybind11/pybind11.h>

namespace adrec {

// Adds _C.DynamicTable to the module.
void bind_dynamic_table(pybind11::module_& m);

}  // namespace adrec
