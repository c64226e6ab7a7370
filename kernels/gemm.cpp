// GEMM (2-D and batched 3-D, transposes, alpha/beta) and the linear layer, on OpenBLAS (CPU reference).
#include "kernels/cpu_blas.h"

#include "kernels/op_util.h"
#include "kernels/cuda/ops_gemm.h"
#include "kernels/ops.h"

namespace dsa::ops {

using detail::dispatch_float;
using detail::expect_same_dtype;
using detail::on_cuda;

namespace {


// c [M, N] *= beta, where beta == 0 overwrites (so NaN garbage in c never survives).
template <class T>
void scale_c(T* c, int64_t n, T beta) {
  for (int64_t i = 0; i < n; ++i) c[i] = beta == T(0) ? T(0) : c[i] * beta;
}

}  // namespace

void gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c, double alpha, double beta) {
  const char* op = "gemm";
  DSA_DISPATCH_CUDA(on_cuda(c), op, cuda::gemm(a, trans_a, b, trans_b, c, alpha, beta));
  expect_float(op, "a", a);
  expect_same_dtype(op, "b", b, a);
  expect_same_dtype(op, "c", c, a);
  expect_same_device(op, a, b);
  expect_same_device(op, a, c);
  DSA_CHECK(c.ndim() == 2 || c.ndim() == 3, "[", op, "] c must be 2-D or 3-D, got ", c.desc());
  const bool batched = c.ndim() == 3;
  const int64_t batch = batched ? c.size(0) : 1;
  // a and b are 2-D (shared across the batch) or carry the batch dim.
  for (const Tensor* t : {&a, &b})
    DSA_CHECK(t->ndim() == 2 || (batched && t->ndim() == 3 && t->size(0) == batch), "[", op, "] ",
              t == &a ? "a" : "b", " must be 2-D", batched ? strcat_(" or [", batch, ", ., .]") : "", ", got ",
              t->desc(), " with c ", c.desc());
  const int64_t m = trans_a ? a.size(-1) : a.size(-2), ka = trans_a ? a.size(-2) : a.size(-1);
  const int64_t kb = trans_b ? b.size(-1) : b.size(-2), n = trans_b ? b.size(-2) : b.size(-1);
  DSA_CHECK(ka == kb && c.size(-2) == m && c.size(-1) == n, "[", op, "] shapes do not chain: a ", a.desc(),
            trans_a ? "^T" : "", " @ b ", b.desc(), trans_b ? "^T" : "", " into c ", c.desc());
  DSA_CHECK(m < (1ll << 31) && n < (1ll << 31) && ka < (1ll << 31), "[", op, "] dimensions exceed BLAS int range");
  const int64_t sa = a.ndim() == 3 ? a.size(1) * a.size(2) : 0;  // batch strides (0 = shared)
  const int64_t sb = b.ndim() == 3 ? b.size(1) * b.size(2) : 0;
  const int64_t sc = m * n;
  if (sc == 0) return;
  dispatch_float(op, a.dtype(), [&](auto t) {
    using T = decltype(t);
    const T* pa = a.data<T>();
    const T* pb = b.data<T>();
    T* pc = c.data<T>();
    if (ka == 0) {  // empty sum: BLAS may skip the beta scaling
      scale_c<T>(pc, batch * sc, static_cast<T>(beta));
      return;
    }
    const int lda = static_cast<int>(a.size(-1)), ldb = static_cast<int>(b.size(-1));
    for (int64_t i = 0; i < batch; ++i)
      detail::gemm_rm(trans_a, trans_b, static_cast<int>(m), static_cast<int>(n), static_cast<int>(ka),
                static_cast<T>(alpha), pa + i * sa, lda, pb + i * sb, ldb, static_cast<T>(beta), pc + i * sc,
                static_cast<int>(n));
  });
}

// NOTES: x may carry extra leading dims ([..., in]); they are flattened into rows.
Tensor linear_forward(const Tensor& x, const Tensor& w) {
  const char* op = "linear_forward";
  DSA_DISPATCH_CUDA(on_cuda(x), op, cuda::linear_forward(x, w));
  expect_float(op, "x", x);
  expect_same_dtype(op, "w", w, x);
  expect_shape(op, "w", w, {-1, -1});
  expect_same_device(op, x, w);
  DSA_CHECK(x.ndim() >= 1 && x.size(-1) == w.size(1), "[", op, "] x must have shape [-1, ", w.size(1), "], got ",
            x.desc(), " (w ", w.desc(), ")");
  Shape ys = x.shape();
  ys.back() = w.size(0);
  Tensor y = Tensor::empty(ys, x.dtype());
  Tensor y2 = y.view({-1, w.size(0)});
  gemm(x.view({-1, w.size(1)}), false, w, true, y2);
  return y;
}

Tensor linear_backward(const Tensor& dy, const Tensor& x, const Tensor& w, Tensor* dw, bool need_dx) {
  const char* op = "linear_backward";
  DSA_DISPATCH_CUDA(on_cuda(x), op, cuda::linear_backward(dy, x, w, dw, need_dx));
  expect_float(op, "x", x);
  expect_same_dtype(op, "w", w, x);
  expect_same_dtype(op, "dy", dy, x);
  expect_shape(op, "w", w, {-1, -1});
  expect_same_device(op, x, w);
  expect_same_device(op, x, dy);
  const int64_t out = w.size(0), in = w.size(1);
  Shape ys = x.shape();
  DSA_CHECK(x.ndim() >= 1 && x.size(-1) == in, "[", op, "] x must have shape [-1, ", in, "], got ", x.desc());
  ys.back() = out;
  DSA_CHECK(dy.shape() == ys, "[", op, "] dy must have shape ", ys, ", got ", dy.desc());
  const Tensor x2 = x.view({-1, in}), dy2 = dy.view({-1, out});
  if (dw) {
    Tensor& g = detail::accum_arg(op, "dw", dw, w.shape(), w.dtype());
    gemm(dy2, true, x2, false, g, 1.0, 1.0);
  }
  if (!need_dx) return Tensor();
  Tensor dx = Tensor::empty(x.shape(), x.dtype());
  Tensor dx2 = dx.view({-1, in});
  gemm(dy2, false, w, false, dx2);
  return dx;
}

}  // namespace dsa::ops
