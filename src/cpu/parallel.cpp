#include "cpu/parallel.h"

#include <pthread.h>

#include <algorithm>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "cpu/simd.h"
#include "tinyserve/ops.h"

namespace tinyserve::cpu {
namespace {

// More workers than this only add wake-up cost: the work is split into at most four chunks per
// worker, and no CPU that this library runs on has more hardware threads.
constexpr int kMaxWorkers = 1024;

int default_worker_count() {
  if (const char* env = std::getenv("TINYSERVE_NUM_THREADS")) {
    // Read as a wide integer (strtoll saturates where atoi wrapped), so that any positive count,
    // however large, is cut to kMaxWorkers.
    char* end = nullptr;
    const long long n = std::strtoll(env, &end, 10);
    if (end != env && n > 0) return int(std::min<long long>(n, kMaxWorkers));
  }
  unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : std::min(int(hw), kMaxWorkers);
}

// A fixed set of workers woken per job. One job runs at a time (run_mutex), which also keeps
// the pool's state simple: a job is (fn, n, chunk count), workers claim chunk indices.
//
// The pool asks for `threads` threads (the caller is one of them) and runs on those that the
// system gives it: when a thread cannot start (address space or process limits), it stops there
// and threads() reports how many it has.
class Pool {
 public:
  explicit Pool(int threads) {
    const int wanted = std::max(1, threads);
    workers_.reserve(std::size_t(wanted - 1));
    for (int i = 1; i < wanted; ++i) {
      try {
        workers_.emplace_back([this] { work(); });
      } catch (const std::exception&) {
        break;  // std::system_error: the system has no more threads for us
      }
    }
    threads_ = int(workers_.size()) + 1;
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int threads() const { return threads_; }

  void run(std::int64_t n, const std::function<void(std::int64_t, std::int64_t)>& fn) {
    std::lock_guard<std::mutex> run_lock(run_mutex_);
    // Several chunks per thread, claimed in turn: uneven work (sequences of different lengths)
    // balances across the threads.
    std::int64_t chunks = std::min<std::int64_t>(n, std::int64_t(threads_) * 4);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      fn_ = &fn;
      n_ = n;
      chunks_ = chunks;
      next_ = 0;
      pending_ = chunks;
      error_ = nullptr;
      ++generation_;
    }
    wake_.notify_all();
    drain();
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return pending_ == 0; });
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void drain() {
    for (;;) {
      std::int64_t chunk;
      const std::function<void(std::int64_t, std::int64_t)>* fn;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        if (fn_ == nullptr || next_ >= chunks_) return;
        chunk = next_++;
        fn = fn_;
      }
      std::int64_t begin = n_ * chunk / chunks_, end = n_ * (chunk + 1) / chunks_;
      std::exception_ptr err;
      try {
        (*fn)(begin, end);
      } catch (...) {
        err = std::current_exception();
      }
      std::lock_guard<std::mutex> lock(mutex_);
      if (err && !error_) error_ = err;
      if (--pending_ == 0) done_.notify_all();
    }
  }

  void work() {
    std::uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
      }
      drain();
    }
  }

  int threads_ = 1;
  std::vector<std::thread> workers_;
  std::mutex run_mutex_, mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(std::int64_t, std::int64_t)>* fn_ = nullptr;
  std::int64_t n_ = 0, chunks_ = 0, next_ = 0, pending_ = 0;
  std::uint64_t generation_ = 0;
  std::exception_ptr error_;
  bool stop_ = false;
};

std::mutex g_pool_mutex;
// Held through a pointer that is never destroyed at exit: joining threads from static
// destructors can deadlock when the process exits from inside a callback.
std::shared_ptr<Pool>* g_pool = new std::shared_ptr<Pool>();
int g_requested = 0;

void forget_pool_in_child() {
  // After fork() the child has none of the workers; leak the parent's pool object (its
  // destructor would wait for threads that do not exist) and build a new one on first use.
  g_pool = new std::shared_ptr<Pool>();
}

std::shared_ptr<Pool> pool() {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  static bool registered = [] {
    pthread_atfork(nullptr, nullptr, forget_pool_in_child);
    return true;
  }();
  (void)registered;
  if (!*g_pool) {
    *g_pool = std::make_shared<Pool>(g_requested > 0 ? g_requested : default_worker_count());
  }
  return *g_pool;
}

}  // namespace

void parallel_for(std::int64_t n, const std::function<void(std::int64_t, std::int64_t)>& fn) {
  if (n <= 0) return;
  std::shared_ptr<Pool> p = pool();  // kept alive through the job if the pool is replaced
  if (n == 1 || p->threads() == 1) {
    fn(0, n);
    return;
  }
  p->run(n, fn);
}

int worker_count() { return pool()->threads(); }

void set_worker_count(int n) {
  if (n < 1 || n > kMaxWorkers) {
    throw std::invalid_argument("tinyserve.set_num_threads: n must be in [1, " +
                                std::to_string(kMaxWorkers) + "], got " + std::to_string(n));
  }
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  g_requested = n;
  if (*g_pool && (*g_pool)->threads() != n) g_pool->reset();
}

}  // namespace tinyserve::cpu

namespace tinyserve {
int num_threads() { return cpu::worker_count(); }
void set_num_threads(int n) { cpu::set_worker_count(n); }
bool cpu_hardware_float16() { return cpu::simd::hardware_float16(); }
}  // namespace tinyserve
