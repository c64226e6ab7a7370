// Elementwise ops and slices along the last dimension (CPU reference).
#include <cstring>

#include "kernels/op_util.h"
#include "kernels/cuda/ops_elementwise.h"
#include "kernels/ops.h"

namespace dsa::ops {

using detail::dispatch_float;
using detail::expect_same_dtype;
using detail::on_cuda;

namespace {

void expect_same_shape(const char* op, const Tensor& a, const Tensor& b) {
  DSA_CHECK(a.defined() && b.defined() && a.shape() == b.shape(), "[", op, "] shapes differ: ", a.desc(), " and ",
            b.desc());
}

// a[i] = a[i] * sa + b[i] * sb over n elements.
template <class T>
void axpby(T* a, const T* b, int64_t n, T sa, T sb) {
#pragma omp parallel for schedule(static) if (n > (1 << 16))
  for (int64_t i = 0; i < n; ++i) a[i] = a[i] * sa + b[i] * sb;
}

// dst [rows, dd] (columns begin..begin+ds) += src [rows, ds].
template <class T>
void accumulate_cols(T* dst, int64_t dd, int64_t begin, const T* src, int64_t ds, int64_t rows) {
#pragma omp parallel for schedule(static) if (rows * ds > (1 << 16))
  for (int64_t r = 0; r < rows; ++r) {
    T* d = dst + r * dd + begin;
    const T* s = src + r * ds;
    for (int64_t j = 0; j < ds; ++j) d[j] += s[j];
  }
}

// Byte-wise column copy for any dtype: dst row r gets src row r's bytes [sb, sb+len) at db.
void copy_bytes(char* dst, size_t drow, size_t db, const char* src, size_t srow, size_t sb, size_t len,
                int64_t rows) {
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(len) * rows > (1 << 18))
  for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + r * drow + db, src + r * srow + sb, len);
}

Shape with_last(const Shape& s, int64_t last) {
  Shape r = s;
  r.back() = last;
  return r;
}

}  // namespace

void add_(Tensor& a, const Tensor& b) { add_scaled_(a, b, 1.0); }

void add_scaled_(Tensor& a, const Tensor& b, double s) {
  const char* op = "add_scaled_";
  DSA_DISPATCH_CUDA(on_cuda(a), op, cuda::add_scaled_(a, b, s));
  expect_float(op, "a", a);
  expect_same_dtype(op, "b", b, a);
  expect_same_shape(op, a, b);
  expect_same_device(op, a, b);
  dispatch_float(op, a.dtype(), [&](auto t) {
    using T = decltype(t);
    axpby<T>(a.data<T>(), b.data<T>(), a.numel(), T(1), static_cast<T>(s));
  });
}

void scale_(Tensor& a, double s) {
  const char* op = "scale_";
  DSA_DISPATCH_CUDA(on_cuda(a), op, cuda::scale_(a, s));
  expect_float(op, "a", a);
  dispatch_float(op, a.dtype(), [&](auto t) {
    using T = decltype(t);
    T* p = a.data<T>();
    const T ts = static_cast<T>(s);
    const int64_t n = a.numel();
#pragma omp parallel for schedule(static) if (n > (1 << 16))
    for (int64_t i = 0; i < n; ++i) p[i] *= ts;
  });
}

Tensor add(const Tensor& a, const Tensor& b) {
  const char* op = "add";
  DSA_DISPATCH_CUDA(on_cuda(a), op, cuda::add(a, b));
  expect_float(op, "a", a);
  expect_same_dtype(op, "b", b, a);
  expect_same_shape(op, a, b);
  expect_same_device(op, a, b);
  Tensor y = a.clone();
  add_(y, b);
  return y;
}

Tensor slice_last(const Tensor& x, int64_t begin, int64_t end) {
  const char* op = "slice_last";
  DSA_CHECK(x.defined() && x.ndim() >= 1, "[", op, "] x must have at least one dimension, got ", x.desc());
  const int64_t d = x.size(-1);
  DSA_CHECK(0 <= begin && begin <= end && end <= d, "[", op, "] range [", begin, ", ", end, ") out of bounds for ",
            x.desc());
  DSA_DISPATCH_CUDA(on_cuda(x), op, cuda::slice_last(x, begin, end));
  Tensor y = Tensor::empty(with_last(x.shape(), end - begin), x.dtype());
  const int64_t rows = d ? x.numel() / d : 0;
  const size_t es = static_cast<size_t>(dtype_size(x.dtype()));
  if (end > begin)
    copy_bytes(static_cast<char*>(y.raw()), (end - begin) * es, 0, static_cast<const char*>(x.raw()), d * es,
               begin * es, (end - begin) * es, rows);
  return y;
}

void slice_last_accumulate_(Tensor& dst, const Tensor& src, int64_t begin) {
  const char* op = "slice_last_accumulate_";
  DSA_DISPATCH_CUDA(on_cuda(dst), op, cuda::slice_last_accumulate_(dst, src, begin));
  expect_float(op, "dst", dst);
  expect_same_dtype(op, "src", src, dst);
  expect_same_device(op, dst, src);
  DSA_CHECK(dst.ndim() >= 1 && src.ndim() == dst.ndim(), "[", op, "] src ", src.desc(), " and dst ", dst.desc(),
            " must have the same rank");
  const int64_t dd = dst.size(-1), ds = src.size(-1);
  DSA_CHECK(src.shape() == with_last(dst.shape(), ds) && begin >= 0 && begin + ds <= dd, "[", op, "] src ",
            src.desc(), " at column ", begin, " does not fit dst ", dst.desc());
  if (ds == 0) return;
  const int64_t rows = src.numel() / ds;
  dispatch_float(op, dst.dtype(), [&](auto t) {
    using T = decltype(t);
    accumulate_cols<T>(dst.data<T>(), dd, begin, src.data<T>(), ds, rows);
  });
}

Tensor concat_last(const Tensor& a, const Tensor& b) {
  const char* op = "concat_last";
  DSA_CHECK(a.defined() && b.defined() && a.ndim() >= 1 && a.ndim() == b.ndim() && a.dtype() == b.dtype() &&
                b.shape() == with_last(a.shape(), b.size(-1)),
            "[", op, "] a ", a.desc(), " and b ", b.desc(), " must agree in all but the last dimension");
  expect_same_device(op, a, b);
  DSA_DISPATCH_CUDA(on_cuda(a), op, cuda::concat_last(a, b));
  const int64_t da = a.size(-1), db = b.size(-1), d = da + db;
  Tensor y = Tensor::empty(with_last(a.shape(), d), a.dtype());
  const int64_t rows = a.numel() ? a.numel() / da : (db ? b.numel() / db : 0);
  const size_t es = static_cast<size_t>(dtype_size(a.dtype()));
  char* yp = static_cast<char*>(y.raw());
  if (da) copy_bytes(yp, d * es, 0, static_cast<const char*>(a.raw()), da * es, 0, da * es, rows);
  if (db) copy_bytes(yp, d * es, da * es, static_cast<const char*>(b.raw()), db * es, 0, db * es, rows);
  return y;
}

namespace {
// Sum of f(x_i) in f64 over a CPU f32/f64 tensor, in a fixed order for a given thread count.
template <class F>
double reduce_f64(const char* op, const Tensor& x, F f) {
  expect_float(op, "x", x);
  double s = 0;
  dispatch_float(op, x.dtype(), [&](auto t) {
    using T = decltype(t);
    const T* p = x.data<T>();
    const int64_t n = x.numel();
    double acc = 0;
#pragma omp parallel for schedule(static) reduction(+ : acc) if (n > (1 << 16))
    for (int64_t i = 0; i < n; ++i) acc += f(static_cast<double>(p[i]));
    s = acc;
  });
  return s;
}
}  // namespace

double sum(const Tensor& x) {
  DSA_DISPATCH_CUDA(on_cuda(x), "sum", cuda::sum(x));
  return reduce_f64("sum", x, [](double v) { return v; });
}

double sum_squares(const Tensor& x) {
  DSA_DISPATCH_CUDA(on_cuda(x), "sum_squares", cuda::sum_squares(x));
  return reduce_f64("sum_squares", x, [](double v) { return v * v; });
}

namespace {
bool cpu_castable(DType t) { return t == DType::F32 || t == DType::F64 || t == DType::BF16; }
}  // namespace

Tensor cast(const Tensor& x, DType dtype) {
  const char* op = "cast";
  DSA_CHECK(x.defined(), "[", op, "] x is undefined");
  if (x.dtype() == dtype) return x;
  DSA_DISPATCH_CUDA(on_cuda(x), op, cuda::cast(x, dtype));
  DSA_CHECK(cpu_castable(x.dtype()) && cpu_castable(dtype), "[", op, "] unsupported conversion ", x.desc(), " -> ",
            dtype_name(dtype), " (f32, f64, bf16)");
  return x.to(dtype);
}

void copy_cast_(Tensor& dst, const Tensor& src) {
  const char* op = "copy_cast_";
  DSA_CHECK(dst.defined() && src.defined() && dst.shape() == src.shape(), "[", op, "] dst ", dst.desc(),
            " and src ", src.desc(), " must have the same shape");
  expect_same_device(op, dst, src);
  DSA_DISPATCH_CUDA(on_cuda(dst), op, cuda::copy_cast_(dst, src));
  if (dst.dtype() == src.dtype()) {
    dst.copy_from(src);
    return;
  }
  DSA_CHECK(cpu_castable(src.dtype()) && cpu_castable(dst.dtype()), "[", op, "] unsupported conversion ",
            src.desc(), " -> ", dtype_name(dst.dtype()), " (f32, f64, bf16)");
  dst.copy_from(src.to(dst.dtype()));
}

}  // namespace dsa::ops
