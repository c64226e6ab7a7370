// Device helpers shared by the flash-attention kernels (sm90_bf16_attention_{fwd,bwd}.cu): accumulator to
// A-fragment conversion and the padded smem tile loader (mma.sync, ldmatrix, cp.async: kernels/cuda/mma.cuh).
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

#include "kernels/cuda/mma.cuh"

namespace dsa::cuda::attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

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
      cp_async16(s + r * kStride + c, ok ? g + r * g_stride + c : g, ok ? 16 : 0);  // 0: zero fill
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
