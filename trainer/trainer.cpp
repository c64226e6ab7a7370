#include "trainer/trainer.h"

#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "data/loader.h"
#include "kernels/device_memory.h"
#include "kernels/ops.h"
#include "trainer/checkpoint.h"
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
  o.train_main = st.train_main;
  o.train_indexer = st.train_indexer;
  o.balance_alpha = st.train_main ? st.seq_balance_loss_alpha : 0.0;
  o.recompute = st.recompute;
  return o;
}

bool trains(const StageSpec& st, const Param& p) {
  return (p.group == ParamGroup::Main && st.train_main) || (p.group == ParamGroup::Indexer && st.train_indexer);
}

void add_stats(StepStats& a, const StepStats& b) {
  a.lm_loss_sum += b.lm_loss_sum;
  a.lm_tokens += b.lm_tokens;
  a.indexer_kl_sum += b.indexer_kl_sum;
  a.indexer_rows += b.indexer_rows;
  a.recall_sum += b.recall_sum;
  a.recall_rows += b.recall_rows;
  a.balance_loss += b.balance_loss;
}

// Sums over data-parallel ranks, in place.
void allreduce_stats(StepStats& s) {
  double d[4] = {s.lm_loss_sum, s.indexer_kl_sum, s.recall_sum, s.balance_loss};
  int64_t n[3] = {s.lm_tokens, s.indexer_rows, s.recall_rows};
  Dist::allreduce_sum(d, 4);
  Dist::allreduce_sum(n, 3);
  s.lm_loss_sum = d[0];
  s.indexer_kl_sum = d[1];
  s.recall_sum = d[2];
  s.balance_loss = d[3];
  s.lm_tokens = n[0];
  s.indexer_rows = n[1];
  s.recall_rows = n[2];
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
  plan_ = plan_memory(recipe_.model, recipe_.stages, recipe_layout(recipe_, Dist::world(), gpu),
                      rank_capacity(gpu, Dist::local_size()));
  if (Dist::is_root()) std::printf("%s", memory_report(recipe_.model, recipe_.stages, plan_).c_str());
  DSA_CHECK(plan_.fits(), "[memory] the recipe does not fit in ", gib(plan_.capacity),
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

void Trainer::run_stage(int64_t s, int64_t start_step, TrainReport& report) {
  const StageSpec& st = recipe_.stages[s];
  const ModelConfig& cfg = recipe_.model;
  const int world = Dist::world(), rank = Dist::rank();
  const int64_t mb = st.micro_batch(world);
  const int64_t T = st.seq_len;
  DSA_CHECK(!recipe_.data.shards.empty(), "[train] the recipe names no data (data.shards)");

  LoaderConfig lc;
  lc.dir = recipe_.data.shards.front();
  lc.seq_len = T;
  lc.batch_per_rank = mb;
  lc.rank = rank;
  lc.world = world;
  lc.seed = recipe_.seed + static_cast<uint64_t>(s) * 1000003ull;
  lc.keep_documents_contiguous = recipe_.data.keep_documents_contiguous;
  Loader loader(lc);
  loader.check_vocab(cfg.vocab_size);
  if (start_step > 0 && !data_state_.empty()) loader.restore(data_state_);
  std::vector<Batch> val;
  if (st.eval_batches > 0) {
    LoaderConfig vc = lc;
    vc.split = "val";
    val = validation_batches(vc, st.eval_batches);
  }

  const StepOptions so = step_options(st, cfg);
  const double tokens_per_step = static_cast<double>(st.global_batch) * static_cast<double>(T);
  // Gradients of the global-batch means: every rank scales by the global token count, sums follow.
  StepOptions train_opts = so;
  train_opts.lm_grad_scale = 1.0 / tokens_per_step;
  train_opts.indexer_grad_scale =
      st.indexer_loss_coef / (tokens_per_step * static_cast<double>(cfg.num_hidden_layers));
  // The balance loss is a mean over a micro-batch's sequences: weighted by its share of the global batch,
  // the sum over micro-batches and ranks is the global-batch mean (factor 1 on one rank without accumulation).
  train_opts.balance_alpha = so.balance_alpha * static_cast<double>(mb) / static_cast<double>(st.global_batch);

  ParamStore& ps = model_->params();
  std::vector<Param*> trained;
  for (Param& p : ps.all())
    if (trains(st, p)) trained.push_back(&p);
  DSA_CHECK(!trained.empty(), "[train] stage ", st.name, " trains nothing");
  // AdamW state: fresh, or the resumed checkpoint's when this stage continues from it.
  dp_->begin_stage(trained, moments_, start_step > 0 ? resume_path_ : std::string());
  report_state_memory(plan_.stages[s], model_->device() == dsa::Device::CUDA);
  // NOTES: the main model and the indexer are clipped each by its own gradient norm. They are trained by
  // different losses (LM and KL); a shared norm would let the indexer's gradients rescale the main
  // model's step, so L_I would reach the main model through the clip although its inputs are detached.
  std::vector<Param*> trained_main, trained_indexer;
  for (Param* p : trained) (p->group == ParamGroup::Indexer ? trained_indexer : trained_main).push_back(p);

  MetricsLogger logger(recipe_.metrics_path(), Dist::is_root() && recipe_.logging.terminal ? stdout : nullptr);
  const LrSchedule sched = LrSchedule::of(st);
  std::vector<int32_t> inputs, targets;
  const double stage_start = now_s();
  double window_start = now_s();
  int64_t window_steps = 0;
  StepStats window;

  auto evaluate = [&](int64_t step) {
    if (val.empty()) return;
    StepOptions eo = so;
    eo.compute_recall = st.kind != StageKind::dense || st.train_indexer;
    StepStats es;
    for (const Batch& b : val) {
      Tensor ids = Tensor::from_vector(b.inputs, {mb * T});
      Tensor tg = Tensor::from_vector(b.targets, {mb * T});
      add_stats(es, model_->step(ids, tg, mb, T, eo, false));
    }
    allreduce_stats(es);
    MetricRecord r;
    r.stage = st.name;
    r.step = step;
    if (es.lm_tokens) r.val_lm_loss = es.lm_loss_sum / es.lm_tokens;
    if (es.indexer_rows) r.val_indexer_kl = es.indexer_kl_sum / es.indexer_rows;
    if (es.recall_rows) r.recall = es.recall_sum / es.recall_rows;
    if (Dist::is_root()) logger.log_eval(r, st.steps);
  };

  if (start_step == 0 && Dist::is_root())
    std::printf("[train] stage %s (%s): %lld steps x %lld tokens (%d rank%s, micro-batch %lld x %lld, accum %lld)\n",
                st.name.c_str(), to_string(st.kind), static_cast<long long>(st.steps),
                static_cast<long long>(tokens_per_step), world, world > 1 ? "s" : "", static_cast<long long>(mb),
                static_cast<long long>(T), static_cast<long long>(st.grad_accum));
  if (start_step == 0 && st.eval_batches > 0) evaluate(0);

  for (int64_t step = start_step; step < st.steps; ++step) {
    DataParallel::fail_hook(global_step_);
    ps.zero_grads();
    StepStats stats;
    std::vector<Tensor> loads;  // [E] per MoE layer, summed over micro-batches and ranks
    for (int64_t a = 0; a < st.grad_accum; ++a) {
      loader.next(inputs, targets);
      Tensor ids = Tensor::from_vector(inputs, {mb * T});
      Tensor tg = Tensor::from_vector(targets, {mb * T});
      dp_->arm_overlap(trained, a == st.grad_accum - 1);  // reduce each layer's gradients as it finishes
      add_stats(stats, model_->step(ids, tg, mb, T, train_opts, true));
      const std::vector<Tensor>& micro = model_->expert_loads();
      for (size_t i = 0; i < micro.size(); ++i) {
        Tensor host = micro[i].to(dsa::Device::CPU);
        if (loads.size() <= i)
          loads.push_back(host.clone());
        else
          ops::add_(loads[i], host);
      }
    }
    data_state_ = loader.state();
    if (!opts_.dump_grads_dir.empty()) dump_grads(trained, /*reduced=*/false);
    dp_->allreduce_grads(trained);
    if (!opts_.dump_grads_dir.empty()) dump_grads(trained, /*reduced=*/true);
    allreduce_stats(stats);
    for (Tensor& l : loads) allreduce_tensor(l);

    const double gnorm_main = trained_main.empty() ? 0.0 : dp_->grad_norm(trained_main);
    const double gnorm_indexer = trained_indexer.empty() ? 0.0 : dp_->grad_norm(trained_indexer);
    const bool finite = std::isfinite(stats.lm_loss_sum) && std::isfinite(stats.indexer_kl_sum) &&
                        std::isfinite(gnorm_main) && std::isfinite(gnorm_indexer);
    const double gnorm = trained_main.empty() ? gnorm_indexer : gnorm_main;
    const double factor = sched.factor(step);
    if (finite) {
      if (recipe_.optimizer.grad_clip > 0) {
        dp_->clip_grads(trained_main, recipe_.optimizer.grad_clip, gnorm_main);
        dp_->clip_grads(trained_indexer, recipe_.optimizer.grad_clip, gnorm_indexer);
      }
      dp_->adamw_step(trained, moments_, [&](const Param& p) {
        ops::AdamWConfig ac;
        const bool idx = p.group == ParamGroup::Indexer;
        ac.lr = (idx ? st.lr_indexer : st.lr_main) * factor;
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
      std::printf("[train] stage %s step %lld: non-finite loss or gradient (loss %g, kl %g, grad norm %g / indexer %g): %s\n",
                  st.name.c_str(), static_cast<long long>(step + 1), stats.lm_loss_sum, stats.indexer_kl_sum, gnorm_main,
                  gnorm_indexer,
                  recipe_.optimizer.on_nonfinite == OnNonfinite::skip ? "step skipped" : "stopping");
    }
    ++global_step_;
    ++report.steps;
    ++window_steps;
    add_stats(window, stats);

    const int64_t done = step + 1;
    if (!finite && recipe_.optimizer.on_nonfinite == OnNonfinite::stop) {
      report.last_checkpoint = save(st, done, false);
      report.outcome = TrainOutcome::NonFinite;
      return;
    }
    if (done % st.log_interval == 0 || done == st.steps) {
      const double elapsed = now_s() - window_start;
      MetricRecord r;
      r.stage = st.name;
      r.step = done;
      if (window.lm_tokens) r.lm_loss = window.lm_loss_sum / window.lm_tokens;
      if (window.indexer_rows) r.indexer_kl = window.indexer_kl_sum / window.indexer_rows;
      r.grad_norm = gnorm;
      if (!trained_main.empty() && !trained_indexer.empty()) r.indexer_grad_norm = gnorm_indexer;
      r.lr = (st.train_main ? st.lr_main : st.lr_indexer) * factor;
      r.tokens_per_s = elapsed > 0 ? window_steps * tokens_per_step / elapsed : 0;
      const double stage_elapsed = now_s() - stage_start;
      if (Dist::is_root())
        logger.log_train(r, st.steps, stage_elapsed,
                         MetricsLogger::eta_seconds(stage_elapsed, done - start_step, st.steps - start_step));
      window = StepStats{};
      window_steps = 0;
      window_start = now_s();
    }
    if (st.eval_interval > 0 && done % st.eval_interval == 0 && done != st.steps) evaluate(done);

    const bool time_up = opts_.time_limit_s > 0 && now_s() - start_time_ >= opts_.time_limit_s;
    const bool stop = Dist::allreduce_max(stop_requested() ? 1.0 : 0.0) > 0;
    const bool step_limit = opts_.max_steps >= 0 && report.steps >= opts_.max_steps;
    if (done == st.steps) break;
    if (recipe_.checkpoint.every_steps > 0 && done % recipe_.checkpoint.every_steps == 0)
      report.last_checkpoint = save(st, done, false);
    if (time_up || stop || step_limit) {
      if (report.last_checkpoint.empty() || recipe_.checkpoint.every_steps <= 0 ||
          done % recipe_.checkpoint.every_steps != 0)
        report.last_checkpoint = save(st, done, false);
      report.outcome = stop ? TrainOutcome::Interrupted : time_up ? TrainOutcome::TimeLimit : TrainOutcome::StepLimit;
      if (Dist::is_root())
        std::printf("[train] %s at stage %s step %lld: checkpoint %s (continue with --resume)\n",
                    stop ? "interrupted" : time_up ? "time limit reached" : "step limit reached", st.name.c_str(),
                    static_cast<long long>(done), report.last_checkpoint.c_str());
      return;
    }
  }
  if (st.eval_batches > 0) evaluate(st.steps);
  report_peak_memory(plan_.stages[s], model_->device() == dsa::Device::CUDA);
  report.last_checkpoint = save(st, st.steps, true);
  if (Dist::is_root())
    std::printf("[train] stage %s done in %s: %s\n", st.name.c_str(),
                MetricsLogger::format_duration(now_s() - stage_start).c_str(), report.last_checkpoint.c_str());
  // A step limit that lands exactly on a stage end still stops here.
  if (opts_.max_steps >= 0 && report.steps >= opts_.max_steps) report.outcome = TrainOutcome::StepLimit;
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
    moments_.clear();  // AdamW starts fresh in each stage
    data_state_.clear();
  }
  return report;
}

}  // namespace dsa
