// CUDA LM-head cross-entropy (kernels/cuda/sm90_bf16_cross_entropy.cu) and AdamW
// (kernels/cuda/any_f32_adamw.cu), dispatched from kernels/cross_entropy.cpp and kernels/adamw.cpp.
#pragma once

#include "kernels/ops.h"

namespace dsa::cuda {

// x bf16 [N, D], w bf16 [V, D], targets i32 [N] (-1 ignored); dx bf16 [N, D] written, dw f32 [V, D] +=.
ops::CrossEntropyResult lm_head_cross_entropy(const Tensor& x, const Tensor& w, const Tensor& targets,
                                              double grad_scale, Tensor* dx, Tensor* dw);
// f32 param / grad / m / v, the CPU reference's math operation by operation (no FMA contraction).
void adamw_step_(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const ops::AdamWConfig& cfg,
                 int64_t step);

}  // namespace dsa::cuda
