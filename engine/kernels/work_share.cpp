// A work-sharing pool for the engine's kernels: the calling thread and a few helper threads take a job's chunks
// one at a time (each from its own range first, then from the others'), and the caller waits only for chunks a
// helper has actually taken.
//
// Why: torch's OpenMP threads split a parallel region into one fixed range per thread and join at a barrier, so
// every region waits for its slowest thread. When the other core is partly busy (a Serve replica's neighbours:
// the HTTP proxy, the ingress, the client), a descheduled OpenMP thread stalls each of the ~240 regions of a decode
// step: through HTTP the engine's two-thread forward measured slower than its one-thread forward offline
// (benchmarks/NOTES.md, session 13). Here a helper that is not running takes no chunk, and the caller does the
// rest: a busy core only costs the work it cannot do.
//
// Protocol. Each worker (the caller is worker 0) has a range of the job's chunks, [front, back) in one atomic
// word, and the caller deals the job out in equal contiguous ranges. A worker takes chunks from the front of its
// own range, so it walks through memory in order as an OpenMP thread would (the prefetchers follow it); once its
// range is empty it takes from the back of the others'. Every take is a compare-and-swap of one range word. The
// caller publishes a job by closing every range (front = back), writing the job's fields, resetting `done`, then
// dealing the ranges. A helper reads the job's fields only after its swap succeeded: the job cannot change until
// the helper reports its chunk done, so it always runs a chunk of the job it took from (even if a range word went
// through the same value for another job in between). Each chunk a helper runs adds one to `done` (release); the
// caller returns once `done` counts every chunk it did not run itself (acquire), so the job's memory is never
// touched after the call. Idle helpers spin for a short while, then sleep on a futex that the next job wakes.
//
// Correctness never depends on the helpers: with none running (a forked child, a busy machine) the caller takes
// their ranges too. A second caller while a job runs (another thread, or a chunk that calls share_for) runs its
// job alone, inline.
#include <torch/library.h>

#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#include "work_share.h"

namespace {

constexpr auto kHelperSpin = std::chrono::microseconds(1000);  // then sleep (a step's gaps are shorter)
constexpr auto kCallerSpin = std::chrono::microseconds(50);   // then sleep, so a preempted helper can run here
// A caller that waited longer than this for a helper's chunk (the helper lost its CPU mid-chunk: another process
// keeps its core busy) runs its jobs alone for kStallPause: such waits would cost more than the helpers give.
constexpr auto kStallLimit = std::chrono::microseconds(2000);
constexpr auto kStallPause = std::chrono::milliseconds(10);

inline void pause() { __builtin_ia32_pause(); }

long futex(std::atomic<uint32_t>* word, int op, uint32_t value, const timespec* timeout) {
  return syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), op | FUTEX_PRIVATE_FLAG, value, timeout, nullptr, 0);
}

constexpr int64_t kMaxWorkers = 64;

inline uint64_t range(uint64_t front, uint64_t back) { return front << 32 | back; }
inline int64_t front_of(uint64_t s) { return static_cast<int64_t>(s >> 32); }
inline int64_t back_of(uint64_t s) { return static_cast<int64_t>(s & 0xffffffffULL); }

struct alignas(64) Range {
  std::atomic<uint64_t> word{0};  // [front, back): chunks not taken yet; empty when front >= back
};

struct Pool {
  Range ranges[kMaxWorkers];
  alignas(64) std::atomic<int64_t> done{0};  // chunks the helpers finished, this job
  alignas(64) std::atomic<int64_t> dealt{0};  // workers the current job was dealt to (its ranges)
  std::atomic<baton_share::ChunkFn> fn{nullptr};
  std::atomic<void*> context{nullptr};
  std::atomic<int64_t> workers{1};       // wanted: the caller plus workers - 1 helpers
  alignas(64) std::atomic<uint32_t> wake{0};  // futex: sleeping helpers
  std::atomic<int> sleepers{0};
  std::atomic<uint32_t> finished{0};     // futex: a sleeping caller
  std::atomic<int> caller_sleeps{0};
  std::atomic<bool> busy{false};         // a job is running
  std::atomic<int64_t> helper_chunks{0}, jobs{0}, chunks_total{0}, caller_slept{0}, helper_slept{0}, stalls{0};
  // Where the caller's time in a job goes: the whole job (deal to return), and the part spent waiting for chunks
  // a helper had taken (ns), with the jobs that waited at all.
  std::atomic<int64_t> job_ns{0}, wait_ns{0}, waits{0};
  std::chrono::steady_clock::time_point paused_until{};  // after a stall: jobs run inline until then (under `busy`)
  std::mutex start_lock;
  int64_t started = 0;                   // helper threads created (never stopped: surplus ones sleep)

  // One chunk for worker `me`: the front of its own range, else the back of another's; -1 when none is left.
  int64_t take(int64_t me) {
    const int64_t n = dealt.load(std::memory_order_acquire);
    if (me < n) {
      auto& own = ranges[me].word;
      for (uint64_t s = own.load(std::memory_order_acquire); front_of(s) < back_of(s);)
        if (own.compare_exchange_weak(s, s + (1ULL << 32), std::memory_order_acq_rel)) return front_of(s);
    }
    for (int64_t k = 1; k <= n; ++k) {
      auto& other = ranges[(me + k) % n].word;
      for (uint64_t s = other.load(std::memory_order_acquire); front_of(s) < back_of(s);)
        if (other.compare_exchange_weak(s, s - 1, std::memory_order_acq_rel)) return back_of(s) - 1;
    }
    return -1;
  }

  bool any_left() {
    const int64_t n = dealt.load(std::memory_order_seq_cst);
    for (int64_t w = 0; w < n; ++w) {
      const uint64_t s = ranges[w].word.load(std::memory_order_seq_cst);
      if (front_of(s) < back_of(s)) return true;
    }
    return false;
  }

  // A helper (worker index + 1): take chunks while there are any; spin a while, then sleep until the next job. A
  // surplus helper (the engine is between decode steps, or on fewer threads) takes nothing but spins out the same
  // while first, so the next step finds it awake.
  void helper(int64_t index) {
    const int64_t me = index + 1;
    auto idle_since = std::chrono::steady_clock::now();
    int spins = 0;
    for (;;) {
      if (me < workers.load(std::memory_order_relaxed)) {
        const int64_t chunk = take(me);
        if (chunk >= 0) {
          const baton_share::ChunkFn f = fn.load(std::memory_order_relaxed);  // the taken job's, read after
          f(context.load(std::memory_order_relaxed), chunk);
          helper_chunks.fetch_add(1, std::memory_order_relaxed);
          done.fetch_add(1, std::memory_order_seq_cst);
          if (caller_sleeps.load(std::memory_order_seq_cst) != 0) {
            finished.fetch_add(1, std::memory_order_seq_cst);
            futex(&finished, FUTEX_WAKE, 1, nullptr);
          }
          idle_since = std::chrono::steady_clock::now();
          spins = 0;
          continue;
        }
      }
      pause();
      if (++spins % 64 != 0 || std::chrono::steady_clock::now() - idle_since < kHelperSpin) continue;
      sleep_until_woken(me);
      idle_since = std::chrono::steady_clock::now();
      spins = 0;
    }
  }

  void sleep_until_woken(int64_t me) {
    const uint32_t seen = wake.load(std::memory_order_seq_cst);
    sleepers.fetch_add(1, std::memory_order_seq_cst);
    if (!any_left() || me >= workers.load(std::memory_order_seq_cst)) {
      const timespec limit{0, 200 * 1000 * 1000};  // a missed wake costs at most this (none should be missed)
      helper_slept.fetch_add(1);
      futex(&wake, FUTEX_WAIT, seen, &limit);
    }
    sleepers.fetch_sub(1, std::memory_order_seq_cst);
  }

  void start_helpers(int64_t wanted) {
    std::lock_guard<std::mutex> guard(start_lock);
    for (; started < wanted; ++started) {
      std::thread t([this, index = started] {
        // SCHED_IDLE: the helper runs only on CPU time nobody else wants, and Linux counts a CPU running only such
        // tasks as idle when it places a waking thread, so a Serve replica's proxy and ingress wake on the
        // helper's core instead of preempting the caller's (allowed unprivileged; where refused, the helper stays
        // at normal priority).
        sched_param none{0};
        pthread_setschedparam(pthread_self(), SCHED_IDLE, &none);
        helper(index);
      });
      pthread_setname_np(t.native_handle(), "baton-share");
      t.detach();
    }
  }

  void run(int64_t n, baton_share::ChunkFn f, void* c) {
    const int64_t want = std::min<int64_t>(workers.load(std::memory_order_relaxed), std::min<int64_t>(n, kMaxWorkers));
    if (want <= 1 || n > 0x7fffffff || busy.exchange(true, std::memory_order_acquire)) {
      for (int64_t i = 0; i < n; ++i) f(c, i);
      return;
    }
    if (std::chrono::steady_clock::now() < paused_until) {  // (under `busy`)
      for (int64_t i = 0; i < n; ++i) f(c, i);
      busy.store(false, std::memory_order_release);
      return;
    }
    if (started < want - 1) start_helpers(want - 1);
    const auto t0 = std::chrono::steady_clock::now();
    const int64_t before = dealt.load(std::memory_order_relaxed);
    for (int64_t w = 0; w < before; ++w) ranges[w].word.store(0, std::memory_order_seq_cst);  // closed
    fn.store(f, std::memory_order_relaxed);
    context.store(c, std::memory_order_relaxed);
    done.store(0, std::memory_order_relaxed);
    for (int64_t w = 0; w < want; ++w)  // equal contiguous ranges, the caller's first
      ranges[w].word.store(range(n * w / want, n * (w + 1) / want), std::memory_order_seq_cst);
    dealt.store(want, std::memory_order_seq_cst);
    if (sleepers.load(std::memory_order_seq_cst) > 0) {
      wake.fetch_add(1, std::memory_order_seq_cst);
      futex(&wake, FUTEX_WAKE, INT_MAX, nullptr);
    }
    jobs.fetch_add(1, std::memory_order_relaxed);
    chunks_total.fetch_add(n, std::memory_order_relaxed);
    int64_t mine = 0;
    for (int64_t chunk = take(0); chunk >= 0; chunk = take(0)) {
      f(c, chunk);
      ++mine;
    }
    wait_for(n - mine);
    job_ns.fetch_add(std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0)
                         .count(), std::memory_order_relaxed);
    busy.store(false, std::memory_order_release);
  }

  // Until the helpers have finished `theirs` chunks: spin briefly (a chunk is microseconds), then sleep, which
  // leaves this core to a helper that was preempted in the middle of its chunk.
  void wait_for(int64_t theirs) {
    if (done.load(std::memory_order_acquire) == theirs) return;
    const auto t0 = std::chrono::steady_clock::now();
    waits.fetch_add(1, std::memory_order_relaxed);
    for (int spins = 1;; ++spins) {
      if (done.load(std::memory_order_acquire) == theirs) {
        waited(t0);
        return;
      }
      pause();
      if (spins % 64 == 0 && std::chrono::steady_clock::now() - t0 > kCallerSpin) break;
    }
    caller_sleeps.store(1, std::memory_order_seq_cst);
    caller_slept.fetch_add(1);
    for (;;) {
      const uint32_t seen = finished.load(std::memory_order_seq_cst);
      if (done.load(std::memory_order_seq_cst) == theirs) break;
      const timespec limit{0, 1000 * 1000};
      futex(&finished, FUTEX_WAIT, seen, &limit);
    }
    caller_sleeps.store(0, std::memory_order_seq_cst);
    const auto now = waited(t0);
    if (now - t0 > kStallLimit) {
      paused_until = now + kStallPause;
      stalls.fetch_add(1, std::memory_order_relaxed);
    }
  }

  std::chrono::steady_clock::time_point waited(std::chrono::steady_clock::time_point since) {
    const auto now = std::chrono::steady_clock::now();
    wait_ns.fetch_add(std::chrono::duration_cast<std::chrono::nanoseconds>(now - since).count(),
                      std::memory_order_relaxed);
    return now;
  }
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: detached helpers may still be asleep on it at exit
  return *p;
}

int64_t workers() { return pool().workers.load(std::memory_order_relaxed); }
void run(int64_t chunks, baton_share::ChunkFn fn, void* context) { pool().run(chunks, fn, context); }
const baton_share::Api kApi{baton_share::kVersion, &workers, &run};

// Counters since the process started: jobs on the pool, their chunks, chunks run by helpers, times the caller slept
// waiting for a helper, times a helper went to sleep, stalls (a wait past kStallLimit, then kStallPause alone), the
// caller's ns inside jobs, its ns waiting for helpers' chunks, and the jobs where it waited at all.
std::vector<int64_t> stats() {
  const Pool& p = pool();
  return {p.jobs.load(), p.chunks_total.load(), p.helper_chunks.load(), p.caller_slept.load(), p.helper_slept.load(),
          p.stalls.load(), p.job_ns.load(), p.wait_ns.load(), p.waits.load()};
}
int64_t api_address() { return static_cast<int64_t>(reinterpret_cast<intptr_t>(&kApi)); }

// The number of threads that run a job, the caller included (1: no helpers, the kernels use at::parallel_for).
int64_t set_workers(int64_t n) {
  TORCH_CHECK(n >= 1 && n <= kMaxWorkers, "set_workers: 1 to 64");
  pool().workers.store(n, std::memory_order_relaxed);
  return n;
}

}  // namespace

TORCH_LIBRARY(baton_share, m) {
  m.def("api() -> int", &api_address);
  m.def("set_workers(int n) -> int", &set_workers);
  m.def("workers() -> int", &workers);
  m.def("stats() -> int[]", &stats);
}
