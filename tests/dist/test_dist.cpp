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
#include "tests/dist/dist_util.h"
#include "tests/test_util.h"
#include "trainer/checkpoint.h"

namespace fs = std::filesystem;
using namespace dsa;

namespace {

using namespace dsa::dist_testing;
using dsa::testing::same_bits;

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

}  // namespace

TEST(Dist, TwoRankDataParallelEqualsOneRank) {
  const std::string ref = reference();
  const std::string recipe = temp("dp2") + "/recipe.in.yaml";
  dp2();
  const RunResult& r = dp2_run;
  ASSERT_EQ(r.code, 0) << r.log;
  EXPECT_NE(r.log.find("2 ranks"), std::string::npos) << r.log;
  std::string worst;
  const double d = max_rel_update_diff(initial_params(recipe), ref, final_of(recipe), &worst);
  EXPECT_LT(d, kTrajectoryRelTol) << worst;
  // Both ranks wrote the same data position (the loader's global window).
  const TrainState ts = read_train_state(final_of(recipe));
  ASSERT_EQ(ts.rank_data_states.size(), 2u);
  EXPECT_EQ(ts.rank_data_states[0], ts.rank_data_states[1]);
  std::printf("[dist] dp=2 vs 1 rank: max relative difference of the update %.3g (%s), %.1f s\n", d, worst.c_str(), r.seconds);
}

TEST(Dist, ExpertParallelEqualsOneRank) {
  const std::string ref = reference();
  const std::string recipe = write_recipe("ep2", 6);
  RunResult r = run(kMpi + " " + train(recipe, "parallelism.ep=2"), temp("ep2") + "/log.txt");
  ASSERT_EQ(r.code, 0) << r.log;
  EXPECT_NE(r.log.find("expert groups of 2 (2 routed experts per rank)"), std::string::npos) << r.log;
  std::string worst;
  const double d = max_rel_update_diff(initial_params(recipe), ref, final_of(recipe), &worst);
  EXPECT_LT(d, kTrajectoryRelTol) << worst;
  std::printf("[dist] ep=2 vs 1 rank: max relative difference of the update %.3g (%s), %.1f s\n", d, worst.c_str(), r.seconds);
  // The checkpoint holds full expert tensors: it equals the data-parallel run's too, slice by slice.
  Checkpoint c = load_checkpoint(final_of(recipe));
  EXPECT_EQ(c.params["model.layers.1.mlp.experts.gate_up_proj"].size(0), 4);
}

// One step of every stage (dense, indexer warm-up, sparse with the KL in the layer backward), FP8 indexer
// scoring and AdamW's defaults as a user runs them: two ranks, each starting the stage from the one-rank
// run's state at that point, reduce the same gradient sums as one rank, for every trained tensor (the
// cancelling ones included: the indexer LayerNorm bias, whose per-row KL terms sum to zero).
TEST(Dist, TwoRanksReduceEveryStagesGradientsToOneRanksSums) {
  const std::string stages = dsa_stages(2, "fp8", 1e-8);
  const std::string r1 = write_recipe("grad1", 0, "cpu", stages);
  const std::string d1 = temp("grad1");
  const RunResult a = run(train(r1, "--dump-grads " + d1 + "/grads"), d1 + "/log.txt");
  ASSERT_EQ(a.code, 0) << a.log;
  struct StageStep { const char* stage; const char* init; int step; };
  for (const StageStep& ss : {StageStep{"dense", "", 1}, StageStep{"warmup", "dense", 3},
                              StageStep{"sparse", "warmup", 5}}) {
    const std::string name = std::string("grad2_") + ss.stage;
    const std::string r2 = write_recipe(name, 0, "cpu", stages);
    std::string args = std::string("--stage ") + ss.stage + " --max-steps 1 --dump-grads " + temp(name) + "/grads";
    if (*ss.init) args += std::string(" stages.") + ss.stage + ".init_from=" + final_of(r1, ss.init);
    const RunResult b = run(kMpi + " " + train(r2, args), temp(name) + "/log.txt");
    ASSERT_EQ(b.code, 0) << b.log;
    char file[32];
    std::snprintf(file, sizeof file, "/grads/grads-%08d.h5", ss.step);
    Checkpoint g1 = load_checkpoint(d1 + file), g2 = load_checkpoint(temp(name) + file);
    ASSERT_FALSE(g1.extra.empty());
    double worst = 0;
    std::string worst_name;
    for (const auto& [key, x] : g1.extra) {
      ASSERT_TRUE(g2.extra.count(key)) << key;
      const Tensor& y = g2.extra.at(key);
      double num = 0, den = 0;
      for (int64_t i = 0; i < x.numel(); ++i) {
        num += (x.item(i) - y.item(i)) * (x.item(i) - y.item(i));
        den += x.item(i) * x.item(i);
      }
      ASSERT_GT(den, 0) << key << ": a trained tensor without gradient";
      const double rel = std::sqrt(num / den);
      EXPECT_LT(rel, kGradRelTol) << ss.stage << " " << key;
      if (rel > worst) worst = rel, worst_name = key;
    }
    std::printf("[dist] %s step %d: 2 ranks vs 1, largest relative gradient difference %.3g (%.0f u, %s)\n", ss.stage,
                ss.step, worst, worst / std::ldexp(1.0, -24), worst_name.c_str());
  }
}

// Dense, indexer warm-up and sparse stages in a row: two ranks follow one rank's trajectory within the
// first-order bound of kTrajectoryRelTol (bf16 indexer scoring, eps 1e-3: see there).
TEST(Dist, TwoRankTrajectoryThroughTheDsaStagesStaysWithinTheBound) {
  std::string worst, log2;
  const double d = one_vs_two_ranks("dsa", 0, "cpu", dsa_stages(2), {"dense", "warmup", "sparse"}, "", &worst, &log2);
  EXPECT_NE(log2.find("stage sparse done"), std::string::npos) << log2;
  EXPECT_LT(d, kTrajectoryRelTol) << worst;
  std::printf("[dist] dp=2 vs 1 rank through dense, warm-up, sparse: max relative difference of the updates %.3g (%s)\n",
              d, worst.c_str());
}

TEST(Dist, KilledRankEndsTheJob) {
  const std::string recipe = write_recipe("kill", 200);
  RunResult r = run(kMpi + " -x DSA_FAIL_AT_STEP=3 -x DSA_FAIL_RANK=1 " + train(recipe), temp("kill") + "/log.txt",
                    120);
  EXPECT_NE(r.code, 0) << r.log;
  EXPECT_FALSE(r.timed_out) << "the job hung until the harness killed it:\n" << r.log;
  EXPECT_NE(r.log.find("rank 1"), std::string::npos) << r.log;
  std::printf("[dist] SIGKILL on rank 1: job ended in %.1f s with code %d\n", r.seconds, r.code);
}

TEST(Dist, ThrowingRankEndsTheJobWithItsMessage) {
  const std::string recipe = write_recipe("throw", 200);
  RunResult r = run(kMpi + " -x DSA_FAIL_AT_STEP=2 -x DSA_FAIL_RANK=1 -x DSA_FAIL_MODE=throw " + train(recipe),
                    temp("throw") + "/log.txt", 120);
  EXPECT_NE(r.code, 0) << r.log;
  EXPECT_FALSE(r.timed_out) << "the job hung until the harness killed it:\n" << r.log;
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
  const ParamStore init = initial_params(recipe);
  double d = max_rel_update_diff(init, ref, resolve_checkpoint(dir + "/one/dense/final"), &worst);
  EXPECT_LT(d, kTrajectoryRelTol) << worst;
  // The same checkpoint resumes on 2 ranks too.
  RunResult c = run(kMpi + " " + train(recipe, "--resume"), dir + "/log_c.txt");
  ASSERT_EQ(c.code, 0) << c.log;
  d = max_rel_update_diff(init, ref, final_of(recipe), &worst);
  EXPECT_LT(d, kTrajectoryRelTol) << worst;
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
  EXPECT_LT(max_rel_update_diff(initial_params(recipe), ref, final_of(recipe), &worst), kTrajectoryRelTol) << worst;
}
