// CUDA embedding, norms, rope and swiglu (kernels/cuda/any_bf16_{embedding,norms,rope_swiglu}.cu),
// dispatched from the public entries in kernels/{embedding,norms,rope,swiglu}.cpp.
//
// dtypes: activations and weights bf16; per-row statistics (rstd, mean) f32; rope tables f32;
// parameter gradients (dtable, dw, db) f32 and accumulated (+=), reduced deterministically.
#pragma once

#include "kernels/ops.h"

namespace dsa::cuda {

Tensor embedding_forward(const Tensor& ids /*[...] i32*/, const Tensor& table /*[V, D] bf16*/);
void embedding_backward(const Tensor& dy /*[..., D] bf16*/, const Tensor& ids, Tensor* dtable /*[V, D] f32 +=*/);

Tensor rmsnorm_forward(const Tensor& x /*[N, D] bf16*/, const Tensor& w /*[D] bf16*/, double eps,
                       Tensor* rstd_out /*[N] f32*/);
Tensor rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd,
                        Tensor* dw /*[D] f32 +=*/);
Tensor layernorm_forward(const Tensor& x, const Tensor& w, const Tensor& b, double eps, Tensor* mean_out,
                         Tensor* rstd_out);
Tensor layernorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& mean,
                          const Tensor& rstd, Tensor* dw, Tensor* db);

// In place on bf16 x [N, H, D] or [N, D]; cos/sin f32 [P, R/2]; positions i32 [N].
void rope_apply_(Tensor& x, const Tensor& positions, const Tensor& cos, const Tensor& sin, int64_t offset,
                 ops::RopeStyle style, bool backward);

Tensor swiglu_forward(const Tensor& gate, const Tensor& up);  // bf16
void swiglu_backward(const Tensor& dy, const Tensor& gate, const Tensor& up, Tensor* dgate, Tensor* dup);

}  // namespace dsa::cuda
