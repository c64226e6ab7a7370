#include "trainer/trainer.h"

#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "data/doc_stream.h"
#include "data/mixture.h"
#include "kernels/device_memory.h"
#include "kernels/ops.h"
#include "trainer/checkpoint.h"
#include "trainer/data_plan.h"
#include "trainer/data_parallel.h"
#include "trainer/dist.h"
#include "trainer/memory_plan.h"
#include "trainer/metrics.h"
#include "trainer/schedule.h"

namespace fs = std::filesystem;

#ifdef DSA_HAVE_CUDA
#include "kernels/cuda/context.h"
#define DSA_HAVE_CUDA_BUILD 1
#else
#define DSA_HAVE_CUDA_BUILD 0
#endif

namespace dsa {

namespace {

std::atomic<int> g_stop{0};
extern "C" void on_stop_signal(int) { g_stop.store(1); }

double now_s() {
  using namespace std::chrono;
  return duration<double>(steady_clock::now().time_since_epoch()).count();
}

StepOptions step_options(const StageSpec& st, const ModelConfig& cfg) {
  StepOptions o;
  o.attention = st.attention == Attention::sparse ? AttentionMode::Sparse : AttentionMode::Dense;
  o.form = MlaForm::MHA;
  o.topk = st.topk > 0 ? st.topk : cfg.index_topk;
  o.indexer_loss = st.indexer_loss == IndexerLoss::dense    ? IndexerLossMode::Dense
                   : st.indexer_loss == IndexerLoss::sparse ? IndexerLossMode::Sparse
                                                            : IndexerLossMode::None;
  o.detach_indexer_input = st.detach_indexer_input;
  o.fp8_indexer = st.indexer_precision == IndexerPrecision::fp8;
  o.topk_order = st.topk_order == TopkOrder::index ? ops::TopkOrder::kIndex : ops::TopkOrder::kScore;
  o.train_main = st.train_main;
  o.train_indexer = st.train_indexer;
  o.balance_alpha = st.train_main ? st.seq_balance_loss_alpha : 0.0;
  o.balance_per_sequence = st.seq_aux;
  o.mtp_loss_weight = st.mtp_loss_weight;
  o.recompute = st.recompute;
  return o;
}

bool trains(const StageSpec& st, const Param& p, const ModelConfig& cfg) { return stage_trains(st, cfg, p.name, p.group); }

void add_stats(StepStats& a, const StepStats& b) {
  a.lm_loss_sum += b.lm_loss_sum;
  a.lm_tokens += b.lm_tokens;
  a.indexer_kl_sum += b.indexer_kl_sum;
  a.indexer_rows += b.indexer_rows;
  a.recall_sum += b.recall_sum;
  a.recall_rows += b.recall_rows;
  a.balance_loss += b.balance_loss;
  a.mtp_loss_sum += b.mtp_loss_sum;
  a.mtp_tokens += b.mtp_tokens;
}

// Sums over data-parallel ranks, in place.
void allreduce_stats(StepStats& s) {
  double d[5] = {s.lm_loss_sum, s.indexer_kl_sum, s.recall_sum, s.balance_loss, s.mtp_loss_sum};
  int64_t n[4] = {s.lm_tokens, s.indexer_rows, s.recall_rows, s.mtp_tokens};
  Dist::allreduce_sum(d, 5);
  Dist::allreduce_sum(n, 4);
  s.lm_loss_sum = d[0];
  s.indexer_kl_sum = d[1];
  s.recall_sum = d[2];
  s.balance_loss = d[3];
  s.mtp_loss_sum = d[4];
  s.lm_tokens = n[0];
  s.indexer_rows = n[1];
  s.recall_rows = n[2];
  s.mtp_tokens = n[3];
}

void allreduce_tensor(Tensor& t) {
  if (Dist::world() == 1) return;
  if (!t.is_cpu()) {
    // NOTES: device tensors go through host memory here; the NCCL path replaces this on GPUs.
    Tensor host = t.to(dsa::Device::CPU);
    allreduce_tensor(host);
    t.copy_from(host);
    return;
  }
  if (t.dtype() == DType::F32)
    Dist::allreduce_sum(t.data<float>(), t.numel());
  else
    Dist::allreduce_sum(t.data<double>(), t.numel());
}

dsa::Device pick_device(RunDevice d) {
  if (d == RunDevice::cpu) return dsa::Device::CPU;
  const bool have = cuda::available();
  DSA_CHECK(have || d != RunDevice::cuda, "[train] device: cuda, but ",
            DSA_HAVE_CUDA_BUILD ? "no CUDA device is visible" : "this build has no CUDA backend");
  return have ? dsa::Device::CUDA : dsa::Device::CPU;
}

void write_atomically(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::trunc);
    f << text;
    f.flush();
    DSA_CHECK(f.good(), "[trainer] cannot write ", tmp);
  }
  fs::rename(tmp, path);
}

}  // namespace

bool stop_requested() { return g_stop.load() != 0; }

void install_stop_handlers() {
  std::signal(SIGINT, on_stop_signal);
  std::signal(SIGTERM, on_stop_signal);
}

Trainer::Trainer(const Recipe& recipe, const TrainOptions& opts) : recipe_(recipe), opts_(opts) {
  const dsa::Device device = pick_device(recipe_.device);
#ifdef DSA_HAVE_CUDA
  if (device == dsa::Device::CUDA) cuda::set_device(Dist::local_rank());
#endif
  // The memory plan, before anything is allocated: a stage that cannot fit stops here.
  const bool gpu = device == dsa::Device::CUDA;
  memory_plan_ = plan_memory(recipe_.model, recipe_.stages, recipe_layout(recipe_, Dist::world(), gpu),
                             rank_capacity(gpu, Dist::local_size()));
  if (Dist::is_root()) std::printf("%s", memory_report(recipe_.model, recipe_.stages, memory_plan_).c_str());
  if (gpu && Dist::is_root()) {
    const std::string cudnn = ops::attention_cudnn_info().version;
    std::printf("[train] dense attention: %s\n",
                cudnn.empty() ? "own kernels (this build has no cuDNN)"
                : !ops::attention_cudnn_enabled()
                    ? "own kernels (DSA_ATTN_CUDNN=0)"
                    : ("cuDNN " + cudnn + " fused attention (the own kernels where it does not take the shape)").c_str());
  }
  DSA_CHECK(memory_plan_.fits(), "[memory] the recipe does not fit in ", gib(memory_plan_.capacity),
            " per rank (the plan above says which stage and what would fit)");
  model_ = std::make_unique<Model>(recipe_.model, DType::F32, device, DataParallel::param_layout(recipe_, device));
  dp_ = std::make_unique<DataParallel>(recipe_, *model_);
}

Trainer::~Trainer() = default;

void Trainer::init_or_load(int64_t first_stage, int64_t* stage_step) {
  *stage_step = 0;
  const StageSpec& st = recipe_.stages[first_stage];
  std::string from = st.init_from;
  if (from.empty() && !opts_.only_stage.empty() && first_stage > 0)
    from = recipe_.final_checkpoint(recipe_.stages[first_stage - 1].name);
  if (from.empty()) {
    dp_->init_params(recipe_.seed);
    return;
  }
  TrainState ts;
  dp_->load_params(from, &ts);
  global_step_ = ts.step;
  data_state_ = ts.rank_data_states.empty() ? std::string() : ts.rank_data_states.front();  // checked in setup_data
  if (Dist::is_root()) std::printf("[train] stage %s starts from %s (step %lld)\n", st.name.c_str(), from.c_str(),
                                   static_cast<long long>(ts.step));
}

// Test hook (--dump-grads): each rank's own gradient sums before the reduction (DIR/local-<step>-<rank>.h5)
// and, from the root, the sums reduced over the ranks before clipping (DIR/grads-<step>.h5; every rank
// holds the same sums when parallelism.ep is 1), as "grad/<name>" datasets.
void Trainer::dump_grads(const std::vector<Param*>& trained, bool reduced) const {
  DSA_CHECK(dp_->ep() == 1 && dp_->zero() == 0, "[train] --dump-grads needs parallelism.ep 1 and zero 0");
  if (reduced && !Dist::is_root()) return;
  std::map<std::string, Tensor> grads;
  for (const Param* p : trained) grads["grad/" + p->name] = p->grad.to(dsa::Device::CPU);
  TrainState ts;
  ts.step = global_step_ + 1;
  ts.model_config_yaml = recipe_.model.to_yaml();
  char name[48];
  if (reduced)
    std::snprintf(name, sizeof name, "grads-%08lld.h5", static_cast<long long>(ts.step));
  else
    std::snprintf(name, sizeof name, "local-%08lld-%d.h5", static_cast<long long>(ts.step), Dist::rank());
  fs::create_directories(opts_.dump_grads_dir);
  write_checkpoint_file((fs::path(opts_.dump_grads_dir) / name).string(), ts, model_->params(), grads);
}

std::string Trainer::save(const StageSpec& stage, int64_t stage_step, bool stage_final) {
  if (!recipe_.checkpoint.save) return "(none: checkpointing.save is false)";
  TrainState ts;
  ts.step = global_step_;
  ts.stage = stage.name;
  ts.stage_step = stage_step;
  ts.rank_data_states = Dist::allgather(data_state_);
  ts.recipe_yaml = recipe_.resolved_yaml;
  ts.model_config_yaml = recipe_.model.to_yaml();
  ts.rng_seed = recipe_.seed;
  const std::string path =
      dp_->save(recipe_.checkpoint.dir, ts, moments_, static_cast<int>(recipe_.checkpoint.keep_last));
  // The stage's final checkpoint also stays under checkpoint.dir/NAME/final (hard links: no copy),
  // where `--stage NEXT` and ablation recipes' init_from find it.
  if (stage_final && Dist::is_root()) link_checkpoint(path, recipe_.final_checkpoint(stage.name));
  Dist::barrier();
  return path;
}

// One stage in progress.
struct Trainer::StageRun {
  const StageSpec* st = nullptr;
  int64_t index = 0;              // in recipe_.stages
  int64_t start_step = 0;
  int64_t mb = 0, T = 0;          // sequences per micro-batch on this rank, tokens per sequence
  double tokens_per_step = 0;     // global_batch * T
  StepOptions eval_opts, train_opts;
  struct ValSource {
    std::string name;
    double weight = 1;
    std::vector<Batch> batches;   // this rank's share of the source's held-out windows
  };
  std::vector<ValSource> val;
  std::vector<Param*> trained;
  // NOTES: the main model and the indexer are clipped each by its own gradient norm. They are trained by
  // different losses (LM and KL); a shared norm would let the indexer's gradients rescale the main
  // model's step, so L_I would reach the main model through the clip although its inputs are detached.
  std::vector<Param*> trained_main, trained_indexer;
  LrSchedule sched;
  std::unique_ptr<MetricsLogger> logger;
  double stage_start = 0;
  // The current log window: statistics and the time spent in training steps alone.
  StepStats window;
  int64_t window_steps = 0;
  double window_train_s = 0;
};

struct Trainer::StepResult {
  StepStats stats;
  double gnorm = 0;          // the main model's gradient norm, or the indexer's when it alone trains
  double gnorm_indexer = 0;  // the indexer's (0 when it does not train)
  double factor = 0;  // the learning-rate schedule's factor
  bool finite = true;
};

void Trainer::setup_data(StageRun& run) {
  const StageSpec& st = *run.st;
  stream_->check_vocab(recipe_.model.vocab_size);
  if (run.start_step > 0) {
    stream_->restore(data_state_);  // resuming inside the stage: the exact position
  } else {
    const std::string& reads = st.data_stage.empty() ? st.name : st.data_stage;
    const int64_t planned = plan_->start_sequence(st.name);
    const int64_t carried = data_state_.empty() ? -1 : stream_->sequences_in(data_state_);
    stream_->restore(plan_->start_of(st.name));
    if (Dist::is_root() && carried >= 0 && carried != planned)
      std::printf("[train] stage %s reads the planned range of stage %s from sequence %lld of the data stream; the "
                  "checkpoint it starts from stopped at sequence %lld%s\n",
                  st.name.c_str(), reads.c_str(), static_cast<long long>(planned), static_cast<long long>(carried),
                  carried < planned ? " (the windows in between belong to other stages)"
                                    : ": WARNING, its model has already trained on part of these windows");
    else if (Dist::is_root() && !data_state_.empty() && carried < 0)
      std::printf("[train] stage %s: the checkpoint it starts from read another data stream; the stage reads its "
                  "planned range from sequence %lld\n", st.name.c_str(), static_cast<long long>(planned));
  }
  run.val.clear();
  if (st.eval_batches <= 0) return;
  for (const DataSource& src : recipe_.data.sources) {
    StageRun::ValSource v{src.name, src.weight, {}};
    v.batches = validation_batches(src.shards, recipe_.data.keep_documents_contiguous, run.T, run.mb, Dist::rank(),
                                   Dist::world(), st.eval_batches);
    run.val.push_back(std::move(v));
  }
}

void Trainer::setup_optimizer(StageRun& run) {
  const StageSpec& st = *run.st;
  run.trained.clear();
  for (Param& p : model_->params().all())
    if (trains(st, p, recipe_.model)) run.trained.push_back(&p);
  DSA_CHECK(!run.trained.empty(), "[train] stage ", st.name, " trains nothing");
  // AdamW state: fresh, or the resumed checkpoint's when this stage continues from it.
  dp_->begin_stage(run.trained, moments_, run.start_step > 0 ? resume_path_ : std::string());
  report_state_memory(memory_plan_.stages[run.index], model_->device() == dsa::Device::CUDA);
  run.trained_main.clear();
  run.trained_indexer.clear();
  for (Param* p : run.trained) (p->group == ParamGroup::Indexer ? run.trained_indexer : run.trained_main).push_back(p);
  run.sched = LrSchedule::of(st);
}

void Trainer::evaluate(StageRun& run, int64_t step) {
  if (run.val.empty()) return;
  const StageSpec& st = *run.st;
  StepOptions eo = run.eval_opts;
  eo.compute_recall = st.kind != StageKind::dense || st.train_indexer;
  StepStats all;
  MetricRecord r;
  r.stage = st.name;
  r.step = step;
  double weighted = 0, weights = 0;
  for (const StageRun::ValSource& v : run.val) {
    StepStats es;
    for (const Batch& b : v.batches) {
      Tensor ids = Tensor::from_vector(b.inputs, {run.mb * run.T});
      Tensor tg = Tensor::from_vector(b.targets, {run.mb * run.T});
      add_stats(es, model_->step(ids, tg, run.mb, run.T, eo, false));
    }
    allreduce_stats(es);
    add_stats(all, es);
    if (!es.lm_tokens) continue;
    const double loss = es.lm_loss_sum / static_cast<double>(es.lm_tokens);
    weighted += v.weight * loss;
    weights += v.weight;
    if (run.val.size() > 1) r.val_lm_loss_by_source.push_back({v.name, loss});
  }
  // A mixture's validation loss weights its sources as training samples them.
  if (weights > 0) r.val_lm_loss = weighted / weights;
  if (all.indexer_rows) r.val_indexer_kl = all.indexer_kl_sum / static_cast<double>(all.indexer_rows);
  if (all.mtp_tokens) r.val_mtp_loss = all.mtp_loss_sum / static_cast<double>(all.mtp_tokens);
  if (all.recall_rows) r.recall = all.recall_sum / static_cast<double>(all.recall_rows);
  if (Dist::is_root()) run.logger->log_eval(r, st.steps);
}

Trainer::StepResult Trainer::train_step(StageRun& run, int64_t step) {
  const StageSpec& st = *run.st;
  const int world = Dist::world();
  DataParallel::fail_hook(global_step_);
  model_->params().zero_grads();
  StepResult res;
  std::vector<Tensor> loads;  // [E] per MoE layer, summed over micro-batches and ranks
  std::vector<int32_t> inputs, targets;
  for (int64_t a = 0; a < st.grad_accum; ++a) {
    stream_->next(run.T, world * run.mb, Dist::rank() * run.mb, run.mb, inputs, targets);
    if (opts_.on_batch) opts_.on_batch(st.name, step, inputs);
    Tensor ids = Tensor::from_vector(inputs, {run.mb * run.T});
    Tensor tg = Tensor::from_vector(targets, {run.mb * run.T});
    dp_->arm_overlap(run.trained, a == st.grad_accum - 1);  // reduce each layer's gradients as it finishes
    add_stats(res.stats, model_->step(ids, tg, run.mb, run.T, run.train_opts, true));
    const std::vector<Tensor>& micro = model_->expert_loads();
    for (size_t i = 0; i < micro.size(); ++i) {
      Tensor host = micro[i].to(dsa::Device::CPU);
      if (loads.size() <= i)
        loads.push_back(host.clone());
      else
        ops::add_(loads[i], host);
    }
  }
  data_state_ = stream_->state();
  if (!opts_.dump_grads_dir.empty()) dump_grads(run.trained, /*reduced=*/false);
  dp_->allreduce_grads(run.trained);
  if (!opts_.dump_grads_dir.empty()) dump_grads(run.trained, /*reduced=*/true);
  allreduce_stats(res.stats);
  for (Tensor& l : loads) allreduce_tensor(l);

  const double gnorm_main = run.trained_main.empty() ? 0.0 : dp_->grad_norm(run.trained_main);
  res.gnorm_indexer = run.trained_indexer.empty() ? 0.0 : dp_->grad_norm(run.trained_indexer);
  res.gnorm = run.trained_main.empty() ? res.gnorm_indexer : gnorm_main;
  res.finite = std::isfinite(res.stats.lm_loss_sum) && std::isfinite(res.stats.indexer_kl_sum) &&
               std::isfinite(gnorm_main) && std::isfinite(res.gnorm_indexer);
  res.factor = run.sched.factor(step);
  if (res.finite) {
    if (recipe_.optimizer.grad_clip > 0) {
      dp_->clip_grads(run.trained_main, recipe_.optimizer.grad_clip, gnorm_main);
      dp_->clip_grads(run.trained_indexer, recipe_.optimizer.grad_clip, res.gnorm_indexer);
    }
    dp_->adamw_step(run.trained, moments_, [&](const Param& p) {
      ops::AdamWConfig ac;
      const bool idx = p.group == ParamGroup::Indexer;
      ac.lr = (idx ? st.lr_indexer : st.lr_main) * res.factor;
      ac.beta1 = recipe_.optimizer.beta1;
      ac.beta2 = recipe_.optimizer.beta2;
      ac.eps = recipe_.optimizer.eps;
      ac.weight_decay = p.decay ? (idx ? recipe_.optimizer.weight_decay_indexer : recipe_.optimizer.weight_decay) : 0;
      return ac;
    }, step + 1);
    model_->params().refresh_compute();  // bf16 weight copies (GPU) follow the fp32 masters
    if (st.train_main && st.moe_bias_update_rate > 0 && !loads.empty())
      model_->update_moe_bias(loads, st.moe_bias_update_rate);
  } else if (Dist::is_root()) {
    std::printf("[train] stage %s step %lld: non-finite loss or gradient (loss %g, kl %g, grad norm %g / indexer "
                "%g): %s\n", st.name.c_str(), static_cast<long long>(step + 1), res.stats.lm_loss_sum,
                res.stats.indexer_kl_sum, gnorm_main, res.gnorm_indexer,
                recipe_.optimizer.on_nonfinite == OnNonfinite::skip ? "step skipped" : "stopping");
  }
  ++global_step_;
  return res;
}

void Trainer::log_progress(StageRun& run, int64_t done, const StepResult& res) {
  const StageSpec& st = *run.st;
  if (done % st.log_interval != 0 && done != st.steps) return;
  MetricRecord r;
  r.stage = st.name;
  r.step = done;
  if (run.window.lm_tokens) r.lm_loss = run.window.lm_loss_sum / static_cast<double>(run.window.lm_tokens);
  if (run.window.indexer_rows) r.indexer_kl = run.window.indexer_kl_sum / static_cast<double>(run.window.indexer_rows);
  if (run.window.mtp_tokens) r.mtp_loss = run.window.mtp_loss_sum / static_cast<double>(run.window.mtp_tokens);
  r.grad_norm = res.gnorm;
  if (!run.trained_main.empty() && !run.trained_indexer.empty()) r.indexer_grad_norm = res.gnorm_indexer;
  r.lr = (st.train_main ? st.lr_main : st.lr_indexer) * res.factor;
  // NOTES: tok/s counts the training steps' time alone: evaluations and checkpoints in the window are out.
  r.tokens_per_s = run.window_train_s > 0 ? static_cast<double>(run.window_steps) * run.tokens_per_step / run.window_train_s : 0;
  if (model_->device() == dsa::Device::CUDA) r.peak_mem_gb = static_cast<double>(cuda::allocator_stats().peak_in_use) / 1e9;
  const double stage_elapsed = now_s() - run.stage_start;
  r.elapsed_s = stage_elapsed;
  if (Dist::is_root())
    run.logger->log_train(r, st.steps, stage_elapsed,
                          MetricsLogger::eta_seconds(stage_elapsed, done - run.start_step, st.steps - run.start_step));
  run.window = StepStats{};
  run.window_steps = 0;
  run.window_train_s = 0;
}

bool Trainer::checkpoint_or_stop(StageRun& run, int64_t done, TrainReport& report) {
  const StageSpec& st = *run.st;
  const bool time_up = opts_.time_limit_s > 0 && now_s() - start_time_ >= opts_.time_limit_s;
  const bool stop = Dist::allreduce_max(stop_requested() ? 1.0 : 0.0) > 0;
  const bool step_limit = opts_.max_steps >= 0 && report.steps >= opts_.max_steps;
  if (done == st.steps) return false;  // the stage ends normally (finish_stage)
  const int64_t every = recipe_.checkpoint.every_steps;
  if (every > 0 && done % every == 0) report.last_checkpoint = save(st, done, false);
  if (!time_up && !stop && !step_limit) return false;
  if (report.last_checkpoint.empty() || every <= 0 || done % every != 0) report.last_checkpoint = save(st, done, false);
  report.outcome = stop ? TrainOutcome::Interrupted : time_up ? TrainOutcome::TimeLimit : TrainOutcome::StepLimit;
  if (Dist::is_root())
    std::printf("[train] %s at stage %s step %lld: checkpoint %s (continue with --resume)\n",
                stop ? "interrupted" : time_up ? "time limit reached" : "step limit reached", st.name.c_str(),
                static_cast<long long>(done), report.last_checkpoint.c_str());
  return true;
}

void Trainer::finish_stage(StageRun& run, TrainReport& report) {
  const StageSpec& st = *run.st;
  if (st.eval_batches > 0) evaluate(run, st.steps);
  report_peak_memory(memory_plan_.stages[run.index], model_->device() == dsa::Device::CUDA);
  report.last_checkpoint = save(st, st.steps, true);
  if (Dist::is_root())
    std::printf("[train] stage %s done in %s: %s\n", st.name.c_str(),
                MetricsLogger::format_duration(now_s() - run.stage_start).c_str(), report.last_checkpoint.c_str());
  // A step limit that lands exactly on a stage end still stops here.
  if (opts_.max_steps >= 0 && report.steps >= opts_.max_steps) report.outcome = TrainOutcome::StepLimit;
}

void Trainer::run_stage(int64_t s, int64_t start_step, TrainReport& report) {
  StageRun run;
  run.st = &recipe_.stages[s];
  run.index = s;
  const StageSpec& st = *run.st;
  const ModelConfig& cfg = recipe_.model;
  run.start_step = start_step;
  run.mb = st.micro_batch(Dist::world());
  run.T = st.seq_len;
  run.tokens_per_step = static_cast<double>(st.global_batch) * static_cast<double>(run.T);
  run.eval_opts = step_options(st, cfg);
  // Gradients of the global-batch means: every rank scales by the global token count, sums follow.
  run.train_opts = run.eval_opts;
  run.train_opts.lm_grad_scale = 1.0 / run.tokens_per_step;
  // The indexer loss is a mean over the layers that have one in the step (the MTP layer's when it runs).
  const int64_t kl_layers = cfg.num_hidden_layers + (st.mtp_loss_weight > 0 ? cfg.num_nextn_predict_layers : 0);
  run.train_opts.indexer_grad_scale = st.indexer_loss_coef / (run.tokens_per_step * static_cast<double>(kl_layers));
  // The balance loss is a mean over a micro-batch's sequences: weighted by its share of the global batch,
  // the sum over micro-batches and ranks is the global-batch mean (factor 1 on one rank without accumulation).
  run.train_opts.balance_alpha =
      run.eval_opts.balance_alpha * static_cast<double>(run.mb) / static_cast<double>(st.global_batch);
  setup_data(run);
  setup_optimizer(run);
  run.logger = std::make_unique<MetricsLogger>(recipe_.metrics_path(),
                                               Dist::is_root() && recipe_.logging.terminal ? stdout : nullptr);
  if (model_->device() == dsa::Device::CUDA) cuda::reset_peak();
  run.stage_start = now_s();
  if (start_step == 0 && Dist::is_root())
    std::printf("[train] stage %s (%s): %lld steps x %.0f tokens (%d rank%s, micro-batch %lld x %lld, accum %lld)\n",
                st.name.c_str(), to_string(st.kind), static_cast<long long>(st.steps), run.tokens_per_step,
                Dist::world(), Dist::world() > 1 ? "s" : "", static_cast<long long>(run.mb),
                static_cast<long long>(run.T), static_cast<long long>(st.grad_accum));
  if (start_step == 0 && st.eval_batches > 0) evaluate(run, 0);

  for (int64_t step = start_step; step < st.steps; ++step) {
    const double t0 = now_s();
    const StepResult res = train_step(run, step);
    run.window_train_s += now_s() - t0;
    ++report.steps;
    ++run.window_steps;
    add_stats(run.window, res.stats);
    const int64_t done = step + 1;
    if (!res.finite && recipe_.optimizer.on_nonfinite == OnNonfinite::stop) {
      report.last_checkpoint = save(st, done, false);
      report.outcome = TrainOutcome::NonFinite;
      return;
    }
    log_progress(run, done, res);
    if (st.eval_interval > 0 && done % st.eval_interval == 0 && done != st.steps) evaluate(run, done);
    if (checkpoint_or_stop(run, done, report)) return;
  }
  finish_stage(run, report);
}

TrainReport Trainer::run() {
  start_time_ = now_s();
  TrainReport report;
  dp_->check_agreement(recipe_);
  if (Dist::is_root()) {
    fs::create_directories(recipe_.output_dir);
    write_atomically((fs::path(recipe_.output_dir) / "recipe.yaml").string(), recipe_.resolved_yaml);
    std::printf("[train] resolved recipe (%s):\n%s\n", recipe_.source.c_str(), recipe_.resolved_yaml.c_str());
    std::printf("[train] model: %.2fM parameters, %d rank%s, %s\n", model_->params().numel() / 1e6, Dist::world(),
                Dist::world() > 1 ? "s" : "", device_name(model_->device()));
  }
  stream_ = std::make_unique<Mixture>(mixture_config(recipe_));
  plan_ = std::make_unique<DataPlan>(recipe_, *stream_);
  if (Dist::is_root()) {
    std::printf("[train] data stream %s (%zu source%s, seed %llu); %s%s", stream_->stream_id().c_str(),
                recipe_.data.sources.size(), recipe_.data.sources.size() > 1 ? "s" : "",
                static_cast<unsigned long long>(recipe_.seed),
                plan_->origin_note().empty() ? "" : (plan_->origin_note() + "; ").c_str(), "data plan:\n");
    std::printf("%s", plan_->describe().c_str());
  }
  int64_t first = 0, stage_step = 0;
  if (opts_.resume) {
    DSA_CHECK(recipe_.checkpoint.save, "[train] --resume with checkpointing.save: false (the run writes no checkpoint)");
    const std::string path = resolve_checkpoint(recipe_.checkpoint.dir);
    TrainState ts;
    dp_->load_params(path, &ts);
    DSA_CHECK(static_cast<int>(ts.rank_data_states.size()) == Dist::world(), "[train] ", path, " was written by ",
              ts.rank_data_states.size(), " ranks, this job has ", Dist::world(),
              " (reshard it with dsa-convert first)");
    resume_path_ = path;  // run_stage reads this rank's moments from it
    global_step_ = ts.step;
    first = recipe_.stage_index(ts.stage);
    stage_step = ts.stage_step;
    data_state_ = ts.rank_data_states[Dist::rank()];
    if (Dist::is_root())
      std::printf("[train] resuming from %s: stage %s step %lld\n", path.c_str(), ts.stage.c_str(),
                  static_cast<long long>(stage_step));
    if (stage_step >= recipe_.stages[first].steps) {
      ++first;
      stage_step = 0;
    }
    if (!opts_.only_stage.empty()) DSA_CHECK(recipe_.stage_index(opts_.only_stage) == first || first == static_cast<int64_t>(recipe_.stages.size()),
                                             "[train] --resume with --stage ", opts_.only_stage,
                                             ": the checkpoint is in stage ", ts.stage);
  } else {
    first = opts_.only_stage.empty() ? 0 : recipe_.stage_index(opts_.only_stage);
    init_or_load(first, &stage_step);
  }
  const int64_t last = opts_.only_stage.empty() ? static_cast<int64_t>(recipe_.stages.size()) - 1 : first;
  for (int64_t s = first; s <= last && s < static_cast<int64_t>(recipe_.stages.size()); ++s) {
    run_stage(s, s == first ? stage_step : 0, report);
    if (report.outcome != TrainOutcome::Finished) break;
    moments_.clear();  // AdamW starts fresh in each stage; data_state_ carries to the next stage
  }
  return report;
}

}  // namespace dsa
