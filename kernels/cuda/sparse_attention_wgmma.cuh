// Shared pieces of the wgmma sparse attention kernels (64 heads per CTA: sm90_bf16_sparse_attention_fwd_wgmma.cu
// and _bwd_wgmma.cu; 16 heads per CTA with keys as M: sm90_bf16_sparse_attention_wgmma_h16.cu): the
// core-matrix tile layout, the gather of a token's selected rows, the copy of dense rows, the dKV scatter.
//
// Tiles are wgmma's no-swizzle K-major layout (mma.cuh): 8-row x 8-element core matrices of 128 contiguous
// bytes, column-adjacent ones 128 bytes apart, row-adjacent ones LD * 16 bytes apart. A tile of [rows][LD]
// is read as a K-major operand (M or N = rows, K = columns: lbo 128, sbo LD * 16) or, with the roles of
// its dimensions swapped, as an MN-major one (K = rows: lbo LD * 16, sbo 128).
#pragma once

#include "kernels/cuda/mma.cuh"

namespace dsa::cuda::dsa_detail {

constexpr int kSparseBlock = 64;  // gathered rows per block: wgmma's M (keys as M) or N (32 per warpgroup)

// Element offset of (row r, column c) in a core-matrix tile of LD-element rows.
template <int LD>
__device__ __forceinline__ int tile_off(int r, int c) {
  return ((r >> 3) * (LD >> 3) + (c >> 3)) * 64 + (r & 7) * 8 + (c & 7);
}

// cp.async of rows 0 .. ROWS-1 (LD bf16 each, row r at src + r * stride) into a core-matrix tile. Lanes l,
// l + 8, l + 16, l + 24 of a warp copy 64 contiguous bytes of one row (two whole 32-byte sectors), and the
// eight lanes of each 16-byte phase fill one 128-byte core matrix (no bank conflicts).
template <int LD, int ROWS, int THREADS>
__device__ __forceinline__ void load_dense_rows(__nv_bfloat16* tile, const __nv_bfloat16* src, int64_t stride) {
  static_assert(LD % 32 == 0 && ROWS % 8 == 0, "tile shape");
  const int lane = threadIdx.x & 31;
  for (int u = threadIdx.x >> 5; u < (ROWS / 8) * (LD / 32); u += THREADS / 32) {
    const int r = (u % (ROWS / 8)) * 8 + (lane & 7), ch = (u / (ROWS / 8)) * 4 + (lane >> 3);
    cp_async16(tile + tile_off<LD>(r, ch * 8), src + r * stride + ch * 8, 16);
  }
}

// Row r of a [64][DK] stage: kv[b, s] (s >= 0) or zeros (s = -1); sidx[r] = s. The warp's lanes l, l + 8,
// l + 16, l + 24 copy the row (lanes as load_dense_rows): r is 8 rb + l % 8 for the warp's row block rb.
template <int DK>
__device__ __forceinline__ void gather_row(const __nv_bfloat16* kv, int s, int T, int64_t bt, int r,
                                           __nv_bfloat16* stage, int* sidx) {
  const int lane = threadIdx.x & 31;
  if (lane < 8) sidx[r] = s;
  const __nv_bfloat16* src = s >= 0 ? kv + ((bt / T) * T + s) * DK : kv;
#pragma unroll 3
  for (int cq = 0; cq < DK / 32; ++cq) {
    const int ch = cq * 4 + (lane >> 3);
    cp_async16(stage + tile_off<DK>(r, ch * 8), src + ch * 8, s >= 0 ? 16 : 0);
  }
}
// The slot index of row r of block blk: idx[bt, blk * 64 + r], -1 past K.
__device__ __forceinline__ int slot_index(const int32_t* idx, int K, int64_t bt, int blk, int r) {
  const int slot = blk * kSparseBlock + r;
  return slot < K ? __ldg(idx + bt * K + slot) : -1;
}

// Block blk (slots blk * 64 ..) of token bt's selection into a [64][DK] stage: row r = kv[b, idx[bt, slot]],
// zero-filled where the slot is -1 or past K; sidx[r] = the slot's index (-1 for those). Warp w copies rows
// 8 rb + l % 8 for rb = w, w + THREADS / 32, ... Returns whether one of this thread's rows is a valid slot
// (the caller ORs it over the block).
template <int DK, int THREADS>
__device__ __forceinline__ bool gather_block(const __nv_bfloat16* kv, const int32_t* idx, int K, int T, int64_t bt,
                                             int blk, __nv_bfloat16* stage, int* sidx) {
  static_assert(DK % 32 == 0 && THREADS % 32 == 0 && THREADS <= 256, "gather shape");
  bool any = false;
#pragma unroll
  for (int rb = threadIdx.x >> 5; rb < 8; rb += THREADS / 32) {
    const int r = rb * 8 + (threadIdx.x & 7), s = slot_index(idx, K, bt, blk, r);
    gather_row<DK>(kv, s, T, bt, r, stage, sidx);
    any |= s >= 0;
  }
  return any;
}
// The same for 256 threads (one row a thread) in two halves, so that a kernel loads the indices of a block
// one block ahead of its gather: the index load's latency (a global read that the copies' addresses wait
// for) then hides under a block's compute. gather_index_256 returns this thread's slot index of block blk,
// gather_block_256 copies the row and returns whether it is a valid slot.
// NOTES: the 64-head kernels on an H100 (docs/perf_log.md v21, same call): forward 263 -> 272-274 TFLOP/s,
// backward 314-315 -> 319-321.
__device__ __forceinline__ int gather_index_256(const int32_t* idx, int K, int64_t bt, int blk) {
  return slot_index(idx, K, bt, blk, (threadIdx.x >> 5) * 8 + (threadIdx.x & 7));
}
template <int DK>
__device__ __forceinline__ bool gather_block_256(const __nv_bfloat16* kv, int s, int T, int64_t bt,
                                                 __nv_bfloat16* stage, int* sidx) {
  gather_row<DK>(kv, s, T, bt, (threadIdx.x >> 5) * 8 + (threadIdx.x & 7), stage, sidx);
  return s >= 0;
}

// OR of `v` over the CTA (a barrier). The shuffle shows ptxas that the result is warp-uniform; without it a
// branch on the result makes it serialize every wgmma of the kernel (C7520).
__device__ __forceinline__ bool block_any(bool v) { return __shfl_sync(0xffffffffu, __syncthreads_or(v), 0); }

// dst[ids[r], n0 ..] += the accumulator rows r0, r0 + 8 of this thread (a 64 x PW piece in the wgmma / m16n8
// layout, rows = gathered slots, -1 skipped; dst rows of ld f32): lanes c, c ^ 1 of a quad swap halves of two
// adjacent 8-column groups so that each holds 4 consecutive columns, one float4 atomic (sm_90) per row and
// 16 columns. The volume is what the scatter is: one f32 per (slot, column) and piece.
template <int PW>
__device__ __forceinline__ void scatter_rows(float* dst, int ld, const int* ids, int r0, int c, const float (&acc)[PW / 2],
                                             int n0) {
  static_assert(PW % 16 == 0, "piece width");
  const bool odd = c & 1;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int s = ids[r0 + 8 * i];
#pragma unroll
    for (int m = 0; m < PW / 16; ++m) {
      const float* a0 = acc + 8 * m;  // column group 2 m (e = 0..3)
      const float* a1 = a0 + 4;       // column group 2 m + 1
      const float sx = odd ? a0[2 * i] : a1[2 * i], sy = odd ? a0[2 * i + 1] : a1[2 * i + 1];
      const float rx = __shfl_xor_sync(0xffffffffu, sx, 1), ry = __shfl_xor_sync(0xffffffffu, sy, 1);
      if (s < 0) continue;
      const float4 v = odd ? make_float4(rx, ry, a1[2 * i], a1[2 * i + 1]) : make_float4(a0[2 * i], a0[2 * i + 1], rx, ry);
      float* row = dst + int64_t(s) * ld + n0 + 16 * m + (odd ? 8 + 2 * (c - 1) : 2 * c);
      atomicAdd(reinterpret_cast<float4*>(row), v);
    }
  }
}

}  // namespace dsa::cuda::dsa_detail
