// Internal helpers of the DSA CPU kernels (indexer.cpp, sparse_attention.cpp, indexer_loss.cpp):
// entry checks and the row-major GEMM of kernels/cpu_blas.h. Not part of the op API.
#pragma once

#include "kernels/cpu_blas.h"

#include <algorithm>
#include <initializer_list>

#include "kernels/op_util.h"
#include "kernels/tensor.h"

namespace dsa::ops::dsa_cpu {

// Parallel regions run on one thread below this much work (elements touched): thread start-up costs more.
constexpr int64_t kOmpMinWork = int64_t(1) << 15;

// A float operand of a CPU entry, with the name its errors give it.
struct Operand {
  const char* name;
  const Tensor* t;
};

// The float operands of a CPU call: defined, all on the CPU, one dtype (f32 or f64), which it returns.
// The public entry has already sent calls whose dispatching operand (the first one here) lives on the
// GPU to the CUDA backend, so an operand elsewhere means the call mixes devices.
inline DType check_cpu_float(const char* op, std::initializer_list<Operand> ts) {
  const Operand& first = *ts.begin();
  DSA_CHECK(first.t->defined(), "[", op, "] ", first.name, " is undefined");
  DSA_CHECK(first.t->is_cpu(), "[", op, "] runs on the CPU only, got ", first.name, " ", first.t->desc());
  for (const Operand& o : ts) {
    DSA_CHECK(o.t->defined(), "[", op, "] ", o.name, " is undefined");
    DSA_CHECK(o.t->is_cpu(), "[", op, "] operands are on different devices: ", first.name, " is ", first.t->desc(),
              " but ", o.name, " is ", o.t->desc());
    expect_float(op, o.name, *o.t);
    DSA_CHECK(o.t->dtype() == first.t->dtype(), "[", op, "] all float operands must share one dtype: ", first.name,
              " is ", first.t->desc(), " but ", o.name, " is ", o.t->desc());
  }
  return first.t->dtype();
}

inline void check_indices(const char* op, const Tensor& idx, int64_t B, int64_t T) {
  expect_shape(op, "indices", idx, {B, T, -1});
  expect_dtype(op, "indices", idx, DType::I32);
  DSA_CHECK(idx.is_cpu(), "[", op, "] operands are on different devices: the float operands are on the cpu, ",
            "indices is ", idx.desc());
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
