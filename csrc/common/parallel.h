// SPDX-License-Identifier: Apache-2.0
#pragma once
// The parallel-for of the CPU kernels. Every adrec CPU kernel splits its work with
// adrec::parallel_for (ranges) or adrec::parallel_items (one task per item); torch.set_num_threads
// (at::get_num_threads) caps how many threads work on a call. They run on torch's OpenMP team by
// default, or on the WorkPool below (ADREC_THREADS=pool; kernels_on_openmp() says why each).
//
// The WorkPool, for cores shared with other processes:
// - Work is claimed in small pieces from a shared counter and a call returns once every piece is
//   done, so a thread the OS has descheduled (another process on the core) holds up at most the
//   piece it is in. An OpenMP region's join waits for every thread of the team, scheduled or not.
// - Waiting does not burn a shared core. Idle workers poll for the next job for a short while
//   (back-to-back calls then skip a futex wake-up) and sleep after; a caller waiting for the last
//   pieces polls briefly and sleeps on a futex. While the pool's threads are being preempted (a
//   sign that the cores are shared) idle workers do not poll.
// Measured with the row-wise Adagrad step under contention: bench/RESULTS.md, "Tuning constants".
// Concurrent calls from several Python threads do not queue: a call that finds the pool busy runs
// on its own thread, as does a call made from inside a task.
#include <ATen/Parallel.h>
#include <linux/futex.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "common/tuning.h"

namespace adrec {

class WorkPool {
 public:
  using Task = void (*)(void* ctx, int64_t item);

  // Runs call(ctx, i) for every i in [0, n), each exactly once; rethrows the first exception a
  // task threw, after every task has finished.
  void run(int64_t n, Task call, void* ctx) {
    if (n <= 0) return;
    const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
    const bool alone = threads <= 1 || in_task() || n > INT32_MAX ||
                       getpid() != pid_ || at::in_parallel_region();
    std::unique_lock<std::mutex> job_lock;
    if (!alone) job_lock = std::unique_lock<std::mutex>(job_mutex_, std::try_to_lock);
    if (alone || !job_lock.owns_lock()) {
      for (int64_t i = 0; i < n; ++i) call(ctx, i);
      return;
    }
    {
      std::lock_guard<std::mutex> lk(m_);
      while (static_cast<int64_t>(workers_.size()) < threads - 1) {
        const int64_t id = static_cast<int64_t>(workers_.size());
        workers_.emplace_back([this, id] { worker(id); });
      }
    }
    // Jobs alternate between two slots, so a worker that arrives late at a finished job (it was
    // descheduled) finds it in a slot that is not being reused: the caller never waits for it.
    // Reusing a slot waits for its last visitor to leave, two jobs later.
    const uint64_t g = ++gen_;
    Slot& s = slots_[g & 1];
    s.gen.store(0);  // seq_cst, as below: a worker either is counted in active or sees gen 0
    for (int k = 0; s.active.load() != 0; ++k) relax(k);
    s.n = n;
    s.helpers = threads - 1;
    s.call = call;
    s.ctx = ctx;
    s.error = nullptr;
    s.failed.store(false, std::memory_order_relaxed);
    s.next.store(0, std::memory_order_relaxed);
    s.remaining.store(static_cast<int32_t>(n), std::memory_order_relaxed);
    s.caller_asleep.store(0, std::memory_order_relaxed);
    s.gen.store(g, std::memory_order_release);
    // seq_cst store and load: a worker that counted itself in sleepers_ before the load below is
    // notified; one that did so after it sees the new generation in its wait predicate.
    pub_gen_.store(g);
    if (sleepers_.load() > 0) {
      // Taking m_ orders this against a worker between its predicate check and its sleep; the
      // notify comes after the unlock, so a woken worker does not block on m_ again.
      { std::lock_guard<std::mutex> lk(m_); }
      cv_work_.notify_all();
    }
    in_task() = true;
    work(s);
    in_task() = false;
    wait_done(s);
    note_preemptions();
    if (s.failed.load(std::memory_order_relaxed)) std::rethrow_exception(s.error);
  }

  static WorkPool& get() {
    // Never destroyed: worker threads must not outlive it at interpreter exit.
    static WorkPool* pool = new WorkPool();
    return *pool;
  }

 private:
  struct Slot {
    std::atomic<uint64_t> gen{0};  // the job this slot holds; 0 while it is being filled
    std::atomic<int64_t> next{0};  // next unclaimed item
    std::atomic<int32_t> remaining{0};  // items not finished (the caller's futex word)
    std::atomic<int32_t> caller_asleep{0};
    std::atomic<int32_t> active{0};  // workers inside this slot
    std::atomic<bool> failed{false};
    std::exception_ptr error;  // written by the thread that set failed
    int64_t n = 0, helpers = 0;
    Task call = nullptr;
    void* ctx = nullptr;
  };

  WorkPool() : pid_(getpid()) {}

  static bool& in_task() {
    static thread_local bool v = false;
    return v;
  }
  static int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }
  static void cpu_pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }
  static void relax(int k) {
    cpu_pause();
    if (k > 1024) std::this_thread::yield();
  }
  static void futex_wait(std::atomic<int32_t>* word, int32_t expected) {
    syscall(SYS_futex, reinterpret_cast<int32_t*>(word), FUTEX_WAIT_PRIVATE, expected, nullptr,
            nullptr, 0);
  }
  static void futex_wake(std::atomic<int32_t>* word) {
    syscall(SYS_futex, reinterpret_cast<int32_t*>(word), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr,
            nullptr, 0);
  }

  // Whether a thread of the pool was preempted lately (the cores are shared): then idle workers
  // sleep at once.
  bool contended() const {
    return now_ns() < contended_until_.load(std::memory_order_relaxed);
  }
  // Called after each job: an involuntary context switch since the thread's last job means another
  // runnable thread wanted its core.
  void note_preemptions() {
    static thread_local long last = -1;
    struct rusage ru;
    if (getrusage(RUSAGE_THREAD, &ru) != 0) return;
    if (last >= 0 && ru.ru_nivcsw > last)
      contended_until_.store(now_ns() + tuning::kPoolContendedHoldNs, std::memory_order_relaxed);
    last = ru.ru_nivcsw;
  }

  // Claims and runs items of `s` until none is left.
  void work(Slot& s) {
    for (int64_t i = s.next.fetch_add(1, std::memory_order_relaxed); i < s.n;
         i = s.next.fetch_add(1, std::memory_order_relaxed)) {
      try {
        s.call(s.ctx, i);
      } catch (...) {
        bool expected = false;
        if (s.failed.compare_exchange_strong(expected, true)) s.error = std::current_exception();
      }
      // release: the item's writes are visible to the caller that sees remaining reach 0.
      if (s.remaining.fetch_sub(1) == 1 && s.caller_asleep.load() != 0) futex_wake(&s.remaining);
    }
  }

  // The caller, once every item is claimed: waits for the items other threads still run. It
  // polls first, even on shared cores: what is left is at most one piece per worker, and a
  // caller that sleeps waits for the scheduler to run it again, which on a busy core takes
  // longer than a piece.
  void wait_done(Slot& s) {
    const int64_t spin = tuning::kPoolWaitSpinNs;
    const int64_t t0 = now_ns();
    for (int k = 1; s.remaining.load(std::memory_order_acquire) > 0; ++k) {
      cpu_pause();
      if ((k & 63) == 0 && now_ns() - t0 >= spin) {
        s.caller_asleep.store(1);  // seq_cst: the last finisher sees it, or we see remaining 0
        for (int32_t r = s.remaining.load(); r > 0; r = s.remaining.load()) futex_wait(&s.remaining, r);
        break;
      }
    }
  }

  void worker(int64_t id) {
    in_task() = true;
    uint64_t seen = 0;
    while (true) {
      uint64_t g = pub_gen_.load(std::memory_order_acquire);
      if (g == seen) {
        const int64_t spin =
            contended() ? 0 : tuning::thresholds().pool_spin_ns.load(std::memory_order_relaxed);
        const int64_t t0 = now_ns();
        for (int k = 1; (g = pub_gen_.load(std::memory_order_acquire)) == seen; ++k) {
          cpu_pause();
          if ((k & 63) == 0 && now_ns() - t0 >= spin) break;
        }
        if (g == seen) {
          std::unique_lock<std::mutex> lk(m_);
          sleepers_.fetch_add(1);
          cv_work_.wait(lk, [&] { return (g = pub_gen_.load()) != seen; });
          sleepers_.fetch_sub(1);
        }
      }
      seen = g;
      Slot& s = slots_[g & 1];
      s.active.fetch_add(1);  // seq_cst: pairs with the caller's gen.store(0) / active.load()
      if (s.gen.load() == g && id < s.helpers) work(s);
      s.active.fetch_sub(1, std::memory_order_release);
      note_preemptions();
    }
  }

  const pid_t pid_;
  std::mutex job_mutex_;  // one job at a time
  std::mutex m_;          // workers' sleep
  std::condition_variable cv_work_;
  std::vector<std::thread> workers_;
  Slot slots_[2];
  std::atomic<uint64_t> pub_gen_{0};  // generation of the last published job
  std::atomic<int64_t> sleepers_{0};
  std::atomic<int64_t> contended_until_{0};
  uint64_t gen_ = 0;  // written under job_mutex_ only
};

// Which threads run the kernels' parallel work, read once from ADREC_THREADS: "openmp" (the
// default) or "pool". std::invalid_argument for any other value (the module's import fails
// with it, as for ADREC_CPU_ISA).
//   openmp: torch's OpenMP team (at::parallel_for), each thread claiming items from a shared
//     counter. A training step alternates our kernels with oneDNN's and ATen's products, which
//     run on that team; its threads spin for the next region after each one, so a second team
//     of our own found one of the two cores taken by a spinning thread. Measured on the 2-core
//     machine (bench/RESULTS.md, "One thread team"): the row-wise Adagrad step 3.4-3.7 -> 2.2 ms,
//     the DLRM / DCN-v2 training steps 79-83 -> 73-74 and 143-144 -> 135 ms.
//   pool: the WorkPool above. It keeps a call from waiting on a thread that another process
//     has descheduled (an OpenMP join waits for every thread of the team), so its slowdown
//     under contention is smaller, though its contended time was not (6.6-6.8 ms with openmp,
//     7.6-7.8 with the pool, while another process keeps 2 threads busy).
inline bool kernels_on_openmp() {
  static const bool on = [] {
    const char* v = std::getenv("ADREC_THREADS");
    const std::string s = v == nullptr ? "" : v;
    if (s.empty() || s == "openmp") return true;
    if (s == "pool") return false;
    throw std::invalid_argument("ADREC_THREADS='" + s + "': expected openmp or pool");
  }();
  return on;
}

// f(i) for every i in [0, n), on the threads kernels_on_openmp() chose; each item is one task.
template <typename F>
void parallel_items(int64_t n, const F& f) {
  if (kernels_on_openmp()) {
    const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
    if (threads <= 1 || at::in_parallel_region()) {
      for (int64_t i = 0; i < n; ++i) f(i);
      return;
    }
    std::atomic<int64_t> next{0};
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
      for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) f(i);
    });
    return;
  }
  WorkPool::get().run(
      n, [](void* ctx, int64_t i) { (*static_cast<const F*>(ctx))(i); },
      const_cast<void*>(static_cast<const void*>(&f)));
}

// f(b0, b1) over sub-ranges that cover [begin, end), on the pool (the signature of
// at::parallel_for). A range is at least `grain` long where there is enough work; there are up to
// tuning::kChunksPerThread ranges per thread, so a descheduled thread holds up little of the work.
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t threads = at::get_num_threads();
  if (n <= grain || threads <= 1) {
    f(begin, end);
    return;
  }
  const int64_t chunks = std::min((n + grain - 1) / grain, threads * tuning::kChunksPerThread);
  const int64_t size = (n + chunks - 1) / chunks;
  parallel_items((n + size - 1) / size, [&](int64_t c) {
    const int64_t b = begin + c * size;
    f(b, std::min(end, b + size));
  });
}

}  // namespace adrec
