// Shared helpers of the CUDA op implementations: entry checks (host), launch sizing, bf16/f32 loads
// and stores, 16-byte vector access and block reductions (device).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "kernels/cuda/check.cuh"
#include "kernels/cuda/context.h"
#include "kernels/tensor.h"

namespace dsa::cuda {

// ------------------------------------------------------------------------------------ host checks
inline void expect_cuda(const char* op, const char* name, const Tensor& t) {
  DSA_CHECK(t.defined() && t.device() == Device::CUDA, "[", op, "] ", name, " must be a CUDA tensor, got ",
            t.defined() ? t.desc() : std::string("undefined"));
}
// bf16 or f32 (the GPU's storage types for floating tensors).
inline void expect_gpu_float(const char* op, const char* name, const Tensor& t) {
  expect_cuda(op, name, t);
  DSA_CHECK(t.dtype() == DType::BF16 || t.dtype() == DType::F32, "[", op, "] ", name,
            " must be bf16 or f32 on the GPU, got ", t.desc());
}
inline void expect_dtype_cuda(const char* op, const char* name, const Tensor& t, DType want) {
  expect_cuda(op, name, t);
  expect_dtype(op, name, t, want);
}
// A written output passed by pointer: a defined one must match (and is overwritten), else allocated.
inline Tensor& output_arg(const char* op, const char* name, Tensor* out, const Shape& shape, DType dtype) {
  if (out->defined()) {
    DSA_CHECK(out->shape() == shape && out->dtype() == dtype && out->device() == Device::CUDA, "[", op, "] ",
              name, " must be ", dtype_name(dtype), shape, " cuda, got ", out->desc());
  } else {
    *out = Tensor::empty(shape, dtype, Device::CUDA);
  }
  return *out;
}
// An accumulated parameter gradient (+=): an undefined one starts at zero.
inline Tensor& accum_arg(const char* op, const char* name, Tensor* g, const Shape& shape, DType dtype) {
  if (g->defined()) {
    DSA_CHECK(g->shape() == shape && g->dtype() == dtype && g->device() == Device::CUDA, "[", op, "] ", name,
              " must be ", dtype_name(dtype), shape, " cuda, got ", g->desc());
  } else {
    *g = Tensor::zeros(shape, dtype, Device::CUDA);
  }
  return *g;
}

// Grid for a grid-stride loop over n items with `threads` per block (a few waves at most).
inline unsigned grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  const int64_t cap = static_cast<int64_t>(sm_count()) * 16;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(blocks, cap)));
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// ------------------------------------------------------------------------------------ device side
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// 16 bytes of T: 8 bf16 or 4 f32, converted to/from f32 lanes.
template <class T> struct Vec {
  static constexpr int kN = 16 / sizeof(T);
  union {
    uint4 raw;
    T v[kN];
  };
  __device__ __forceinline__ void load(const T* p) { raw = *reinterpret_cast<const uint4*>(p); }
  __device__ __forceinline__ void store(T* p) const { *reinterpret_cast<uint4*>(p) = raw; }
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `sh` holds 32 values; the call ends with a barrier so sh can be reused right after.
template <class T>
__device__ __forceinline__ T block_sum(T v, T* sh) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) sh[wid] = v;
  __syncthreads();
  T r = lane < nw ? sh[lane] : T(0);
  r = warp_sum(r);
  __syncthreads();
  return r;
}
__device__ __forceinline__ float block_max(float v, float* sh) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_max(v);
  if (lane == 0) sh[wid] = v;
  __syncthreads();
  float r = lane < nw ? sh[lane] : -INFINITY;
  r = warp_max(r);
  __syncthreads();
  return r;
}

}  // namespace dsa::cuda
