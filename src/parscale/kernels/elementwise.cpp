// The small per-row steps between a decode step's products, each one pass over a few rows:
// RMSNorm, the SwiGLU gate, and RoPE with the step's key/value cache write. float32 or bfloat16
// in and out, float32 inside, rounding where torch's eager ops round (so a decode step gives what
// the plain layers give, up to the order of one sum). Built with skinny.cpp by parscale/kernels/__init__.py; one thread (a few µs of work:
// a parallel region would cost as much).
//
// Why: in eager PyTorch each is 5-7 small ops (pow, mean, add, rsqrt, mul, cast, mul; silu, mul),
// a few µs apiece, so at 174M they were ~1.5 ms of a 24 ms bfloat16 P = 8 step; RoPE and the
// cache write were 8 more (split, two reshapes, chunk, neg, cat, two muls, an add, two copies).
#include <math.h>
#include <stdint.h>
#include <string.h>

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

// x · cos + rotate_half(x) · sin for one head (rotate_half(x) = [-x2, x1], x = [x1, x2]), each
// product and the sum rounded to the storage type as torch's three ops round them
template <typename T>
inline void rope_head(int64_t D, const T* x, const T* c, const T* s, T* out) {
  const int64_t H = D / 2;
  int64_t i = 0;
  if (H % kLanes == 0) {
    for (; i < H; i += kLanes) {
      const vf x1 = load_f(x + i), x2 = load_f(x + H + i);
      const vf c1 = load_f(c + i), c2 = load_f(c + H + i), s1 = load_f(s + i), s2 = load_f(s + H + i);
      const vf lo = simd::add(round_to(simd::mul(x1, c1), x), round_to(simd::mul(simd::sub(simd::zero(), x2), s1), x));
      const vf hi = simd::add(round_to(simd::mul(x2, c2), x), round_to(simd::mul(x1, s2), x));
      simd::store(out + i, lo);
      simd::store(out + H + i, hi);
    }
    return;
  }
  for (; i < H; ++i) {
    const float x1 = get(x[i]), x2 = get(x[H + i]);
    put(out + i, round_to(x1 * get(c[i]), x) + round_to(-x2 * get(s[i]), x));
    put(out + H + i, round_to(x2 * get(c[H + i]), x) + round_to(x1 * get(s[H + i]), x));
  }
}

// One decode position per row: x (R, (Hq + 2·Hkv)·D) holds q, k, v; q rotated into q_out (R, Hq, D),
// k rotated and v copied into the cache slots (row and head strides given, D contiguous).
template <typename T>
void rope_kv(int64_t R, int64_t Hq, int64_t Hkv, int64_t D, const T* x, int64_t ldx, const T* cos, const T* sin,
             int64_t ldcs, T* q_out, T* k, int64_t k_row, int64_t k_head, T* v, int64_t v_row, int64_t v_head) {
  for (int64_t r = 0; r < R; ++r) {
    const T *xr = x + r * ldx, *c = cos + r * ldcs, *s = sin + r * ldcs;
    for (int64_t h = 0; h < Hq; ++h) rope_head(D, xr + h * D, c, s, q_out + (r * Hq + h) * D);
    for (int64_t h = 0; h < Hkv; ++h) {
      rope_head(D, xr + (Hq + h) * D, c, s, k + r * k_row + h * k_head);
      memcpy(v + r * v_row + h * v_head, xr + (Hq + Hkv + h) * D, sizeof(T) * D);
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

// cos, sin: (R or 1, D), ldcs their row stride (0: one row for all). Returns 0, or 1 for arguments
// out of range (nothing written).
extern "C" int parscale_rope_kv(int64_t R, int64_t Hq, int64_t Hkv, int64_t D, const void* x, int64_t ldx,
                                const void* cos, const void* sin, int64_t ldcs, void* q_out, void* k,
                                int64_t k_row, int64_t k_head, void* v, int64_t v_row, int64_t v_head, int bf16) {
  if (R < 1 || Hq < 1 || Hkv < 1 || D < 2 || D % 2) return 1;
  if (bf16)
    rope_kv(R, Hq, Hkv, D, static_cast<const uint16_t*>(x), ldx, static_cast<const uint16_t*>(cos),
            static_cast<const uint16_t*>(sin), ldcs, static_cast<uint16_t*>(q_out), static_cast<uint16_t*>(k), k_row,
            k_head, static_cast<uint16_t*>(v), v_row, v_head);
  else
    rope_kv(R, Hq, Hkv, D, static_cast<const float*>(x), ldx, static_cast<const float*>(cos),
            static_cast<const float*>(sin), ldcs, static_cast<float*>(q_out), static_cast<float*>(k), k_row, k_head,
            static_cast<float*>(v), v_row, v_head);
  return 0;
}
