// SPDX-License-Identifier: Apache-2.0
// Multi-table pooled embedding lookup on the CPU (FBGEMM TBE layout), its backward that
// touches only the rows a batch used, and the backward fused with SGD / row-wise Adagrad.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <vector>

#include <immintrin.h>

#include "common/acc_type.h"
#include "common/checks.h"
#include "common/dispatch.h"
#include "common/embedding_bag_checks.h"
#include "common/cpu_isa.h"
#include "common/parallel.h"
#include "common/tuning.h"

namespace adrec {
namespace {

constexpr const char* kOp = "embedding_bag";
// How many indices ahead the kernels prefetch rows: tuning::kPrefetchBytes of rows in flight.
inline int64_t prefetch_distance(int64_t row_bytes) {
  return std::max<int64_t>(
      1, std::min<int64_t>(512, tuning::kPrefetchBytes / std::max<int64_t>(1, row_bytes)));
}
// Probes of the backward's row map (one line each) run this many indices ahead.
constexpr int64_t kProbePrefetch = 32;
// The backward reads a table's slice of grad_out sample by sample (a stride of T*D): prefetched
// this many samples ahead.
constexpr int64_t kGradPrefetch = 16;
// Output bytes per forward tile: [tile, T*D] stays in L2 while the tile's tables are gathered.
constexpr int64_t kTileBytes = 512 * 1024;

// Forward outputs of at least tuning::thresholds().stream_out_bytes are written with
// non-temporal (streaming) stores. Table-major traversal writes each bag's D floats into a
// different line of a [B, T*D] output (a stride of T*D*4 bytes), so ordinary stores make every
// output line a demand read-for-ownership miss that the hardware prefetchers do not predict;
// streaming stores skip that read but leave the output out of cache, so an output that fits
// comfortably in the last-level cache stays on ordinary stores for the next layer to read.
inline int64_t stream_out_bytes() {
  return tuning::thresholds().stream_out_bytes.load(std::memory_order_relaxed);
}

// Whether the first (up to) 1024 ids of a table's segment hold fewer than 5% repeats: a cheap
// sign that most of the table's rows occur once in the batch (uniform ids over a large table),
// and not Zipf-like traffic whose hot rows repeat.
template <typename index_t>
bool mostly_unique(const index_t* ids, int64_t n) {
  constexpr int64_t kSample = 1024, kCap = 4096;
  const int64_t m = std::min(n, kSample);
  int64_t seen[kCap];
  std::fill(seen, seen + kCap, int64_t(-1));
  int64_t repeats = 0;
  for (int64_t i = 0; i < m; ++i) {
    const int64_t r = static_cast<int64_t>(ids[i]);
    uint64_t h = (static_cast<uint64_t>(r) * 0x9E3779B97F4A7C15ull) >> 52;  // 12 bits
    while (seen[h] != -1 && seen[h] != r) h = (h + 1) & (kCap - 1);
    if (seen[h] == r) ++repeats; else seen[h] = r;
  }
  return repeats * 20 < m;
}

// The fused backward takes fused_table_direct_f32 for a table with D >= 64 whose gradient
// buffer could reach this size (its index count x D x 4 bytes) and whose ids mostly do not
// repeat (mostly_unique): for one id per bag (small buffers) and for Zipf ids the buffered path
// is faster.
inline int64_t direct_min_bytes() {
  return tuning::thresholds().direct_min_bytes.load(std::memory_order_relaxed);
}

struct Layout {
  int64_t T = 0, B = 0, D = 0, N = 0, nnz = 0;
  bool all_ones = false;               // every bag holds exactly one index (offsets == arange)
  std::vector<int64_t> table_offsets;  // [T+1]
  at::Tensor offsets;                  // [T*B+1] int64, contiguous
};

// One branch-free pass over the bag lengths o[i+1] - o[i], i < n: returns whether none is
// negative, and sets all_ones to whether every one is 1. Branch-free and vectorised per ISA
// (isa_dispatch): a branch per bag costs about a tenth of a one-id-per-bag forward.
ADREC_INLINE bool scan_offsets(const int64_t* o, int64_t n, bool& all_ones) {
  int64_t neg = 0, not_one = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t len = o[i + 1] - o[i];
    neg |= len;          // the sign bit survives the or: set iff some len < 0
    not_one |= len ^ 1;  // zero iff every len == 1
  }
  all_ones = not_one == 0;
  return neg >= 0;
}

// Validates everything that can be validated without reading the indices, and normalises
// offsets to int64. Index range is checked inside the kernels (one compare per index).
Layout check_layout(const at::Tensor& weights, const at::Tensor& table_offsets,
                    const at::Tensor& indices, const at::Tensor& offsets,
                    const c10::optional<at::Tensor>& psw, int64_t pooling) {
  auto S = embedding_bag_checks::check_args(weights, table_offsets, indices, offsets, psw, pooling);
  Layout L;
  L.T = S.T;
  L.B = S.B;
  L.D = S.D;
  L.N = S.N;
  L.nnz = S.nnz;
  L.table_offsets = std::move(S.table_offsets);
  L.offsets = offsets.to(at::kLong).contiguous();
  const int64_t* o = L.offsets.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(o[0] == 0, kOp, ": offsets[0] must be 0, got ", o[0]);
  const int64_t n_bags = L.offsets.numel() - 1;
  bool ones = true;
  const bool ok = isa_dispatch([&](auto) ADREC_LAMBDA_INLINE { return scan_offsets(o, n_bags, ones); });
  if (!ok) {  // find the first decrease for the message
    for (int64_t i = 0; i < n_bags; ++i) {
      TORCH_CHECK_VALUE(o[i + 1] >= o[i], kOp, ": offsets must be non-decreasing, but offsets[",
                        i + 1, "]=", o[i + 1], " < offsets[", i, "]=", o[i]);
    }
  }
  L.all_ones = ones;
  TORCH_CHECK_VALUE(o[L.offsets.numel() - 1] == L.nnz, kOp, ": offsets[-1]=",
                    o[L.offsets.numel() - 1], " must equal len(indices)=", L.nnz);
  return L;
}

// Records the first (lowest position) out-of-range index seen by any thread; the kernel skips
// the bad row instead of reading it, and the host throws after the parallel region.
struct BadIndex {
  std::atomic<int64_t> pos{std::numeric_limits<int64_t>::max()};
  void record(int64_t p) {
    int64_t cur = pos.load(std::memory_order_relaxed);
    while (p < cur && !pos.compare_exchange_weak(cur, p, std::memory_order_relaxed)) {
    }
  }
};

template <typename index_t>
void throw_bad_index(const BadIndex& bad, const Layout& L, const index_t* idx) {
  const int64_t p = bad.pos.load();
  if (p == std::numeric_limits<int64_t>::max()) return;
  // Find the table that owns position p.
  const int64_t* o = L.offsets.data_ptr<int64_t>();
  int64_t bag = std::upper_bound(o, o + L.T * L.B + 1, p) - o - 1;
  // Empty bags share a start: move to the bag that really contains p.
  while (bag + 1 < L.T * L.B && o[bag + 1] <= p) ++bag;
  const int64_t t = L.B > 0 ? bag / L.B : 0;
  const int64_t rows = L.table_offsets[t + 1] - L.table_offsets[t];
  TORCH_CHECK_INDEX(false, kOp, ": indices[", p, "]=", static_cast<int64_t>(idx[p]),
                    " is out of range for table ", t, " (", rows, " rows, sample ", bag % L.B,
                    ")");
}

// Row accumulate: acc[0:D] += c * row[0:D]. DV > 0 fixes D at compile time so the loop unrolls
// and vectorises; DV == 0 is the generic path.
template <int DV, typename scalar_t, typename acc_t>
inline void axpy(acc_t* __restrict acc, const scalar_t* __restrict row, acc_t c, int64_t D) {
  const int64_t n = DV > 0 ? DV : D;
  for (int64_t d = 0; d < n; ++d) acc[d] += c * static_cast<acc_t>(row[d]);
}

template <int DV, typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t D) {
  const int64_t bytes = (DV > 0 ? DV : D) * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(reinterpret_cast<const char*>(row) + b, 0, 3);
}

// Runs fn(i, i+1) for i in [0, n) on the work pool (common/parallel.h): threads claim items from
// a shared counter, so a thread the OS has descheduled holds up only the item it is in.
template <typename Fn>
void for_each_chunk(int64_t n, Fn&& fn) {
  parallel_items(n, [&](int64_t i) { fn(i, i + 1); });
}

// Arguments of the float32 fixed-D row kernels (embedding_bag_f32.inc).
struct F32Args {
  int64_t T, B, tile;
  int64_t pf;                    // prefetch distance in indices (prefetch_distance)
  const int64_t* offsets;        // [T*B+1]
  const int64_t* table_offsets;  // [T+1]
  const float* w;                // [N_total, D]
  const float* psw;              // [nnz] or null
  float* out;                    // [B, T*D]
  BadIndex* bad;
  bool stream;                   // write bags with streaming stores (stream_out_bytes)
  int64_t gs = 0;                // backward: elements from one sample's grad_out row to the next
};

#include "cpu/embedding_bag_f32.inc"

// The float32 row kernels run on ISA levels up to AVX2: AVX-512 buys nothing in these
// memory-bound loops, and a third copy would only add build time.
template <typename F>
auto f32_dispatch(const F& f) {
  return isa_dispatch<Isa::avx2>(f);
}

// The float32 kernels exist for these widths (D % 8 == 0).
constexpr bool f32_fast_dim(int DV) { return DV == 8 || DV == 16 || DV == 32 || DV == 64 || DV == 128; }

// Forward: one task per tile of samples; inside a tile, table-major, so the indices of a table
// are read contiguously and rows are prefetched kPrefetch indices ahead (the stream continues
// into the next table's segment). A tile's output rows ([tile, T*D]) stay in L2, so each table's
// pass writes into resident lines and pages. For float/double the bag is accumulated directly in
// its output slot (first row stored, the rest added): a zeroed stack accumulator costs a
// microcoded memset per bag whose store-forwarding stall serialises the row misses.
// Reduced-precision weights accumulate in a float buffer instead.
template <typename scalar_t, typename index_t, int DV, bool HAS_PSW, bool MEAN>
void forward_kernel(const Layout& L, const scalar_t* w, const index_t* idx, const scalar_t* psw,
                    scalar_t* out, BadIndex& bad) {
  using acc = acc_t<scalar_t>;
  constexpr bool kDirect = std::is_same<scalar_t, acc>::value;
  const int64_t T = L.T, B = L.B, D = L.D;
  const int64_t* o = L.offsets.data_ptr<int64_t>();
  const int64_t* tofs = L.table_offsets.data();
  const int64_t row_bytes = std::max<int64_t>(1, T * D * static_cast<int64_t>(sizeof(scalar_t)));
  const int64_t tile = std::max<int64_t>(16, std::min<int64_t>(256, kTileBytes / row_bytes));
  const int64_t n_tiles = (B + tile - 1) / tile;
  const int64_t kPrefetch = prefetch_distance(D * static_cast<int64_t>(sizeof(scalar_t)));
  if constexpr (std::is_same<scalar_t, float>::value && f32_fast_dim(DV)) {
    // Streaming stores need whole 64-byte lines per bag (D * 4 a multiple of 64; the output's
    // base is 64-byte aligned), or the write-combining buffers flush partial lines.
    const bool stream = DV % 16 == 0 && B * T * D * static_cast<int64_t>(sizeof(float)) >= stream_out_bytes();
    const F32Args args{T, B, tile, kPrefetch, o, tofs, w, psw, out, &bad, stream};
    const bool ones = L.all_ones;
    for_each_chunk(n_tiles, [&](int64_t i0, int64_t i1) {
      f32_dispatch([&](auto) ADREC_LAMBDA_INLINE {
        if (ones) forward_tiles_f32_ones<DV, HAS_PSW>(args, idx, i0, i1);
        else forward_tiles_f32<DV, HAS_PSW, MEAN>(args, idx, i0, i1);
      });
    });
    return;
  }
  for_each_chunk(n_tiles, [&](int64_t i0, int64_t i1) {
    const int64_t n = DV > 0 ? DV : D;
    std::vector<acc> accbuf(kDirect ? 0 : n);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b0 = i * tile, b1 = std::min(B, b0 + tile);
      // Warm up the prefetch stream with the first rows of table 0's segment.
      for (int64_t k = o[b0], ke = std::min(o[b1], o[b0] + kPrefetch); k < ke; ++k) {
        const int64_t rp = static_cast<int64_t>(idx[k]);
        if (rp >= 0 && rp < tofs[1]) prefetch_row<DV>(w + rp * D, D);
      }
      for (int64_t t = 0; t < T; ++t) {
        const scalar_t* __restrict wt = w + tofs[t] * D;
        const int64_t rows = tofs[t + 1] - tofs[t];
        const int64_t seg_end = o[t * B + b1];
        const bool has_next = t + 1 < T;
        const int64_t nx_begin = has_next ? o[(t + 1) * B + b0] : 0;
        const int64_t nx_end = has_next ? o[(t + 1) * B + b1] : 0;
        const scalar_t* nx_w = has_next ? w + tofs[t + 1] * D : w;
        const int64_t nx_rows = has_next ? tofs[t + 2] - tofs[t + 1] : 0;
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t k0 = o[t * B + b], k1 = o[t * B + b + 1];
          scalar_t* __restrict dst = out + b * T * D + t * D;
          acc* __restrict a = kDirect ? reinterpret_cast<acc*>(dst) : accbuf.data();
          bool first = true;
          for (int64_t k = k0; k < k1; ++k) {
            const int64_t kp = k + kPrefetch;
            if (kp < seg_end) {
              const int64_t rp = static_cast<int64_t>(idx[kp]);
              if (rp >= 0 && rp < rows) prefetch_row<DV>(wt + rp * D, D);
            } else {
              const int64_t kq = nx_begin + (kp - seg_end);
              if (kq < nx_end) {
                const int64_t rp = static_cast<int64_t>(idx[kq]);
                if (rp >= 0 && rp < nx_rows) prefetch_row<DV>(nx_w + rp * D, D);
              }
            }
            const int64_t r = static_cast<int64_t>(idx[k]);
            if (__builtin_expect(r < 0 || r >= rows, 0)) {
              bad.record(k);
              continue;
            }
            const scalar_t* __restrict row = wt + r * D;
            if (first) {
              if (HAS_PSW) {
                const acc c = static_cast<acc>(psw[k]);
                for (int64_t d = 0; d < n; ++d) a[d] = c * static_cast<acc>(row[d]);
              } else {
                for (int64_t d = 0; d < n; ++d) a[d] = static_cast<acc>(row[d]);
              }
              first = false;
            } else if (HAS_PSW) {
              const acc c = static_cast<acc>(psw[k]);
              for (int64_t d = 0; d < n; ++d) a[d] += c * static_cast<acc>(row[d]);
            } else {
              for (int64_t d = 0; d < n; ++d) a[d] += static_cast<acc>(row[d]);
            }
          }
          if (first) {  // empty bag (or only bad ids): zeros
            for (int64_t d = 0; d < n; ++d) dst[d] = scalar_t(0);
          } else if (MEAN || !kDirect) {
            const acc scale = MEAN ? acc(1) / static_cast<acc>(k1 - k0) : acc(1);
            for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<scalar_t>(a[d] * scale);
          }
        }
      }
    }
  });
}

}  // namespace

at::Tensor embedding_bag_cpu(const at::Tensor& weights_, const at::Tensor& table_offsets,
                             const at::Tensor& indices_, const at::Tensor& offsets,
                             const c10::optional<at::Tensor>& psw_, int64_t pooling) {
  Layout L = check_layout(weights_, table_offsets, indices_, offsets, psw_, pooling);
  auto weights = weights_.contiguous();
  auto indices = indices_.contiguous();
  c10::optional<at::Tensor> psw;
  if (psw_.has_value()) psw = psw_->contiguous();
  auto out = at::empty({L.B, L.T * L.D}, weights.options());
  if (L.B == 0 || L.D == 0) return out;
  BadIndex bad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights.scalar_type(), "embedding_bag_cpu", [&] {
    ADREC_INDEX_SWITCH(indices.scalar_type(), index_t, [&] {
      const index_t* idx = indices.data_ptr<index_t>();
      const scalar_t* pw = psw.has_value() ? psw->data_ptr<scalar_t>() : nullptr;
      ADREC_DIM_SWITCH(L.D, DV, [&] {
        ADREC_BOOL_SWITCH(pw != nullptr, HAS_PSW, [&] {
          ADREC_BOOL_SWITCH(pooling == 1, MEAN, [&] {
            forward_kernel<scalar_t, index_t, DV, HAS_PSW, MEAN>(
                L, weights.data_ptr<scalar_t>(), idx, pw, out.data_ptr<scalar_t>(), bad);
          });
        });
      });
      throw_bad_index(bad, L, idx);
    });
  });
  return out;
}

namespace {

// Open-addressing map from a row id (within one table) to its slot among the table's unique
// rows, in order of first occurrence. Key and slot share one entry, so a probe touches one
// cache line. Capacity is a power of two >= 2x the keys it can receive (min(index count,
// table rows)), so probes stay short; entries live in a per-thread buffer reused across tables
// and calls.
struct RowMap {
  // 8-byte entries (row ids within a table and slots fit in 31 bits; the backward checks), so
  // the map of a 60k-index table stays in L2.
  struct Entry {
    int32_t key;
    int32_t slot;
  };
  std::vector<Entry> e;
  uint64_t mask = 0;
  int shift = 64;
  void reset(int64_t n) {
    uint64_t cap = 16;
    int bits = 4;
    while (cap < static_cast<uint64_t>(2 * n)) {
      cap <<= 1;
      ++bits;
    }
    if (e.size() < cap) e.resize(cap);
    std::fill(e.begin(), e.begin() + cap, Entry{-1, 0});
    mask = cap - 1;
    shift = 64 - bits;
  }
  inline void prefetch(int64_t row) const {
    __builtin_prefetch(&e[(static_cast<uint64_t>(row) * 0x9E3779B97F4A7C15ull) >> shift], 1, 3);
  }
  // Returns the slot of `row`, inserting it as slot `next` when new (and bumping next).
  inline int64_t find_or_insert(int64_t row, int64_t& next) {
    uint64_t h = (static_cast<uint64_t>(row) * 0x9E3779B97F4A7C15ull) >> shift;
    while (true) {
      Entry& en = e[h];
      if (en.key == static_cast<int32_t>(row)) return en.slot;
      if (en.key == -1) {
        en.key = static_cast<int32_t>(row);
        en.slot = static_cast<int32_t>(next);
        return next++;
      }
      h = (h + 1) & mask;
    }
  }
};

// Per-thread scratch that survives across calls (the pool keeps its worker threads), so the
// backward does not map fresh pages for its gradient buffer on every step.
template <typename acc>
struct Scratch {
  RowMap map;
  std::vector<acc> gbuf;
  std::vector<int64_t> uniq;
  // fused_table_direct_f32 only: slot of every index of the table, occurrences per slot, and
  // each repeated slot's place in gbuf (-1 for rows that occur once).
  std::vector<int32_t> slot_of, cnt, rslot;
};
template <typename acc>
Scratch<acc>& scratch() {
  static thread_local Scratch<acc> s;
  return s;
}

// Per-table pass shared by the backward paths: for table t, visit its indices bag by bag, map
// each row to its unique slot (uniq[slot] = row within the table) and sum
// c * grad_out[b, t*D:(t+1)*D] into gbuf[slot] (the first occurrence stores, later ones add).
// Summation order per row is the order of occurrence, so the result does not depend on the
// thread count. Returns the number of unique rows.
template <typename scalar_t, typename index_t, int DV, bool HAS_PSW, bool MEAN, typename acc>
int64_t accumulate_table(const Layout& L, int64_t t, const scalar_t* g, int64_t gs,
                         const index_t* idx, const scalar_t* psw, Scratch<acc>& sc) {
  const int64_t B = L.B, D = L.D;
  const int64_t n = DV > 0 ? DV : D;
  const int64_t* o = L.offsets.data_ptr<int64_t>();
  const int64_t rows = L.table_offsets[t + 1] - L.table_offsets[t];
  const int64_t n_t = o[(t + 1) * B] - o[t * B];
  const int64_t max_u = std::min(n_t, rows);
  sc.map.reset(max_u);
  if (static_cast<int64_t>(sc.gbuf.size()) < max_u * D) sc.gbuf.resize(max_u * D);
  if (static_cast<int64_t>(sc.uniq.size()) < max_u) sc.uniq.resize(max_u);
  acc* gbuf = sc.gbuf.data();
  int64_t* uniq = sc.uniq.data();
  int64_t next = 0;
  for (int64_t b = 0; b < B; ++b) {
    if (b + kGradPrefetch < B) prefetch_row<DV>(g + (b + kGradPrefetch) * gs + t * D, D);
    const int64_t k0 = o[t * B + b], k1 = o[t * B + b + 1];
    if (k1 == k0) continue;
    const scalar_t* __restrict gb = g + b * gs + t * D;
    const acc scale = MEAN ? acc(1) / static_cast<acc>(k1 - k0) : acc(1);
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t r = static_cast<int64_t>(idx[k]);
      const int64_t before = next;
      const int64_t s = sc.map.find_or_insert(r, next);
      acc* __restrict dst = gbuf + s * D;
      const acc c = (HAS_PSW ? static_cast<acc>(psw[k]) : acc(1)) * scale;
      if (next != before) {
        uniq[s] = r;
        for (int64_t d = 0; d < n; ++d) dst[d] = c * static_cast<acc>(gb[d]);
      } else {
        for (int64_t d = 0; d < n; ++d) dst[d] += c * static_cast<acc>(gb[d]);
      }
    }
  }
  return next;
}

// Runs fn(t) for every table, each table on exactly one thread of the work pool, largest index
// count first, so one thread does not end up with all the big tables. Which thread runs a table
// does not change any result.
template <typename Fn>
void for_each_table(const Layout& L, Fn&& fn) {
  const int64_t T = L.T, B = L.B;
  const int64_t* o = L.offsets.data_ptr<int64_t>();
  std::vector<int64_t> order(T);
  for (int64_t t = 0; t < T; ++t) order[t] = t;
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
    return (o[(x + 1) * B] - o[x * B]) > (o[(y + 1) * B] - o[y * B]);
  });
  parallel_items(T, [&](int64_t i) { fn(order[i]); });
}

// Validates every index (IndexError naming table and position) before anything is written.
template <typename index_t>
void check_indices(const Layout& L, const index_t* idx) {
  const int64_t* o = L.offsets.data_ptr<int64_t>();
  for (int64_t t = 0; t < L.T; ++t) {
    TORCH_CHECK_VALUE(L.table_offsets[t + 1] - L.table_offsets[t] < (int64_t(1) << 31) &&
                          o[(t + 1) * L.B] - o[t * L.B] < (int64_t(1) << 31),
                      "embedding_bag_bwd: table ", t,
                      " has 2^31 or more rows or indices in one batch; split it");
  }
  BadIndex bad;
  parallel_items(L.T, [&](int64_t t) {
    const int64_t rows_t = L.table_offsets[t + 1] - L.table_offsets[t];
    for (int64_t k = o[t * L.B]; k < o[(t + 1) * L.B]; ++k) {
      const int64_t r = static_cast<int64_t>(idx[k]);
      if (r < 0 || r >= rows_t) {
        bad.record(k);
        break;
      }
    }
  });
  throw_bad_index(bad, L, idx);
}

template <typename F>
void dispatch_common(const Layout& L, const at::Tensor& weights, const at::Tensor& indices,
                     const c10::optional<at::Tensor>& psw, int64_t pooling, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights.scalar_type(), "embedding_bag_bwd_cpu", [&] {
    ADREC_INDEX_SWITCH(indices.scalar_type(), index_t, [&] {
      ADREC_DIM_SWITCH(L.D, DV, [&] {
        ADREC_BOOL_SWITCH(psw.has_value(), HAS_PSW, [&] {
          ADREC_BOOL_SWITCH(pooling == 1, MEAN, [&] {
            f(scalar_t(), index_t(), std::integral_constant<int, DV>(),
              std::integral_constant<bool, HAS_PSW>(), std::integral_constant<bool, MEAN>());
          });
        });
      });
    });
  });
}

void check_grad_out(const at::Tensor& grad_out, const at::Tensor& weights, const Layout& L) {
  embedding_bag_checks::check_grad_out(grad_out, weights, L.B, L.T, L.D);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> embedding_bag_bwd_cpu(
    const at::Tensor& grad_out_, const at::Tensor& weights, const at::Tensor& table_offsets,
    const at::Tensor& indices_, const at::Tensor& offsets, const c10::optional<at::Tensor>& psw_,
    int64_t pooling) {
  Layout L = check_layout(weights, table_offsets, indices_, offsets, psw_, pooling);
  check_grad_out(grad_out_, weights, L);
  auto grad_out = grad_out_.contiguous();
  auto indices = indices_.contiguous();
  c10::optional<at::Tensor> psw;
  if (psw_.has_value()) psw = psw_->contiguous();
  const int64_t T = L.T, D = L.D;
  // Pass 1 (tables in parallel): unique rows and their summed gradients, per table, in each
  // thread's scratch; copied into per-table vectors. Pass 2: prefix sum -> one [U, D] output.
  std::vector<std::vector<int64_t>> uniq(T);
  at::Tensor rows, grads;
  dispatch_common(L, weights, indices, psw, pooling, [&](auto s_, auto i_, auto dv_, auto hp_, auto mean_) {
    using scalar_t = decltype(s_);
    using index_t = decltype(i_);
    constexpr int DV = decltype(dv_)::value;
    constexpr bool HAS_PSW = decltype(hp_)::value;
    constexpr bool MEAN = decltype(mean_)::value;
    using acc = acc_t<scalar_t>;
    const index_t* idx = indices.template data_ptr<index_t>();
    check_indices(L, idx);
    const scalar_t* pw = HAS_PSW ? psw->template data_ptr<scalar_t>() : nullptr;
    const scalar_t* g = grad_out.template data_ptr<scalar_t>();
    std::vector<std::vector<acc>> tgrads(T);
    for_each_table(L, [&](int64_t t) {
      auto& sc = scratch<acc>();
      const int64_t U = accumulate_table<scalar_t, index_t, DV, HAS_PSW, MEAN, acc>(
          L, t, g, T * D, idx, pw, sc);
      uniq[t].resize(U);
      for (int64_t s = 0; s < U; ++s) uniq[t][s] = sc.uniq[s] + L.table_offsets[t];
      tgrads[t].assign(sc.gbuf.begin(), sc.gbuf.begin() + U * D);
    });
    std::vector<int64_t> base(T + 1, 0);
    for (int64_t t = 0; t < T; ++t) base[t + 1] = base[t] + static_cast<int64_t>(uniq[t].size());
    const int64_t U = base[T];
    rows = at::empty({U}, weights.options().dtype(at::kLong));
    grads = at::empty({U, D}, weights.options());
    int64_t* rp = rows.template data_ptr<int64_t>();
    scalar_t* gp = grads.template data_ptr<scalar_t>();
    parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        std::copy(uniq[t].begin(), uniq[t].end(), rp + base[t]);
        for (size_t j = 0; j < tgrads[t].size(); ++j)
          gp[base[t] * D + static_cast<int64_t>(j)] = static_cast<scalar_t>(tgrads[t][j]);
      }
    });
  });
  return {rows, grads};
}

void embedding_bag_bwd_update_cpu(const at::Tensor& grad_out_, const at::Tensor& weights,
                                  const at::Tensor& state, const at::Tensor& table_offsets,
                                  const at::Tensor& indices_, const at::Tensor& offsets,
                                  const c10::optional<at::Tensor>& psw_, int64_t pooling,
                                  int64_t optimizer, double lr, double eps) {
  Layout L = check_layout(weights, table_offsets, indices_, offsets, psw_, pooling);
  check_grad_out(grad_out_, weights, L);
  embedding_bag_checks::check_update_args(weights, state, optimizer, L.N);
  // Rows spaced further apart than T*D (the embeddings' columns of a wider activation's
  // gradient, such as DCN-v2's x0) are read where they are: copying them took ~0.5 ms of a
  // 4096-row step.
  const bool in_place = grad_out_.stride(1) == 1 && grad_out_.stride(0) >= grad_out_.size(1);
  auto grad_out = in_place ? grad_out_ : grad_out_.contiguous();
  const int64_t gs = grad_out.stride(0);
  auto indices = indices_.contiguous();
  c10::optional<at::Tensor> psw;
  if (psw_.has_value()) psw = psw_->contiguous();
  const int64_t D = L.D;
  dispatch_common(L, weights, indices, psw, pooling, [&](auto s_, auto i_, auto dv_, auto hp_, auto mean_) {
    using scalar_t = decltype(s_);
    using index_t = decltype(i_);
    constexpr int DV = decltype(dv_)::value;
    constexpr bool HAS_PSW = decltype(hp_)::value;
    constexpr bool MEAN = decltype(mean_)::value;
    using acc = acc_t<scalar_t>;
    const index_t* idx = indices.template data_ptr<index_t>();
    // Validate every index before touching any weight, so a bad batch leaves the model as it was.
    check_indices(L, idx);
    const scalar_t* pw = HAS_PSW ? psw->template data_ptr<scalar_t>() : nullptr;
    const scalar_t* g = grad_out.template data_ptr<scalar_t>();
    scalar_t* w = weights.template data_ptr<scalar_t>();
    float* st = optimizer == 1 ? state.template data_ptr<float>() : nullptr;
    const acc alr = static_cast<acc>(lr), aeps = static_cast<acc>(eps);
    const int64_t n = DV > 0 ? DV : D;
    // Tables are disjoint row ranges and each table is updated by one thread: no atomics, and
    // each row's update is computed exactly once.
    if constexpr (std::is_same<scalar_t, float>::value && f32_fast_dim(DV)) {
      const F32Args args{L.T, L.B, 0, prefetch_distance(D * 4), L.offsets.data_ptr<int64_t>(),
                         L.table_offsets.data(), w, pw, nullptr, nullptr, false, gs};
      for_each_table(L, [&](int64_t t) {
        auto& sc = scratch<float>();
        const int64_t* o = args.offsets;
        const int64_t rows = L.table_offsets[t + 1] - L.table_offsets[t];
        const int64_t max_u = std::min(o[(t + 1) * L.B] - o[t * L.B], rows);
        sc.map.reset(max_u);
        if (static_cast<int64_t>(sc.gbuf.size()) < max_u * D) sc.gbuf.resize(max_u * D);
        if (static_cast<int64_t>(sc.uniq.size()) < max_u) sc.uniq.resize(max_u);
        float* wt = w + L.table_offsets[t] * D;
        float* stt = st != nullptr ? st + L.table_offsets[t] : nullptr;
        const int64_t nnz_t = o[(t + 1) * L.B] - o[t * L.B];
        if (DV >= 64 && nnz_t * D * 4 >= direct_min_bytes() &&
            mostly_unique(idx + o[t * L.B], nnz_t)) {  // see fused_table_direct_f32
          if (static_cast<int64_t>(sc.slot_of.size()) < nnz_t) sc.slot_of.resize(nnz_t);
          if (static_cast<int64_t>(sc.cnt.size()) < max_u) sc.cnt.resize(max_u);
          if (static_cast<int64_t>(sc.rslot.size()) < max_u) sc.rslot.resize(max_u);
          f32_dispatch([&](auto) ADREC_LAMBDA_INLINE {
            fused_table_direct_f32<DV, HAS_PSW, MEAN>(
                args, t, g, idx, sc.map, sc.slot_of.data(), sc.cnt.data(), sc.rslot.data(),
                sc.uniq.data(), sc.gbuf.data(), wt, stt, static_cast<int>(optimizer), alr, aeps);
          });
        } else {
          f32_dispatch([&](auto) ADREC_LAMBDA_INLINE {
            const int64_t U = accumulate_table_f32<DV, HAS_PSW, MEAN>(
                args, t, g, idx, sc.map, sc.gbuf.data(), sc.uniq.data());
            update_rows_f32<DV>(wt, stt, sc.uniq.data(), sc.gbuf.data(), U,
                                static_cast<int>(optimizer), alr, aeps, args.pf);
          });
        }
      });
      return;
    }
    for_each_table(L, [&](int64_t t) {
      auto& sc = scratch<acc>();
      const int64_t U = accumulate_table<scalar_t, index_t, DV, HAS_PSW, MEAN, acc>(
          L, t, g, gs, idx, pw, sc);
      scalar_t* wt = w + L.table_offsets[t] * D;
      float* stt = st != nullptr ? st + L.table_offsets[t] : nullptr;
      const int64_t* uq = sc.uniq.data();
      const acc* gb = sc.gbuf.data();
      const int64_t kPrefetch = prefetch_distance(D * static_cast<int64_t>(sizeof(scalar_t)));
      for (int64_t s = 0; s < U; ++s) {
        // The rows were last read by the forward, long ago: prefetch kPrefetch updates ahead.
        if (s + kPrefetch < U) {
          const int64_t rp = uq[s + kPrefetch];
          prefetch_row<DV>(wt + rp * D, D);
          if (stt != nullptr) __builtin_prefetch(stt + rp, 1, 3);
        }
        const acc* __restrict gs = gb + s * D;
        scalar_t* __restrict wr = wt + uq[s] * D;
        if (optimizer == 0) {
          for (int64_t d = 0; d < n; ++d)
            wr[d] = static_cast<scalar_t>(static_cast<acc>(wr[d]) - alr * gs[d]);
        } else {
          acc sq = 0;
          for (int64_t d = 0; d < n; ++d) sq += gs[d] * gs[d];
          float& sr = stt[uq[s]];
          sr += static_cast<float>(sq / static_cast<acc>(D));
          const acc step = alr / (std::sqrt(static_cast<acc>(sr)) + aeps);
          for (int64_t d = 0; d < n; ++d)
            wr[d] = static_cast<scalar_t>(static_cast<acc>(wr[d]) - step * gs[d]);
        }
      }
    });
  });
}

TORCH_LIBRARY_IMPL(adrec, CPU, m) {
  m.impl("embedding_bag", &embedding_bag_cpu);
  m.impl("embedding_bag_bwd", &embedding_bag_bwd_cpu);
  m.impl("embedding_bag_bwd_update", &embedding_bag_bwd_update_cpu);
}

}  // namespace adrec
