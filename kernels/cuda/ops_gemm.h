// CUDA GEMM and linear layer on cuBLASLt (kernels/cuda/sm90_bf16_gemm_cublaslt.cu). Called from the
// public entries in kernels/gemm.cpp for CUDA tensors; same semantics as ops::gemm / ops::linear_*.
//
// Supported dtypes (a, b -> c): bf16 x bf16 -> bf16 or f32 (f32 C is how parameter gradients
// accumulate with beta = 1), and f32 x f32 -> f32 (CUBLAS_COMPUTE_32F, used by the MoE router).
// Accumulation is always fp32.
#pragma once

#include "kernels/tensor.h"

namespace dsa::cuda {

// c = alpha op(a) op(b) + beta c; 2-D, or 3-D with a leading batch dim (a or b may be 2-D, shared).
void gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c, double alpha, double beta);
// y [..., out] = x [..., in] @ w [out, in]^T; x and w both bf16 (or both f32), y of their dtype.
Tensor linear_forward(const Tensor& x, const Tensor& w);
// dx [..., in] = dy @ w (x's dtype); dw [out, in] f32 += dy^T x (undefined *dw starts at zero).
Tensor linear_backward(const Tensor& dy, const Tensor& x, const Tensor& w, Tensor* dw, bool need_dx);

}  // namespace dsa::cuda
