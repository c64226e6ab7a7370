// Warp-level tensor-core building blocks shared by every hand-written mma kernel (dense attention
// forward/backward, the dense and sparse indexer KL, the fused sparse attention, the FP8 indexer): one
// inline-PTX wrapper per instruction shape. mma.sync bf16 m16n8k16 and e4m3 m16n8k32 with f32
// accumulation, ldmatrix (x4, x4.trans, x2.trans), bf16 pair packing and the cp.async copies that fill
// the shared-memory tiles.
//
// NOTES:
//  - Fragment layouts are PTX's (ISA, "Matrix fragments for mma.m16n8k16 / m16n8k32"): A is four
//    32-bit registers of a 16 x 16 (bf16) or 16 x 32 (e4m3) row-major tile, B two registers of the
//    16 x 8 (32 x 8) column-major tile, C/D four f32 of the 16 x 8 result. An e4m3 m16n8k32 fragment
//    is byte for byte the bf16 m16n8k16 one, so the same ldmatrix loads feed both.
//  - Shared-memory operands are generic pointers into shared memory; the wrappers convert them to the
//    32-bit shared-window address the instructions take (smem_u32, no instruction after inlining).
//  - The cp.async wrappers carry no "memory" clobber (as in CUTLASS): a kernel reads what they wrote
//    only after cp_async_wait<N>() and a barrier (__syncthreads / bar.sync), which order the accesses.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace dsa::cuda {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ------------------------------------------------------------------------------------- ldmatrix
// Four 8 x 8 b16 matrices; lanes 8i .. 8i+7 give the row addresses of matrix i.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

// Two transposed 8 x 8 b16 matrices (lanes 0-15 give the row addresses).
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t& r0, uint32_t& r1, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r0), "=r"(r1)
               : "r"(smem_u32(p)));
}

// ------------------------------------------------------------------------------------------ mma
// d[4] += a[4] (16 x 16 row-major) * (b0, b1) (16 x 8 column-major); bf16 in, f32 accumulate.
__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// d[4] += a[4] (16 x 32 row-major) * (b0, b1) (32 x 8 column-major); fp8 e4m3 in, f32 accumulate.
__device__ __forceinline__ void mma_m16n8k32_e4m3(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two f32 rounded to bf16 (round to nearest even) in one register, `lo` in the low half: the operand
// packing of an A or B fragment.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// -------------------------------------------------------------------------------------- cp.async
// 16 bytes global -> shared, bypassing L1; src_bytes 16 copies, 0 reads nothing and writes 16 zero bytes.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(src_bytes));
}
// 4 bytes global -> shared through L1 (cp.async.cg takes 16-byte copies only).
__device__ __forceinline__ void cp_async4(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_u32(dst)), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

}  // namespace dsa::cuda
