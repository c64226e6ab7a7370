// The DeepSeek-V3.2 model: embedding, layers of MLA (+ lightning indexer) and a dense SwiGLU or MoE
// feed-forward, final RMSNorm, lm_head and cross-entropy. Forward and backward of one micro-batch.
//
//   layer i:  x += MLA(RMSNorm(x))        indexer reads RMSNorm(x) and MLA's query latent c_q
//             x += FFN_i(RMSNorm(x))      SwiGLU for i < first_k_dense_replace, MoE otherwise
//
// The three training stages are switches of StepOptions (SPEC.md §2):
//   dense:           attention Dense, indexer_loss None,   train_main
//   indexer warm-up: attention Dense, indexer_loss Dense,  train_indexer only (no LM backward at all)
//   sparse:          attention Sparse, indexer_loss Sparse, train_main and train_indexer, detached inputs
#pragma once

#include <functional>
#include <string>
#include <vector>

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
  bool train_main = true;            // LM-loss backward into every non-indexer parameter
  bool train_indexer = false;        // indexer-loss backward into the indexer's parameters
  double lm_grad_scale = 1.0;        // gradient of (lm_grad_scale * sum of token losses)
  double indexer_grad_scale = 1.0;   // gradient of (indexer_grad_scale * sum over layers and rows of KL)
  double balance_alpha = 0.0;        // sequence-wise MoE balance loss weight (0 = off)
  bool recompute = false;            // activation recomputation: keep each layer's input only and
                                     // recompute the layer in the backward (memory for time)
  bool compute_recall = false;       // indexer recall against the dense attention (costs a dense pass)

  // Inspection and testing hooks (null: off).
  const std::vector<Tensor>* forced_indices = nullptr;  // per layer [B, T, K]: sparse sets to use instead
                                                        // of the indexer's own selection
  std::vector<Tensor>* capture_layer_outputs = nullptr; // per layer [N, D]: the residual stream after it
  std::vector<Tensor>* capture_indices = nullptr;       // per layer [B, T, K]: the selection used
  std::vector<IndexerCache>* capture_indexer = nullptr; // per layer: the indexer's q, k, w
  Tensor* capture_logits = nullptr;                     // [N, V] logits (materialized: small vocabularies)
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
  // every data-parallel rank by the caller. The bias only steers selection, never the weights.
  void update_moe_bias(const std::vector<Tensor>& loads, double rate);
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
  // One layer's forward from its input h_in; fills lc. first_pass = false when recomputing for the
  // backward (the selection in lc.indices is reused; losses and statistics are not counted again).
  Tensor layer_forward(int64_t l, LayerCache& lc, const Tensor& h_in, const LayerContext& x, bool first_pass,
                       StepStats& stats);
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
