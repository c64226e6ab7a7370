// The staged trainer: runs a recipe's stages (dense -> indexer warm-up -> sparse, SPEC.md §2) one
// after another, or one alone, with AdamW on fp32 master weights, gradient accumulation, global-norm
// clipping, MoE bias balancing, evaluation, metrics, and checkpoints that resume exactly.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "model/model.h"
#include "trainer/memory_plan.h"
#include "trainer/recipe.h"

namespace dsa {

struct TrainOptions {
  std::string only_stage;   // --stage NAME: run this stage alone
  bool resume = false;      // --resume: continue from the newest checkpoint in checkpoint.dir
  double time_limit_s = 0;  // --time-limit: checkpoint and exit 0 once the run has lasted this long
  int64_t max_steps = -1;   // --max-steps (tests): stop (with a checkpoint) after this many steps in total
  std::string dump_grads_dir;  // --dump-grads (tests): every step's gradients, each rank's own sums and the
                               // reduced ones (before clipping), to DIR (see Trainer::dump_grads)
  // Inspection hook (tests; may be empty): every micro-batch this rank trains on, with its stage and the
  // 0-based step it belongs to, before the step runs.
  std::function<void(const std::string& stage, int64_t step, const std::vector<int32_t>& inputs)> on_batch;
};

enum class TrainOutcome { Finished, Interrupted, TimeLimit, StepLimit, NonFinite };

// What a run ended with (also printed).
struct TrainReport {
  TrainOutcome outcome = TrainOutcome::Finished;
  int64_t steps = 0;           // optimizer steps taken by this process
  std::string last_checkpoint; // file written last ("" if none)
};

class DataParallel;
class DataPlan;
class Mixture;

class Trainer {
 public:
  Trainer(const Recipe& recipe, const TrainOptions& opts);
  ~Trainer();
  TrainReport run();
  Model& model() { return *model_; }

 private:
  // One stage in progress (trainer.cpp): its data, validation sets, trained parameters, schedule, logger
  // and the current log window.
  struct StageRun;
  struct StepResult;
  void init_or_load(int64_t first_stage, int64_t* stage_step);
  void run_stage(int64_t stage_index, int64_t start_step, TrainReport& report);
  // The named steps of a stage.
  void setup_data(StageRun& run);
  void setup_optimizer(StageRun& run);
  void evaluate(StageRun& run, int64_t step);
  StepResult train_step(StageRun& run, int64_t step);
  void log_progress(StageRun& run, int64_t done, const StepResult& res);
  bool checkpoint_or_stop(StageRun& run, int64_t done, TrainReport& report);  // true: leave the stage
  void finish_stage(StageRun& run, TrainReport& report);
  std::string save(const StageSpec& stage, int64_t stage_step, bool stage_final);
  void dump_grads(const std::vector<Param*>& trained, bool reduced) const;

  Recipe recipe_;
  TrainOptions opts_;
  std::unique_ptr<Model> model_;
  std::unique_ptr<DataParallel> dp_;      // ranks, gradient all-reduce, expert parallelism
  std::map<std::string, Tensor> moments_;  // "optim/m/<name>", "optim/v/<name>" (trained groups only; this
                                           // rank's rows; empty under ZeRO, whose shards live in dp_)
  int64_t global_step_ = 0;
  std::unique_ptr<Mixture> stream_;        // the run's data stream (data/mixture.h)
  std::unique_ptr<DataPlan> plan_;         // where each stage reads it (trainer/data_plan.h)
  std::string data_state_;                 // the stream position after the last step (or carried by the
                                           // checkpoint the run started from); the same on every rank
  std::string resume_path_;                // --resume: the checkpoint the first stage continues from
  MemoryPlan memory_plan_;                 // per rank, made before the model
  double start_time_ = 0;
};

// 1 when SIGINT/SIGTERM arrived (the trainer checkpoints at the next step boundary and exits 0).
bool stop_requested();
void install_stop_handlers();

}  // namespace dsa
