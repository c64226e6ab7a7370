// Sharded state over MPI on the CPU backend, end to end (dsa-train under mpirun -np 2 and -np 4):
// ZeRO-1, ZeRO-2 and expert parallelism against one rank through the three DSA stages, ZeRO's exact
// cases, the per-rank bytes against the memory plan, sharded checkpoints resumed on other rank counts
// and layouts and read by the tools, and a rank killed during a sharded save.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <regex>
#include <set>

#include "model/safetensors.h"
#include "tests/dist/dist_util.h"
#include "tests/test_util.h"
#include "trainer/checkpoint.h"
#include "trainer/checkpoint_sharded.h"

namespace fs = std::filesystem;
using namespace dsa;
using dsa::testing::same_bits;
using namespace dsa::dist_testing;

namespace {

std::string mpi(int n) {
  return "mpirun -np " + std::to_string(n) + " --oversubscribe --allow-run-as-root -x OMP_NUM_THREADS=1";
}

std::string dir_of(const std::string& recipe) { return fs::path(recipe).parent_path().string(); }


// Every parameter and every moment of two checkpoints equal bit for bit; *what names the first that is not.
bool bitwise_equal(const std::string& a, const std::string& b, std::string* what) {
  Checkpoint x = load_checkpoint(a), y = load_checkpoint(b);
  for (const Param& p : x.params.all())
    if (!same_bits(p.value, y.params[p.name])) return *what = p.name, false;
  if (x.extra.size() != y.extra.size()) return *what = "the number of optimizer tensors", false;
  for (const auto& [k, t] : x.extra)
    if (!y.extra.count(k) || !same_bits(t, y.extra.at(k))) return *what = k, false;
  return true;
}

// The one-rank reference through the three stages (dsa_stages: bf16 scoring, AdamW eps 1e-3: the
// trajectory recipe of kTrajectoryRelTol).
std::string reference_dsa(const std::string& name) {
  const std::string r = write_recipe(name, 0, "cpu", dsa_stages(2));
  const RunResult a = run(train(r), dir_of(r) + "/log.txt");
  EXPECT_EQ(a.code, 0) << a.log;
  return r;
}

// `ranks` ranks with `args` follow the one-rank trajectory through the three stages within
// kTrajectoryRelTol (tests/dist/dist_util.h: the first-order bound of AdamW's update in the relative
// gradient difference, itself bounded by the summation order of n = 1152 terms: sums over other token
// subsets, other GEMM shapes and, with expert parallelism, one GEMM over the expert's rows of every
// rank instead of per-rank sums). Each stage is measured from the reference's start of it.
void follows_one_rank(const std::string& name, int ranks, const std::string& args) {
  const std::string r1 = reference_dsa(name + "_ref");
  const std::string rn = write_recipe(name, 0, "cpu", dsa_stages(2));
  const RunResult b = run(mpi(ranks) + " " + train(rn, args), dir_of(rn) + "/log.txt");
  ASSERT_EQ(b.code, 0) << b.log;
  EXPECT_NE(b.log.find("stage sparse done"), std::string::npos) << b.log;
  ParamStore start = initial_params(r1);
  for (const char* stage : {"dense", "warmup", "sparse"}) {
    std::string worst;
    const double d = max_rel_update_diff(start, final_of(r1, stage), final_of(rn, stage), &worst);
    EXPECT_LT(d, kTrajectoryRelTol) << stage << ": " << worst;
    std::printf("[dist sharded] %s (%d ranks, %s), stage %s: max relative difference of the update %.3g (%s)\n",
                name.c_str(), ranks, args.c_str(), stage, d, worst.c_str());
    start = load_checkpoint(final_of(r1, stage)).params;
  }
}

}  // namespace

// ZeRO on one rank is plain training in other storage: the same arithmetic on the same shapes (every
// tensor's gradient norm and AdamW update element by element, the weights views of one flat buffer),
// so every stage ends bit for bit where ZeRO off does, moments included.
TEST(DistSharded, ZeroOnOneRankEqualsZeroOffBitForBit) {
  const std::string r0 = reference_dsa("z_off");
  for (int zero : {1, 2}) {
    const std::string rz = write_recipe("z_on" + std::to_string(zero), 0, "cpu", dsa_stages(2));
    const RunResult b = run(train(rz, "parallelism.zero=" + std::to_string(zero)), dir_of(rz) + "/log.txt");
    ASSERT_EQ(b.code, 0) << b.log;
    EXPECT_TRUE(is_sharded_checkpoint(final_of(rz, "sparse"))) << final_of(rz, "sparse");
    for (const char* stage : {"dense", "warmup", "sparse"}) {
      std::string what;
      EXPECT_TRUE(bitwise_equal(final_of(r0, stage), final_of(rz, stage), &what))
          << "zero " << zero << ", stage " << stage << ": " << what;
    }
  }
}

// ZeRO-1 all-reduces whole gradients as plain data parallelism does and two ranks sum a + b in either
// order to the same float: every stage's parameters and moments equal bit for bit.
TEST(DistSharded, ZeroOneEqualsDataParallelBitForBitThroughTheDsaStages) {
  const std::string rp = write_recipe("dp2_plain", 0, "cpu", dsa_stages(2));
  const std::string rz = write_recipe("dp2_zero1", 0, "cpu", dsa_stages(2));
  const RunResult a = run(mpi(2) + " " + train(rp), dir_of(rp) + "/log.txt");
  ASSERT_EQ(a.code, 0) << a.log;
  const RunResult b = run(mpi(2) + " " + train(rz, "parallelism.zero=1"), dir_of(rz) + "/log.txt");
  ASSERT_EQ(b.code, 0) << b.log;
  EXPECT_NE(b.log.find("ZeRO-1 optimizer shards"), std::string::npos) << b.log;
  for (const char* stage : {"dense", "warmup", "sparse"}) {
    std::string what;
    EXPECT_TRUE(bitwise_equal(final_of(rp, stage), final_of(rz, stage), &what)) << stage << ": " << what;
  }
}

// parallelism.overlap: false only moves ZeRO-2's reduce-scatters (and the replicated tensors'
// all-reduces) from the backward's layer hooks to the end of each micro-batch: each bucket is still
// reduced once from the same data by the same call, so every stage ends bit for bit where the
// overlapped run does (with gradient accumulation: the shards are added in the same order).
TEST(DistSharded, ZeroTwoWithoutOverlapIsTheSameReductionsBitForBit) {
  const std::string ro = write_recipe("z2_overlap", 0, "cpu", dsa_stages(2));
  const std::string rn = write_recipe("z2_no_overlap", 0, "cpu", dsa_stages(2));
  const std::string args = "parallelism.zero=2 stage_defaults.grad_accum=2";
  const RunResult a = run(mpi(2) + " " + train(ro, args), dir_of(ro) + "/log.txt");
  ASSERT_EQ(a.code, 0) << a.log;
  const RunResult b = run(mpi(2) + " " + train(rn, args + " parallelism.overlap=false"), dir_of(rn) + "/log.txt");
  ASSERT_EQ(b.code, 0) << b.log;
  for (const char* stage : {"dense", "warmup", "sparse"}) {
    std::string what;
    EXPECT_TRUE(bitwise_equal(final_of(ro, stage), final_of(rn, stage), &what)) << stage << ": " << what;
  }
}

TEST(DistSharded, ZeroOneOnTwoRanksFollowsOneRank) { follows_one_rank("zero1_2", 2, "parallelism.zero=1"); }
TEST(DistSharded, ZeroTwoOnTwoRanksFollowsOneRank) { follows_one_rank("zero2_2", 2, "parallelism.zero=2"); }
TEST(DistSharded, ExpertParallelTwoFollowsOneRank) { follows_one_rank("ep2", 2, "parallelism.ep=2"); }
// ZeRO-2 with gradient accumulation reduces every micro-batch and adds the shards.
TEST(DistSharded, ZeroTwoWithGradientAccumulationFollowsOneRank) {
  follows_one_rank("zero2_accum", 2, "parallelism.zero=2 stage_defaults.grad_accum=2");
}
TEST(DistSharded, ExpertParallelTwoTimesDataParallelTwoWithZeroTwoFollowsOneRank) {
  follows_one_rank("ep2_dp2", 4, "parallelism.ep=2 parallelism.zero=2");
}

// Every rank's parameters, gradients and moments as the allocator counts them when the first stage
// starts equal the plan's figures (the plan counts the same tensors), and shrink as designed.
TEST(DistSharded, PerRankStateEqualsThePlanAndShrinks) {
  struct Layout {
    int ranks;
    std::string args;
  };
  const std::vector<Layout> layouts = {{1, ""},
                                       {2, "parallelism.zero=1"},
                                       {2, "parallelism.zero=2"},
                                       {4, "parallelism.zero=2"},
                                       {2, "parallelism.ep=2"},
                                       {4, "parallelism.ep=2 parallelism.zero=2"}};
  const std::regex line(R"(\[memory\] rank (\d+) stage dense: state allocated (\d+) bytes, plan (\d+) )");
  std::vector<long long> largest;
  for (size_t i = 0; i < layouts.size(); ++i) {
    const Layout& L = layouts[i];
    const std::string r = write_recipe("mem" + std::to_string(i), 2);
    const std::string args = L.args + " --max-steps 1";
    const std::string cmd = L.ranks > 1 ? mpi(L.ranks) + " -x DSA_REPORT_RANK_MEMORY=1 " + train(r, args)
                                        : "DSA_REPORT_RANK_MEMORY=1 " + train(r, args);
    const RunResult res = run(cmd, dir_of(r) + "/log.txt");
    ASSERT_EQ(res.code, 0) << res.log;
    std::set<int> ranks;
    long long most = 0;
    for (std::sregex_iterator it(res.log.begin(), res.log.end(), line), end; it != end; ++it) {
      const long long measured = std::stoll((*it)[2]), planned = std::stoll((*it)[3]);
      EXPECT_EQ(measured, planned) << L.ranks << " ranks, " << L.args << ", rank " << (*it)[1];
      ranks.insert(std::stoi((*it)[1]));
      most = std::max(most, measured);
    }
    EXPECT_EQ(static_cast<int>(ranks.size()), L.ranks) << res.log;
    largest.push_back(most);
    std::printf("[dist sharded] %d rank(s) %s: largest rank's state %lld bytes\n", L.ranks, L.args.c_str(), most);
  }
  EXPECT_LT(largest[1], largest[0]) << "ZeRO-1 shards the moments";
  EXPECT_LT(largest[2], largest[1]) << "ZeRO-2 shards the gradients too";
  EXPECT_LT(largest[3], largest[2]) << "4 ranks hold less than 2";
  EXPECT_LT(largest[4], largest[0]) << "expert parallelism holds half the experts";
  EXPECT_LT(largest[5], largest[3]) << "expert parallelism on top of ZeRO-2";
}

// A sharded checkpoint of 4 ranks (ZeRO-2 x expert parallelism 2) is read by dsa-inspect and
// dsa-convert export, resumes on 2 ranks with another layout and on 1 rank after dsa-convert reshard,
// and both resumed runs end within the trajectory bound of an uninterrupted one-rank run.
TEST(DistSharded, FourRankCheckpointResumesOnTwoAndOneRanks) {
  const std::string ref = write_recipe("ck_ref", 6);
  const RunResult a = run(train(ref), dir_of(ref) + "/log.txt");
  ASSERT_EQ(a.code, 0) << a.log;
  const std::string r4 = write_recipe("ck4", 6);
  const std::string dir = dir_of(r4);
  const RunResult w = run(mpi(4) + " " + train(r4, "parallelism.ep=2 parallelism.zero=2 --max-steps 3"), dir + "/log_4.txt");
  ASSERT_EQ(w.code, 0) << w.log;
  const std::string ckpt = resolve_checkpoint(dir + "/checkpoints");
  ASSERT_TRUE(is_sharded_checkpoint(ckpt)) << ckpt;
  CheckpointSource src(ckpt);
  EXPECT_EQ(src.files(), 4);
  EXPECT_EQ(src.state().rank_data_states.size(), 4u);
  EXPECT_EQ(src.shape("params/model.layers.1.mlp.experts.gate_up_proj"), (Shape{4, 32, 32}));

  // The tools read it whole.
  const RunResult ins = run(kBin + "dsa-inspect " + ckpt, dir + "/log_inspect.txt");
  ASSERT_EQ(ins.code, 0) << ins.log;
  EXPECT_NE(ins.log.find("sharded: 4 files"), std::string::npos) << ins.log;
  EXPECT_NE(ins.log.find("[4, 32, 32]"), std::string::npos) << ins.log;
  const RunResult ex = run(kBin + "dsa-convert export " + ckpt + " " + dir + "/hf --dtype f32", dir + "/log_export.txt");
  ASSERT_EQ(ex.code, 0) << ex.log;
  Checkpoint whole = load_checkpoint(ckpt);
  SafetensorsSet hf(dir + "/hf");
  for (const char* name : {"model.layers.1.mlp.experts.gate_up_proj", "model.layers.0.self_attn.q_a_proj.weight",
                           "model.embed_tokens.weight"}) {
    ASSERT_TRUE(hf.has(name)) << name;
    EXPECT_TRUE(same_bits(hf.read(name), whole.params[name])) << name;
  }

  // 2 ranks, another layout, after dsa-convert reshard (the data positions of 2 ranks; shards linked).
  const RunResult rs2 = run(kBin + "dsa-convert reshard " + ckpt + " " + dir + "/two --ranks 2", dir + "/log_r2.txt");
  ASSERT_EQ(rs2.code, 0) << rs2.log;
  EXPECT_TRUE(is_sharded_checkpoint(resolve_checkpoint(dir + "/two"))) << rs2.log;
  EXPECT_EQ(read_train_state(dir + "/two").rank_data_states.size(), 2u);
  const RunResult b = run(mpi(2) + " " + train(r4, "checkpointing.dir=" + dir + "/two parallelism.zero=1 --resume"),
                          dir + "/log_2.txt");
  ASSERT_EQ(b.code, 0) << b.log;
  const ParamStore start = initial_params(ref);
  std::string worst;
  double d = max_rel_update_diff(start, final_of(ref), resolve_checkpoint(dir + "/two/dense/final"), &worst);
  EXPECT_LT(d, kTrajectoryRelTol) << worst;
  std::printf("[dist sharded] 4-rank checkpoint resumed on 2 ranks: max relative difference of the update %.3g (%s)\n",
              d, worst.c_str());

  // 1 rank, ZeRO and expert parallelism off.
  const RunResult rs1 = run(kBin + "dsa-convert reshard " + ckpt + " " + dir + "/one --ranks 1", dir + "/log_r1.txt");
  ASSERT_EQ(rs1.code, 0) << rs1.log;
  const RunResult c = run(train(r4, "checkpointing.dir=" + dir + "/one --resume"), dir + "/log_1.txt");
  ASSERT_EQ(c.code, 0) << c.log;
  d = max_rel_update_diff(start, final_of(ref), resolve_checkpoint(dir + "/one/dense/final"), &worst);
  EXPECT_LT(d, kTrajectoryRelTol) << worst;
  std::printf("[dist sharded] 4-rank checkpoint resumed on 1 rank: max relative difference of the update %.3g (%s)\n", d,
              worst.c_str());
}

// A rank killed while the ranks write their shards of step 2 ends the job; the checkpoint of step 1
// stays the latest and loads whole, and resuming from it ends bit for bit where an uninterrupted run of
// the same layout does.
TEST(DistSharded, RankKilledDuringAShardedSaveLeavesThePreviousCheckpointWhole) {
  const std::string layout = "parallelism.zero=2 parallelism.ep=2 checkpointing.every_steps=1";
  const std::string full = write_recipe("save_full", 4);
  const RunResult f = run(mpi(2) + " " + train(full, layout), dir_of(full) + "/log.txt");
  ASSERT_EQ(f.code, 0) << f.log;
  const std::string r = write_recipe("save_kill", 4);
  const std::string dir = dir_of(r);
  const RunResult k = run(mpi(2) + " -x DSA_FAIL_IN_SAVE=2 -x DSA_FAIL_RANK=1 " + train(r, layout), dir + "/log_kill.txt", 120);
  EXPECT_NE(k.code, 0) << k.log;
  EXPECT_NE(k.log.find("injected SIGKILL during the sharded save of step 2"), std::string::npos) << k.log;
  const std::string latest = resolve_checkpoint(dir + "/checkpoints");
  EXPECT_EQ(fs::path(latest).filename().string(), "ckpt-00000001");
  EXPECT_TRUE(fs::exists(dir + "/checkpoints/ckpt-00000002.tmp")) << "the interrupted save's leftovers";
  EXPECT_FALSE(fs::exists(dir + "/checkpoints/ckpt-00000002"));
  Checkpoint c = load_checkpoint(latest);
  EXPECT_EQ(c.state.step, 1);
  size_t moments = 0;
  for (const auto& kv : c.extra) moments += kv.first.rfind("optim/", 0) == 0;
  size_t main = 0;
  for (const Param& p : c.params.all()) main += p.group == ParamGroup::Main;
  EXPECT_EQ(moments, 2 * main) << "m and v of every tensor the dense stage trains";
  const RunResult res = run(mpi(2) + " " + train(r, layout + " --resume"), dir + "/log_resume.txt");
  ASSERT_EQ(res.code, 0) << res.log;
  EXPECT_FALSE(fs::exists(dir + "/checkpoints/ckpt-00000002.tmp")) << "the next save removes them";
  std::string what;
  EXPECT_TRUE(bitwise_equal(final_of(full), final_of(r), &what)) << what;
}
