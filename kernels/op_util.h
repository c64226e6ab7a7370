// Internal helpers shared by the CPU op implementations (kernels/*.cpp): device dispatch, dtype
// dispatch to templated kernels, and the output / accumulated-gradient conventions of ops.h.
#pragma once

#include <cstdint>

#include "kernels/tensor.h"

namespace dsa::ops::detail {

// True when t lives on the GPU.
inline bool on_cuda(const Tensor& t) { return t.defined() && t.device() == Device::CUDA; }
// The error of a public entry given GPU operands in a build without the CUDA backend.
[[noreturn]] inline void cuda_missing(const char* op) {
  fail(strcat_("[", op, "] got CUDA tensors, but this build has no CUDA backend ",
               "(nvcc was not found at configure time)"));
}

// The one device dispatch of the public op entries (kernels/*.cpp): when `cond` (an operand on the GPU),
// `return expr;`, the CUDA implementation (kernels/cuda/ops_*.h), which checks its own shapes and dtypes;
// in a build without the CUDA backend, the error of cuda_missing(op) instead. Place it before the CPU
// checks, or after the checks both backends share.
#ifdef DSA_HAVE_CUDA
#define DSA_DISPATCH_CUDA(cond, op, expr)    \
  do {                                       \
    (void)(op); /* checked in both builds */ \
    if (cond) return expr;                   \
  } while (0)
#else
#define DSA_DISPATCH_CUDA(cond, op, expr)           \
  do {                                              \
    if (cond) ::dsa::ops::detail::cuda_missing(op); \
  } while (0)
#endif

inline void expect_same_dtype(const char* op, const char* name, const Tensor& t, const Tensor& ref) {
  DSA_CHECK(t.defined() && t.dtype() == ref.dtype(), "[", op, "] ", name, " must be ", dtype_name(ref.dtype()),
            " like the other operands, got ", t.desc());
}

// A written output passed by pointer: when *out is defined it must already have the shape and dtype
// (and is overwritten; callers can reuse buffers), otherwise it is allocated.
inline Tensor& output_arg(const char* op, const char* name, Tensor* out, const Shape& shape, DType dtype) {
  if (out->defined()) {
    DSA_CHECK(out->shape() == shape && out->dtype() == dtype && out->is_cpu(), "[", op, "] ", name,
              " must be ", dtype_name(dtype), shape, " cpu, got ", out->desc());
  } else {
    *out = Tensor::empty(shape, dtype);
  }
  return *out;
}

// An accumulated parameter gradient passed by pointer (+=): when *g is undefined it starts at zero.
inline Tensor& accum_arg(const char* op, const char* name, Tensor* g, const Shape& shape, DType dtype) {
  if (g->defined()) {
    DSA_CHECK(g->shape() == shape && g->dtype() == dtype && g->is_cpu(), "[", op, "] ", name, " must be ",
              dtype_name(dtype), shape, " cpu, got ", g->desc());
  } else {
    *g = Tensor::zeros(shape, dtype);
  }
  return *g;
}

// Calls f(T{}) with T = float or double according to dtype.
template <class F>
inline void dispatch_float(const char* op, DType dt, F&& f) {
  if (dt == DType::F32)
    f(float{});
  else if (dt == DType::F64)
    f(double{});
  else
    fail(strcat_("[", op, "] unsupported dtype ", dtype_name(dt), " (CPU computes in f32 or f64)"));
}

}  // namespace dsa::ops::detail
