// The op layer: one function per op, forward and backward side by side. Model code is written once
// against these functions; each dispatches on the tensors' device to the CPU reference (kernels/*.cpp)
// or the CUDA backend (kernels/cuda/).
//
// Conventions (every op):
//  - Shapes are checked at the entry; errors start with the op name:
//      "[rmsnorm] x must have shape [-1, 64], got f32[3, 32] cpu".
//  - CPU compute types are f32 and f64 (f64 exists for gradient checks); indices are i32.
//  - Forward functions return fresh outputs. Backward functions return fresh input gradients and
//    ACCUMULATE (+=) into parameter gradients passed by pointer (nullptr = not needed), so a training
//    step zeroes parameter gradients once and micro-batches add up.
//  - Token-major layouts: activations are [N, ...] with N = batch * seq, sequence-major inside.
//
// Table of contents (file per op family, forward and backward together):
//   kernels/elementwise.cpp   add, scale, slices along the last dim, concat
//   kernels/gemm.cpp          gemm (transposes, batched), linear
//   kernels/embedding.cpp     embedding
//   kernels/norms.cpp         rmsnorm, layernorm
//   kernels/rope.cpp          rope (MLA interleaved pairs; indexer rotate-half)
//   kernels/swiglu.cpp        swiglu
//   kernels/cross_entropy.cpp lm head + softmax cross-entropy, chunked over tokens
//   kernels/attention.cpp     dense causal attention (MHA / GQA / MQA) with per-head log-sum-exp
//   kernels/moe.cpp           routing, permutation, grouped expert GEMM
//   kernels/adamw.cpp         AdamW, global gradient norm
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/tensor.h"

namespace dsa::ops {

// ---------------------------------------------------------------------------------- elementwise
void add_(Tensor& a, const Tensor& b);                 // a += b (same shape)
void add_scaled_(Tensor& a, const Tensor& b, double s);  // a += s * b
void scale_(Tensor& a, double s);                       // a *= s
Tensor add(const Tensor& a, const Tensor& b);           // a + b
// y = x[..., begin:end] (copy), x [N, ..., D] -> [N, ..., end-begin]
Tensor slice_last(const Tensor& x, int64_t begin, int64_t end);
// dst[..., begin:begin+src.size(-1)] += src  (backward of slice_last, and the way to concat)
void slice_last_accumulate_(Tensor& dst, const Tensor& src, int64_t begin);
// concat along the last dim: [.., a] ++ [.., b] -> [.., a+b]
Tensor concat_last(const Tensor& a, const Tensor& b);
double sum(const Tensor& x);        // for tests and logging
double sum_squares(const Tensor& x);
// x converted to dtype (x itself when the dtype already matches). CPU: f32 / f64 / bf16; CUDA: f32 <-> bf16.
Tensor cast(const Tensor& x, DType dtype);
// dst = src converted to dst's dtype (same shape and device); refreshes bf16 copies of f32 masters.
void copy_cast_(Tensor& dst, const Tensor& src);

// ---------------------------------------------------------------------------------------- gemm
// c = alpha * op(a) @ op(b) + beta * c. 2-D: a [M,K] (or [K,M] when trans_a), b [K,N] (or [N,K]),
// c [M,N]. 3-D: a leading batch dim on all three (a may be 2-D and shared across the batch).
void gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c, double alpha = 1.0,
          double beta = 0.0);
// y [N, out] = x [N, in] @ w [out, in]^T
Tensor linear_forward(const Tensor& x, const Tensor& w);
// returns dx [N, in] (undefined when need_dx is false); dw [out, in] += dy^T x
Tensor linear_backward(const Tensor& dy, const Tensor& x, const Tensor& w, Tensor* dw, bool need_dx = true);

// ----------------------------------------------------------------------------------- embedding
Tensor embedding_forward(const Tensor& ids /*[N] i32*/, const Tensor& table /*[V, D]*/);  // [N, D]
void embedding_backward(const Tensor& dy /*[N, D]*/, const Tensor& ids, Tensor* dtable /*[V, D] +=*/);

// --------------------------------------------------------------------------------------- norms
// y = x * rstd * w, rstd = 1/sqrt(mean(x^2) + eps). rstd_out [N] is saved for the backward.
Tensor rmsnorm_forward(const Tensor& x /*[N, D]*/, const Tensor& w /*[D]*/, double eps, Tensor* rstd_out);
Tensor rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd, Tensor* dw);
// y = (x - mean) * rstd * w + b
Tensor layernorm_forward(const Tensor& x /*[N, D]*/, const Tensor& w /*[D]*/, const Tensor& b /*[D]*/, double eps,
                         Tensor* mean_out /*[N]*/, Tensor* rstd_out /*[N]*/);
Tensor layernorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& mean,
                          const Tensor& rstd, Tensor* dw, Tensor* db);

// ---------------------------------------------------------------------------------------- rope
enum class RopeStyle {
  // MLA: pairs (2i, 2i+1) rotate by frequency i, exactly as transformers' DeepseekV3/V32
  // apply_rotary_pos_emb_interleave, which also DE-INTERLEAVES the output: with h = R/2,
  //   y[i] = x[2i] c_i - x[2i+1] s_i,   y[i+h] = x[2i+1] c_i + x[2i] s_i   (evens first, then odds).
  // Its backward maps the de-interleaved gradient back to the interleaved input layout:
  //   dx[2i] = dy[i] c_i + dy[i+h] s_i,  dx[2i+1] = dy[i+h] c_i - dy[i] s_i.
  Interleaved,
  RotateHalf,  // indexer: pairs (i, i + R/2) rotate by frequency i (NeoX style), layout kept
};
// Rotates x[n, h, offset : offset+R] in place by angle pos[n] * inv_freq[i], R = 2 * cos.size(1).
// cos/sin [P, R/2] hold cos(p * inv_freq_i) (YaRN's mscale already folded in by the caller when it
// applies); positions [N] i32 index their rows. x is [N, H, D] (or [N, D], treated as H = 1).
void rope_forward_(Tensor& x, const Tensor& positions, const Tensor& cos, const Tensor& sin, int64_t offset,
                   RopeStyle style);
// The backward of a rotation is the rotation by the opposite angle, applied to dy in place.
void rope_backward_(Tensor& dy, const Tensor& positions, const Tensor& cos, const Tensor& sin, int64_t offset,
                    RopeStyle style);

// -------------------------------------------------------------------------------------- swiglu
Tensor swiglu_forward(const Tensor& gate /*[N, I]*/, const Tensor& up /*[N, I]*/);  // silu(gate) * up
void swiglu_backward(const Tensor& dy, const Tensor& gate, const Tensor& up, Tensor* dgate, Tensor* dup);

// ------------------------------------------------------------------------------- cross entropy
struct CrossEntropyResult {
  double loss_sum = 0;   // sum over counted tokens of -log softmax(logits)[target]
  int64_t count = 0;     // tokens with target >= 0
};
// logits = x @ w^T computed chunk by chunk over tokens, so [N, V] is never allocated at once (at most
// [chunk, V], chunk chosen so that it stays under ~64 MiB). targets [N] i32, -1 = ignored.
// When dx/dw are given, also the backward of (grad_scale * loss_sum): dx [N, D] is written, dw += .
CrossEntropyResult lm_head_cross_entropy(const Tensor& x /*[N, D]*/, const Tensor& w /*[V, D]*/,
                                         const Tensor& targets /*[N] i32*/, double grad_scale, Tensor* dx,
                                         Tensor* dw);

// --------------------------------------------------------------------------------- attention
// Dense causal attention within each sequence, keys/values shared by groups of heads (Hk divides H;
// Hk = H is MHA, Hk = 1 is MQA). o[b,t,h] = sum_{s<=t} softmax_s(scale * q[b,t,h].k[b,s,h/(H/Hk)]) v[..].
// lse_out [B, H, T] gets each row's log-sum-exp of the scaled scores, which the backward and the
// indexer losses reuse. Memory O(B*T*H*D): scores are never stored.
Tensor attention_forward(const Tensor& q /*[B, T, H, Dk]*/, const Tensor& k /*[B, T, Hk, Dk]*/,
                         const Tensor& v /*[B, T, Hk, Dv]*/, double scale, Tensor* lse_out /*[B, H, T]*/);
struct AttentionGrads {
  Tensor dq, dk, dv;
};
AttentionGrads attention_backward(const Tensor& dout /*[B, T, H, Dv]*/, const Tensor& q, const Tensor& k,
                                  const Tensor& v, const Tensor& out, const Tensor& lse, double scale);
// On the GPU both run on cuDNN's fused attention where the build has cuDNN and it takes the shape (MHA,
// head dims multiples of 8 up to 256), else on the own kernels. set_attention_cudnn(false), or
// DSA_ATTN_CUDNN=0 in the environment, keeps the own kernels (the tests run both).
void set_attention_cudnn(bool enabled);
bool attention_cudnn_enabled();
struct AttentionCudnnInfo {
  std::string version;                       // cuDNN's, "" when the build has none
  int64_t forward_calls = 0, backward_calls = 0;  // calls it has served in this process
};
AttentionCudnnInfo attention_cudnn_info();

// --------------------------------------------------------------------------------------- moe
// Router scores: sigmoid per expert (DeepSeek-V3) or softmax over the experts (DeepSeek-V2).
enum class MoeScoring : uint8_t { Sigmoid, Softmax };
struct MoeRouting {
  Tensor scores;   // [N, E] sigmoid(logits) or softmax(logits), unbiased (f32/f64)
  Tensor experts;  // [N, K] i32 chosen experts, in descending biased score (ties: lower index first)
  Tensor weights;  // [N, K] scores of the chosen, normalized to sum 1 if norm_topk_prob, times scaling
  MoeScoring scoring = MoeScoring::Sigmoid;  // how scores were made (their backward follows it)
};
struct MoeRouteConfig {
  int n_group = 1, topk_group = 1, top_k = 1;
  bool norm_topk_prob = true;
  double routed_scaling_factor = 1.0;
  MoeScoring scoring = MoeScoring::Sigmoid;
  bool group_max = false;  // group score = the group's largest score (V2 group_limited_greedy), not its top-2 sum
};
// Selection uses scores + bias (bias [E], never in the weights; undefined = no bias): experts in
// n_group groups, group score = sum of its top-2 biased scores (or its largest with group_max), keep
// the topk_group best groups (ties: lower group first), then the top_k best experts among them.
// n_group = topk_group = 1 is plain top-k (V2's greedy).
MoeRouting moe_route(const Tensor& logits /*[N, E]*/, const Tensor& bias /*[E] f32*/, const MoeRouteConfig& cfg);
// dlogits [N, E] from dweights [N, K] (selection is not differentiated).
Tensor moe_route_backward(const Tensor& dweights, const MoeRouting& r, const MoeRouteConfig& cfg);
// dlogits [N, E] from dscores, for losses on r.scores: sigmoid: dscores * s * (1 - s);
// softmax: s * (dscores - sum_j dscores_j s_j) per row.
Tensor moe_scores_backward(const Tensor& dscores /*[N, E]*/, const MoeRouting& r);
Tensor moe_expert_load(const MoeRouting& r, int64_t n_experts);  // [E] f32 count of tokens routed to each expert
// DeepSeek-V3 sequence-wise balance loss (paper eq. 17-20), averaged over the batch's sequences:
// L = alpha * sum_i f_i P_i, f_i = E/(K*T) * #tokens of the sequence choosing i, P_i = mean over the
// sequence of s_i / sum_j s_j. Tokens are sequence-major (N = batch * seq). Gradient flows through P
// only: dscores [N, E] += dL/dscores when given (then chain with moe_scores_backward).
double moe_seq_balance_loss(const MoeRouting& r, int64_t n_experts, int64_t batch, int64_t seq, double alpha,
                            Tensor* dscores /*[N, E] +=*/);

// Tokens sorted by expert, stable within an expert (token order, then slot).
struct MoePermutation {
  Tensor rows;    // [N*K] i32: rows[p] = n*K + k, the (token, slot) placed at permuted row p
  std::vector<int64_t> counts;  // [E] rows per expert; expert e owns rows [offset_e, offset_e + counts[e])
  std::vector<int64_t> offsets; // [E+1] prefix sums of counts
};
MoePermutation moe_permutation(const Tensor& experts /*[N, K] i32*/, int64_t n_experts);
Tensor moe_permute(const Tensor& x /*[N, D]*/, const MoePermutation& p, int64_t top_k);  // [N*K, D]
// backward of moe_permute: dx [N, D] = sum over slots of dxp rows
Tensor moe_permute_backward(const Tensor& dxp /*[N*K, D]*/, const MoePermutation& p, int64_t n_tokens,
                            int64_t top_k);
// y[n] = sum_k weights[n,k] * yp[row of (n,k)]
Tensor moe_combine(const Tensor& yp /*[N*K, D]*/, const Tensor& weights /*[N, K]*/, const MoePermutation& p);
// dyp [N*K, D] and dweights [N, K], each written as a fresh tensor when its pointer is given
void moe_combine_backward(const Tensor& dy /*[N, D]*/, const Tensor& yp, const Tensor& weights,
                          const MoePermutation& p, Tensor* dyp, Tensor* dweights);
// Per expert e: y[rows of e] = xp[rows of e] @ w[e]^T.  w [E, out, in]
Tensor grouped_linear_forward(const Tensor& xp /*[M, in]*/, const Tensor& w, const MoePermutation& p);
Tensor grouped_linear_backward(const Tensor& dy /*[M, out]*/, const Tensor& xp, const Tensor& w,
                               const MoePermutation& p, Tensor* dw /*[E, out, in] +=*/);

// --------------------------------------------------------------------------------------- adamw
struct AdamWConfig {
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1;
};
// Decoupled weight decay; bias-corrected with step (1-based). param/m/v are f32 (master weights).
void adamw_step_(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamWConfig& cfg, int64_t step);
// sqrt of the sum of squares of all gradients (null/undefined entries skipped), accumulated in double.
double global_grad_norm(const std::vector<const Tensor*>& grads);
// Scales every gradient by max_norm / (norm + 1e-6) when that is < 1 (torch clip_grad_norm_).
void clip_grads_(const std::vector<Tensor*>& grads, double max_norm, double norm);

}  // namespace dsa::ops
