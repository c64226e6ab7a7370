// The memory plan: what one rank needs for each stage of a recipe under a parallel layout, predicted
// before any work (a pure function of the model config, the stage, the layout and the capacity).
//
//   parameters   the weights the ops read (bf16 on the GPU, f32 on the CPU), the fp32 master weights
//                (GPU; sharded under ZeRO) and the routing-bias buffers
//   gradients    f32: every tensor held (ZeRO-1 included); ZeRO-2: this rank's shard of the trained
//                buckets plus the two largest buckets' full gradients in flight during the backward
//   optimizer    AdamW m and v (f32) of the trained tensors held, or of this rank's shard
//   activations  the layer caches of one micro-batch (Model::LayerCache: model/mla.h, model/indexer.h,
//                model/ffn.h) at the stage's seq_len, plus the largest transient of the forward, the LM
//                head and one layer's backward; with recompute only each layer's input (and selection)
//                is kept and one layer's cache is rebuilt at a time
//   workspace    the largest kernel workspace not already counted (score blocks, the LM head's logits
//                chunk) and, on the GPU, a fixed reserve of kContextReserve for what lives outside the
//                caching allocator (CUDA context, cuBLASLt workspace, NCCL buffers)
// Every tensor is counted in the layout ZeroState and make_params give it (trainer/zero.h), so the
// parameter, gradient and optimizer rows equal the allocator's counts of a real run.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model/config.h"
#include "trainer/recipe.h"

namespace dsa {

struct ParallelLayout {
  int64_t ranks = 1;  // data-parallel ranks (the world)
  int64_t ep = 1;     // expert-parallel group size
  int64_t zero = 0;   // ZeRO stage
  bool gpu = true;    // bf16 weights and activations, fp32 master (false: the CPU backend, all f32)
};

struct StagePlan {
  std::string stage;
  int64_t tokens = 0;  // per micro-batch on one rank (micro-batch x seq_len)
  int64_t seq_len = 0;
  int64_t parameters = 0, gradients = 0, optimizer = 0;  // bytes per rank
  int64_t gradients_in_flight = 0;    // of gradients: ZeRO-2's full buckets, only during a backward
  int64_t activations = 0;            // without recompute
  int64_t activations_recompute = 0;  // with recompute (= activations when the stage has no LM backward)
  int64_t workspace = 0;
  bool recompute = false;  // the stage's setting
  int64_t state() const { return parameters + gradients + optimizer; }
  int64_t total() const { return state() + (recompute ? activations_recompute : activations) + workspace; }
};

struct MemoryPlan {
  ParallelLayout layout;
  int64_t capacity = 0;       // bytes of one rank's device (0: unknown)
  int64_t params_total = 0;   // the model's parameters
  int64_t params_held = 0;    // held by one rank (expert slices counted as held)
  std::vector<StagePlan> stages;
  bool fits() const;          // every stage's total within the capacity (true when it is unknown)
  int64_t peak() const;       // the largest stage total
  std::string table() const;  // markdown, one column per stage, GiB (MiB below 1 GiB)
};

// The layout a recipe asks for on `ranks` ranks (parallelism.dp 0 = every rank).
ParallelLayout recipe_layout(const Recipe& recipe, int64_t ranks, bool gpu);

// What dsa-train prints before any work: the layout, the table, the verdict and, when a stage does
// not fit, the changes that would make it fit.
std::string memory_report(const ModelConfig& cfg, const std::vector<StageSpec>& stages, const MemoryPlan& plan);

// Reserve for device memory outside the caching allocator (GPU only).
inline constexpr int64_t kContextReserve = int64_t(1) << 30;

// The plan of every stage of `stages` (global_batch split over layout.ranks).
MemoryPlan plan_memory(const ModelConfig& cfg, const std::vector<StageSpec>& stages, const ParallelLayout& layout,
                       int64_t capacity);

// Bytes one rank sends per step of `st` under L (the largest term of each collective, ring algorithms):
// gradients all-reduced (2 (n-1)/n of f32) or reduce-scattered ((n-1)/n), the weights all-gathered under
// ZeRO ((n-1)/n of bf16, f32 on the CPU), and expert parallelism's token rows, there and back in the
// forward and the backward of every MoE layer ((ep-1)/ep of them leave the rank). A model for choosing,
// not a measurement.
int64_t comm_bytes(const ModelConfig& cfg, const StageSpec& st, const ParallelLayout& L);

// Changes of one kind each (recompute, zero, ep, more ranks, a shorter seq_len) under which every stage
// fits, as lines "parallelism.zero=2 (peak 61.2 GiB)"; empty when nothing tried fits.
std::vector<std::string> plan_suggestions(const ModelConfig& cfg, const std::vector<StageSpec>& stages,
                                          const ParallelLayout& layout, int64_t capacity);

// The layout the plan chooses for `ranks` ranks: among the (zero 0, 1, 2) x (ep 1, 2, 4, ... dividing
// the ranks and the experts) under which every stage fits, the one that moves the fewest bytes per step
// (comm_bytes); recompute only when nothing fits without it (*recompute_all says so). False when
// nothing fits.
bool choose_layout(const ModelConfig& cfg, const std::vector<StageSpec>& stages, int64_t ranks, bool gpu,
                   int64_t capacity, ParallelLayout* out, bool* recompute_all);

// Bytes of one rank's memory: the device's total (GPU), or the host's physical memory over the
// node's ranks (CPU). 0 when unknown.
int64_t rank_capacity(bool gpu, int ranks_per_node);

std::string gib(int64_t bytes);  // "12.34 GiB" ("12.34 MiB" below 1 GiB)

// The plan against the allocator's own counts (device caching allocator, or host tensors on the CPU),
// printed by dsa-train: when a stage starts, the bytes allocated (its parameters, gradients and optimizer
// state; every rank prints with DSA_REPORT_RANK_MEMORY=1, else rank 0), then the peak over the stage.
void report_state_memory(const StagePlan& plan, bool gpu);
void report_peak_memory(const StagePlan& plan, bool gpu);

}  // namespace dsa
