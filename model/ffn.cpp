#include "model/ffn.h"

#include "model/profile.h"

namespace dsa {

Tensor mlp_forward(const ParamStore& ps, const std::string& p, const Tensor& x, MlpCache& c) {
  c.x = x;
  c.gate = ops::linear_forward(x, ps.w(p + "gate_proj.weight"));
  c.up = ops::linear_forward(x, ps.w(p + "up_proj.weight"));
  c.h = ops::swiglu_forward(c.gate, c.up);
  return ops::linear_forward(c.h, ps.w(p + "down_proj.weight"));
}

Tensor mlp_backward(ParamStore& ps, const std::string& p, const Tensor& dy, const MlpCache& c) {
  Tensor dh = ops::linear_backward(dy, c.h, ps.w(p + "down_proj.weight"), &ps.grad(p + "down_proj.weight"));
  Tensor dgate, dup;
  ops::swiglu_backward(dh, c.gate, c.up, &dgate, &dup);
  Tensor dx = ops::linear_backward(dgate, c.x, ps.w(p + "gate_proj.weight"), &ps.grad(p + "gate_proj.weight"));
  ops::add_(dx, ops::linear_backward(dup, c.x, ps.w(p + "up_proj.weight"), &ps.grad(p + "up_proj.weight")));
  return dx;
}

namespace {
// The router computes in fp32 at least (bf16 activations are cast up; f64 stays f64 in tests).
DType router_dtype(const Tensor& x) { return x.dtype() == DType::BF16 ? DType::F32 : x.dtype(); }
}  // namespace

ops::MoeRouteConfig route_config(const ModelConfig& cfg) {
  ops::MoeRouteConfig r;
  // greedy (V2-Lite) ignores the groups: one group holding every expert.
  const bool greedy = cfg.topk_method == "greedy";
  r.n_group = greedy ? 1 : static_cast<int>(cfg.n_group);
  r.topk_group = greedy ? 1 : static_cast<int>(cfg.topk_group);
  r.top_k = static_cast<int>(cfg.num_experts_per_tok);
  r.norm_topk_prob = cfg.norm_topk_prob;
  r.routed_scaling_factor = cfg.routed_scaling_factor;
  r.scoring = cfg.scoring_func == "softmax" ? ops::MoeScoring::Softmax : ops::MoeScoring::Sigmoid;
  r.group_max = cfg.topk_method == "group_limited_greedy";
  return r;
}

namespace {

// The router's weights for a given choice of experts (a testing hook: the GPU/CPU comparisons route both
// sides like the CPU): w[n, k] = s[n, e_k] (normalized over the K chosen with norm_topk_prob) times the
// scaling factor, what moe_route computes for its own choice. Host arithmetic in f64, stored as the
// scores' dtype; moe_route_backward then differentiates through r.scores at these experts.
void force_experts(ops::MoeRouting& r, const Tensor& experts, const ops::MoeRouteConfig& rc) {
  const int64_t N = r.scores.size(0), E = r.scores.size(1), K = rc.top_k;
  DSA_CHECK(experts.dtype() == DType::I32 && experts.shape() == Shape({N, K}), "[model] forced_experts must be i32 [",
            N, ", ", K, "], got ", experts.desc());
  const Tensor s = r.scores.to(Device::CPU).to(DType::F64);
  const Tensor ex = experts.to(Device::CPU);
  Tensor w = Tensor::empty({N, K}, DType::F64);
  for (int64_t n = 0; n < N; ++n) {
    double sum = 0;
    for (int64_t k = 0; k < K; ++k) {
      const int32_t e = ex.data<int32_t>()[n * K + k];
      DSA_CHECK(e >= 0 && e < E, "[model] forced_experts: expert ", e, " outside [0, ", E, ")");
      sum += s.item(n * E + e);
    }
    for (int64_t k = 0; k < K; ++k) {
      const double v = s.item(n * E + ex.data<int32_t>()[n * K + k]);
      w.set_item(n * K + k, (rc.norm_topk_prob ? v / sum : v) * rc.routed_scaling_factor);
    }
  }
  r.experts = ex.to(r.experts.device());
  r.weights = w.to(r.weights.dtype()).to(r.weights.device());
}

}  // namespace

Tensor moe_forward(const ParamStore& ps, const std::string& p, const ModelConfig& cfg, const Tensor& x, int64_t B,
                   int64_t T, double balance_alpha, MoeCache& c, ExpertParallel* ep, const Tensor* forced_experts) {
  const int64_t E = cfg.n_routed_experts, K = cfg.num_experts_per_tok, I = cfg.moe_intermediate_size;
  c = MoeCache{};
  c.B = B;
  c.T = T;
  c.x = x;
  // The router runs in fp32, as transformers does (master weight, input cast up).
  c.logits = ops::linear_forward(ops::cast(x, router_dtype(x)), ps[p + "gate.weight"]);
  const Tensor no_bias;
  const Tensor& bias = cfg.has_routing_bias() ? ps[p + "gate.e_score_correction_bias"] : no_bias;
  c.routing = ops::moe_route(c.logits, bias, route_config(cfg));
  if (forced_experts) force_experts(c.routing, *forced_experts, route_config(cfg));
  c.perm = ops::moe_permutation(c.routing.experts, E);
  c.xp = ops::moe_permute(x, c.perm, K);
  if (ep && ep->size() > 1) {
    c.yp = ep_experts_forward(*ep, c.xp, c.perm, ps.w(p + "experts.gate_up_proj"), ps.w(p + "experts.down_proj"), I, c.ep);
  } else {
    ProfileScope ps_("routed experts");
    c.gu = ops::grouped_linear_forward(c.xp, ps.w(p + "experts.gate_up_proj"), c.perm);
    c.h = ops::swiglu_forward(ops::slice_last(c.gu, 0, I), ops::slice_last(c.gu, I, 2 * I));
    c.yp = ops::grouped_linear_forward(c.h, ps.w(p + "experts.down_proj"), c.perm);
  }
  Tensor y = ops::moe_combine(c.yp, c.routing.weights, c.perm);
  if (cfg.n_shared_experts > 0) {
    ProfileScope ps_("shared experts");
    ops::add_(y, mlp_forward(ps, p + "shared_experts.", x, c.shared));
  }
  if (balance_alpha > 0) c.balance_loss = ops::moe_seq_balance_loss(c.routing, E, B, T, balance_alpha, nullptr);
  return y;
}

Tensor moe_backward(ParamStore& ps, const std::string& p, const ModelConfig& cfg, const Tensor& dy, const MoeCache& c,
                    double balance_alpha, ExpertParallel* ep) {
  const int64_t E = cfg.n_routed_experts, I = cfg.moe_intermediate_size;
  const int64_t N = c.x.size(0);
  Tensor dyp, dweights;
  ops::moe_combine_backward(dy, c.yp, c.routing.weights, c.perm, &dyp, &dweights);
  Tensor dxp;
  if (ep && ep->size() > 1) {
    dxp = ep_experts_backward(*ep, dyp, ps.w(p + "experts.gate_up_proj"), ps.w(p + "experts.down_proj"), I, c.ep,
                              ps.grad(p + "experts.gate_up_proj"), ps.grad(p + "experts.down_proj"));
  } else {
    ProfileScope ps_("routed experts");
    Tensor dh = ops::grouped_linear_backward(dyp, c.h, ps.w(p + "experts.down_proj"), c.perm,
                                             &ps.grad(p + "experts.down_proj"));
    Tensor dgate, dup;
    ops::swiglu_backward(dh, ops::slice_last(c.gu, 0, I), ops::slice_last(c.gu, I, 2 * I), &dgate, &dup);
    Tensor dgu = ops::concat_last(dgate, dup);
    dxp = ops::grouped_linear_backward(dgu, c.xp, ps.w(p + "experts.gate_up_proj"), c.perm,
                                       &ps.grad(p + "experts.gate_up_proj"));
  }
  Tensor dx = ops::moe_permute_backward(dxp, c.perm, N, cfg.num_experts_per_tok);
  // Router: through the combine weights, and through the balance loss's dependence on the scores.
  Tensor dlogits = ops::moe_route_backward(dweights, c.routing, route_config(cfg));
  if (balance_alpha > 0) {
    Tensor dscores = Tensor::zeros({N, E}, c.routing.scores.dtype(), dy.device());
    ops::moe_seq_balance_loss(c.routing, E, c.B, c.T, balance_alpha, &dscores);
    ops::add_(dlogits, ops::moe_scores_backward(dscores, c.routing));
  }
  ops::add_(dx, ops::cast(ops::linear_backward(dlogits, ops::cast(c.x, router_dtype(c.x)), ps[p + "gate.weight"],
                                               &ps.grad(p + "gate.weight")),
                          dx.dtype()));
  if (cfg.n_shared_experts > 0) {
    ProfileScope ps_("shared experts");
    ops::add_(dx, mlp_backward(ps, p + "shared_experts.", dy, c.shared));
  }
  return dx;
}

}  // namespace dsa
