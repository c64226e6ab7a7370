// Layout ops (see kernels/layout_ops.h). Plain strided copies; memory-bound, parallel over rows.
#include <cstring>

#include "kernels/cuda/ops_elementwise.h"
#include "kernels/layout_ops.h"
#include "kernels/op_util.h"

namespace dsa::ops {

namespace {

// Shape split around `dim`: outer = prod(shape[:dim]), len = shape[dim], inner = prod(shape[dim+1:]).
struct Split {
  int64_t outer = 1, len = 1, inner = 1;
};
Split split_at(const Tensor& t, int dim, const char* op) {
  DSA_CHECK(dim >= 0 && dim < t.ndim(), "[", op, "] dim ", dim, " out of range for ", t.desc());
  Split s;
  for (int i = 0; i < dim; ++i) s.outer *= t.shape()[i];
  s.len = t.shape()[dim];
  for (int i = dim + 1; i < t.ndim(); ++i) s.inner *= t.shape()[i];
  return s;
}

void check_cpu(const char* op, const Tensor& t) {
  DSA_CHECK(t.defined(), "[", op, "] undefined input");
  DSA_CHECK(t.is_cpu(), "[", op, "] tensors on different devices, got ", t.desc());
}

template <class T>
void accumulate_rows(T* dst, const T* src, int64_t outer, int64_t dst_stride, int64_t src_stride, int64_t count) {
#pragma omp parallel for if (outer * count > 65536)
  for (int64_t o = 0; o < outer; ++o) {
    T* d = dst + o * dst_stride;
    const T* s = src + o * src_stride;
    for (int64_t i = 0; i < count; ++i) d[i] += s[i];
  }
}

}  // namespace

Tensor narrow(const Tensor& x, int dim, int64_t begin, int64_t end) {
  DSA_DISPATCH_CUDA(detail::on_cuda(x), "narrow", cuda::narrow(x, dim, begin, end));
  check_cpu("narrow", x);
  const Split s = split_at(x, dim, "narrow");
  DSA_CHECK(0 <= begin && begin <= end && end <= s.len, "[narrow] range [", begin, ", ", end, ") out of dim ", dim,
            " of ", x.desc());
  Shape shape = x.shape();
  shape[dim] = end - begin;
  Tensor y = Tensor::empty(shape, x.dtype());
  const size_t es = dtype_size(x.dtype());
  const size_t row = static_cast<size_t>((end - begin) * s.inner) * es;
  const char* src = static_cast<const char*>(x.raw());
  char* dst = static_cast<char*>(y.raw());
#pragma omp parallel for if (s.outer * static_cast<int64_t>(row) > 262144)
  for (int64_t o = 0; o < s.outer; ++o)
    std::memcpy(dst + o * row, src + (o * s.len + begin) * s.inner * es, row);
  return y;
}

void narrow_accumulate_(Tensor& dst, const Tensor& src, int dim, int64_t begin) {
  DSA_DISPATCH_CUDA(detail::on_cuda(dst), "narrow_accumulate_", cuda::narrow_accumulate_(dst, src, dim, begin));
  check_cpu("narrow_accumulate_", dst);
  check_cpu("narrow_accumulate_", src);
  DSA_CHECK(dst.dtype() == src.dtype() && is_float(dst.dtype()), "[narrow_accumulate_] dtypes ", dst.desc(), " and ",
            src.desc());
  const Split d = split_at(dst, dim, "narrow_accumulate_");
  const Split s = split_at(src, dim, "narrow_accumulate_");
  DSA_CHECK(d.outer == s.outer && d.inner == s.inner && begin >= 0 && begin + s.len <= d.len,
            "[narrow_accumulate_] ", src.desc(), " does not fit into ", dst.desc(), " at dim ", dim, " offset ", begin);
  if (dst.dtype() == DType::F32)
    accumulate_rows(dst.data<float>() + begin * d.inner, src.data<float>(), d.outer, d.len * d.inner, s.len * s.inner,
                    s.len * s.inner);
  else
    accumulate_rows(dst.data<double>() + begin * d.inner, src.data<double>(), d.outer, d.len * d.inner,
                    s.len * s.inner, s.len * s.inner);
}

Tensor transpose01(const Tensor& x) {
  DSA_DISPATCH_CUDA(detail::on_cuda(x), "transpose01", cuda::transpose01(x));
  check_cpu("transpose01", x);
  DSA_CHECK(x.ndim() >= 2, "[transpose01] needs at least 2 dims, got ", x.desc());
  const int64_t A = x.shape()[0], B = x.shape()[1];
  const int64_t inner = B && A ? x.numel() / (A * B) : 0;
  Shape shape = x.shape();
  std::swap(shape[0], shape[1]);
  Tensor y = Tensor::empty(shape, x.dtype());
  const size_t es = dtype_size(x.dtype());
  const size_t row = static_cast<size_t>(inner) * es;
  const char* src = static_cast<const char*>(x.raw());
  char* dst = static_cast<char*>(y.raw());
#pragma omp parallel for collapse(2) if (x.numel() > 65536)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t a = 0; a < A; ++a) std::memcpy(dst + (b * A + a) * row, src + (a * B + b) * row, row);
  return y;
}

Tensor repeat_dim1(const Tensor& x, int64_t repeats) {
  DSA_DISPATCH_CUDA(detail::on_cuda(x), "repeat_dim1", cuda::repeat_dim1(x, repeats));
  check_cpu("repeat_dim1", x);
  DSA_CHECK(x.ndim() == 3 && x.shape()[1] == 1 && repeats > 0, "[repeat_dim1] x must be [N, 1, C], got ", x.desc());
  const int64_t N = x.shape()[0], C = x.shape()[2];
  Tensor y = Tensor::empty({N, repeats, C}, x.dtype());
  const size_t row = static_cast<size_t>(C) * dtype_size(x.dtype());
  const char* src = static_cast<const char*>(x.raw());
  char* dst = static_cast<char*>(y.raw());
#pragma omp parallel for if (N * repeats * C > 65536)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t r = 0; r < repeats; ++r) std::memcpy(dst + (n * repeats + r) * row, src + n * row, row);
  return y;
}

namespace {
template <class T>
void sum_dim1_impl(const T* x, T* y, int64_t N, int64_t R, int64_t C) {
#pragma omp parallel for if (N * R * C > 65536)
  for (int64_t n = 0; n < N; ++n) {
    T* out = y + n * C;
    for (int64_t c = 0; c < C; ++c) out[c] = 0;
    for (int64_t r = 0; r < R; ++r) {
      const T* in = x + (n * R + r) * C;
      for (int64_t c = 0; c < C; ++c) out[c] += in[c];
    }
  }
}
}  // namespace

Tensor sum_dim1(const Tensor& x) {
  DSA_DISPATCH_CUDA(detail::on_cuda(x), "sum_dim1", cuda::sum_dim1(x));
  check_cpu("sum_dim1", x);
  DSA_CHECK(x.ndim() == 3 && is_float(x.dtype()), "[sum_dim1] x must be f32/f64 [N, R, C], got ", x.desc());
  const int64_t N = x.shape()[0], R = x.shape()[1], C = x.shape()[2];
  Tensor y = Tensor::empty({N, 1, C}, x.dtype());
  if (x.dtype() == DType::F32)
    sum_dim1_impl(x.data<float>(), y.data<float>(), N, R, C);
  else
    sum_dim1_impl(x.data<double>(), y.data<double>(), N, R, C);
  return y;
}

}  // namespace dsa::ops
