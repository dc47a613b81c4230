// The float32 vector both kernels are written in: 16 lanes under AVX-512, 8 under AVX2 + FMA.
// parscale/kernels/__init__.py compiles the sources once per instruction set it finds (the flags
// pick the branch below), so one source serves AVX-512 servers and the AVX2-only laptops and older
// servers that most local users have.
#pragma once
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

namespace simd {

constexpr float kExpTaylor[] = {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f};  // 1/6! .. 1/0!

#if defined(__AVX512F__)
constexpr int kLanes = 16;
using vf = __m512;
inline vf zero() { return _mm512_setzero_ps(); }
inline vf set1(float a) { return _mm512_set1_ps(a); }
inline vf add(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline float reduce(vf v) { return _mm512_reduce_add_ps(v); }
inline vf load(const float* p) { return _mm512_loadu_ps(p); }
inline vf load(const int8_t* p) {  // int8 widened exactly
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline vf load(const uint16_t* p) {  // bfloat16 is float32's top half
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline void store(float* p, vf v) { _mm512_storeu_ps(p, v); }
// int16 pairs (weight-only int8 against 16-bit activations): a register holds 2·kLanes int16;
// dot2 adds each lane's two products to the int32 lane of acc (one instruction with VNNI). The
// int32 accumulators are GCC's plain vector type: arrays of __m512i (a may_alias type) were kept
// in memory, a store per multiply (8 rows at a third of the speed)
using vi = __m512i;
using vi32 = __v16si;
inline vi32 izero() { return (vi32)_mm512_setzero_si512(); }
inline vi load_i16(const int16_t* p) { return _mm512_loadu_si512(p); }
inline vi load_i16(const int8_t* p) {  // 2·kLanes int8 widened exactly
  return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#if defined(__AVX512VNNI__)
inline vi32 dot2(vi32 acc, vi a, vi b) { return (vi32)_mm512_dpwssd_epi32((vi)acc, a, b); }
#else
inline vi32 dot2(vi32 acc, vi a, vi b) { return (vi32)_mm512_add_epi32((vi)acc, _mm512_madd_epi16(a, b)); }
#endif
inline vf to_float(vi32 v) { return _mm512_cvtepi32_ps((vi)v); }
inline vf max_abs(vf m, vf v) { return _mm512_max_ps(m, _mm512_abs_ps(v)); }
inline vf clamp(vf v, vf lo, vf hi) { return _mm512_min_ps(_mm512_max_ps(v, lo), hi); }
inline vf div(vf a, vf b) { return _mm512_div_ps(a, b); }
inline vf min0(vf v) { return _mm512_min_ps(v, _mm512_setzero_ps()); }
inline vf select_pos(vf x, vf a, vf b) {  // x >= 0 ? a : b
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ), b, a);
}
// The sums of kLanes vectors at once, sums[i] = Σ v[i]: a transposing tree (46 instructions for 16
// sums, against 9 or so per reduce). Halves of pairs, then quarters, then a 4 × 4 transpose within
// each 128-bit lane leaves lane 4i + j holding v[4j + i]'s sum; one permute puts it in order.
inline vf hsums(const vf* v) {
  vf a[8], b[4];
  for (int i = 0; i < 8; ++i)
    a[i] = add(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44), _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int j = 0; j < 4; ++j)
    b[j] = add(_mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0x88), _mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0xDD));
  const vf c01 = add(_mm512_unpacklo_ps(b[0], b[1]), _mm512_unpackhi_ps(b[0], b[1]));
  const vf c23 = add(_mm512_unpacklo_ps(b[2], b[3]), _mm512_unpackhi_ps(b[2], b[3]));
  const vf r = add(_mm512_shuffle_ps(c01, c23, 0x44), _mm512_shuffle_ps(c01, c23, 0xEE));
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), r);
}
inline float reduce_max(vf v) { return _mm512_reduce_max_ps(v); }
inline void store_i16(int16_t* p, vf lo, vf hi) {  // round to nearest (even), |values| ≤ 32767
  const __m256i a = _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(lo)), b = _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(hi));
  _mm512_storeu_si512(p, _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1));
}
#if defined(__AVX512BF16__)
// bfloat16 pairs: 2·kLanes bfloat16 per register; each float32 lane of acc gains its two products
#define PARSCALE_BF16_DOT 1
inline vi load_bf16_pairs(const uint16_t* p) { return _mm512_loadu_si512(p); }
inline vf dot2_bf16(vf acc, vi a, vi b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }
#endif
inline void store(uint16_t* p, vf v) {  // round to nearest even (the values are finite)
  __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  bits = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
}
// e^x for x <= 0 (softmax after subtracting the max): 2^(x log2 e) = 2^n · 2^f, f in [-0.5, 0.5],
// 2^f by its Taylor series to degree 7 (relative error < 2e-8, below float32's rounding).
inline vf exp_neg(vf x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));  // e^-104 is 0 in float32; keeps n finite
  const vf t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const vf n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vf f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.693147180559945309f));  // ln 2 · frac
  vf p = set1(1.f / 5040);  // Horner, from degree 7 down
  for (float c : kExpTaylor) p = fma(p, f, set1(c));
  return _mm512_scalef_ps(p, n);
}
#else
constexpr int kLanes = 8;
using vf = __m256;
inline vf zero() { return _mm256_setzero_ps(); }
inline vf set1(float a) { return _mm256_set1_ps(a); }
inline vf add(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline float reduce(vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline vf load(const float* p) { return _mm256_loadu_ps(p); }
inline vf load(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline vf load(const uint16_t* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
inline void store(float* p, vf v) { _mm256_storeu_ps(p, v); }
using vi = __m256i;
using vi32 = __v8si;
inline vi32 izero() { return (vi32)_mm256_setzero_si256(); }
inline vi load_i16(const int16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline vi load_i16(const int8_t* p) { return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline vi32 dot2(vi32 acc, vi a, vi b) { return (vi32)_mm256_add_epi32((vi)acc, _mm256_madd_epi16(a, b)); }
inline vf to_float(vi32 v) { return _mm256_cvtepi32_ps((vi)v); }
inline vf max_abs(vf m, vf v) { return _mm256_max_ps(m, _mm256_andnot_ps(_mm256_set1_ps(-0.f), v)); }
inline vf clamp(vf v, vf lo, vf hi) { return _mm256_min_ps(_mm256_max_ps(v, lo), hi); }
inline vf div(vf a, vf b) { return _mm256_div_ps(a, b); }
inline vf min0(vf v) { return _mm256_min_ps(v, _mm256_setzero_ps()); }
inline vf select_pos(vf x, vf a, vf b) { return _mm256_blendv_ps(b, a, _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GE_OQ)); }
// sums[i] = Σ v[i] for 8 vectors: halves of pairs, then a 4 × 4 transpose within each 128-bit lane
// (lane 4i + j holds v[2j + i]'s sum), then one permute
inline vf hsums(const vf* v) {
  vf a[4];
  for (int i = 0; i < 4; ++i)
    a[i] = add(_mm256_permute2f128_ps(v[2 * i], v[2 * i + 1], 0x20), _mm256_permute2f128_ps(v[2 * i], v[2 * i + 1], 0x31));
  const vf c01 = add(_mm256_unpacklo_ps(a[0], a[1]), _mm256_unpackhi_ps(a[0], a[1]));
  const vf c23 = add(_mm256_unpacklo_ps(a[2], a[3]), _mm256_unpackhi_ps(a[2], a[3]));
  const vf r = add(_mm256_shuffle_ps(c01, c23, 0x44), _mm256_shuffle_ps(c01, c23, 0xEE));
  return _mm256_permutevar8x32_ps(r, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}
inline float reduce_max(vf v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
inline void store_i16(int16_t* p, vf lo, vf hi) {
  const __m256i w = _mm256_packs_epi32(_mm256_cvtps_epi32(lo), _mm256_cvtps_epi32(hi));  // per 128-bit lane
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permute4x64_epi64(w, 0xD8));
}
inline void store(uint16_t* p, vf v) {  // round to nearest even (the values are finite)
  __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  bits = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd)), 16);
  // pack the 8 halves (each < 2^16, so no saturation); packus works per 128-bit lane: gather lanes 0, 2
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(bits, bits), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
// e^x for x <= 0 as above; 2^n built in the exponent bits, so x is clamped at -87 (2^n stays a
// normal float: the smallest weight becomes e^-87 ≈ 2e-38 instead of 0, far below any sum's rounding).
inline vf exp_neg(vf x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const vf t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
  const vf n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vf f = _mm256_mul_ps(_mm256_sub_ps(t, n), _mm256_set1_ps(0.693147180559945309f));
  vf p = set1(1.f / 5040);
  for (float c : kExpTaylor) p = fma(p, f, set1(c));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

// One bfloat16 (its bits) to and from float32; to: round to nearest even, NaN stays NaN.
inline float bf16_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1)) >> 16);
}

// The first n (< kLanes) elements at p, zeros after; never touches memory past p + n (the tails).
template <typename T>
inline vf load_part(const T* p, int n) {
  T buf[kLanes] = {};
  memcpy(buf, p, sizeof(T) * n);
  return load(buf);
}
template <typename T>
inline void store_part(T* p, vf v, int n) {
  T buf[kLanes];
  store(buf, v);
  memcpy(p, buf, sizeof(T) * n);
}

}  // namespace simd
