// RMSNorm and LayerNorm over the last dim, forward and backward (CPU reference).
//
// NOTES: row statistics are accumulated in double and rounded once to T, then the output follows the
// transformers order of operations (RMSNorm: w * (x * rstd); LayerNorm: (x - mean) * rstd * w + b),
// so f32 results match a float32 torch reference to rounding. Parameter gradients are reduced over a
// fixed number of row blocks summed in order, so they do not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/op_util.h"
#include "kernels/cuda/ops_layers.h"
#include "kernels/ops.h"

namespace dsa::ops {

using detail::dispatch_float;
using detail::expect_same_dtype;
using detail::on_cuda;

namespace {

constexpr int64_t kRowBlocks = 32;

// Shared entry checks: x [N, D] float, w [D] same dtype, same device.
void check_xw(const char* op, const Tensor& x, const Tensor& w) {
  expect_float(op, "x", x);
  expect_shape(op, "x", x, {-1, -1});
  expect_same_dtype(op, "w", w, x);
  expect_shape(op, "w", w, {x.size(1)});
  expect_same_device(op, x, w);
}
void check_stat(const char* op, const char* name, const Tensor& s, const Tensor& x) {
  expect_same_dtype(op, name, s, x);
  expect_shape(op, name, s, {x.size(0)});
  expect_same_device(op, s, x);
}

// Column sums of f(n, j) over rows into acc [D] (+=), deterministic: row blocks then an ordered sum.
template <class T, class F>
void column_reduce(int64_t n, int64_t d, T* acc /*[D] +=*/, F&& f) {
  const int64_t blocks = std::max<int64_t>(1, std::min(kRowBlocks, n));
  std::vector<double> part(static_cast<size_t>(blocks * d), 0.0);  // [blocks, D]
#pragma omp parallel for schedule(static) if (n * d > (1 << 14))
  for (int64_t b = 0; b < blocks; ++b) {
    double* p = part.data() + b * d;
    for (int64_t i = b * n / blocks; i < (b + 1) * n / blocks; ++i)
      for (int64_t j = 0; j < d; ++j) p[j] += f(i, j);
  }
  for (int64_t j = 0; j < d; ++j) {
    double s = 0;
    for (int64_t b = 0; b < blocks; ++b) s += part[b * d + j];
    acc[j] += static_cast<T>(s);
  }
}

template <class T>
void rmsnorm_fwd(const T* x /*[N, D]*/, const T* w /*[D]*/, double eps, int64_t n, int64_t d, T* y /*[N, D]*/,
                 T* rstd /*[N]*/) {
#pragma omp parallel for schedule(static) if (n * d > (1 << 14))
  for (int64_t i = 0; i < n; ++i) {
    const T* xi = x + i * d;
    double ss = 0;
    for (int64_t j = 0; j < d; ++j) ss += static_cast<double>(xi[j]) * xi[j];
    const T r = static_cast<T>(1.0 / std::sqrt(ss / static_cast<double>(d) + eps));
    rstd[i] = r;
    for (int64_t j = 0; j < d; ++j) y[i * d + j] = w[j] * (xi[j] * r);
  }
}

// y = w x r, r = (mean x^2 + eps)^-1/2:  dx_j = r w_j dy_j - x_j r^3 / D * sum_k w_k dy_k x_k.
template <class T>
void rmsnorm_bwd(const T* dy, const T* x, const T* w, const T* rstd, int64_t n, int64_t d, T* dx, T* dw) {
#pragma omp parallel for schedule(static) if (n * d > (1 << 14))
  for (int64_t i = 0; i < n; ++i) {
    const T* xi = x + i * d;
    const T* gi = dy + i * d;
    double dot = 0;
    for (int64_t j = 0; j < d; ++j) dot += static_cast<double>(gi[j]) * w[j] * xi[j];
    const double r = rstd[i];
    const T c = static_cast<T>(dot * r * r * r / static_cast<double>(d));
    const T rt = static_cast<T>(r);
    for (int64_t j = 0; j < d; ++j) dx[i * d + j] = rt * w[j] * gi[j] - xi[j] * c;
  }
  if (dw)
    column_reduce<T>(n, d, dw, [&](int64_t i, int64_t j) {
      return static_cast<double>(dy[i * d + j]) * x[i * d + j] * rstd[i];
    });
}

template <class T>
void layernorm_fwd(const T* x, const T* w, const T* b, double eps, int64_t n, int64_t d, T* y, T* mean,
                   T* rstd) {
#pragma omp parallel for schedule(static) if (n * d > (1 << 14))
  for (int64_t i = 0; i < n; ++i) {
    const T* xi = x + i * d;
    double s = 0;
    for (int64_t j = 0; j < d; ++j) s += xi[j];
    const double mu = s / static_cast<double>(d);
    double v = 0;
    for (int64_t j = 0; j < d; ++j) v += (xi[j] - mu) * (xi[j] - mu);
    const T m = static_cast<T>(mu), r = static_cast<T>(1.0 / std::sqrt(v / static_cast<double>(d) + eps));
    mean[i] = m;
    rstd[i] = r;
    for (int64_t j = 0; j < d; ++j) y[i * d + j] = (xi[j] - m) * r * w[j] + b[j];
  }
}

// xhat = (x - mean) r, g = dy w:  dx = r (g - mean(g) - xhat mean(g xhat)).
template <class T>
void layernorm_bwd(const T* dy, const T* x, const T* w, const T* mean, const T* rstd, int64_t n, int64_t d, T* dx,
                   T* dw, T* db) {
#pragma omp parallel for schedule(static) if (n * d > (1 << 14))
  for (int64_t i = 0; i < n; ++i) {
    const T* xi = x + i * d;
    const T* gi = dy + i * d;
    const double m = mean[i], r = rstd[i];
    double sg = 0, sgx = 0;
    for (int64_t j = 0; j < d; ++j) {
      const double g = static_cast<double>(gi[j]) * w[j];
      sg += g;
      sgx += g * (xi[j] - m) * r;
    }
    const double mg = sg / static_cast<double>(d), mgx = sgx / static_cast<double>(d);
    for (int64_t j = 0; j < d; ++j) {
      const double xh = (xi[j] - m) * r;
      dx[i * d + j] = static_cast<T>(r * (static_cast<double>(gi[j]) * w[j] - mg - xh * mgx));
    }
  }
  if (dw)
    column_reduce<T>(n, d, dw, [&](int64_t i, int64_t j) {
      return static_cast<double>(dy[i * d + j]) * (static_cast<double>(x[i * d + j]) - mean[i]) * rstd[i];
    });
  if (db) column_reduce<T>(n, d, db, [&](int64_t i, int64_t j) { return static_cast<double>(dy[i * d + j]); });
}

}  // namespace

Tensor rmsnorm_forward(const Tensor& x, const Tensor& w, double eps, Tensor* rstd_out) {
  const char* op = "rmsnorm";
  DSA_DISPATCH_CUDA(on_cuda(x), op, cuda::rmsnorm_forward(x, w, eps, rstd_out));
  check_xw(op, x, w);
  const int64_t n = x.size(0), d = x.size(1);
  Tensor y = Tensor::empty(x.shape(), x.dtype());
  Tensor rstd_local;
  Tensor& rstd = detail::output_arg(op, "rstd_out", rstd_out ? rstd_out : &rstd_local, {n}, x.dtype());
  dispatch_float(op, x.dtype(), [&](auto t) {
    using T = decltype(t);
    rmsnorm_fwd<T>(x.data<T>(), w.data<T>(), eps, n, d, y.data<T>(), rstd.data<T>());
  });
  return y;
}

Tensor rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd, Tensor* dw) {
  const char* op = "rmsnorm_backward";
  DSA_DISPATCH_CUDA(on_cuda(x), op, cuda::rmsnorm_backward(dy, x, w, rstd, dw));
  check_xw(op, x, w);
  expect_same_dtype(op, "dy", dy, x);
  expect_shape(op, "dy", dy, x.shape());
  expect_same_device(op, dy, x);
  check_stat(op, "rstd", rstd, x);
  const int64_t n = x.size(0), d = x.size(1);
  Tensor dx = Tensor::empty(x.shape(), x.dtype());
  Tensor* g = dw ? &detail::accum_arg(op, "dw", dw, w.shape(), w.dtype()) : nullptr;
  dispatch_float(op, x.dtype(), [&](auto t) {
    using T = decltype(t);
    rmsnorm_bwd<T>(dy.data<T>(), x.data<T>(), w.data<T>(), rstd.data<T>(), n, d, dx.data<T>(),
                   g ? g->data<T>() : nullptr);
  });
  return dx;
}

Tensor layernorm_forward(const Tensor& x, const Tensor& w, const Tensor& b, double eps, Tensor* mean_out,
                         Tensor* rstd_out) {
  const char* op = "layernorm";
  DSA_DISPATCH_CUDA(on_cuda(x), op, cuda::layernorm_forward(x, w, b, eps, mean_out, rstd_out));
  check_xw(op, x, w);
  expect_same_dtype(op, "b", b, x);
  expect_shape(op, "b", b, w.shape());
  expect_same_device(op, x, b);
  const int64_t n = x.size(0), d = x.size(1);
  Tensor y = Tensor::empty(x.shape(), x.dtype());
  Tensor mean_local, rstd_local;
  Tensor& mean = detail::output_arg(op, "mean_out", mean_out ? mean_out : &mean_local, {n}, x.dtype());
  Tensor& rstd = detail::output_arg(op, "rstd_out", rstd_out ? rstd_out : &rstd_local, {n}, x.dtype());
  dispatch_float(op, x.dtype(), [&](auto t) {
    using T = decltype(t);
    layernorm_fwd<T>(x.data<T>(), w.data<T>(), b.data<T>(), eps, n, d, y.data<T>(), mean.data<T>(),
                     rstd.data<T>());
  });
  return y;
}

Tensor layernorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& mean,
                          const Tensor& rstd, Tensor* dw, Tensor* db) {
  const char* op = "layernorm_backward";
  DSA_DISPATCH_CUDA(on_cuda(x), op, cuda::layernorm_backward(dy, x, w, mean, rstd, dw, db));
  check_xw(op, x, w);
  expect_same_dtype(op, "dy", dy, x);
  expect_shape(op, "dy", dy, x.shape());
  expect_same_device(op, dy, x);
  check_stat(op, "mean", mean, x);
  check_stat(op, "rstd", rstd, x);
  const int64_t n = x.size(0), d = x.size(1);
  Tensor dx = Tensor::empty(x.shape(), x.dtype());
  Tensor* gw = dw ? &detail::accum_arg(op, "dw", dw, w.shape(), w.dtype()) : nullptr;
  Tensor* gb = db ? &detail::accum_arg(op, "db", db, w.shape(), w.dtype()) : nullptr;
  dispatch_float(op, x.dtype(), [&](auto t) {
    using T = decltype(t);
    layernorm_bwd<T>(dy.data<T>(), x.data<T>(), w.data<T>(), mean.data<T>(), rstd.data<T>(), n, d, dx.data<T>(),
                     gw ? gw->data<T>() : nullptr, gb ? gb->data<T>() : nullptr);
  });
  return dx;
}

}  // namespace dsa::ops
