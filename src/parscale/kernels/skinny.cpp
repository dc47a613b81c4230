// y = x Wᵀ (+ b) for a few rows of float32 x (1..16): the product every batch-1 decode step makes,
// with M = P·B rows per weight; W float32, or int8 with one scale per row (weight-only int8). Built and loaded by parscale/kernels/__init__.py (AVX-512, OpenMP).
//
// Why: at 1..16 rows the product is as cheap as reading W once, if the arithmetic hides behind the
// memory reads. MKL's F.linear does a matrix-vector product per row past 2 rows (M× the reads'
// time), W @ xᵀ pays a fixed toll from 2 rows on, and both leave the cores idle while W streams in.
// Here each thread walks its share of W's rows once, R rows at a time, and multiplies every loaded
// 16-float piece of W into all M rows of x at once (R·M accumulators in registers), prefetching
// ahead in W. Each weight element is read once whatever M is.
//
// Layout: x (M × K, row stride ldx), W (N × K, row stride ldw), b (N or null), y (M × N, row
// stride ldy); the last dimension of each contiguous. Sums run over K in 16 lanes, then across
// lanes: the same terms as F.linear in another order (float rounding differs in the last bits).
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

namespace {

constexpr int64_t kPrefetch = 4096;  // elements ahead in W (16 KB of float32; 4 KB was 8-10% slower at 8 rows)

// 16 weights as float32: float32 as stored, int8 widened (exact; its scale comes at the end)
inline __m512 loadw(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 loadw(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline __m512 loadw(__mmask16 t, const float* p) { return _mm512_maskz_loadu_ps(t, p); }
inline __m512 loadw(__mmask16 t, const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(t, p)));
}

// Rows n .. n+R-1 of W against all M rows of x; `tail` masks the last K % 16 lanes; `scale`
// (per row of W, or null) multiplies each sum before the bias.
template <typename W, int M, int R>
inline void block(int64_t K, const float* x, int64_t ldx, const W* w, int64_t ldw, const float* scale,
                  const float* bias, float* y, int64_t ldy, int64_t n, __mmask16 tail) {
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  const W* wn = w + n * ldw;
  const int64_t full = K & ~int64_t(15);
  int64_t k = 0;
  for (; k < full; k += 16) {
    __m512 v[R];
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(wn + r * ldw + k + kPrefetch), _MM_HINT_T0);
      v[r] = loadw(wn + r * ldw + k);
    }
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * ldx + k);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(v[r], xv, acc[r][m]);
    }
  }
  if (tail) {
    __m512 v[R];
    for (int r = 0; r < R; ++r) v[r] = loadw(tail, wn + r * ldw + k);
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(tail, x + m * ldx + k);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(v[r], xv, acc[r][m]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) {
      float s = _mm512_reduce_add_ps(acc[r][m]);
      if (scale) s *= scale[n + r];
      y[m * ldy + n + r] = bias ? s + bias[n + r] : s;
    }
}

// Rows n0 .. n1-1 of W. R·M accumulators must fit the 32 vector registers with room for W and x:
// R = 4 up to 8 rows of x (32 at M = 8 measured faster than R = 2 all the same), R = 2 beyond.
template <typename W, int M>
void span(int64_t n0, int64_t n1, int64_t K, const float* x, int64_t ldx, const W* w, int64_t ldw,
          const float* scale, const float* bias, float* y, int64_t ldy) {
  constexpr int R = M <= 8 ? 4 : 2;
  const __mmask16 tail = static_cast<__mmask16>((1u << (K & 15)) - 1);
  int64_t n = n0;
  for (; n + R <= n1; n += R) block<W, M, R>(K, x, ldx, w, ldw, scale, bias, y, ldy, n, tail);
  for (; n < n1; ++n) block<W, M, 1>(K, x, ldx, w, ldw, scale, bias, y, ldy, n, tail);
}

template <typename W>
using SpanFn = void (*)(int64_t, int64_t, int64_t, const float*, int64_t, const W*, int64_t, const float*,
                        const float*, float*, int64_t);
template <typename W>
constexpr SpanFn<W> kSpans[16] = {span<W, 1>,  span<W, 2>,  span<W, 3>,  span<W, 4>,  span<W, 5>,  span<W, 6>,
                                  span<W, 7>,  span<W, 8>,  span<W, 9>,  span<W, 10>, span<W, 11>, span<W, 12>,
                                  span<W, 13>, span<W, 14>, span<W, 15>, span<W, 16>};

// W's rows are split between the threads in blocks of 16, a multiple of every R.
template <typename W>
int linear(int64_t M, int64_t N, int64_t K, const float* x, int64_t ldx, const W* w, int64_t ldw,
           const float* scale, const float* bias, float* y, int64_t ldy, int threads) {
  if (M < 1 || M > 16 || N < 1 || K < 1 || threads < 1) return 1;
  const int64_t blocks = (N + 15) / 16;
  if (threads > blocks) threads = static_cast<int>(blocks);
  const SpanFn<W> run = kSpans<W>[M - 1];
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
    const int64_t per = (blocks + T - 1) / T;
    const int64_t n0 = t * per * 16;
    const int64_t n1 = (t + 1) * per * 16 < N ? (t + 1) * per * 16 : N;
    if (n0 < n1) run(n0, n1, K, x, ldx, w, ldw, scale, bias, y, ldy);
  }
  return 0;
}

}  // namespace

// Both return 0, or 1 for arguments out of range (nothing written).
extern "C" int parscale_skinny_linear(int64_t M, int64_t N, int64_t K, const float* x, int64_t ldx,
                                      const float* w, int64_t ldw, const float* bias, float* y,
                                      int64_t ldy, int threads) {
  return linear<float>(M, N, K, x, ldx, w, ldw, nullptr, bias, y, ldy, threads);
}

// Weight-only int8: y = (x Qᵀ) · scale + b, Q int8 (N × K), scale float32 (N).
extern "C" int parscale_skinny_linear_int8(int64_t M, int64_t N, int64_t K, const float* x, int64_t ldx,
                                           const int8_t* w, int64_t ldw, const float* scale,
                                           const float* bias, float* y, int64_t ldy, int threads) {
  return linear<int8_t>(M, N, K, x, ldx, w, ldw, scale, bias, y, ldy, threads);
}
