// Multi-token prediction (model/model.h): the DeepSeek-V3 report's depth-1 MTP module with the tensor
// names of DeepSeek's releases (model.layers.{L}.{enorm,hnorm,eh_proj,shared_head.norm} and a decoder
// layer at index L = num_hidden_layers), forward and backward.
//
// NOTES:
//  - eh_proj reads [enorm(embedding) ; hnorm(hidden)] in that order, the order the release weights were
//    trained with (vLLM's and SGLang's DeepSeek MTP layers concatenate the same way).
//  - h_i is the main model's final normed hidden state (the lm_head's input), as the serving engines
//    hand it to the MTP layer.
//  - The embedding and the output head are the main model's (shared, as in the report); the release
//    files also hold copies (model.layers.{L}.embed_tokens, shared_head.head) that import checks and
//    export writes back.
//  - Position i reads t_{i+1} = targets[i] and predicts t_{i+2} = targets[i+1] of the same sequence.
//    Where targets[i] is unknown (-1) the input id is 0 and the position is not counted; a position
//    only affects later ones (causal attention, per-token routing), and the ones after an unknown
//    target are not counted either.
#include "kernels/ops.h"
#include "model/model.h"
#include "model/profile.h"

namespace dsa {

void Model::mtp_forward(MtpCache& m, const Tensor& hn, const Tensor& targets, const LayerContext& ctx,
                        StepStats& stats) {
  ProfileScope ps_("MTP fwd");
  const int64_t B = ctx.B, T = ctx.T, N = B * T, D = cfg_.hidden_size, L = cfg_.mtp_layer();
  const std::string p = layer_prefix(L);
  const StepOptions& opts = ctx.opts;
  Tensor tg = targets.to(Device::CPU);
  Tensor ids = Tensor::empty({N}, DType::I32), mtp_targets = Tensor::empty({N}, DType::I32);
  const int32_t* t = tg.data<int32_t>();
  for (int64_t i = 0; i < N; ++i) {
    const bool known = t[i] >= 0;
    ids.data<int32_t>()[i] = known ? t[i] : 0;
    mtp_targets.data<int32_t>()[i] = known && (i % T) + 1 < T ? t[i + 1] : -1;
  }
  m.ids = ids.to(device_);
  m.targets = mtp_targets.to(device_);
  m.hn = hn;
  m.e = ops::embedding_forward(m.ids, params_.w("model.embed_tokens.weight"));
  Tensor en = ops::rmsnorm_forward(m.e, params_.w(p + "enorm.weight"), cfg_.rms_norm_eps, &m.e_rstd);
  Tensor hh = ops::rmsnorm_forward(hn, params_.w(p + "hnorm.weight"), cfg_.rms_norm_eps, &m.h_rstd);
  m.cat = ops::concat_last(en, hh);  // [N, 2D]
  Tensor x = ops::linear_forward(m.cat, params_.w(p + "eh_proj.weight"));
  expect_shape("mtp", "eh_proj output", x, {N, D});
  m.y = layer_forward(L, m.layer, x, ctx, /*first_pass=*/true, stats);
  if (opts.capture_layer_outputs) opts.capture_layer_outputs->push_back(m.y);
  if (opts.capture_indices && m.layer.indices.defined()) opts.capture_indices->push_back(m.layer.indices);
  if (opts.capture_indexer && ctx.need_indexer) opts.capture_indexer->push_back(m.layer.indexer);
  if (opts.recompute && ctx.backward && opts.train_main) slim_for_recompute(m.layer);
  m.yn = ops::rmsnorm_forward(m.y, params_.w(p + "shared_head.norm.weight"), cfg_.rms_norm_eps, &m.y_rstd);
  const std::string head = cfg_.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight";
  if (opts.capture_mtp_logits) *opts.capture_mtp_logits = ops::linear_forward(m.yn, params_.w(head));
  if (ctx.backward && opts.train_main) return;  // the loss and its gradient come together in mtp_backward
  const ops::CrossEntropyResult ce =
      ops::lm_head_cross_entropy(m.yn, params_.w(head), m.targets, 1.0, nullptr, nullptr);
  stats.mtp_loss_sum += ce.loss_sum;
  stats.mtp_tokens += ce.count;
}

void Model::mtp_backward(MtpCache& m, Tensor& dhn, const LayerContext& ctx, StepStats& stats) {
  ProfileScope ps_("MTP bwd");
  const int64_t D = cfg_.hidden_size, L = cfg_.mtp_layer();
  const std::string p = layer_prefix(L);
  const StepOptions& opts = ctx.opts;
  const std::string head = cfg_.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight";
  Tensor dyn;
  const ops::CrossEntropyResult ce = ops::lm_head_cross_entropy(
      m.yn, params_.w(head), m.targets, opts.lm_grad_scale * opts.mtp_loss_weight, &dyn, &params_.grad(head));
  stats.mtp_loss_sum += ce.loss_sum;
  stats.mtp_tokens += ce.count;
  Tensor dh = ops::rmsnorm_backward(dyn, m.y, params_.w(p + "shared_head.norm.weight"), m.y_rstd,
                                    &params_.grad(p + "shared_head.norm.weight"));
  layer_backward(L, m.layer, dh, ctx, stats);  // dh: now the gradient at the layer's input
  Tensor dcat = ops::linear_backward(dh, m.cat, params_.w(p + "eh_proj.weight"), &params_.grad(p + "eh_proj.weight"));
  Tensor de = ops::rmsnorm_backward(ops::slice_last(dcat, 0, D), m.e, params_.w(p + "enorm.weight"), m.e_rstd,
                                    &params_.grad(p + "enorm.weight"));
  ops::embedding_backward(de, m.ids, &params_.grad("model.embed_tokens.weight"));
  ops::add_(dhn, ops::rmsnorm_backward(ops::slice_last(dcat, D, 2 * D), m.hn, params_.w(p + "hnorm.weight"), m.h_rstd,
                                       &params_.grad(p + "hnorm.weight")));
}

}  // namespace dsa
