// SPDX-License-Identifier: Apache-2.0
#pragma once
// The serving executor (scorer.cpp) behind a handle, for the numpy entry point of module.cpp:
// adrec::serving_forward parses and validates the packed model on every call and pays the
// torch.ops dispatch (~3 us) and the numpy <-> tensor glue (~2 us) on a forward of ~10 us at one
// candidate; the handle parses once and takes raw buffers. Both run the same checks and kernel.
#include <cstdint>
#include <memory>

namespace adrec {

enum class TableDtype : int { kFloat32 = 0, kFloat16 = 1, kUInt8 = 2 };

// A model packed by adrec_fast.serving.scorer.pack (meta [n_meta] int64, blob [n_blob] uint8)
// over its embedding rows weights [R, D] (+ scale_bias [R, 2] float32 for uint8) and its
// first-order weights lin [R] float32 (null when the model has none), validated once
// (ValueError / TypeError as the op). It points into the caller's buffers, which must outlive
// it and never change. score() is thread-safe.
class ServingModel {
 public:
  ServingModel(const int64_t* meta, int64_t n_meta, const uint8_t* blob, int64_t n_blob,
               const void* weights, TableDtype dtype, int64_t R, int64_t D,
               const float* scale_bias, const float* lin);
  ~ServingModel();
  ServingModel(const ServingModel&) = delete;
  ServingModel& operator=(const ServingModel&) = delete;

  int64_t num_slots() const;  // T: sparse slots (bags)
  int64_t num_user() const;   // Tu: user-side slots
  int64_t num_cand() const;   // Tc: candidate-side slots
  int64_t num_dense() const;  // Kd: dense width (0: none)
  int64_t num_seq() const;    // S: behaviour histories
  bool dense_varies() const;  // some dense field is candidate-side: dense is [N, Kd]

  // user_ids [Tu] (or [T], read at the user slots) int64, cand_ids [N, Tc] int64 (ids within
  // their tables, slot order), dense [Nd, Kd] float32 (Nd = N when dense_varies(), else 1; may
  // be null when Kd = 0), seq_ids [sum L] int64 with seq_lengths [S] (the user's histories, one
  // after the other) -> out [N] probabilities. Checks every id and dense value first
  // (IndexError / ValueError), then runs the forward.
  void score(const int64_t* user_ids, int64_t n_user, const int64_t* cand_ids, int64_t N,
             const float* dense, int64_t Nd, const int64_t* seq_ids, const int64_t* seq_lengths,
             float* out) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace adrec
