// SPDX-License-Identifier: Apache-2.0
#pragma once
// The serving request encoder: raw request values (a user dict, candidate columns) -> the ids
// and transformed dense values the schema gives in training, in one native call. Built once
// per model version from the description adrec_fast.serving.encoder makes of a fitted Schema;
// request_encoder.cpp has the rules (tokens, vocabularies, salted hashing, dense transforms)
// and every request error message.
#include <pybind11/pybind11.h>

namespace adrec {

// Adds _C.RequestEncoder and _C.EncodedRequest to the module.
void bind_request_encoder(pybind11::module_& m);

}  // namespace adrec
