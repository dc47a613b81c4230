// y = x Wᵀ (+ b) for a few rows of x (1..16): the product every batch-1 decode step makes, with
// M = P·B rows per weight. Three forms: float32; bfloat16 x, W, b and y (sums in float32, as
// torch's bfloat16 F.linear); weight-only int8 (one scale per row of W; float32 x and y, x rounded
// to 16-bit fixed point per row, one scale per row: see `quantize_rows`). Built and loaded by
// parscale/kernels/__init__.py (AVX-512, optionally with VNNI and bfloat16 dot products and AMX tiles
// for bfloat16 (namespace amx), or AVX2; OpenMP).
//
// Why: at 1..16 rows the product is as cheap as reading W once, if the arithmetic hides behind the
// memory reads. MKL's F.linear does a matrix-vector product per row past 2 rows (M× the reads'
// time), W @ xᵀ pays a fixed toll from 2 rows on, and both leave the cores idle while W streams in.
// Here each thread walks its share of W's rows once, R rows at a time, and multiplies every loaded
// piece of W into all rows of x at once (R·M accumulators in registers). Each weight element is
// read once whatever M is; bfloat16 and int8 weights cost a half and a quarter of the reads, and
// where the CPU multiplies pairs of them natively (AVX512_BF16, VNNI) half the instructions.
//
// Layout: x (M × K, row stride ldx), W (N × K, row stride ldw), b (N or null), y (M × N, row
// stride ldy); the last dimension of each contiguous. Sums run over K in vector lanes, then across
// lanes: the same terms as F.linear in another order (float rounding differs in the last bits).
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <vector>

#include "simd.h"

namespace {

using simd::vf;
using simd::vi;
using simd::kLanes;

// How one step along K multiplies a piece of a row of W into a piece of a row of x: the element
// types, the elements per step, the accumulator, and its lanes as float32 (summed at the end).
struct Float32 {  // float32 x; W float32 or bfloat16 (widened in registers, exact)
  using X = float;
  using Acc = vf;
  static constexpr int kStep = kLanes;
  static constexpr int64_t kFlush = INT64_MAX;
  static Acc zero() { return simd::zero(); }
  template <typename W> static vf load_w(const W* p) { return simd::load(p); }
  template <typename W> static vf load_w_part(const W* p, int n) { return simd::load_part(p, n); }
  static vf load_x(const float* p) { return simd::load(p); }
  static vf load_x_part(const float* p, int n) { return simd::load_part(p, n); }
  static Acc madd(Acc acc, vf w, vf x) { return simd::fma(w, x, acc); }
  static vf lanes(Acc acc) { return acc; }
};

#if defined(PARSCALE_BF16_DOT)
struct Bf16Pairs {  // bfloat16 x and W, two products per float32 lane and instruction
  using X = uint16_t;
  using Acc = vf;
  static constexpr int kStep = 2 * kLanes;
  static constexpr int64_t kFlush = INT64_MAX;
  static Acc zero() { return simd::zero(); }
  static vi load_w(const uint16_t* p) { return simd::load_bf16_pairs(p); }
  static vi load_w_part(const uint16_t* p, int n) { return part(p, n); }
  static vi load_x(const uint16_t* p) { return simd::load_bf16_pairs(p); }
  static vi load_x_part(const uint16_t* p, int n) { return part(p, n); }
  static Acc madd(Acc acc, vi w, vi x) { return simd::dot2_bf16(acc, w, x); }
  static vf lanes(Acc acc) { return acc; }
  static vi part(const uint16_t* p, int n) {
    uint16_t buf[kStep] = {};
    memcpy(buf, p, 2 * n);
    return simd::load_bf16_pairs(buf);
  }
};
#endif

struct Int8Pairs {  // int8 W widened to int16 against int16 x; int32 lanes, two products each
  using X = int16_t;
  using Acc = simd::vi32;
  static constexpr int kStep = 2 * kLanes;
  // a lane gains kFlush / kLanes products of at most 127 · 32767 before it is added to a float:
  // 4096 keeps that under 2^31 with 8 or 16 lanes
  static constexpr int64_t kFlush = 4096;
  static Acc zero() { return simd::izero(); }
  static vi load_w(const int8_t* p) { return simd::load_i16(p); }
  static vi load_w_part(const int8_t* p, int n) {
    int8_t buf[kStep] = {};
    memcpy(buf, p, n);
    return simd::load_i16(buf);
  }
  static vi load_x(const int16_t* p) { return simd::load_i16(p); }
  static vi load_x_part(const int16_t* p, int n) {
    int16_t buf[kStep] = {};
    memcpy(buf, p, 2 * n);
    return simd::load_i16(buf);
  }
  static Acc madd(Acc acc, vi w, vi x) { return simd::dot2(acc, w, x); }
  static vf lanes(Acc acc) { return simd::to_float(acc); }
};

// What becomes of a sum: y[m][n] = sum · row_scale[n] · x_scale[m] + bias[n] (each factor optional),
// y and b float32 or bfloat16 bits.
inline float get(float v) { return v; }
inline float get(uint16_t v) { return simd::bf16_to_float(v); }
inline void put(float* p, float v) { *p = v; }
inline void put(uint16_t* p, float v) { *p = simd::float_to_bf16(v); }

template <typename Y>
struct Out {
  const float* row_scale;  // per row of W, or null
  const float* x_scale;    // per row of x, or null
  const Y* bias;
  Y* y;
  int64_t ldy;
};

// Rows n .. n+R-1 of W against M rows of x (at most kChunk). `pf`, if not null, is where the
// rows a few blocks ahead start: their bytes are prefetched into L2 in address order, one step's
// worth per step, so memory sees one sequential stream per thread rather than R (on a Zen 4, 2
// threads, 174M's weights: 23-25 against 31-33 GB/s with R separate streams, and prefetching each
// row ahead into L1 was slower than none).
template <class Op, typename W, typename Y, int M, int R>
inline void block(int64_t K, const typename Op::X* x, int64_t ldx, const W* w, int64_t ldw, Out<Y> out,
                  int64_t n, const char* pf) {
  using Acc = typename Op::Acc;
  constexpr int S = Op::kStep;
  float total[R][M] = {};
  const W* wn = w + n * ldw;
  for (int64_t k0 = 0; k0 < K; k0 += Op::kFlush) {
    const int64_t k1 = K - k0 > Op::kFlush ? k0 + Op::kFlush : K;
    const int64_t full = k0 + (k1 - k0) / S * S;
    Acc acc[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = Op::zero();
    for (int64_t k = k0; k < full; k += S) {
      if (pf) {
        const char* p = pf + R * k * static_cast<int64_t>(sizeof(W));
        for (int i = 0; i < static_cast<int>(R * S * sizeof(W)); i += 64) _mm_prefetch(p + i, _MM_HINT_T1);
      }
      decltype(Op::load_w(wn)) v[R];
      for (int r = 0; r < R; ++r) v[r] = Op::load_w(wn + r * ldw + k);
      for (int m = 0; m < M; ++m) {
        auto xv = Op::load_x(x + m * ldx + k);
        // one load of x per row and step, kept in a register for all R rows of W (compilers fold
        // it into every multiply otherwise: R loads instead of one; 8 rows ran at 0.8× the speed)
        asm("" : "+v"(xv));
        for (int r = 0; r < R; ++r) acc[r][m] = Op::madd(acc[r][m], v[r], xv);
      }
    }
    if (full < k1) {
      const int t = static_cast<int>(k1 - full);
      decltype(Op::load_w(wn)) v[R];
      for (int r = 0; r < R; ++r) v[r] = Op::load_w_part(wn + r * ldw + full, t);
      for (int m = 0; m < M; ++m) {
        const auto xv = Op::load_x_part(x + m * ldx + full, t);
        for (int r = 0; r < R; ++r) acc[r][m] = Op::madd(acc[r][m], v[r], xv);
      }
    }
    if constexpr (R * M >= kLanes / 2) {  // the sums kLanes at a time (simd::hsums)
      constexpr int G = (R * M + kLanes - 1) / kLanes;
      float sums[G * kLanes];
      for (int g = 0; g < G; ++g) {
        vf v[kLanes];
        for (int i = 0; i < kLanes; ++i) {
          const int j = g * kLanes + i;
          v[i] = j < R * M ? Op::lanes(acc[j / M][j % M]) : simd::zero();
        }
        simd::store(sums + g * kLanes, simd::hsums(v));
      }
      for (int j = 0; j < R * M; ++j) total[j / M][j % M] += sums[j];
    } else {
      for (int r = 0; r < R; ++r)
        for (int m = 0; m < M; ++m) total[r][m] += simd::reduce(Op::lanes(acc[r][m]));
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) {
      float s = total[r][m];
      if (out.row_scale) s *= out.row_scale[n + r];
      if (out.x_scale) s *= out.x_scale[m];
      put(out.y + m * out.ldy + n + r, out.bias ? s + get(out.bias[n + r]) : s);
    }
}

// R·M accumulators must fit the vector registers (32 under AVX-512, 16 under AVX2) with room for
// W and x. AVX-512: x in chunks of up to 8 rows against R = 4 rows of W (the compiler spills a few
// of the 32 accumulators at 8 rows, still faster than R = 3 or chunks of 4 against 6; 16 rows as
// 8 + 8 took 0.45× the time of 16 at once against 2). AVX2: chunks of up to 4 rows against R = 3
// rows of W (12 accumulators), R = 4 for one or two rows (Zen 1, 2 threads, 174M's weights from
// memory: 8 rows as 4 + 4 against 3 rows of W took 0.6-0.9× the time of 6 + 2 against 2). The
// chunks after the first re-read the R rows of W from L1, not memory.
constexpr int kChunk = kLanes == 16 ? 8 : 4;
template <int M>
constexpr int rows_of_w() { return kLanes == 16 ? 4 : (M <= 2 ? 4 : 3); }
constexpr int kAhead = 2;  // blocks of R rows prefetched ahead (1-3 measured alike)

// the first of ceil(M / kChunk) chunks as equal as can be (7 rows: 4 + 3)
constexpr int first_chunk(int M) { return (M + (M + kChunk - 1) / kChunk - 1) / ((M + kChunk - 1) / kChunk); }

template <class Op, typename W, typename Y, int M, int R>
inline void chunks(int64_t K, const typename Op::X* x, int64_t ldx, const W* w, int64_t ldw, Out<Y> out,
                   int64_t n, const char* pf) {
  if constexpr (M <= kChunk) {
    block<Op, W, Y, M, R>(K, x, ldx, w, ldw, out, n, pf);
  } else {
    constexpr int C = first_chunk(M);
    block<Op, W, Y, C, R>(K, x, ldx, w, ldw, out, n, pf);
    Out<Y> rest = out;
    rest.y += C * out.ldy;
    if (rest.x_scale) rest.x_scale += C;
    chunks<Op, W, Y, M - C, R>(K, x + C * ldx, ldx, w, ldw, rest, n, nullptr);
  }
}

// Rows n0 .. n1-1 of W.
template <class Op, typename W, typename Y, int M>
void span(int64_t n0, int64_t n1, int64_t K, const typename Op::X* x, int64_t ldx, const W* w, int64_t ldw,
          Out<Y> out) {
  constexpr int R = rows_of_w<M>();
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    const bool ahead = n + (kAhead + 1) * R <= n1;  // nothing past this thread's share
    chunks<Op, W, Y, M, R>(K, x, ldx, w, ldw, out, n,
                           ahead ? reinterpret_cast<const char*>(w + (n + kAhead * R) * ldw) : nullptr);
  }
  for (; n < n1; ++n) chunks<Op, W, Y, M, 1>(K, x, ldx, w, ldw, out, n, nullptr);
}

template <class Op, typename W, typename Y>
using SpanFn = void (*)(int64_t, int64_t, int64_t, const typename Op::X*, int64_t, const W*, int64_t, Out<Y>);
template <class Op, typename W, typename Y>
constexpr SpanFn<Op, W, Y> kSpans[16] = {
    span<Op, W, Y, 1>,  span<Op, W, Y, 2>,  span<Op, W, Y, 3>,  span<Op, W, Y, 4>,
    span<Op, W, Y, 5>,  span<Op, W, Y, 6>,  span<Op, W, Y, 7>,  span<Op, W, Y, 8>,
    span<Op, W, Y, 9>,  span<Op, W, Y, 10>, span<Op, W, Y, 11>, span<Op, W, Y, 12>,
    span<Op, W, Y, 13>, span<Op, W, Y, 14>, span<Op, W, Y, 15>, span<Op, W, Y, 16>};

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

// float32 rows of x as 16-bit fixed point: x[m][k] ≈ q[m][k] · scale[m], scale = max|x[m]| / 32767,
// q rounded to nearest (an error of at most scale / 2 per element: 2^-16 of the row's largest
// magnitude, finer than bfloat16's 2^-9 of each element's for all but the row's smallest values).
// A row with a non-finite value gets a NaN scale (its outputs are NaN, as a float32 product's).
void quantize_rows(int64_t M, int64_t K, const float* x, int64_t ldx, int16_t* q, float* scale) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * ldx;
    vf mx = simd::zero(), bad = simd::zero();  // bad: Σ x·0, NaN where any x is NaN or infinite
    int64_t k = 0;
    for (; k + kLanes <= K; k += kLanes) {
      const vf v = simd::load(xm + k);
      mx = simd::max_abs(mx, v);
      bad = simd::fma(v, simd::zero(), bad);
    }
    if (k < K) {
      const vf v = simd::load_part(xm + k, static_cast<int>(K - k));
      mx = simd::max_abs(mx, v);
      bad = simd::fma(v, simd::zero(), bad);
    }
    const float amax = simd::reduce_max(mx);
    const bool finite = simd::reduce(bad) == 0.f;
    scale[m] = !finite ? NAN : amax > 0 ? amax / 32767.f : 1.f;
    const float inv = finite && amax > 0 ? 32767.f / amax : 0.f;
    const vf vinv = simd::set1(inv), lo = simd::set1(-32767.f), hi = simd::set1(32767.f);
    int16_t* qm = q + m * K;
    auto conv = [&](vf v) { return simd::clamp(simd::mul(v, vinv), lo, hi); };
    k = 0;
    for (; k + 2 * kLanes <= K; k += 2 * kLanes)
      simd::store_i16(qm + k, conv(simd::load(xm + k)), conv(simd::load(xm + k + kLanes)));
    for (; k < K; ++k) qm[k] = static_cast<int16_t>(nearbyintf(fminf(fmaxf(xm[k] * inv, -32767.f), 32767.f)));
  }
}

// W's rows are split between the threads in blocks of 16 (where R does not divide a share, its
// last rows go one at a time): as many threads as blocks at most, and this thread's rows n0 .. n1-1.
int share_threads(int64_t N, int threads) { return (N + 15) / 16 < threads ? static_cast<int>((N + 15) / 16) : threads; }
void share(int64_t N, int64_t& n0, int64_t& n1) {
  const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
  const int64_t per = ((N + 15) / 16 + T - 1) / T;
  n0 = t * per * 16;
  n1 = (t + 1) * per * 16 < N ? (t + 1) * per * 16 : N;
}

template <class Op, typename W, typename Y, typename Prep>
int linear(int64_t M, int64_t N, int64_t K, const W* w, int64_t ldw, Out<Y> out, int threads, Prep prep) {
  if (M < 1 || M > 16 || N < 1 || K < 1 || threads < 1) return 1;
  threads = share_threads(N, threads);
  const SpanFn<Op, W, Y> run = kSpans<Op, W, Y>[M - 1];
#pragma omp parallel num_threads(threads)
  {
    int64_t n0, n1;
    share(N, n0, n1);
    if (n0 < n1) {
      // each thread prepares x itself (a few µs): no barrier between the threads
      std::vector<typename Op::X> xbuf;
      std::vector<float> scale;
      int64_t ldx = 0;
      const typename Op::X* x = prep(xbuf, scale, ldx);
      Out<Y> o = out;
      if (!scale.empty()) o.x_scale = scale.data();
      run(n0, n1, K, x, ldx, w, ldw, o);
    }
  }
  return 0;
}


#if defined(__AMX_BF16__) && defined(PARSCALE_BF16_DOT)
// bfloat16 on AMX tiles (Intel Sapphire Rapids and later): one tile instruction multiplies 16 rows
// of W by 32 of K into 16 × M float32 sums, so 8 rows of x cost what one does and the product runs
// at the speed W streams in. The product is taken transposed, yᵀ = W xᵀ: W's rows load into tiles as
// they lie in memory, and only x is repacked (K/2 × M pairs, per call). Used where K is a multiple
// of 32 (one tile's width: every Llama / Qwen shape); the last N mod 16 rows go through the vector
// kernel. Each output is the same sum whatever M is (a row alone gives its bits in a batch); the
// order of the terms differs from the vector kernel's, as that differs from torch's.
namespace amx {

bool on = false;  // set by parscale_amx_enable: Linux grants tile state to processes that ask

struct alignas(64) Config {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};  // bytes per row of each tile
  uint8_t rows[16] = {};
};

// tiles 0..3: sums (16 rows of W × M rows of x, float32); 4, 5: 16 rows of W × 32 of K (bfloat16);
// 6: 32 of K of x as 16 pairs × M
void configure(int M) {
  Config c;
  for (int t = 0; t < 7; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = t == 4 || t == 5 ? 64 : static_cast<uint16_t>(4 * M);
  }
  _tile_loadconfig(&c);
}

// sums of rows n .. n+15 of W (a tile stored: 16 × M float32, rows of 64 bytes) into y, with bias,
// rounded to bfloat16
void put_sums(const float (&sums)[16][16], int M, int64_t n, Out<uint16_t> out) {
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < 16; ++r) {
      const float s = sums[r][m];
      put(out.y + m * out.ldy + n + r, out.bias ? s + get(out.bias[n + r]) : s);
    }
}

// rows n .. n+16G-1 of W (G = 1..4 tiles of sums). `pf` as in `block`: the rows a few blocks ahead,
// prefetched in address order, one step's worth per step.
template <int G>
void rows(int M, int64_t n, int64_t K, const uint32_t* xp, const uint16_t* w, int64_t ldw, Out<uint16_t> out,
          const char* pf) {
  _tile_zero(0);
  if constexpr (G > 1) _tile_zero(1);
  if constexpr (G > 2) _tile_zero(2);
  if constexpr (G > 3) _tile_zero(3);
  const uint16_t* wn = w + n * ldw;
  const int64_t ld = 2 * ldw;  // bytes
  for (int64_t k = 0; k < K; k += 32) {
    if (pf) {
      const char* p = pf + 16 * G * k * 2;
      for (int i = 0; i < 16 * G * 64; i += 64) _mm_prefetch(p + i, _MM_HINT_T1);
    }
    _tile_loadd(6, xp + k / 2 * M, 4 * M);
    _tile_loadd(4, wn + k, ld);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (G > 1) {
      _tile_loadd(5, wn + 16 * ldw + k, ld);
      _tile_dpbf16ps(1, 5, 6);
    }
    if constexpr (G > 2) {
      _tile_loadd(4, wn + 32 * ldw + k, ld);
      _tile_dpbf16ps(2, 4, 6);
    }
    if constexpr (G > 3) {
      _tile_loadd(5, wn + 48 * ldw + k, ld);
      _tile_dpbf16ps(3, 5, 6);
    }
  }
  // (the tile instructions name their tiles in the instruction: literal numbers, no loop)
  alignas(64) float sums[16][16];
  _tile_stored(0, sums, 64);
  put_sums(sums, M, n, out);
  if constexpr (G > 1) {
    _tile_stored(1, sums, 64);
    put_sums(sums, M, n + 16, out);
  }
  if constexpr (G > 2) {
    _tile_stored(2, sums, 64);
    put_sums(sums, M, n + 32, out);
  }
  if constexpr (G > 3) {
    _tile_stored(3, sums, 64);
    put_sums(sums, M, n + 48, out);
  }
}

// tiles of sums per block: 32 rows of W (a Xeon, 2 threads, 174M's weights: 8 rows in 15.0 ms at
// G = 2, 15.3 at 3, 16.1 at 1 or 4; the vector kernel 20.7; its one row 15.0; prefetching worth little)
constexpr int kGroup = 2;

int linear(int64_t M, int64_t N, int64_t K, const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t ldw,
           Out<uint16_t> out, int threads) {
  threads = share_threads(N, threads);
  const SpanFn<Bf16Pairs, uint16_t, uint16_t> tail = kSpans<Bf16Pairs, uint16_t, uint16_t>[M - 1];
#pragma omp parallel num_threads(threads)
  {
    int64_t n0, n1;
    share(N, n0, n1);
    if (n0 < n1) {
      const int64_t full = n0 + (n1 - n0) / 16 * 16;  // short of n1 only at N's end
      if (full > n0) {
        // x as pairs along K, M per row of pairs: xp[k/2][m] = x[m][k] | x[m][k+1] << 16
        std::vector<uint32_t> xp(static_cast<size_t>(K / 2 * M));
        for (int64_t m = 0; m < M; ++m)
          for (int64_t j = 0; j < K / 2; ++j)
            xp[j * M + m] = x[m * ldx + 2 * j] | static_cast<uint32_t>(x[m * ldx + 2 * j + 1]) << 16;
        configure(static_cast<int>(M));
        constexpr int64_t B = 16 * kGroup;
        int64_t n = n0;
        for (; n + B <= full; n += B) {
          const bool ahead = n + (kAhead + 1) * B <= full;
          rows<kGroup>(static_cast<int>(M), n, K, xp.data(), w, ldw, out,
                       ahead ? reinterpret_cast<const char*>(w + (n + kAhead * B) * ldw) : nullptr);
        }
        for (; n < full; n += 16) rows<1>(static_cast<int>(M), n, K, xp.data(), w, ldw, out, nullptr);
        _tile_release();  // no tile state kept between calls (it costs every context switch)
      }
      if (full < n1) tail(full, n1, K, x, ldx, w, ldw, out);
    }
  }
  return 0;
}

}  // namespace amx
#endif

}  // namespace

// All three return 0, or 1 for arguments out of range (nothing written).
extern "C" int parscale_skinny_linear(int64_t M, int64_t N, int64_t K, const float* x, int64_t ldx,
                                      const float* w, int64_t ldw, const float* bias, float* y,
                                      int64_t ldy, int threads) {
  auto prep = [&](std::vector<float>&, std::vector<float>&, int64_t& ld) { ld = ldx; return x; };
  return linear<Float32>(M, N, K, w, ldw, Out<float>{nullptr, nullptr, bias, y, ldy}, threads, prep);
}

// Weight-only int8: y = (x Qᵀ) · scale + b, Q int8 (N × K), scale float32 (N); x as 16-bit fixed
// point per row (quantize_rows), exact integer products summed in int32, then float32.
extern "C" int parscale_skinny_linear_int8(int64_t M, int64_t N, int64_t K, const float* x, int64_t ldx,
                                           const int8_t* w, int64_t ldw, const float* scale,
                                           const float* bias, float* y, int64_t ldy, int threads) {
  if (M < 1 || M > 16 || K < 1) return 1;
  auto prep = [&](std::vector<int16_t>& q, std::vector<float>& xs, int64_t& ld) {
    q.resize(static_cast<size_t>(M * K));
    xs.resize(static_cast<size_t>(M));
    quantize_rows(M, K, x, ldx, q.data(), xs.data());
    ld = K;
    return static_cast<const int16_t*>(q.data());
  };
  return linear<Int8Pairs>(M, N, K, w, ldw, Out<float>{scale, nullptr, bias, y, ldy}, threads, prep);
}

// bfloat16 throughout (x, W, b, y as their 16-bit patterns); float32 sums, y rounded to nearest even.
extern "C" int parscale_skinny_linear_bf16(int64_t M, int64_t N, int64_t K, const uint16_t* x, int64_t ldx,
                                           const uint16_t* w, int64_t ldw, const uint16_t* bias, uint16_t* y,
                                           int64_t ldy, int threads) {
  if (M < 1 || M > 16 || K < 1) return 1;
  const Out<uint16_t> out{nullptr, nullptr, bias, y, ldy};
#if defined(__AMX_BF16__) && defined(PARSCALE_BF16_DOT)
  if (amx::on && K % 32 == 0 && N >= 16 && threads >= 1) return amx::linear(M, N, K, x, ldx, w, ldw, out, threads);
#endif
#if defined(PARSCALE_BF16_DOT)
  auto prep = [&](std::vector<uint16_t>&, std::vector<float>&, int64_t& ld) { ld = ldx; return x; };
  return linear<Bf16Pairs>(M, N, K, w, ldw, out, threads, prep);
#else
  std::vector<float> wide;
  const float* xf = widen(M, K, x, ldx, wide);
  auto prep = [&](std::vector<float>&, std::vector<float>&, int64_t& ld) { ld = K; return xf; };
  return linear<Float32>(M, N, K, w, ldw, out, threads, prep);
#endif
}

// Asks Linux for the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) and, if
// granted, sends bfloat16 products to the tiles. 0 if they are on; 1 where this build or the kernel
// has none.
extern "C" int parscale_amx_enable() {
#if defined(__AMX_BF16__) && defined(PARSCALE_BF16_DOT)
  amx::on = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return amx::on ? 0 : 1;
#else
  return 1;
#endif
}
