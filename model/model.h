// The DeepSeek-V3.2 model: embedding, layers of MLA (+ lightning indexer) and a dense SwiGLU or MoE
// feed-forward, final RMSNorm, lm_head and cross-entropy. Forward and backward of one micro-batch.
//
//   layer i:  x += MLA(RMSNorm(x))        indexer reads RMSNorm(x) and MLA's query latent c_q
//                                         (without a query LoRA: RMSNorm(x) alone, through its own wq)
//             x += FFN_i(RMSNorm(x))      SwiGLU for i < first_k_dense_replace, MoE otherwise
//
// MTP (num_nextn_predict_layers = 1, StepOptions::mtp_loss_weight > 0), the DeepSeek-V3 report's
// depth-1 module with the release files' names (model/mtp.cpp): at position i,
//   h'_i = eh_proj([enorm(embed(t_{i+1})) ; hnorm(h_i)])     h_i = the final normed hidden state
//   y_i  = decoder layer L (= num_hidden_layers)(h')           its own MLA, indexer and MoE
//   loss = CE(lm_head(shared_head.norm(y_i)), t_{i+2})         embedding and lm_head shared
// and the objective is LM + mtp_loss_weight * MTP, both sums over tokens (times lm_grad_scale).
//
// The three training stages are switches of StepOptions (SPEC.md §2):
//   dense:           attention Dense, indexer_loss None,   train_main
//   indexer warm-up: attention Dense, indexer_loss Dense,  train_indexer only (no LM backward at all)
//   sparse:          attention Sparse, indexer_loss Sparse, train_main and train_indexer, detached inputs
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "kernels/dsa_ops.h"
#include "model/config.h"
#include "model/ffn.h"
#include "model/indexer.h"
#include "model/mla.h"
#include "model/params.h"
#include "model/rope_tables.h"

namespace dsa {

enum class AttentionMode { Dense, Sparse };
enum class IndexerLossMode { None, Dense, Sparse };

struct StepOptions {
  AttentionMode attention = AttentionMode::Dense;
  MlaForm form = MlaForm::MHA;  // dense attention's form; sparse attention always runs in MQA form
  int64_t topk = 0;             // 0: the config's index_topk
  IndexerLossMode indexer_loss = IndexerLossMode::None;
  bool detach_indexer_input = true;  // x and c_q reach the indexer as constants
  bool fp8_indexer = true;           // selection scores through Hadamard + FP8 (else f32/f64)
  ops::TopkOrder topk_order = ops::TopkOrder::kIndex;  // the selected slots' order (the set is the same)
  bool train_main = true;            // LM-loss backward into every non-indexer parameter
  bool train_indexer = false;        // indexer-loss backward into the indexer's parameters
  double lm_grad_scale = 1.0;        // gradient of (lm_grad_scale * sum of token losses)
  double indexer_grad_scale = 1.0;   // gradient of (indexer_grad_scale * sum over layers and rows of KL)
  double balance_alpha = 0.0;        // sequence-wise MoE balance loss weight (0 = off)
  bool balance_per_sequence = true;  // false: one balance loss over the micro-batch (DeepSeek-V2's
                                     // seq_aux false) instead of the mean over its sequences
  double mtp_loss_weight = 0.0;      // > 0: run the MTP layer and add this times its loss (needs
                                     // num_nextn_predict_layers = 1); 0: the MTP layer is not run
  bool recompute = false;            // activation recomputation: keep each layer's input only and
                                     // recompute the layer in the backward (memory for time)
  bool compute_recall = false;       // indexer recall against the dense attention (costs a dense pass)

  // Inspection and testing hooks (null: off).
  // Per layer, the MTP layer (when run) last:
  const std::vector<Tensor>* forced_indices = nullptr;  // [B, T, K]: sparse sets to use instead of the
                                                        // indexer's own selection
  std::vector<Tensor>* capture_layer_outputs = nullptr; // [N, D]: the residual stream after the layer
  std::vector<Tensor>* capture_indices = nullptr;       // [B, T, K]: the selection used
  std::vector<IndexerCache>* capture_indexer = nullptr; // the indexer's q, k, w
  // MoE layers (an undefined tensor, or none, for a dense layer): the experts to route each token to
  // instead of the router's own choice, weighted from the router's own scores as it would weight them
  // (GPU-vs-CPU tests: a bf16 ulp may flip a near-tie of the two routers, as it may flip a top-k slot).
  const std::vector<Tensor>* forced_experts = nullptr;  // [N, K] i32, indexed by layer
  std::vector<Tensor>* capture_experts = nullptr;       // [N, K] i32 the experts used, indexed by layer
  Tensor* capture_logits = nullptr;                     // [N, V] logits (materialized: small vocabularies)
  Tensor* capture_mtp_logits = nullptr;                 // [N, V] the MTP head's logits
};

// Sums, so micro-batches and ranks reduce exactly; means are formed by the caller.
struct StepStats {
  double lm_loss_sum = 0;
  int64_t lm_tokens = 0;
  double indexer_kl_sum = 0;  // over layers and query rows
  int64_t indexer_rows = 0;   // layers * rows
  double recall_sum = 0;      // over layers and rows
  int64_t recall_rows = 0;
  double balance_loss = 0;
  double mtp_loss_sum = 0;    // MTP cross-entropy over its counted tokens (unweighted)
  int64_t mtp_tokens = 0;
};

class Model {
 public:
  // layout: which routed experts this process holds and whether the trainer owns the tensors' storage
  // (model/params.h); the default holds and allocates everything.
  Model(const ModelConfig& cfg, DType dtype = DType::F32, Device device = Device::CPU, const ParamLayout& layout = {});
  // Tensors the GPU ops read in their master precision (no bf16 compute copy): the MoE router's weight.
  static bool reads_master(const std::string& param_name);

  const ModelConfig& config() const { return cfg_; }
  ParamStore& params() { return params_; }
  const ParamStore& params() const { return params_; }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }

  // One micro-batch of B sequences of T tokens: ids, targets [B*T] i32 (target -1 = ignored).
  // With backward, parameter gradients ACCUMULATE (call params().zero_grads() per optimizer step).
  StepStats step(const Tensor& ids, const Tensor& targets, int64_t B, int64_t T, const StepOptions& opts,
                 bool backward);

  // Tokens routed to each expert in the last step, one [E] f32 tensor per MoE layer (in layer order).
  const std::vector<Tensor>& expert_loads() const { return expert_loads_; }
  // Gradient groups, in the order the backward finishes them: -1 = lm_head and the final norm,
  // l = layer l, -2 = the embedding. The hook (may be empty) is called as each group's gradients
  // become final in a step's backward (without an LM backward: layer l's indexer gradients, after
  // its forward), so data parallelism can start their reduction early.
  static int64_t grad_group(const std::string& param_name);
  void set_grad_ready_hook(std::function<void(int64_t)> hook) { grad_ready_hook_ = std::move(hook); }

  // Auxiliary-loss-free balancing: bias_e += rate * sign(mean_load - load_e), with loads summed over
  // every data-parallel rank by the caller. The bias only steers selection, never the weights. loads
  // are expert_loads() summed: the main MoE layers, then the MTP layer's when it ran. A model with
  // softmax routing has no bias: nothing to update.
  void update_moe_bias(const std::vector<Tensor>& loads, double rate);
  // The MTP layer's tensors (model.layers.{num_hidden_layers}.*): trained only by steps that run it.
  bool is_mtp_param(const std::string& name) const { return dsa::is_mtp_param(cfg_, name); }
  // Expert parallelism (null or size 1: off). Not owned; must outlive the model's steps.
  void set_expert_parallel(ExpertParallel* ep) { ep_ = ep; }
  ExpertParallel* expert_parallel() const { return ep_; }

 private:
  struct LayerCache {
    Tensor x_in;      // [N, D] residual stream entering the layer
    Tensor attn_rstd; // [N]
    Tensor attn_in;   // [N, D] RMSNorm(x_in)
    MlaCache mla;
    IndexerCache indexer;
    Tensor indices;   // [B, T, K] sparse selection (sparse attention only)
    Tensor index_scores;  // [B, T, K] the selected slots' indexer scores (from the top-k; the sparse KL's I)
    Tensor dx_from_indexer;   // [N, D]      indexer loss gradient at attn_in (not detached)
    Tensor dcq_from_indexer;  // [N, q_lora] indexer loss gradient at c_q (not detached)
    Tensor h_mid;     // [N, D] after the attention residual
    Tensor ffn_rstd;  // [N]
    Tensor ffn_in;    // [N, D]
    bool moe = false;
    MlpCache mlp;
    MoeCache moe_cache;
  };
  struct LayerContext {
    const Tensor& positions;
    int64_t B, T;
    const StepOptions& opts;
    bool backward, sparse, need_indexer;
    bool kl_in_backward;  // the sparse indexer loss runs in the layer's backward (target from the attention bwd)
    int64_t topk;
    MlaForm form;
  };
  struct MtpCache {
    Tensor ids, targets;  // [N] i32: t_{i+1} (a valid id where unknown), t_{i+2} (-1: not counted)
    Tensor hn;            // [N, D] the main model's final normed hidden state (hnorm's input)
    Tensor e, e_rstd;     // [N, D] embed(t_{i+1}), [N] enorm's rstd
    Tensor h_rstd;        // [N] hnorm's rstd
    Tensor cat;           // [N, 2D] [enorm(e) | hnorm(hn)]: eh_proj's input
    LayerCache layer;     // the decoder layer at index num_hidden_layers
    Tensor y, y_rstd, yn; // [N, D] layer output, [N] shared_head.norm's rstd, [N, D] its output
  };
  // One layer's forward from its input h_in; fills lc. first_pass = false when recomputing for the
  // backward (the selection in lc.indices is reused; losses and statistics are not counted again).
  Tensor layer_forward(int64_t l, LayerCache& lc, const Tensor& h_in, const LayerContext& x, bool first_pass,
                       StepStats& stats);
  // One layer's backward: dh [N, D] (gradient at its output) becomes the gradient at its input;
  // recomputes the layer first when opts.recompute, runs the sparse KL when ctx.kl_in_backward.
  void layer_backward(int64_t l, LayerCache& lc, Tensor& dh, const LayerContext& ctx, StepStats& stats);
  // MTP (model/mtp.cpp): the forward counts the loss into stats; the backward adds the gradient at hn
  // to dhn and accumulates the MTP layer's, the embedding's and lm_head's parameter gradients.
  void mtp_forward(MtpCache& m, const Tensor& hn, const Tensor& targets, const LayerContext& ctx, StepStats& stats);
  void mtp_backward(MtpCache& m, Tensor& dhn, const LayerContext& ctx, StepStats& stats);
  // Keeps what the backward cannot rebuild when recomputing (the layer input, the selection, the
  // indexer-loss gradients already computed); the rest is recomputed.
  static void slim_for_recompute(LayerCache& lc);
  void ensure_rope(int64_t T);
  void indexer_loss_and_grads(int64_t l, LayerCache& lc, const Tensor& positions, int64_t B, int64_t T,
                              const StepOptions& opts, bool backward, StepStats& stats);

  ModelConfig cfg_;
  DType dtype_;
  Device device_;
  ParamStore params_;
  RopeTables rope_;
  int64_t rope_positions_ = 0;
  std::vector<Tensor> expert_loads_;
  std::function<void(int64_t)> grad_ready_hook_;
  ExpertParallel* ep_ = nullptr;
};

}  // namespace dsa
