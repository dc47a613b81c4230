// Float32 y = x Wᵀ (+ b) for a few rows of x (1..16): the product every batch-1 decode step makes,
// with M = P·B rows per weight. Built and loaded by parscale/kernels/__init__.py (AVX-512, OpenMP).
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

constexpr int64_t kPrefetch = 1024;  // floats ahead in each row of W (4 KB)

// Rows n .. n+R-1 of W against all M rows of x; `tail` masks the last K % 16 lanes.
template <int M, int R>
inline void block(int64_t K, const float* x, int64_t ldx, const float* w, int64_t ldw,
                  const float* bias, float* y, int64_t ldy, int64_t n, __mmask16 tail) {
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  const float* wn = w + n * ldw;
  const int64_t full = K & ~int64_t(15);
  int64_t k = 0;
  for (; k < full; k += 16) {
    __m512 v[R];
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(wn + r * ldw + k + kPrefetch), _MM_HINT_T0);
      v[r] = _mm512_loadu_ps(wn + r * ldw + k);
    }
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * ldx + k);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(v[r], xv, acc[r][m]);
    }
  }
  if (tail) {
    __m512 v[R];
    for (int r = 0; r < R; ++r) v[r] = _mm512_maskz_loadu_ps(tail, wn + r * ldw + k);
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(tail, x + m * ldx + k);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(v[r], xv, acc[r][m]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) {
      const float s = _mm512_reduce_add_ps(acc[r][m]);
      y[m * ldy + n + r] = bias ? s + bias[n + r] : s;
    }
}

// Rows n0 .. n1-1 of W. R·M accumulators must fit the 32 vector registers with room for W and x:
// R = 4 up to 8 rows of x (32 at M = 8 measured faster than R = 2 all the same), R = 2 beyond.
template <int M>
void span(int64_t n0, int64_t n1, int64_t K, const float* x, int64_t ldx, const float* w,
          int64_t ldw, const float* bias, float* y, int64_t ldy) {
  constexpr int R = M <= 8 ? 4 : 2;
  const __mmask16 tail = static_cast<__mmask16>((1u << (K & 15)) - 1);
  int64_t n = n0;
  for (; n + R <= n1; n += R) block<M, R>(K, x, ldx, w, ldw, bias, y, ldy, n, tail);
  for (; n < n1; ++n) block<M, 1>(K, x, ldx, w, ldw, bias, y, ldy, n, tail);
}

using SpanFn = void (*)(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t,
                        const float*, float*, int64_t);
constexpr SpanFn kSpans[16] = {span<1>,  span<2>,  span<3>,  span<4>,  span<5>,  span<6>,
                               span<7>,  span<8>,  span<9>,  span<10>, span<11>, span<12>,
                               span<13>, span<14>, span<15>, span<16>};

}  // namespace

// Returns 0, or 1 for arguments out of range (nothing written). W's rows are split between the
// threads in blocks of 16, a multiple of every R.
extern "C" int parscale_skinny_linear(int64_t M, int64_t N, int64_t K, const float* x, int64_t ldx,
                                      const float* w, int64_t ldw, const float* bias, float* y,
                                      int64_t ldy, int threads) {
  if (M < 1 || M > 16 || N < 1 || K < 1 || threads < 1) return 1;
  const int64_t blocks = (N + 15) / 16;
  if (threads > blocks) threads = static_cast<int>(blocks);
  const SpanFn run = kSpans[M - 1];
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
    const int64_t per = (blocks + T - 1) / T;
    const int64_t n0 = t * per * 16;
    const int64_t n1 = (t + 1) * per * 16 < N ? (t + 1) * per * 16 : N;
    if (n0 < n1) run(n0, n1, K, x, ldx, w, ldw, bias, y, ldy);
  }
  return 0;
}
