// Single-query attention for decode steps: one new query per row and head against the row's cached
// keys and values, with grouped-query heads and an optional key mask; float32 or bfloat16 in and
// out, float32 inside (scores, softmax, sums). Built with skinny.cpp by parscale/kernels/__init__.py.
//
// Why: at P streams a decode step attends P times as many rows, each a few hundred keys: tiny
// sums. torch's fused CPU kernel is made for long queries, and its per-call set-up dominated
// (174M, P = 8, bf16 frozen: 4.1 ms of a 24.5 ms step against 1.0 ms at P = 1). Here each (row,
// KV head) pair is one task: its G = Hq / Hkv query heads share every key and value load.
//
// Layout (strides in elements, the last dimension contiguous): q (R, Hq, D), k and v (R, Hkv, L, D),
// mask (Rm, L) bytes with Rm = 1 (broadcast over rows) or R, 0 = hidden; out (R, Hq, D) contiguous.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <vector>

namespace {

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {  // bfloat16 is float32's top half
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(uint16_t* p, __m512 v) {  // round to nearest even (the values are finite)
  __m512i bits = _mm512_castps_si512(v);
  __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  bits = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
}

// e^x for x <= 0 (softmax after subtracting the max): 2^(x log2 e) = 2^n · 2^f, f in [-0.5, 0.5],
// 2^f by its Taylor series to degree 7 (relative error < 2e-8, below float32's rounding).
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));  // e^-104 is 0 in float32; keeps n finite
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.693147180559945309f));  // ln 2 · frac
  __m512 p = _mm512_set1_ps(1.f / 5040);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 720));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

constexpr int kMaxChunks = 16;  // head_dim / 16

// One (row, KV head) task: G query heads, L keys of D = 16·C features. G is a template argument
// so that the G accumulators live in registers.
template <typename T, int G>
void task(int C, int64_t L, const T* q, int64_t q_head, const T* k, const T* v, int64_t kv_pos,
          const uint8_t* mask, int64_t mask_pos, float scale, T* out, std::vector<float>& scores) {
  __m512 qv[G][kMaxChunks];  // the scaled queries, float32
  for (int h = 0; h < G; ++h)
    for (int c = 0; c < C; ++c) qv[h][c] = _mm512_mul_ps(load16(q + h * q_head + 16 * c), _mm512_set1_ps(scale));
  scores.resize(static_cast<size_t>(G) * L);
  float* s = scores.data();  // (G, L)
  float mx[G];
  for (int h = 0; h < G; ++h) mx[h] = -__builtin_inff();
  for (int64_t j = 0; j < L; ++j) {
    if (mask && !mask[j * mask_pos]) {
      for (int h = 0; h < G; ++h) s[h * L + j] = -__builtin_inff();
      continue;
    }
    const T* kj = k + j * kv_pos;
    __m512 acc[G];
    for (int h = 0; h < G; ++h) acc[h] = _mm512_setzero_ps();
    for (int c = 0; c < C; ++c) {
      const __m512 kc = load16(kj + 16 * c);
      for (int h = 0; h < G; ++h) acc[h] = _mm512_fmadd_ps(qv[h][c], kc, acc[h]);
    }
    for (int h = 0; h < G; ++h) {
      const float d = _mm512_reduce_add_ps(acc[h]);
      s[h * L + j] = d;
      mx[h] = d > mx[h] ? d : mx[h];
    }
  }
  // softmax per head
  float inv[G];
  for (int h = 0; h < G; ++h) {
    float* sh = s + h * L;
    if (mx[h] == -__builtin_inff()) {  // every key hidden: zeros, not NaN
      memset(sh, 0, sizeof(float) * L);
      inv[h] = 0.f;
      continue;
    }
    const __m512 m = _mm512_set1_ps(mx[h]);
    __m512 sum = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= L; j += 16) {
      const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sh + j), m));
      _mm512_storeu_ps(sh + j, e);
      sum = _mm512_add_ps(sum, e);
    }
    if (j < L) {
      const __mmask16 t = static_cast<__mmask16>((1u << (L - j)) - 1);
      const __m512 e = _mm512_maskz_mov_ps(t, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(t, sh + j), m)));
      _mm512_mask_storeu_ps(sh + j, t, e);
      sum = _mm512_add_ps(sum, e);
    }
    inv[h] = 1.f / _mm512_reduce_add_ps(sum);
  }
  // out[h] = sum_j p[h, j] v_j, one 16-feature chunk at a time (G accumulators)
  for (int c = 0; c < C; ++c) {
    __m512 acc[G];
    for (int h = 0; h < G; ++h) acc[h] = _mm512_setzero_ps();
    for (int64_t j = 0; j < L; ++j) {
      if (mask && !mask[j * mask_pos]) continue;
      const __m512 vc = load16(v + j * kv_pos + 16 * c);
      for (int h = 0; h < G; ++h) acc[h] = _mm512_fmadd_ps(_mm512_set1_ps(s[h * L + j]), vc, acc[h]);
    }
    for (int h = 0; h < G; ++h) store16(out + h * C * 16 + 16 * c, _mm512_mul_ps(acc[h], _mm512_set1_ps(inv[h])));
  }
}

template <typename T, int G>
void run(int64_t R, int64_t Hkv, int64_t L, int64_t D, const T* q, const int64_t* qs, const T* k,
         const int64_t* ks, const T* v, const int64_t* vs, const uint8_t* mask, const int64_t* ms,
         float scale, T* out, int threads) {
  const int C = static_cast<int>(D / 16);
  const int64_t tasks = R * Hkv, Hq = G * Hkv;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scores;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < tasks; ++i) {
      const int64_t r = i / Hkv, g = i % Hkv;
      const uint8_t* mr = mask ? mask + (ms[0] ? r * ms[0] : 0) : nullptr;
      task<T, G>(C, L, q + r * qs[0] + g * G * qs[1], qs[1], k + r * ks[0] + g * ks[1], v + r * vs[0] + g * vs[1],
                 ks[2], mr, mask ? ms[1] : 0, scale, out + (r * Hq + g * G) * D, scores);
    }
  }
}

template <typename T>
int dispatch(int64_t R, int64_t Hq, int64_t Hkv, int64_t L, int64_t D, const void* q, const int64_t* qs,
             const void* k, const int64_t* ks, const void* v, const int64_t* vs, const uint8_t* mask,
             const int64_t* ms, float scale, void* out, int threads) {
  const T *tq = static_cast<const T*>(q), *tk = static_cast<const T*>(k), *tv = static_cast<const T*>(v);
  T* to = static_cast<T*>(out);
#define PARSCALE_GROUP(n) \
  case n: run<T, n>(R, Hkv, L, D, tq, qs, tk, ks, tv, vs, mask, ms, scale, to, threads); return 0;
  switch (Hq / Hkv) {
    PARSCALE_GROUP(1) PARSCALE_GROUP(2) PARSCALE_GROUP(3) PARSCALE_GROUP(4)
    PARSCALE_GROUP(5) PARSCALE_GROUP(6) PARSCALE_GROUP(7) PARSCALE_GROUP(8)
    default: return 1;
  }
#undef PARSCALE_GROUP
}

}  // namespace

// Strides: qs (row, head), ks / vs (row, head, position; k and v must share the position stride),
// ms (row: 0 to broadcast, position). bf16: nonzero for bfloat16 data. Returns 0, or 1 for
// arguments out of range (nothing written): up to 8 query heads per KV head.
extern "C" int parscale_decode_attention(int64_t R, int64_t Hq, int64_t Hkv, int64_t L, int64_t D,
                                         const void* q, const int64_t* qs, const void* k, const int64_t* ks,
                                         const void* v, const int64_t* vs, const uint8_t* mask,
                                         const int64_t* ms, float scale, void* out, int bf16, int threads) {
  if (R < 1 || Hkv < 1 || Hq % Hkv || L < 1 || D % 16 || D < 16 || D / 16 > kMaxChunks ||
      ks[2] != vs[2] || threads < 1)
    return 1;
  if (threads > R * Hkv) threads = static_cast<int>(R * Hkv);
  return bf16 ? dispatch<uint16_t>(R, Hq, Hkv, L, D, q, qs, k, ks, v, vs, mask, ms, scale, out, threads)
              : dispatch<float>(R, Hq, Hkv, L, D, q, qs, k, ks, v, vs, mask, ms, scale, out, threads);
}
