// Weight-only quantized matmuls for x86 CPUs with AVX-512: y = x @ dequant(W).T
//
// Weights stay packed in memory, in GGUF's own block layouts (groups of 32 along the
// input dimension):
//
//   q4: qs [N, K/32, 16] uint8  byte j of a group holds value j (low nibble) and j+16 (high)
//       d, m [N, K/32] float16  w = d * q + m      (Q4_1; Q4_0 is m = -8 d)
//   q8: qs [N, K] int8, d [N, K/32] float16        w = d * q   (Q8_0)
//
// Up to 16 activation rows (decode): x is rounded once to int16 with a scale per group of
// 32 (15 bits: 3e-5 of the group's largest value, far below the weights' own error), two
// groups' 64 products are summed exactly in int32 by vpmaddwd + VNNI's vpdpwssd, then
// scaled by both groups' scales; the minimum's share is m * (sum of the group's x), from x
// as it is. A tile of 4 output rows x 4 activation rows shares its loads.
// Many rows (prefill): the weight is dequantized into a float32 copy for a dense GEMM.

#include "ops.h"

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kRows = 4;   // output rows per tile
constexpr int64_t kCols = 4;   // activation rows per tile

inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }
inline float half(const at::Half* p) { return _cvtsh_ss(*reinterpret_cast<const uint16_t*>(p)); }

// The 32 weights of one group of one row as two 16-lane float vectors (dequantize).
struct Q4 {
  static inline void load(const uint8_t* qs, float d, float m, __m512& lo, __m512& hi) {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i q_lo = _mm_and_si128(packed, mask);
    const __m128i q_hi = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
    const __m512 vd = _mm512_set1_ps(d), vm = _mm512_set1_ps(m);
    lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q_lo)), vd, vm);
    hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q_hi)), vd, vm);
  }
  // two adjacent groups' codes as int16: (first halves of both, second halves of both)
  static inline void pair(const uint8_t* qs, __m512i& a, __m512i& b) {
    const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs));
    const __m256i mask = _mm256_set1_epi8(0x0F);
    a = _mm512_cvtepu8_epi16(_mm256_and_si256(packed, mask));
    b = _mm512_cvtepu8_epi16(_mm256_and_si256(_mm256_srli_epi16(packed, 4), mask));
  }
  // the group's 32 codes as int16, in value order
  static inline __m512i codes(const uint8_t* qs) {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i q_lo = _mm_and_si128(packed, mask);
    const __m128i q_hi = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
    return _mm512_cvtepu8_epi16(_mm256_inserti128_si256(_mm256_castsi128_si256(q_lo), q_hi, 1));
  }
};

struct Q8 {
  static inline void load(const int8_t* qs, float d, __m512& lo, __m512& hi) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 16));
    const __m512 vd = _mm512_set1_ps(d);
    lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(a)), vd);
    hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), vd);
  }
  static inline void pair(const int8_t* qs, __m512i& a, __m512i& b) {
    const __m256i g0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs));
    const __m256i g1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + kGroup));
    a = _mm512_cvtepi8_epi16(_mm256_permute2x128_si256(g0, g1, 0x20));
    b = _mm512_cvtepi8_epi16(_mm256_permute2x128_si256(g0, g1, 0x31));
  }
  static inline __m512i codes(const int8_t* qs) {
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs)));
  }
};

// Activation rows rounded to int16 with one scale per group of 32 (15 bits: 3e-5 of the
// group's largest value), laid out for pairs of groups as the codes come: per pair, the
// first 16 values of both groups, then the last 16 of both (a last odd group stays in
// order). `lanes` holds each pair's scales spread as its products come out (8 lanes of
// the first group's, 8 of the second's), and `sums` each group's sum of x, for the
// minimum's share.
struct Rows {
  std::vector<int16_t> q;
  std::vector<float> lanes, sums;
  int64_t pairs;
  Rows(const float* x, int64_t M, int64_t K)
      : q(M * K), lanes(M * ((K / kGroup + 1) / 2) * 16), sums(M * (K / kGroup)),
        pairs((K / kGroup + 1) / 2) {
    const int64_t G = K / kGroup, paired = G / 2 * 2 * kGroup;
    for (int64_t i = 0; i < M; ++i) {
      const float* xi = x + i * K;
      int16_t* qi = q.data() + i * K;
      for (int64_t g = 0; g < G; ++g) {
        const float* xg = xi + g * kGroup;
        float amax = 0.f, total = 0.f;
        for (int64_t k = 0; k < kGroup; ++k) {
          amax = std::max(amax, std::abs(xg[k]));
          total += xg[k];
        }
        sums[i * G + g] = total;
        const float s = amax > 0.f ? amax / 32767.f : 1.f, inv = 1.f / s;
        float* spread = lanes.data() + (i * pairs + g / 2) * 16;
        if (g * kGroup < paired) {
          std::fill(spread + 8 * (g % 2), spread + 8 * (g % 2) + 8, s);
        } else {
          std::fill(spread, spread + 16, s);
        }
        for (int64_t k = 0; k < kGroup; ++k) {
          int64_t at = g * kGroup + k;
          if (at < paired) {  // 64 p + 32 h + 16 half + j  ->  64 p + 32 half + 16 h + j
            at = 64 * (g / 2) + 32 * (k / 16) + 16 * (g % 2) + k % 16;
          }
          qi[at] = static_cast<int16_t>(std::nearbyint(xg[k] * inv));
        }
      }
    }
  }
};

// sum over groups of m[g] * sums[g] (fp16 minimums, float sums)
inline float min_share(const at::Half* m, const float* sums, int64_t G) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; g += 16) {
    const __mmask16 k = G - g >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (G - g)) - 1);
    const __m512 mg = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, m + g));
    acc = _mm512_fmadd_ps(mg, _mm512_maskz_loadu_ps(k, sums + g), acc);
  }
  return hsum(acc);
}

// One tile of the direct path: output rows [n0, n0 + nr) against activation rows
// [i0, i0 + mc). `pair(n, g, a, b)` gives groups g, g + 1's codes, `codes(n, g)` one
// group's; d holds the groups' scales, m their minimums (or nullptr).
template <typename Pair, typename Codes>
inline void direct_tile(const Rows& rows, int64_t K, int64_t G, int64_t i0, int64_t mc,
                        int64_t n0, int64_t nr, const at::Half* d, const at::Half* m, float* y,
                        int64_t N, Pair pair, Codes codes) {
  __m512 acc[kCols][kRows];
  for (int64_t c = 0; c < kCols; ++c)
    for (int64_t r = 0; r < kRows; ++r) acc[c][r] = _mm512_setzero_ps();
  // lanes 0-7 take the first group's scale, lanes 8-15 the second's
  const __m512i spread = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  __m512i qa[kRows], qb[kRows];
  __m512 dg[kRows];
  int64_t g = 0;
  for (; g + 1 < G; g += 2) {
    for (int64_t r = 0; r < nr; ++r) {
      pair(n0 + r, g, qa[r], qb[r]);
      int32_t two;
      std::memcpy(&two, d + (n0 + r) * G + g, sizeof two);
      const __m512 ds = _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128(two)));
      dg[r] = _mm512_permutexvar_ps(spread, ds);
    }
    for (int64_t c = 0; c < mc; ++c) {
      const int16_t* x = rows.q.data() + (i0 + c) * K + g * kGroup;
      const __m512i xa = _mm512_loadu_si512(x), xb = _mm512_loadu_si512(x + 32);
      const __m512 sx = _mm512_loadu_ps(rows.lanes.data() + ((i0 + c) * rows.pairs + g / 2) * 16);
      for (int64_t r = 0; r < nr; ++r) {
        const __m512i dot = _mm512_dpwssd_epi32(_mm512_madd_epi16(qa[r], xa), qb[r], xb);
        acc[c][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dg[r], sx), acc[c][r]);
      }
    }
  }
  if (g < G) {  // an odd last group, in value order
    for (int64_t r = 0; r < nr; ++r) {
      qa[r] = codes(n0 + r, g);
      dg[r] = _mm512_set1_ps(half(d + (n0 + r) * G + g));
    }
    for (int64_t c = 0; c < mc; ++c) {
      const __m512i x = _mm512_loadu_si512(rows.q.data() + (i0 + c) * K + g * kGroup);
      const __m512 sx = _mm512_loadu_ps(rows.lanes.data() + ((i0 + c) * rows.pairs + g / 2) * 16);
      for (int64_t r = 0; r < nr; ++r) {
        const __m512i dot = _mm512_madd_epi16(qa[r], x);
        acc[c][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dg[r], sx), acc[c][r]);
      }
    }
  }
  for (int64_t c = 0; c < mc; ++c) {
    const int64_t i = i0 + c;
    for (int64_t r = 0; r < nr; ++r) {
      float out = hsum(acc[c][r]);
      if (m != nullptr) out += min_share(m + (n0 + r) * G, rows.sums.data() + i * G, G);
      y[i * N + n0 + r] = out;
    }
  }
}

template <typename Pair, typename Codes>
torch::Tensor direct(const torch::Tensor& x, int64_t N, const at::Half* d, const at::Half* m,
                     Pair pair, Codes codes) {
  const int64_t M = x.size(0), K = x.size(1), G = K / kGroup;
  const Rows rows(x.data_ptr<float>(), M, K);
  auto y = torch::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  const int64_t tiles = (N + kRows - 1) / kRows;
  at::parallel_for(0, tiles, 8, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kRows, nr = std::min(kRows, N - n0);
      for (int64_t i0 = 0; i0 < M; i0 += kCols)
        direct_tile(rows, K, G, i0, std::min(kCols, M - i0), n0, nr, d, m, yp, N, pair, codes);
    }
  });
  return y;
}

void check(const torch::Tensor& x, const torch::Tensor& d, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "x must be a contiguous float32 matrix");
  TORCH_CHECK(x.size(1) == K && K % kGroup == 0, "x has ", x.size(1), " columns, the weight ",
              K, " (a multiple of ", kGroup, ")");
  TORCH_CHECK(d.scalar_type() == torch::kFloat16 && d.is_contiguous(), "scales: float16");
}

}  // namespace

// x [M, K] float32, qs [N, K/32, 16] uint8, d and m [N, K/32] float16 -> [M, N]
torch::Tensor q4_linear(torch::Tensor x, torch::Tensor qs, torch::Tensor d, torch::Tensor m) {
  const int64_t N = qs.size(0), G = qs.size(1), K = G * kGroup;
  check(x, d, K);
  TORCH_CHECK(qs.is_contiguous() && m.is_contiguous(), "weights must be contiguous");
  const uint8_t* q = qs.data_ptr<uint8_t>();
  return direct(
      x, N, d.data_ptr<at::Half>(), m.data_ptr<at::Half>(),
      [=](int64_t n, int64_t g, __m512i& a, __m512i& b) { Q4::pair(q + (n * G + g) * 16, a, b); },
      [=](int64_t n, int64_t g) { return Q4::codes(q + (n * G + g) * 16); });
}

// x [M, K] float32, qs [N, K] int8, d [N, K/32] float16 -> [M, N]
torch::Tensor q8_linear(torch::Tensor x, torch::Tensor qs, torch::Tensor d) {
  const int64_t N = qs.size(0), K = qs.size(1);
  check(x, d, K);
  TORCH_CHECK(qs.is_contiguous(), "weights must be contiguous");
  const int8_t* q = qs.data_ptr<int8_t>();
  return direct(
      x, N, d.data_ptr<at::Half>(), nullptr,
      [=](int64_t n, int64_t g, __m512i& a, __m512i& b) { Q8::pair(q + n * K + g * kGroup, a, b); },
      [=](int64_t n, int64_t g) { return Q8::codes(q + n * K + g * kGroup); });
}

// The whole matrix dequantized, [N, K] float32 (for many activation rows, where a dense
// GEMM on the dequantized copy beats dequantizing in registers for every 4 rows).
template <typename Loader>
torch::Tensor dequantize(int64_t N, int64_t G, Loader load_group) {
  auto w = torch::empty({N, G * kGroup}, torch::kFloat32);
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t g = 0; g < G; ++g) {
        __m512 lo, hi;
        load_group(n, g, lo, hi);
        _mm512_storeu_ps(wp + (n * G + g) * kGroup, lo);
        _mm512_storeu_ps(wp + (n * G + g) * kGroup + 16, hi);
      }
  });
  return w;
}

torch::Tensor q4_dequantize(torch::Tensor qs, torch::Tensor d, torch::Tensor m) {
  const int64_t N = qs.size(0), G = qs.size(1);
  const uint8_t* q = qs.data_ptr<uint8_t>();
  const at::Half* dp = d.data_ptr<at::Half>();
  const at::Half* mp = m.data_ptr<at::Half>();
  return dequantize(N, G, [=](int64_t n, int64_t g, __m512& lo, __m512& hi) {
    Q4::load(q + (n * G + g) * 16, half(dp + n * G + g), half(mp + n * G + g), lo, hi);
  });
}

torch::Tensor q8_dequantize(torch::Tensor qs, torch::Tensor d) {
  const int64_t N = qs.size(0), K = qs.size(1), G = K / kGroup;
  const int8_t* q = qs.data_ptr<int8_t>();
  const at::Half* dp = d.data_ptr<at::Half>();
  return dequantize(N, G, [=](int64_t n, int64_t g, __m512& lo, __m512& hi) {
    Q8::load(q + n * K + g * kGroup, half(dp + n * G + g), lo, hi);
  });
}
