// Token embedding on the GPU: row gather forward, deterministic scatter-add backward into f32.
//
// NOTES: ids live on the device, so they are not range-checked on the host (that would cost a
// synchronizing copy): an out-of-range id yields a NaN row in the forward (so the loss shows it) and
// is skipped in the backward. The backward sorts (id, token) pairs with CUB's stable radix sort; one
// block per run of equal ids sums its dy rows in token order and adds once to dtable: no atomics,
// bitwise reproducible.
#include <cub/cub.cuh>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/ops_layers.h"

namespace dsa::cuda {

namespace {

template <class T>
__global__ void embedding_fwd_kernel(const int32_t* ids /*[N]*/, const T* table /*[V, D]*/, T* y /*[N, D]*/,
                                     int64_t n, int64_t v, int64_t d) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n * d; i += stride) {
    const int64_t t = i / d, j = i - t * d;
    const int32_t id = ids[t];
    y[i] = id >= 0 && id < v ? table[static_cast<int64_t>(id) * d + j] : from_f32<T>(NAN);
  }
}

// Same with 16-byte units (D * sizeof(T) a multiple of 16, pointers aligned).
__global__ void embedding_fwd_vec_kernel(const int32_t* ids /*[N]*/, const uint4* table /*[V, D16]*/,
                                         uint4* y /*[N, D16]*/, int64_t n, int64_t v, int64_t d16, uint32_t nan2) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n * d16; i += stride) {
    const int64_t t = i / d16, j = i - t * d16;
    const int32_t id = ids[t];
    y[i] = id >= 0 && id < v ? table[static_cast<int64_t>(id) * d16 + j] : make_uint4(nan2, nan2, nan2, nan2);
  }
}

__global__ void iota_kernel(int32_t* out /*[n]*/, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = static_cast<int32_t>(i);
}

// One block per sorted position p that starts a run of equal ids.
template <class T>
__global__ void embedding_bwd_kernel(const int32_t* keys /*[N] sorted ids*/, const int32_t* tok /*[N] tokens*/,
                                     const T* dy /*[N, D]*/, float* dtable /*[V, D] +=*/, int64_t n, int64_t v,
                                     int64_t d) {
  const int64_t p = blockIdx.x;
  const int32_t id = keys[p];
  if ((p > 0 && keys[p - 1] == id) || id < 0 || id >= v) return;
  int64_t end = p + 1;
  while (end < n && keys[end] == id) ++end;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    float acc = 0;
    for (int64_t q = p; q < end; ++q) acc += to_f32(dy[static_cast<int64_t>(tok[q]) * d + j]);
    dtable[static_cast<int64_t>(id) * d + j] += acc;
  }
}

}  // namespace

Tensor embedding_forward(const Tensor& ids, const Tensor& table) {
  const char* op = "embedding_forward";
  expect_dtype_cuda(op, "ids", ids, DType::I32);
  expect_gpu_float(op, "table", table);
  expect_shape(op, "table", table, {-1, -1});
  const int64_t n = ids.numel(), v = table.size(0), d = table.size(1);
  Shape ys = ids.shape();
  ys.push_back(d);
  Tensor y = Tensor::empty(ys, table.dtype(), Device::CUDA);
  if (n * d == 0) return y;
  const int64_t row = d * dtype_size(table.dtype());
  const int32_t* id = ids.data<int32_t>();
  if (row % 16 == 0 && aligned16(table.raw()) && aligned16(y.raw())) {
    const uint32_t nan2 = table.dtype() == DType::BF16 ? 0x7fc07fc0u : 0x7fc00000u;
    embedding_fwd_vec_kernel<<<grid_for(n * row / 16, 256), 256, 0, stream()>>>(
        id, static_cast<const uint4*>(table.raw()), static_cast<uint4*>(y.raw()), n, v, row / 16, nan2);
  } else if (table.dtype() == DType::BF16) {
    embedding_fwd_kernel<__nv_bfloat16><<<grid_for(n * d, 256), 256, 0, stream()>>>(
        id, static_cast<const __nv_bfloat16*>(table.raw()), static_cast<__nv_bfloat16*>(y.raw()), n, v, d);
  } else {
    embedding_fwd_kernel<float><<<grid_for(n * d, 256), 256, 0, stream()>>>(
        id, table.data<float>(), y.data<float>(), n, v, d);
  }
  check_launch(op);
  return y;
}

void embedding_backward(const Tensor& dy, const Tensor& ids, Tensor* dtable) {
  const char* op = "embedding_backward";
  expect_dtype_cuda(op, "ids", ids, DType::I32);
  expect_gpu_float(op, "dy", dy);
  DSA_CHECK(dtable && dtable->defined() && dtable->ndim() == 2, "[", op,
            "] dtable must be a defined [V, D] gradient to accumulate into");
  expect_dtype_cuda(op, "dtable", *dtable, DType::F32);
  const int64_t n = ids.numel(), v = dtable->size(0), d = dtable->size(1);
  Shape ys = ids.shape();
  ys.push_back(d);
  DSA_CHECK(dy.shape() == ys, "[", op, "] dy must have shape ", ys, ", got ", dy.desc());
  DSA_CHECK(n < (1ll << 31), "[", op, "] too many tokens: ", n);
  if (n == 0 || d == 0) return;
  Tensor tok_in = Tensor::empty({n}, DType::I32, Device::CUDA);
  Tensor keys = Tensor::empty({n}, DType::I32, Device::CUDA), tok = Tensor::empty({n}, DType::I32, Device::CUDA);
  iota_kernel<<<grid_for(n, 256), 256, 0, stream()>>>(tok_in.data<int32_t>(), n);
  check_launch(op);
  size_t temp_bytes = 0;
  const int nn = static_cast<int>(n);
  DSA_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, ids.data<int32_t>(), keys.data<int32_t>(),
                                                 tok_in.data<int32_t>(), tok.data<int32_t>(), nn, 0, 32, stream()));
  Tensor temp = Tensor::empty({static_cast<int64_t>(temp_bytes)}, DType::U8, Device::CUDA);
  DSA_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp.raw(), temp_bytes, ids.data<int32_t>(), keys.data<int32_t>(),
                                                 tok_in.data<int32_t>(), tok.data<int32_t>(), nn, 0, 32, stream()));
  const int threads = d <= 128 ? 128 : 256;
  if (dy.dtype() == DType::BF16)
    embedding_bwd_kernel<__nv_bfloat16><<<static_cast<unsigned>(n), threads, 0, stream()>>>(
        keys.data<int32_t>(), tok.data<int32_t>(), static_cast<const __nv_bfloat16*>(dy.raw()),
        dtable->data<float>(), n, v, d);
  else
    embedding_bwd_kernel<float><<<static_cast<unsigned>(n), threads, 0, stream()>>>(
        keys.data<int32_t>(), tok.data<int32_t>(), dy.data<float>(), dtable->data<float>(), n, v, d);
  check_launch(op);
}

}  // namespace dsa::cuda
