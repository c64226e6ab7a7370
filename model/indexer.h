// The lightning indexer's projections (SPEC.md §1), forward and backward:
//   q^I = rope_half(W_qb^I c_q)              [N, Hi, di]   (rotate-half RoPE on the first dr dims)
//         rope_half(W_q^I x)                               without a query LoRA (no c_q exists)
//   k^I = rope_half(LayerNorm(W_k^I x))      [N, di]       (one key per token, eps 1e-6)
//   w   = W_w x * Hi^-0.5                    [N, Hi]
// Scoring, Hadamard rotation, FP8 quantization, top-k and the KL losses are kernels (kernels/dsa_ops.h).
#pragma once

#include "kernels/tensor.h"
#include "model/config.h"
#include "model/params.h"
#include "model/rope_tables.h"

namespace dsa {

struct IndexerCache {
  Tensor x;       // [N, D]        input hidden state (after input_layernorm)
  Tensor cq;      // [N, q_lora]   the MLA query latent (undefined without a query LoRA)
  Tensor q;       // [N, Hi, di]   after rope
  Tensor k_pre;   // [N, di]       wk(x)
  Tensor k_mean;  // [N]
  Tensor k_rstd;  // [N]
  Tensor k;       // [N, di]       after LayerNorm and rope
  Tensor w;       // [N, Hi]       head weights, already times Hi^-0.5
};

void indexer_forward(const ParamStore& ps, const std::string& prefix, const ModelConfig& cfg, const RopeTables& rope,
                     const Tensor& positions, const Tensor& x, const Tensor& cq, IndexerCache& c);

// Given gradients at q [N, Hi, di], k [N, di] and w [N, Hi]: accumulates the indexer's parameter
// gradients (wq_b or wq, wk, k_norm, weights_proj) and, when dx / dcq are non-null, writes the
// gradients that reach the indexer's inputs (only used when the inputs are not detached; without a
// query LoRA everything reaches dx and dcq is left undefined).
void indexer_backward(ParamStore& ps, const std::string& prefix, const ModelConfig& cfg, const RopeTables& rope,
                      const Tensor& positions, const IndexerCache& c, const Tensor& dq, const Tensor& dk,
                      const Tensor& dw, Tensor* dx, Tensor* dcq);

}  // namespace dsa
