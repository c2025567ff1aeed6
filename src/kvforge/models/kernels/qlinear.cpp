// Weight-only quantized matmuls for x86 CPUs with AVX-512: y = x @ dequant(W).T
//
// Weights stay packed in memory, in GGUF's own block layouts (groups of 32 along the
// input dimension), and are dequantized in registers, 4 output rows and one group at a
// time, then multiplied with the float32 activations by FMA: the result equals the
// dequantized matmul up to float rounding (no activation quantization).
//
//   q4: qs [N, K/32, 16] uint8  byte j of a group holds value j (low nibble) and j+16 (high)
//       d, m [N, K/32] float16  w = d * q + m      (Q4_1; Q4_0 is m = -8 d)
//   q8: qs [N, K] int8, d [N, K/32] float16        w = d * q   (Q8_0)
//
// Tiles: 4 output rows x 4 activation rows (16 accumulators of 16 lanes), so each group's
// dequantized rows are used by up to 4 activation rows before the next group is read.
// Output rows are split across threads with at::parallel_for.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kRows = 4;   // output rows per tile
constexpr int64_t kCols = 4;   // activation rows per tile

inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }
inline float half(const at::Half* p) { return _cvtsh_ss(*reinterpret_cast<const uint16_t*>(p)); }

// The 32 weights of one group of one row as two 16-lane float vectors.
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
};

struct Q8 {
  static inline void load(const int8_t* qs, float d, __m512& lo, __m512& hi) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 16));
    const __m512 vd = _mm512_set1_ps(d);
    lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(a)), vd);
    hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), vd);
  }
};

// One tile: rows [n0, n0 + nr) of W against activation rows [i0, i0 + mc).
template <typename Loader>
inline void tile(const float* x, int64_t K, int64_t G, int64_t i0, int64_t mc, int64_t n0,
                 int64_t nr, float* y, int64_t N, Loader load_group) {
  __m512 acc[kCols][kRows];
  for (int64_t c = 0; c < kCols; ++c)
    for (int64_t r = 0; r < kRows; ++r) acc[c][r] = _mm512_setzero_ps();
  __m512 w_lo[kRows], w_hi[kRows];
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t r = 0; r < nr; ++r) load_group(n0 + r, g, w_lo[r], w_hi[r]);
    for (int64_t c = 0; c < mc; ++c) {
      const float* xg = x + (i0 + c) * K + g * kGroup;
      const __m512 x_lo = _mm512_loadu_ps(xg), x_hi = _mm512_loadu_ps(xg + 16);
      for (int64_t r = 0; r < nr; ++r) {
        acc[c][r] = _mm512_fmadd_ps(w_lo[r], x_lo, acc[c][r]);
        acc[c][r] = _mm512_fmadd_ps(w_hi[r], x_hi, acc[c][r]);
      }
    }
  }
  for (int64_t c = 0; c < mc; ++c)
    for (int64_t r = 0; r < nr; ++r) y[(i0 + c) * N + n0 + r] = hsum(acc[c][r]);
}

template <typename Loader>
torch::Tensor run(const torch::Tensor& x, int64_t N, Loader load_group) {
  const int64_t M = x.size(0), K = x.size(1), G = K / kGroup;
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t tiles = (N + kRows - 1) / kRows;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kRows, nr = std::min(kRows, N - n0);
      for (int64_t i0 = 0; i0 < M; i0 += kCols)
        tile(xp, K, G, i0, std::min(kCols, M - i0), n0, nr, yp, N, load_group);
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
  const at::Half* dp = d.data_ptr<at::Half>();
  const at::Half* mp = m.data_ptr<at::Half>();
  return run(x, N, [=](int64_t n, int64_t g, __m512& lo, __m512& hi) {
    Q4::load(q + (n * G + g) * 16, half(dp + n * G + g), half(mp + n * G + g), lo, hi);
  });
}

// x [M, K] float32, qs [N, K] int8, d [N, K/32] float16 -> [M, N]
torch::Tensor q8_linear(torch::Tensor x, torch::Tensor qs, torch::Tensor d) {
  const int64_t N = qs.size(0), K = qs.size(1), G = K / kGroup;
  check(x, d, K);
  TORCH_CHECK(qs.is_contiguous(), "weights must be contiguous");
  const int8_t* q = qs.data_ptr<int8_t>();
  const at::Half* dp = d.data_ptr<at::Half>();
  return run(x, N, [=](int64_t n, int64_t g, __m512& lo, __m512& hi) {
    Q8::load(q + n * K + g * kGroup, half(dp + n * G + g), lo, hi);
  });
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("q4_dequantize", &q4_dequantize, "a Q4_1 weight as float32 [N, K]");
  module.def("q8_dequantize", &q8_dequantize, "a Q8_0 weight as float32 [N, K]");
  module.def("q4_linear", &q4_linear, "x @ dequant(Q4_1 weight).T, float32");
  module.def("q8_linear", &q8_linear, "x @ dequant(Q8_0 weight).T, float32");
}
