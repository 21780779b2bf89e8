// SPDX-License-Identifier: Apache-2.0
#pragma once
// The serving request encoder: raw request values (a user dict, candidate columns) -> the ids
// and transformed dense values the schema gives in training, in one native call. Built once
// per model version from the description adrec_fast.serving.encoder makes of a fitted Schema;
// request_encoder.cpp has the rules (tokens, vocabularies, salted hashing, dense transforms)
// and every request error message.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

namespace adrec {

// One encoded request (the fields of _C.EncodedRequest, in C++ buffers): n candidates;
// cand_slots / dense_cand: the bag / dense positions given per candidate, ascending; user_ids
// [T] (0 at candidate slots); cand_ids [n, Tc]; dense [Nd, Kd] (Nd = 1 unless dense_cand);
// seq_ids: every history's ids one after the other, seq_lengths [S].
struct EncodedBuffers {
  int64_t n = 0, Nd = 1;
  std::vector<int64_t> cand_slots, dense_cand, user_ids, cand_ids, seq_ids, seq_lengths;
  std::vector<float> dense;
};

// A value of a closed field (one the encoder describes with "closed": its vocabulary's values
// or None) outside it: _C.UnknownValue, a KeyError, in Python.
struct UnknownValue : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Encodes one request with `encoder` (a _C.RequestEncoder) into `out` (its buffers are reused:
// a caller keeps one per thread). Raises the encoder's Python errors.
void encode_request(pybind11::handle encoder, pybind11::handle user, pybind11::handle candidates,
                    EncodedBuffers& out);

// Adds _C.RequestEncoder and _C.EncodedRequest to the module.
void bind_request_encoder(pybind11::module_& m);

}  // namespace adrec
