// Elementwise and layout ops on the GPU: axpby, slices / concat / narrow / transpose / repeat as one
// strided row-copy kernel, accumulating row copies, deterministic f64 sums, dtype casts.
//
// NOTES: memory-bound; floating math in fp32 on bf16 or f32 storage. Copies move 16/8/4/2/1-byte units,
// the largest unit that divides every byte offset, stride and length of the call. Reductions use a
// fixed grid (a function of n only) and an ordered final pass, so results do not vary run to run.
#include <vector>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/ops_elementwise.h"

namespace dsa::cuda {

namespace {

constexpr int kThreads = 256;

template <class F>
void dispatch_gpu_float(const char* op, DType dt, F&& f) {
  if (dt == DType::F32)
    f(float{});
  else if (dt == DType::BF16)
    f(__nv_bfloat16{});
  else
    fail(strcat_("[", op, "] unsupported dtype ", dtype_name(dt), " on the GPU (bf16 or f32)"));
}

// ------------------------------------------------------------------------------------------ axpby
struct AxpbyParams {
  const void* a;  // [n]
  const void* b;  // [n] or nullptr (then out = a * sa)
  void* out;      // [n], may alias a
  int64_t n;
  float sa, sb;
  bool vec;  // all pointers 16-byte aligned
};

template <class T>
__global__ void axpby_kernel(AxpbyParams p) {
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  T* o = static_cast<T*>(p.out);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t i0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if (p.vec) {
    constexpr int V = Vec<T>::kN;
    const int64_t nv = p.n / V;
    for (int64_t i = i0; i < nv; i += stride) {
      Vec<T> va, vb, vo;
      va.load(a + i * V);
      if (b) vb.load(b + i * V);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float y = to_f32(va.v[j]) * p.sa + (b ? to_f32(vb.v[j]) * p.sb : 0.0f);
        vo.v[j] = from_f32<T>(y);
      }
      vo.store(o + i * V);
    }
    done = nv * V;
  }
  for (int64_t i = done + i0; i < p.n; i += stride)
    o[i] = from_f32<T>(to_f32(a[i]) * p.sa + (b ? to_f32(b[i]) * p.sb : 0.0f));
}

void axpby(const char* op, const Tensor& a, const Tensor* b, Tensor& out, double sa, double sb) {
  const int64_t n = a.numel();
  if (n == 0) return;
  AxpbyParams p{a.raw(), b ? b->raw() : nullptr, out.raw(), n, static_cast<float>(sa), static_cast<float>(sb),
                aligned16(a.raw()) && aligned16(out.raw()) && (!b || aligned16(b->raw()))};
  dispatch_gpu_float(op, a.dtype(), [&](auto t) {
    using T = decltype(t);
    axpby_kernel<T><<<grid_for(n / (p.vec ? Vec<T>::kN : 1) + 1, kThreads), kThreads, 0, stream()>>>(p);
  });
  check_launch(op);
}

void expect_pair(const char* op, const Tensor& a, const Tensor& b) {
  expect_gpu_float(op, "a", a);
  expect_cuda(op, "b", b);
  DSA_CHECK(b.dtype() == a.dtype(), "[", op, "] b must be ", dtype_name(a.dtype()), " like a, got ", b.desc());
  DSA_CHECK(a.shape() == b.shape(), "[", op, "] shapes differ: ", a.desc(), " and ", b.desc());
}

// --------------------------------------------------------------------------------- strided row copy
// dst row q (q < rows) at units q * dst_stride + dst_base gets `len` units from src at
//   (q / d1) * s1 + (q % d1) * s2 + src_base.
struct CopyParams {
  char* dst;        // dst bytes
  const char* src;  // src bytes
  int64_t rows, len, dst_stride, dst_base, d1, s1, s2, src_base;  // in units
};

template <class U>
__global__ void copy_rows_kernel(CopyParams p) {
  U* dst = reinterpret_cast<U*>(p.dst);
  const U* src = reinterpret_cast<const U*>(p.src);
  const int64_t total = p.rows * p.len, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t q = i / p.len, j = i - q * p.len;
    const int64_t q1 = q / p.d1, q2 = q - q1 * p.d1;
    dst[q * p.dst_stride + p.dst_base + j] = src[q1 * p.s1 + q2 * p.s2 + p.src_base + j];
  }
}

// All sizes in BYTES here; converted to the largest unit that divides them all.
void copy_rows(const char* op, void* dst, const void* src, int64_t rows, int64_t len, int64_t dst_stride,
               int64_t dst_base, int64_t d1, int64_t s1, int64_t s2, int64_t src_base) {
  if (rows == 0 || len == 0) return;
  uint64_t all = reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) |
                 static_cast<uint64_t>(len | dst_stride | dst_base | s1 | s2 | src_base) | 16u;
  const int64_t u = static_cast<int64_t>(all & (~all + 1));
  CopyParams p{static_cast<char*>(dst), static_cast<const char*>(src), rows, len / u, dst_stride / u, dst_base / u,
               d1, s1 / u, s2 / u, src_base / u};
  const unsigned g = grid_for(rows * (len / u), kThreads);
  switch (u) {
    case 16: copy_rows_kernel<uint4><<<g, kThreads, 0, stream()>>>(p); break;
    case 8: copy_rows_kernel<uint2><<<g, kThreads, 0, stream()>>>(p); break;
    case 4: copy_rows_kernel<uint32_t><<<g, kThreads, 0, stream()>>>(p); break;
    case 2: copy_rows_kernel<uint16_t><<<g, kThreads, 0, stream()>>>(p); break;
    default: copy_rows_kernel<uint8_t><<<g, kThreads, 0, stream()>>>(p); break;
  }
  check_launch(op);
}

// ------------------------------------------------------------------------------ accumulating rows
struct AccumParams {
  void* dst;        // [rows, dst_stride] (elements), written at dst_base + j
  const void* src;  // [rows, len]
  int64_t rows, len, dst_stride, dst_base;
};

template <class T>
__global__ void accum_rows_kernel(AccumParams p) {
  T* dst = static_cast<T*>(p.dst);
  const T* src = static_cast<const T*>(p.src);
  const int64_t total = p.rows * p.len, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t q = i / p.len, j = i - q * p.len;
    T& d = dst[q * p.dst_stride + p.dst_base + j];
    d = from_f32<T>(to_f32(d) + to_f32(src[i]));
  }
}

void accum_rows(const char* op, DType dt, void* dst, const void* src, int64_t rows, int64_t len, int64_t dst_stride,
                int64_t dst_base) {
  if (rows == 0 || len == 0) return;
  AccumParams p{dst, src, rows, len, dst_stride, dst_base};
  dispatch_gpu_float(op, dt, [&](auto t) {
    using T = decltype(t);
    accum_rows_kernel<T><<<grid_for(rows * len, kThreads), kThreads, 0, stream()>>>(p);
  });
  check_launch(op);
}

// ------------------------------------------------------------------------------------ reductions
constexpr int kReduceBlocks = 264;  // fixed: results depend on n only, not on the device

template <class T, bool kSquare>
__global__ void reduce_partial_kernel(const T* x /*[n]*/, int64_t n, double* part /*[gridDim.x]*/) {
  __shared__ double sh[32];
  double acc = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const double v = to_f32(x[i]);
    acc += kSquare ? v * v : v;
  }
  acc = block_sum(acc, sh);
  if (threadIdx.x == 0) part[blockIdx.x] = acc;
}

// out[0] = sum of part[0..n) in a fixed order (one block).
__global__ void reduce_final_kernel(const double* part /*[n]*/, int n, double* out /*[1]*/) {
  __shared__ double sh[32];
  double acc = 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) acc += part[i];
  acc = block_sum(acc, sh);
  if (threadIdx.x == 0) *out = acc;
}

// Enqueues the f64 sum (or sum of squares) of x into *out_dev; part_dev has kReduceBlocks slots.
void reduce_into(const char* op, const Tensor& x, bool square, double* part_dev, double* out_dev) {
  dispatch_gpu_float(op, x.dtype(), [&](auto t) {
    using T = decltype(t);
    const T* p = static_cast<const T*>(x.raw());
    if (square)
      reduce_partial_kernel<T, true><<<kReduceBlocks, kThreads, 0, stream()>>>(p, x.numel(), part_dev);
    else
      reduce_partial_kernel<T, false><<<kReduceBlocks, kThreads, 0, stream()>>>(p, x.numel(), part_dev);
  });
  reduce_final_kernel<<<1, kThreads, 0, stream()>>>(part_dev, kReduceBlocks, out_dev);
  check_launch(op);
}

double reduce(const char* op, const Tensor& x, bool square) {
  expect_gpu_float(op, "x", x);
  Tensor buf = Tensor::empty({kReduceBlocks + 1}, DType::F64, Device::CUDA);
  double* d = buf.data<double>();
  reduce_into(op, x, square, d, d + kReduceBlocks);
  return buf.slice_rows(kReduceBlocks, kReduceBlocks + 1).to(Device::CPU).item(0);
}

// ---------------------------------------------------------------------------------- sum over dim 1
template <class T>
__global__ void sum_dim1_kernel(const T* x /*[N, R, C]*/, T* y /*[N, C]*/, int64_t N, int64_t R, int64_t C) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N * C; i += stride) {
    const int64_t n = i / C, c = i - n * C;
    float acc = 0;
    for (int64_t r = 0; r < R; ++r) acc += to_f32(x[(n * R + r) * C + c]);
    y[i] = from_f32<T>(acc);
  }
}

// ------------------------------------------------------------------------------------------- cast
template <class S, class D>
__global__ void cast_kernel(const S* x /*[n]*/, D* y /*[n]*/, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    y[i] = from_f32<D>(to_f32(x[i]));
}

Shape with_last(const Shape& s, int64_t last) {
  Shape r = s;
  r.back() = last;
  return r;
}

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

}  // namespace

void add_scaled_(Tensor& a, const Tensor& b, double s) {
  expect_pair("add_scaled_", a, b);
  axpby("add_scaled_", a, &b, a, 1.0, s);
}

void scale_(Tensor& a, double s) {
  expect_gpu_float("scale_", "a", a);
  axpby("scale_", a, nullptr, a, s, 0.0);
}

Tensor add(const Tensor& a, const Tensor& b) {
  expect_pair("add", a, b);
  Tensor y = Tensor::empty(a.shape(), a.dtype(), Device::CUDA);
  axpby("add", a, &b, y, 1.0, 1.0);
  return y;
}

Tensor slice_last(const Tensor& x, int64_t begin, int64_t end) {
  const char* op = "slice_last";
  expect_cuda(op, "x", x);
  DSA_CHECK(x.ndim() >= 1, "[", op, "] x must have at least one dimension, got ", x.desc());
  const int64_t d = x.size(-1);
  DSA_CHECK(0 <= begin && begin <= end && end <= d, "[", op, "] range [", begin, ", ", end, ") out of bounds for ",
            x.desc());
  Tensor y = Tensor::empty(with_last(x.shape(), end - begin), x.dtype(), Device::CUDA);
  const int64_t es = dtype_size(x.dtype()), rows = d ? x.numel() / d : 0;
  copy_rows(op, y.raw(), x.raw(), rows, (end - begin) * es, (end - begin) * es, 0, 1, d * es, 0, begin * es);
  return y;
}

void slice_last_accumulate_(Tensor& dst, const Tensor& src, int64_t begin) {
  const char* op = "slice_last_accumulate_";
  expect_gpu_float(op, "dst", dst);
  expect_cuda(op, "src", src);
  DSA_CHECK(src.dtype() == dst.dtype(), "[", op, "] src must be ", dtype_name(dst.dtype()), " like dst, got ",
            src.desc());
  DSA_CHECK(dst.ndim() >= 1 && src.ndim() == dst.ndim(), "[", op, "] src ", src.desc(), " and dst ", dst.desc(),
            " must have the same rank");
  const int64_t dd = dst.size(-1), ds = src.size(-1);
  DSA_CHECK(src.shape() == with_last(dst.shape(), ds) && begin >= 0 && begin + ds <= dd, "[", op, "] src ",
            src.desc(), " at column ", begin, " does not fit dst ", dst.desc());
  if (ds == 0) return;
  accum_rows(op, dst.dtype(), dst.raw(), src.raw(), src.numel() / ds, ds, dd, begin);
}

Tensor concat_last(const Tensor& a, const Tensor& b) {
  const char* op = "concat_last";
  expect_cuda(op, "a", a);
  expect_cuda(op, "b", b);
  DSA_CHECK(a.ndim() >= 1 && a.ndim() == b.ndim() && a.dtype() == b.dtype() &&
                b.shape() == with_last(a.shape(), b.size(-1)),
            "[", op, "] a ", a.desc(), " and b ", b.desc(), " must agree in all but the last dimension");
  const int64_t da = a.size(-1), db = b.size(-1), d = da + db, es = dtype_size(a.dtype());
  Tensor y = Tensor::empty(with_last(a.shape(), d), a.dtype(), Device::CUDA);
  const int64_t rows = a.numel() ? a.numel() / da : (db ? b.numel() / db : 0);
  copy_rows(op, y.raw(), a.raw(), rows, da * es, d * es, 0, 1, da * es, 0, 0);
  copy_rows(op, y.raw(), b.raw(), rows, db * es, d * es, da * es, 1, db * es, 0, 0);
  return y;
}

double sum(const Tensor& x) { return reduce("sum", x, false); }
double sum_squares(const Tensor& x) { return reduce("sum_squares", x, true); }

double sum_squares_all(const std::vector<const Tensor*>& ts) {
  const char* op = "global_grad_norm";
  const int64_t n = static_cast<int64_t>(ts.size());
  if (n == 0) return 0;
  for (const Tensor* t : ts) expect_gpu_float(op, "grad", *t);
  Tensor part = Tensor::empty({kReduceBlocks}, DType::F64, Device::CUDA);
  Tensor out = Tensor::empty({n}, DType::F64, Device::CUDA);  // [n] per-tensor sums
  for (int64_t i = 0; i < n; ++i) reduce_into(op, *ts[i], true, part.data<double>(), out.data<double>() + i);
  const Tensor host = out.to(Device::CPU);
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += host.data<double>()[i];
  return s;
}

Tensor narrow(const Tensor& x, int dim, int64_t begin, int64_t end) {
  const char* op = "narrow";
  expect_cuda(op, "x", x);
  const Split s = split_at(x, dim, op);
  DSA_CHECK(0 <= begin && begin <= end && end <= s.len, "[", op, "] range [", begin, ", ", end, ") out of dim ", dim,
            " of ", x.desc());
  Shape shape = x.shape();
  shape[dim] = end - begin;
  Tensor y = Tensor::empty(shape, x.dtype(), Device::CUDA);
  const int64_t es = dtype_size(x.dtype()), row = (end - begin) * s.inner * es;
  copy_rows(op, y.raw(), x.raw(), s.outer, row, row, 0, 1, s.len * s.inner * es, 0, begin * s.inner * es);
  return y;
}

void narrow_accumulate_(Tensor& dst, const Tensor& src, int dim, int64_t begin) {
  const char* op = "narrow_accumulate_";
  expect_gpu_float(op, "dst", dst);
  expect_cuda(op, "src", src);
  DSA_CHECK(dst.dtype() == src.dtype(), "[", op, "] dtypes ", dst.desc(), " and ", src.desc());
  const Split d = split_at(dst, dim, op), s = split_at(src, dim, op);
  DSA_CHECK(d.outer == s.outer && d.inner == s.inner && begin >= 0 && begin + s.len <= d.len, "[", op, "] ",
            src.desc(), " does not fit into ", dst.desc(), " at dim ", dim, " offset ", begin);
  accum_rows(op, dst.dtype(), dst.raw(), src.raw(), s.outer, s.len * s.inner, d.len * d.inner, begin * d.inner);
}

Tensor transpose01(const Tensor& x) {
  const char* op = "transpose01";
  expect_cuda(op, "x", x);
  DSA_CHECK(x.ndim() >= 2, "[", op, "] needs at least 2 dims, got ", x.desc());
  const int64_t A = x.shape()[0], B = x.shape()[1];
  const int64_t inner = B && A ? x.numel() / (A * B) : 0;
  Shape shape = x.shape();
  std::swap(shape[0], shape[1]);
  Tensor y = Tensor::empty(shape, x.dtype(), Device::CUDA);
  const int64_t row = inner * dtype_size(x.dtype());
  // dst row q = b * A + a  <-  src row a * B + b
  copy_rows(op, y.raw(), x.raw(), A * B, row, row, 0, A, row, B * row, 0);
  return y;
}

Tensor repeat_dim1(const Tensor& x, int64_t repeats) {
  const char* op = "repeat_dim1";
  expect_cuda(op, "x", x);
  DSA_CHECK(x.ndim() == 3 && x.shape()[1] == 1 && repeats > 0, "[", op, "] x must be [N, 1, C], got ", x.desc());
  const int64_t N = x.shape()[0], C = x.shape()[2];
  Tensor y = Tensor::empty({N, repeats, C}, x.dtype(), Device::CUDA);
  const int64_t row = C * dtype_size(x.dtype());
  copy_rows(op, y.raw(), x.raw(), N * repeats, row, row, 0, repeats, row, 0, 0);
  return y;
}

Tensor sum_dim1(const Tensor& x) {
  const char* op = "sum_dim1";
  expect_gpu_float(op, "x", x);
  DSA_CHECK(x.ndim() == 3, "[", op, "] x must be [N, R, C], got ", x.desc());
  const int64_t N = x.shape()[0], R = x.shape()[1], C = x.shape()[2];
  Tensor y = Tensor::empty({N, 1, C}, x.dtype(), Device::CUDA);
  if (N * C == 0) return y;
  dispatch_gpu_float(op, x.dtype(), [&](auto t) {
    using T = decltype(t);
    sum_dim1_kernel<T><<<grid_for(N * C, kThreads), kThreads, 0, stream()>>>(
        static_cast<const T*>(x.raw()), static_cast<T*>(y.raw()), N, R, C);
  });
  check_launch(op);
  return y;
}

void copy_cast_(Tensor& dst, const Tensor& src) {
  const char* op = "copy_cast_";
  expect_cuda(op, "dst", dst);
  expect_cuda(op, "src", src);
  DSA_CHECK(dst.shape() == src.shape(), "[", op, "] dst ", dst.desc(), " and src ", src.desc(),
            " must have the same shape");
  if (dst.dtype() == src.dtype()) {
    dst.copy_from(src);
    return;
  }
  const int64_t n = src.numel();
  if (n == 0) return;
  const unsigned g = grid_for(n, kThreads);
  if (src.dtype() == DType::F32 && dst.dtype() == DType::BF16)
    cast_kernel<float, __nv_bfloat16><<<g, kThreads, 0, stream()>>>(static_cast<const float*>(src.raw()),
                                                                      static_cast<__nv_bfloat16*>(dst.raw()), n);
  else if (src.dtype() == DType::BF16 && dst.dtype() == DType::F32)
    cast_kernel<__nv_bfloat16, float><<<g, kThreads, 0, stream()>>>(static_cast<const __nv_bfloat16*>(src.raw()),
                                                                      static_cast<float*>(dst.raw()), n);
  else
    fail(strcat_("[", op, "] unsupported conversion on the GPU: ", src.desc(), " -> ", dtype_name(dst.dtype()),
                 " (f32 <-> bf16)"));
  check_launch(op);
}

Tensor cast(const Tensor& x, DType dtype) {
  expect_cuda("cast", "x", x);
  if (x.dtype() == dtype) return x;
  Tensor y = Tensor::empty(x.shape(), dtype, Device::CUDA);
  copy_cast_(y, x);
  return y;
}

}  // namespace dsa::cuda
