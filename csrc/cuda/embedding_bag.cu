// SPDX-License-Identifier: Apache-2.0
// Multi-table pooled embedding lookup on CUDA (FBGEMM TBE layout), its backward that returns
// only the touched rows, and the backward fused with SGD / row-wise Adagrad.
//
// Determinism: the backward sorts the global row ids with a stable sort, then one warp per
// unique row sums that row's contributions in order of occurrence. No float atomics anywhere,
// so results do not change from run to run; each row is updated by exactly one warp.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "common/acc_type.h"
#include "common/checks.h"
#include "common/dispatch.h"
#include "common/embedding_bag_checks.h"

namespace adrec {
namespace {

constexpr const char* kOp = "embedding_bag";
constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr unsigned long long kNoError = ~0ull;  // error slot: "no bad id seen"

struct CudaLayout {
  int64_t T = 0, B = 0, D = 0, N = 0, nnz = 0;
  std::vector<int64_t> tofs_host;  // [T+1]
  at::Tensor tofs;                 // [T+1] int64 on the device
  at::Tensor offsets;              // [T*B+1] int64 on the device, contiguous
};

// Validates what can be validated without reading the indices: dtypes, shapes, devices, the
// table layout (on the host: T+1 values) and the offsets' structure (on the device, read back
// with one small copy). Index range is checked inside the kernels.
CudaLayout check_layout(const at::Tensor& weights, const at::Tensor& table_offsets,
                        const at::Tensor& indices, const at::Tensor& offsets,
                        const c10::optional<at::Tensor>& psw, int64_t pooling) {
  TORCH_CHECK_VALUE(weights.is_cuda(), kOp, ": weights must be a CUDA tensor, got ",
                    weights.device());
  auto S = embedding_bag_checks::check_args(weights, table_offsets, indices, offsets, psw, pooling);
  CudaLayout L;
  L.T = S.T;
  L.B = S.B;
  L.D = S.D;
  L.N = S.N;
  L.nnz = S.nnz;
  L.tofs_host = std::move(S.table_offsets);
  L.tofs = table_offsets.to(at::kLong).contiguous();
  L.offsets = offsets.to(at::kLong).contiguous();
  {
    const auto& o = L.offsets;
    const int64_t n = o.numel();
    auto nonmono = n > 1 ? (o.slice(0, 1) < o.slice(0, 0, n - 1)).any() : o.new_zeros({}, at::kBool);
    auto flags = at::stack({o[0].to(at::kLong), o[n - 1].to(at::kLong), nonmono.to(at::kLong)})
                     .to(at::kCPU);
    const int64_t* f = flags.data_ptr<int64_t>();
    TORCH_CHECK_VALUE(f[0] == 0, kOp, ": offsets[0] must be 0, got ", f[0]);
    TORCH_CHECK_VALUE(f[2] == 0, kOp, ": offsets must be non-decreasing");
    TORCH_CHECK_VALUE(f[1] == L.nnz, kOp, ": offsets[-1]=", f[1], " must equal len(indices)=",
                      L.nnz);
  }
  return L;
}

// Reads the error slot back (one 8-byte copy, a sync) and throws IndexError naming the table,
// the position and the value of the first out-of-range id.
void throw_if_bad(const at::Tensor& err, const CudaLayout& L, const at::Tensor& indices) {
  const auto p = static_cast<unsigned long long>(err.to(at::kCPU).item<int64_t>());
  if (p == kNoError) return;
  const int64_t pos = static_cast<int64_t>(p);
  auto o = L.offsets.to(at::kCPU);
  const int64_t* oh = o.data_ptr<int64_t>();
  int64_t bag = std::upper_bound(oh, oh + L.T * L.B + 1, pos) - oh - 1;
  while (bag + 1 < L.T * L.B && oh[bag + 1] <= pos) ++bag;
  const int64_t t = L.B > 0 ? bag / L.B : 0;
  const int64_t rows = L.tofs_host[t + 1] - L.tofs_host[t];
  const int64_t value = indices[pos].item<int64_t>();
  TORCH_CHECK_INDEX(false, kOp, ": indices[", pos, "]=", value, " is out of range for table ", t,
                    " (", rows, " rows, sample ", bag % std::max<int64_t>(L.B, 1), ")");
}

inline int blocks_for_warps(int64_t warps) {
  return static_cast<int>((warps + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

// Lanes own d = d0 + lane + 32*p for p < PER_LANE: every row read is coalesced.
// Four widths keep the instantiation count (and the CI compile time) down.
#define ADREC_PER_LANE_SWITCH(D, NAME, ...)                                   \
  [&] {                                                                       \
    if ((D) <= 64) { constexpr int NAME = 2; return __VA_ARGS__(); }          \
    else if ((D) <= 128) { constexpr int NAME = 4; return __VA_ARGS__(); }    \
    else if ((D) <= 256) { constexpr int NAME = 8; return __VA_ARGS__(); }    \
    else { constexpr int NAME = 32; return __VA_ARGS__(); }                   \
  }()

// Forward: one warp per bag, bags in sample-major order so consecutive warps write consecutive
// output columns. Lanes load 32 ids (and weights) at once, then broadcast them with shuffles, so
// the row loads of a chunk do not wait on one another. Accumulates in acc_t (fp32 for half).
template <typename scalar_t, typename index_t, int PER_LANE, bool HAS_PSW, bool MEAN>
__global__ void embedding_bag_fwd_kernel(const scalar_t* __restrict__ w,        // [N, D]
                                         const int64_t* __restrict__ tofs,     // [T+1]
                                         const index_t* __restrict__ idx,      // [nnz]
                                         const int64_t* __restrict__ ofs,      // [T*B+1]
                                         const scalar_t* __restrict__ psw,     // [nnz]
                                         scalar_t* __restrict__ out,           // [B, T*D]
                                         unsigned long long* __restrict__ err,  // [1]
                                         int64_t B, int64_t T, int64_t D) {
  using acc = acc_t<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (warp >= B * T) return;
  const int64_t b = warp / T, t = warp - b * T;
  const int64_t bag = t * B + b;
  const int64_t k0 = ofs[bag], k1 = ofs[bag + 1];
  const int64_t row0 = tofs[t], rows = tofs[t + 1] - row0;
  const scalar_t* wt = w + row0 * D;
  scalar_t* dst = out + b * T * D + t * D;
  const acc scale = (MEAN && k1 > k0) ? acc(1) / static_cast<acc>(k1 - k0) : acc(1);
  for (int64_t d0 = 0; d0 < D; d0 += kWarp * PER_LANE) {
    acc a[PER_LANE];
#pragma unroll
    for (int p = 0; p < PER_LANE; ++p) a[p] = acc(0);
    for (int64_t kc = k0; kc < k1; kc += kWarp) {
      const int64_t k = kc + lane;
      int64_t r = -1;
      acc c = acc(0);
      if (k < k1) {
        r = static_cast<int64_t>(idx[k]);
        if (r < 0 || r >= rows) {
          // Never read the bad row; report its position (lowest wins) for the host to throw.
          if (d0 == 0) atomicMin(err, static_cast<unsigned long long>(k));
          r = -1;
        } else {
          c = HAS_PSW ? static_cast<acc>(psw[k]) : acc(1);
        }
      }
      const int n = static_cast<int>(k1 - kc < kWarp ? k1 - kc : kWarp);
#pragma unroll 4
      for (int j = 0; j < n; ++j) {
        const int64_t rj = __shfl_sync(0xffffffffu, r, j);
        const acc cj = __shfl_sync(0xffffffffu, c, j);
        if (rj < 0) continue;
        const scalar_t* row = wt + rj * D;
#pragma unroll
        for (int p = 0; p < PER_LANE; ++p) {
          const int64_t d = d0 + lane + kWarp * p;
          if (d < D) a[p] += cj * static_cast<acc>(row[d]);
        }
      }
    }
#pragma unroll
    for (int p = 0; p < PER_LANE; ++p) {
      const int64_t d = d0 + lane + kWarp * p;
      if (d < D) dst[d] = static_cast<scalar_t>(a[p] * scale);
    }
  }
}

// Backward, step 1: one warp per bag writes the sort key (global row id) and the bag of every
// index, and checks the id range (keys of bad ids are 0; the host throws before using them).
template <typename index_t, typename key_t>
__global__ void embedding_bag_keys_kernel(const int64_t* __restrict__ tofs,  // [T+1]
                                          const index_t* __restrict__ idx,   // [nnz]
                                          const int64_t* __restrict__ ofs,   // [T*B+1]
                                          key_t* __restrict__ keys,          // [nnz]
                                          int64_t* __restrict__ bag_of,      // [nnz]
                                          unsigned long long* __restrict__ err, int64_t B,
                                          int64_t T) {
  const int lane = threadIdx.x % kWarp;
  const int64_t bag = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (bag >= B * T) return;
  const int64_t t = bag / B;
  const int64_t row0 = tofs[t], rows = tofs[t + 1] - row0;
  for (int64_t k = ofs[bag] + lane; k < ofs[bag + 1]; k += kWarp) {
    const int64_t r = static_cast<int64_t>(idx[k]);
    const bool ok = r >= 0 && r < rows;
    if (!ok) atomicMin(err, static_cast<unsigned long long>(k));
    keys[k] = static_cast<key_t>(ok ? row0 + r : 0);
    bag_of[k] = bag;
  }
}

// Backward, step 2: one warp per unique row sums grad_out over the row's occurrences in sorted
// (= occurrence, the sort is stable) order, then writes the row gradient (UPDATE 0), or applies
// SGD (1) / row-wise Adagrad (2) to the row in place. The whole row lives in the warp's
// registers (D <= 32*PER_LANE), which row-wise Adagrad needs for mean(g*g).
template <typename scalar_t, int PER_LANE, bool HAS_PSW, bool MEAN, int UPDATE>
__global__ void embedding_bag_rows_kernel(const scalar_t* __restrict__ g,      // [B, T*D]
                                          const int64_t* __restrict__ perm,    // [nnz]
                                          const int64_t* __restrict__ seg,     // [U+1]
                                          const int64_t* __restrict__ bag_of,  // [nnz]
                                          const int64_t* __restrict__ ofs,     // [T*B+1]
                                          const scalar_t* __restrict__ psw,    // [nnz]
                                          const int64_t* __restrict__ urow,    // [U]
                                          scalar_t* __restrict__ rg,           // [U, D]
                                          scalar_t* __restrict__ w,            // [N, D]
                                          float* __restrict__ state,           // [N]
                                          int64_t U, int64_t B, int64_t T, int64_t D,
                                          float lr, float eps) {
  using acc = acc_t<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  const int64_t u = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (u >= U) return;
  const int64_t s0 = seg[u], s1 = seg[u + 1];
  acc a[PER_LANE];
#pragma unroll
  for (int p = 0; p < PER_LANE; ++p) a[p] = acc(0);
  for (int64_t sc = s0; sc < s1; sc += kWarp) {
    const int64_t s = sc + lane;
    int64_t off = 0;  // start of grad_out[b, t*D:] for this occurrence
    acc c = acc(0);
    if (s < s1) {
      const int64_t k = perm[s];
      const int64_t bag = bag_of[k];
      const int64_t t = bag / B, b = bag - t * B;
      off = b * T * D + t * D;
      c = HAS_PSW ? static_cast<acc>(psw[k]) : acc(1);
      if (MEAN) c /= static_cast<acc>(ofs[bag + 1] - ofs[bag]);
    }
    const int n = static_cast<int>(s1 - sc < kWarp ? s1 - sc : kWarp);
#pragma unroll 4
    for (int j = 0; j < n; ++j) {
      const int64_t oj = __shfl_sync(0xffffffffu, off, j);
      const acc cj = __shfl_sync(0xffffffffu, c, j);
#pragma unroll
      for (int p = 0; p < PER_LANE; ++p) {
        const int64_t d = lane + kWarp * p;
        if (d < D) a[p] += cj * static_cast<acc>(g[oj + d]);
      }
    }
  }
  if (UPDATE == 0) {
#pragma unroll
    for (int p = 0; p < PER_LANE; ++p) {
      const int64_t d = lane + kWarp * p;
      if (d < D) rg[u * D + d] = static_cast<scalar_t>(a[p]);
    }
    return;
  }
  const int64_t row = urow[u];
  scalar_t* wr = w + row * D;
  acc step = static_cast<acc>(lr);
  if (UPDATE == 2) {
    acc sq = acc(0);
#pragma unroll
    for (int p = 0; p < PER_LANE; ++p) sq += a[p] * a[p];  // zero beyond D
    // Butterfly reduction in a fixed order: every lane ends with the same sum.
#pragma unroll
    for (int m = kWarp / 2; m > 0; m /= 2) sq += __shfl_xor_sync(0xffffffffu, sq, m);
    const float sr = state[row] + static_cast<float>(sq / static_cast<acc>(D));
    if (lane == 0) state[row] = sr;
    step = static_cast<acc>(lr) / (static_cast<acc>(sqrtf(sr)) + static_cast<acc>(eps));
  }
#pragma unroll
  for (int p = 0; p < PER_LANE; ++p) {
    const int64_t d = lane + kWarp * p;
    if (d < D) wr[d] = static_cast<scalar_t>(static_cast<acc>(wr[d]) - step * a[p]);
  }
}

void check_grad_out(const at::Tensor& grad_out, const at::Tensor& weights, const CudaLayout& L) {
  embedding_bag_checks::check_grad_out(grad_out, weights, L.B, L.T, L.D);
}

struct Segments {
  at::Tensor perm;  // [nnz] int64: positions sorted by global row (stable)
  at::Tensor seg;   // [U+1] int64
  at::Tensor uniq;  // [U] int64 ascending global rows
  at::Tensor bag;   // [nnz] int64 bag of every position
};

// Keys + id check (throws before anything is written to weights), stable sort, segments.
Segments sorted_segments(const CudaLayout& L, const at::Tensor& indices) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto opts = L.offsets.options();
  Segments S;
  S.bag = at::empty({L.nnz}, opts);
  auto err = at::full({1}, static_cast<int64_t>(kNoError), opts);
  // int32 keys halve the radix-sort passes whenever every global row id fits.
  const bool small = L.N < (int64_t(1) << 31);
  auto keys = at::empty({L.nnz}, opts.dtype(small ? at::kInt : at::kLong));
  if (L.nnz > 0) {
    ADREC_INDEX_SWITCH(indices.scalar_type(), index_t, [&] {
      ADREC_BOOL_SWITCH(small, SMALL, [&] {
        using key_t = typename std::conditional<SMALL, int32_t, int64_t>::type;
        embedding_bag_keys_kernel<index_t, key_t>
            <<<blocks_for_warps(L.T * L.B), kWarpsPerBlock * kWarp, 0, stream>>>(
                L.tofs.data_ptr<int64_t>(), indices.data_ptr<index_t>(),
                L.offsets.data_ptr<int64_t>(), keys.data_ptr<key_t>(),
                S.bag.data_ptr<int64_t>(),
                reinterpret_cast<unsigned long long*>(err.data_ptr<int64_t>()), L.B, L.T);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
    throw_if_bad(err, L, indices);
  }
  auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  S.perm = std::get<1>(sorted);
  auto uc = at::unique_consecutive(std::get<0>(sorted), /*return_inverse=*/false,
                                   /*return_counts=*/true);
  S.uniq = std::get<0>(uc).to(at::kLong);
  S.seg = at::zeros({S.uniq.numel() + 1}, opts);
  if (S.uniq.numel() > 0) S.seg.slice(0, 1).copy_(at::cumsum(std::get<2>(uc), 0));
  return S;
}

void launch_rows(int update, const CudaLayout& L, const Segments& S, const at::Tensor& grad_out,
                 const c10::optional<at::Tensor>& psw, int64_t pooling, const at::Tensor& rg,
                 const at::Tensor& weights, const at::Tensor& state, double lr, double eps) {
  const int64_t U = S.uniq.numel();
  if (U == 0 || L.D == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights.scalar_type(),
                                  "embedding_bag_bwd_cuda", [&] {
    const scalar_t* pw = psw.has_value() ? psw->data_ptr<scalar_t>() : nullptr;
    ADREC_PER_LANE_SWITCH(L.D, PER_LANE, [&] {
      ADREC_BOOL_SWITCH(pw != nullptr, HAS_PSW, [&] {
        ADREC_BOOL_SWITCH(pooling == 1, MEAN, [&] {
          auto go = [&](auto upd) {
            constexpr int UPD = decltype(upd)::value;
            embedding_bag_rows_kernel<scalar_t, PER_LANE, HAS_PSW, MEAN, UPD>
                <<<blocks_for_warps(U), kWarpsPerBlock * kWarp, 0, stream>>>(
                    grad_out.data_ptr<scalar_t>(), S.perm.data_ptr<int64_t>(),
                    S.seg.data_ptr<int64_t>(), S.bag.data_ptr<int64_t>(),
                    L.offsets.data_ptr<int64_t>(), pw, S.uniq.data_ptr<int64_t>(),
                    UPD == 0 ? rg.data_ptr<scalar_t>() : nullptr,
                    UPD == 0 ? nullptr : weights.data_ptr<scalar_t>(),
                    UPD == 2 ? state.data_ptr<float>() : nullptr, U, L.B, L.T, L.D,
                    static_cast<float>(lr), static_cast<float>(eps));
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          };
          if (update == 0) go(std::integral_constant<int, 0>());
          else if (update == 1) go(std::integral_constant<int, 1>());
          else go(std::integral_constant<int, 2>());
        });
      });
    });
  });
}

}  // namespace

at::Tensor embedding_bag_cuda(const at::Tensor& weights_, const at::Tensor& table_offsets,
                              const at::Tensor& indices_, const at::Tensor& offsets,
                              const c10::optional<at::Tensor>& psw_, int64_t pooling) {
  c10::cuda::CUDAGuard guard(weights_.device());
  CudaLayout L = check_layout(weights_, table_offsets, indices_, offsets, psw_, pooling);
  auto weights = weights_.contiguous();
  auto indices = indices_.contiguous();
  c10::optional<at::Tensor> psw;
  if (psw_.has_value()) psw = psw_->contiguous();
  auto out = at::empty({L.B, L.T * L.D}, weights.options());
  if (L.B == 0 || L.D == 0) return out;
  auto err = at::full({1}, static_cast<int64_t>(kNoError), L.offsets.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights.scalar_type(),
                                  "embedding_bag_cuda", [&] {
    ADREC_INDEX_SWITCH(indices.scalar_type(), index_t, [&] {
      const scalar_t* pw = psw.has_value() ? psw->data_ptr<scalar_t>() : nullptr;
      // D > 1024 runs the widest variant in several column chunks.
      ADREC_PER_LANE_SWITCH(L.D, PER_LANE, [&] {
        ADREC_BOOL_SWITCH(pw != nullptr, HAS_PSW, [&] {
          ADREC_BOOL_SWITCH(pooling == 1, MEAN, [&] {
            embedding_bag_fwd_kernel<scalar_t, index_t, PER_LANE, HAS_PSW, MEAN>
                <<<blocks_for_warps(L.T * L.B), kWarpsPerBlock * kWarp, 0, stream>>>(
                    weights.data_ptr<scalar_t>(), L.tofs.data_ptr<int64_t>(),
                    indices.data_ptr<index_t>(), L.offsets.data_ptr<int64_t>(), pw,
                    out.data_ptr<scalar_t>(),
                    reinterpret_cast<unsigned long long*>(err.data_ptr<int64_t>()), L.B, L.T,
                    L.D);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        });
      });
    });
  });
  throw_if_bad(err, L, indices);
  return out;
}

std::tuple<at::Tensor, at::Tensor> embedding_bag_bwd_cuda(
    const at::Tensor& grad_out_, const at::Tensor& weights, const at::Tensor& table_offsets,
    const at::Tensor& indices_, const at::Tensor& offsets, const c10::optional<at::Tensor>& psw_,
    int64_t pooling) {
  c10::cuda::CUDAGuard guard(weights.device());
  CudaLayout L = check_layout(weights, table_offsets, indices_, offsets, psw_, pooling);
  check_grad_out(grad_out_, weights, L);
  TORCH_CHECK_VALUE(L.D <= 1024, "embedding_bag_bwd: D must be <= 1024 on CUDA, got ", L.D);
  auto grad_out = grad_out_.contiguous();
  auto indices = indices_.contiguous();
  c10::optional<at::Tensor> psw;
  if (psw_.has_value()) psw = psw_->contiguous();
  Segments S = sorted_segments(L, indices);
  auto rg = at::empty({S.uniq.numel(), L.D}, weights.options());
  launch_rows(0, L, S, grad_out, psw, pooling, rg, weights, at::Tensor(), 0.0, 0.0);
  return {S.uniq, rg};
}

void embedding_bag_bwd_update_cuda(const at::Tensor& grad_out_, const at::Tensor& weights,
                                   const at::Tensor& state, const at::Tensor& table_offsets,
                                   const at::Tensor& indices_, const at::Tensor& offsets,
                                   const c10::optional<at::Tensor>& psw_, int64_t pooling,
                                   int64_t optimizer, double lr, double eps) {
  constexpr const char* op = "embedding_bag_bwd_update";
  c10::cuda::CUDAGuard guard(weights.device());
  CudaLayout L = check_layout(weights, table_offsets, indices_, offsets, psw_, pooling);
  check_grad_out(grad_out_, weights, L);
  TORCH_CHECK_VALUE(L.D <= 1024, op, ": D must be <= 1024 on CUDA, got ", L.D);
  embedding_bag_checks::check_update_args(weights, state, optimizer, L.N);
  auto grad_out = grad_out_.contiguous();
  auto indices = indices_.contiguous();
  c10::optional<at::Tensor> psw;
  if (psw_.has_value()) psw = psw_->contiguous();
  // Every id is checked inside sorted_segments, before any row is touched: a bad batch leaves
  // the model as it was.
  Segments S = sorted_segments(L, indices);
  launch_rows(1 + static_cast<int>(optimizer), L, S, grad_out, psw, pooling, at::Tensor(),
              weights, state, lr, eps);
}

TORCH_LIBRARY_IMPL(adrec, CUDA, m) {
  m.impl("embedding_bag", &embedding_bag_cuda);
  m.impl("embedding_bag_bwd", &embedding_bag_bwd_cuda);
  m.impl("embedding_bag_bwd_update", &embedding_bag_bwd_update_cuda);
}

}  // namespace adrec
