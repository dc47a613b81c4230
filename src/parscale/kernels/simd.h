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
