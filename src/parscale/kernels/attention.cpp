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
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <vector>

#include "simd.h"

namespace {

using simd::vf;
using simd::vi;
using simd::kLanes;
constexpr int kMaxChunks = 256 / kLanes;  // head_dim / lanes

// a thread's bfloat16 probabilities (values_bf16), kept between calls
inline std::vector<uint16_t>& bf16_buf() {
  static thread_local std::vector<uint16_t> buf;
  return buf;
}

// Chunks c .. c+B-1 of the G heads' outputs from the probabilities p (G, n) and the values.
template <typename T, int G, int B>
inline void values(int c, int C, int64_t n, const float* p, const T* v, int64_t kv_pos, const uint8_t* mask,
                   int64_t mask_pos, const float* inv, T* out) {
  vf acc[G][B];
  for (int h = 0; h < G; ++h)
    for (int b = 0; b < B; ++b) acc[h][b] = simd::zero();
  for (int64_t j = 0; j < n; ++j) {
    if (mask && !mask[j * mask_pos]) continue;
    vf vc[B];
    for (int b = 0; b < B; ++b) vc[b] = simd::load(v + j * kv_pos + kLanes * (c + b));
    for (int h = 0; h < G; ++h) {
      const vf ph = simd::set1(p[h * n + j]);
      for (int b = 0; b < B; ++b) acc[h][b] = simd::fma(ph, vc[b], acc[h][b]);
    }
  }
  for (int h = 0; h < G; ++h)
    for (int b = 0; b < B; ++b) simd::store(out + h * C * kLanes + kLanes * (c + b), simd::mul(acc[h][b], simd::set1(inv[h])));
}

// The scaled scores s (G, n) of G query heads against n keys, and each head's maximum; a hidden key
// scores -inf. Both operands widened to float32 (one product per lane and instruction).
template <typename T, int G>
inline void scores(int C, int64_t n, const T* q, int64_t q_head, const T* k, int64_t kv_pos, const uint8_t* mask,
                   int64_t mask_pos, float scale, float* s, float* mx) {
  vf qv[G][kMaxChunks];  // the scaled queries, float32
  for (int h = 0; h < G; ++h)
    for (int c = 0; c < C; ++c) qv[h][c] = simd::mul(simd::load(q + h * q_head + kLanes * c), simd::set1(scale));
  for (int64_t j = 0; j < n; ++j) {
    if (mask && !mask[j * mask_pos]) {
      for (int h = 0; h < G; ++h) s[h * n + j] = -__builtin_inff();
      continue;
    }
    const T* kj = k + j * kv_pos;
    vf acc[G];
    for (int h = 0; h < G; ++h) acc[h] = simd::zero();
    for (int c = 0; c < C; ++c) {
      const vf kc = simd::load(kj + kLanes * c);
      for (int h = 0; h < G; ++h) acc[h] = simd::fma(qv[h][c], kc, acc[h]);
    }
    for (int h = 0; h < G; ++h) {
      const float d = simd::reduce(acc[h]);
      s[h * n + j] = d;
      mx[h] = d > mx[h] ? d : mx[h];
    }
  }
}

#if defined(PARSCALE_BF16_DOT)
// The same for bfloat16 queries and keys as stored, 2·kLanes features per instruction (AVX512_BF16:
// each pair's products exact in float32, summed in float32), the scale applied to each sum: half the
// instructions of widening both (174M, P = 8: the scores are half of a decode step's attention).
// C2 = D / (2·kLanes) pair chunks.
template <int G>
inline void scores_bf16(int C2, int64_t n, const uint16_t* q, int64_t q_head, const uint16_t* k, int64_t kv_pos,
                        const uint8_t* mask, int64_t mask_pos, float scale, float* s, float* mx) {
  vi qv[G][kMaxChunks / 2];
  for (int h = 0; h < G; ++h)
    for (int c = 0; c < C2; ++c) qv[h][c] = simd::load_bf16_pairs(q + h * q_head + 2 * kLanes * c);
  for (int64_t j = 0; j < n; ++j) {
    if (mask && !mask[j * mask_pos]) {
      for (int h = 0; h < G; ++h) s[h * n + j] = -__builtin_inff();
      continue;
    }
    const uint16_t* kj = k + j * kv_pos;
    vf acc[G];
    for (int h = 0; h < G; ++h) acc[h] = simd::zero();
    for (int c = 0; c < C2; ++c) {
      const vi kc = simd::load_bf16_pairs(kj + 2 * kLanes * c);
      for (int h = 0; h < G; ++h) acc[h] = simd::dot2_bf16(acc[h], qv[h][c], kc);
    }
    for (int h = 0; h < G; ++h) {
      const float d = simd::reduce(acc[h]) * scale;
      s[h * n + j] = d;
      mx[h] = d > mx[h] ? d : mx[h];
    }
  }
}

// Pair chunks c .. c+B-1 (2·kLanes features each) of the G heads' outputs, from the probabilities as
// bfloat16 pb (G rows of n2 = n rounded up to even; torch's bfloat16 attention rounds them so too)
// and the values: keys j and j+1 interleaved feature by feature (unpacklo/hi within each 128-bit
// lane) meet the pair (p_j, p_j+1) in one instruction. The accumulators hold the features in that
// interleaved order; `kFromPairs` puts them back when they are stored. Hidden keys, and the key past
// an odd n, are read as zeros (their p is 0, and a hidden slot may hold anything).
template <int G, int B>
inline void values_bf16(int c, int C2, int64_t n, const uint16_t* pb, int64_t n2, const uint16_t* v, int64_t kv_pos,
                        const uint8_t* mask, int64_t mask_pos, const float* inv, uint16_t* out) {
  vf lo[G][B], hi[G][B];
  for (int h = 0; h < G; ++h)
    for (int b = 0; b < B; ++b) lo[h][b] = hi[h][b] = simd::zero();
  const vi none = _mm512_setzero_si512();
  for (int64_t j = 0; j < n; j += 2) {
    const uint16_t* v0 = v + j * kv_pos;
    const bool has0 = !mask || mask[j * mask_pos];
    const bool has1 = j + 1 < n && (!mask || mask[(j + 1) * mask_pos]);
    vi a[B], e[B];
    for (int b = 0; b < B; ++b) {
      const vi x0 = has0 ? simd::load_bf16_pairs(v0 + 2 * kLanes * (c + b)) : none;
      const vi x1 = has1 ? simd::load_bf16_pairs(v0 + kv_pos + 2 * kLanes * (c + b)) : none;
      a[b] = _mm512_unpacklo_epi16(x0, x1);
      e[b] = _mm512_unpackhi_epi16(x0, x1);
    }
    for (int h = 0; h < G; ++h) {
      uint32_t pair;
      memcpy(&pair, pb + h * n2 + j, sizeof(pair));
      const vi ph = _mm512_set1_epi32(static_cast<int>(pair));
      for (int b = 0; b < B; ++b) {
        lo[h][b] = simd::dot2_bf16(lo[h][b], ph, a[b]);
        hi[h][b] = simd::dot2_bf16(hi[h][b], ph, e[b]);
      }
    }
  }
  // lane 4L + t of lo holds feature 8L + t of the chunk, of hi feature 8L + 4 + t
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int h = 0; h < G; ++h)
    for (int b = 0; b < B; ++b) {
      uint16_t* o = out + h * C2 * 2 * kLanes + 2 * kLanes * (c + b);
      const vf w = simd::set1(inv[h]);
      simd::store(o, simd::mul(_mm512_permutex2var_ps(lo[h][b], first, hi[h][b]), w));
      simd::store(o + kLanes, simd::mul(_mm512_permutex2var_ps(lo[h][b], second, hi[h][b]), w));
    }
}
#endif

// One (row, KV head) task: G query heads, n keys of D = kLanes·C features (see simd.h). G is a template argument
// so that the G accumulators live in registers.
template <typename T, int G>
void task(int C, int64_t n, const T* q, int64_t q_head, const T* k, const T* v, int64_t kv_pos,
          const uint8_t* mask, int64_t mask_pos, float scale, T* out, std::vector<float>& buf) {
  buf.resize(static_cast<size_t>(G) * n);
  float* s = buf.data();  // (G, n)
  float mx[G];
  for (int h = 0; h < G; ++h) mx[h] = -__builtin_inff();
#if defined(PARSCALE_BF16_DOT)
  if constexpr (sizeof(T) == 2) {
    if (C % 2 == 0) scores_bf16<G>(C / 2, n, q, q_head, k, kv_pos, mask, mask_pos, scale, s, mx);
    else scores<T, G>(C, n, q, q_head, k, kv_pos, mask, mask_pos, scale, s, mx);
  } else {
    scores<T, G>(C, n, q, q_head, k, kv_pos, mask, mask_pos, scale, s, mx);
  }
#else
  scores<T, G>(C, n, q, q_head, k, kv_pos, mask, mask_pos, scale, s, mx);
#endif
  // softmax per head
  float inv[G];
  for (int h = 0; h < G; ++h) {
    float* sh = s + h * n;
    if (mx[h] == -__builtin_inff()) {  // every key hidden: zeros, not NaN
      memset(sh, 0, sizeof(float) * n);
      inv[h] = 0.f;
      continue;
    }
    const vf m = simd::set1(mx[h]);
    vf sum = simd::zero();
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
      const vf e = simd::exp_neg(simd::sub(simd::load(sh + j), m));
      simd::store(sh + j, e);
      sum = simd::add(sum, e);
    }
    float total = simd::reduce(sum);
    if (j < n) {  // the last n % lanes scores
      const int t = static_cast<int>(n - j);
      float e[kLanes];
      simd::store(e, simd::exp_neg(simd::sub(simd::load_part(sh + j, t), m)));
      for (int i = 0; i < t; ++i) {
        sh[j + i] = e[i];
        total += e[i];
      }
    }
    inv[h] = 1.f / total;
  }
#if defined(PARSCALE_BF16_DOT)
  if constexpr (sizeof(T) == 2) {
    if (C % 2 == 0) {  // pair products, as the scores
      const int64_t n2 = n + (n & 1);
      std::vector<uint16_t>& pb = bf16_buf();
      pb.resize(static_cast<size_t>(G) * n2);
      for (int h = 0; h < G; ++h) {
        const float* sh = s + h * n;
        uint16_t* ph = pb.data() + h * n2;
        int64_t j = 0;
        for (; j + kLanes <= n; j += kLanes) simd::store(ph + j, simd::load(sh + j));  // rounded to nearest even
        for (; j < n; ++j) ph[j] = simd::float_to_bf16(sh[j]);
        if (n & 1) ph[n] = 0;
      }
      constexpr int B = G >= 8 ? 1 : 8 / G > 4 ? 4 : 8 / G;  // 2·G·B accumulators, at most 16
      const int C2 = C / 2;
      int c = 0;
      for (; c + B <= C2; c += B) values_bf16<G, B>(c, C2, n, pb.data(), n2, v, kv_pos, mask, mask_pos, inv, out);
      for (; c < C2; ++c) values_bf16<G, 1>(c, C2, n, pb.data(), n2, v, kv_pos, mask, mask_pos, inv, out);
      return;
    }
  }
#endif
  // out[h] = sum_j p[h, j] v_j, B feature chunks at a time (G·B accumulators): each pass over
  // the values reads B chunks of every row (one chunk per pass was C passes over V: 174M, P = 8,
  // bfloat16, 0.6× the time)
  constexpr int acc_regs = kLanes == 16 ? 16 : 8, most = kLanes == 16 ? 8 : 4;  // of 32 or 16 registers
  constexpr int B = acc_regs / G < 1 ? 1 : acc_regs / G > most ? most : acc_regs / G;
  int c = 0;
  for (; c + B <= C; c += B) values<T, G, B>(c, C, n, s, v, kv_pos, mask, mask_pos, inv, out);
  for (; c < C; ++c) values<T, G, 1>(c, C, n, s, v, kv_pos, mask, mask_pos, inv, out);
}

template <typename T, int G>
void run(int64_t R, int64_t Hkv, int64_t L, int64_t D, const T* q, const int64_t* qs, const T* k,
         const int64_t* ks, const T* v, const int64_t* vs, const uint8_t* mask, const int64_t* ms,
         float scale, T* out, int threads) {
  const int C = static_cast<int>(D / kLanes);
  const int64_t tasks = R * Hkv, Hq = G * Hkv;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> buf;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < tasks; ++i) {
      const int64_t r = i / Hkv, g = i % Hkv;
      const uint8_t* mr = mask ? mask + (ms[0] ? r * ms[0] : 0) : nullptr;
      task<T, G>(C, L, q + r * qs[0] + g * G * qs[1], qs[1], k + r * ks[0] + g * ks[1], v + r * vs[0] + g * vs[1],
                 ks[2], mr, mask ? ms[1] : 0, scale, out + (r * Hq + g * G) * D, buf);
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

// Strides: q (row, head), k / v (row, head, position; k and v must share the position stride),
// mask (row: 0 to broadcast, position). bf16: nonzero for bfloat16 data. Returns 0, or 1 for
// arguments out of range (nothing written): up to 8 query heads per KV head.
// (Strides as scalars: ctypes builds an array per pointer argument, a few µs a call.)
extern "C" int parscale_decode_attention(int64_t R, int64_t Hq, int64_t Hkv, int64_t L, int64_t D,
                                         const void* q, int64_t q_row, int64_t q_head, const void* k,
                                         int64_t k_row, int64_t k_head, int64_t k_pos, const void* v,
                                         int64_t v_row, int64_t v_head, int64_t v_pos, const uint8_t* mask,
                                         int64_t m_row, int64_t m_pos, float scale, void* out, int bf16,
                                         int threads) {
  const int64_t qs[3] = {q_row, q_head, 0}, ks[3] = {k_row, k_head, k_pos}, vs[3] = {v_row, v_head, v_pos},
                ms[3] = {m_row, m_pos, 0};
  if (R < 1 || Hkv < 1 || Hq % Hkv || L < 1 || D % 16 || D < 16 || D > 256 ||
      ks[2] != vs[2] || threads < 1)
    return 1;
  if (threads > R * Hkv) threads = static_cast<int>(R * Hkv);
  return bf16 ? dispatch<uint16_t>(R, Hq, Hkv, L, D, q, qs, k, ks, v, vs, mask, ms, scale, out, threads)
              : dispatch<float>(R, Hq, Hkv, L, D, q, qs, k, ks, v, vs, mask, ms, scale, out, threads);
}
