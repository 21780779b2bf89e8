// SPDX-License-Identifier: Apache-2.0
// The key -> row map of the dynamic embedding table (adrec_fast.nn.DynamicEmbedding).
//
// Keys are raw 64-bit values (hashes of feature values); rows index a [R, D] table that the
// Python module owns together with its optimizer state. Row 0 is reserved: it is the
// "unadmitted" row, the explicit answer for a key that is not (yet) in the table, a real row of
// the table that trains like any other. Rows 1..R-1 hold one key each.
//
// - Zero collisions: open addressing with linear probing over a power-of-two array of
//   (key, row) slots; a slot stores the whole key, so two keys never share a row. An empty slot
//   is marked by row = -1, so every key value (0 and ~0 included) is a valid key. Deletion is
//   backward-shift (no tombstones), and the load stays <= kMaxLoad, so a probe always ends.
// - Admission: a new key gets a row once a count-min sketch has seen it `min_count` times
//   and/or a coin with probability `admit_prob` says yes; until then it reads row 0. The coin
//   is a hash of (seed, key, training call): a function of the key and the step, not of the
//   keys before it, so a table split by key over ranks admits exactly the keys one table
//   would (one coin per key and call: its repeats within a call agree).
// - TTL: a key not seen for more than `ttl` time units (stream time or steps, the caller's
//   `now`) is expired: training treats it as a new key (its row is freed and, once admitted
//   again, re-initialised), serving answers row 0, and expire() sweeps all of them out.
// - When every row is taken: grow (the caller reserves more rows before a call, see
//   spare_rows), or evict the least frequently used keys (ties: least recently seen) or the
//   least recently seen ones ("ttl" order), a batch of `evict_fraction` of the keys at a time,
//   so that one O(R) scan pays for many inserts. Keys used by the current call are never
//   evicted by it.
// - A row given to a new key is reported back (fresh rows) so the caller resets the row and its
//   optimizer state before any lookup reads it.
//
// Concurrency: read-only lookups (find) may run while a training thread inserts and evicts.
// Training calls are serialised by writer_mu_. The slot array and the row->key table change
// only under the exclusive side of rw_; find and the hit phase of a training call hold the
// shared side (one lock per call, not per key). Per-row counters change in the hit phase while
// readers run, so they are relaxed atomics.
#include "common/dynamic_table.h"
#include "py_describe.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <shared_mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/parallel.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace py = pybind11;

namespace adrec {
namespace {

constexpr double kMaxLoad = 0.75;       // slots kept at most 3/4 full: short probes, sure stop
constexpr int64_t kAhead = 16;          // keys between a slot's prefetch and its probe
constexpr int64_t kGrain = 4096;        // keys per parallel piece
constexpr int kSketchDepth = 4;
constexpr uint32_t kCountMax = std::numeric_limits<uint32_t>::max();

// murmur3's 64-bit finaliser: keys may be small sequential integers, not only hashes.
inline uint64_t mix64(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return x;
}

inline uint64_t splitmix64(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

uint64_t next_pow2(uint64_t v) {
  uint64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

enum class WhenFull { kGrow, kLfu, kTtl };

// A fixed-size array of value-initialised T. From 8 MiB on, 2 MiB-aligned and (with
// `huge_pages`) advised onto transparent huge pages: every lookup reads a random slot and a
// random row record of arrays of hundreds of MB, and with 4 KiB pages each of those reads would
// also miss the TLB and walk the page table.
template <class T>
class BigArray {
 public:
  BigArray() = default;
  BigArray(size_t n, bool huge_pages) : n_(n) {
    constexpr size_t kHuge = size_t(1) << 21;
    const size_t bytes = std::max<size_t>(n * sizeof(T), 1);
    const size_t align = bytes >= (size_t(8) << 20) ? kHuge : 64;
    const size_t rounded = (bytes + align - 1) / align * align;
    p_ = static_cast<T*>(std::aligned_alloc(align, rounded));
    if (p_ == nullptr) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (huge_pages && align == kHuge) madvise(p_, rounded, MADV_HUGEPAGE);
#else
    (void)huge_pages;
#endif
    for (size_t i = 0; i < n; ++i) new (&p_[i]) T();
  }
  BigArray(BigArray&& o) noexcept : p_(o.p_), n_(o.n_) { o.p_ = nullptr, o.n_ = 0; }
  BigArray& operator=(BigArray&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    return *this;
  }
  BigArray(const BigArray&) = delete;
  BigArray& operator=(const BigArray&) = delete;
  ~BigArray() { std::free(p_); }  // T is trivially destructible
  T& operator[](size_t i) { return p_[i]; }
  const T& operator[](size_t i) const { return p_[i]; }
  size_t size() const { return n_; }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

struct Slot {
  uint64_t key;
  int64_t row;  // -1: empty
};

// Per-row bookkeeping, one 24-byte record so a hit touches one cache line. count == 0 marks a
// free row (a live key has been seen at least once).
struct RowMeta {
  uint64_t key;                   // changed under the exclusive lock only
  std::atomic<int64_t> last;      // the `now` of the last training lookup
  std::atomic<uint32_t> count;    // training lookups, saturating
  std::atomic<uint32_t> epoch;    // the training call that last used the row
};

class DynamicTable {
 public:
  DynamicTable(int64_t capacity, int64_t min_count, double admit_prob, int64_t ttl,
               const std::string& when_full, uint64_t seed, double evict_fraction,
               int64_t sketch_width, bool huge_pages)
      : huge_pages_(huge_pages),
        min_count_(min_count),
        admit_prob_(admit_prob),
        ttl_(ttl),
        evict_fraction_(evict_fraction),
        seed_(seed) {
    if (capacity <= 0)
      throw py::value_error("DynamicTable: capacity must be > 0 keys, got " +
                            std::to_string(capacity));
    if (capacity > (int64_t(1) << 40))
      throw py::value_error("DynamicTable: capacity must be <= 2^40 keys, got " +
                            std::to_string(capacity));
    if (min_count < 1 || min_count > 65535)
      throw py::value_error("DynamicTable: min_count must be in [1, 65535], got " +
                            std::to_string(min_count));
    if (!(admit_prob > 0.0 && admit_prob <= 1.0))
      throw py::value_error("DynamicTable: admit_prob must be in (0, 1], got " +
                            std::to_string(admit_prob));
    if (ttl < 0)
      throw py::value_error("DynamicTable: ttl must be > 0 (or 0 for none), got " +
                            std::to_string(ttl));
    if (!(evict_fraction > 0.0 && evict_fraction <= 1.0))
      throw py::value_error("DynamicTable: evict_fraction must be in (0, 1], got " +
                            std::to_string(evict_fraction));
    if (when_full == "grow") when_full_ = WhenFull::kGrow;
    else if (when_full == "lfu") when_full_ = WhenFull::kLfu;
    else if (when_full == "ttl") when_full_ = WhenFull::kTtl;
    else
      throw py::value_error("DynamicTable: eviction must be 'grow', 'lfu' or 'ttl', got '" +
                            when_full + "'");
    // nothing reads the per-key counters of a growing table without TTL: hits skip them
    usage_ = when_full_ != WhenFull::kGrow || ttl_ > 0;
    resize_rows(capacity + 1);
    next_unused_ = 1;
    resize_slots(next_pow2(uint64_t(std::ceil(double(capacity) / kMaxLoad)) + 1));
    if (min_count_ > 1) {
      if (sketch_width <= 0)
        sketch_width = int64_t(std::min<uint64_t>(next_pow2(uint64_t(capacity)), 1u << 22));
      sketch_width = std::max<int64_t>(int64_t(next_pow2(uint64_t(sketch_width))), 64);
      sketch_.assign(size_t(kSketchDepth) * size_t(sketch_width), 0);
      sketch_mask_ = uint64_t(sketch_width) - 1;
    }
  }

  // ---------------------------------------------------------------- lookups
  // Training lookup: keys [n] -> rows [n], admitting, inserting, expiring and evicting as
  // configured. Returns the rows given to new keys in this call and their keys: the caller
  // resets those rows (values and optimizer state) before reading them.
  // Rows used by this call, and with protect_since > 0 by every call since that one (calls
  // whose backward is still to run), are neither evicted nor expired by it.
  void lookup(const uint64_t* keys, int64_t n, int64_t now, int64_t* out,
              std::vector<int64_t>& fresh_rows, std::vector<uint64_t>& fresh_keys,
              int64_t protect_since) {
    std::lock_guard<std::mutex> w(writer_mu_);
    const uint32_t epoch = ++epoch_;
    guard_ = protect_since > 0 ? int64_t(uint32_t(epoch - uint32_t(protect_since))) : 0;
    if (now > clock_.load(std::memory_order_relaxed)) clock_.store(now, std::memory_order_relaxed);
    std::atomic<bool> any_miss{false};
    {
      // Hit phase, beside readers: most keys of a batch are in the table already.
      std::shared_lock<std::shared_mutex> r(rw_);
      parallel_for(0, n, kGrain, [&](int64_t b0, int64_t b1) {
        bool miss = false;
        if (!usage_) {  // hits only find their rows: one pass, each home hashed once
          probe_all(keys, b0, b1, out);
          for (int64_t i = b0; i < b1; ++i) miss |= out[i] < 0;
          if (miss) any_miss.store(true, std::memory_order_relaxed);
          return;
        }
        for (int64_t i = b0; i < b1 + 2 * kAhead; ++i) {
          if (i < b1) __builtin_prefetch(&slots_[home(keys[i])]);
          const int64_t j = i - kAhead;  // probe; prefetch its row record
          if (j >= b0 && j < b1) {
            const int64_t row = probe(keys[j]);
            out[j] = row;
            if (!usage_) {
              miss |= row < 0;
              continue;
            }
            if (row >= 0) __builtin_prefetch(&meta_[row], 1);
          }
          const int64_t k = i - 2 * kAhead;  // count the hit
          if (usage_ && k >= b0 && k < b1) {
            const int64_t row = out[k];
            if (row < 0 || expired(row, now)) {
              out[k] = -1;
              miss = true;
              continue;
            }
            RowMeta& m = meta_[row];
            if (m.count.load(std::memory_order_relaxed) != kCountMax)
              m.count.fetch_add(1, std::memory_order_relaxed);
            if (m.last.load(std::memory_order_relaxed) != now)
              m.last.store(now, std::memory_order_relaxed);
            if (m.epoch.load(std::memory_order_relaxed) != epoch)
              m.epoch.store(epoch, std::memory_order_relaxed);
          }
        }
        if (miss) any_miss.store(true, std::memory_order_relaxed);
      });
    }
    if (!any_miss.load()) return;
    // Miss phase, alone, in key order (deterministic: admission coins, row order).
    std::unique_lock<std::shared_mutex> x(rw_);
    for (int64_t i = 0; i < n; ++i) {
      if (out[i] >= 0) continue;
      const uint64_t key = keys[i];
      int64_t row = probe(key);
      if (row >= 0) {
        if (!expired(row, now) || kept(row)) {
          touch(row, now, epoch);  // inserted earlier in this call, or re-checked
          out[i] = row;
          continue;
        }
        remove(row);  // expired: from here on a new key
      }
      if (!admit(key)) {
        out[i] = 0;
        continue;
      }
      row = take_row(now);
      if (row < 0) {  // every row is used by this very call: nothing may be evicted
        ++overflow_;
        out[i] = 0;
        continue;
      }
      RowMeta& m = meta_[row];
      m.key = key;
      m.last.store(now, std::memory_order_relaxed);
      m.count.store(1, std::memory_order_relaxed);
      m.epoch.store(epoch, std::memory_order_relaxed);
      place(key, row);
      ++live_;
      if (double(live_) > kMaxLoad * double(slots_.size())) resize_slots(slots_.size() * 2);
      fresh_rows.push_back(row);
      fresh_keys.push_back(key);
      out[i] = row;
    }
  }

  // Serving lookup, read-only: keys [n] -> rows [n]; a key not in the table, not admitted yet
  // or expired reads row 0. Safe while a training thread calls lookup.
  void find(const uint64_t* keys, int64_t n, int64_t* out) const {
    std::shared_lock<std::shared_mutex> r(rw_);
    const int64_t now = clock_.load(std::memory_order_relaxed);
    parallel_for(0, n, kGrain, [&](int64_t b0, int64_t b1) {
      probe_all(keys, b0, b1, out);
      for (int64_t i = b0; i < b1; ++i)
        if (out[i] < 0 || (ttl_ > 0 && expired(out[i], now))) out[i] = 0;
    });
  }

  // ---------------------------------------------------------------- maintenance
  // Evicts every key not seen for more than ttl before `now`; returns how many.
  int64_t expire(int64_t now, int64_t protect_since) {
    std::lock_guard<std::mutex> w(writer_mu_);
    std::unique_lock<std::shared_mutex> x(rw_);
    if (ttl_ <= 0) return 0;
    guard_ = protect_since > 0 ? int64_t(uint32_t(epoch_ - uint32_t(protect_since))) : -1;
    if (now > clock_.load(std::memory_order_relaxed)) clock_.store(now, std::memory_order_relaxed);
    int64_t n = 0;
    for (int64_t r = 1; r < next_unused_; ++r)
      if (meta_[r].count.load(std::memory_order_relaxed) > 0 && expired(r, now) && !kept(r)) {
        remove(r);
        ++n;
      }
    return n;
  }

  // Makes the table R rows long (never shorter). The caller grows its [R, D] storage first, so
  // that a reader never gets a row its storage lacks.
  void reserve_rows(int64_t rows) {
    std::lock_guard<std::mutex> w(writer_mu_);
    std::unique_lock<std::shared_mutex> x(rw_);
    if (rows > rows_) resize_rows(rows);
  }

  // Rows a call can still give to new keys without evicting or growing.
  int64_t spare_rows() const {
    std::shared_lock<std::shared_mutex> r(rw_);
    return int64_t(free_.size()) + (rows_ - next_unused_);
  }

  // Evicted keys since the last call (recorded only with record_evictions on), for tombstones.
  std::vector<uint64_t> take_evicted() {
    std::lock_guard<std::mutex> w(writer_mu_);
    std::vector<uint64_t> out;
    out.swap(evicted_);
    return out;
  }

  // Every invariant, O(R + slots): each live row's key is found at that row, each occupied slot
  // names a live row holding its key, free rows are free, row 0 is nobody's. Throws on a breach.
  void check() const {
    std::shared_lock<std::shared_mutex> r(rw_);
    int64_t occupied = 0;
    for (size_t s = 0; s < slots_.size(); ++s) {
      if (slots_[s].row < 0) continue;
      ++occupied;
      const int64_t row = slots_[s].row;
      if (row < 1 || row >= next_unused_ || meta_[row].count.load() == 0 ||
          meta_[row].key != slots_[s].key)
        throw std::runtime_error("DynamicTable.check: slot " + std::to_string(s) +
                                 " names row " + std::to_string(row) + " which does not hold it");
    }
    int64_t live = 0;
    for (int64_t row = 1; row < next_unused_; ++row) {
      if (meta_[row].count.load() == 0) continue;
      ++live;
      if (probe(meta_[row].key) != row)
        throw std::runtime_error("DynamicTable.check: the key of row " + std::to_string(row) +
                                 " is not found at that row");
    }
    if (live != occupied || live != live_)
      throw std::runtime_error("DynamicTable.check: " + std::to_string(live) + " live rows, " +
                               std::to_string(occupied) + " occupied slots, size " +
                               std::to_string(live_));
    for (int64_t row : free_)
      if (row < 1 || row >= next_unused_ || meta_[row].count.load() != 0)
        throw std::runtime_error("DynamicTable.check: free row " + std::to_string(row) +
                                 " is in use");
    if (int64_t(free_.size()) + live + 1 != next_unused_)
      throw std::runtime_error("DynamicTable.check: rows leak");
  }

  // ---------------------------------------------------------------- checkpoint
  py::dict state() const {
    std::lock_guard<std::mutex> w(writer_mu_);
    py::dict d;
    const int64_t U = next_unused_;
    py::array_t<int64_t> keys(U), counts(U), last(U);
    auto* pk = keys.mutable_data();
    auto* pc = counts.mutable_data();
    auto* pl = last.mutable_data();
    for (int64_t r = 0; r < U; ++r) {
      pk[r] = int64_t(meta_[r].key);
      pc[r] = meta_[r].count.load();
      pl[r] = meta_[r].last.load();
    }
    py::array_t<int64_t> free_rows(int64_t(free_.size()));
    std::copy(free_.begin(), free_.end(), free_rows.mutable_data());
    py::array_t<uint16_t> sketch(int64_t(sketch_.size()));
    std::copy(sketch_.begin(), sketch_.end(), sketch.mutable_data());
    py::array_t<int64_t> scalars(5);
    auto* ps = scalars.mutable_data();
    ps[0] = rows_;
    ps[1] = clock_.load();
    ps[2] = int64_t(seed_);
    ps[3] = int64_t(epoch_);
    ps[4] = overflow_;
    d["row_keys"] = keys;
    d["row_counts"] = counts;
    d["row_last_seen"] = last;
    d["free_rows"] = free_rows;
    d["sketch"] = sketch;
    d["scalars"] = scalars;  // rows, clock, seed, epoch, overflow
    return d;
  }

  void load_state(py::array_t<int64_t, py::array::c_style> keys,
                  py::array_t<int64_t, py::array::c_style> counts,
                  py::array_t<int64_t, py::array::c_style> last,
                  py::array_t<int64_t, py::array::c_style> free_rows,
                  py::array_t<uint16_t, py::array::c_style> sketch,
                  py::array_t<int64_t, py::array::c_style> scalars) {
    std::lock_guard<std::mutex> w(writer_mu_);
    std::unique_lock<std::shared_mutex> x(rw_);
    const int64_t U = keys.size();
    if (scalars.size() != 5) throw py::value_error("DynamicTable.load_state: scalars must be [5]");
    const int64_t R = scalars.data()[0];
    if (U < 1 || counts.size() != U || last.size() != U || R < U)
      throw py::value_error("DynamicTable.load_state: row_keys, row_counts and row_last_seen "
                            "must have one entry per used row (<= rows " + std::to_string(R) +
                            "), got " + std::to_string(U) + ", " + std::to_string(counts.size()) +
                            ", " + std::to_string(last.size()));
    if (size_t(sketch.size()) != sketch_.size())
      throw py::value_error("DynamicTable.load_state: the sketch holds " +
                            std::to_string(sketch.size()) + " counters, this table " +
                            std::to_string(sketch_.size()) + " (min_count or capacity differ)");
    const int64_t* pc = counts.data();
    int64_t live = 0;
    for (int64_t r = 1; r < U; ++r) {
      if (pc[r] < 0 || pc[r] > int64_t(kCountMax))
        throw py::value_error("DynamicTable.load_state: row_counts[" + std::to_string(r) +
                              "] = " + std::to_string(pc[r]) + " is out of range");
      live += pc[r] > 0;
    }
    for (int64_t i = 0; i < free_rows.size(); ++i) {
      const int64_t f = free_rows.data()[i];
      if (f < 1 || f >= U || pc[f] != 0)
        throw py::value_error("DynamicTable.load_state: free_rows names row " +
                              std::to_string(f) + ", which is not a free row");
    }
    if (free_rows.size() + live + 1 != U)
      throw py::value_error("DynamicTable.load_state: free_rows must list every free row");
    resize_rows(R);
    for (int64_t r = 0; r < R; ++r) {
      meta_[r].key = r < U ? uint64_t(keys.data()[r]) : 0;
      meta_[r].count.store(r < U && r > 0 ? uint32_t(pc[r]) : 0);
      meta_[r].last.store(r < U ? last.data()[r] : 0);
      meta_[r].epoch.store(0);
    }
    next_unused_ = U;
    free_.assign(free_rows.data(), free_rows.data() + free_rows.size());
    std::copy(sketch.data(), sketch.data() + sketch.size(), sketch_.begin());
    clock_.store(scalars.data()[1]);
    seed_ = uint64_t(scalars.data()[2]);
    epoch_ = uint32_t(scalars.data()[3]);  // rows' epochs restart at 0: none is current
    overflow_ = scalars.data()[4];
    live_ = 0;
    empty_slots(std::max<uint64_t>(slots_.size(),
                                   next_pow2(uint64_t(std::ceil(double(live) / kMaxLoad)) + 1)));
    for (int64_t r = 1; r < U; ++r) {
      if (pc[r] == 0) continue;
      if (probe(meta_[r].key) >= 0)
        throw py::value_error("DynamicTable.load_state: key " +
                              std::to_string(int64_t(meta_[r].key)) + " is held by two rows");
      place(meta_[r].key, r);
      ++live_;
    }
  }

  // ---------------------------------------------------------------- properties
  int64_t size() const {
    std::shared_lock<std::shared_mutex> r(rw_);
    return live_;
  }
  int64_t rows() const {
    std::shared_lock<std::shared_mutex> r(rw_);
    return rows_;
  }
  int64_t slots() const {
    std::shared_lock<std::shared_mutex> r(rw_);
    return int64_t(slots_.size());
  }
  int64_t overflow() const {
    std::lock_guard<std::mutex> w(writer_mu_);
    return overflow_;
  }
  int64_t clock() const { return clock_.load(); }
  // the number of the last training call (what lookup's protect_since names)
  int64_t epoch() const {
    std::lock_guard<std::mutex> w(writer_mu_);
    return epoch_;
  }
  void set_record_evictions(bool on) {
    std::lock_guard<std::mutex> w(writer_mu_);
    record_evictions_ = on;
  }
  bool record_evictions() const { return record_evictions_; }

 private:
  size_t home(uint64_t key) const { return size_t(mix64(key) & mask_); }

  int64_t probe(uint64_t key) const { return probe_at(home(key), key); }

  int64_t probe_at(size_t i, uint64_t key) const {
    for (;; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (s.row < 0) return -1;
      if (s.key == key) return s.row;
    }
  }

  // out[i] = the row of keys[i] (-1: not in the table) for i in [b0, b1): each home slot is
  // prefetched kAhead keys before its probe, and hashed once (a ring of the pending homes).
  void probe_all(const uint64_t* keys, int64_t b0, int64_t b1, int64_t* out) const {
    size_t ring[kAhead];
    for (int64_t i = b0; i < b1 + kAhead; ++i) {
      const int64_t j = i - kAhead;  // probed first: its home's place in the ring is i's
      if (j >= b0) out[j] = probe_at(ring[j % kAhead], keys[j]);
      if (i < b1) {
        const size_t h = home(keys[i]);
        ring[i % kAhead] = h;
        __builtin_prefetch(&slots_[h]);
      }
    }
  }

  // not seen for more than ttl_ before `now` (unsigned difference: no overflow at the extremes)
  bool expired(int64_t row, int64_t now) const {
    const int64_t last = meta_[row].last.load(std::memory_order_relaxed);
    return ttl_ > 0 && now > last && uint64_t(now) - uint64_t(last) > uint64_t(ttl_);
  }

  // used by a protected call (see lookup; guard_ < 0: none)
  bool kept(int64_t row) const {
    return guard_ >= 0 &&
           int64_t(uint32_t(epoch_ - meta_[row].epoch.load(std::memory_order_relaxed))) <= guard_;
  }

  void touch(int64_t row, int64_t now, uint32_t epoch) {
    RowMeta& m = meta_[row];
    if (m.count.load(std::memory_order_relaxed) != kCountMax)
      m.count.fetch_add(1, std::memory_order_relaxed);
    m.last.store(now, std::memory_order_relaxed);
    m.epoch.store(epoch, std::memory_order_relaxed);
  }

  void place(uint64_t key, int64_t row) {
    size_t i = home(key);
    while (slots_[i].row >= 0) i = (i + 1) & mask_;
    slots_[i] = Slot{key, row};
  }

  // Frees `row` and deletes its key (backward-shift deletion keeps every probe chain whole).
  void remove(int64_t row) {
    RowMeta& m = meta_[row];
    size_t i = home(m.key);
    while (slots_[i].row != row) i = (i + 1) & mask_;
    for (size_t j = (i + 1) & mask_;; j = (j + 1) & mask_) {
      if (slots_[j].row < 0) break;
      const size_t h = home(slots_[j].key);
      // slot j may move to the hole at i unless its home lies cyclically in (i, j]
      const bool stays = i <= j ? (h > i && h <= j) : (h > i || h <= j);
      if (!stays) {
        slots_[i] = slots_[j];
        i = j;
      }
    }
    slots_[i] = Slot{0, -1};
    if (record_evictions_) evicted_.push_back(m.key);
    m.count.store(0, std::memory_order_relaxed);
    free_.push_back(row);
    --live_;
  }

  bool admit(uint64_t key) {
    if (min_count_ > 1) {
      const uint64_t h = mix64(key ^ 0x5bd1e9955bd1e995ULL);
      const uint64_t h1 = h & 0xffffffffULL, h2 = (h >> 32) | 1;
      uint32_t est = std::numeric_limits<uint32_t>::max();
      for (int d = 0; d < kSketchDepth; ++d) {
        uint16_t& c = sketch_[size_t(d) * (sketch_mask_ + 1) + ((h1 + d * h2) & sketch_mask_)];
        if (c != std::numeric_limits<uint16_t>::max()) ++c;
        est = std::min<uint32_t>(est, c);
      }
      if (int64_t(est) < min_count_) return false;
    }
    if (admit_prob_ < 1.0) {
      uint64_t s = seed_ ^ (uint64_t(epoch_) * 0xd1b54a32d192ed03ULL);
      const uint64_t coin = mix64(splitmix64(s) ^ key);
      return double(coin >> 11) * 0x1.0p-53 < admit_prob_;
    }
    return true;
  }

  // A row for a new key: a free one, a never used one, or one freed by eviction; -1 when every
  // row is used by this call.
  int64_t take_row(int64_t now) {
    if (free_.empty() && next_unused_ == rows_) {
      if (when_full_ == WhenFull::kGrow) resize_rows(rows_ * 2);  // the caller reserves first
      else evict(now);
    }
    if (!free_.empty()) {
      const int64_t row = free_.back();
      free_.pop_back();
      return row;
    }
    if (next_unused_ < rows_) return next_unused_++;
    return -1;
  }

  // The table is full: frees the expired keys if any, else the `evict_fraction` of keys first in
  // eviction order (fewest lookups, then oldest; or oldest, then fewest), sparing this call's.
  void evict(int64_t now) {
    if (ttl_ > 0) {
      int64_t n = 0;
      for (int64_t r = 1; r < next_unused_; ++r)
        if (meta_[r].count.load(std::memory_order_relaxed) > 0 &&
            !kept(r) && expired(r, now)) {
          remove(r);
          ++n;
        }
      if (n > 0) return;
    }
    const size_t k = size_t(std::max<double>(1.0, std::floor(double(live_) * evict_fraction_)));
    struct Cand {
      uint64_t a;
      int64_t b;
      int64_t row;
    };
    const bool lfu = when_full_ == WhenFull::kLfu;
    auto worse = [](const Cand& x, const Cand& y) {  // x leaves after y
      return x.a != y.a ? x.a > y.a : x.b != y.b ? x.b > y.b : x.row > y.row;
    };
    std::vector<Cand> heap;  // max-heap on `worse`: its top is the best-kept victim so far
    heap.reserve(k);
    for (int64_t r = 1; r < next_unused_; ++r) {
      const RowMeta& m = meta_[r];
      const uint32_t c = m.count.load(std::memory_order_relaxed);
      if (c == 0 || kept(r)) continue;
      const int64_t l = m.last.load(std::memory_order_relaxed);
      // the order key: (count, last) for LFU, (last, count) for "ttl"; last is shifted so that
      // it compares as unsigned
      const uint64_t lu = uint64_t(l) ^ (uint64_t(1) << 63);
      Cand cand = lfu ? Cand{c, l, r} : Cand{lu, int64_t(c), r};
      if (heap.size() < k) {
        heap.push_back(cand);
        std::push_heap(heap.begin(), heap.end(), worse);
      } else if (worse(heap.front(), cand)) {
        std::pop_heap(heap.begin(), heap.end(), worse);
        heap.back() = cand;
        std::push_heap(heap.begin(), heap.end(), worse);
      }
    }
    // sort so that the least wanted row is freed last and so reused first
    std::sort(heap.begin(), heap.end(), [&](const Cand& x, const Cand& y) { return worse(x, y); });
    for (const Cand& c : heap) remove(c.row);
  }

  void resize_rows(int64_t rows) {
    BigArray<RowMeta> m(size_t(rows), huge_pages_);
    for (int64_t r = 0; r < rows; ++r) {
      const bool old = r < rows_;
      m[r].key = old ? meta_[r].key : 0;
      m[r].last.store(old ? meta_[r].last.load() : 0, std::memory_order_relaxed);
      m[r].count.store(old ? meta_[r].count.load() : 0, std::memory_order_relaxed);
      m[r].epoch.store(old ? meta_[r].epoch.load() : 0, std::memory_order_relaxed);
    }
    meta_ = std::move(m);
    rows_ = rows;
  }

  void empty_slots(uint64_t n) {
    slots_ = BigArray<Slot>(size_t(n), huge_pages_);
    for (size_t i = 0; i < size_t(n); ++i) slots_[i] = Slot{0, -1};
    mask_ = n - 1;
  }

  void resize_slots(uint64_t n) {
    empty_slots(n);
    mask_ = n - 1;
    for (int64_t r = 1; r < next_unused_; ++r)
      if (meta_[r].count.load(std::memory_order_relaxed) > 0) place(meta_[r].key, r);
  }

  const bool huge_pages_;
  const int64_t min_count_;
  const double admit_prob_;
  const int64_t ttl_;
  const double evict_fraction_;
  WhenFull when_full_ = WhenFull::kGrow;
  bool usage_ = true;                 // hits update count / last seen / epoch

  mutable std::mutex writer_mu_;     // one training call (or maintenance) at a time
  mutable std::shared_mutex rw_;     // shared: lookups; exclusive: structure changes
  BigArray<Slot> slots_;
  uint64_t mask_ = 0;
  BigArray<RowMeta> meta_;           // [rows_]
  int64_t rows_ = 0;
  int64_t next_unused_ = 1;          // rows [next_unused_, rows_) were never given out
  std::vector<int64_t> free_;        // freed rows, reused last-freed first
  int64_t live_ = 0;
  std::vector<uint16_t> sketch_;     // [depth, width] count-min, saturating
  uint64_t sketch_mask_ = 0;
  uint64_t seed_;  // of the admission coins
  uint32_t epoch_ = 0;                // training calls so far (wraps)
  int64_t guard_ = 0;                 // calls protected from eviction: epoch_ - guard_ .. epoch_
  std::atomic<int64_t> clock_{std::numeric_limits<int64_t>::min()};
  int64_t overflow_ = 0;             // new keys sent to row 0 because the call used every row
  bool record_evictions_ = false;
  std::vector<uint64_t> evicted_;
};

// ------------------------------------------------------------------ binding
using adrec::describe;

// `keys` as a pointer to n uint64: a 1-D C-contiguous int64 or uint64 numpy array, never copied.
const uint64_t* key_arg(py::handle keys, const char* fn, int64_t& n) {
  const bool ok = py::isinstance<py::array_t<int64_t>>(keys) ||
                  py::isinstance<py::array_t<uint64_t>>(keys);
  if (!py::isinstance<py::array>(keys) || !ok)
    throw py::type_error(std::string("DynamicTable.") + fn +
                         ": keys must be a numpy int64 or uint64 array [n], got " +
                         describe(keys));
  const auto a = py::reinterpret_borrow<py::array>(keys);
  if (a.ndim() != 1)
    throw py::value_error(std::string("DynamicTable.") + fn + ": keys must be 1-D [n], got " +
                          describe(keys));
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(std::string("DynamicTable.") + fn +
                          ": keys must be contiguous (stride 8 bytes), got a strided " +
                          describe(keys));
  n = a.shape(0);
  return static_cast<const uint64_t*>(a.data());
}

template <class T>
py::array_t<T> to_array(const std::vector<T>& v) {
  py::array_t<T> a(int64_t(v.size()));
  if (!v.empty()) std::memcpy(a.mutable_data(), v.data(), v.size() * sizeof(T));
  return a;
}

}  // namespace

void bind_dynamic_table(py::module_& m) {
  py::class_<DynamicTable>(
      m, "DynamicTable",
      "The key -> row map of a dynamic embedding table (csrc/cpu/dynamic_table.cpp); built by "
      "adrec_fast.nn.DynamicEmbedding. Row 0 is the unadmitted row.")
      .def(py::init<int64_t, int64_t, double, int64_t, const std::string&, uint64_t, double,
                    int64_t, bool>(),
           py::arg("capacity"), py::arg("min_count") = 1, py::arg("admit_prob") = 1.0,
           py::arg("ttl") = 0, py::arg("eviction") = "grow", py::arg("seed") = 0,
           py::arg("evict_fraction") = 0.01, py::arg("sketch_width") = 0,
           py::arg("huge_pages") = true)
      // keys int64/uint64 [n], now -> (rows int64 [n], fresh_rows int64 [k], fresh_keys [k])
      .def(
          "lookup",
          [](DynamicTable& t, py::handle keys, int64_t now, int64_t protect_since) {
            int64_t n = 0;
            const uint64_t* k = key_arg(keys, "lookup", n);
            py::array_t<int64_t> out(n);
            int64_t* po = out.mutable_data();
            std::vector<int64_t> fr;
            std::vector<uint64_t> fk;
            {
              py::gil_scoped_release nogil;
              t.lookup(k, n, now, po, fr, fk, protect_since);
            }
            auto keys_out = to_array(fk).attr("view")("int64");
            return py::make_tuple(out, to_array(fr), keys_out);
          },
          py::arg("keys"), py::arg("now"), py::arg("protect_since") = 0)
      // keys int64/uint64 [n] -> rows int64 [n], read-only (0 for unknown keys)
      .def(
          "find",
          [](const DynamicTable& t, py::handle keys) {
            int64_t n = 0;
            const uint64_t* k = key_arg(keys, "find", n);
            py::array_t<int64_t> out(n);
            int64_t* po = out.mutable_data();
            {
              py::gil_scoped_release nogil;
              t.find(k, n, po);
            }
            return out;
          },
          py::arg("keys"))
      .def("expire", &DynamicTable::expire, py::arg("now"), py::arg("protect_since") = 0,
           py::call_guard<py::gil_scoped_release>())
      .def("reserve_rows", &DynamicTable::reserve_rows, py::arg("rows"),
           py::call_guard<py::gil_scoped_release>())
      .def("spare_rows", &DynamicTable::spare_rows)
      .def("check", &DynamicTable::check, py::call_guard<py::gil_scoped_release>())
      .def("take_evicted",
           [](DynamicTable& t) { return to_array(t.take_evicted()).attr("view")("int64"); })
      .def("state", &DynamicTable::state)
      .def("load_state", &DynamicTable::load_state, py::arg("row_keys"), py::arg("row_counts"),
           py::arg("row_last_seen"), py::arg("free_rows"), py::arg("sketch"), py::arg("scalars"))
      .def_property("record_evictions", &DynamicTable::record_evictions,
                    &DynamicTable::set_record_evictions)
      .def_property_readonly("size", &DynamicTable::size)
      .def_property_readonly("rows", &DynamicTable::rows)
      .def_property_readonly("slots", &DynamicTable::slots)
      .def_property_readonly("overflow", &DynamicTable::overflow)
      .def_property_readonly("clock", &DynamicTable::clock)
      .def_property_readonly("epoch", &DynamicTable::epoch);
}

}  // namespace adrec
