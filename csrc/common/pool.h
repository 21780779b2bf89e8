// SPDX-License-Identifier: Apache-2.0
#pragma once
// A small work-sharing pool for the embedding kernels. The calling thread takes part, items are
// claimed one at a time from a shared counter, and the call returns as soon as every item has
// been claimed and finished: a worker that the OS has not scheduled yet (a busy shared machine)
// is never waited for, unlike an OpenMP parallel region whose join waits for every thread.
// At most at::get_num_threads() threads work on a call. Concurrent calls from several Python
// threads (a serving stack) do not queue: a call that finds the pool busy runs on its own thread.
#include <ATen/Parallel.h>
#include <unistd.h>

#include <condition_variable>
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
      fn_ = &fn;
      n_ = n;
      next_ = 0;
      pending_ = 0;
      helpers_ = threads - 1;
    }
    cv_work_.notify_all();
    int64_t i;
    while (claim(i)) {
      fn(i);
      finish();
    }
    std::unique_lock<std::mutex> lk(m_);
    cv_done_.wait(lk, [&] { return next_ >= n_ && pending_ == 0; });
    fn_ = nullptr;
  }

  static WorkPool& get() {
    // Never destroyed: worker threads must not outlive it at interpreter exit.
    static WorkPool* pool = new WorkPool();
    return *pool;
  }

 private:
  WorkPool() : pid_(getpid()) {}

  bool claim(int64_t& i) {
    std::lock_guard<std::mutex> lk(m_);
    if (fn_ == nullptr || next_ >= n_) return false;
    i = next_++;
    ++pending_;
    return true;
  }

  void finish() {
    std::lock_guard<std::mutex> lk(m_);
    --pending_;
    if (next_ >= n_ && pending_ == 0) cv_done_.notify_all();
  }

  void worker(int64_t id) {
    while (true) {
      const Fn* fn;
      int64_t i;
      {
        std::unique_lock<std::mutex> lk(m_);
        cv_work_.wait(lk, [&] { return fn_ != nullptr && next_ < n_ && id < helpers_; });
        fn = fn_;
        i = next_++;
        ++pending_;
      }
      (*fn)(i);  // kernels record errors and never throw here
      finish();
    }
  }

  const pid_t pid_;
  std::mutex job_mutex_;  // one job at a time
  std::mutex m_;
  std::condition_variable cv_work_, cv_done_;
  std::vector<std::thread> workers_;
  const Fn* fn_ = nullptr;
  int64_t n_ = 0, next_ = 0, pending_ = 0, helpers_ = 0;
};

// fn(i) for i in [0, n) on the work pool.
template <typename F>
void parallel_items(int64_t n, F&& f) {
  WorkPool::get().run(n, WorkPool::Fn(std::forward<F>(f)));
}

}  // namespace adrec
