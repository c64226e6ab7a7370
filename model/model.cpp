#include "model/model.h"

#include <cmath>

#include "kernels/dsa_ops.h"
#include "kernels/ops.h"
#include "model/profile.h"

namespace dsa {

namespace {
const char* const kMasterRead = "mlp.gate.weight";
}

Model::Model(const ModelConfig& cfg, DType dtype, Device device, const ParamLayout& layout)
    : cfg_(cfg), dtype_(dtype), device_(device) {
  cfg_.validate("model");
  params_ = make_params(cfg, dtype, device, layout);
  // NOTES: on the GPU the model trains in mixed precision: fp32 master weights and gradients, bf16
  // weight copies and activations. The router reads its fp32 master weight (it runs in fp32).
  if (device_ == Device::CUDA && !layout.external_storage) params_.make_compute_copies(DType::BF16, {kMasterRead});
}

bool Model::reads_master(const std::string& name) {
  const std::string s = kMasterRead;
  return name.size() >= s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0;
}

void Model::ensure_rope(int64_t T) {
  if (T <= rope_positions_) return;
  DSA_CHECK(T <= cfg_.max_position_embeddings * std::max(1.0, cfg_.rope_scaling.factor),
            "[model] sequence length ", T, " exceeds max_position_embeddings ", cfg_.max_position_embeddings);
  rope_ = make_rope_tables(cfg_, T, device_ == Device::CUDA ? DType::F32 : dtype_, device_);
  rope_positions_ = T;
}

int64_t Model::grad_group(const std::string& name) {
  static const std::string layers = "model.layers.";
  if (name.rfind(layers, 0) == 0) return std::stoll(name.substr(layers.size(), name.find('.', layers.size())));
  if (name == "model.embed_tokens.weight") return -2;
  return -1;  // lm_head.weight, model.norm.weight
}

void Model::update_moe_bias(const std::vector<Tensor>& loads, double rate) {
  if (!cfg_.has_routing_bias()) return;
  size_t m = 0;
  for (int64_t l = 0; l < cfg_.total_layers(); ++l) {
    if (!cfg_.is_moe_layer(l)) continue;
    if (l == cfg_.mtp_layer() && m == loads.size()) break;  // the MTP layer did not run
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
    ProfileScope ps_("indexer KL (dense)");
    // The dense target normalizes each head by the dense attention's log-sum-exp. Under sparse
    // attention (the full-distribution-KL ablation) m.lse sums over the selection only, which would
    // weight each head by 1 / (its selected mass): the dense attention is rebuilt here instead, as
    // the recall does.
    MlaCache dense_cache;
    const MlaCache* d = &m;
    if (m.sparse) {
      mla_prepare(params_, layer_prefix(l), cfg_, lc.attn_in, dense_cache);
      mla_forward(params_, layer_prefix(l), cfg_, rope_, positions, B, T, lc.attn_in, MlaForm::MHA, nullptr,
                  dense_cache);
      d = &dense_cache;
    }
    Tensor q_main, k_main;
    if (d->form == MlaForm::MHA) {
      q_main = d->q.view({B, T, H, cfg_.qk_head_dim()});
      k_main = d->k;
    } else {
      q_main = d->q_abs;
      k_main = d->kv_lat.view({B, T, 1, cfg_.kv_lora_rank + cfg_.qk_rope_head_dim});
    }
    r = ops::indexer_kl_dense(q_main, k_main, d->lse, cfg_.attention_scale(), q4, k3, w3, opts.fp8_indexer,
                              opts.indexer_grad_scale, need_grad ? &g : nullptr);
  } else {
    DSA_CHECK(m.sparse, "[model] the sparse indexer loss needs sparse attention in the same step");
    ProfileScope ps_("indexer KL (sparse)");
    // The target comes from the sparse forward's head sums (no recomputation of the main scores);
    // its [B, T, K] buffer is not needed after this.
    r = ops::indexer_kl_sparse_from_probs(m.probs_sum, lc.indices, q4, k3, w3, opts.fp8_indexer,
                                          opts.indexer_grad_scale, need_grad ? &g : nullptr,
                                          lc.index_scores.defined() ? &lc.index_scores : nullptr);
    lc.mla.probs_sum = Tensor();
    lc.index_scores = Tensor();
  }
  stats.indexer_kl_sum += r.loss_sum;
  stats.indexer_rows += r.rows;
  if (!need_grad) return;
  // NOTES: the gradient flows through the unquantized q and k (straight-through over FP8 rounding);
  // the KL target p is a stop-gradient and the top-k selection is not differentiated.
  const bool to_inputs = !opts.detach_indexer_input && opts.train_main;
  ProfileScope ps_("indexer projections bwd");
  Tensor dx, dcq;
  indexer_backward(params_, layer_prefix(l), cfg_, rope_, positions,
                   ic, g.dq.view({N, Hi, di}), g.dk.view({N, di}), g.dw.view({N, Hi}), to_inputs ? &dx : nullptr,
                   to_inputs ? &dcq : nullptr);
  if (to_inputs) {
    lc.dx_from_indexer = dx;
    lc.dcq_from_indexer = dcq;
  }
}

Tensor Model::layer_forward(int64_t l, LayerCache& lc, const Tensor& h_in, const LayerContext& x, bool first_pass,
                            StepStats& stats) {
  const StepOptions& opts = x.opts;
  const int64_t B = x.B, T = x.T;
  const std::string p = layer_prefix(l);
  lc.x_in = h_in;
  {
    ProfileScope ps_("norms + q latent fwd");
    lc.attn_in =
        ops::rmsnorm_forward(h_in, params_.w(p + "input_layernorm.weight"), cfg_.rms_norm_eps, &lc.attn_rstd);
    mla_prepare(params_, p, cfg_, lc.attn_in, lc.mla);
    lc.mla.probs_in_forward = !x.kl_in_backward;
  }
  if (x.need_indexer) {
    {
      ProfileScope ps_("indexer projections fwd");
      indexer_forward(params_, p, cfg_, rope_, x.positions, lc.attn_in, lc.mla.cq, lc.indexer);
    }
    if (!first_pass) {
      // Recomputation reuses the selection of the first pass (lc.indices kept).
    } else if (opts.forced_indices) {
      DSA_CHECK(opts.forced_indices->size() > static_cast<size_t>(l), "[model] forced_indices has ",
                opts.forced_indices->size(), " tensors; layer ", l, " needs one (one per layer, the MTP layer last)");
      lc.indices = (*opts.forced_indices)[l].to(device_);
    } else if (x.sparse || opts.compute_recall) {
      ProfileScope ps_("indexer top-k");
      // The sparse KL reads the winners' scores instead of scoring the slots again.
      const bool keep_scores = x.sparse && opts.indexer_loss == IndexerLossMode::Sparse;
      lc.indices = ops::indexer_topk(lc.indexer.q.view({B, T, cfg_.index_n_heads, cfg_.index_head_dim}),
                                     lc.indexer.k.view({B, T, cfg_.index_head_dim}),
                                     lc.indexer.w.view({B, T, cfg_.index_n_heads}), x.topk, opts.fp8_indexer, 0,
                                     keep_scores ? &lc.index_scores : nullptr, opts.topk_order);
    }
  }
  Tensor attn_out;
  {
    ProfileScope ps_(x.sparse ? "MLA fwd (sparse)" : "MLA fwd (dense)");
    attn_out = mla_forward(params_, p, cfg_, rope_, x.positions, B, T, lc.attn_in, x.form,
                           x.sparse ? &lc.indices : nullptr, lc.mla);
  }
  if (first_pass && opts.compute_recall) {
    // Recall is measured against the dense attention's head-summed distribution (MHA form: the
    // dense kernels' head dims).
    ProfileScope ps_("recall");
    const MlaCache* dense = &lc.mla;
    MlaCache dense_cache;
    if (x.sparse || lc.mla.form != MlaForm::MHA) {
      mla_prepare(params_, p, cfg_, lc.attn_in, dense_cache);
      mla_forward(params_, p, cfg_, rope_, x.positions, B, T, lc.attn_in, MlaForm::MHA, nullptr, dense_cache);
      dense = &dense_cache;
    }
    ops::IndexerRecall rr =
        ops::indexer_recall(dense->q.view({B, T, cfg_.num_attention_heads, cfg_.qk_head_dim()}), dense->k, dense->lse,
                            cfg_.attention_scale(), lc.indices);
    stats.recall_sum += rr.recall_sum;
    stats.recall_rows += rr.rows;
  }
  if (first_pass && opts.indexer_loss != IndexerLossMode::None && !x.kl_in_backward)
    indexer_loss_and_grads(l, lc, x.positions, B, T, opts, x.backward, stats);
  ProfileScope ps_ffn("FFN fwd (+ residual, norm)");
  Tensor h = ops::add(h_in, attn_out);
  lc.h_mid = h;
  lc.ffn_in =
      ops::rmsnorm_forward(h, params_.w(p + "post_attention_layernorm.weight"), cfg_.rms_norm_eps, &lc.ffn_rstd);
  Tensor ffn_out;
  lc.moe = cfg_.is_moe_layer(l);
  if (lc.moe) {
    // The balance loss over each sequence (V3, V2 seq_aux) or over the micro-batch as one (V2 batch-level).
    const int64_t bb = opts.balance_per_sequence ? B : 1, bt = opts.balance_per_sequence ? T : B * T;
    const Tensor* forced = opts.forced_experts && static_cast<int64_t>(opts.forced_experts->size()) > l &&
                                   (*opts.forced_experts)[l].defined()
                               ? &(*opts.forced_experts)[l]
                               : nullptr;
    ffn_out = moe_forward(params_, p + "mlp.", cfg_, lc.ffn_in, bb, bt, opts.balance_alpha, lc.moe_cache, ep_, forced);
    if (first_pass && opts.capture_experts) {
      if (static_cast<int64_t>(opts.capture_experts->size()) <= l) opts.capture_experts->resize(l + 1);
      (*opts.capture_experts)[l] = lc.moe_cache.routing.experts.to(Device::CPU);
    }
    if (first_pass) {
      stats.balance_loss += lc.moe_cache.balance_loss;
      expert_loads_.push_back(ops::moe_expert_load(lc.moe_cache.routing, cfg_.n_routed_experts));
    }
  } else {
    ffn_out = mlp_forward(params_, p + "mlp.", lc.ffn_in, lc.mlp);
  }
  return ops::add(h, ffn_out);
}

StepStats Model::step(const Tensor& ids, const Tensor& targets, int64_t B, int64_t T, const StepOptions& opts,
                      bool backward) {
  const int64_t N = B * T;
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
  // NOTES: with detached indexer inputs the sparse indexer loss feeds nothing upstream, so in a training
  // step it moves into the layer's backward, whose attention kernel recomputes every probability anyway
  // and returns their head sums (the loss's target): the forward's separate head-sum pass disappears.
  const bool kl_in_backward = backward && opts.train_main && opts.indexer_loss == IndexerLossMode::Sparse &&
                              opts.detach_indexer_input;
  const LayerContext ctx{positions, B, T, opts, backward, sparse, need_indexer, kl_in_backward, topk, form};
  Tensor h = ops::embedding_forward(ids_d, params_.w("model.embed_tokens.weight"));
  for (int64_t l = 0; l < cfg_.num_hidden_layers; ++l) {
    LayerCache& lc = caches[l];
    h = layer_forward(l, lc, h, ctx, /*first_pass=*/true, stats);
    if (opts.capture_layer_outputs) opts.capture_layer_outputs->push_back(h);
    if (opts.capture_indices && lc.indices.defined()) opts.capture_indices->push_back(lc.indices);
    if (opts.capture_indexer && need_indexer) opts.capture_indexer->push_back(lc.indexer);
    if (opts.recompute && backward && opts.train_main) slim_for_recompute(lc);
    // NOTES: without an LM backward (indexer warm-up, evaluation) nothing reads a layer's cache again:
    // holding one layer's activations at a time instead of all of them is what the memory plan counts.
    // The warm-up's indexer gradients are final once the layer's forward has run its loss.
    if (!(backward && opts.train_main)) {
      lc = LayerCache{};
      if (backward && opts.train_indexer && grad_ready_hook_) grad_ready_hook_(l);
    }
  }

  Tensor final_rstd;
  Tensor hn = ops::rmsnorm_forward(h, params_.w("model.norm.weight"), cfg_.rms_norm_eps, &final_rstd);
  const std::string head = cfg_.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight";
  if (opts.capture_logits) *opts.capture_logits = ops::linear_forward(hn, params_.w(head));
  const bool mtp = opts.mtp_loss_weight > 0;
  DSA_CHECK(!mtp || cfg_.num_nextn_predict_layers > 0, "[model] mtp_loss_weight ", opts.mtp_loss_weight,
            " but the model has no MTP layer (num_nextn_predict_layers = 0)");
  MtpCache mtp_cache;
  if (mtp) mtp_forward(mtp_cache, hn, targets, ctx, stats);
  const bool lm_backward = backward && opts.train_main;
  Tensor dhn;
  ops::CrossEntropyResult ce;
  {
    ProfileScope ps_ce("lm head + CE (fwd+bwd)");
    ce = ops::lm_head_cross_entropy(hn, params_.w(head), targets_d, opts.lm_grad_scale, lm_backward ? &dhn : nullptr,
                                    lm_backward ? &params_.grad(head) : nullptr);
  }
  stats.lm_loss_sum = ce.loss_sum;
  stats.lm_tokens = ce.count;
  if (!lm_backward) return stats;

  // Backward: the MTP module first (its gradient at hn joins the LM head's), then the final norm and
  // the layers (LM loss, plus the indexer loss where inputs are not detached).
  if (mtp) {
    mtp_backward(mtp_cache, dhn, ctx, stats);
    if (grad_ready_hook_) grad_ready_hook_(cfg_.mtp_layer());
  }
  Tensor dh = ops::rmsnorm_backward(dhn, h, params_.w("model.norm.weight"), final_rstd, &params_.grad("model.norm.weight"));
  if (grad_ready_hook_ && !cfg_.tie_word_embeddings) grad_ready_hook_(-1);
  for (int64_t l = cfg_.num_hidden_layers - 1; l >= 0; --l) {
    layer_backward(l, caches[l], dh, ctx, stats);
    caches[l] = LayerCache{};  // the backward has finished with this layer's activations
    if (grad_ready_hook_) grad_ready_hook_(l);
  }
  ops::embedding_backward(dh, ids_d, &params_.grad("model.embed_tokens.weight"));
  if (grad_ready_hook_) grad_ready_hook_(-2);
  return stats;
}

void Model::slim_for_recompute(LayerCache& lc) {
  LayerCache slim;
  slim.x_in = lc.x_in;
  slim.indices = lc.indices;
  slim.index_scores = lc.index_scores;
  slim.dx_from_indexer = lc.dx_from_indexer;
  slim.dcq_from_indexer = lc.dcq_from_indexer;
  lc = std::move(slim);
}

void Model::layer_backward(int64_t l, LayerCache& lc, Tensor& dh, const LayerContext& ctx, StepStats& stats) {
  const StepOptions& opts = ctx.opts;
  const std::string p = layer_prefix(l);
  if (opts.recompute) {
    ProfileScope ps_r("recompute");
    StepStats ignored;
    layer_forward(l, lc, lc.x_in, ctx, /*first_pass=*/false, ignored);
  }
  Tensor probs_sum;  // [B, T, K] the sparse KL's target, from the attention backward (kl_in_backward)
  {
    ProfileScope ps_b("layer bwd");
    {
      ProfileScope ps_f("FFN bwd (+ norm)");
      Tensor dffn_in = lc.moe ? moe_backward(params_, p + "mlp.", cfg_, dh, lc.moe_cache, opts.balance_alpha, ep_)
                              : mlp_backward(params_, p + "mlp.", dh, lc.mlp);
      ops::add_(dh, ops::rmsnorm_backward(dffn_in, lc.h_mid, params_.w(p + "post_attention_layernorm.weight"),
                                          lc.ffn_rstd, &params_.grad(p + "post_attention_layernorm.weight")));
    }
    ProfileScope ps_m("MLA bwd (+ norm)");
    Tensor dattn_in = mla_backward(params_, p, cfg_, rope_, ctx.positions, dh, lc.mla,
                                   lc.dcq_from_indexer.defined() ? &lc.dcq_from_indexer : nullptr,
                                   ctx.kl_in_backward ? &probs_sum : nullptr);
    if (lc.dx_from_indexer.defined()) ops::add_(dattn_in, lc.dx_from_indexer);
    ops::add_(dh, ops::rmsnorm_backward(dattn_in, lc.x_in, params_.w(p + "input_layernorm.weight"), lc.attn_rstd,
                                        &params_.grad(p + "input_layernorm.weight")));
  }
  if (ctx.kl_in_backward) {
    lc.mla.probs_sum = probs_sum;
    indexer_loss_and_grads(l, lc, ctx.positions, ctx.B, ctx.T, opts, /*backward=*/true, stats);
  }
}

}  // namespace dsa
