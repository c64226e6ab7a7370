// Feed-forward blocks: the dense SwiGLU MLP and the DeepSeek MoE (V3: sigmoid routing with a
// selection-only bias, group-limited top-k; V2: softmax routing, greedy or group-limited by the
// group's max; shared experts), forward and backward.
#pragma once

#include "kernels/ops.h"
#include "model/config.h"
#include "model/expert_parallel.h"
#include "model/params.h"

namespace dsa {

struct MlpCache {
  Tensor x;     // [N, D]
  Tensor gate;  // [N, I] gate_proj(x)
  Tensor up;    // [N, I] up_proj(x)
  Tensor h;     // [N, I] silu(gate) * up
};
// prefix names the block, e.g. "model.layers.0.mlp." or "model.layers.3.mlp.shared_experts."
Tensor mlp_forward(const ParamStore& ps, const std::string& prefix, const Tensor& x, MlpCache& c);
Tensor mlp_backward(ParamStore& ps, const std::string& prefix, const Tensor& dy, const MlpCache& c);

struct MoeCache {
  int64_t B = 0, T = 0;
  Tensor x;                  // [N, D]
  Tensor logits;             // [N, E] router logits
  ops::MoeRouting routing;   // scores [N, E], experts [N, K], weights [N, K]
  ops::MoePermutation perm;  // rows sorted by expert
  Tensor xp;                 // [N*K, D]   tokens in expert order
  Tensor gu;                 // [N*K, 2I]  gate_up per routed row
  Tensor h;                  // [N*K, I]   silu(gate) * up
  Tensor yp;                 // [N*K, D]   expert outputs before weighting
  MlpCache shared;           // shared experts
  double balance_loss = 0;   // sequence-wise balance loss value (0 when alpha is 0)
  EpCache ep;                // expert parallel only (then gu, h stay empty: they live in ep)
};
ops::MoeRouteConfig route_config(const ModelConfig& cfg);
// balance_alpha > 0 adds the sequence-wise balance loss; its gradient enters in the backward.
// ep (size > 1): routed experts split over an expert-parallel group (model/expert_parallel.h); the
// expert tensors hold this rank's experts only (ParamLayout's expert range).
// forced_experts [N, K] i32 (tests, may be null): route to these experts instead of the router's choice,
// weighted from the router's scores as the router weights its own choice (StepOptions::forced_experts).
Tensor moe_forward(const ParamStore& ps, const std::string& prefix, const ModelConfig& cfg, const Tensor& x, int64_t B,
                   int64_t T, double balance_alpha, MoeCache& c, ExpertParallel* ep = nullptr,
                   const Tensor* forced_experts = nullptr);
Tensor moe_backward(ParamStore& ps, const std::string& prefix, const ModelConfig& cfg, const Tensor& dy,
                    const MoeCache& c, double balance_alpha, ExpertParallel* ep = nullptr);

}  // namespace dsa
