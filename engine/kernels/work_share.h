// The engine's kernels split their work through `baton_share::share_for` (work_share.cpp has the why and the
// pool). The pool is one per process, in its own extension (`baton_share`); a kernel finds it through the
// dispatcher (`baton_share::api`, the address of an `Api`), so every kernel library shares the same helper threads.
// Without that extension, or with one worker, `share_for` is `at::parallel_for` (torch's OpenMP threads).
//
// A chunk's function must compute the same bits whichever thread runs it: the engine's kernels give every output
// element to exactly one chunk, computed in a fixed order. If one throws, the rest of the job's chunks are skipped,
// the job still ends on every thread, and the first exception is rethrown to the caller.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>

namespace baton_share {

using ChunkFn = void (*)(void* context, int64_t chunk);

struct Api {
  int64_t version;                                          // kVersion
  int64_t (*workers)();                                     // threads that run a job, the caller included
  void (*run)(int64_t chunks, ChunkFn fn, void* context);  // fn(context, c) for every c in [0, chunks)
};
constexpr int64_t kVersion = 1;

// The pool's interface, or null where the baton_share extension is not loaded (then: at::parallel_for).
inline const Api* api() {
  static const Api* found = []() -> const Api* {
    auto schema = c10::Dispatcher::singleton().findSchema({"baton_share::api", ""});
    if (!schema.has_value()) return nullptr;
    const auto* a = reinterpret_cast<const Api*>(schema->typed<int64_t()>().call());
    return a != nullptr && a->version == kVersion ? a : nullptr;
  }();
  return found;
}

constexpr int64_t kChunksPerWorker = 32;

// The fewest units a chunk through the pool should hold when each unit is `work` multiply-adds: ~128K
// multiply-adds (~1 us), since a claim costs ~0.1 us.
inline int64_t smallest_chunk(int64_t work) {
  return std::max<int64_t>(1, (int64_t{1} << 17) / std::max<int64_t>(1, work));
}  // finer: less waiting for the last chunk; coarser: fewer claims

// f(b0, b1) over [begin, end), like at::parallel_for(begin, end, grain, f): through the pool where it has helpers
// (in about kChunksPerWorker chunks per worker, of at least `smallest` each), else through at::parallel_for.
template <class F>
void share_for(int64_t begin, int64_t end, int64_t grain, const F& f, int64_t smallest = 1) {
  const Api* pool = api();
  const int64_t workers = pool == nullptr ? 1 : pool->workers();
  if (workers <= 1 || end - begin <= std::max<int64_t>(smallest, 1)) {
    at::parallel_for(begin, end, grain, f);
    return;
  }
  const int64_t chunk = std::max<int64_t>({smallest, 1, (end - begin + workers * kChunksPerWorker - 1) /
                                                             (workers * kChunksPerWorker)});
  struct Context {
    const F* f;
    int64_t begin, end, grain;
    std::atomic<bool> failed{false};
    std::mutex lock;
    std::exception_ptr error;
  } context{&f, begin, end, chunk};
  pool->run((end - begin + chunk - 1) / chunk, [](void* p, int64_t index) {
    auto* c = static_cast<Context*>(p);
    if (c->failed.load(std::memory_order_relaxed)) return;
    try {
      const int64_t b0 = c->begin + index * c->grain;
      (*c->f)(b0, std::min(b0 + c->grain, c->end));
    } catch (...) {  // (a helper thread must not let it escape: that would end the process)
      std::lock_guard<std::mutex> guard(c->lock);
      if (!c->error) c->error = std::current_exception();
      c->failed.store(true, std::memory_order_relaxed);
    }
  }, &context);
  if (context.error) std::rethrow_exception(context.error);
}

}  // namespace baton_share
