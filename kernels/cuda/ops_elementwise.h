// CUDA elementwise and layout ops (kernels/cuda/any_elementwise.cu), dispatched from the public entries
// in kernels/elementwise.cpp and kernels/layout.cpp. Floating math runs in fp32 on bf16 or f32 storage;
// copies (slices, concat, narrow, transpose, repeat) move bytes and accept any dtype.
#pragma once

#include <vector>

#include "kernels/tensor.h"

namespace dsa::cuda {

void add_scaled_(Tensor& a, const Tensor& b, double s);  // a += s b (bf16 or f32, same dtype)
void scale_(Tensor& a, double s);                       // a *= s
Tensor add(const Tensor& a, const Tensor& b);           // a + b
Tensor slice_last(const Tensor& x, int64_t begin, int64_t end);
void slice_last_accumulate_(Tensor& dst, const Tensor& src, int64_t begin);
Tensor concat_last(const Tensor& a, const Tensor& b);
double sum(const Tensor& x);          // accumulated in f64 (deterministic)
double sum_squares(const Tensor& x);  // accumulated in f64 (deterministic)
// Sum of squares over several tensors: per-tensor f64 partial sums on the device, one host copy.
double sum_squares_all(const std::vector<const Tensor*>& ts);

Tensor narrow(const Tensor& x, int dim, int64_t begin, int64_t end);
void narrow_accumulate_(Tensor& dst, const Tensor& src, int dim, int64_t begin);
Tensor transpose01(const Tensor& x);
Tensor repeat_dim1(const Tensor& x, int64_t repeats);
Tensor sum_dim1(const Tensor& x);

Tensor cast(const Tensor& x, DType dtype);          // f32 <-> bf16 (x itself when the dtype matches)
void copy_cast_(Tensor& dst, const Tensor& src);    // same shape, f32 <-> bf16 or same dtype

}  // namespace dsa::cuda
