// Memory one rank needs to train a model with this project, counted from what the code allocates
// (printed by `dsa-bench memory`; docs/converting.md quotes it):
//   master weights   f32, every tensor at full size on every rank (expert parallelism routes tokens to
//                    the rank owning an expert, but the expert tensors stay full-sized: model/ffn.h)
//   compute copies   bf16 copies of every trained tensor (GPU mixed precision; none on the CPU)
//   gradients        f32, every non-buffer tensor (allocated whether or not the stage trains it)
//   optimizer        AdamW m and v, f32, for the tensors the stage trains (all but the indexer in the
//                    dense stage, everything in the sparse stage: the sparse stage is the largest); ZeRO-1
//                    (CPU only) shards them over the ranks
//   activations      what one micro-batch's forward keeps for the backward (model.h's LayerCache and
//                    MlaCache/IndexerCache/MoeCache), bf16 on the GPU and f32 on the CPU; with recompute,
//                    one layer's cache plus every layer's input
// Not counted: the CUDA workspace and allocator slack, NCCL buffers, the chunked LM-head logits
// (at most ~64 MiB), the data loader.
#pragma once

#include <cstdint>

#include "model/config.h"

namespace dsa {

struct MemoryLayout {
  bool gpu = true;          // bf16 activations and compute copies (else f32 activations, no copies)
  int64_t ranks = 1;        // data-parallel ranks (every rank)
  bool zero1 = false;       // AdamW moments sharded over the ranks (CPU backend only)
  int64_t ep = 1;           // expert-parallel group size
  int64_t seq_len = 4096;   // tokens per sequence
  int64_t micro_batch = 1;  // sequences per micro-batch per rank
  bool recompute = false;   // activation recomputation
  bool mtp = false;         // the MTP layer runs (mtp_loss_weight > 0)
};

struct MemoryPlan {
  int64_t params = 0;         // all tensors (indexer and MTP layer included)
  int64_t expert_params = 0;  // routed experts' share of params
  double weights_bytes = 0;   // f32 master weights
  double compute_bytes = 0;   // bf16 copies
  double grads_bytes = 0;
  double optimizer_bytes = 0;
  double activation_bytes = 0;
  double total_bytes() const {
    return weights_bytes + compute_bytes + grads_bytes + optimizer_bytes + activation_bytes;
  }
};

// Activation elements one token keeps in layer `layer` (its whole cache).
int64_t activation_elements_per_token(const ModelConfig& cfg, int64_t layer, bool sparse_topk_slots);

MemoryPlan memory_plan(const ModelConfig& cfg, const MemoryLayout& layout);

}  // namespace dsa
