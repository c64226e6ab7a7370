// LM head fused with softmax cross-entropy, chunked over tokens (CPU reference).
//
// Per chunk of tokens: logits [c, V] = x_c @ w^T (BLAS), then per row a stable log-softmax
//   lse = max + log sum_j exp(l_j - max),  loss = lse - l_target,
// and, for the backward of grad_scale * loss_sum, the logits buffer is overwritten with
//   dlogits = grad_scale * (softmax - onehot(target))   (zero rows for ignored targets),
// from which dx_c = dlogits @ w and dw += dlogits^T x_c (BLAS). Only [chunk, V] is ever allocated.
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/op_util.h"
#include "kernels/cuda/ops_train.h"
#include "kernels/ops.h"

namespace dsa::ops {

using detail::dispatch_float;
using detail::expect_same_dtype;
using detail::on_cuda;

namespace {

constexpr size_t kChunkBytes = size_t(64) << 20;  // logits buffer budget

// One chunk's softmax rows in place. Returns each row's loss in loss[r] (0 for ignored rows).
template <class T>
void softmax_rows(T* lg /*[rows, V]*/, const int32_t* tgt /*[rows]*/, int64_t rows, int64_t v, bool backward,
                  double grad_scale, double* loss /*[rows]*/) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    T* l = lg + r * v;
    const int32_t t = tgt[r];
    if (t < 0) {
      loss[r] = 0;
      if (backward) std::fill(l, l + v, T(0));
      continue;
    }
    T mx = l[0];
    for (int64_t j = 1; j < v; ++j) mx = l[j] > mx ? l[j] : mx;
    const double lt = l[t];
    double s = 0;
    if (backward) {
      for (int64_t j = 0; j < v; ++j) {
        const T e = std::exp(l[j] - mx);
        l[j] = e;
        s += e;
      }
    } else {
      for (int64_t j = 0; j < v; ++j) s += std::exp(l[j] - mx);
    }
    loss[r] = std::log(s) + static_cast<double>(mx) - lt;
    if (backward) {
      const T k = static_cast<T>(grad_scale / s);
      for (int64_t j = 0; j < v; ++j) l[j] *= k;
      l[t] -= static_cast<T>(grad_scale);
    }
  }
}

}  // namespace

// NOTES: dx is written (a defined [N, D] tensor is overwritten, an undefined one allocated); dw is
// accumulated (an undefined one starts at zero). The loss is summed in double in token order, so it
// does not depend on the chunk size or thread count.
CrossEntropyResult lm_head_cross_entropy(const Tensor& x, const Tensor& w, const Tensor& targets,
                                         double grad_scale, Tensor* dx, Tensor* dw) {
  const char* op = "lm_head_cross_entropy";
  DSA_DISPATCH_CUDA(on_cuda(x), op, cuda::lm_head_cross_entropy(x, w, targets, grad_scale, dx, dw));
  expect_float(op, "x", x);
  expect_shape(op, "x", x, {-1, -1});
  expect_same_dtype(op, "w", w, x);
  expect_shape(op, "w", w, {-1, x.size(1)});
  expect_dtype(op, "targets", targets, DType::I32);
  expect_shape(op, "targets", targets, {x.size(0)});
  expect_same_device(op, x, w);
  expect_same_device(op, x, targets);
  const int64_t n = x.size(0), v = w.size(0);
  DSA_CHECK(v > 0, "[", op, "] empty vocabulary: w ", w.desc());
  const int32_t* tgt = targets.data<int32_t>();
  for (int64_t i = 0; i < n; ++i)
    DSA_CHECK(tgt[i] >= -1 && tgt[i] < v, "[", op, "] target ", tgt[i], " at token ", i,
              " is out of range for vocab size ", v, " (-1 = ignored)");
  const bool backward = dx || dw;
  Tensor* gx = dx ? &detail::output_arg(op, "dx", dx, x.shape(), x.dtype()) : nullptr;
  Tensor* gw = dw ? &detail::accum_arg(op, "dw", dw, w.shape(), w.dtype()) : nullptr;

  CrossEntropyResult res;
  for (int64_t i = 0; i < n; ++i) res.count += tgt[i] >= 0;
  if (n == 0) return res;
  const int64_t chunk =
      std::clamp<int64_t>(static_cast<int64_t>(kChunkBytes / (static_cast<size_t>(v) * dtype_size(x.dtype()))), 1, n);
  Tensor buf = Tensor::empty({chunk, v}, x.dtype());  // [chunk, V] logits, then dlogits
  std::vector<double> loss(static_cast<size_t>(chunk));
  for (int64_t c0 = 0; c0 < n; c0 += chunk) {
    const int64_t rows = std::min(chunk, n - c0);
    const Tensor xc = x.slice_rows(c0, c0 + rows);
    Tensor lg = buf.slice_rows(0, rows);
    gemm(xc, false, w, true, lg);
    dispatch_float(op, x.dtype(), [&](auto t) {
      using T = decltype(t);
      softmax_rows<T>(lg.data<T>(), tgt + c0, rows, v, backward, grad_scale, loss.data());
    });
    for (int64_t r = 0; r < rows; ++r) res.loss_sum += loss[r];
    if (gx) {
      Tensor dxc = gx->slice_rows(c0, c0 + rows);
      gemm(lg, false, w, false, dxc);
    }
    if (gw) gemm(lg, true, xc, false, *gw, 1.0, 1.0);
  }
  return res;
}

}  // namespace dsa::ops
