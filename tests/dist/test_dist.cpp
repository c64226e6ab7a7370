// Data and expert parallelism over MPI on the CPU backend, end to end: dsa-train under
// `mpirun -np 2` against single-process runs of the same recipe (same global batch), a rank killed
// mid-run, ranks that disagree at start, and a 2-rank checkpoint resharded to resume on 1 rank.
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "data/shards.h"
#include "trainer/checkpoint.h"

namespace fs = std::filesystem;
using namespace dsa;

namespace {

const std::string kBin = std::string(DSA_BINARY_DIR) + "/bin/";
const std::string kMpi = "mpirun -np 2 --oversubscribe --allow-run-as-root -x OMP_NUM_THREADS=1";

std::string temp(const std::string& name) { return ::testing::TempDir() + "/dsa_dist_" + name; }

// The learnable synthetic corpus of tests/trainer/test_trainer.cpp.
std::string make_corpus() {
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

// A two-layer MoE model (4 routed experts, 2 per token), one dense stage; returns the recipe path.
std::string write_recipe(const std::string& name, int64_t steps) {
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
       "stages:\n  - {name: dense, kind: dense, steps: "
    << steps
    << ", lr_main: 1.0e-2, warmup_steps: 2, seq_balance_loss_alpha: 1.0e-2}\n"
       "logging:\n  terminal: true\n"
       "output_dir: "
    << out << "\nseed: 5\ndevice: cpu\n";
  return out + "/recipe.in.yaml";
}

struct RunResult {
  int code = -1;
  std::string log;
  double seconds = 0;
};

// Runs a shell command under `timeout`, stdout and stderr into a log.
RunResult run(const std::string& cmd, const std::string& log, int timeout_s = 240) {
  const auto t0 = std::chrono::steady_clock::now();
  const std::string full = "OMP_NUM_THREADS=1 timeout -s KILL " + std::to_string(timeout_s) + " sh -c '" + cmd +
                           "' > " + log + " 2>&1";
  const int st = std::system(full.c_str());
  RunResult r;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  std::ifstream f(log);
  std::stringstream ss;
  ss << f.rdbuf();
  r.log = ss.str();
  return r;
}

std::string train(const std::string& recipe, const std::string& args = "") {
  return kBin + "dsa-train " + recipe + " " + args;
}

// Largest per-tensor relative L2 difference between two checkpoints' parameters.
double max_rel_diff(const std::string& a, const std::string& b, std::string* worst = nullptr) {
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

std::string final_of(const std::string& recipe) {
  return resolve_checkpoint(fs::path(recipe).parent_path().string() + "/checkpoints/dense/final");
}

// The single-process reference: 6 steps of the global batch.
const std::string& reference() {
  static std::string path;
  if (!path.empty()) return path;
  const std::string recipe = write_recipe("ref", 6);
  RunResult r = run(train(recipe), temp("ref") + "/log.txt");
  EXPECT_EQ(r.code, 0) << r.log;
  path = final_of(recipe);
  return path;
}

// The plain 2-rank data-parallel run of 6 steps.
RunResult dp2_run;
const std::string& dp2() {
  static std::string path;
  if (!path.empty()) return path;
  const std::string recipe = write_recipe("dp2", 6);
  dp2_run = run(kMpi + " " + train(recipe), temp("dp2") + "/log.txt");
  EXPECT_EQ(dp2_run.code, 0) << dp2_run.log;
  path = final_of(recipe);
  return path;
}

bool same_bits(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

}  // namespace

TEST(Dist, TwoRankDataParallelEqualsOneRank) {
  const std::string ref = reference();
  const std::string recipe = temp("dp2") + "/recipe.in.yaml";
  dp2();
  const RunResult& r = dp2_run;
  ASSERT_EQ(r.code, 0) << r.log;
  EXPECT_NE(r.log.find("2 ranks"), std::string::npos) << r.log;
  std::string worst;
  const double d = max_rel_diff(ref, final_of(recipe), &worst);
  EXPECT_LT(d, 1e-5) << worst;
  // Both ranks wrote the same data position (the loader's global window).
  const TrainState ts = read_train_state(final_of(recipe));
  ASSERT_EQ(ts.rank_data_states.size(), 2u);
  EXPECT_EQ(ts.rank_data_states[0], ts.rank_data_states[1]);
  std::printf("[dist] dp=2 vs 1 rank: max relative difference %.3g (%s), %.1f s\n", d, worst.c_str(), r.seconds);
}

TEST(Dist, ExpertParallelEqualsOneRank) {
  const std::string ref = reference();
  const std::string recipe = write_recipe("ep2", 6);
  RunResult r = run(kMpi + " " + train(recipe, "parallelism.ep=2"), temp("ep2") + "/log.txt");
  ASSERT_EQ(r.code, 0) << r.log;
  EXPECT_NE(r.log.find("expert groups of 2 (2 routed experts per rank)"), std::string::npos) << r.log;
  std::string worst;
  const double d = max_rel_diff(ref, final_of(recipe), &worst);
  EXPECT_LT(d, 1e-5) << worst;
  std::printf("[dist] ep=2 vs 1 rank: max relative difference %.3g (%s), %.1f s\n", d, worst.c_str(), r.seconds);
  // The checkpoint holds full expert tensors: it equals the data-parallel run's too, slice by slice.
  Checkpoint c = load_checkpoint(final_of(recipe));
  EXPECT_EQ(c.params["model.layers.1.mlp.experts.gate_up_proj"].size(0), 4);
}

TEST(Dist, KilledRankEndsTheJob) {
  const std::string recipe = write_recipe("kill", 200);
  RunResult r = run(kMpi + " -x DSA_FAIL_AT_STEP=3 -x DSA_FAIL_RANK=1 " + train(recipe), temp("kill") + "/log.txt",
                    120);
  EXPECT_NE(r.code, 0) << r.log;
  EXPECT_LT(r.seconds, 60) << r.log;
  EXPECT_NE(r.log.find("rank 1"), std::string::npos) << r.log;
  std::printf("[dist] SIGKILL on rank 1: job ended in %.1f s with code %d\n", r.seconds, r.code);
}

TEST(Dist, ThrowingRankEndsTheJobWithItsMessage) {
  const std::string recipe = write_recipe("throw", 200);
  RunResult r = run(kMpi + " -x DSA_FAIL_AT_STEP=2 -x DSA_FAIL_RANK=1 -x DSA_FAIL_MODE=throw " + train(recipe),
                    temp("throw") + "/log.txt", 120);
  EXPECT_NE(r.code, 0) << r.log;
  EXPECT_LT(r.seconds, 60) << r.log;
  EXPECT_NE(r.log.find("[rank 1/2] fatal: [train] injected failure before step 3"), std::string::npos) << r.log;
  std::printf("[dist] exception on rank 1: job ended in %.1f s with code %d\n", r.seconds, r.code);
}

TEST(Dist, DisagreeingRanksAreCaughtAtStart) {
  const std::string recipe = write_recipe("disagree", 200);
  RunResult r = run(kMpi + " -x DSA_TEST_RANK_OVERRIDE=1:stages.0.lr_main=0.5 " + train(recipe),
                    temp("disagree") + "/log.txt", 120);
  EXPECT_NE(r.code, 0) << r.log;
  EXPECT_NE(r.log.find("ranks disagree at start: the resolved recipe (model included) of rank 1 differs"),
            std::string::npos)
      << r.log;
  EXPECT_EQ(r.log.find("dense step"), std::string::npos) << "no step may run: " << r.log;
}

TEST(Dist, TwoRankCheckpointResumesOnTwoRanksAndReshardedOnOne) {
  const std::string ref = reference();
  // 2 ranks stop after 3 steps with a checkpoint ...
  const std::string recipe = write_recipe("reshard", 6);
  const std::string dir = fs::path(recipe).parent_path().string();
  RunResult a = run(kMpi + " " + train(recipe, "--max-steps 3"), dir + "/log_a.txt");
  ASSERT_EQ(a.code, 0) << a.log;
  const std::string ckpt = resolve_checkpoint(dir + "/checkpoints");
  EXPECT_EQ(read_train_state(ckpt).rank_data_states.size(), 2u);
  // ... a 1-rank job refuses it as it is ...
  RunResult refuse = run(train(recipe, "--resume"), dir + "/log_refuse.txt");
  EXPECT_NE(refuse.code, 0);
  EXPECT_NE(refuse.log.find("reshard it with dsa-convert"), std::string::npos) << refuse.log;
  // ... and global_batch 4 does not split over 3 ranks.
  RunResult bad = run(kBin + "dsa-convert reshard " + ckpt + " " + dir + "/r3 --ranks 3", dir + "/log_r3.txt");
  EXPECT_NE(bad.code, 0);
  EXPECT_NE(bad.log.find("does not split into dp 3 ranks"), std::string::npos) << bad.log;
  // Resharded to 1 rank, the resumed run ends where the uninterrupted single-process one does.
  RunResult rs = run(kBin + "dsa-convert reshard " + ckpt + " " + dir + "/one --ranks 1", dir + "/log_r1.txt");
  ASSERT_EQ(rs.code, 0) << rs.log;
  EXPECT_EQ(read_train_state(dir + "/one").rank_data_states.size(), 1u);
  RunResult b = run(train(recipe, "checkpointing.dir=" + dir + "/one --resume"), dir + "/log_b.txt");
  ASSERT_EQ(b.code, 0) << b.log;
  std::string worst;
  double d = max_rel_diff(ref, resolve_checkpoint(dir + "/one/dense/final"), &worst);
  EXPECT_LT(d, 1e-5) << worst;
  // The same checkpoint resumes on 2 ranks too.
  RunResult c = run(kMpi + " " + train(recipe, "--resume"), dir + "/log_c.txt");
  ASSERT_EQ(c.code, 0) << c.log;
  d = max_rel_diff(ref, final_of(recipe), &worst);
  EXPECT_LT(d, 1e-5) << worst;
}

TEST(Dist, ZeroOneEqualsFullMomentsBitForBitAcrossResume) {
  const std::string full = dp2();
  const std::string recipe = write_recipe("zero1", 6);
  const std::string dir = fs::path(recipe).parent_path().string();
  RunResult a = run(kMpi + " " + train(recipe, "parallelism.zero1=true --max-steps 3"), dir + "/log_a.txt");
  ASSERT_EQ(a.code, 0) << a.log;
  EXPECT_NE(a.log.find("ZeRO-1 optimizer shards"), std::string::npos) << a.log;
  RunResult b = run(kMpi + " " + train(recipe, "parallelism.zero1=true --resume"), dir + "/log_b.txt");
  ASSERT_EQ(b.code, 0) << b.log;
  Checkpoint x = load_checkpoint(full), y = load_checkpoint(final_of(recipe));
  for (const Param& p : x.params.all()) EXPECT_TRUE(same_bits(p.value, y.params[p.name])) << p.name;
  ASSERT_EQ(x.extra.size(), y.extra.size());
  size_t moments = 0;
  for (const auto& [k, t] : x.extra) {
    ASSERT_TRUE(y.extra.count(k)) << k;
    EXPECT_TRUE(same_bits(t, y.extra.at(k))) << k;
    moments += k.rfind("optim/", 0) == 0;
  }
  size_t main = 0;
  for (const Param& p : x.params.all()) main += p.group == ParamGroup::Main;
  EXPECT_EQ(moments, 2 * main) << "m and v of every tensor the dense stage trains";
}

TEST(Dist, ZeroOneWithExpertParallelEqualsOneRank) {
  const std::string ref = reference();
  const std::string recipe = write_recipe("zero1_ep", 6);
  RunResult r = run(kMpi + " " + train(recipe, "parallelism.zero1=true parallelism.ep=2"), temp("zero1_ep") + "/log.txt");
  ASSERT_EQ(r.code, 0) << r.log;
  std::string worst;
  EXPECT_LT(max_rel_diff(ref, final_of(recipe), &worst), 1e-5) << worst;
}
