// Layout ops: copies that move data between layouts, used to compose the MLA forms.
// All work on contiguous tensors of any float or int dtype (bytewise), CPU and CUDA; the
// accumulating ones (narrow_accumulate_, sum_dim1) take f32/f64 on the CPU, bf16/f32 on the GPU.
#pragma once

#include "kernels/tensor.h"

namespace dsa::ops {

// y = x[..., begin:end, ...] along `dim` (copy). Backward: narrow_accumulate_.
Tensor narrow(const Tensor& x, int dim, int64_t begin, int64_t end);
// dst[..., begin:begin+src.size(dim), ...] += src along `dim` (f32/f64).
void narrow_accumulate_(Tensor& dst, const Tensor& src, int dim, int64_t begin);
// [A, B, rest...] -> [B, A, rest...] (copy). Its own backward (apply again).
Tensor transpose01(const Tensor& x);
// [N, 1, C] -> [N, R, C] by repetition; backward: sum_dim1 ([N, R, C] -> [N, 1, C]).
Tensor repeat_dim1(const Tensor& x, int64_t repeats);
Tensor sum_dim1(const Tensor& x);

}  // namespace dsa::ops
