// A Llama-family model's forward as two compiled operators, for the engine's two common passes: a decode step (one
// new token per row, `llama_decode`) and prompts computed from scratch (`llama_prefill`, one or several packed end to
// end). Each runs the same ATen operations, in the same order and on the same shapes, as transformers' eager
// LlamaForCausalLM forward runs for that pass in engine/model_runner.py (batch_forward; prefill / prefill_packed),
// with the engine's own linear and attention kernels where the Python path calls them; the decode step's norms,
// rotary, residual adds and cache writes run as fused loops that round exactly as those operations do (below). So
// logits and KV are the eager path's, bit for bit (tests/engine/test_captured.py); what goes is the Python around
// ~2,000 small operations per forward (module calls, argument parsing, the cache adapter), and the GIL while it
// runs: the replica's event loop runs meanwhile.
//
// Per layer, as LlamaDecoderLayer: h = x + o_proj(attention(rope(q_proj(n)), rope(k_proj(n)), v_proj(n))) with
// n = rms_norm(x); out = h + down_proj(silu(gate_proj(m)) * up_proj(m)) with m = rms_norm(h). A decode step writes
// the new key and value columns into the engine's cache buffers at column `end` and attends over the aligned window
// [start, end + 1); prompts attend causally to their own tokens through SDPA and return their KV.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>
#include <string>
#include <unordered_map>
#include <utility>

#include "work_share.h"

namespace {

using Linear2 = c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&)>;
using Attention = c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                      const at::Tensor&, double)>;

const Linear2* row_kernel(const std::string& name) {  // "" -> none (at::linear)
  static std::mutex lock;
  static std::unordered_map<std::string, Linear2> found;
  if (name.empty()) return nullptr;
  std::lock_guard<std::mutex> guard(lock);
  auto it = found.find(name);
  if (it == found.end())
    it = found.emplace(name, c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), "")
                                 .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>()).first;
  return &it->second;
}

const Attention& attention_kernel() {
  static const Attention op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("baton_attention::decode_attention", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
  return op;
}

// LlamaRMSNorm.forward
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  auto h = x.to(at::kFloat);
  auto variance = h.pow(2).mean(-1, /*keepdim=*/true);
  h = h * at::rsqrt(variance + eps);
  return weight * h.to(x.scalar_type());
}

// rotate_half, then apply_rotary_pos_emb for one tensor (cos/sin already unsqueezed)
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  auto x1 = x.slice(-1, 0, half);
  auto x2 = x.slice(-1, half);
  return (x * cos) + (at::cat({-x2, x1}, -1) * sin);
}

// engine/narrow_linear.py: x [B, T, in] -> [B, T, out]. Up to `few_max` rows through the row kernel (it takes x as
// [rows, in], contiguous; without one, F.linear), beyond through `many` with the weight's packed copy (amx_linear;
// with few_max 0, every row: lanes_prompt_kernel's copies).
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const Linear2* kernel,
                  int64_t few_max = std::numeric_limits<int64_t>::max(), const at::Tensor* packed = nullptr,
                  const Linear2* many = nullptr) {
  const int64_t rows = x.numel() / x.size(-1);
  const bool wide = rows > few_max && packed != nullptr && many != nullptr;
  if (kernel == nullptr && !wide) return at::linear(x, w);
  TORCH_CHECK(rows <= few_max || wide, "no packed weight for many rows");
  auto flat = x.reshape({rows, x.size(-1)}).contiguous();
  auto out = wide ? many->call(flat, *packed) : kernel->call(flat, w);
  return out.view({x.size(0), x.size(1), out.size(1)});  // (w may be a packed copy: its size(0) is not `out`)
}

// LlamaRotaryEmbedding.forward for positions [B, T]: cos and sin [B, 1, T, D] in `dtype`, unsqueezed for the heads.
std::pair<at::Tensor, at::Tensor> rotary_tables(const at::Tensor& positions, const at::Tensor& inv_freq,
                                                double rope_scaling, at::ScalarType dtype) {
  auto freqs = positions.unsqueeze(-1).to(at::kFloat) * inv_freq.to(at::kFloat);  // [B, T, D/2]
  auto emb = at::cat({freqs, freqs}, -1);
  return {(emb.cos() * rope_scaling).to(dtype).unsqueeze(1), (emb.sin() * rope_scaling).to(dtype).unsqueeze(1)};
}

// The second half of LlamaDecoderLayer: hidden + down_proj(silu(gate_proj(m)) * up_proj(m)), m = rms_norm(hidden).
template <typename Linear>
at::Tensor feed_forward(const at::Tensor& hidden, const at::Tensor& norm, double eps, const Linear& lin) {
  auto normed = rms_norm(hidden, norm, eps);
  auto gated = at::silu(lin(normed, 4)) * lin(normed, 5);
  return hidden + lin(gated, 6);
}

// A layer's 9 weights are (input norm, q, k, v, o, post-attention norm, gate, up, down): its linear i of 7.
inline const at::Tensor& linear_weight(const at::Tensor* w, int i) { return w[i < 4 ? i + 1 : i + 2]; }

// ---- The decode step's small operations, fused (llama_decode with `fused_lanes` > 0) ----
// A decode step's rows are few, so ATen's per-call cost, not arithmetic, is what RMSNorm, rotary, the residual adds
// and the cache writes cost: ~40 calls a layer. These loops do the same arithmetic as those calls, with the same
// rounding after every operation (bfloat16 values are widened to float, computed, and rounded to nearest even, as
// ATen's kernels do; this file is built with -ffp-contract=off so no product and sum fuse), in one pass per row.
// The one order-dependent step is RMSNorm's mean: it is summed in the order ATen's CPU sum kernel uses for a
// contiguous row with its vectors of `lanes` floats (SumKernel.cpp: vectorized_inner_sum over row_sum's 4
// interleaved accumulators and multi_row_sum's cascade). engine/captured.py finds that width (row_sum against
// at::sum) and checks the fused step against the ATen one on the real model before it uses it;
// tests/engine/test_captured.py compares both with the eager forward.

// Widening and rounding, written as integer arithmetic without branches so the loops below vectorize: the same
// bits as c10::BFloat16's conversions (round to nearest even; NaN -> 0x7FC0).
inline float widen(float v) { return v; }
inline float widen(c10::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}
template <typename T>
inline T narrow(float v);
template <>
inline float narrow<float>(float v) { return v; }
template <>
inline c10::BFloat16 narrow<c10::BFloat16>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  const uint32_t rounded = (bits + (((bits >> 16) & 1u) + 0x7FFFu)) >> 16;
  const bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
  return c10::BFloat16(static_cast<uint16_t>(nan ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}

constexpr int kMaxLanes = 16;

template <typename T>
inline T* data(const at::Tensor& t) { return static_cast<T*>(t.data_ptr()); }

// at::sum of a contiguous float row of n values, in the CPU kernel's order for Vectorized<float> of L lanes.
template <int L>
float aten_row_sum(const float* x, int64_t n) {
  const int64_t vecs = n / L, groups = vecs / 4;  // row_sum: the vectors as [groups, 4]
  const int64_t ceil_log2 = groups <= 2 ? 1 : 64 - __builtin_clzll(static_cast<uint64_t>(groups - 1));
  const int64_t level_power = std::max<int64_t>(4, ceil_log2 / 4), level_step = int64_t{1} << level_power;
  const int64_t level_mask = level_step - 1;
  float acc[4][4][L] = {};  // [level][interleaved accumulator][lane]
  auto add = [](float* dst, const float* src) {
    for (int l = 0; l < L; ++l) dst[l] += src[l];
  };
  auto group = [&](int64_t i) {
    for (int k = 0; k < 4; ++k) add(acc[0][k], x + (i * 4 + k) * L);
  };
  int64_t i = 0;
  while (i + level_step <= groups) {  // multi_row_sum's cascade
    for (int64_t j = 0; j < level_step; ++j, ++i) group(i);
    for (int j = 1; j < 4; ++j) {
      for (int k = 0; k < 4; ++k) {
        add(acc[j][k], acc[j - 1][k]);
        std::fill_n(acc[j - 1][k], L, 0.0f);
      }
      if ((i & (level_mask << (j * level_power))) != 0) break;
    }
  }
  for (; i < groups; ++i) group(i);
  for (int j = 1; j < 4; ++j)
    for (int k = 0; k < 4; ++k) add(acc[0][k], acc[j][k]);
  float* partial = acc[0][0];
  for (int64_t v = groups * 4; v < vecs; ++v) add(partial, x + v * L);  // row_sum's leftover vectors
  for (int k = 1; k < 4; ++k) add(partial, acc[0][k]);
  float total = 0.0f;
  for (int64_t t = vecs * L; t < n; ++t) total += x[t];  // vectorized_inner_sum: the scalar tail, then the lanes
  for (int l = 0; l < L; ++l) total += partial[l];
  return total;
}

float aten_row_sum(const float* x, int64_t n, int lanes) {
  return lanes == 16 ? aten_row_sum<16>(x, n) : lanes == 8 ? aten_row_sum<8>(x, n) : aten_row_sum<4>(x, n);
}

// hidden += delta (the residual, where delta is given); out = rms_norm(hidden) as LlamaRMSNorm computes it:
// h = float(x); h * rsqrt(mean(h.pow(2)) + eps), rounded to the dtype, times the weight. hidden, delta, out [rows, n].
template <typename T>
void add_rms_norm(T* hidden, const T* delta, const T* weight, T* out, int64_t rows, int64_t n, double eps,
                  int lanes) {
  std::vector<float> widened(n), squared(n);
  float* h = widened.data();
  float* squares = squared.data();
  const float eps_f = static_cast<float>(eps);
  for (int64_t r = 0; r < rows; ++r) {
    T* x = hidden + r * n;
    if (delta != nullptr) {
      const T* d = delta + r * n;
      for (int64_t i = 0; i < n; ++i) {
        const T sum = narrow<T>(widen(x[i]) + widen(d[i]));
        x[i] = sum;
        h[i] = widen(sum);
      }
    } else {
      for (int64_t i = 0; i < n; ++i) h[i] = widen(x[i]);
    }
    for (int64_t i = 0; i < n; ++i) squares[i] = h[i] * h[i];
    const float variance = aten_row_sum(squares, n, lanes) / static_cast<float>(n);  // sum, then div_
    const float inverse = 1.0f / std::sqrt(variance + eps_f);
    T* y = out + r * n;
    for (int64_t i = 0; i < n; ++i) y[i] = narrow<T>(widen(weight[i]) * widen(narrow<T>(h[i] * inverse)));
  }
}

// rope() on heads of head_dim values: x * cos + cat(-x2, x1) * sin, each product and the sum rounded to the dtype.
// x: row r's heads at x + r * x_row; cos, sin [rows, head_dim]; out: row r, head h at out + r * out_row + h * out_head.
template <typename T>
void rotate(const T* x, int64_t x_row, const T* cos, const T* sin, T* out, int64_t out_row, int64_t out_head,
            int64_t rows, int64_t heads, int64_t head_dim) {
  const int64_t half = head_dim / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const T* c = cos + r * head_dim;
    const T* s = sin + r * head_dim;
    for (int64_t h = 0; h < heads; ++h) {
      const T* in = x + r * x_row + h * head_dim;
      T* y = out + r * out_row + h * out_head;
      for (int64_t d = 0; d < half; ++d) {  // rotated: -x2
        const float a = widen(narrow<T>(widen(in[d]) * widen(c[d])));
        const float b = widen(narrow<T>(widen(narrow<T>(-widen(in[d + half]))) * widen(s[d])));
        y[d] = narrow<T>(a + b);
      }
      for (int64_t d = half; d < head_dim; ++d) {  // rotated: x1
        const float a = widen(narrow<T>(widen(in[d]) * widen(c[d])));
        const float b = widen(narrow<T>(widen(in[d - half]) * widen(s[d])));
        y[d] = narrow<T>(a + b);
      }
    }
  }
}

// cache[row r, head g, one column] = x's head g of row r (the cache's strides for rows and heads).
template <typename T>
void write_column(const T* x, int64_t x_row, T* column, int64_t cache_row, int64_t cache_head, int64_t rows,
                  int64_t heads, int64_t head_dim) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < heads; ++g)
      std::copy_n(x + r * x_row + g * head_dim, head_dim, column + r * cache_row + g * cache_head);
}

// x [rows, in] (contiguous) -> [rows, out]: the row kernel, or F.linear without one.
inline at::Tensor rows_linear(const at::Tensor& x, const at::Tensor& w, const Linear2* kernel) {
  return kernel == nullptr ? at::linear(x, w) : kernel->call(x, w);
}

// llama_decode's layers with the fused operations above: per layer 7 linears, the attention kernel, silu and the
// gate product (ATen), and three fused passes. Returns the logits [rows, 1, vocab].
template <typename T>
at::Tensor fused_decode(at::Tensor hidden, const at::Tensor& cos_table, const at::Tensor& sin_table,
                        const at::Tensor& step_mask, const at::Tensor& keys, const at::Tensor& values, int64_t start,
                        int64_t end, at::TensorList layers, const at::Tensor& final_norm, const at::Tensor& lm_head,
                        double eps, double scale, int64_t heads, int64_t kv_heads, int64_t head_dim,
                        const Linear2* kernel, int lanes) {
  const auto& attend = attention_kernel();
  const int64_t rows = hidden.size(0), width = hidden.size(1), n_layers = keys.size(0);
  TORCH_CHECK(keys.stride(4) == 1 && values.stride(4) == 1 && keys.strides() == values.strides(),
              "cache columns of contiguous head_dim values");
  auto cos = cos_table.reshape({rows, head_dim}).contiguous();
  auto sin = sin_table.reshape({rows, head_dim}).contiguous();
  auto normed = at::empty_like(hidden);
  auto q_rotated = at::empty({rows, heads, 1, head_dim}, hidden.options());
  auto norm = [&](const at::Tensor* delta, const at::Tensor& weight) {
    add_rms_norm<T>(data<T>(hidden), delta == nullptr ? nullptr : data<T>(*delta), data<T>(weight),
                    data<T>(normed), rows, width, eps, lanes);
  };
  norm(nullptr, layers[0]);
  for (int64_t layer = 0; layer < n_layers; ++layer) {
    const at::Tensor* w = layers.data() + 9 * layer;
    auto lin = [&](const at::Tensor& x, int i) { return rows_linear(x, linear_weight(w, i), kernel); };
    auto q = lin(normed, 0), k = lin(normed, 1), v = lin(normed, 2);  // [R, H * D], [R, G * D] (contiguous)
    auto layer_keys = keys.select(0, layer), layer_values = values.select(0, layer);  // [rows, G, C, D]
    rotate<T>(data<T>(q), q.size(1), data<T>(cos), data<T>(sin), data<T>(q_rotated),
              heads * head_dim, head_dim, rows, heads, head_dim);
    T* key_column = data<T>(layer_keys) + end * keys.stride(3);
    rotate<T>(data<T>(k), k.size(1), data<T>(cos), data<T>(sin), key_column, keys.stride(1),
              keys.stride(2), rows, kv_heads, head_dim);
    write_column<T>(data<T>(v), v.size(1), data<T>(layer_values) + end * values.stride(3),
                    values.stride(1), values.stride(2), rows, kv_heads, head_dim);
    auto attn = attend.call(q_rotated, layer_keys.slice(0, 0, rows).slice(2, start, end + 1),
                            layer_values.slice(0, 0, rows).slice(2, start, end + 1), step_mask, scale);
    auto out = lin(attn.reshape({rows, -1}).contiguous(), 3);
    norm(&out, w[5]);
    auto gated = lin(normed, 4);
    at::silu_(gated);
    gated.mul_(lin(normed, 5));
    auto down = lin(gated, 6);
    norm(&down, layer + 1 < n_layers ? layers[9 * (layer + 1)] : final_norm);
  }
  auto logits = rows_linear(normed, lm_head, kernel);
  return logits.view({rows, 1, logits.size(1)});
}

at::Tensor llama_decode(const at::Tensor& input_ids, const at::Tensor& positions, const at::Tensor& mask,
                        const at::Tensor& keys, const at::Tensor& values, int64_t start, int64_t end,
                        const at::Tensor& embed, const at::Tensor& inv_freq, at::TensorList layers,
                        const at::Tensor& final_norm, const at::Tensor& lm_head, double eps, double scale,
                        double rope_scaling, int64_t heads, int64_t kv_heads, int64_t head_dim,
                        const std::string& linear_kernel, int64_t fused_lanes) {
  // input_ids, positions [R, 1]; mask [R, W] (the aligned window's, new column included, W = end + 1 - start);
  // keys/values [layers, row_capacity, kv_heads, col_capacity, head_dim]; layers: 9 weights per layer (input norm,
  // q, k, v, o, post-attention norm, gate, up, down). Returns the logits [R, 1, vocab] in the model's dtype.
  // fused_lanes: 0 runs the ATen operations below; 4, 8 or 16 runs fused_decode, whose RMSNorm sums in the order of
  // ATen's sum kernel with vectors of that many floats (the width ATen's float sum runs at here).
  TORCH_CHECK(input_ids.dim() == 2 && input_ids.size(1) == 1, "one new token per row");
  TORCH_CHECK(layers.size() % 9 == 0 && static_cast<int64_t>(layers.size() / 9) == keys.size(0), "9 weights a layer");
  TORCH_CHECK(end + 1 <= keys.size(3) && start >= 0 && mask.size(1) == end + 1 - start, "the window fits the cache");
  c10::AutoGradMode no_grad(false);
  const int64_t rows = input_ids.size(0);
  const Linear2* kernel = row_kernel(linear_kernel);
  const auto& attend = attention_kernel();

  TORCH_CHECK(fused_lanes == 0 || fused_lanes == 4 || fused_lanes == 8 || fused_lanes == kMaxLanes,
              "fused_lanes is 0, 4, 8 or 16");
  auto hidden = at::embedding(embed, input_ids);  // [R, 1, hidden]
  auto [cos, sin] = rotary_tables(positions, inv_freq, rope_scaling, hidden.scalar_type());  // [R, 1, 1, D]
  auto step_mask = mask.unsqueeze(1);  // [R, 1, W]
  if (fused_lanes > 0) {
    const int lanes = static_cast<int>(fused_lanes);
    auto flat = hidden.view({rows, -1});
    if (hidden.scalar_type() == at::kFloat)
      return fused_decode<float>(flat, cos, sin, step_mask, keys, values, start, end, layers, final_norm, lm_head,
                                 eps, scale, heads, kv_heads, head_dim, kernel, lanes);
    TORCH_CHECK(hidden.scalar_type() == at::kBFloat16, "float32 or bfloat16");
    return fused_decode<c10::BFloat16>(flat, cos, sin, step_mask, keys, values, start, end, layers, final_norm,
                                       lm_head, eps, scale, heads, kv_heads, head_dim, kernel, lanes);
  }

  for (int64_t layer = 0; layer < keys.size(0); ++layer) {
    const at::Tensor* w = layers.data() + 9 * layer;
    auto lin = [&](const at::Tensor& x, int i) { return linear(x, linear_weight(w, i), kernel); };
    auto normed = rms_norm(hidden, w[0], eps);
    auto q = lin(normed, 0).view({rows, 1, heads, head_dim}).transpose(1, 2);
    auto k = lin(normed, 1).view({rows, 1, kv_heads, head_dim}).transpose(1, 2);
    auto v = lin(normed, 2).view({rows, 1, kv_heads, head_dim}).transpose(1, 2);
    q = rope(q, cos, sin);
    k = rope(k, cos, sin);
    auto layer_keys = keys.select(0, layer).slice(0, 0, rows);  // [R, G, C, D]
    auto layer_values = values.select(0, layer).slice(0, 0, rows);
    layer_keys.slice(2, end, end + 1).copy_(k);
    layer_values.slice(2, end, end + 1).copy_(v);
    auto attn = attend.call(q, layer_keys.slice(2, start, end + 1), layer_values.slice(2, start, end + 1),
                            step_mask, scale);  // [R, 1, H, D]
    hidden = hidden + lin(attn.reshape({rows, 1, -1}).contiguous(), 3);
    hidden = feed_forward(hidden, w[5], eps, lin);
  }
  hidden = rms_norm(hidden, final_norm, eps);
  return linear(hidden, lm_head, kernel);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> llama_prefill(
    const at::Tensor& input_ids, const at::Tensor& positions, at::IntArrayRef lengths, const at::Tensor& embed,
    const at::Tensor& inv_freq, at::TensorList layers, at::TensorList packed, const at::Tensor& final_norm,
    const at::Tensor& lm_head, double eps, double scale, double rope_scaling, int64_t heads, int64_t kv_heads,
    int64_t head_dim, int64_t few_max, const std::string& few_kernel, const std::string& packed_kernel,
    const std::optional<at::Tensor>& lm_head_packed) {
  // Prompts computed from scratch, end to end in one forward (engine/model_runner.py: prefill_packed; one prompt:
  // prefill): input_ids, positions [1, N]; `lengths` the prompts' token counts; layers: 9 weights per layer as in
  // llama_decode; packed: the 7 linear weights' packed copies per layer (empty: F.linear). Each prompt attends
  // causally to its own tokens through the SDPA call transformers makes for a prompt alone. Returns keys and values
  // [layers, kv_heads, N, head_dim] (after rotary, as the cache keeps them) and each prompt's last logits [S, vocab].
  TORCH_CHECK(input_ids.dim() == 2 && input_ids.size(0) == 1, "one packed sequence");
  TORCH_CHECK(layers.size() % 9 == 0, "9 weights a layer");
  const int64_t n_layers = static_cast<int64_t>(layers.size() / 9), n = input_ids.size(1);
  TORCH_CHECK(packed.empty() || static_cast<int64_t>(packed.size()) == 7 * n_layers, "7 packed weights a layer");
  TORCH_CHECK((few_max == 0) == few_kernel.empty(), "a row kernel exactly where there is a few-rows path");
  int64_t total = 0;
  for (auto len : lengths) {
    TORCH_CHECK(len > 0, "empty prompt");
    total += len;
  }
  TORCH_CHECK(total == n, "lengths add up to the tokens");
  TORCH_CHECK(few_max == 0 || static_cast<int64_t>(lengths.size()) <= few_max, "at most few_max prompts");
  c10::AutoGradMode no_grad(false);
  const Linear2* few = row_kernel(few_kernel);
  const Linear2* many = row_kernel(packed_kernel);

  auto hidden = at::embedding(embed, input_ids);  // [1, N, hidden]
  auto [cos, sin] = rotary_tables(positions, inv_freq, rope_scaling, hidden.scalar_type());  // [1, 1, N, D]
  std::vector<at::Tensor> keys, values;
  for (int64_t layer = 0; layer < n_layers; ++layer) {
    const at::Tensor* w = layers.data() + 9 * layer;
    const at::Tensor* p = packed.empty() ? nullptr : packed.data() + 7 * layer;  // q k v o gate up down
    auto lin = [&](const at::Tensor& x, int i) {
      return linear(x, linear_weight(w, i), few, few_max, p == nullptr ? nullptr : p + i, many);
    };
    auto normed = rms_norm(hidden, w[0], eps);
    auto q = lin(normed, 0).view({1, n, -1, head_dim}).transpose(1, 2);  // [1, H, N, D]
    auto k = lin(normed, 1).view({1, n, -1, head_dim}).transpose(1, 2);  // [1, G, N, D]
    auto v = lin(normed, 2).view({1, n, -1, head_dim}).transpose(1, 2);
    q = rope(q, cos, sin);
    k = rope(k, cos, sin);
    keys.push_back(k);
    values.push_back(v);
    // transformers' sdpa_attention_forward for each prompt alone (no mask), one (prompt, query head) per task so the
    // tasks spread over threads (work_share.h); SDPA computes every head from its own rows alone, so a head's bits
    // are those of the call with all heads (tests/engine/test_captured.py checks against the eager forward).
    auto attn = at::empty({1, n, heads, head_dim}, q.options());  // [1, N, H, D]
    std::vector<int64_t> starts;
    int64_t start = 0;
    for (auto len : lengths) {
      starts.push_back(start);
      start += len;
    }
    const int64_t per = heads / kv_heads;
    baton_share::share_for(0, static_cast<int64_t>(lengths.size()) * heads, 1, [&](int64_t t0, int64_t t1) {
      c10::AutoGradMode task_no_grad(false);  // (grad mode is per thread)
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t i = task / heads, h = task % heads, g = h / per, b = starts[i], len = lengths[i];
        auto out = at::scaled_dot_product_attention(q.slice(1, h, h + 1).slice(2, b, b + len),
                                                    k.slice(1, g, g + 1).slice(2, b, b + len),
                                                    v.slice(1, g, g + 1).slice(2, b, b + len), std::nullopt, 0.0,
                                                    len > 1, scale);  // [1, 1, len, D]
        attn.slice(1, b, b + len).select(2, h).copy_(out.select(1, 0));
      }
    });
    hidden = hidden + lin(attn.reshape({1, n, -1}).contiguous(), 3);
    hidden = feed_forward(hidden, w[5], eps, lin);
  }
  hidden = rms_norm(hidden, final_norm, eps);
  std::vector<int64_t> last;
  int64_t end = 0;
  for (auto len : lengths) last.push_back((end += len) - 1);
  auto tail = hidden.index_select(1, at::tensor(last, input_ids.options()));  // [1, S, hidden]
  // The last positions' logits: through the few-rows kernel, or with the output embedding's packed copy (any rows).
  auto logits = lm_head_packed.has_value() ? linear(tail, lm_head, few, few_max, &*lm_head_packed, many)
                                           : linear(tail, lm_head, few, few_max);
  return {at::stack(keys).select(1, 0), at::stack(values).select(1, 0), logits.select(0, 0)};
}

// aten_row_sum over each row of x [rows, n] (float32, contiguous): engine/captured.py finds the lanes with which it
// equals at::sum here.
at::Tensor row_sum(const at::Tensor& x, int64_t lanes) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: float32 [rows, n], contiguous");
  TORCH_CHECK(lanes == 4 || lanes == 8 || lanes == kMaxLanes, "lanes is 4, 8 or 16");
  auto out = at::empty({x.size(0)}, x.options());
  for (int64_t r = 0; r < x.size(0); ++r)
    data<float>(out)[r] = aten_row_sum(data<float>(x) + r * x.size(1), x.size(1), static_cast<int>(lanes));
  return out;
}

// torch.argmax(x, dim=-1) of float32 rows [rows, V], contiguous: each row's first maximum (a NaN counts as the
// maximum: the row's first NaN), as ATen's reduction picks it, in two passes over the row (the maximum, then its
// first index) instead of ATen's value-and-index reduction: ~4x faster on a decode step's logits (16 x 49,152).
int64_t row_argmax(const float* x, int64_t n) {
  float top = -std::numeric_limits<float>::infinity();
  bool nan = false;
  int64_t i = 0;
#if defined(__SSE2__)
  __m128 m0 = _mm_set1_ps(top), m1 = m0, m2 = m0, m3 = m0, bad = _mm_setzero_ps();
  for (; i + 16 <= n; i += 16) {  // _mm_max_ps(v, m) keeps m where v is NaN; NaNs are flagged apart
    const __m128 v0 = _mm_loadu_ps(x + i), v1 = _mm_loadu_ps(x + i + 4), v2 = _mm_loadu_ps(x + i + 8),
                 v3 = _mm_loadu_ps(x + i + 12);
    m0 = _mm_max_ps(v0, m0);
    m1 = _mm_max_ps(v1, m1);
    m2 = _mm_max_ps(v2, m2);
    m3 = _mm_max_ps(v3, m3);
    bad = _mm_or_ps(bad, _mm_or_ps(_mm_or_ps(_mm_cmpunord_ps(v0, v0), _mm_cmpunord_ps(v1, v1)),
                                   _mm_or_ps(_mm_cmpunord_ps(v2, v2), _mm_cmpunord_ps(v3, v3))));
  }
  alignas(16) float lanes[16];
  _mm_store_ps(lanes, m0);
  _mm_store_ps(lanes + 4, m1);
  _mm_store_ps(lanes + 8, m2);
  _mm_store_ps(lanes + 12, m3);
  for (float v : lanes) top = v > top ? v : top;
  nan = _mm_movemask_ps(bad) != 0;
#endif
  for (; i < n; ++i) {
    nan = nan || x[i] != x[i];
    top = x[i] > top ? x[i] : top;
  }
  int64_t j = 0;
#if defined(__SSE2__)
  const __m128 want = _mm_set1_ps(top);
  for (; j + 4 <= n; j += 4) {  // the first lane equal to the maximum (or NaN), four at a time
    const __m128 v = _mm_loadu_ps(x + j);
    const int hit = _mm_movemask_ps(nan ? _mm_cmpunord_ps(v, v) : _mm_cmpeq_ps(v, want));
    if (hit != 0) return j + __builtin_ctz(static_cast<unsigned>(hit));
  }
#endif
  for (; j < n; ++j)
    if (nan ? x[j] != x[j] : x[j] == top) return j;
  return 0;  // (n == 0)
}

at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(1) > 0,
              "x: float32 [rows, V], contiguous, V > 0");
  auto out = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  for (int64_t r = 0; r < x.size(0); ++r) data<int64_t>(out)[r] = row_argmax(data<float>(x) + r * x.size(1), x.size(1));
  return out;
}

}  // namespace

TORCH_LIBRARY(baton_captured, m) {
  m.def("llama_decode(Tensor input_ids, Tensor positions, Tensor mask, Tensor(a!) keys, Tensor(b!) values, "
        "int start, int end, Tensor embed, Tensor inv_freq, Tensor[] layers, Tensor final_norm, Tensor lm_head, "
        "float eps, float scale, float rope_scaling, int heads, int kv_heads, int head_dim, str linear_kernel, "
        "int fused_lanes=0) -> Tensor");
  m.def("llama_prefill(Tensor input_ids, Tensor positions, int[] lengths, Tensor embed, Tensor inv_freq, "
        "Tensor[] layers, Tensor[] packed, Tensor final_norm, Tensor lm_head, float eps, float scale, "
        "float rope_scaling, int heads, int kv_heads, int head_dim, int few_max, str few_kernel, str packed_kernel, "
        "Tensor? lm_head_packed=None) -> (Tensor, Tensor, Tensor)");
  m.def("row_sum(Tensor x, int lanes) -> Tensor");
  m.def("argmax_rows(Tensor x) -> Tensor");
}
TORCH_LIBRARY_IMPL(baton_captured, CPU, m) {
  m.impl("row_sum", &row_sum);
  m.impl("argmax_rows", &argmax_rows);
  m.impl("llama_decode", &llama_decode);
  m.impl("llama_prefill", &llama_prefill);
}
