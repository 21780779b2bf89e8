// SPDX-License-Identifier: Apache-2.0
#pragma once
// What an argument is, for the errors of the pybind11 entry points: "float32 array [3, 4]" for a
// numpy array, else its type's name.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

namespace adrec {

inline std::string describe(pybind11::handle obj) {
  namespace py = pybind11;
  if (!py::isinstance<py::array>(obj)) return py::str(py::type::of(obj).attr("__name__"));
  const auto a = py::reinterpret_borrow<py::array>(obj);
  std::string shape = "[";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) shape += (i ? ", " : "") + std::to_string(a.shape(i));
  return py::str(a.dtype()).cast<std::string>() + " array " + shape + "]";
}

}  // namespace adrec
