// Attention of the decode batch on CPU: out[r, t, h, :] = softmax(scale * q[r, h, t, :] . k[r, g, j, :]) . v[r, g, j, :]
// over exactly the columns j that the mask lets query (r, t) see, in column order (g = h / (heads / kv_heads)).
//
// Why: SDPA's CPU flash kernel, given one query per row, spends ~10-22 ms of a 16-row decode step of the default
// model on 200-400 cached columns (benchmarks/NOTES.md), and reads every column of the window, the left padding
// of shorter rows included. This kernel reads only a row's real columns, once for all the query heads that share
// a key/value head, and splits the (row, key/value head) pairs over threads (work_share.h).
//
// Exactness: a query's result is computed from its own row's real columns only, in their order, with a fixed
// chain of operations: nothing depends on the other rows, on how much padding the window holds or on the thread
// split. So a row gets the same bits alone or in any batch, with or without an aligned window.
//   score_j = scale * dot(q, k_j)   (8 float lanes over head_dim in order, then a fixed pairwise sum; four columns
//                                    share the vector work, not their sums)
//   p_j     = exp(score_j - max)    (one polynomial, below, 8 columns at a time)
//   out     = (sum_j p_j * v_j) / (sum_j p_j)   (sums in column order; the denominator in 8 lanes)
// Written with AVX2/FMA intrinsics (session 12: 2-3x faster than the loops the compiler vectorized before). Keys and
// values are converted to float in registers as they are read, each once for all the query heads of a key/value
// head (session 13: 1.5-1.9x faster again, the same bits: every element's chain of operations is unchanged).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include "work_share.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// 8 float lanes of E at p (bfloat16: the bits shifted into the high half, exactly as a conversion does).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// The sums of four 8-lane accumulators, each ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)): the lanes move,
// each sum's own order does not depend on the other three.
inline __m128 sum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

inline float sum8(__m256 a) {  // the same tree for one accumulator
  alignas(32) float l[8];
  _mm256_store_ps(l, a);
  return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

// exp(x) for x <= 0 (a score minus the maximum), 8 at a time: Cody-Waite reduction and a degree-6 polynomial (Cephes'
// expf coefficients), scaled by 2^n through the exponent bits.
inline __m256 exp8_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}

template <typename E>
inline void prefetch_row(const E* p, int64_t n) {  // n elements, one prefetch per 64-byte line
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(E)); b += 64) _mm_prefetch(c + b, _MM_HINT_T0);
}

template <typename E>
inline void to_floats(const E* src, float* dst, int64_t n) {  // n % 8 == 0
  for (int64_t d = 0; d < n; d += 8) _mm256_storeu_ps(dst + d, load8(src + d));
}

// scale * dot(q_h, k_j) for P query heads (q: P rows of D floats) and four keys, into out[h * stride + j]: each
// key vector is loaded and converted once for the P heads; each dot product is 8 lanes over head_dim in order, then
// sum4.
template <typename E, int P>
inline void dots(const float* q, const E* k0, const E* k1, const E* k2, const E* k3, int64_t D, __m128 sc,
                 float* out, int64_t stride) {
  __m256 a[P][4];
  for (int h = 0; h < P; ++h) a[h][0] = a[h][1] = a[h][2] = a[h][3] = _mm256_setzero_ps();
  for (int64_t c = 0; c < D; c += 8) {
    const __m256 x0 = load8(k0 + c), x1 = load8(k1 + c), x2 = load8(k2 + c), x3 = load8(k3 + c);
    for (int h = 0; h < P; ++h) {
      const __m256 qv = _mm256_loadu_ps(q + h * D + c);
      a[h][0] = _mm256_fmadd_ps(qv, x0, a[h][0]);
      a[h][1] = _mm256_fmadd_ps(qv, x1, a[h][1]);
      a[h][2] = _mm256_fmadd_ps(qv, x2, a[h][2]);
      a[h][3] = _mm256_fmadd_ps(qv, x3, a[h][3]);
    }
  }
  for (int h = 0; h < P; ++h) _mm_storeu_ps(out + h * stride, _mm_mul_ps(sc, sum4(a[h][0], a[h][1], a[h][2], a[h][3])));
}

// acc[h, :] = sum_j p[h, j] * v_j over the n columns in order, for P query heads at once (p: P score rows, `stride`
// apart): per 16 dimensions, each column's values are loaded and converted once and feed 2 x P accumulators.
template <typename E, int P>
inline void values(const float* p, int64_t stride, const E* vr, int64_t vstride, const int32_t* cols, int64_t n,
                   int64_t D, float* acc) {
  for (int64_t c0 = 0; c0 < D; c0 += 16) {
    __m256 b[P][2];
    for (int h = 0; h < P; ++h) b[h][0] = b[h][1] = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; ++i) {
      const E* v = vr + cols[i] * vstride + c0;
      const __m256 v0 = load8(v), v1 = load8(v + 8);
      for (int h = 0; h < P; ++h) {
        const __m256 pv = _mm256_set1_ps(p[h * stride + i]);
        b[h][0] = _mm256_fmadd_ps(pv, v0, b[h][0]);
        b[h][1] = _mm256_fmadd_ps(pv, v1, b[h][1]);
      }
    }
    for (int h = 0; h < P; ++h) {
      _mm256_storeu_ps(acc + h * D + c0, b[h][0]);
      _mm256_storeu_ps(acc + h * D + c0 + 8, b[h][1]);
    }
  }
}

template <typename E>
void attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask, double scale,
            at::Tensor& out) {
  // q [R, H, T, D]; k, v [R, G, W, D]; mask [R, T, W] (bool); out [R, T, H, D]; last dims contiguous.
  const int64_t R = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  const int64_t G = k.size(1), W = k.size(2), per = H / G;
  const int64_t Wp = (W + 7) / 8 * 8;  // a score row, padded to whole vectors
  const E* qp = q.data_ptr<E>();
  const E* kp = k.data_ptr<E>();
  const E* vp = v.data_ptr<E>();
  const bool* mp = mask.data_ptr<bool>();
  E* op = out.data_ptr<E>();
  const auto qs = q.strides(), ks = k.strides(), vs = v.strides(), ms = mask.strides(), os = out.strides();
  const __m128 sc = _mm_set1_ps(static_cast<float>(scale));
  baton_share::share_for(0, R * G, 1, [&](int64_t begin, int64_t end) {
    // Scratch, per thread and kept between calls (every element read below is written first in the same task).
    thread_local std::vector<int32_t> cols;
    thread_local std::vector<float> qf, scores, acc;
    thread_local std::vector<E> zeros;
    cols.resize(W); qf.resize(per * D); scores.resize(per * Wp); acc.resize(4 * D);
    if (static_cast<int64_t>(zeros.size()) < D) zeros.assign(D, E(0));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / G, g = task % G;
      const E* kr = kp + r * ks[0] + g * ks[1];  // this row's keys and values for key/value head g
      const E* vr = vp + r * vs[0] + g * vs[1];
      for (int64_t t = 0; t < T; ++t) {
        int64_t n = 0;
        const bool* mrow = mp + r * ms[0] + t * ms[1];
        for (int64_t j = 0; j < W; ++j)
          if (mrow[j * ms[2]]) cols[n++] = static_cast<int32_t>(j);
        for (int64_t j = 0; j < std::min<int64_t>(n, 8); ++j)
          prefetch_row(kr + cols[j] * ks[2], D);
        for (int64_t h = 0; h < per; ++h)
          to_floats(qp + r * qs[0] + (g * per + h) * qs[1] + t * qs[2], qf.data() + h * D, D);
        // scores, four columns at a time: score_j = scale * dot(q, k_j), 8 lanes over head_dim in order, then sum4
        for (int64_t i = 0; i < n; i += 4) {
          // Prefetch: the keys 8 columns on and the values of these columns (read after the softmax). A row's window
          // is cold in cache (the layer's weights passed through since) and the hardware's prefetch alone left this
          // loop waiting on memory (benchmarks/NOTES.md, session 12).
          for (int64_t j = 0; j < 4; ++j) {
            if (i + 8 + j < n) prefetch_row(kr + cols[i + 8 + j] * ks[2], D);
            if (i + j < n) prefetch_row(vr + cols[i + j] * vs[2], D);
          }
          // The four columns' keys, converted in registers as they are read (a missing fifth-to-eighth column of
          // the last group reads zeros).
          const E* k0 = kr + cols[i] * ks[2];
          const E* k1 = i + 1 < n ? kr + cols[i + 1] * ks[2] : zeros.data();
          const E* k2 = i + 2 < n ? kr + cols[i + 2] * ks[2] : zeros.data();
          const E* k3 = i + 3 < n ? kr + cols[i + 3] * ks[2] : zeros.data();
          for (int64_t h0 = 0; h0 < per; h0 += 3) {  // up to 3 heads per pass over the four keys
            float* out = scores.data() + h0 * Wp + i;
            const float* qh = qf.data() + h0 * D;
            switch (std::min<int64_t>(3, per - h0)) {
              case 3: dots<E, 3>(qh, k0, k1, k2, k3, D, sc, out, Wp); break;
              case 2: dots<E, 2>(qh, k0, k1, k2, k3, D, sc, out, Wp); break;
              default: dots<E, 1>(qh, k0, k1, k2, k3, D, sc, out, Wp); break;
            }
          }
        }
        // p_j = exp(score_j - max); the denominator in 8 lanes (column j in lane j % 8, in column order), then sum8
        float denom[64];  // per <= 64, checked by the caller
        const int64_t whole = n / 8 * 8;
        for (int64_t h = 0; h < per; ++h) {
          float* s = scores.data() + h * Wp;
          float top = -INFINITY;
          for (int64_t i = 0; i < n; ++i) top = s[i] > top ? s[i] : top;
          const __m256 tv = _mm256_set1_ps(top);
          __m256 lanes = _mm256_setzero_ps();
          for (int64_t i = 0; i < whole; i += 8) {
            const __m256 e = exp8_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + i), tv));
            _mm256_storeu_ps(s + i, e);
            lanes = _mm256_add_ps(lanes, e);
          }
          if (whole < n) {  // the last n % 8 columns, the rest of the vector zero
            alignas(32) float tail[8] = {};
            for (int64_t i = whole; i < n; ++i) tail[i - whole] = s[i];
            alignas(32) float e[8];
            _mm256_store_ps(e, exp8_nonpositive(_mm256_sub_ps(_mm256_load_ps(tail), tv)));
            for (int64_t i = n - whole; i < 8; ++i) e[i] = 0.0f;
            for (int64_t i = whole; i < n; ++i) s[i] = e[i - whole];
            lanes = _mm256_add_ps(lanes, _mm256_load_ps(e));
          }
          denom[h] = sum8(lanes);
        }
        // out = (sum_j p_j * v_j) / denominator, the sum in column order. Each column's values are read once per 16 dimensions, converted in registers, and used by every query
        // head of this key/value head (each output element still sums p_j * v_j over j in column order).
        for (int64_t h0 = 0; h0 < per; h0 += 4) {  // up to 4 heads per pass over the values
          const float* p = scores.data() + h0 * Wp;
          switch (std::min<int64_t>(4, per - h0)) {
            case 4: values<E, 4>(p, Wp, vr, vs[2], cols.data(), n, D, acc.data()); break;
            case 3: values<E, 3>(p, Wp, vr, vs[2], cols.data(), n, D, acc.data()); break;
            case 2: values<E, 2>(p, Wp, vr, vs[2], cols.data(), n, D, acc.data()); break;
            default: values<E, 1>(p, Wp, vr, vs[2], cols.data(), n, D, acc.data()); break;
          }
          for (int64_t h = h0; h < std::min<int64_t>(per, h0 + 4); ++h) {
            E* o = op + r * os[0] + t * os[1] + (g * per + h) * os[2];
            const float inv = n > 0 ? 1.0f / denom[h] : 0.0f;
            const float* a = acc.data() + (h - h0) * D;
            for (int64_t d = 0; d < D; ++d) o[d] = static_cast<E>(a[d] * inv);
          }
        }
      }
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                            double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && mask.dim() == 3, "q, k, v [R, *, *, D], mask [R, T, W]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "q, k, v: one dtype");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "mask: bool");
  const int64_t R = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), G = k.size(1), W = k.size(2);
  TORCH_CHECK(k.size(0) == R && v.size(0) == R && mask.size(0) == R, "one row count");
  TORCH_CHECK(v.size(1) == G && v.size(2) == W && k.size(3) == D && v.size(3) == D, "k and v: one shape");
  TORCH_CHECK(mask.size(1) == T && mask.size(2) == W, "mask [R, T, W]");
  TORCH_CHECK(G > 0 && H % G == 0 && H / G <= 64, "heads a multiple of kv heads, at most 64 per kv head");
  TORCH_CHECK(D % 16 == 0, "head_dim a multiple of 16");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "head_dim contiguous");
  auto out = at::empty({R, T, H, D}, q.options());
  if (q.scalar_type() == at::kBFloat16) {
    attend<at::BFloat16>(q, k, v, mask, scale, out);
  } else {
    TORCH_CHECK(q.scalar_type() == at::kFloat, "float32 or bfloat16");
    attend<float>(q, k, v, mask, scale, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(baton_attention, m) { m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor"); }
TORCH_LIBRARY_IMPL(baton_attention, CPU, m) { m.impl("decode_attention", &decode_attention); }
