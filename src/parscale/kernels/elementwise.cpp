// The small per-row steps between a decode step's products, each one pass over a few rows:
// RMSNorm and the SwiGLU gate. float32 or bfloat16 in and out, float32 inside, rounding where
// torch's eager ops round (so a decode step gives what the plain layers give, up to the order of
// one sum). Built with skinny.cpp by parscale/kernels/__init__.py; one thread (a few µs of work:
// a parallel region would cost as much).
//
// Why: in eager PyTorch each is 5-7 small ops (pow, mean, add, rsqrt, mul, cast, mul; silu, mul),
// a few µs apiece, so at 174M they were ~1.5 ms of a 24 ms bfloat16 P = 8 step.
#include <math.h>
#include <stdint.h>

#include "simd.h"

namespace {

using simd::vf;
using simd::kLanes;

inline vf load_f(const float* p) { return simd::load(p); }
inline vf load_f(const uint16_t* p) { return simd::load(p); }
inline float get(float v) { return v; }
inline float get(uint16_t v) { return simd::bf16_to_float(v); }
inline void put(float* p, float v) { *p = v; }
inline void put(uint16_t* p, float v) { *p = simd::float_to_bf16(v); }
// the value as the stored dtype would hold it (bfloat16: rounded), as float32
inline vf round_to(vf v, const float*) { return v; }
inline vf round_to(vf v, const uint16_t*) {
  uint16_t b[kLanes];
  simd::store(b, v);
  return simd::load(b);
}
inline float round_to(float v, const float*) { return v; }
inline float round_to(float v, const uint16_t*) { return simd::bf16_to_float(simd::float_to_bf16(v)); }

// y[m] = w · T(x[m] · rsqrt(mean(x[m]²) + eps)), T the cast to the storage type (as RMSNorm does)
template <typename T>
void rms_norm(int64_t M, int64_t K, const T* x, int64_t ldx, const T* w, float eps, T* y, int64_t ldy) {
  for (int64_t m = 0; m < M; ++m) {
    const T* xm = x + m * ldx;
    T* ym = y + m * ldy;
    vf ss = simd::zero();
    int64_t k = 0;
    for (; k + kLanes <= K; k += kLanes) {
      const vf v = load_f(xm + k);
      ss = simd::fma(v, v, ss);
    }
    float sum = simd::reduce(ss);
    for (int64_t j = k; j < K; ++j) sum += get(xm[j]) * get(xm[j]);
    const float r = 1.f / sqrtf(sum / static_cast<float>(K) + eps);
    const vf vr = simd::set1(r);
    for (k = 0; k + kLanes <= K; k += kLanes)
      simd::store(ym + k, simd::mul(load_f(w + k), round_to(simd::mul(load_f(xm + k), vr), xm)));
    for (int64_t j = k; j < K; ++j) put(ym + j, get(w[j]) * round_to(get(xm[j]) * r, xm));
  }
}

// y[m] = T(silu(g[m])) · u[m] with g, u the two halves of each row of gu (as F.silu(g) * u)
template <typename T>
void silu_mul(int64_t M, int64_t I, const T* gu, int64_t ld, T* y, int64_t ldy) {
  const vf one = simd::set1(1.f);
  for (int64_t m = 0; m < M; ++m) {
    const T *g = gu + m * ld, *u = g + I;
    T* ym = y + m * ldy;
    int64_t k = 0;
    for (; k + kLanes <= I; k += kLanes) {
      const vf gv = load_f(g + k);
      // silu(x) = x / (1 + e^-x); e^-x for x <= 0 is e^x's reciprocal: exp_neg only sees x <= 0
      const vf neg = simd::min0(gv), pos = simd::sub(gv, neg);  // min(x, 0) and max(x, 0)
      const vf e = simd::exp_neg(simd::sub(neg, pos));          // e^-|x|
      const vf sig = simd::div(simd::select_pos(gv, one, e), simd::add(one, e));  // x >= 0: 1/(1+e), else e/(1+e)
      simd::store(ym + k, simd::mul(round_to(simd::mul(gv, sig), g), load_f(u + k)));
    }
    for (; k < I; ++k) {
      const float x = get(g[k]);
      put(ym + k, round_to(x / (1.f + expf(-x)), g) * get(u[k]));
    }
  }
}

}  // namespace

// Both return 0, or 1 for arguments out of range. bf16: nonzero for bfloat16 data.
extern "C" int parscale_rms_norm(int64_t M, int64_t K, const void* x, int64_t ldx, const void* w, float eps,
                                 void* y, int64_t ldy, int bf16) {
  if (M < 1 || K < 1) return 1;
  if (bf16)
    rms_norm(M, K, static_cast<const uint16_t*>(x), ldx, static_cast<const uint16_t*>(w), eps, static_cast<uint16_t*>(y), ldy);
  else
    rms_norm(M, K, static_cast<const float*>(x), ldx, static_cast<const float*>(w), eps, static_cast<float*>(y), ldy);
  return 0;
}

extern "C" int parscale_silu_mul(int64_t M, int64_t I, const void* gu, int64_t ld, void* y, int64_t ldy, int bf16) {
  if (M < 1 || I < 1) return 1;
  if (bf16)
    silu_mul(M, I, static_cast<const uint16_t*>(gu), ld, static_cast<uint16_t*>(y), ldy);
  else
    silu_mul(M, I, static_cast<const float*>(gu), ld, static_cast<float*>(y), ldy);
  return 0;
}
