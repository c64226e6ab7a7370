// The staged trainer on each DeepSeek family (SPEC.md §1b), tiny sizes: V2-Lite-like (no query LoRA,
// softmax greedy routing, the batch-level balance loss), V2-like (softmax, group-limited), Moonlight-like
// (no query LoRA, sigmoid without groups, rotate-half RoPE) and V3 with its MTP layer (mtp_loss_weight
// in every stage) train through dense -> warm-up -> sparse; the MTP layer moves only where its loss is
// on; the dense stage of a V3-style checkpoint imported by dsa-convert starts from transformers' loss.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "data/shards.h"
#include "tests/dist/dist_util.h"
#include "tests/model/golden_util.h"
#include "trainer/checkpoint.h"
#include "trainer/recipe.h"
#include "trainer/trainer.h"

namespace fs = std::filesystem;
using namespace dsa;
using namespace dsa::testing;

namespace {

struct Family {
  const char* name;
  const char* model_keys;  // added to the shared model mapping
  const char* stage_keys;  // added to stage_defaults
};

const Family kFamilies[] = {
    {"v2_lite",
     "  q_lora_rank: null\n  scoring_func: softmax\n  topk_method: greedy\n  norm_topk_prob: false\n"
     "  n_group: 1\n  topk_group: 1\n  n_shared_experts: 2\n",
     "  seq_aux: false\n  seq_balance_loss_alpha: 1.0e-3\n"},
    {"v2_group",
     "  q_lora_rank: 16\n  scoring_func: softmax\n  topk_method: group_limited_greedy\n  norm_topk_prob: false\n"
     "  n_group: 2\n  topk_group: 1\n  n_shared_experts: 1\n  routed_scaling_factor: 16.0\n",
     ""},
    {"moonlight",
     "  q_lora_rank: null\n  n_group: 1\n  topk_group: 1\n  n_shared_experts: 2\n  rope_interleave: false\n", ""},
    {"v3_mtp",
     "  q_lora_rank: 16\n  n_group: 2\n  topk_group: 1\n  n_shared_experts: 1\n  num_nextn_predict_layers: 1\n",
     "  mtp_loss_weight: 0.3\n"},
};

std::string recipe_text(const Family& f, const std::string& out) {
  std::ostringstream r;
  r << "model:\n"
       "  vocab_size: 128\n  hidden_size: 32\n  num_hidden_layers: 2\n  first_k_dense_replace: 1\n"
       "  num_attention_heads: 2\n  kv_lora_rank: 16\n  qk_nope_head_dim: 8\n  qk_rope_head_dim: 4\n"
       "  v_head_dim: 8\n  intermediate_size: 48\n  moe_intermediate_size: 16\n  n_routed_experts: 4\n"
       "  num_experts_per_tok: 2\n  max_position_embeddings: 256\n  index_n_heads: 2\n  index_head_dim: 16\n"
       "  index_topk: 8\n  initializer_range: 0.02\n"
    << f.model_keys << "data:\n  shards: " << dist_testing::make_corpus()
    << "\nstage_defaults:\n  seq_len: 32\n  global_batch: 4\n  eval_batches: 1\n  log_interval: 2\n"
    << f.stage_keys
    << "stages:\n"
       "  - {name: dense, kind: dense, steps: 6, lr_main: 1.0e-2, warmup_steps: 1}\n"
       "  - {name: warmup, kind: indexer_warmup, steps: 4, lr_indexer: 1.0e-2, schedule: constant}\n"
       "  - {name: sparse, kind: sparse, steps: 4, lr_main: 1.0e-3, lr_indexer: 1.0e-3}\n"
       "logging:\n  terminal: false\n"
       "output_dir: "
    << out << "\nseed: 5\ndevice: cpu\n";
  return r.str();
}

std::vector<nlohmann::json> read_metrics(const Recipe& r) {
  std::vector<nlohmann::json> out;
  std::ifstream f(r.metrics_path());
  for (std::string line; std::getline(f, line);) out.push_back(nlohmann::json::parse(line));
  return out;
}

bool same_bits(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

class TrainerFamilies : public ::testing::TestWithParam<Family> {};

}  // namespace

TEST_P(TrainerFamilies, ThreeStagesRun) {
  const Family& f = GetParam();
  const std::string out = ::testing::TempDir() + "/dsa_trainer_family_" + f.name;
  fs::remove_all(out);
  Recipe r = parse_recipe(recipe_text(f, out), std::string(f.name) + ".yaml");
  const bool mtp = r.model.num_nextn_predict_layers > 0;
  if (r.model.scoring_func == "softmax") {
    for (const StageSpec& s : r.stages) EXPECT_EQ(s.moe_bias_update_rate, 0.0) << "no bias to update";
  }
  TrainReport rep = Trainer(r, TrainOptions{}).run();
  EXPECT_EQ(rep.outcome, TrainOutcome::Finished);
  EXPECT_EQ(rep.steps, 14);
  // Every logged value is finite; the dense stage's training loss falls; the MTP loss is logged.
  int mtp_records = 0;
  double dense_first = 0, dense_last = 0;
  for (const nlohmann::json& j : read_metrics(r)) {
    for (const auto& [k, v] : j.items()) {
      if (v.is_number()) {
        EXPECT_TRUE(std::isfinite(v.get<double>())) << f.name << " " << k;
      }
    }
    if (j.contains("mtp_loss") || j.contains("val_mtp_loss")) ++mtp_records;
    if (j["stage"] == "dense" && j.contains("lm_loss")) {
      if (dense_first == 0) dense_first = j["lm_loss"].get<double>();
      dense_last = j["lm_loss"].get<double>();
    }
  }
  EXPECT_LT(dense_last, dense_first) << f.name;
  EXPECT_EQ(mtp_records > 0, mtp) << f.name;
  // The stages leave their checkpoints; the warm-up moves only the indexer (the MTP layer's included).
  Checkpoint dense = load_checkpoint(r.final_checkpoint("dense"));
  Checkpoint warm = load_checkpoint(r.final_checkpoint("warmup"));
  Checkpoint sparse = load_checkpoint(r.final_checkpoint("sparse"));
  int indexer_moved = 0, mtp_indexer_moved = 0;
  for (const Param& p : dense.params.all()) {
    const bool same = same_bits(p.value, warm.params.get(p.name).value);
    if (p.group != ParamGroup::Indexer) {
      EXPECT_TRUE(same) << f.name << ": the warm-up moved " << p.name;
    } else if (!same) {
      ++indexer_moved;
      mtp_indexer_moved += is_mtp_param(r.model, p.name);
    }
  }
  EXPECT_GT(indexer_moved, 0);
  EXPECT_EQ(mtp_indexer_moved > 0, mtp) << f.name;
  // The MTP layer trains in the stages that run it (all three here).
  if (mtp) {
    const std::string eh = layer_prefix(r.model.mtp_layer()) + "eh_proj.weight";
    EXPECT_FALSE(same_bits(warm.params[eh], sparse.params[eh])) << "the sparse stage trains the MTP layer";
  }
}

INSTANTIATE_TEST_SUITE_P(All, TrainerFamilies, ::testing::ValuesIn(kFamilies),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(TrainerFamiliesMtp, MtpLayerIsCarriedUnchangedWhenItsLossIsOff) {
  const Family& f = kFamilies[3];
  const std::string out = ::testing::TempDir() + "/dsa_trainer_family_mtp_off";
  fs::remove_all(out);
  Recipe r = parse_recipe(
      recipe_text(f, out), "mtp_off.yaml",
      {"stage_defaults.mtp_loss_weight=0", "stages.dense.steps=3", "stages.warmup.steps=2", "stages.sparse.steps=2"});
  Trainer(r, TrainOptions{}).run();
  Checkpoint start = load_checkpoint(r.final_checkpoint("dense"));
  Checkpoint end = load_checkpoint(r.final_checkpoint("sparse"));
  ParamStore init = make_params(r.model);
  init_params(init, r.model, r.seed);
  int mtp_params = 0;
  for (const Param& p : end.params.all()) {
    if (!is_mtp_param(r.model, p.name)) continue;
    ++mtp_params;
    EXPECT_TRUE(same_bits(p.value, init.get(p.name).value)) << p.name << " must stay as initialized (no weight decay)";
    EXPECT_TRUE(same_bits(p.value, start.params.get(p.name).value)) << p.name;
  }
  EXPECT_GT(mtp_params, 10);
  // A weight with no MTP layer to train is refused by name.
  const Family& v2 = kFamilies[0];
  EXPECT_THROW(
      {
        try {
          parse_recipe(recipe_text(v2, out), "bad.yaml", {"stages.dense.mtp_loss_weight=0.3"});
        } catch (const std::runtime_error& e) {
          EXPECT_NE(std::string(e.what()).find("key 'stages.0.mtp_loss_weight': must be 0: the model has no MTP layer"),
                    std::string::npos)
              << e.what();
          throw;
        }
      },
      std::runtime_error);
  // Softmax routing has no bias: a bias update rate is refused by name.
  EXPECT_THROW(parse_recipe(recipe_text(v2, out), "bad.yaml", {"stages.dense.moe_bias_update_rate=0.001"}),
               std::runtime_error);
}

TEST(TrainerFamiliesImport, DenseStageOfAnImportedV3StartsFromTransformersLoss) {
  // v3_noqlora (DeepseekV3ForCausalLM, no query LoRA) imported by dsa-convert; a recipe whose model is
  // that checkpoint and whose dense stage starts from it; the validation loss at step 0, on the golden
  // tokens, is transformers' loss on them.
  if (!GoldenSet::present("v3_noqlora")) GTEST_SKIP() << "golden set tests/golden/v3_noqlora is absent";
  ScratchDir scratch;
  GoldenSet g("v3_noqlora", scratch);
  const std::string ckpt = scratch / "v3_noqlora.h5";
  const std::string import_cmd = std::string(DSA_BINARY_DIR) + "/bin/dsa-convert import " + g.dir + "/model " + ckpt +
                                 " --index-n-heads 3 --index-head-dim 8 --index-topk 5 > /dev/null 2>&1";
  ASSERT_EQ(std::system(import_cmd.c_str()), 0);
  // A corpus whose held-out split is the golden's first sequence (no BOS/EOS framing) and whose train
  // split is anything: seq_len T-1, one window = the whole sequence.
  const std::string corpus = scratch / "corpus";
  fs::create_directories(corpus);
  const int64_t V = g.ckpt.cfg.vocab_size, T = g.T;
  std::vector<int32_t> row(g.ids.data<int32_t>(), g.ids.data<int32_t>() + T);
  for (const char* split : {"train", "val"}) {
    ShardWriter w(corpus + "/" + split + "_00000.bin", V, -1, -1);
    for (int d = 0; d < 4; ++d) w.add_document(row.data(), row.size());
    w.close();
  }
  std::ostringstream rt;
  rt << "model: " << ckpt << "\ndata:\n  shards: " << corpus
     << "\nstages:\n  - {name: dense, kind: dense, steps: 1, seq_len: " << T - 1
     << ", global_batch: 1, eval_batches: 1, init_from: " << ckpt << "}\n"
     << "logging:\n  terminal: false\noutput_dir: " << scratch / "run"
     << "\nseed: 1\ndevice: cpu\n";
  Recipe r = parse_recipe(rt.str(), "import.yaml");
  EXPECT_EQ(r.model.to_yaml(), g.ckpt.cfg.to_yaml());
  Trainer(r, TrainOptions{}).run();
  double val0 = NAN;
  for (const nlohmann::json& j : read_metrics(r))
    if (j["step"] == 0 && j.contains("val_lm_loss")) val0 = j["val_lm_loss"].get<double>();
  // transformers' loss on sequence 0: the mean cross-entropy of its T-1 next-token predictions, from the
  // golden logits [B, T, V].
  const Tensor logits = read_npy(g.run_file("f32_dense", "logits"));
  double sum = 0;
  for (int64_t t = 0; t + 1 < T; ++t) {
    double m = -INFINITY, z = 0;
    for (int64_t v = 0; v < V; ++v) m = std::max(m, logits.item(t * V + v));
    for (int64_t v = 0; v < V; ++v) z += std::exp(logits.item(t * V + v) - m);
    sum += m + std::log(z) - logits.item(t * V + row[t + 1]);
  }
  const double want = sum / static_cast<double>(T - 1);
  // Ours runs in f32 (the trainer's CPU model), transformers in f32: each logit within ~S*u*scale with
  // S ~ 3e3 reductions on the path (tests/model/test_hf_golden.cpp), twice for two computations.
  EXPECT_NEAR(val0, want, 4 * 3e3 * 5.96e-8 * std::max(1.0, max_abs(logits))) << "not the imported model's loss";
  std::printf("[golden] imported v3_noqlora: dense stage val loss at step 0 %.7f, transformers %.7f\n", val0, want);
}
