// Whole sub-blocks of a decode step in one call: the library's own entry points (skinny.cpp,
// elementwise.cpp) run in the order the model's layers run them, on the same operands, so the
// result is the per-op path's bit for bit; what goes is the Python between them (module calls,
// layout checks, wrappers, tensor allocations, one ctypes call each).
//
// Why: a narrow, deep model decodes at per-op speed, not at memory speed (SmolLM2-135M int8,
// 30 layers: about 110 µs of Python and small torch ops a layer against 150 µs of kernels, with
// the weights' streaming having evicted the interpreter's state from the caches before each op).
//
// attention_block: out = x + o(attention(rope(q), [cache; rope(k)], [cache; v])) of q, k, v =
// qkv(rmsnorm(x)), writing this step's keys and values into the cache slot L - 1 (the per-op path:
// rms_norm, the fused q/k/v product, rope_kv, decode_attention, the o product, torch's add).
//
// mlp_block: out = x + down(silu(gate) · up) of gate, up = gate_up(rmsnorm(x)), for M rows of x
// (M × H, contiguous), the SwiGLU MLP of a Llama / Qwen decoder layer with its pre-norm and
// residual. The products are given as the bound operands of `Bound` (parscale/kernels/__init__.py):
// mode 0 float32, 1 bfloat16 (x, weights, norm weight and out bfloat16), 2 int8 weights with
// float32 scales (x, norm weight and out float32).
#include <stdint.h>
#include <string.h>

#include <vector>

#include "simd.h"

extern "C" {
int parscale_rms_norm(int64_t M, int64_t K, const void* x, int64_t ldx, const void* w, float eps, void* y,
                      int64_t ldy, int bf16);
int parscale_silu_mul(int64_t M, int64_t I, const void* gu, int64_t ld, void* y, int64_t ldy, int bf16);
int parscale_skinny_linear(int64_t M, int64_t N, int64_t K, const float* x, int64_t ldx, const float* w,
                           int64_t ldw, const float* bias, float* y, int64_t ldy, int threads);
int parscale_skinny_linear_int8(int64_t M, int64_t N, int64_t K, const float* x, int64_t ldx, const int8_t* w,
                                int64_t ldw, const float* scale, const float* bias, float* y, int64_t ldy,
                                int threads);
int parscale_skinny_linear_bf16(int64_t M, int64_t N, int64_t K, const uint16_t* x, int64_t ldx,
                                const uint16_t* w, int64_t ldw, const uint16_t* bias, uint16_t* y, int64_t ldy,
                                int threads);
int parscale_rope_kv(int64_t R, int64_t Hq, int64_t Hkv, int64_t D, const void* x, int64_t ldx, const void* cos,
                     const void* sin, int64_t ldcs, void* q_out, void* k, int64_t k_row, int64_t k_head, void* v,
                     int64_t v_row, int64_t v_head, int bf16);
int parscale_decode_attention(int64_t R, int64_t Hq, int64_t Hkv, int64_t L, int64_t D, const void* q,
                              int64_t q_row, int64_t q_head, const void* k, int64_t k_row, int64_t k_head,
                              int64_t k_pos, const void* v, int64_t v_row, int64_t v_head, int64_t v_pos,
                              const uint8_t* mask, int64_t m_row, int64_t m_pos, float scale, void* out, int bf16,
                              int threads);
}

namespace {

// y = x Wᵀ (· scale) (+ b), M × N, as the bound product of that mode computes it
int product(int mode, int64_t M, int64_t N, int64_t K, const void* x, const void* w, int64_t ldw, const void* scale,
            const void* b, void* y, int threads) {
  switch (mode) {
    case 0:
      return parscale_skinny_linear(M, N, K, static_cast<const float*>(x), K, static_cast<const float*>(w), ldw,
                                    static_cast<const float*>(b), static_cast<float*>(y), N, threads);
    case 1:
      return parscale_skinny_linear_bf16(M, N, K, static_cast<const uint16_t*>(x), K,
                                         static_cast<const uint16_t*>(w), ldw, static_cast<const uint16_t*>(b),
                                         static_cast<uint16_t*>(y), N, threads);
    case 2:
      return parscale_skinny_linear_int8(M, N, K, static_cast<const float*>(x), K, static_cast<const int8_t*>(w),
                                         ldw, static_cast<const float*>(scale), static_cast<const float*>(b),
                                         static_cast<float*>(y), N, threads);
    default:
      return 1;
  }
}

// out = x + d elementwise, rounded to the storage type once (as torch's add)
void add(int64_t n, const void* x, const void* d, void* out, bool bf16) {
  if (!bf16) {
    const float *a = static_cast<const float*>(x), *b = static_cast<const float*>(d);
    float* o = static_cast<float*>(out);
    for (int64_t i = 0; i < n; ++i) o[i] = a[i] + b[i];
    return;
  }
  const uint16_t *a = static_cast<const uint16_t*>(x), *b = static_cast<const uint16_t*>(d);
  uint16_t* o = static_cast<uint16_t*>(out);
  int64_t i = 0;
  for (; i + simd::kLanes <= n; i += simd::kLanes)
    simd::store(o + i, simd::add(simd::load(a + i), simd::load(b + i)));
  for (; i < n; ++i) o[i] = simd::float_to_bf16(simd::bf16_to_float(a[i]) + simd::bf16_to_float(b[i]));
}

// the calling thread's scratch rows, kept between calls (a few hundred KB at most)
void* scratch(int slot, size_t bytes) {
  static thread_local std::vector<char> bufs[4];
  if (bufs[slot].size() < bytes) bufs[slot].resize(bytes);
  return bufs[slot].data();
}

}  // namespace

// Returns 0, or nonzero for arguments out of range (out then unspecified; the caller's per-op path
// runs instead). I: the intermediate size (gate_up has 2·I rows: gate then up).
extern "C" int parscale_mlp_block(int64_t M, int64_t H, int64_t I, const void* x, const void* norm_w, float eps,
                                  int mode, const void* gu_w, int64_t gu_ld, const void* gu_scale,
                                  const void* gu_b, const void* dn_w, int64_t dn_ld, const void* dn_scale,
                                  const void* dn_b, void* out, int threads) {
  if (M < 1 || M > 16 || H < 1 || I < 1 || mode < 0 || mode > 2 || threads < 1) return 1;
  const bool bf16 = mode == 1;
  const size_t el = bf16 ? 2 : 4;
  void* h = scratch(0, M * H * el);
  void* gu = scratch(1, M * 2 * I * el);
  void* a = scratch(2, M * I * el);
  int rc = parscale_rms_norm(M, H, x, H, norm_w, eps, h, H, bf16);
  rc = rc ? rc : product(mode, M, 2 * I, H, h, gu_w, gu_ld, gu_scale, gu_b, gu, threads);
  rc = rc ? rc : parscale_silu_mul(M, I, gu, 2 * I, a, I, bf16);
  // the down product's rows reuse h's buffer: h is not read after gate_up
  rc = rc ? rc : product(mode, M, H, I, a, dn_w, dn_ld, dn_scale, dn_b, h, threads);
  if (rc == 0) add(M * H, x, h, out, bf16);
  return rc;
}

// k, v: the layer's cache (rows, KV heads, positions, D; strides in elements), holding L - 1 keys
// before this step (prefix and tokens). mask: as parscale_decode_attention's (null: every key).
extern "C" int parscale_attention_block(int64_t M, int64_t H, int64_t Hq, int64_t Hkv, int64_t D, const void* x,
                                        const void* norm_w, float eps, int mode, const void* qkv_w, int64_t qkv_ld,
                                        const void* qkv_scale, const void* qkv_b, const void* o_w, int64_t o_ld,
                                        const void* o_scale, const void* o_b, const void* cos, const void* sin,
                                        int64_t ldcs, void* k, int64_t k_row, int64_t k_head, int64_t k_pos, void* v,
                                        int64_t v_row, int64_t v_head, int64_t v_pos, int64_t L,
                                        const uint8_t* mask, int64_t m_row, int64_t m_pos, float scale, void* out,
                                        int threads) {
  if (M < 1 || M > 16 || H < 1 || Hq < 1 || Hkv < 1 || D < 2 || L < 1 || mode < 0 || mode > 2 || threads < 1)
    return 1;
  const bool bf16 = mode == 1;
  const size_t el = bf16 ? 2 : 4;
  const int64_t nqkv = (Hq + 2 * Hkv) * D;
  void* h = scratch(0, M * H * el);
  void* y = scratch(1, M * nqkv * el);
  void* q = scratch(2, M * Hq * D * el);
  void* a = scratch(3, M * Hq * D * el);
  char* kc = static_cast<char*>(k);
  char* vc = static_cast<char*>(v);
  int rc = parscale_rms_norm(M, H, x, H, norm_w, eps, h, H, bf16);
  rc = rc ? rc : product(mode, M, nqkv, H, h, qkv_w, qkv_ld, qkv_scale, qkv_b, y, threads);
  rc = rc ? rc : parscale_rope_kv(M, Hq, Hkv, D, y, nqkv, cos, sin, ldcs, q, kc + (L - 1) * k_pos * el, k_row,
                                  k_head, vc + (L - 1) * v_pos * el, v_row, v_head, bf16);
  rc = rc ? rc : parscale_decode_attention(M, Hq, Hkv, L, D, q, Hq * D, D, k, k_row, k_head, k_pos, v, v_row, v_head,
                                           v_pos, mask, m_row, m_pos, scale, a, bf16, threads);
  rc = rc ? rc : product(mode, M, H, Hq * D, a, o_w, o_ld, o_scale, o_b, h, threads);
  if (rc == 0) add(M * H, x, h, out, bf16);
  return rc;
}
