// y[n, out] = x[n, in] . w[out, in]^T for a decode batch's rows, bfloat16 or float32, on CPUs with AVX512-BF16.
//
// Why: a decode step streams every weight once, so with few rows it is bound by memory bandwidth. On the
// 2-core Xeon this project measures on (AVX512-BF16, AMX), F.linear in bfloat16 streams the model's layer
// weights at only ~7-8.5 GB/s for 1-16 rows, where the machine reads ~12-16 GB/s (benchmarks/NOTES.md). This
// kernel splits the weight's rows over torch's own OpenMP threads (at::parallel_for) and multiplies bfloat16
// pairs straight into float32 lanes (vdpbf16ps: 32 products per instruction, no conversion of the weight).
//
// Three paths, chosen by the weight given (its shape, or its packed copy), never by n:
// * AMX (CPUs with AMX-BF16, `in` a multiple of 32 and `out` of 16, every linear of the default model): the
//   tile product C[16 outputs, 16 rows] += W[16 outputs, 32 k] . X[32 k, 16 rows], the rows of x packed in
//   pairs of k and zero-padded to 16. Each element of C is its own chain of pair products over k in order; the
//   hardware never mixes columns, so a row's bits do not depend on the other rows (or on the zero padding).
// * vdpbf16ps otherwise: 16 float lanes, each taking the pairs k = 32j + 2i, 32j + 2i + 1 for j = 0, 1, ... in
//   order (the in % 32 tail as a zero-padded last chunk), then the 16 lanes summed by one fixed reduction.
// * packed (bfloat16 or float32, `out` a multiple of 16, bfloat16 `in` even; the weight given as `pack_lanes`' copy,
//   below): 16 outputs per vector, each lane one output's chain of products over k in order, x's pair (or value)
//   broadcast: no horizontal sum. For prompts (many rows, compute-bound) bfloat16 runs 1.3x the vdpbf16ps path at
//   40 rows and 1.55x at 136 on the default model's layers. On the Zen 5 a decode batch gained nothing from it
//   (session 15); on the Zen 4 (double-pumped 512-bit units, where the per-output horizontal sums of the path above
//   cost more) the decode step ran 1.08-1.45x faster through it, so the engine gives the decode batch the same copies
//   where prompts take them (narrow_linear.lanes_decode_kernel; benchmarks/NOTES.md, session 18).
// Every way, every output element y[r, o] is one dot product of x[r, :] and w[o, :] in a fixed order, rounded
// once to bfloat16 (float32: stored as summed). Nothing in that order depends on n, on the other rows or on the thread split, so a row gets
// the same bits alone or beside any others: the decode batch's linears stay batch-invariant.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "work_share.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// ---- AMX ----
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tmm0/tmm3: C, 16 outputs x 16 rows of float32 (two groups of rows); tmm1: A, 16 weight rows x 32 bf16;
// tmm2/tmm4: B, 16 k-pairs x 16 rows x 2 bf16.
inline void load_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 5; ++t) { cfg.colsb[t] = 64; cfg.rows[t] = 16; }
  _tile_loadconfig(&cfg);
}

// x [n, in] (n <= 16) as B tiles: for each k-pair p, 16 rows x (x[r, 2p], x[r, 2p + 1]); rows >= n are zero.
std::vector<uint16_t> pack_rows(const uint16_t* x, int64_t n, int64_t in) {
  std::vector<uint16_t> packed(static_cast<size_t>(in / 2) * 32, 0);
  for (int64_t p = 0; p < in / 2; ++p)
    for (int64_t r = 0; r < n; ++r) {
      packed[p * 32 + r * 2] = x[r * in + 2 * p];
      packed[p * 32 + r * 2 + 1] = x[r * in + 2 * p + 1];
    }
  return packed;
}

// 16 floats (64-byte aligned) rounded to bfloat16, to nearest even as Tensor.to does, stored at y.
inline void store_bf16_row(const float* v, uint16_t* y) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(v)));
}

// C [16 outputs, 16 rows] (stored at c) into y's rows at output o, in bfloat16: no float32 result tensor and no
// conversion pass after the product.
inline void store_rows(const float* c, int64_t rows, uint16_t* y, int64_t out, int64_t o) {
  alignas(64) float row[16];
  for (int64_t r = 0; r < rows; ++r) {
    for (int m = 0; m < 16; ++m) row[m] = c[m * 16 + r];
    store_bf16_row(row, y + r * out + o);
  }
}

// Weight rows [o0, o1) (multiples of 16) against one or two groups of up to 16 packed rows (rows0 of b0 at y,
// rows1 of b1 at y + 16 * out; b1 null when there is one): each weight tile is read once for both groups.
void amx_rows(const uint16_t* w, int64_t in, int64_t out, const uint16_t* b0, int64_t rows0, const uint16_t* b1,
              int64_t rows1, uint16_t* y, int64_t o0, int64_t o1) {
  alignas(64) float c[16 * 16];
  for (int64_t o = o0; o < o1; o += 16) {
    _tile_zero(0);
    if (b1 != nullptr) {
      _tile_zero(3);
      for (int64_t k = 0; k < in; k += 32) {
        _tile_loadd(1, w + o * in + k, in * 2);
        _tile_loadd(2, b0 + (k / 2) * 32, 64);
        _tile_loadd(4, b1 + (k / 2) * 32, 64);
        _tile_dpbf16ps(0, 1, 2);
        _tile_dpbf16ps(3, 1, 4);
      }
      _tile_stored(3, c, 64);
      store_rows(c, rows1, y + 16 * out, out, o);
    } else {
      for (int64_t k = 0; k < in; k += 32) {
        _tile_loadd(1, w + o * in + k, in * 2);
        _tile_loadd(2, b0 + (k / 2) * 32, 64);
        _tile_dpbf16ps(0, 1, 2);
      }
    }
    _tile_stored(0, c, 64);
    store_rows(c, rows0, y, out, o);
  }
}

bool amx_fits(int64_t in, int64_t out) { return in % 32 == 0 && out % 16 == 0; }

at::Tensor amx_linear(const at::Tensor& x, const at::Tensor& w) {
  const int64_t n = x.size(0), in = x.size(1), out = w.size(0);
  at::Tensor y = at::empty({n, out}, x.options());
  const auto* X = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const auto* W = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  auto* Y = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  std::vector<std::vector<uint16_t>> groups;  // the rows in groups of 16
  for (int64_t r = 0; r < n; r += 16) groups.push_back(pack_rows(X + r * in, std::min<int64_t>(16, n - r), in));
  baton_share::share_for(0, out / 16, 8, [&](int64_t b0, int64_t b1) {
    load_tiles();
    for (size_t g = 0; g < groups.size(); g += 2) {  // rows 32 at a time
      const int64_t r = static_cast<int64_t>(g) * 16;
      const bool pair = g + 1 < groups.size();
      amx_rows(W, in, out, groups[g].data(), std::min<int64_t>(16, n - r), pair ? groups[g + 1].data() : nullptr,
               pair ? std::min<int64_t>(16, n - r - 16) : 0, Y + r * out, b0 * 16, b1 * 16);
    }
    _tile_release();
  });
  return y;
}

bool amx_ready = false;  // set by baton_avx512::enable_amx (the process has AMX permission from the OS)

// ---- AMX, many rows (prompts): x as the A tile, the weight pre-packed as B tiles ----
//
// For a prefill the rows are many, so the roles turn: 16 rows of x as they lie in memory are the A tile (16 rows
// x 32 k), the weight, packed once into pairs of k (`pack_weight`), the B tile (16 k-pairs x 16 outputs x 2), and
// C [16 rows, 16 outputs] is stored straight into y. Two row tiles and two weight tiles make four C tiles, so each
// tile load feeds one product. Each element of C is the same chain as in the few-rows path above, pair products
// over k in order with the two factors swapped (a product's factors commute exactly), so a row gets the same
// bits from either path, alone or among any others.

// w [out, in] as [out / 16, in / 32] tiles of 16 k-pairs x 16 outputs x 2 (out % 16 == 0, in % 32 == 0).
at::Tensor pack_weight(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.is_contiguous(), "pack_weight: bf16 [out, in]");
  const int64_t out = w.size(0), in = w.size(1);
  TORCH_CHECK(amx_fits(in, out), "pack_weight: in % 32 == 0 and out % 16 == 0");
  at::Tensor packed = at::empty({out / 16, in / 32, 16, 32}, w.options());
  const auto* W = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  auto* P = reinterpret_cast<uint16_t*>(packed.data_ptr<at::BFloat16>());
  at::parallel_for(0, out / 16, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t ob = b0; ob < b1; ++ob)
      for (int64_t kb = 0; kb < in / 32; ++kb) {
        uint16_t* tile = P + (ob * (in / 32) + kb) * 512;
        for (int64_t p = 0; p < 16; ++p)
          for (int64_t n = 0; n < 16; ++n) {
            tile[p * 32 + n * 2] = W[(ob * 16 + n) * in + kb * 32 + 2 * p];
            tile[p * 32 + n * 2 + 1] = W[(ob * 16 + n) * in + kb * 32 + 2 * p + 1];
          }
      }
  });
  return packed;
}

inline void load_wide_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) { cfg.colsb[t] = 64; cfg.rows[t] = 16; }
  _tile_loadconfig(&cfg);
}

// A C tile [16 rows, 16 outputs] (stored at c) into y at (r, o), in bfloat16.
inline void store_bf16(const float* c, uint16_t* y, int64_t out, int64_t r, int64_t o) {
  for (int i = 0; i < 16; ++i) store_bf16_row(c + i * 16, y + (r + i) * out + o);
}

// Rows [r, r + 32) of x (32 rows present) against output blocks ob, ob + 1 (`two`: both, else ob alone).
template <bool two>
inline void wide_block(const uint16_t* X, int64_t in, const uint16_t* P, int64_t ob, uint16_t* Y, int64_t out,
                       int64_t r) {
  const int64_t kbs = in / 32;
  _tile_zero(0); _tile_zero(2);
  if (two) { _tile_zero(1); _tile_zero(3); }
  const uint16_t* b0 = P + ob * kbs * 512;
  const uint16_t* b1 = b0 + kbs * 512;
  for (int64_t kb = 0; kb < kbs; ++kb) {
    _tile_loadd(4, X + r * in + kb * 32, in * 2);
    _tile_loadd(5, X + (r + 16) * in + kb * 32, in * 2);
    _tile_loadd(6, b0 + kb * 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 5, 6);
    if (two) {
      _tile_loadd(7, b1 + kb * 512, 64);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  alignas(64) float c[16 * 16];
  _tile_stored(0, c, 64);
  store_bf16(c, Y, out, r, ob * 16);
  _tile_stored(2, c, 64);
  store_bf16(c, Y, out, r + 16, ob * 16);
  if (two) {
    _tile_stored(1, c, 64);
    store_bf16(c, Y, out, r, ob * 16 + 16);
    _tile_stored(3, c, 64);
    store_bf16(c, Y, out, r + 16, ob * 16 + 16);
  }
}

at::Tensor amx_linear_wide(const at::Tensor& x, const at::Tensor& packed) {
  const int64_t n = x.size(0), in = x.size(1), out = packed.size(0) * 16;
  const int64_t rows = (n + 31) / 32 * 32;  // x zero-padded to whole pairs of row tiles
  at::Tensor xs = x;
  if (rows != n) {
    xs = at::zeros({rows, in}, x.options());
    xs.narrow(0, 0, n).copy_(x);
  }
  at::Tensor y = at::empty({rows, out}, x.options());
  const auto* X = reinterpret_cast<const uint16_t*>(xs.data_ptr<at::BFloat16>());
  const auto* P = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
  auto* Y = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const int64_t obs = out / 16, pairs = (obs + 1) / 2;
  constexpr int64_t kChunk = 256;  // rows per pass over a thread's weight blocks (kept in cache meanwhile)
  baton_share::share_for(0, pairs, 1, [&](int64_t p0, int64_t p1) {
    load_wide_tiles();
    for (int64_t c = 0; c < rows; c += kChunk)
      for (int64_t r = c; r < std::min(rows, c + kChunk); r += 32)
        for (int64_t p = p0; p < p1; ++p) {
          if (2 * p + 1 < obs) wide_block<true>(X, in, P, 2 * p, Y, out, r);
          else wide_block<false>(X, in, P, 2 * p, Y, out, r);
        }
    _tile_release();
  });
  return rows == n ? y : y.narrow(0, 0, n);
}

// y = x . w^T through the packed weight, any number of rows (bfloat16, AMX only).
at::Tensor skinny_linear_packed(const at::Tensor& x, const at::Tensor& packed) {
  TORCH_CHECK(amx_ready, "skinny_linear_packed: AMX is not enabled");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "x: contiguous bf16 [n, in]");
  TORCH_CHECK(packed.dim() == 4 && packed.size(1) * 32 == x.size(1) && packed.size(2) == 16 && packed.size(3) == 32,
              "packed: pack_weight(w) of a weight [out, in]");
  return amx_linear_wide(x, packed);
}



// ---- vdpbf16ps (and float32 FMA) ----

// The two element types of the lanes path: a chunk of k per vector, a load, a zero-padded tail load, and the
// multiply-add into 16 float lanes (bfloat16: vdpbf16ps over pairs of k; float32: a fused multiply-add).
struct Bf16Lanes {
  using T = uint16_t;
  using V = __m512bh;
  static constexpr int64_t K = 32;
  static V load(const T* p) { return (V)_mm512_loadu_si512(p); }
  static V load_tail(const T* p, int64_t n) { return (V)_mm512_maskz_loadu_epi16((__mmask32)((1ULL << n) - 1), p); }
  static __m512 madd(__m512 acc, V x, V w) { return _mm512_dpbf16_ps(acc, x, w); }
};

struct F32Lanes {
  using T = float;
  using V = __m512;
  static constexpr int64_t K = 16;
  static V load(const T* p) { return _mm512_loadu_ps(p); }
  static V load_tail(const T* p, int64_t n) { return _mm512_maskz_loadu_ps((__mmask16)((1U << n) - 1), p); }
  static __m512 madd(__m512 acc, V x, V w) { return _mm512_fmadd_ps(x, w, acc); }
};

// J consecutive weight rows against R input rows: R x J accumulators; each weight load is used R times. The
// in % K tail is one more chunk, zero beyond `in`; then each accumulator's 16 lanes are summed.
// An output value as float32, or rounded to bfloat16 (to nearest even, as at::Tensor::to rounds; NaN stays NaN).
inline void store_out(float* y, float v) { *y = v; }
inline void store_out(uint16_t* y, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  *y = static_cast<uint16_t>(v != v ? 0xFFFFu : (bits + (((bits >> 16) & 1u) + 0x7FFFu)) >> 16);
}

// 16 values rounded as store_out rounds each.
inline void store_out16(uint16_t* y, __m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), _mm512_set1_epi32(0xFFFF), r);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), _mm512_cvtepi32_epi16(r));
}

template <class L, int R, int J, typename Out>
inline void block(const typename L::T* w, int64_t in, const typename L::T* x, int64_t x_stride, Out* y,
                  int64_t y_stride) {
  __m512 acc[R][J];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) acc[r][j] = _mm512_setzero_ps();
  const int64_t whole = in - in % L::K;
  for (int64_t k = 0; k < whole; k += L::K) {
    typename L::V wv[J];
    // The next J weight rows (the next block), 64 bytes per row per chunk: a weight is read from memory once per
    // step, and the hardware prefetcher alone left this loop waiting on it (benchmarks/NOTES.md, session 12).
    for (int j = 0; j < J; ++j) _mm_prefetch(reinterpret_cast<const char*>(w + (J + j) * in + k), _MM_HINT_T0);
    for (int j = 0; j < J; ++j) wv[j] = L::load(w + j * in + k);
    for (int r = 0; r < R; ++r) {
      const typename L::V xv = L::load(x + r * x_stride + k);
      for (int j = 0; j < J; ++j) acc[r][j] = L::madd(acc[r][j], xv, wv[j]);
    }
  }
  if (whole < in) {
    typename L::V wv[J];
    for (int j = 0; j < J; ++j) wv[j] = L::load_tail(w + j * in + whole, in - whole);
    for (int r = 0; r < R; ++r) {
      const typename L::V xv = L::load_tail(x + r * x_stride + whole, in - whole);
      for (int j = 0; j < J; ++j) acc[r][j] = L::madd(acc[r][j], xv, wv[j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) store_out(y + r * y_stride + j, _mm512_reduce_add_ps(acc[r][j]));
}

// Every input row against J weight rows starting at w, in groups of 4 rows (then the n % 4 rest).
template <class L, int J, typename Out>
inline void rows(const typename L::T* w, int64_t in, const typename L::T* x, int64_t n, Out* y, int64_t out) {
  int64_t r = 0;
  for (; r + 4 <= n; r += 4) block<L, 4, J>(w, in, x + r * in, in, y + r * out, out);
  switch (n - r) {
    case 3: block<L, 3, J>(w, in, x + r * in, in, y + r * out, out); break;
    case 2: block<L, 2, J>(w, in, x + r * in, in, y + r * out, out); break;
    case 1: block<L, 1, J>(w, in, x + r * in, in, y + r * out, out); break;
    default: break;
  }
}

// All rows of x against every weight row; threads split the weight's rows (blocks of 4), so each weight byte
// is read once per call, by one thread.
template <class L, typename Out>
void lanes_linear(const typename L::T* X, const typename L::T* W, Out* Y, int64_t n, int64_t in, int64_t out) {
  const int64_t blocks = out / 4;
  const int64_t smallest = baton_share::smallest_chunk(4 * in * n);  // a block: 4 weight rows x n rows
  baton_share::share_for(0, blocks + (out % 4 ? 1 : 0), 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o = b * 4;
      if (b == blocks) {  // the last out % 4 weight rows, one at a time
        for (int64_t oo = o; oo < out; ++oo) rows<L, 1>(W + oo * in, in, X, n, Y + oo, out);
        continue;
      }
      rows<L, 4>(W + o * in, in, X, n, Y + o, out);
    }
  }, smallest);
}

// ---- The weight packed for 16 outputs per vector (pack_lanes) ----
// bfloat16: packed[g, i, l, e] = w[16 g + l, 2 i + e], per group of 16 outputs and pair of inputs the 16 outputs'
// pairs side by side, so one vdpbf16ps adds x's broadcast pair times each output's pair into that output's own lane;
// float32: packed[g, k, l, 0] = w[16 g + l, k], one FMA per input. A lane's chain runs over the inputs in order and
// is stored once (bfloat16: rounded to nearest even): y[r, o] depends on x's row r and w's row o only.
struct Bf16Packed {  // a step: one pair of inputs
  using T = uint16_t;
  using W = __m512bh;
  static constexpr int64_t per_step = 2;
  static W load(const T* p) { return (W)_mm512_loadu_si512(p); }
  static W broadcast(const T* x) {
    int32_t pair;
    std::memcpy(&pair, x, sizeof pair);
    return (W)_mm512_set1_epi32(pair);
  }
  static __m512 madd(__m512 acc, W x, W w) { return _mm512_dpbf16_ps(acc, x, w); }
  static void store(T* y, __m512 v) { store_out16(y, v); }
};

struct F32Packed {  // a step: one input
  using T = float;
  using W = __m512;
  static constexpr int64_t per_step = 1;
  static W load(const T* p) { return _mm512_loadu_ps(p); }
  static W broadcast(const T* x) { return _mm512_set1_ps(*x); }
  static __m512 madd(__m512 acc, W x, W w) { return _mm512_fmadd_ps(x, w, acc); }
  static void store(T* y, __m512 v) { _mm512_storeu_ps(y, v); }
};

constexpr int64_t kLanesJ = 4;  // output groups per block: 4 x 4 accumulators, 4 weight vectors, 1 broadcast
constexpr int64_t kAhead = 24;  // prefetch distance, in steps (64-byte lines) of each group

template <class P, int R, int J>
inline void lanes_block(const typename P::T* W, int64_t steps, const typename P::T* x, int64_t in, typename P::T* y,
                        int64_t out, bool prefetch) {
  // prefetch: each group's line kAhead steps on (the first rows of a block read its weights from memory; the rest
  // find them in cache).
  constexpr int64_t line = 64 / sizeof(typename P::T);  // elements of one step of one group
  __m512 acc[R][J];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t i = 0; i < steps; ++i) {
    typename P::W wv[J];
    if (prefetch)
      for (int j = 0; j < J; ++j) _mm_prefetch(reinterpret_cast<const char*>(W + (j * steps + i + kAhead) * line), _MM_HINT_T0);
    for (int j = 0; j < J; ++j) wv[j] = P::load(W + (j * steps + i) * line);
    for (int r = 0; r < R; ++r) {
      const typename P::W xb = P::broadcast(x + r * in + P::per_step * i);
      for (int j = 0; j < J; ++j) acc[r][j] = P::madd(acc[r][j], xb, wv[j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) P::store(y + r * out + j * 16, acc[r][j]);
}

// Every row of x against J output groups starting at W (4 rows at a time, then the n % 4 rest).
template <class P, int J>
inline void lanes_rows(const typename P::T* W, int64_t steps, const typename P::T* x, int64_t n, int64_t in,
                       typename P::T* y, int64_t out) {
  int64_t r = 0;
  for (; r + 4 <= n; r += 4) lanes_block<P, 4, J>(W, steps, x + r * in, in, y + r * out, out, r == 0);
  switch (n - r) {
    case 3: lanes_block<P, 3, J>(W, steps, x + r * in, in, y + r * out, out, r == 0); break;
    case 2: lanes_block<P, 2, J>(W, steps, x + r * in, in, y + r * out, out, r == 0); break;
    case 1: lanes_block<P, 1, J>(W, steps, x + r * in, in, y + r * out, out, r == 0); break;
    default: break;
  }
}

template <class P>
void packed_lanes(const typename P::T* X, const typename P::T* W, typename P::T* Y, int64_t n, int64_t in,
                  int64_t groups) {
  const int64_t out = groups * 16, steps = in / P::per_step, group_size = steps * 64 / sizeof(typename P::T);
  const int64_t blocks = (groups + kLanesJ - 1) / kLanesJ;
  const int64_t smallest = baton_share::smallest_chunk(kLanesJ * 16 * in * n);  // a block: 64 outputs x n rows
  baton_share::share_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t g = b * kLanesJ, j = std::min(kLanesJ, groups - g);
      const typename P::T* w = W + g * group_size;
      typename P::T* yb = Y + g * 16;
      switch (j) {
        case 4: lanes_rows<P, 4>(w, steps, X, n, in, yb, out); break;
        case 3: lanes_rows<P, 3>(w, steps, X, n, in, yb, out); break;
        case 2: lanes_rows<P, 2>(w, steps, X, n, in, yb, out); break;
        default: lanes_rows<P, 1>(w, steps, X, n, in, yb, out); break;
      }
    }
  }, smallest);
}

at::Tensor packed_lanes_linear(const at::Tensor& x, const at::Tensor& packed) {
  TORCH_CHECK(x.scalar_type() == packed.scalar_type(), "x and the packed weight: one dtype");
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == 16 && packed.is_contiguous(), "a pack_lanes weight");
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || x.scalar_type() == at::kFloat, "packed: bfloat16 or float32");
  TORCH_CHECK(packed.size(3) == (bf16 ? 2 : 1), "a pack_lanes weight of this dtype");
  const int64_t n = x.size(0), in = x.size(1), groups = packed.size(0);
  TORCH_CHECK(in == packed.size(1) * packed.size(3), "x [n, in] and a packed weight of `in` inputs");
  at::Tensor y = at::empty({n, groups * 16}, x.options());
  if (bf16)
    packed_lanes<Bf16Packed>(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()),
                             reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>()),
                             reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()), n, in, groups);
  else
    packed_lanes<F32Packed>(x.data_ptr<float>(), packed.data_ptr<float>(), y.data_ptr<float>(), n, in, groups);
  return y;
}

}  // namespace

// The weight in packed_lanes_linear's layout: bfloat16 [out, in] (out % 16 == 0, in even) as [out / 16, in / 2, 16,
// 2]; float32 [out, in] (out % 16 == 0) as [out / 16, in, 16, 1].
at::Tensor pack_lanes(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "pack_lanes: [out, in], contiguous");
  const bool bf16 = w.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || w.scalar_type() == at::kFloat, "pack_lanes: bfloat16 or float32");
  const int64_t out = w.size(0), in = w.size(1), per = bf16 ? 2 : 1;
  TORCH_CHECK(out % 16 == 0 && in % per == 0, "pack_lanes: out a multiple of 16 (bfloat16: in even)");
  at::Tensor packed = at::empty({out / 16, in / per, 16, per}, w.options());
  // Move 32-bit units: a bfloat16 pair, or a float.
  const auto* W = reinterpret_cast<const uint32_t*>(w.data_ptr());
  auto* P = reinterpret_cast<uint32_t*>(packed.data_ptr());
  const int64_t steps = in / per;
  at::parallel_for(0, out / 16, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t i = 0; i < steps; ++i)
        for (int64_t l = 0; l < 16; ++l) P[(g * steps + i) * 16 + l] = W[(g * 16 + l) * steps + i];
  });
  return packed;
}

at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "skinny_linear (AVX-512): CPU tensors only");
  TORCH_CHECK(x.scalar_type() == w.scalar_type() &&
              (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              "skinny_linear (AVX-512): bfloat16 or float32, the same for x and w");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "skinny_linear (AVX-512): contiguous tensors only");
  if (w.dim() == 4) {  // a pack_lanes copy
    TORCH_CHECK(x.dim() == 2, "skinny_linear (AVX-512): x [n, in]");
    return packed_lanes_linear(x, w);
  }
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "skinny_linear (AVX-512): x [n, in] and w [out, in]");
  const int64_t n = x.size(0), in = x.size(1), out = w.size(0);
  if (x.scalar_type() == at::kFloat) {
    at::Tensor y = at::empty({n, out}, x.options());
    lanes_linear<F32Lanes>(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), n, in, out);
    return y;
  }
  if (amx_ready && amx_fits(in, out)) return amx_linear(x, w);
  // Each output summed in float32 and rounded once to bfloat16 as it is stored (to nearest even, the bits
  // `.to(torch.bfloat16)` of the float32 sums gives).
  at::Tensor y = at::empty({n, out}, x.options());
  lanes_linear<Bf16Lanes>(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()),
               reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()),
               reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()), n, in, out);
  return y;
}

// Use the AMX path from now on (call once the process has AMX permission: torch's _init_amx). Returns its state.
bool enable_amx(bool on) { amx_ready = on; return amx_ready; }
bool amx_enabled() { return amx_ready; }

// Torch operators (torch.ops.baton_avx512.*), so the profiler and the dispatcher see them.
TORCH_LIBRARY(baton_avx512, m) {
  m.def("skinny_linear(Tensor x, Tensor w) -> Tensor");
  m.def("pack_weight(Tensor w) -> Tensor");
  m.def("pack_lanes(Tensor w) -> Tensor");
  m.def("skinny_linear_packed(Tensor x, Tensor packed) -> Tensor");
  m.def("enable_amx(bool on) -> bool", &enable_amx);
  m.def("amx_enabled() -> bool", &amx_enabled);
}
TORCH_LIBRARY_IMPL(baton_avx512, CPU, m) {
  m.impl("skinny_linear", &skinny_linear);
  m.impl("pack_weight", &pack_weight);
  m.impl("pack_lanes", &pack_lanes);
  m.impl("skinny_linear_packed", &skinny_linear_packed);
}
