// Token embedding lookup and its scatter-add backward (CPU reference).
#include <cstring>

#include "kernels/op_util.h"
#include "kernels/cuda/ops_layers.h"
#include "kernels/ops.h"

namespace dsa::ops {

using detail::dispatch_float;
using detail::on_cuda;

namespace {

// Every id in [0, V) or a clear error naming the first bad one.
void check_ids(const char* op, const int32_t* ids /*[N]*/, int64_t n, int64_t vocab) {
  for (int64_t i = 0; i < n; ++i)
    DSA_CHECK(ids[i] >= 0 && ids[i] < vocab, "[", op, "] token id ", ids[i], " at position ", i,
              " is out of range for vocab size ", vocab);
}

}  // namespace

// NOTES: ids may have any shape; the output is ids.shape + [D].
Tensor embedding_forward(const Tensor& ids, const Tensor& table) {
  const char* op = "embedding_forward";
  DSA_DISPATCH_CUDA(on_cuda(table), op, cuda::embedding_forward(ids, table));
  expect_dtype(op, "ids", ids, DType::I32);
  expect_shape(op, "table", table, {-1, -1});
  expect_same_device(op, ids, table);
  const int64_t n = ids.numel(), v = table.size(0), d = table.size(1);
  const int32_t* id = ids.data<int32_t>();
  check_ids(op, id, n, v);
  Shape ys = ids.shape();
  ys.push_back(d);
  Tensor y = Tensor::empty(ys, table.dtype());
  const size_t row = static_cast<size_t>(d) * dtype_size(table.dtype());  // any dtype: plain row copies
  const char* src = static_cast<const char*>(table.raw());
  char* dst = static_cast<char*>(y.raw());
#pragma omp parallel for schedule(static) if (n * d > (1 << 16))
  for (int64_t i = 0; i < n; ++i) std::memcpy(dst + i * row, src + id[i] * row, row);
  return y;
}

void embedding_backward(const Tensor& dy, const Tensor& ids, Tensor* dtable) {
  const char* op = "embedding_backward";
  DSA_DISPATCH_CUDA(on_cuda(dy), op, cuda::embedding_backward(dy, ids, dtable));
  expect_dtype(op, "ids", ids, DType::I32);
  expect_float(op, "dy", dy);
  DSA_CHECK(dtable && dtable->defined() && dtable->ndim() == 2, "[", op,
            "] dtable must be a defined [V, D] gradient to accumulate into");
  expect_same_device(op, dy, ids);
  expect_same_device(op, dy, *dtable);
  const int64_t n = ids.numel(), v = dtable->size(0), d = dtable->size(1);
  Shape ys = ids.shape();
  ys.push_back(d);
  DSA_CHECK(dy.shape() == ys, "[", op, "] dy must have shape ", ys, ", got ", dy.desc());
  detail::expect_same_dtype(op, "dtable", *dtable, dy);
  const int32_t* id = ids.data<int32_t>();
  check_ids(op, id, n, v);
  dispatch_float(op, dy.dtype(), [&](auto t) {
    using T = decltype(t);
    const T* g = dy.data<T>();
    T* gt = dtable->data<T>();
    // NOTES: parallel over column blocks, tokens in order inside each: repeated ids never race and the
    // summation order (hence the f32 result) does not depend on the thread count.
    const int64_t block = 64, nblocks = (d + block - 1) / block;
#pragma omp parallel for schedule(static) if (n * d > (1 << 16))
    for (int64_t cb = 0; cb < nblocks; ++cb) {
      const int64_t j0 = cb * block, j1 = j0 + block < d ? j0 + block : d;
      for (int64_t i = 0; i < n; ++i) {
        T* dst = gt + static_cast<int64_t>(id[i]) * d;
        const T* src = g + i * d;
        for (int64_t j = j0; j < j1; ++j) dst[j] += src[j];
      }
    }
  });
}

}  // namespace dsa::ops
