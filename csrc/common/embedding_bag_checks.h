// SPDX-License-Identifier: Apache-2.0
#pragma once
// Device-independent argument checks of the embedding_bag ops, shared by csrc/cpu and csrc/cuda
// so both raise the same errors. The offsets' contents (start, monotonicity, end) are checked by
// each device file: on the host for CPU tensors, with one small read-back on CUDA.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

#include "common/checks.h"

namespace adrec {
namespace embedding_bag_checks {

constexpr const char* kOp = "embedding_bag";

struct Shape {
  int64_t T = 0, B = 0, D = 0, N = 0, nnz = 0;
  std::vector<int64_t> table_offsets;  // [T+1], host copy, validated
};

// Dtypes, dimensions, devices, pooling, the table layout (table_offsets on the host), the
// length of offsets and per_sample_weights.
inline Shape check_args(const at::Tensor& weights, const at::Tensor& table_offsets,
                        const at::Tensor& indices, const at::Tensor& offsets,
                        const c10::optional<at::Tensor>& psw, int64_t pooling) {
  check_floating(weights, kOp, "weights");
  check_dim(weights, 2, kOp, "weights", "[N_total, D]");
  check_index_dtype(table_offsets, kOp, "table_offsets");
  check_index_dtype(indices, kOp, "indices");
  check_index_dtype(offsets, kOp, "offsets");
  check_dim(table_offsets, 1, kOp, "table_offsets", "[T+1]");
  check_dim(indices, 1, kOp, "indices", "[nnz]");
  check_dim(offsets, 1, kOp, "offsets", "[T*B+1]");
  TORCH_CHECK_VALUE(pooling == 0 || pooling == 1, kOp,
                    ": pooling must be 0 (sum) or 1 (mean), got ", pooling);
  check_same_device(table_offsets, weights, kOp, "table_offsets", "weights");
  check_same_device(indices, weights, kOp, "indices", "weights");
  check_same_device(offsets, weights, kOp, "offsets", "weights");
  Shape S;
  S.N = weights.size(0);
  S.D = weights.size(1);
  S.nnz = indices.numel();
  TORCH_CHECK_VALUE(table_offsets.numel() >= 2, kOp,
                    ": table_offsets must have T+1 >= 2 entries, got ", table_offsets.numel());
  auto to = table_offsets.to(at::kCPU, at::kLong).contiguous();
  S.T = to.numel() - 1;
  S.table_offsets.assign(to.data_ptr<int64_t>(), to.data_ptr<int64_t>() + to.numel());
  const std::vector<int64_t>& tofs = S.table_offsets;
  TORCH_CHECK_VALUE(tofs[0] == 0, kOp, ": table_offsets[0] must be 0, got ", tofs[0]);
  for (int64_t t = 0; t < S.T; ++t) {
    TORCH_CHECK_VALUE(tofs[t + 1] >= tofs[t], kOp,
                      ": table_offsets must be non-decreasing, but table_offsets[", t + 1, "]=",
                      tofs[t + 1], " < table_offsets[", t, "]=", tofs[t]);
  }
  TORCH_CHECK_VALUE(tofs[S.T] == S.N, kOp, ": table_offsets[-1]=", tofs[S.T],
                    " must equal weights.size(0)=", S.N);
  TORCH_CHECK_VALUE(offsets.numel() >= 1 && (offsets.numel() - 1) % S.T == 0, kOp,
                    ": offsets has length ", offsets.numel(), ", expected T*B+1 with T=", S.T);
  S.B = (offsets.numel() - 1) / S.T;
  if (psw.has_value()) {
    check_dim(*psw, 1, kOp, "per_sample_weights", "[nnz]");
    TORCH_CHECK_VALUE(psw->numel() == S.nnz, kOp, ": per_sample_weights has ", psw->numel(),
                      " entries but indices has ", S.nnz);
    check_same_dtype(*psw, weights, kOp, "per_sample_weights", "weights");
    check_same_device(*psw, weights, kOp, "per_sample_weights", "weights");
  }
  return S;
}

// grad_out [B, T*D] of the backward ops.
inline void check_grad_out(const at::Tensor& grad_out, const at::Tensor& weights, int64_t B,
                           int64_t T, int64_t D) {
  check_dim(grad_out, 2, "embedding_bag_bwd", "grad_out", "[B, T*D]");
  TORCH_CHECK_VALUE(grad_out.size(0) == B && grad_out.size(1) == T * D,
                    "embedding_bag_bwd: grad_out has shape ", grad_out.sizes(), ", expected [", B,
                    ", ", T * D, "]");
  check_same_dtype(grad_out, weights, "embedding_bag_bwd", "grad_out", "weights");
  check_same_device(grad_out, weights, "embedding_bag_bwd", "grad_out", "weights");
}

// The in-place update's weights, optimizer code and row-wise state.
inline void check_update_args(const at::Tensor& weights, const at::Tensor& state,
                              int64_t optimizer, int64_t N) {
  constexpr const char* op = "embedding_bag_bwd_update";
  TORCH_CHECK_VALUE(weights.is_contiguous(), op, ": weights must be contiguous (updated in place)");
  TORCH_CHECK_VALUE(optimizer == 0 || optimizer == 1, op,
                    ": optimizer must be 0 (SGD) or 1 (row-wise Adagrad), got ", optimizer);
  if (optimizer == 1) {
    TORCH_CHECK_TYPE(state.scalar_type() == at::kFloat, op, ": state must be float32, got ",
                     state.scalar_type());
    TORCH_CHECK_VALUE(state.dim() == 1 && state.numel() == N && state.is_contiguous(), op,
                      ": state must be a contiguous [N_total]=[", N, "] tensor, got shape ",
                      state.sizes());
    check_same_device(state, weights, op, "state", "weights");
  }
}

}  // namespace embedding_bag_checks
}  // namespace adrec
