// The memory plan (trainer/memory_plan.h) against hand-computed figures and against the host
// allocator's own counts of the tensors make_params and ZeroState allocate for every layout; the
// recipe keys of parallelism; dsa-train --dry-run and the refusal of a run that cannot fit.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "model/model.h"
#include "trainer/memory_plan.h"
#include "trainer/recipe.h"
#include "trainer/replica_comm.h"
#include "trainer/zero.h"

using namespace dsa;

namespace {

// The two-layer MoE model of the distributed tests (tests/dist/dist_util.h).
const char* kTinyModel =
    "model:\n"
    "  vocab_size: 128\n  hidden_size: 32\n  num_hidden_layers: 2\n  first_k_dense_replace: 1\n"
    "  num_attention_heads: 2\n  q_lora_rank: 16\n  kv_lora_rank: 16\n  qk_nope_head_dim: 8\n"
    "  qk_rope_head_dim: 4\n  v_head_dim: 8\n  intermediate_size: 48\n  moe_intermediate_size: 16\n"
    "  n_routed_experts: 4\n  num_experts_per_tok: 2\n  n_group: 2\n  topk_group: 1\n  n_shared_experts: 1\n"
    "  max_position_embeddings: 256\n  index_n_heads: 2\n  index_head_dim: 16\n  index_topk: 8\n";

Recipe tiny_recipe(const std::string& extra = "", const std::vector<std::string>& overrides = {}) {
  const std::string text = std::string(kTinyModel) +
                           "data:\n  shards: /nonexistent\n"
                           "stage_defaults:\n  seq_len: 32\n  global_batch: 4\n"
                           "stages:\n"
                           "  - {name: dense, kind: dense, steps: 2}\n"
                           "  - {name: warmup, kind: indexer_warmup, steps: 2}\n"
                           "  - {name: sparse, kind: sparse, steps: 2}\n"
                           "output_dir: /tmp/unused\n" +
                           extra;
  return parse_recipe(text, "tiny.yaml", overrides);
}

// A replica set seen from one member, without communication: what ZeroState's layout needs.
class LocalComm : public ReplicaComm {
 public:
  LocalComm(int size, int rank) : size_(size), rank_(rank) {}
  int size() const override { return size_; }
  int rank() const override { return rank_; }
  void allreduce(Tensor&) override {}
  void reduce_scatter(const Tensor&, Tensor&) override {}
  void allgather(Tensor&) override {}
  int64_t mark() override { return 0; }
  void wait_for(int64_t) override {}

 private:
  int size_, rank_;
};

bool trains(const StageSpec& st, const Param& p, const ModelConfig& cfg) { return stage_trains(st, cfg, p.name, p.group); }

// Host bytes one rank of `L` allocates for its parameters, gradients and moments in stage `st`, as the
// trainer allocates them (Model with DataParallel::param_layout's layout, ZeroState, the moments map).
int64_t measured_state(const Recipe& r, const StageSpec& st, const ParallelLayout& L, int rank) {
  const size_t before = host_memory_stats().in_use;
  ParamLayout pl;
  if (L.ep > 1) {
    const int64_t El = r.model.n_routed_experts / L.ep;
    pl.expert_begin = El * (rank % L.ep);
    pl.expert_end = pl.expert_begin + El;
  }
  pl.external_storage = L.zero > 0;
  int64_t bytes = 0;
  {
    Model m(r.model, DType::F32, Device::CPU, pl);
    std::vector<Param*> trained;
    for (Param& p : m.params().all())
      if (trains(st, p, r.model)) trained.push_back(&p);
    LocalComm all(static_cast<int>(L.ranks), rank);
    LocalComm experts(static_cast<int>(L.ranks / L.ep), rank / static_cast<int>(L.ep));
    std::map<std::string, Tensor> moments;
    std::unique_ptr<ZeroState> z;
    if (L.zero > 0) {
      z = std::make_unique<ZeroState>(static_cast<int>(L.zero), m.params(), Device::CPU, all, L.ep > 1 ? &experts : nullptr);
      z->begin_stage(trained, nullptr);
    } else {
      for (Param* p : trained)
        for (const char* k : {"optim/m/", "optim/v/"}) moments[k + p->name] = Tensor::zeros(p->shape, DType::F32);
    }
    bytes = static_cast<int64_t>(host_memory_stats().in_use - before);
  }
  return bytes;
}

}  // namespace

// Hand count of the tiny model (dims in kTinyModel):
//   embedding and lm_head 128 x 32 = 4096 each, final norm 32
//   per layer: 2 norms 64; q_a 16x32 = 512; q_a_norm 16; q_b (2x12)x16 = 384; kv_a (16+4)x32 = 640;
//              kv_a_norm 16; kv_b (2x16)x16 = 512; o 32x16 = 512                       -> 2656
//              indexer: wq_b 32x16 = 512; wk 16x32 = 512; k_norm 16 + 16; weights 2x32 = 64 -> 1120
//   layer 0 MLP 3 x 48 x 32 = 4608; layer 1 MoE: router 4x32 = 128, experts 4x32x32 + 4x32x16 = 6144,
//   shared 3 x 16 x 32 = 1536 -> 7808, plus the routing bias (buffer) 4
//   total 8224 + 2 x 3776 + 4608 + 7808 = 28192 trained + 4 buffer; indexer 2240, main 25952.
TEST(MemoryPlan, HandCountOfTheTinyModel) {
  const Recipe r = tiny_recipe();
  const MemoryPlan p = plan_memory(r.model, r.stages, ParallelLayout{1, 1, 0, false}, 0);
  EXPECT_EQ(p.params_total, 28196);
  ASSERT_EQ(p.stages.size(), 3u);
  // CPU, ZeRO off: f32 values (buffer included), f32 gradients of every trained-able tensor, m and v
  // of the stage's trained ones.
  EXPECT_EQ(p.stages[0].parameters, 4 * 28196);
  EXPECT_EQ(p.stages[0].gradients, 4 * 28192);
  EXPECT_EQ(p.stages[0].optimizer, 8 * 25952);  // dense: main only
  EXPECT_EQ(p.stages[1].optimizer, 8 * 2240);   // warm-up: the indexer only
  EXPECT_EQ(p.stages[2].optimizer, 8 * 28192);  // sparse: both
  // GPU, ZeRO off: each tensor rounded to 512 B by the caching allocator (all are below 1 MiB here):
  // f32 value + bf16 copy (none for the router, read in f32) + f32 gradient.
  const MemoryPlan g = plan_memory(r.model, r.stages, ParallelLayout{1, 1, 0, true}, 0);
  int64_t want = 0;
  for (const ParamSpec& s : param_specs(r.model)) {
    const int64_t n = shape_numel(s.shape);
    auto r512 = [](int64_t b) { return (b + 511) / 512 * 512; };
    want += r512(4 * n) + (s.group != ParamGroup::Buffer && !Model::reads_master(s.name) ? r512(2 * n) : 0);
  }
  EXPECT_EQ(g.stages[0].parameters, want);
}

// The plan's parameter, gradient and optimizer rows equal what the host allocator counts for the same
// layout: make_params with the rank's expert slice, ZeroState's flat buckets (its shards of them), the
// moments. Exact by construction (both count the same tensors), for every rank of every layout.
TEST(MemoryPlan, StateRowsEqualTheAllocatorsCounts) {
  const Recipe r = tiny_recipe();
  for (int64_t zero : {0, 1, 2})
    for (int64_t ranks : {1, 2, 4})
      for (int64_t ep : {1, 2}) {
        if (ranks % ep) continue;
        const ParallelLayout L{ranks, ep, zero, false};
        const MemoryPlan plan = plan_memory(r.model, r.stages, L, 0);
        for (size_t s = 0; s < r.stages.size(); ++s)
          for (int rank = 0; rank < ranks; ++rank) {
            const StagePlan& sp = plan.stages[s];
            EXPECT_EQ(measured_state(r, r.stages[s], L, rank), sp.state() - sp.gradients_in_flight)
                << "zero " << zero << " ranks " << ranks << " ep " << ep << " stage " << sp.stage << " rank " << rank;
          }
      }
}

// The DeepSeek families' tensors (SPEC.md §1b): the MTP layer (trained only when its loss runs), a direct
// query projection without a query LoRA, softmax routing without a correction bias.
TEST(MemoryPlan, StateRowsEqualTheAllocatorsCountsForTheFamilies) {
  const std::vector<std::vector<std::string>> families = {
      {"model.num_nextn_predict_layers=1"},
      {"model.num_nextn_predict_layers=1", "stages.sparse.mtp_loss_weight=0.3"},
      {"model.q_lora_rank=null"},
      {"model.scoring_func=softmax", "model.topk_method=greedy", "model.norm_topk_prob=false", "model.n_group=1",
       "model.topk_group=1", "stage_defaults.moe_bias_update_rate=0"}};
  for (const std::vector<std::string>& ov : families) {
    const Recipe r = tiny_recipe("", ov);
    for (int64_t zero : {0, 2}) {
      const ParallelLayout L{2, 1, zero, false};
      const MemoryPlan plan = plan_memory(r.model, r.stages, L, 0);
      for (size_t s = 0; s < r.stages.size(); ++s) {
        const StagePlan& sp = plan.stages[s];
        EXPECT_EQ(measured_state(r, r.stages[s], L, 0), sp.state() - sp.gradients_in_flight)
            << ov.front() << " zero " << zero << " stage " << sp.stage;
      }
    }
  }
}

// Per-rank state shrinks as designed: ZeRO-1 divides the moments by the ranks, ZeRO-2 the gradients too
// (both up to the buckets' alignment padding: at most kAlign elements per tensor and per rank), expert
// parallelism divides the experts' tensors.
TEST(MemoryPlan, StateShrinksWithRanksAsDesigned) {
  const Recipe r = tiny_recipe();
  const StageSpec& dense = r.stages[0];
  auto plan = [&](int64_t ranks, int64_t ep, int64_t zero) {
    return plan_memory(r.model, {dense}, ParallelLayout{ranks, ep, zero, false}, 0).stages[0];
  };
  const StagePlan one = plan(1, 1, 0);
  const int64_t tensors = static_cast<int64_t>(param_specs(r.model).size());
  const int64_t pad = 4 * ZeroState::kAlign * (tensors + 4);  // one f32 row of padding per tensor and per rank
  for (int64_t n : {2, 4}) {
    const StagePlan z1 = plan(n, 1, 1), z2 = plan(n, 1, 2);
    EXPECT_LE(z1.optimizer, one.optimizer / n + 2 * pad) << n;
    EXPECT_GE(z1.gradients, one.gradients) << "ZeRO-1 keeps whole gradients (in padded buckets)";
    EXPECT_LE(z1.gradients, one.gradients + n * pad);
    EXPECT_LE(z2.gradients - z2.gradients_in_flight, one.gradients / n + pad) << n;
    EXPECT_LE(z2.optimizer, one.optimizer / n + 2 * pad) << n;
  }
  // ep = 2: a rank holds 2 of the 4 experts (6144 -> 3072 elements of weights, gradients, moments).
  const StagePlan ep2 = plan(2, 2, 0);
  EXPECT_EQ(one.parameters - ep2.parameters, 4 * 3072);
  EXPECT_EQ(one.gradients - ep2.gradients, 4 * 3072);
  EXPECT_EQ(one.optimizer - ep2.optimizer, 8 * 3072);
}

TEST(MemoryPlan, SuggestionsAndChosenLayoutFit) {
  const Recipe r = tiny_recipe();
  const ParallelLayout plain{4, 1, 0, false};
  const MemoryPlan p = plan_memory(r.model, r.stages, plain, 0);
  const int64_t need = p.peak();
  // A capacity just below the plain layout's peak: something sharded must fit, and the chosen layout
  // moves the fewest bytes per step of all the layouts that fit (recompute off while one fits).
  const int64_t cap = need - 1;
  EXPECT_FALSE(plan_memory(r.model, r.stages, plain, cap).fits());
  ParallelLayout L;
  bool rc = true;
  ASSERT_TRUE(choose_layout(r.model, r.stages, 4, false, cap, &L, &rc));
  EXPECT_FALSE(rc);
  EXPECT_TRUE(plan_memory(r.model, r.stages, L, cap).fits());
  auto bytes = [&](const ParallelLayout& x) {
    int64_t b = 0;
    for (const StageSpec& st : r.stages) b = std::max(b, comm_bytes(r.model, st, x));
    return b;
  };
  int fitting = 0;
  for (int64_t zero : {0, 1, 2})
    for (int64_t ep : {1, 2, 4}) {
      const ParallelLayout x{4, ep, zero, false};
      if (!plan_memory(r.model, r.stages, x, cap).fits()) continue;
      ++fitting;
      EXPECT_LE(bytes(L), bytes(x)) << "zero " << zero << " ep " << ep;
    }
  EXPECT_GE(fitting, 2);
  // Expert parallelism sends token rows instead of all-reducing the experts' gradients; ZeRO-2's
  // reduce-scatter and bf16 all-gather send less than the f32 all-reduce.
  EXPECT_LT(bytes({4, 1, 2, true}), bytes({4, 1, 0, true}));
  const std::vector<std::string> s = plan_suggestions(r.model, r.stages, plain, cap);
  ASSERT_FALSE(s.empty());
  bool zero2 = false;
  for (const std::string& line : s) zero2 = zero2 || line.rfind("parallelism.zero=2", 0) == 0;
  EXPECT_TRUE(zero2) << s.front();
  // Nothing fits in 1 KiB.
  EXPECT_FALSE(choose_layout(r.model, r.stages, 4, false, 1024, &L, &rc));
}

// Activations: more tokens cost more, recompute keeps less, and the warm-up (no LM backward) keeps no
// layer's cache after its forward.
TEST(MemoryPlan, ActivationsFollowTheStage) {
  const Recipe r = tiny_recipe();
  const MemoryPlan p = plan_memory(r.model, r.stages, ParallelLayout{1, 1, 0, true}, 0);
  const StagePlan &dense = p.stages[0], &warm = p.stages[1], &sparse = p.stages[2];
  EXPECT_LT(dense.activations_recompute, dense.activations);
  EXPECT_LT(sparse.activations_recompute, sparse.activations);
  EXPECT_EQ(warm.activations_recompute, warm.activations);
  EXPECT_LT(warm.activations, dense.activations);
  Recipe longer = tiny_recipe("", {"stage_defaults.seq_len=64"});
  const MemoryPlan q = plan_memory(longer.model, longer.stages, ParallelLayout{1, 1, 0, true}, 0);
  EXPECT_GT(q.stages[0].activations, dense.activations);
}

// The CPU backend's peak during one training step of the tiny model against the plan's activation
// figure (f32 activations): the plan models the GPU kernels' caches and temporaries, which the CPU
// kernels share for the layer caches (the same tensors) but not for their temporaries, so this is a
// bound on the shape of the model, not on the arithmetic: within a factor of two either way.
TEST(MemoryPlan, ActivationsBoundTheCpuStep) {
  const Recipe r = tiny_recipe();
  Model m(r.model, DType::F32, Device::CPU);
  init_params(m.params(), r.model, 3);
  const int64_t B = 4, T = 32;
  std::vector<int32_t> ids(B * T), tg(B * T);
  for (int64_t i = 0; i < B * T; ++i) ids[i] = static_cast<int32_t>((i * 7) % 120 + 2), tg[i] = ids[(i + 1) % (B * T)];
  StepOptions o;
  o.train_main = true;
  const Tensor ti = Tensor::from_vector(ids, {B * T}), tt = Tensor::from_vector(tg, {B * T});
  m.step(ti, tt, B, T, o, true);  // rope tables and first-use allocations out of the way
  m.params().zero_grads();
  const size_t base = host_memory_stats().in_use;
  reset_host_peak();
  m.step(ti, tt, B, T, o, true);
  const int64_t measured = static_cast<int64_t>(host_memory_stats().peak_in_use - base);
  const MemoryPlan p = plan_memory(r.model, {r.stages[0]}, ParallelLayout{1, 1, 0, false}, 0);
  const int64_t planned = p.stages[0].activations + p.stages[0].workspace;
  std::printf("[memory plan] tiny model, CPU dense step: measured %lld bytes, plan %lld (%+.1f%%)\n",
              static_cast<long long>(measured), static_cast<long long>(planned),
              100.0 * (static_cast<double>(planned) - static_cast<double>(measured)) / static_cast<double>(measured));
  EXPECT_GT(planned, measured / 2);
  EXPECT_LT(planned, measured * 2);
}

TEST(ParallelismKeys, ZeroStagesAndTheirChecks) {
  EXPECT_EQ(tiny_recipe("parallelism:\n  zero: 2\n").parallel.zero, 2);
  EXPECT_EQ(tiny_recipe("parallelism:\n  zero1: true\n").parallel.zero, 1);
  EXPECT_EQ(tiny_recipe("", {"parallelism.zero1=true"}).parallel.zero, 1);
  auto error = [](const std::string& extra) {
    try {
      tiny_recipe(extra);
    } catch (const std::exception& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(error("parallelism:\n  zero: 3\n").find("key 'parallelism.zero': must be 0 (off), 1"), std::string::npos);
  EXPECT_NE(error("parallelism:\n  zero: 2\n  zero1: true\n").find("key 'parallelism.zero1': true contradicts parallelism.zero = 2"),
            std::string::npos);
  EXPECT_NE(error("parallelism:\n  ep: 3\n").find("key 'parallelism.ep': 3 does not divide n_routed_experts = 4"),
            std::string::npos);
  EXPECT_NE(error("parallelism:\n  dp: 2\n  ep: 4\n").find("4 does not divide parallelism.dp = 2"), std::string::npos);
  // The resolved recipe writes zero and reads back to the same layout.
  const Recipe z = tiny_recipe("parallelism:\n  zero: 2\n  ep: 2\n");
  const Recipe back = parse_recipe(z.resolved_yaml, "resolved");
  EXPECT_EQ(back.parallel.zero, 2);
  EXPECT_EQ(back.parallel.ep, 2);
}

namespace {
std::string run_capture(const std::string& cmd, int* code) {
  const std::string log = ::testing::TempDir() + "/dsa_plan_" + std::to_string(::getpid()) + ".log";
  const int st = std::system((cmd + " > " + log + " 2>&1").c_str());
  *code = WIFEXITED(st) ? WEXITSTATUS(st) : 128;
  std::ifstream f(log);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::string write_tiny(const std::string& name, const std::string& extra) {
  const std::string path = ::testing::TempDir() + "/dsa_plan_" + std::to_string(::getpid()) + "_" + name + ".yaml";
  std::ofstream f(path);
  f << kTinyModel
    << "data:\n  shards: /nonexistent/corpus\nstage_defaults:\n  seq_len: 32\n  global_batch: 4\nstages:\n"
       "  - {name: dense, kind: dense, steps: 2}\noutput_dir: "
    << ::testing::TempDir() << "/dsa_plan_out\ndevice: cpu\n"
    << extra;
  return path;
}
}  // namespace

TEST(DryRun, PrintsThePlanAndRefusesWhatCannotFit) {
  const std::string bin = std::string(DSA_BINARY_DIR) + "/bin/dsa-train ";
  const std::string recipe = write_tiny("dry", "");
  int code = -1;
  std::string out = run_capture(bin + recipe + " --dry-run --ranks 4 --device-memory 1GB --choose-layout", &code);
  EXPECT_EQ(code, 0) << out;
  EXPECT_NE(out.find("| parameters |"), std::string::npos) << out;
  EXPECT_NE(out.find("4 CPU ranks, ep 1, zero 0"), std::string::npos) << out;
  EXPECT_NE(out.find("[memory] fits"), std::string::npos) << out;
  EXPECT_NE(out.find("the plan's layout for 4 ranks: parallelism.dp=4 parallelism.ep="), std::string::npos) << out;
  // A capacity between the sharded (ZeRO-2) and the plain layout's peaks on 4 ranks.
  const Recipe r = load_recipe(recipe);
  const int64_t plain = plan_memory(r.model, r.stages, ParallelLayout{4, 1, 0, false}, 0).peak();
  const int64_t sharded = plan_memory(r.model, r.stages, ParallelLayout{4, 1, 2, false}, 0).peak();
  ASSERT_LT(sharded, plain);
  out = run_capture(bin + recipe + " --dry-run --ranks 4 --device-memory " + std::to_string((plain + sharded) / 2), &code);
  EXPECT_EQ(code, 1) << out;
  EXPECT_NE(out.find("[memory] stage dense does not fit"), std::string::npos) << out;
  EXPECT_NE(out.find("[memory] would fit with"), std::string::npos) << out;
}

// A run whose model cannot fit stops at start, before any tensor or data: the data directory does not
// exist, and the message is the plan's, not the loader's.
TEST(DryRun, TrainingStopsBeforeAllocatingWhenAStageCannotFit) {
  const std::string bin = std::string(DSA_BINARY_DIR) + "/bin/dsa-train ";
  // 2^20 x 8192 embedding and head: 17.2e9 parameters, 275 GB of f32 values and gradients.
  const std::string recipe = write_tiny("huge", "");
  int code = -1;
  const std::string out = run_capture(
      bin + recipe + " model.vocab_size=1048576 model.hidden_size=8192 model.num_attention_heads=64", &code);
  EXPECT_NE(code, 0) << out;
  EXPECT_NE(out.find("[memory] stage dense does not fit"), std::string::npos) << out;
  EXPECT_NE(out.find("the recipe does not fit"), std::string::npos) << out;
  EXPECT_EQ(out.find("/nonexistent/corpus"), std::string::npos) << "no data may be read: " << out;
}
