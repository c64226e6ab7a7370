// Device helpers shared by the flash-attention kernels (sm90_bf16_attention_{fwd,bwd}.cu):
// mma.sync m16n8k16 bf16 -> f32, ldmatrix, cp.async and the padded smem tile loader.
//
// NOTES:
//  - Shared-memory tiles are row-major with a row stride of D + 8 bf16 (D a multiple of 16). The extra
//    16 bytes rotate consecutive rows by 4 banks, so the 8 row addresses of one ldmatrix phase hit 8
//    distinct 16-byte bank groups for every D (an XOR swizzle would need D/8 to be a multiple of 8,
//    which 96 and 192 are not).
//  - Head dims that are not multiples of 8 (the tiny config's 12 / 6) cannot use 16-byte cp.async: the
//    loader falls back to scalar loads. Rows past T and columns past the real head dim are zero-filled
//    so padded columns add nothing to dot products and padded rows never inject NaN (0 * NaN).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace dsa::cuda::attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

// c[4] += a[4] (16x16 row) * (b0, b1) (16x8 col), bf16 in, f32 accumulate.
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
__device__ __forceinline__ float2 unpack_bf16(uint32_t u) {
  __nv_bfloat162 v = *reinterpret_cast<__nv_bfloat162*>(&u);
  return __bfloat1622float2(v);
}

// A-operand fragment (16 rows x 16 k) from two m16n8 accumulator tiles c0 (k 0-7) and c1 (k 8-15):
// the accumulator layout of m16n8 equals the A layout of m16n8k16, only the packing changes.
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack_bf16(c0[0], c0[1]);
  a[1] = pack_bf16(c0[2], c0[3]);
  a[2] = pack_bf16(c1[0], c1[1]);
  a[3] = pack_bf16(c1[2], c1[3]);
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const int bytes = valid ? 16 : 0;  // 0: nothing read, 16 zero bytes written
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

// Tile [ROWS, DP] of a token-major tensor into smem (row stride DP + 8): row r reads
// g + r * g_stride (elements), valid rows r < rows, valid columns c < d; the rest is zero.
// Asynchronous (cp.async, caller commits and waits) when d % 8 == 0, else synchronous scalar loads.
template <int ROWS, int DP, int NT>
__device__ __forceinline__ void load_tile(__nv_bfloat16* s, const __nv_bfloat16* g, int64_t g_stride, int rows,
                                          int d) {
  constexpr int kStride = DP + 8;
  if (d % 8 == 0) {
    constexpr int kChunks = DP / 8;
    for (int i = threadIdx.x; i < ROWS * kChunks; i += NT) {
      const int r = i / kChunks, c = (i % kChunks) * 8;
      const bool ok = r < rows && c < d;
      cp_async16(s + r * kStride + c, ok ? g + r * g_stride + c : g, ok);
    }
  } else {
    const __nv_bfloat16 zero = __float2bfloat16(0.f);
    for (int i = threadIdx.x; i < ROWS * DP; i += NT) {
      const int r = i / DP, c = i % DP;
      s[r * kStride + c] = (r < rows && c < d) ? g[r * g_stride + c] : zero;
    }
  }
}

// The instantiated (padded) head-dim pairs, cheapest first; a call runs the first one with
// DK >= Dk and DV >= Dv. (256, 256) covers every supported shape.
#define DSA_ATTN_FOR_EACH_DIMS(X) X(16, 16) X(64, 64) X(96, 64) X(128, 128) X(192, 128) X(256, 256)

}  // namespace dsa::cuda::attn
