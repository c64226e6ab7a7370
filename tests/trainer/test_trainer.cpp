// The staged trainer end to end on a small synthetic corpus and a small model: all three stages run
// and the metrics move the right way; the warm-up leaves every non-indexer parameter bit-identical;
// in the sparse stage each parameter group moves only through its own loss; a run stopped and
// resumed equals the uninterrupted one bit for bit.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "data/shards.h"
#include "tests/dist/dist_util.h"
#include "tests/test_util.h"
#include "trainer/checkpoint.h"
#include "trainer/recipe.h"
#include "trainer/trainer.h"

namespace fs = std::filesystem;
using namespace dsa;

namespace {

// The learnable synthetic corpus shared with the distributed tests (tests/dist/dist_util.h).
using dist_testing::make_corpus;
using dsa::testing::same_bits;

std::string recipe_text(const std::string& out) {
  std::ostringstream r;
  r << "model:\n"
       "  vocab_size: 128\n  hidden_size: 32\n  num_hidden_layers: 2\n  first_k_dense_replace: 1\n"
       "  num_attention_heads: 2\n  q_lora_rank: 16\n  kv_lora_rank: 16\n  qk_nope_head_dim: 8\n"
       "  qk_rope_head_dim: 4\n  v_head_dim: 8\n  intermediate_size: 48\n  moe_intermediate_size: 16\n"
       "  n_routed_experts: 4\n  num_experts_per_tok: 2\n  n_group: 2\n  topk_group: 1\n  n_shared_experts: 1\n"
       "  max_position_embeddings: 256\n  index_n_heads: 2\n  index_head_dim: 16\n  index_topk: 8\n"
       "  initializer_range: 0.02\n"
       "data:\n  shards: "
    << make_corpus()
    << "\n"
       "stage_defaults:\n  seq_len: 32\n  global_batch: 4\n  eval_batches: 2\n  log_interval: 5\n"
       "stages:\n"
       "  - {name: dense, kind: dense, steps: 40, lr_main: 1.0e-2, warmup_steps: 4}\n"
       "  - {name: warmup, kind: indexer_warmup, steps: 20, lr_indexer: 1.0e-2, schedule: constant}\n"
       "  - {name: sparse, kind: sparse, steps: 10, lr_main: 1.0e-3, lr_indexer: 1.0e-3}\n"
       "checkpointing:\n  every_steps: 5\n  keep_last: 2\n"
       "logging:\n  terminal: false\n"
       "output_dir: "
    << out << "\nseed: 5\ndevice: cpu\n";
  return r.str();
}

Recipe make_recipe(const std::string& name, const std::vector<std::string>& overrides = {}) {
  const std::string out = ::testing::TempDir() + "/dsa_trainer_" + name;
  fs::remove_all(out);
  return parse_recipe(recipe_text(out), name + ".yaml", overrides);
}

std::vector<nlohmann::json> read_metrics(const Recipe& r) {
  std::vector<nlohmann::json> out;
  std::ifstream f(r.metrics_path());
  for (std::string line; std::getline(f, line);) out.push_back(nlohmann::json::parse(line));
  return out;
}

// First and last value of `key` among the records of `stage` that have it.
std::pair<double, double> first_last(const std::vector<nlohmann::json>& m, const std::string& stage,
                                     const std::string& key) {
  std::vector<double> v;
  for (const auto& j : m)
    if (j.value("stage", "") == stage && j.contains(key) && !j[key].is_null()) v.push_back(j[key].get<double>());
  EXPECT_FALSE(v.empty()) << stage << " " << key;
  return v.empty() ? std::make_pair(0.0, 0.0) : std::make_pair(v.front(), v.back());
}

}  // namespace

TEST(Trainer, ThreeStagesLearn) {
  Recipe r = make_recipe("learn");
  Trainer t(r, TrainOptions{});
  TrainReport rep = t.run();
  EXPECT_EQ(rep.outcome, TrainOutcome::Finished);
  EXPECT_EQ(rep.steps, 70);
  auto m = read_metrics(r);
  auto [v0, v1] = first_last(m, "dense", "val_lm_loss");
  EXPECT_NEAR(v0, std::log(128.0), 0.2);
  EXPECT_LT(v1, v0 - 1.0) << "dense validation loss must fall";
  auto [k0, k1] = first_last(m, "warmup", "val_indexer_kl");
  EXPECT_LT(k1, 0.8 * k0) << "the warm-up must lower the indexer KL";
  auto [r0, r1] = first_last(m, "warmup", "recall");
  EXPECT_GT(r1, r0) << "recall must rise in the warm-up";
  auto [s0, s1] = first_last(m, "sparse", "val_lm_loss");
  EXPECT_LT(s1, v1 * 1.05) << "sparse attention keeps the loss within a few percent of the dense model";
  for (const auto& j : m)
    for (const auto& [k, _] : j.items())
      EXPECT_TRUE(k == "stage" || k == "step" || k == "lm_loss" || k == "indexer_kl" || k == "grad_norm" || k == "indexer_grad_norm" || k == "lr" ||
                  k == "tokens_per_s" || k == "val_lm_loss" || k == "val_indexer_kl" || k == "recall")
          << k;
  // Every stage left its final checkpoint where --stage and init_from look for it.
  for (const char* s : {"dense", "warmup", "sparse"}) EXPECT_NO_THROW(resolve_checkpoint(r.final_checkpoint(s)));
}

TEST(Trainer, WarmupTouchesOnlyTheIndexer) {
  Recipe r = make_recipe("warm_only", {"stages.dense.steps=5"});
  {
    TrainOptions o;
    o.only_stage = "dense";
    Trainer(r, o).run();
  }
  Checkpoint before = load_checkpoint(r.final_checkpoint("dense"));
  TrainOptions o;
  o.only_stage = "warmup";
  Trainer t(r, o);
  t.run();
  int indexer_changed = 0;
  for (const Param& p : t.model().params().all()) {
    const Tensor& old = before.params.get(p.name).value;
    if (p.group == ParamGroup::Indexer)
      indexer_changed += !same_bits(old, p.value);
    else
      EXPECT_TRUE(same_bits(old, p.value)) << p.name << " changed in the warm-up";
  }
  EXPECT_EQ(indexer_changed, 2 * 5) << "every indexer tensor of both layers trains";
}

TEST(Trainer, SparseStageLossesStayInTheirLanes) {
  // One sparse step with and without the indexer loss: the main model ends bit-identical (L_I never
  // reaches it: the indexer's inputs are detached), while the indexer moves only when L_I is on (the
  // LM loss never reaches the indexer; tests/model/test_model_dsa.cpp checks the gradients themselves).
  Recipe base = make_recipe("lanes_dense", {"stages.dense.steps=5"});
  {
    TrainOptions o;
    o.only_stage = "dense";
    Trainer(base, o).run();
  }
  const std::string init = base.final_checkpoint("dense");
  auto run_sparse = [&](const std::string& name, std::vector<std::string> extra) {
    std::vector<std::string> ov = {"stages.sparse.steps=1", "stages.sparse.init_from=" + init};
    ov.insert(ov.end(), extra.begin(), extra.end());
    Recipe r = make_recipe(name, ov);
    TrainOptions o;
    o.only_stage = "sparse";
    auto t = std::make_unique<Trainer>(r, o);
    t->run();
    return t;
  };
  auto with = run_sparse("lanes_with", {});
  auto without = run_sparse("lanes_without", {"stages.sparse.indexer_loss=none", "stages.sparse.train_indexer=false"});
  Checkpoint start = load_checkpoint(init);
  for (const Param& p : with->model().params().all()) {
    const Tensor& q = without->model().params().get(p.name).value;
    if (p.group == ParamGroup::Indexer) {
      EXPECT_TRUE(same_bits(start.params.get(p.name).value, q)) << p.name;
      EXPECT_FALSE(same_bits(p.value, q)) << p.name << " must move with L_I";
    } else {
      EXPECT_TRUE(same_bits(p.value, q)) << p.name << " depends on L_I";
    }
  }
}

TEST(Trainer, ResumeIsExact) {
  Recipe straight = make_recipe("straight", {"stages.dense.steps=12", "stages.warmup.steps=6",
                                             "stages.sparse.steps=6", "checkpointing.every_steps=0"});
  Trainer a(straight, TrainOptions{});
  a.run();
  // The same run stopped three times (mid-stage, at a stage boundary, mid-stage) and resumed.
  Recipe pieces = make_recipe("pieces", {"stages.dense.steps=12", "stages.warmup.steps=6",
                                         "stages.sparse.steps=6", "checkpointing.every_steps=0"});
  for (int64_t stop : {7, 5, 4}) {
    TrainOptions o;
    o.max_steps = stop;
    o.resume = fs::exists(pieces.checkpoint.dir);
    TrainReport rep = Trainer(pieces, o).run();
    EXPECT_EQ(rep.outcome, TrainOutcome::StepLimit);
  }
  TrainOptions o;
  o.resume = true;
  Trainer b(pieces, o);
  EXPECT_EQ(b.run().outcome, TrainOutcome::Finished);
  for (const Param& p : a.model().params().all())
    EXPECT_TRUE(same_bits(p.value, b.model().params().get(p.name).value)) << p.name;
  // Every evaluation of the resumed run equals the uninterrupted one's (same parameters, same data).
  auto ma = read_metrics(straight), mb = read_metrics(pieces);
  std::map<std::string, double> va;
  auto key_of = [](const nlohmann::json& j) {
    return j["stage"].get<std::string>() + "/" + std::to_string(j["step"].get<int>());
  };
  for (const auto& j : ma)
    if (j.contains("val_lm_loss")) va[key_of(j)] = j["val_lm_loss"].get<double>();
  int compared = 0;
  for (const auto& j : mb) {
    if (!j.contains("val_lm_loss") || !va.count(key_of(j))) continue;
    EXPECT_EQ(va[key_of(j)], j["val_lm_loss"].get<double>()) << key_of(j);
    ++compared;
  }
  EXPECT_GE(compared, 3);
}
