// y[n, out] = x[n, in] . w[out, in]^T for a few rows n (a decode batch), float32, on CPU (AVX2 + FMA).
//
// Why: a decode step streams every weight once, so with 1-16 rows it is bound by memory bandwidth, not
// arithmetic. On the 2-core AMD EPYC this project measures on, MKL's sgemv runs one thread at ~11 GB/s and its
// sgemm for 2-16 rows is slower still; this kernel splits the weight's rows over torch's own OpenMP threads
// (at::parallel_for) and streams them at ~20-24 GB/s (benchmarks/NOTES.md).
//
// Exactness: every output element y[r, o] is one dot product of x[r, :] and w[o, :] in a fixed order (8 float
// lanes accumulated along k, then summed pairwise across lanes, then the k % 8 tail in order), whatever n is,
// whichever other rows share the batch and however the work is split over threads. A row's result therefore
// never depends on its batch: bit-identical alone or beside 15 others.
//
// Prompt rows (many, compute-bound) take the weight as `pack_lanes` laid it out, 16 outputs per group, each output's
// chain in its own lane (see packed_linear): on CPUs without the AVX-512 kernel, float32 prompts then get bits that
// depend on neither their batch nor the thread count, so they can be packed into one forward and follow the thread
// tuner, as on AVX-512 CPUs (engine/narrow_linear.py: lanes_prompt_kernel).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>

#include "work_share.h"

namespace {

inline float lane_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));  // lanes i + (i+4)
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));                                          // + (i+2)
  s = _mm_add_ss(s, _mm_movehdup_ps(s));                                           // + (i+1)
  return _mm_cvtss_f32(s);
}

inline float tail(const float* w, const float* x, int64_t from, int64_t in) {
  float s = 0.f;
  for (int64_t k = from; k < in; ++k) s += w[k] * x[k];
  return s;
}

// The next block's four weight rows at k (a weight is read from memory once per step, and the hardware prefetcher
// alone left these loops waiting on it: benchmarks/NOTES.md, session 12). Every other k: one 64-byte line.
inline void prefetch_next(const float* w, int64_t in, int64_t k) {
  if (k % 16) return;
  for (int j = 4; j < 8; ++j) _mm_prefetch(reinterpret_cast<const char*>(w + j * in + k), _MM_HINT_T0);
}

// Four consecutive weight rows against two input rows: 8 accumulators, each weight load used twice.
inline void block4x2(const float* w, int64_t in, int64_t in8, const float* x0, const float* x1,
                     float* y0, float* y1) {
  const float *w0 = w, *w1 = w + in, *w2 = w + 2 * in, *w3 = w + 3 * in;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  for (int64_t k = 0; k < in8; k += 8) {
    prefetch_next(w, in, k);
    const __m256 v0 = _mm256_loadu_ps(w0 + k), v1 = _mm256_loadu_ps(w1 + k);
    const __m256 v2 = _mm256_loadu_ps(w2 + k), v3 = _mm256_loadu_ps(w3 + k);
    const __m256 p = _mm256_loadu_ps(x0 + k), q = _mm256_loadu_ps(x1 + k);
    a0 = _mm256_fmadd_ps(v0, p, a0); a1 = _mm256_fmadd_ps(v1, p, a1);
    a2 = _mm256_fmadd_ps(v2, p, a2); a3 = _mm256_fmadd_ps(v3, p, a3);
    b0 = _mm256_fmadd_ps(v0, q, b0); b1 = _mm256_fmadd_ps(v1, q, b1);
    b2 = _mm256_fmadd_ps(v2, q, b2); b3 = _mm256_fmadd_ps(v3, q, b3);
  }
  y0[0] = lane_sum(a0) + tail(w0, x0, in8, in); y0[1] = lane_sum(a1) + tail(w1, x0, in8, in);
  y0[2] = lane_sum(a2) + tail(w2, x0, in8, in); y0[3] = lane_sum(a3) + tail(w3, x0, in8, in);
  y1[0] = lane_sum(b0) + tail(w0, x1, in8, in); y1[1] = lane_sum(b1) + tail(w1, x1, in8, in);
  y1[2] = lane_sum(b2) + tail(w2, x1, in8, in); y1[3] = lane_sum(b3) + tail(w3, x1, in8, in);
}

// Four weight rows against one input row (an odd row count's last row), same order per element.
inline void block4x1(const float* w, int64_t in, int64_t in8, const float* x0, float* y0) {
  const float *w0 = w, *w1 = w + in, *w2 = w + 2 * in, *w3 = w + 3 * in;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t k = 0; k < in8; k += 8) {
    prefetch_next(w, in, k);
    const __m256 p = _mm256_loadu_ps(x0 + k);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + k), p, a0); a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + k), p, a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + k), p, a2); a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + k), p, a3);
  }
  y0[0] = lane_sum(a0) + tail(w0, x0, in8, in); y0[1] = lane_sum(a1) + tail(w1, x0, in8, in);
  y0[2] = lane_sum(a2) + tail(w2, x0, in8, in); y0[3] = lane_sum(a3) + tail(w3, x0, in8, in);
}

// One weight row against one input row (the last out % 4 weight rows), same order per element.
inline float dot1(const float* w, int64_t in, int64_t in8, const float* x0) {
  __m256 a0 = _mm256_setzero_ps();
  for (int64_t k = 0; k < in8; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x0 + k), a0);
  return lane_sum(a0) + tail(w, x0, in8, in);
}

// ---- Prompt rows: the weight packed for 16 outputs per group (pack_lanes) ----
// packed[g, k, l, 0] = w[16 g + l, k]: per input k, the 16 outputs of group g side by side (two vectors), so x's
// broadcast input times them adds into each output's own lane: no horizontal sum. A lane's chain is one fused
// multiply-add per input, in input order, from zero, stored as summed: y[r, o] depends on x's row r and w's row o
// only (not on n, the other rows or the thread split), and equals, bit for bit, the AVX-512 kernel's packed float32
// path (skinny_linear_avx512.cpp, F32Packed), which runs the same chain 16 lanes at a time.
constexpr int64_t kPackRows = 4;  // rows per block: 4 x 2 accumulators, 2 weight vectors, 1 broadcast. (6 rows, 15
// of the 16 registers, ran at 47 GFLOP/s a core against 73 for 4 on the AVX2-only EPYC: benchmarks/NOTES.md)
constexpr int64_t kPackAhead = 16;  // prefetch distance in inputs (a 64-byte line of a group per input)

template <int R>
inline void packed_block(const float* g, int64_t in, const float* x, float* y, int64_t out, bool prefetch) {
  __m256 lo[R], hi[R];
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < in; ++k) {
    if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(g + (k + kPackAhead) * 16), _MM_HINT_T0);
    const __m256 w0 = _mm256_loadu_ps(g + k * 16), w1 = _mm256_loadu_ps(g + k * 16 + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 xb = _mm256_broadcast_ss(x + r * in + k);
      lo[r] = _mm256_fmadd_ps(xb, w0, lo[r]);
      hi[r] = _mm256_fmadd_ps(xb, w1, hi[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(y + r * out, lo[r]);
    _mm256_storeu_ps(y + r * out + 8, hi[r]);
  }
}

// Every row of x against one group g (16 outputs at y), kPackRows rows at a time, then the rest.
static_assert(kPackRows == 4, "packed_group's switch takes the last 1-3 rows");
inline void packed_group(const float* g, int64_t in, const float* x, int64_t n, float* y, int64_t out) {
  int64_t r = 0;
  for (; r + kPackRows <= n; r += kPackRows) packed_block<kPackRows>(g, in, x + r * in, y + r * out, out, r == 0);
  const bool first = r == 0;
  switch (n - r) {
    case 3: packed_block<3>(g, in, x + r * in, y + r * out, out, first); break;
    case 2: packed_block<2>(g, in, x + r * in, y + r * out, out, first); break;
    case 1: packed_block<1>(g, in, x + r * in, y + r * out, out, first); break;
    default: break;
  }
}

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed) {
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 4 && packed.size(2) == 16 && packed.size(3) == 1 &&
              x.size(1) == packed.size(1), "skinny_linear: x [n, in] and a pack_lanes weight [out / 16, in, 16, 1]");
  const int64_t n = x.size(0), in = x.size(1), groups = packed.size(0), out = groups * 16;
  at::Tensor y = at::empty({n, out}, x.options());
  const float* X = x.data_ptr<float>();
  const float* P = packed.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  // Threads split the groups: each weight byte is read once per call, by one thread.
  const int64_t smallest = baton_share::smallest_chunk(16 * in * n);  // a group: 16 outputs x n rows
  baton_share::share_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) packed_group(P + g * in * 16, in, X, n, Y + g * 16, out);
  }, smallest);
  return y;
}

}  // namespace

// The weight in the packed path's layout: float32 [out, in] (out % 16 == 0) as [out / 16, in, 16, 1] (the layout
// of the AVX-512 kernel's pack_lanes for float32).
at::Tensor pack_lanes(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kFloat, "pack_lanes: float32 [out, in]");
  const int64_t out = w.size(0), in = w.size(1);
  TORCH_CHECK(out % 16 == 0, "pack_lanes: out a multiple of 16");
  at::Tensor packed = at::empty({out / 16, in, 16, 1}, w.options());
  const float* W = w.data_ptr<float>();
  float* P = packed.data_ptr<float>();
  at::parallel_for(0, out / 16, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t k = 0; k < in; ++k)
        for (int64_t l = 0; l < 16; ++l) P[(g * in + k) * 16 + l] = W[(g * 16 + l) * in + k];
  });
  return packed;
}

at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "skinny_linear: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "skinny_linear: float32 only");
  if (w.dim() == 4) {  // a pack_lanes copy: prompt rows
    TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "skinny_linear: contiguous tensors only");
    return packed_linear(x, w);
  }
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "skinny_linear: x [n, in] and w [out, in]");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "skinny_linear: contiguous tensors only");
  const int64_t n = x.size(0), in = x.size(1), out = w.size(0), in8 = in - in % 8;
  at::Tensor y = at::empty({n, out}, x.options());
  const float* X = x.data_ptr<float>();
  const float* W = w.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const int64_t blocks = out / 4;
  // Threads split the weight's rows (blocks of 4): each weight byte is read once per call, by one thread.
  const int64_t smallest = baton_share::smallest_chunk(4 * in * n);  // a block: 4 weight rows x n rows
  baton_share::share_for(0, blocks + (out % 4 ? 1 : 0), 16, [&](int64_t b0, int64_t b1) {
    float t0[4], t1[4];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o = b * 4;
      if (b == blocks) {  // the last out % 4 rows
        for (int64_t oo = o; oo < out; ++oo)
          for (int64_t r = 0; r < n; ++r) Y[r * out + oo] = dot1(W + oo * in, in, in8, X + r * in);
        continue;
      }
      const float* wb = W + o * in;
      int64_t r = 0;
      for (; r + 2 <= n; r += 2) {
        block4x2(wb, in, in8, X + r * in, X + (r + 1) * in, t0, t1);
        for (int j = 0; j < 4; ++j) { Y[r * out + o + j] = t0[j]; Y[(r + 1) * out + o + j] = t1[j]; }
      }
      if (r < n) {
        block4x1(wb, in, in8, X + r * in, t0);
        for (int j = 0; j < 4; ++j) Y[r * out + o + j] = t0[j];
      }
    }
  }, smallest);
  return y;
}

// Torch operators (torch.ops.baton.*), so the profiler and the dispatcher see them like any other.
TORCH_LIBRARY(baton, m) {
  m.def("skinny_linear(Tensor x, Tensor w) -> Tensor");
  m.def("pack_lanes(Tensor w) -> Tensor");
}
TORCH_LIBRARY_IMPL(baton, CPU, m) {
  m.impl("skinny_linear", &skinny_linear);
  m.impl("pack_lanes", &pack_lanes);
}
