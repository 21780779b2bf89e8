// SPDX-License-Identifier: Apache-2.0
#pragma once
// A small work-sharing pool for the embedding kernels. The calling thread takes part, items are
// claimed one at a time from a shared counter, and the call returns as soon as every item has
// been claimed and finished: a worker that the OS has not scheduled yet (a busy shared machine)
// is never waited for, unlike an OpenMP parallel region whose join waits for every thread.
// At most at::get_num_threads() threads work on a call. Concurrent calls from several Python
// threads (a serving stack) do not queue: a call that finds the pool busy runs on its own thread.
// Idle workers poll for the next job for a short while (spin_ns) before they sleep.
#include <ATen/Parallel.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace adrec {

class WorkPool {
 public:
  using Fn = std::function<void(int64_t)>;

  // Runs fn(i) for every i in [0, n), each exactly once.
  void run(int64_t n, const Fn& fn) {
    if (n <= 0) return;
    const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
    std::unique_lock<std::mutex> job_lock(job_mutex_, std::try_to_lock);
    if (threads <= 1 || !job_lock.owns_lock() || getpid() != pid_ || at::in_parallel_region()) {
      for (int64_t i = 0; i < n; ++i) fn(i);
      return;
    }
    {
      std::lock_guard<std::mutex> lk(m_);
      while (static_cast<int64_t>(workers_.size()) < threads - 1) {
        const int64_t id = static_cast<int64_t>(workers_.size());
        workers_.emplace_back([this, id] { worker(id); });
      }
    }
    Job job{&fn, n, threads - 1, ++gen_};
    // seq_cst stores and loads: a worker that counted itself in sleepers_ before the load below
    // is notified; one that did so after it sees the new generation in its wait predicate.
    job_.store(&job);
    pub_gen_.store(job.gen);
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lk(m_);
      cv_work_.notify_all();
    }
    for (int64_t i = job.next.fetch_add(1); i < n; i = job.next.fetch_add(1)) {
      fn(i);
      job.done.fetch_add(1, std::memory_order_release);
    }
    // Wait for the items other threads claimed (each is one short task), then for every worker
    // that may still hold a pointer to `job` to let go of it.
    for (int spins = 0; job.done.load(std::memory_order_acquire) < n; ++spins) relax(spins);
    job_.store(nullptr);
    for (int spins = 0; active_.load() > 0; ++spins) relax(spins);
  }

  static WorkPool& get() {
    // Never destroyed: worker threads must not outlive it at interpreter exit.
    static WorkPool* pool = new WorkPool();
    return *pool;
  }

 private:
  struct Job {
    const Fn* fn;
    int64_t n, helpers;
    uint64_t gen;
    std::atomic<int64_t> next{0}, done{0};
  };

  WorkPool() : pid_(getpid()) {}

  static void cpu_pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }
  static void relax(int spins) {
    cpu_pause();
    if (spins > 4096) std::this_thread::yield();  // the other thread was descheduled
  }

  // How long an idle worker keeps polling for the next job before it sleeps: back-to-back
  // calls (a training step's lookups, a benchmark) then start without a futex wake-up, whose
  // latency on a VM (tens of microseconds, sometimes more) decided how much of a 0.2 ms call the
  // worker got to share. ADREC_POOL_SPIN_US overrides the 100 us (0: always sleep).
  static int64_t spin_ns() {
    static const int64_t ns = [] {
      const char* e = std::getenv("ADREC_POOL_SPIN_US");
      const long long us = e != nullptr ? std::atoll(e) : 100;
      return static_cast<int64_t>(us < 0 ? 0 : us) * 1000;
    }();
    return ns;
  }

  // Enters the published job if it is newer than `seen`; returns it with active_ held, or null.
  Job* enter(uint64_t seen) {
    if (job_.load(std::memory_order_relaxed) == nullptr) return nullptr;
    active_.fetch_add(1);  // seq_cst: run() clears job_ before it waits for active_ == 0
    Job* j = job_.load();
    if (j != nullptr && j->gen > seen) return j;
    active_.fetch_sub(1);
    return nullptr;
  }

  void worker(int64_t id) {
    uint64_t seen = 0;
    while (true) {
      Job* j = nullptr;
      const auto t0 = std::chrono::steady_clock::now();
      for (int k = 0; (j = enter(seen)) == nullptr; ++k) {
        cpu_pause();
        if ((k & 63) == 63 &&
            std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0)
                    .count() >= spin_ns())
          break;
      }
      if (j == nullptr) {
        std::unique_lock<std::mutex> lk(m_);
        sleepers_.fetch_add(1);
        uint64_t g = 0;
        cv_work_.wait(lk, [&] { return (g = pub_gen_.load()) > seen; });
        sleepers_.fetch_sub(1);
        lk.unlock();
        j = enter(seen);
        if (j == nullptr) {  // job g finished before this thread got to it
          seen = g;
          continue;
        }
      }
      seen = j->gen;
      if (id < j->helpers) {
        for (int64_t i = j->next.fetch_add(1); i < j->n; i = j->next.fetch_add(1)) {
          (*j->fn)(i);  // kernels record errors and never throw here
          j->done.fetch_add(1, std::memory_order_release);
        }
      }
      active_.fetch_sub(1);
    }
  }

  const pid_t pid_;
  std::mutex job_mutex_;  // one job at a time
  std::mutex m_;          // workers' sleep
  std::condition_variable cv_work_;
  std::vector<std::thread> workers_;
  std::atomic<Job*> job_{nullptr};
  std::atomic<int64_t> active_{0}, sleepers_{0};
  std::atomic<uint64_t> pub_gen_{0};  // generation of the last published job
  uint64_t gen_ = 0;  // written under job_mutex_ only
};

// fn(i) for i in [0, n) on the work pool.
template <typename F>
void parallel_items(int64_t n, F&& f) {
  WorkPool::get().run(n, WorkPool::Fn(std::forward<F>(f)));
}

}  // namespace adrec
