// SPDX-License-Identifier: Apache-2.0
#pragma once
// Tuning constants of the CPU kernels, in one place. Each value and the measurement behind it
// is in bench/RESULTS.md ("Tuning constants"). None is a user setting: the thresholds that
// depend on the machine are derived from its L3 size.
#include <atomic>
#include <cstdint>

namespace adrec {
namespace tuning {

// Bytes of embedding rows prefetched ahead of the gather: about 128 cache lines in flight,
// enough misses outstanding per core to cover DRAM latency without evicting rows before use.
constexpr int64_t kPrefetchBytes = 8192;

// Forward outputs of at least L3 / kStreamOutL3Divisor bytes are written with streaming stores
// (they would not stay in cache for the next layer anyway); kStreamOutFallbackBytes where the L3
// size is unknown.
constexpr int64_t kStreamOutL3Divisor = 2;
constexpr int64_t kStreamOutFallbackBytes = int64_t(16) << 20;

// The fused backward updates rows straight from grad_out for a D >= 64 table whose gradient
// buffer would reach L3 / kDirectMinL3Divisor bytes (two threads' buffers then exceed half the
// L3) and whose ids mostly do not repeat; kDirectMinFallbackBytes where the L3 is unknown.
constexpr int64_t kDirectMinL3Divisor = 4;
constexpr int64_t kDirectMinFallbackBytes = int64_t(8) << 20;

// How long an idle pool worker polls for the next job before it sleeps, when the cores are not
// shared: back-to-back kernel calls then start without a futex wake-up (tens of microseconds on
// a VM). Skipped while the pool sees its threads preempted (see common/parallel.h).
constexpr int64_t kPoolSpinNs = 100 * 1000;
// How long a caller polls for the pool's last items before it sleeps on them.
constexpr int64_t kPoolWaitSpinNs = 50 * 1000;
// After a pool thread was preempted, idle workers do not poll for this long.
constexpr int64_t kPoolContendedHoldNs = 20 * 1000 * 1000;
// parallel_for cuts a range into at most this many pieces per thread: a thread that is
// descheduled mid-call then holds up a quarter of its share, not all of it.
constexpr int64_t kChunksPerThread = 4;

// The L3 that cpu0 shares, in bytes (Linux sysfs), or 0 where unknown. glibc's sysconf reports
// the whole package's L3 on some VMs (384 MB instead of 32 MB), so sysfs is read instead.
int64_t l3_bytes();

// The thresholds in effect, derived once from the constants above. Tests lower them through the
// private adrec_fast._C._set_tuning to reach a path on small inputs; nothing else writes them.
struct Thresholds {
  std::atomic<int64_t> stream_out_bytes;  // streaming stores at or above (INT64_MAX: never)
  std::atomic<int64_t> direct_min_bytes;  // direct fused update at or above (INT64_MAX: never)
  std::atomic<int64_t> pool_spin_ns;      // kPoolSpinNs
};
Thresholds& thresholds();

}  // namespace tuning
}  // namespace adrec
