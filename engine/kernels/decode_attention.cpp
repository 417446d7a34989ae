// Attention of the decode batch on CPU: out[r, t, h, :] = softmax(scale * q[r, h, t, :] . k[r, g, j, :]) . v[r, g, j, :]
// over exactly the columns j that the mask lets query (r, t) see, in column order (g = h / (heads / kv_heads)).
//
// Why: SDPA's CPU flash kernel, given one query per row, spends ~10-22 ms of a 16-row decode step of the default
// model on 200-400 cached columns (benchmarks/NOTES.md), and reads every column of the window, the left padding
// of shorter rows included. This kernel reads only a row's real columns, once for all the query heads that share
// a key/value head, and splits the (row, key/value head) pairs over torch's own OpenMP threads.
//
// Exactness: a query's result is computed from its own row's real columns only, in their order, with a fixed
// chain of operations: nothing depends on the other rows, on how much padding the window holds or on the thread
// split. So a row gets the same bits alone or in any batch, with or without an aligned window.
//   score_j = scale * dot(q, k_j)   (16 float lanes over head_dim in order, then a fixed pairwise sum)
//   p_j     = exp(score_j - max)    (one polynomial, below)
//   out     = (sum_j p_j * v_j) / (sum_j p_j)   (sums in column order; the denominator in 16 lanes)
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int kLanes = 16;

inline float lanes_sum(const float* v) {  // fixed pairwise order
  float a[8];
  for (int i = 0; i < 8; ++i) a[i] = v[i] + v[i + 8];
  for (int i = 0; i < 4; ++i) a[i] = a[i] + a[i + 4];
  return (a[0] + a[2]) + (a[1] + a[3]);
}

inline float dot(const float* a, const float* b, int64_t n) {  // n % kLanes == 0
  float acc[kLanes] = {};
  for (int64_t c = 0; c < n; c += kLanes)
    for (int i = 0; i < kLanes; ++i) acc[i] += a[c + i] * b[c + i];
  return lanes_sum(acc);
}

// exp(x) for x <= 0 (a score minus the maximum): Cody-Waite reduction and a degree-6 polynomial (Cephes' expf
// coefficients), scaled by 2^n through the exponent bits. Branch-free, so the loop over columns vectorizes.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

template <typename T>
inline void load_row(const T* src, float* dst, int64_t n) {
  for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<float>(src[d]);
}

template <typename E>
void attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask, double scale,
            at::Tensor& out) {
  // q [R, H, T, D]; k, v [R, G, W, D]; mask [R, T, W] (bool); out [R, T, H, D]; last dims contiguous.
  const int64_t R = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  const int64_t G = k.size(1), W = k.size(2), per = H / G;
  const E* qp = q.data_ptr<E>();
  const E* kp = k.data_ptr<E>();
  const E* vp = v.data_ptr<E>();
  const bool* mp = mask.data_ptr<bool>();
  E* op = out.data_ptr<E>();
  const auto qs = q.strides(), ks = k.strides(), vs = v.strides(), ms = mask.strides(), os = out.strides();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, R * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> cols(W);
    std::vector<float> qf(per * D), kf(D), vf(D), acc(per * D), scores(per * W);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / G, g = task % G;
      for (int64_t t = 0; t < T; ++t) {
        int64_t n = 0;
        const bool* mrow = mp + r * ms[0] + t * ms[1];
        for (int64_t j = 0; j < W; ++j)
          if (mrow[j * ms[2]]) cols[n++] = static_cast<int32_t>(j);
        for (int64_t h = 0; h < per; ++h)
          load_row(qp + r * qs[0] + (g * per + h) * qs[1] + t * qs[2], qf.data() + h * D, D);
        for (int64_t i = 0; i < n; ++i) {
          load_row(kp + r * ks[0] + g * ks[1] + cols[i] * ks[2], kf.data(), D);
          for (int64_t h = 0; h < per; ++h) scores[h * W + i] = sc * dot(qf.data() + h * D, kf.data(), D);
        }
        std::fill(acc.begin(), acc.end(), 0.0f);
        float denom[64];  // per <= 64, checked by the caller
        for (int64_t h = 0; h < per; ++h) {
          float* s = scores.data() + h * W;
          float top = -INFINITY;
          for (int64_t i = 0; i < n; ++i) top = s[i] > top ? s[i] : top;
          for (int64_t i = 0; i < n; ++i) s[i] = exp_nonpositive(s[i] - top);
          float lanes[kLanes] = {};
          int64_t i = 0;
          for (; i + kLanes <= n; i += kLanes)
            for (int l = 0; l < kLanes; ++l) lanes[l] += s[i + l];
          for (int l = 0; i < n; ++i, ++l) lanes[l] += s[i];
          denom[h] = lanes_sum(lanes);
        }
        for (int64_t i = 0; i < n; ++i) {
          load_row(vp + r * vs[0] + g * vs[1] + cols[i] * vs[2], vf.data(), D);
          for (int64_t h = 0; h < per; ++h) {
            const float p = scores[h * W + i];
            float* a = acc.data() + h * D;
            for (int64_t d = 0; d < D; ++d) a[d] += p * vf[d];
          }
        }
        for (int64_t h = 0; h < per; ++h) {
          E* o = op + r * os[0] + t * os[1] + (g * per + h) * os[2];
          const float inv = n > 0 ? 1.0f / denom[h] : 0.0f;
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<E>(acc[h * D + d] * inv);
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
  TORCH_CHECK(D % kLanes == 0, "head_dim a multiple of 16");
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
