// Shared by the distributed tests (tests/dist CPU/MPI, tests/gpu NCCL): a small learnable corpus, a
// tiny MoE recipe, a command runner with a timeout, and checkpoint comparison.
#pragma once

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <limits>
#include <string>
#include <vector>

#include "data/shards.h"
#include "trainer/checkpoint.h"
#include "trainer/recipe.h"

namespace dsa::dist_testing {

namespace fs = std::filesystem;

const std::string kBin = std::string(DSA_BINARY_DIR) + "/bin/";
const std::string kMpi = "mpirun -np 2 --oversubscribe --allow-run-as-root -x OMP_NUM_THREADS=1";

// Per process: ctest runs each test in its own process, several at a time, and they must not share
// (and clean up) each other's folders.
inline std::string temp(const std::string& name) {
  return ::testing::TempDir() + "/dsa_dist_" + std::to_string(::getpid()) + "_" + name;
}

// Documents of a learnable structure: a random start and stride, then tokens that follow
// t[i] = (t[i-1] + stride) mod 96 with an occasional repeat of the token 3 places back, so attention
// has something to find and the LM loss falls well below log(V) in a few dozen steps.
inline std::string make_corpus() {
  static std::string dir;
  if (!dir.empty()) return dir;
  dir = temp("corpus");
  fs::remove_all(dir);
  fs::create_directories(dir);
  std::mt19937 rng(7);
  for (const char* split : {"train", "val"}) {
    ShardWriter w(dir + "/" + split + "_00000.bin", 128, 0, 1);
    const int docs = std::strcmp(split, "train") == 0 ? 120 : 12;
    for (int d = 0; d < docs; ++d) {
      std::vector<int32_t> ids;
      int32_t t = 2 + static_cast<int32_t>(rng() % 96);
      const int32_t stride = 1 + static_cast<int32_t>(rng() % 5);
      const int len = 40 + static_cast<int>(rng() % 80);
      for (int i = 0; i < len; ++i) {
        t = (i >= 3 && rng() % 4 == 0) ? ids[i - 3] : 2 + (t - 2 + stride) % 96;
        ids.push_back(t);
      }
      w.add_document(ids.data(), ids.size());
    }
    w.close();
  }
  return dir;
}

// The three stages in a row: dense, indexer warm-up (dense KL), sparse (top-8 of 32, sparse KL, detached
// indexer inputs): with write_recipe's `stages`, the whole DSA pipeline under data parallelism.
// `precision` is the indexer's scoring (fp8 or bf16, the CPU computing the latter unquantized in f32) and
// `eps` AdamW's epsilon. The one-step gradient test runs the product's defaults (fp8, 1e-8); trajectory
// tests pick bf16 and 1e-3 for the reasons in TrajectoryTolerance below.
inline std::string dsa_stages(int64_t steps_each, const std::string& precision = "bf16", double eps = 1e-3) {
  const std::string n = std::to_string(steps_each);
  char e[32];
  std::snprintf(e, sizeof e, "%.1e", eps);
  return "  - {name: dense, kind: dense, steps: " + n + ", lr_main: 1.0e-2, warmup_steps: 1}\n"
         "  - {name: warmup, kind: indexer_warmup, steps: " + n + ", lr_indexer: 1.0e-2, warmup_steps: 1, "
         "indexer_precision: " + precision + "}\n"
         "  - {name: sparse, kind: sparse, steps: " + n + ", lr_main: 1.0e-2, lr_indexer: 1.0e-2, warmup_steps: 1, "
         "indexer_precision: " + precision + "}\n"
         "optimizer:\n  eps: " + e + "\n";
}

// Tolerances of one rank against N ranks (CPU, f32 master weights and gradients).
//
// One step's gradients: every gradient element is a sum over the step's tokens of per-token terms, each
// computed through a chain of dot products; N ranks sum other subsets in other GEMM shapes (OpenBLAS picks
// kernels, hence summation orders, by shape and OPENBLAS_CORETYPE). Two evaluation orders of an n-term f32
// sum differ by at most 2 γ_n Σ|terms| (γ_n ≈ n u, u = 2^-24); here n = tokens per step (4 x 32) + the
// chain of the backward (2 layers x 4 products of width <= 128, the vocabulary) = 1152, and the tensors'
// terms do not cancel beyond a factor of order one after the f64 column sums (measured: the worst tensor,
// the indexer LayerNorm bias in the sparse stage, differs by 210 u relative to its own norm).
constexpr double kGradRelTol = 2.0 * 1152 * 5.9604644775390625e-08;  // 1.37e-4
//
// A trajectory: AdamW's update lr m/(sqrt(v) + eps) is first-order in the relative gradient difference δ
// once eps dominates sqrt(v) (eps 1e-3 against gradients of 1e-2 .. 1e-7), so after S steps the runs
// differ by at most about S δ relative to the distance the reference travelled; S = 6 steps of a stage
// and δ <= kGradRelTol give 8.2e-4. Two things would break the first-order picture, and the trajectory
// recipes avoid them: eps far below |g| (the first update is lr sign(g), so noise-level gradient components
// move by +-lr whichever way their last bit falls), and FP8 scoring, whose rounding boundaries turn a
// last-bit difference in q or k into a jump of 2^-4 relative in a score (the one-step test covers FP8).
constexpr double kTrajectoryRelTol = 6 * kGradRelTol;  // 8.2e-4

// A two-layer MoE model (4 routed experts, 2 per token), one dense stage of `steps` (or the `stages` YAML
// list given); returns the recipe path.
inline std::string write_recipe(const std::string& name, int64_t steps, const std::string& device = "cpu",
                                const std::string& stages = "") {
  const std::string out = temp(name);
  fs::remove_all(out);
  fs::create_directories(out);
  std::ofstream f(out + "/recipe.in.yaml");
  f << "model:\n"
       "  vocab_size: 128\n  hidden_size: 32\n  num_hidden_layers: 2\n  first_k_dense_replace: 1\n"
       "  num_attention_heads: 2\n  q_lora_rank: 16\n  kv_lora_rank: 16\n  qk_nope_head_dim: 8\n"
       "  qk_rope_head_dim: 4\n  v_head_dim: 8\n  intermediate_size: 48\n  moe_intermediate_size: 16\n"
       "  n_routed_experts: 4\n  num_experts_per_tok: 2\n  n_group: 2\n  topk_group: 1\n  n_shared_experts: 1\n"
       "  max_position_embeddings: 256\n  index_n_heads: 2\n  index_head_dim: 16\n  index_topk: 8\n"
       "  initializer_range: 0.02\n"
       "data:\n  shards: "
    << make_corpus()
    << "\nstage_defaults:\n  seq_len: 32\n  global_batch: 4\n  eval_batches: 2\n  log_interval: 2\n"
       "stages:\n";
  // The default: one dense stage, AdamW eps 1e-3 (see kTrajectoryRelTol).
  if (stages.empty())
    f << "  - {name: dense, kind: dense, steps: " << steps
      << ", lr_main: 1.0e-2, warmup_steps: 2, seq_balance_loss_alpha: 1.0e-2}\n"
         "optimizer:\n  eps: 1.0e-3\n";
  else
    f << stages;
  f << "logging:\n  terminal: true\n"
       "output_dir: "
    << out << "\nseed: 5\ndevice: " << device << "\n";
  return out + "/recipe.in.yaml";
}

struct RunResult {
  int code = -1;
  std::string log;
  double seconds = 0;
  bool timed_out = false;  // the harness ended it: it did not end by itself within timeout_s (a hang)
};

// Runs a shell command under `timeout` (TERM at timeout_s, KILL 10 s later), stdout and stderr into a log.
inline RunResult run(const std::string& cmd, const std::string& log, int timeout_s = 240) {
  const auto t0 = std::chrono::steady_clock::now();
  const std::string full = "OMP_NUM_THREADS=1 timeout -k 10 " + std::to_string(timeout_s) + " sh -c '" + cmd +
                           "' > " + log + " 2>&1";
  const int st = std::system(full.c_str());
  RunResult r;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  r.timed_out = r.code == 124 || r.seconds >= timeout_s;
  std::ifstream f(log);
  std::stringstream ss;
  ss << f.rdbuf();
  r.log = ss.str();
  return r;
}

inline std::string train(const std::string& recipe, const std::string& args = "") {
  return kBin + "dsa-train " + recipe + " " + args;
}

// Largest per-tensor relative L2 difference between two checkpoints' parameters.
inline double max_rel_diff(const std::string& a, const std::string& b, std::string* worst = nullptr) {
  Checkpoint x = load_checkpoint(a), y = load_checkpoint(b);
  double m = 0;
  for (const Param& p : x.params.all()) {
    const Tensor& u = p.value;
    const Tensor& v = y.params[p.name];
    EXPECT_EQ(u.shape(), v.shape()) << p.name;
    double num = 0, den = 0;
    for (int64_t i = 0; i < u.numel(); ++i) {
      const double d = u.item(i) - v.item(i);
      num += d * d;
      den += u.item(i) * u.item(i);
    }
    const double rel = std::sqrt(num) / std::max(std::sqrt(den), 1e-30);
    if (rel > m) {
      m = rel;
      if (worst) *worst = p.name;
    }
  }
  return m;
}

// The parameters a run starts from: the recipe's seeded initialization (what a first stage starts from).
inline ParamStore initial_params(const std::string& recipe) {
  const Recipe r = load_recipe(recipe);
  ParamStore ps = make_params(r.model);
  init_params(ps, r.model, r.seed);
  return ps;
}

// Largest per-tensor ||b - a|| / ||a - start|| over the tensors that moved from `start` to `a` (the
// reference run's stage): the two runs' difference relative to the distance the reference travelled.
// Tensors the stage did not train are skipped (the stage that trained them compared them).
inline double max_rel_update_diff(const ParamStore& start, const std::string& a, const std::string& b,
                                  std::string* worst = nullptr) {
  Checkpoint x = load_checkpoint(a), y = load_checkpoint(b);
  double m = 0;
  for (const Param& p : x.params.all()) {
    const Tensor& s0 = start.get(p.name).value;
    const Tensor& u = p.value;
    const Tensor& v = y.params[p.name];
    EXPECT_EQ(u.shape(), v.shape()) << p.name;
    double num = 0, den = 0;
    for (int64_t i = 0; i < u.numel(); ++i) {
      const double d = u.item(i) - v.item(i), t = u.item(i) - s0.item(i);
      num += d * d;
      den += t * t;
    }
    if (den == 0) continue;
    const double rel = std::sqrt(num / den);
    if (rel > m) {
      m = rel;
      if (worst) *worst = p.name;
    }
  }
  return m;
}

// The final checkpoint of a recipe's stage.
inline std::string final_of(const std::string& recipe, const std::string& stage = "dense") {
  return resolve_checkpoint(fs::path(recipe).parent_path().string() + "/checkpoints/" + stage + "/final");
}

// Trains the same recipe (write_recipe's `stages`, or its dense stage of `steps`) once on one rank and
// once on two (mpirun, `two_args` added to the two-rank dsa-train); returns the largest
// max_rel_update_diff between the two runs' final checkpoints of every stage in `stages_to_compare` (each
// stage measured from the one-rank run's start of it: the seeded initialization, then the previous stage's
// final checkpoint; *worst: "stage: tensor") and the two-rank log in *log2. A failed run fails the test
// and returns infinity.
inline double one_vs_two_ranks(const std::string& name, int64_t steps, const std::string& device,
                               const std::string& stages, const std::vector<std::string>& stages_to_compare,
                               const std::string& two_args, std::string* worst, std::string* log2) {
  const std::string r1 = write_recipe(name + "1", steps, device, stages);
  const std::string r2 = write_recipe(name + "2", steps, device, stages);
  const RunResult a = run(train(r1), temp(name + "1") + "/log.txt");
  EXPECT_EQ(a.code, 0) << a.log;
  const RunResult b = run(kMpi + " " + train(r2, two_args), temp(name + "2") + "/log.txt");
  EXPECT_EQ(b.code, 0) << b.log;
  *log2 = b.log;
  if (a.code != 0 || b.code != 0) return std::numeric_limits<double>::infinity();
  double m = -1;
  ParamStore start = initial_params(r1);
  for (const std::string& stage : stages_to_compare) {
    std::string w;
    const double d = max_rel_update_diff(start, final_of(r1, stage), final_of(r2, stage), &w);
    std::printf("[dist] %s, stage %s: max relative difference of the stage's update %.3g (%s)\n", name.c_str(),
                stage.c_str(), d, w.c_str());
    if (d > m) {
      m = d;
      *worst = stage + ": " + w;
    }
    start = load_checkpoint(final_of(r1, stage)).params;
  }
  return m;
}

}  // namespace dsa::dist_testing
