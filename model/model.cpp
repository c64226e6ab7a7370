#include "model/model.h"

#include <cmath>

#include "kernels/dsa_ops.h"
#include "kernels/ops.h"

namespace dsa {

Model::Model(const ModelConfig& cfg, DType dtype, Device device)
    : cfg_(cfg), dtype_(dtype), device_(device), params_(make_params(cfg, dtype, device)) {
  cfg_.validate("model");
}

void Model::ensure_rope(int64_t T) {
  if (T <= rope_positions_) return;
  DSA_CHECK(T <= cfg_.max_position_embeddings * std::max(1.0, cfg_.rope_scaling.factor),
            "[model] sequence length ", T, " exceeds max_position_embeddings ", cfg_.max_position_embeddings);
  rope_ = make_rope_tables(cfg_, T, dtype_, device_);
  rope_positions_ = T;
}

void Model::update_moe_bias(const std::vector<Tensor>& loads, double rate) {
  size_t m = 0;
  for (int64_t l = 0; l < cfg_.num_hidden_layers; ++l) {
    if (!cfg_.is_moe_layer(l)) continue;
    DSA_CHECK(m < loads.size(), "[model] update_moe_bias: ", loads.size(), " load tensors for more MoE layers");
    Tensor load = loads[m++].to(Device::CPU);
    Tensor& bias = params_[layer_prefix(l) + "mlp.gate.e_score_correction_bias"];
    Tensor b = bias.to(Device::CPU);
    const int64_t E = cfg_.n_routed_experts;
    double mean = 0;
    for (int64_t e = 0; e < E; ++e) mean += load.item(e);
    mean /= static_cast<double>(E);
    for (int64_t e = 0; e < E; ++e) {
      const double diff = mean - load.item(e);
      const double sign = diff > 0 ? 1.0 : (diff < 0 ? -1.0 : 0.0);
      b.set_item(e, b.item(e) + rate * sign);
    }
    bias.copy_from(b);
  }
}

// Indexer loss of one layer (dense or sparse KL), its gradient into the indexer's parameters, and the
// gradients at the indexer's inputs when they are not detached (stored for the LM backward).
void Model::indexer_loss_and_grads(int64_t l, LayerCache& lc, const Tensor& positions, int64_t B, int64_t T,
                                   const StepOptions& opts, bool backward, StepStats& stats) {
  const int64_t N = B * T, Hi = cfg_.index_n_heads, di = cfg_.index_head_dim, H = cfg_.num_attention_heads;
  const MlaCache& m = lc.mla;
  const IndexerCache& ic = lc.indexer;
  const bool need_grad = backward && (opts.train_indexer || (!opts.detach_indexer_input && opts.train_main));
  Tensor q4 = ic.q.view({B, T, Hi, di}), k3 = ic.k.view({B, T, di}), w3 = ic.w.view({B, T, Hi});
  ops::IndexerLossResult r;
  ops::IndexerGrads g;
  if (opts.indexer_loss == IndexerLossMode::Dense) {
    Tensor q_main, k_main;
    if (m.form == MlaForm::MHA) {
      q_main = m.q.view({B, T, H, cfg_.qk_head_dim()});
      k_main = m.k;
    } else {
      q_main = m.q_abs;
      k_main = m.kv_lat.view({B, T, 1, cfg_.kv_lora_rank + cfg_.qk_rope_head_dim});
    }
    r = ops::indexer_kl_dense(q_main, k_main, m.lse, cfg_.attention_scale(), q4, k3, w3, opts.fp8_indexer,
                              opts.indexer_grad_scale, need_grad ? &g : nullptr);
  } else {
    DSA_CHECK(m.sparse, "[model] the sparse indexer loss needs sparse attention in the same step");
    r = ops::indexer_kl_sparse(m.q_abs, m.kv_lat, m.lse, cfg_.attention_scale(), lc.indices, q4, k3, w3,
                               opts.fp8_indexer, opts.indexer_grad_scale, need_grad ? &g : nullptr);
  }
  stats.indexer_kl_sum += r.loss_sum;
  stats.indexer_rows += r.rows;
  if (!need_grad) return;
  // NOTES: the gradient flows through the unquantized q and k (straight-through over FP8 rounding);
  // the KL target p is a stop-gradient and the top-k selection is not differentiated.
  const bool to_inputs = !opts.detach_indexer_input && opts.train_main;
  Tensor dx, dcq;
  indexer_backward(params_, layer_prefix(l), cfg_, rope_, positions,
                   ic, g.dq.view({N, Hi, di}), g.dk.view({N, di}), g.dw.view({N, Hi}), to_inputs ? &dx : nullptr,
                   to_inputs ? &dcq : nullptr);
  if (to_inputs) {
    lc.dx_from_indexer = dx;
    lc.dcq_from_indexer = dcq;
  }
}

StepStats Model::step(const Tensor& ids, const Tensor& targets, int64_t B, int64_t T, const StepOptions& opts,
                      bool backward) {
  const int64_t N = B * T, D = cfg_.hidden_size;
  expect_shape("model", "ids", ids, {N});
  expect_shape("model", "targets", targets, {N});
  expect_dtype("model", "ids", ids, DType::I32);
  ensure_rope(T);
  StepStats stats;
  const bool sparse = opts.attention == AttentionMode::Sparse;
  const int64_t topk = opts.topk > 0 ? opts.topk : cfg_.index_topk;
  const bool need_indexer = sparse || opts.indexer_loss != IndexerLossMode::None || opts.compute_recall;
  const MlaForm form = sparse ? MlaForm::MQA : opts.form;
  DSA_CHECK(!(opts.indexer_loss == IndexerLossMode::Sparse && !sparse),
            "[model] indexer_loss sparse needs attention sparse (the target comes from the sparse attention)");

  // Positions restart at 0 in every sequence.
  Tensor positions_host = Tensor::empty({N}, DType::I32);
  for (int64_t i = 0; i < N; ++i) positions_host.data<int32_t>()[i] = static_cast<int32_t>(i % T);
  Tensor positions = positions_host.to(device_);
  Tensor ids_d = ids.to(device_), targets_d = targets.to(device_);

  std::vector<LayerCache> caches(cfg_.num_hidden_layers);
  expert_loads_.clear();
  Tensor h = ops::embedding_forward(ids_d, params_["model.embed_tokens.weight"]);
  for (int64_t l = 0; l < cfg_.num_hidden_layers; ++l) {
    LayerCache& lc = caches[l];
    const std::string p = layer_prefix(l);
    lc.x_in = h;
    lc.attn_in = ops::rmsnorm_forward(h, params_[p + "input_layernorm.weight"], cfg_.rms_norm_eps, &lc.attn_rstd);
    mla_prepare(params_, p, cfg_, lc.attn_in, lc.mla);
    if (need_indexer) {
      indexer_forward(params_, p, cfg_, rope_, positions, lc.attn_in, lc.mla.cq, lc.indexer);
      if (opts.forced_indices) {
        DSA_CHECK(opts.forced_indices->size() == static_cast<size_t>(cfg_.num_hidden_layers),
                  "[model] forced_indices needs one tensor per layer");
        lc.indices = (*opts.forced_indices)[l].to(device_);
      } else if (sparse || opts.compute_recall)
        lc.indices = ops::indexer_topk(lc.indexer.q.view({B, T, cfg_.index_n_heads, cfg_.index_head_dim}),
                                       lc.indexer.k.view({B, T, cfg_.index_head_dim}),
                                       lc.indexer.w.view({B, T, cfg_.index_n_heads}), topk, opts.fp8_indexer);
    }
    Tensor attn_out = mla_forward(params_, p, cfg_, rope_, positions, B, T, lc.attn_in, form,
                                  sparse ? &lc.indices : nullptr, lc.mla);
    if (opts.compute_recall) {
      // Recall is measured against the dense attention's head-summed distribution.
      const MlaCache* dense = &lc.mla;
      MlaCache dense_cache;
      if (sparse) {
        mla_prepare(params_, p, cfg_, lc.attn_in, dense_cache);
        mla_forward(params_, p, cfg_, rope_, positions, B, T, lc.attn_in, MlaForm::MQA, nullptr, dense_cache);
        dense = &dense_cache;
      }
      Tensor q_main = dense->form == MlaForm::MHA ? dense->q.view({B, T, cfg_.num_attention_heads, cfg_.qk_head_dim()})
                                                  : dense->q_abs;
      Tensor k_main = dense->form == MlaForm::MHA
                          ? dense->k
                          : dense->kv_lat.view({B, T, 1, cfg_.kv_lora_rank + cfg_.qk_rope_head_dim});
      ops::IndexerRecall rr = ops::indexer_recall(q_main, k_main, dense->lse, cfg_.attention_scale(), lc.indices);
      stats.recall_sum += rr.recall_sum;
      stats.recall_rows += rr.rows;
    }
    if (opts.indexer_loss != IndexerLossMode::None) indexer_loss_and_grads(l, lc, positions, B, T, opts, backward, stats);
    h = ops::add(h, attn_out);
    lc.h_mid = h;
    lc.ffn_in = ops::rmsnorm_forward(h, params_[p + "post_attention_layernorm.weight"], cfg_.rms_norm_eps,
                                     &lc.ffn_rstd);
    Tensor ffn_out;
    lc.moe = cfg_.is_moe_layer(l);
    if (lc.moe) {
      ffn_out = moe_forward(params_, p + "mlp.", cfg_, lc.ffn_in, B, T, opts.balance_alpha, lc.moe_cache);
      stats.balance_loss += lc.moe_cache.balance_loss;
      expert_loads_.push_back(ops::moe_expert_load(lc.moe_cache.routing, cfg_.n_routed_experts));
    } else {
      ffn_out = mlp_forward(params_, p + "mlp.", lc.ffn_in, lc.mlp);
    }
    h = ops::add(h, ffn_out);
    if (opts.capture_layer_outputs) opts.capture_layer_outputs->push_back(h);
    if (opts.capture_indices && lc.indices.defined()) opts.capture_indices->push_back(lc.indices);
    if (opts.capture_indexer && need_indexer) opts.capture_indexer->push_back(lc.indexer);
  }

  Tensor final_rstd;
  Tensor hn = ops::rmsnorm_forward(h, params_["model.norm.weight"], cfg_.rms_norm_eps, &final_rstd);
  const std::string head = cfg_.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight";
  if (opts.capture_logits) *opts.capture_logits = ops::linear_forward(hn, params_[head]);
  const bool lm_backward = backward && opts.train_main;
  Tensor dhn;
  ops::CrossEntropyResult ce = ops::lm_head_cross_entropy(hn, params_[head], targets_d, opts.lm_grad_scale,
                                                          lm_backward ? &dhn : nullptr,
                                                          lm_backward ? &params_.grad(head) : nullptr);
  stats.lm_loss_sum = ce.loss_sum;
  stats.lm_tokens = ce.count;
  if (!lm_backward) return stats;

  // Backward through the layers, LM loss (plus the indexer loss where inputs are not detached).
  Tensor dh = ops::rmsnorm_backward(dhn, h, params_["model.norm.weight"], final_rstd, &params_.grad("model.norm.weight"));
  for (int64_t l = cfg_.num_hidden_layers - 1; l >= 0; --l) {
    LayerCache& lc = caches[l];
    const std::string p = layer_prefix(l);
    Tensor dffn_in = lc.moe ? moe_backward(params_, p + "mlp.", cfg_, dh, lc.moe_cache, opts.balance_alpha)
                            : mlp_backward(params_, p + "mlp.", dh, lc.mlp);
    ops::add_(dh, ops::rmsnorm_backward(dffn_in, lc.h_mid, params_[p + "post_attention_layernorm.weight"], lc.ffn_rstd,
                                        &params_.grad(p + "post_attention_layernorm.weight")));
    Tensor dattn_in = mla_backward(params_, p, cfg_, rope_, positions, dh, lc.mla,
                                   lc.dcq_from_indexer.defined() ? &lc.dcq_from_indexer : nullptr);
    if (lc.dx_from_indexer.defined()) ops::add_(dattn_in, lc.dx_from_indexer);
    ops::add_(dh, ops::rmsnorm_backward(dattn_in, lc.x_in, params_[p + "input_layernorm.weight"], lc.attn_rstd,
                                        &params_.grad(p + "input_layernorm.weight")));
  }
  ops::embedding_backward(dh, ids_d, &params_.grad("model.embed_tokens.weight"));
  (void)D;
  return stats;
}

}  // namespace dsa
