// The small per-layer operations of a decoder step, each one pass over its rows, and
// decode attention read in place from the paged K/V cache.
//
// In plain PyTorch a decoder layer is some hundred tensor operations; at batch 1 each
// costs more in dispatch than in arithmetic. These fuse them: an RMSNorm with the
// residual add before it, SiLU(gate) * up, RoPE on q and k together with the write of
// the new K/V to their slots, and attention for one query token a sequence.
//
// Arithmetic is float32 and follows the PyTorch formulas the model's fallbacks use (RMSNorm
// as transformers: x * rsqrt(mean(x^2) + eps), then * weight; RoPE on the halves); only
// the order of sums differs. The cache may hold float32, float16 or bfloat16.

#include "ops.h"

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;

// 16 cached values as float32
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 load16(const at::BFloat16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

template <typename T>
inline float dot(const float* q, const T* k, int64_t D) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += kLanes) acc = _mm512_fmadd_ps(load16(q + d), load16(k + d), acc);
  return _mm512_reduce_add_ps(acc);
}

template <typename T>
inline void axpy(float p, const T* v, float* acc, int64_t D) {
  const __m512 vp = _mm512_set1_ps(p);
  for (int64_t d = 0; d < D; d += kLanes)
    _mm512_storeu_ps(acc + d, _mm512_fmadd_ps(vp, load16(v + d), _mm512_loadu_ps(acc + d)));
}

void check_rows(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.stride(1) == 1, name,
              " must be a float32 matrix with contiguous rows");
}

// rows per task: small inputs run on the calling thread (waking the pool costs more)
int64_t grain(int64_t row_floats) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_floats)); }

template <typename Cache>
void attend(const float* q, int64_t q_stride, const Cache* kc, const Cache* vc, int64_t kv_heads,
            int64_t blocks, int64_t block_size, int64_t D, const int64_t* tables, int64_t width,
            const int64_t* lens, int64_t B, int64_t H, float scale, int64_t window, float* out) {
  const int64_t group = H / kv_heads;
  at::parallel_for(0, B * kv_heads, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> scores, acc(group * D);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t b = w / kv_heads, h = w % kv_heads, len = lens[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0, n = len - first;
      const float* qb = q + b * q_stride + h * group * D;  // this KV head's query heads
      const Cache* kh = kc + h * blocks * block_size * D;
      const Cache* vh = vc + h * blocks * block_size * D;
      const int64_t* table = tables + b * width;
      scores.resize(group * n);
      std::vector<float> top(group, -std::numeric_limits<float>::infinity());
      for (int64_t t = first; t < len; ++t) {
        const Cache* k = kh + (table[t / block_size] * block_size + t % block_size) * D;
        for (int64_t g = 0; g < group; ++g) {
          const float s = dot(qb + g * D, k, D) * scale;
          scores[g * n + t - first] = s;
          top[g] = std::max(top[g], s);
        }
      }
      std::vector<float> total(group, 0.f);
      for (int64_t g = 0; g < group; ++g)
        for (int64_t i = 0; i < n; ++i) {
          const float p = std::exp(scores[g * n + i] - top[g]);
          scores[g * n + i] = p;
          total[g] += p;
        }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = first; t < len; ++t) {
        const Cache* v = vh + (table[t / block_size] * block_size + t % block_size) * D;
        for (int64_t g = 0; g < group; ++g) axpy(scores[g * n + t - first], v, acc.data() + g * D, D);
      }
      for (int64_t g = 0; g < group; ++g) {
        float* o = out + b * H * D + (h * group + g) * D;
        const float inv = 1.f / total[g];
        for (int64_t d = 0; d < D; ++d) o[d] = acc[g * D + d] * inv;
      }
    }
  });
}

// f(Cache{}) with the cache's element type: float32, float16 or bfloat16
template <typename F>
void with_cache_type(at::ScalarType type, F f) {
  switch (type) {
    case at::kFloat: return f(float{});
    case at::kHalf: return f(at::Half{});
    case at::kBFloat16: return f(at::BFloat16{});
    default: TORCH_CHECK(false, "caches must be float32, float16 or bfloat16, not ", type);
  }
}

template <typename Cache>
void store_row(Cache* dst, const float* src, int64_t D) {
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<Cache>(src[d]);
}

}  // namespace

// x [T, n] float32 -> x / rms(x) * weight. With `residual` [T, n]: residual += x first (in
// place) and the sum is normalized: one pass for "x = x + sublayer(x); norm(x)".
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps,
                       c10::optional<torch::Tensor> residual) {
  check_rows(x, "x");
  const int64_t T = x.size(0), n = x.size(1);
  TORCH_CHECK(weight.numel() == n && weight.is_contiguous() && weight.scalar_type() == torch::kFloat32,
              "weight must be float32 [", n, "]");
  float* r = nullptr;
  if (residual.has_value()) {
    check_rows(*residual, "residual");
    TORCH_CHECK(residual->size(0) == T && residual->size(1) == n, "residual must be [T, n]");
    r = residual->data_ptr<float>();
  }
  auto y = torch::empty({T, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t xs = x.stride(0), rs = r ? residual->stride(0) : 0;
  at::parallel_for(0, T, grain(n), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* src = xp + t * xs;
      if (r != nullptr) {
        float* rt = r + t * rs;
        for (int64_t i = 0; i < n; ++i) rt[i] += src[i];
        src = rt;
      }
      // summed in double: within rounding of the exact mean, whatever PyTorch's order
      double squares = 0.0;
      for (int64_t i = 0; i < n; ++i) squares += static_cast<double>(src[i]) * src[i];
      const float mean = static_cast<float>(squares / n);
      const float inv = 1.f / std::sqrt(mean + static_cast<float>(eps));
      for (int64_t i = 0; i < n; ++i) yp[t * n + i] = wp[i] * (src[i] * inv);
    }
  });
  return y;
}

// gate_up [T, 2I] float32 (gate, then up) -> silu(gate) * up [T, I]
torch::Tensor silu_mul(torch::Tensor gate_up) {
  check_rows(gate_up, "gate_up");
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2, s = gate_up.stride(0);
  auto y = torch::empty({T, I}, gate_up.options());
  const float* g = gate_up.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, T, grain(I), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t i = 0; i < I; ++i) {
        const float a = g[t * s + i];
        yp[t * I + i] = a / (1.f + std::exp(-a)) * g[t * s + I + i];
      }
  });
  return y;
}

// qkv [T, (H + 2 kvH) * D] float32: q and k rotated in place by cos, sin [T, D/2] (float32,
// the halves convention), then k and v written to the caches [kvH, blocks, block_size, D]
// at `slots` [T] (block * block_size + offset).
void rope_store(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, int64_t H,
                torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots) {
  check_rows(qkv, "qkv");
  const int64_t T = qkv.size(0), kv_heads = k_cache.size(0), D = k_cache.size(3), half = D / 2;
  TORCH_CHECK(qkv.size(1) == (H + 2 * kv_heads) * D, "qkv has ", qkv.size(1), " columns, not ",
              (H + 2 * kv_heads) * D);
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == torch::kFloat32 &&
                  cos.size(0) == T && cos.size(1) == half,
              "cos and sin must be contiguous float32 [T, D/2]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.scalar_type() == v_cache.scalar_type(),
              "caches must be contiguous, of one dtype");
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && slots.numel() == T, "slots: int64 [T]");
  const int64_t s = qkv.stride(0), cache_slots = k_cache.size(1) * k_cache.size(2);
  float* x = qkv.data_ptr<float>();
  const float* c = cos.data_ptr<float>();
  const float* sn = sin.data_ptr<float>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(slot[t] >= 0 && slot[t] < cache_slots, "slot ", slot[t], " is out of the cache");
  with_cache_type(k_cache.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* kc = k_cache.data_ptr<scalar_t>();
    scalar_t* vc = v_cache.data_ptr<scalar_t>();
    at::parallel_for(0, T, grain((H + 2 * kv_heads) * D), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        float* row = x + t * s;
        const float* ct = c + t * half;
        const float* st = sn + t * half;
        for (int64_t h = 0; h < H + kv_heads; ++h) {
          float* x1 = row + h * D;
          float* x2 = x1 + half;
          for (int64_t i = 0; i < half; ++i) {
            const float a = x1[i], b = x2[i];
            x1[i] = a * ct[i] - b * st[i];
            x2[i] = b * ct[i] + a * st[i];
          }
        }
        for (int64_t h = 0; h < kv_heads; ++h) {
          const int64_t at = (h * cache_slots + slot[t]) * D;
          store_row(kc + at, row + (H + h) * D, D);
          store_row(vc + at, row + (H + kv_heads + h) * D, D);
        }
      }
    });
  });
}

// One query token a sequence: q [B, H * D] float32 (rows may be strided, e.g. a view of
// qkv), caches [kvH, blocks, block_size, D], tables [B, width] int64 block ids, lens [B]
// int64 tokens in the cache (the query's own included, at position len - 1). A positive
// `window` lets each query see only its last `window` keys. -> [B, H * D] float32
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                               torch::Tensor tables, torch::Tensor lens, double scale,
                               int64_t window) {
  check_rows(q, "q");
  const int64_t B = q.size(0), kv_heads = k_cache.size(0), D = k_cache.size(3);
  const int64_t H = q.size(1) / D;
  TORCH_CHECK(D % kLanes == 0 && H * D == q.size(1) && H % kv_heads == 0,
              "head_dim must divide by 16 and query heads by KV heads");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.scalar_type() == v_cache.scalar_type(),
              "caches must be contiguous, of one dtype");
  TORCH_CHECK(tables.scalar_type() == torch::kInt64 && tables.is_contiguous() && tables.size(0) == B,
              "tables: contiguous int64 [B, blocks]");
  TORCH_CHECK(lens.scalar_type() == torch::kInt64 && lens.is_contiguous() && lens.numel() == B,
              "lens: int64 [B]");
  const int64_t width = tables.size(1), block_size = k_cache.size(2), blocks = k_cache.size(1);
  const int64_t* lp = lens.data_ptr<int64_t>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= width * block_size, "sequence ", b, " has ", lp[b],
                " tokens; its table holds ", width * block_size);
    for (int64_t i = 0; i < (lp[b] + block_size - 1) / block_size; ++i)
      TORCH_CHECK(tp[b * width + i] >= 0 && tp[b * width + i] < blocks, "block id ",
                  tp[b * width + i], " is out of the cache");
  }
  auto out = torch::empty({B, H * D}, q.options());
  with_cache_type(k_cache.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    attend(q.data_ptr<float>(), q.stride(0), k_cache.data_ptr<scalar_t>(),
           v_cache.data_ptr<scalar_t>(), kv_heads, blocks, block_size, D, tp, width, lp, B, H,
           static_cast<float>(scale), window, out.data_ptr<float>());
  });
  return out;
}
