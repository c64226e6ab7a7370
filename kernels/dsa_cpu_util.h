// Internal helpers of the DSA CPU kernels (indexer.cpp, sparse_attention.cpp, indexer_loss.cpp):
// entry checks and the row-major GEMM of kernels/cpu_blas.h. Not part of the op API.
#pragma once

#include "kernels/cpu_blas.h"

#include <algorithm>
#include <initializer_list>

#include "kernels/op_util.h"
#include "kernels/tensor.h"
#ifdef DSA_HAVE_CUDA
#include "kernels/cuda/ops_dsa.h"
// Public entries call the CUDA implementation (kernels/cuda/ops_dsa.h) when `t` lives on the GPU.
#define DSA_CUDA_DISPATCH(t, op, ...) \
  if ((t).defined() && (t).device() == ::dsa::Device::CUDA) return __VA_ARGS__
#else
#define DSA_CUDA_DISPATCH(t, op, ...) \
  if ((t).defined() && (t).device() == ::dsa::Device::CUDA) ::dsa::ops::detail::cuda_missing(op)
#endif

namespace dsa::ops::dsa_cpu {

// Parallel regions run on one thread below this much work (elements touched): thread start-up costs more.
constexpr int64_t kOmpMinWork = int64_t(1) << 15;

// Every float tensor of a call must be on the CPU and share one dtype (f32 or f64); returns it.
inline DType check_cpu_float(const char* op, std::initializer_list<const Tensor*> ts) {
  DType dt = DType::F32;
  bool first = true;
  for (const Tensor* t : ts) {
    DSA_CHECK(t->defined(), "[", op, "] an input tensor is undefined");
    DSA_CHECK(t->is_cpu(), "[", op, "] CUDA backend not implemented yet (got ", t->desc(), ")");
    expect_float(op, "input", *t);
    if (first) dt = t->dtype();
    DSA_CHECK(t->dtype() == dt, "[", op, "] all float inputs must share one dtype, got ", dtype_name(dt), " and ",
              t->desc());
    first = false;
  }
  return dt;
}

inline void check_indices(const char* op, const Tensor& idx, int64_t B, int64_t T) {
  expect_shape(op, "indices", idx, {B, T, -1});
  expect_dtype(op, "indices", idx, DType::I32);
  DSA_CHECK(idx.is_cpu(), "[", op, "] CUDA backend not implemented yet (got ", idx.desc(), ")");
  const int32_t* p = idx.data<int32_t>();
  const int64_t K = idx.size(2);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t k = 0; k < K; ++k) {
        const int32_t s = p[(b * T + t) * K + k];
        DSA_CHECK(s == -1 || (s >= 0 && s <= t), "[", op, "] indices[", b, ", ", t, ", ", k, "] = ", s,
                  " must be -1 or in [0, ", t, "]");
      }
}

// Row-major products (kernels/cpu_blas.h); called outside OpenMP regions only.
using detail::gemm_rm;

// Rows per streamed block so that a [rows, width] f64 buffer stays near 32 MiB.
inline int64_t rows_per_block(int64_t total_rows, int64_t width) {
  const int64_t budget = int64_t(1) << 22;
  return std::max<int64_t>(1, std::min<int64_t>(total_rows, budget / std::max<int64_t>(1, width)));
}

}  // namespace dsa::ops::dsa_cpu
