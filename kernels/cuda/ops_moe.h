// CUDA implementations of the MoE op family (kernels/moe.cpp dispatches here for Device::CUDA tensors).
//
// Dtypes on the GPU: router logits, scores, weights and their gradients are f32 (the router runs in
// fp32); token rows (x, xp, yp and their gradients) are bf16; expert weights are the bf16 compute copy
// and their gradient dw is the f32 accumulator. Expert ids and permutation rows are i32 on the device;
// MoePermutation::counts/offsets are host vectors (one small device->host copy per moe_permutation).
//
//   any_f32_moe_route.cu            moe_route (+backward), scores backward, expert load, balance loss
//   any_bf16_moe_permute.cu         moe_permutation (device counting sort), permute, combine (+backward)
//   sm90_bf16_moe_grouped_gemm.cu   grouped_linear forward/backward (cuBLASLt, one matmul per expert)
#pragma once

#include <cstdint>

#include "kernels/ops.h"
#include "kernels/tensor.h"

namespace dsa::cuda {

constexpr int kMoeMaxExperts = 256;  // route / permutation kernels keep one expert per lane-slot
constexpr int kMoeMaxTopK = 8;
constexpr int kMoeMaxGroups = 32;

// logits [N, E] f32, bias [E] f32 (GPU or CPU) -> scores [N, E] f32, experts [N, K] i32, weights [N, K] f32.
// A token whose biased scores contain NaN gets experts = -1 (moe_permutation then fails loudly).
ops::MoeRouting moe_route(const Tensor& logits, const Tensor& bias, const ops::MoeRouteConfig& cfg);
// dweights [N, K] f32 -> dlogits [N, E] f32
Tensor moe_route_backward(const Tensor& dweights, const ops::MoeRouting& r, const ops::MoeRouteConfig& cfg);
// dscores [N, E] f32 -> dlogits [N, E] f32
Tensor moe_scores_backward(const Tensor& dscores, const ops::MoeRouting& r);
// [E] f32 on the GPU; ids outside [0, E) are not counted
Tensor moe_expert_load(const ops::MoeRouting& r, int64_t n_experts);
// loss on the host (one device->host copy of [batch, E] statistics); dscores [N, E] f32 += on the GPU
double moe_seq_balance_loss(const ops::MoeRouting& r, int64_t n_experts, int64_t batch, int64_t seq, double alpha,
                            Tensor* dscores);

// experts [N, K] i32 -> rows [N*K] i32 on the GPU, counts/offsets on the host
ops::MoePermutation moe_permutation(const Tensor& experts, int64_t n_experts);
Tensor moe_permute(const Tensor& x /*[N, D] bf16*/, const ops::MoePermutation& p, int64_t top_k);  // [N*K, D]
Tensor moe_permute_backward(const Tensor& dxp /*[N*K, D] bf16*/, const ops::MoePermutation& p, int64_t n_tokens,
                            int64_t top_k);  // [N, D] bf16, f32 sum of the K slots
Tensor moe_combine(const Tensor& yp /*[N*K, D] bf16*/, const Tensor& weights /*[N, K] f32*/,
                   const ops::MoePermutation& p);  // [N, D] bf16
void moe_combine_backward(const Tensor& dy /*[N, D] bf16*/, const Tensor& yp, const Tensor& weights,
                          const ops::MoePermutation& p, Tensor* dyp /*[N*K, D] bf16*/,
                          Tensor* dweights /*[N, K] f32*/);

// xp [M, in] bf16, w [E, out, in] bf16 -> [M, out] bf16
Tensor grouped_linear_forward(const Tensor& xp, const Tensor& w, const ops::MoePermutation& p);
// dy [M, out] bf16 -> dx [M, in] bf16; dw [E, out, in] f32 += dy^T xp per expert
Tensor grouped_linear_backward(const Tensor& dy, const Tensor& xp, const Tensor& w, const ops::MoePermutation& p,
                               Tensor* dw);

}  // namespace dsa::cuda
