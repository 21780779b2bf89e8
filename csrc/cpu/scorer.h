// SPDX-License-Identifier: Apache-2.0
#pragma once
// The packed-DLRM serving forward (scorer.cpp) behind a handle, for the numpy entry point of
// module.cpp. adrec::serving_dlrm parses and validates the packed model on every call, and its
// torch.ops call costs ~3 us of dispatch plus ~2 us of numpy <-> tensor glue per request, on a
// forward of ~10 us at one candidate; the handle parses once and takes raw buffers. Both paths
// run the same checks and the same kernel (dlrm_forward).
#include <cstdint>
#include <memory>

namespace adrec {

enum class TableDtype : int { kFloat32 = 0, kFloat16 = 1, kUInt8 = 2 };

// A DLRM packed by adrec_fast.serving.scorer.pack_dlrm (meta [n_meta] int64, blob [n_blob]
// uint8) over its embedding buffer weights [R, D] (+ scale_bias [R, 2] float32 for uint8),
// validated once (ValueError / TypeError as serving_dlrm). It points into the caller's buffers,
// which must outlive it and never change. score() is thread-safe.
class ServingDLRM {
 public:
  ServingDLRM(const int64_t* meta, int64_t n_meta, const uint8_t* blob, int64_t n_blob,
              const void* weights, TableDtype dtype, int64_t R, int64_t D,
              const float* scale_bias);
  ~ServingDLRM();
  ServingDLRM(const ServingDLRM&) = delete;
  ServingDLRM& operator=(const ServingDLRM&) = delete;

  int64_t num_user() const;   // Tu: user-side slots
  int64_t num_cand() const;   // Tc: candidate-side slots
  int64_t num_dense() const;  // Kd: dense width (0: none)

  // user_ids [Tu] int64, cand_ids [N, Tc] int64 (ids within their tables, packed slot order),
  // dense [Kd] float32 (may be null when Kd = 0) -> out [N] probabilities. Checks every id and
  // dense value first (IndexError / ValueError as serving_dlrm), then runs the forward.
  void score(const int64_t* user_ids, const int64_t* cand_ids, int64_t N, const float* dense,
             float* out) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace adrec
