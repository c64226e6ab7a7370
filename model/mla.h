// Multi-head latent attention (SPEC.md §1 "MLA"), forward and backward, in two equivalent forms:
//  - MHA form: per-head keys [k_nope_h | k_pe] and values v_h expanded by kv_b_proj; cheapest dense.
//  - MQA (absorbed) form: the key half of kv_b_proj folded into the query (q_lat_h = q_nope_h W_uk_h),
//    attention over the shared latent rows [c_kv | k_pe] with values c_kv, then W_uv_h per head.
//    Sparse attention (DSA) runs in this form: one gathered latent row serves every head.
// The query comes from a low-rank latent c_q (q_a_proj, q_a_layernorm, q_b_proj) or, without a query
// LoRA, from q_proj(x) directly. RoPE pairs dims interleaved (rope_interleave, DeepSeek's default)
// or rotate-half; the query and the shared key k_pe always use the same pairing.
// Tokens are [N = B*T] sequence-major; positions [N] i32 give each token's rotary position.
#pragma once

#include "kernels/tensor.h"
#include "model/config.h"
#include "model/params.h"
#include "model/rope_tables.h"

namespace dsa {

enum class MlaForm { MHA, MQA };

// Activations the backward needs. Shapes with N = B*T, H heads, dn/dr/dv head dims, kvl = kv_lora_rank.
struct MlaCache {
  int64_t B = 0, T = 0;
  MlaForm form = MlaForm::MHA;
  bool sparse = false;
  Tensor x;         // [N, D]            layer input (after input_layernorm)
  Tensor cq_pre;    // [N, q_lora]       q_a_proj(x)            (query LoRA only; else undefined)
  Tensor cq_rstd;   // [N]
  Tensor cq;        // [N, q_lora]       q_a_layernorm(cq_pre): the query latent, also read by the indexer
  Tensor q;         // [N, H, dn+dr]     q_b_proj(cq) or q_proj(x), rope applied to the last dr dims
  Tensor kva;       // [N, kvl+dr]       kv_a_proj_with_mqa(x): [c_kv before norm | k_pe before rope]
  Tensor ckv_rstd;  // [N]
  Tensor ckv;       // [N, kvl]          kv_a_layernorm(c_kv)
  Tensor kpe;       // [N, 1, dr]        k_pe after rope (shared by all heads)
  // MHA form
  Tensor k;         // [B, T, H, dn+dr]
  Tensor v;         // [B, T, H, dv]
  // MQA form
  Tensor q_abs;     // [B, T, H, kvl+dr] [q_nope_h W_uk_h | q_pe_h]
  Tensor kv_lat;    // [B, T, kvl+dr]    [c_kv | k_pe]
  Tensor indices;   // [B, T, K] i32     sparse only: selected keys per query, -1 = invalid
  // both
  Tensor attn;      // MHA: [B, T, H, dv]; MQA: [B, T, H, kvl] (the attention kernel's output)
  Tensor lse;       // [B, H, T]         per-head log-sum-exp of the scaled scores
  Tensor probs_sum; // [B, T, K] f32     sparse only: head-summed attention probability per slot (the
                    //                   sparse indexer loss's target; CPU: the activations' dtype)
  bool probs_in_forward = true;  // false: the forward skips probs_sum (mla_backward returns it instead)
  Tensor o;         // [N, H*dv]         input of o_proj
};

// First half of the forward: resets the cache and computes the query latent c_q (which the indexer
// reads before the attention runs, when sparse attention needs its selection); without a query LoRA
// (q_lora_rank null) there is no latent and the query projection q_proj runs in mla_forward.
void mla_prepare(const ParamStore& ps, const std::string& prefix, const ModelConfig& cfg, const Tensor& x,
                 MlaCache& c);
// Second half: out [N, D]. Needs mla_prepare on the same x first. `sparse_indices` [B, T, K] (MQA form
// only) switches to top-k sparse attention over those keys.
Tensor mla_forward(const ParamStore& ps, const std::string& prefix, const ModelConfig& cfg, const RopeTables& rope,
                   const Tensor& positions, int64_t B, int64_t T, const Tensor& x, MlaForm form,
                   const Tensor* sparse_indices, MlaCache& c);

// Returns dx [N, D]; accumulates parameter gradients into ps. `dcq_extra` [N, q_lora] (may be null;
// always null without a query LoRA) is a gradient arriving at the query latent from elsewhere (the
// indexer when it is not detached).
// `probs_sum_out` (sparse only, may be null) gets the forward's probs_sum, recomputed by the attention
// backward at almost no cost (it rebuilds every probability anyway).
Tensor mla_backward(ParamStore& ps, const std::string& prefix, const ModelConfig& cfg, const RopeTables& rope,
                    const Tensor& positions, const Tensor& dout, const MlaCache& c, const Tensor* dcq_extra,
                    Tensor* probs_sum_out = nullptr);

}  // namespace dsa
