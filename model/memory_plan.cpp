#include "model/memory_plan.h"

#include <algorithm>

#include "model/params.h"

namespace dsa {

int64_t activation_elements_per_token(const ModelConfig& c, int64_t l, bool sparse) {
  const int64_t D = c.hidden_size, H = c.num_attention_heads, dk = c.qk_head_dim(), dv = c.v_head_dim;
  const int64_t kvl = c.kv_lora_rank, dr = c.qk_rope_head_dim, ql = c.q_lora_rank;
  int64_t n = 2 * D + 2 * D;                           // x_in, attn_in (+ rstd), h_mid, ffn_in
  n += c.has_q_lora() ? 2 * ql : 0;                    // cq_pre, cq
  n += H * dk + (kvl + dr) + kvl + dr;                 // q, kva, ckv, kpe
  n += sparse ? H * (kvl + dr) + (kvl + dr) + H * kvl  // MQA form: q_abs, kv_lat, attn (latent)
              : H * dk + H * dv + H * dv;              // MHA form: k, v, attn
  n += H * dv + H;                                     // o, lse
  if (sparse) n += 2 * c.index_topk;                   // indices, probs_sum / slot scores
  n += c.index_n_heads * c.index_head_dim + 2 * c.index_head_dim + c.index_n_heads;  // indexer q, k_pre, k, w
  if (c.is_moe_layer(l)) {
    const int64_t K = c.num_experts_per_tok, I = c.moe_intermediate_size, E = c.n_routed_experts;
    n += 2 * E + 2 * K;               // logits, scores, experts, weights
    n += K * (D + 2 * I + I + D);     // xp, gu, h, yp
    n += 3 * I * c.n_shared_experts;  // shared experts' gate, up, h
  } else {
    n += 3 * c.intermediate_size;  // gate, up, h
  }
  return n;
}

MemoryPlan memory_plan(const ModelConfig& c, const MemoryLayout& m) {
  MemoryPlan p;
  int64_t buffers = 0, trained = 0;
  for (const ParamSpec& q : param_specs(c)) {
    const int64_t n = shape_numel(q.shape);
    p.params += n;
    if (q.name.find("mlp.experts.") != std::string::npos) p.expert_params += n;
    if (q.group == ParamGroup::Buffer) {
      buffers += n;
      continue;
    }
    if (m.mtp || !is_mtp_param(c, q.name)) trained += n;
  }
  p.weights_bytes = 4.0 * p.params;
  p.compute_bytes = m.gpu ? 2.0 * (p.params - buffers) : 0.0;
  p.grads_bytes = 4.0 * (p.params - buffers);
  // ZeRO-1 (trainer/data_parallel.h): non-expert tensors sharded over every rank, each expert slice
  // (E/ep rows) over its ranks/ep replicas: 1/ranks of the moments either way.
  p.optimizer_bytes = 8.0 * static_cast<double>(trained) / static_cast<double>(m.zero1 ? m.ranks : 1);
  // The largest stage's cache: the sparse stage keeps the MQA form plus the selection; the dense stage
  // the MHA form; take the larger per layer.
  const int64_t tokens = m.seq_len * m.micro_batch;
  const int64_t layers = c.num_hidden_layers + (m.mtp ? c.num_nextn_predict_layers : 0);
  double per_token = 0, widest = 0;
  for (int64_t l = 0; l < layers; ++l) {
    const double e = static_cast<double>(
        std::max(activation_elements_per_token(c, l, true), activation_elements_per_token(c, l, false)));
    widest = std::max(widest, e);
    per_token += m.recompute ? static_cast<double>(c.hidden_size) : e;  // recompute: the layer input only
  }
  if (m.recompute) per_token += widest;  // the one layer being recomputed
  per_token += 2.0 * c.hidden_size;      // final norm in/out
  p.activation_bytes = per_token * static_cast<double>(tokens) * (m.gpu ? 2.0 : 4.0);
  return p;
}

}  // namespace dsa
