#include "model/indexer.h"

#include <cmath>

#include "kernels/ops.h"

namespace dsa {

namespace {
constexpr double kIndexerNormEps = 1e-6;
}

void indexer_forward(const ParamStore& ps, const std::string& prefix, const ModelConfig& cfg, const RopeTables& rope,
                     const Tensor& positions, const Tensor& x, const Tensor& cq, IndexerCache& c) {
  const std::string p = prefix + "self_attn.indexer.";
  const int64_t N = x.size(0), Hi = cfg.index_n_heads, di = cfg.index_head_dim;
  c = IndexerCache{};
  c.x = x;
  c.cq = cq;
  // NOTES: without a query LoRA there is no c_q; the indexer's own projection wq reads the normed
  // hidden state x instead (docs/converting.md, "The indexer without a query LoRA").
  c.q = (cfg.has_q_lora() ? ops::linear_forward(cq, ps.w(p + "wq_b.weight"))
                          : ops::linear_forward(x, ps.w(p + "wq.weight")))
            .view({N, Hi, di});
  ops::rope_forward_(c.q, positions, rope.cos, rope.sin, 0, ops::RopeStyle::RotateHalf);
  c.k_pre = ops::linear_forward(x, ps.w(p + "wk.weight"));
  c.k = ops::layernorm_forward(c.k_pre, ps.w(p + "k_norm.weight"), ps.w(p + "k_norm.bias"), kIndexerNormEps, &c.k_mean,
                               &c.k_rstd);
  ops::rope_forward_(c.k, positions, rope.cos, rope.sin, 0, ops::RopeStyle::RotateHalf);
  c.w = ops::linear_forward(x, ps.w(p + "weights_proj.weight"));
  ops::scale_(c.w, 1.0 / std::sqrt(static_cast<double>(Hi)));
}

void indexer_backward(ParamStore& ps, const std::string& prefix, const ModelConfig& cfg, const RopeTables& rope,
                      const Tensor& positions, const IndexerCache& c, const Tensor& dq_in, const Tensor& dk_in,
                      const Tensor& dw_in, Tensor* dx, Tensor* dcq) {
  const std::string p = prefix + "self_attn.indexer.";
  const int64_t N = c.x.size(0), Hi = cfg.index_n_heads, di = cfg.index_head_dim;
  expect_shape("indexer_backward", "dq", dq_in, {N, Hi, di});
  expect_shape("indexer_backward", "dk", dk_in, {N, di});
  expect_shape("indexer_backward", "dw", dw_in, {N, Hi});
  Tensor dq = dq_in.clone();
  ops::rope_backward_(dq, positions, rope.cos, rope.sin, 0, ops::RopeStyle::RotateHalf);
  // q reads c_q (query LoRA) or x (no query LoRA): its input gradient goes to dcq or joins dx.
  const bool lora = cfg.has_q_lora();
  const std::string wq = lora ? p + "wq_b.weight" : p + "wq.weight";
  Tensor dq_in_grad = ops::linear_backward(dq.view({N, Hi * di}), lora ? c.cq : c.x, ps.w(wq), &ps.grad(wq),
                                           lora ? dcq != nullptr : dx != nullptr);
  Tensor dk = dk_in.clone();
  ops::rope_backward_(dk, positions, rope.cos, rope.sin, 0, ops::RopeStyle::RotateHalf);
  Tensor dk_pre = ops::layernorm_backward(dk, c.k_pre, ps.w(p + "k_norm.weight"), c.k_mean, c.k_rstd,
                                          &ps.grad(p + "k_norm.weight"), &ps.grad(p + "k_norm.bias"));
  Tensor dx_k = ops::linear_backward(dk_pre, c.x, ps.w(p + "wk.weight"), &ps.grad(p + "wk.weight"), dx != nullptr);
  Tensor dw = dw_in.clone();
  ops::scale_(dw, 1.0 / std::sqrt(static_cast<double>(Hi)));
  Tensor dx_w = ops::linear_backward(dw, c.x, ps.w(p + "weights_proj.weight"), &ps.grad(p + "weights_proj.weight"),
                                     dx != nullptr);
  if (dx) {
    *dx = dx_k;
    ops::add_(*dx, dx_w);
    if (!lora) ops::add_(*dx, dq_in_grad);
  }
  if (dcq && lora) *dcq = dq_in_grad;
}

}  // namespace dsa
