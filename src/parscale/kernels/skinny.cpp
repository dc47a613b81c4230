// y = x Wᵀ (+ b) for a few rows of x (1..16): the product every batch-1 decode step makes, with
// M = P·B rows per weight. Three forms: float32; weight-only int8 (one scale per row of W, float32
// x and y); bfloat16 x, W, b and y (sums in float32, as torch's bfloat16 F.linear). Built and
// loaded by parscale/kernels/__init__.py (AVX-512 or AVX2, OpenMP).
//
// Why: at 1..16 rows the product is as cheap as reading W once, if the arithmetic hides behind the
// memory reads. MKL's F.linear does a matrix-vector product per row past 2 rows (M× the reads'
// time), W @ xᵀ pays a fixed toll from 2 rows on, and both leave the cores idle while W streams in.
// Here each thread walks its share of W's rows once, R rows at a time, and multiplies every loaded
// 16-float piece of W into all M rows of x at once (R·M accumulators in registers), prefetching
// ahead in W. Each weight element is read once whatever M is; int8 and bfloat16 weights are widened
// to float32 in registers (exact), so their products cost a quarter and a half of the reads.
//
// Layout: x (M × K, row stride ldx), W (N × K, row stride ldw), b (N or null), y (M × N, row
// stride ldy); the last dimension of each contiguous. Sums run over K in 16 lanes (8 under AVX2,
// see simd.h), then across lanes: the same terms as F.linear in another order (float rounding
// differs in the last bits).
#include <omp.h>
#include <stdint.h>

#include <vector>

#include "simd.h"

namespace {

using simd::vf;
using simd::kLanes;
constexpr int64_t kPrefetch = 4096;  // elements ahead in W (16 KB of float32; 4 KB was 8-10% slower at 8 rows)

// one bias or output element as float32, and back (y and b are float32, or bfloat16 bits)
inline float get(float v) { return v; }
inline float get(uint16_t v) { return simd::bf16_to_float(v); }
inline void put(float* p, float v) { *p = v; }
inline void put(uint16_t* p, float v) { *p = simd::float_to_bf16(v); }

// Rows n .. n+R-1 of W against M rows of x (at most kChunk); `scale` (per row of W, or null)
// multiplies each sum before the bias.
template <typename W, typename Y, int M, int R>
inline void block(int64_t K, const float* x, int64_t ldx, const W* w, int64_t ldw, const float* scale,
                  const Y* bias, Y* y, int64_t ldy, int64_t n) {
  vf acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = simd::zero();
  const W* wn = w + n * ldw;
  const int64_t full = K - K % kLanes;
  for (int64_t k = 0; k < full; k += kLanes) {
    vf v[R];
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(wn + r * ldw + k + kPrefetch), _MM_HINT_T0);
      v[r] = simd::load(wn + r * ldw + k);
    }
    for (int m = 0; m < M; ++m) {
      const vf xv = simd::load(x + m * ldx + k);
      for (int r = 0; r < R; ++r) acc[r][m] = simd::fma(v[r], xv, acc[r][m]);
    }
  }
  if (full < K) {
    const int t = static_cast<int>(K - full);
    vf v[R];
    for (int r = 0; r < R; ++r) v[r] = simd::load_part(wn + r * ldw + full, t);
    for (int m = 0; m < M; ++m) {
      const vf xv = simd::load_part(x + m * ldx + full, t);
      for (int r = 0; r < R; ++r) acc[r][m] = simd::fma(v[r], xv, acc[r][m]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) {
      float s = simd::reduce(acc[r][m]);
      if (scale) s *= scale[n + r];
      put(y + m * ldy + n + r, bias ? s + get(bias[n + r]) : s);
    }
}

// R·M accumulators must fit the vector registers (32 under AVX-512, 16 under AVX2) with room for
// W and x. AVX-512: all M rows at once, R = 4 up to 8 rows (32 accumulators at M = 8 measured
// faster than R = 2 all the same), R = 2 beyond. AVX2: x in chunks of up to 4 rows against R = 3
// rows of W (12 accumulators), R = 4 for one or two rows; the chunks after the first re-read the
// R rows of W from L1, not memory. (Zen 1, 2 threads, 174M's weights from memory: 8 rows as 4 + 4
// against 3 rows of W took 0.6-0.9× the time of 6 + 2 against 2, 16 rows 0.75-0.8×.)
constexpr int kChunk = kLanes == 16 ? 16 : 4;
template <int M>
constexpr int rows_of_w() { return kLanes == 16 ? (M <= 8 ? 4 : 2) : (M <= 2 ? 4 : 3); }

// the first of ceil(M / kChunk) chunks as equal as can be (7 rows: 4 + 3)
constexpr int first_chunk(int M) { return (M + (M + kChunk - 1) / kChunk - 1) / ((M + kChunk - 1) / kChunk); }

template <typename W, typename Y, int M, int R>
inline void chunks(int64_t K, const float* x, int64_t ldx, const W* w, int64_t ldw, const float* scale,
                   const Y* bias, Y* y, int64_t ldy, int64_t n) {
  if constexpr (M <= kChunk) {
    block<W, Y, M, R>(K, x, ldx, w, ldw, scale, bias, y, ldy, n);
  } else {
    constexpr int C = first_chunk(M);
    block<W, Y, C, R>(K, x, ldx, w, ldw, scale, bias, y, ldy, n);
    chunks<W, Y, M - C, R>(K, x + C * ldx, ldx, w, ldw, scale, bias, y + C * ldy, ldy, n);
  }
}

// Rows n0 .. n1-1 of W.
template <typename W, typename Y, int M>
void span(int64_t n0, int64_t n1, int64_t K, const float* x, int64_t ldx, const W* w, int64_t ldw,
          const float* scale, const Y* bias, Y* y, int64_t ldy) {
  constexpr int R = rows_of_w<M>();
  int64_t n = n0;
  for (; n + R <= n1; n += R) chunks<W, Y, M, R>(K, x, ldx, w, ldw, scale, bias, y, ldy, n);
  for (; n < n1; ++n) chunks<W, Y, M, 1>(K, x, ldx, w, ldw, scale, bias, y, ldy, n);
}

template <typename W, typename Y>
using SpanFn = void (*)(int64_t, int64_t, int64_t, const float*, int64_t, const W*, int64_t, const float*,
                        const Y*, Y*, int64_t);
template <typename W, typename Y>
constexpr SpanFn<W, Y> kSpans[16] = {
    span<W, Y, 1>,  span<W, Y, 2>,  span<W, Y, 3>,  span<W, Y, 4>,  span<W, Y, 5>,  span<W, Y, 6>,
    span<W, Y, 7>,  span<W, Y, 8>,  span<W, Y, 9>,  span<W, Y, 10>, span<W, Y, 11>, span<W, Y, 12>,
    span<W, Y, 13>, span<W, Y, 14>, span<W, Y, 15>, span<W, Y, 16>};

// bfloat16 rows of x as float32, once per call (M·K elements: a few µs), for every thread to read.
const float* widen(int64_t M, int64_t K, const uint16_t* x, int64_t ldx, std::vector<float>& buf) {
  buf.resize(static_cast<size_t>(M * K));
  for (int64_t m = 0; m < M; ++m) {
    int64_t k = 0;
    for (; k + kLanes <= K; k += kLanes) simd::store(buf.data() + m * K + k, simd::load(x + m * ldx + k));
    if (k < K) simd::store_part(buf.data() + m * K + k, simd::load_part(x + m * ldx + k, K - k), K - k);
  }
  return buf.data();
}

// W's rows are split between the threads in blocks of 16 (where R does not divide a share, its
// last rows go one at a time).
template <typename W, typename Y>
int linear(int64_t M, int64_t N, int64_t K, const float* x, int64_t ldx, const W* w, int64_t ldw,
           const float* scale, const Y* bias, Y* y, int64_t ldy, int threads) {
  if (M < 1 || M > 16 || N < 1 || K < 1 || threads < 1) return 1;
  const int64_t blocks = (N + 15) / 16;
  if (threads > blocks) threads = static_cast<int>(blocks);
  const SpanFn<W, Y> run = kSpans<W, Y>[M - 1];
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
  return linear<float, float>(M, N, K, x, ldx, w, ldw, nullptr, bias, y, ldy, threads);
}

// Weight-only int8: y = (x Qᵀ) · scale + b, Q int8 (N × K), scale float32 (N).
extern "C" int parscale_skinny_linear_int8(int64_t M, int64_t N, int64_t K, const float* x, int64_t ldx,
                                           const int8_t* w, int64_t ldw, const float* scale,
                                           const float* bias, float* y, int64_t ldy, int threads) {
  return linear<int8_t, float>(M, N, K, x, ldx, w, ldw, scale, bias, y, ldy, threads);
}

// bfloat16 throughout (x, W, b, y as their 16-bit patterns); float32 sums, y rounded to nearest even.
extern "C" int parscale_skinny_linear_bf16(int64_t M, int64_t N, int64_t K, const uint16_t* x, int64_t ldx,
                                           const uint16_t* w, int64_t ldw, const uint16_t* bias, uint16_t* y,
                                           int64_t ldy, int threads) {
  if (M < 1 || M > 16 || K < 1) return 1;
  std::vector<float> buf;
  return linear<uint16_t, uint16_t>(M, N, K, widen(M, K, x, ldx, buf), K, w, ldw, nullptr, bias, y, ldy, threads);
}
