// CUDA dense causal attention (MHA / GQA / MQA): flash-attention style forward and backward.
// Same semantics as the CPU reference in kernels/attention.cpp; bf16 q/k/v/out and gradients, f32 lse.
#pragma once

#include <cstdint>
#include <string>

#include "kernels/ops.h"
#include "kernels/tensor.h"

namespace dsa::cuda {

// Shared by the forward and backward kernels. Token-major layouts as in ops.h.
struct AttentionParams {
  const void* q;     // [B, T, H, Dk] bf16
  const void* k;     // [B, T, Hk, Dk] bf16
  const void* v;     // [B, T, Hk, Dv] bf16
  void* out;         // [B, T, H, Dv] bf16 (forward output)
  float* lse;        // [B, H, T] f32, natural log of sum exp(scale q.k)
  // backward only
  const void* dout;  // [B, T, H, Dv] bf16
  const void* o;     // [B, T, H, Dv] bf16, the forward output
  float* delta;      // [B, H, T] f32 scratch, rowsum(dout * o)
  float* dq_accum;   // [B, T, H, Dk] f32 scratch, unscaled dS K summed over key blocks
  void* dq;          // [B, T, H, Dk] bf16
  void* dk;          // [B, T, Hk, Dk] bf16
  void* dv;          // [B, T, Hk, Dv] bf16
  int B, T, H, Hk, Dk, Dv;
  float scale;       // softmax scale on q.k
};

// Inputs bf16 on the GPU (shapes already checked by the public entry); lse_out gets f32 [B, H, T].
Tensor attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, double scale, Tensor* lse_out);
ops::AttentionGrads attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                       const Tensor& out, const Tensor& lse, double scale);

// Launchers (one per kernel file), on dsa::cuda::stream().
void launch_attention_forward(const AttentionParams& p);
void launch_attention_backward(const AttentionParams& p);  // needs delta, dq_accum scratch

// cuDNN's fused attention (sm90_bf16_attention_cudnn.cpp), tried first by attention_forward/backward.
// false where the build has no cuDNN, it is switched off, or it does not take the shape: the caller
// then launches the own kernel. The backward uses p.delta and p.dq_accum as its scratch too.
bool attention_forward_cudnn(const AttentionParams& p);
bool attention_backward_cudnn(const AttentionParams& p);
std::string attention_cudnn_version();  // "9.19.0", "" without cuDNN in the build
void attention_cudnn_calls(int64_t* forward, int64_t* backward);  // calls cuDNN has served so far

}  // namespace dsa::cuda
