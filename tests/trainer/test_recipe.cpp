// Recipes (loading, base:, overrides, strict validation), the lr schedule, the metrics logger and the
// plot tool.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "trainer/metrics.h"
#include "trainer/recipe.h"
#include "trainer/schedule.h"

namespace fs = std::filesystem;
using namespace dsa;

namespace {

const char* kMinimal = R"(model:
  vocab_size: 256
  hidden_size: 32
  num_hidden_layers: 2
  first_k_dense_replace: 1
  num_attention_heads: 2
  q_lora_rank: 16
  kv_lora_rank: 12
  qk_nope_head_dim: 8
  qk_rope_head_dim: 4
  v_head_dim: 6
  intermediate_size: 40
  moe_intermediate_size: 12
  n_routed_experts: 8
  num_experts_per_tok: 2
  n_group: 4
  topk_group: 2
  n_shared_experts: 1
  index_n_heads: 2
  index_head_dim: 8
  index_topk: 4
  max_position_embeddings: 4096
data:
  shards: runs/data/test
stages:
  - name: dense
    kind: dense
    steps: 10
    seq_len: 64
    global_batch: 4
  - name: warmup
    kind: indexer_warmup
    steps: 5
    seq_len: 64
    global_batch: 4
  - name: sparse
    kind: sparse
    steps: 8
    seq_len: 64
    global_batch: 4
output_dir: runs/test
)";

fs::path temp_dir() {
  static fs::path dir = [] {
    fs::path d = fs::temp_directory_path() / ("dsa_test_recipe_" + std::to_string(getpid()));
    fs::remove_all(d);
    fs::create_directories(d);
    return d;
  }();
  return dir;
}

std::string write_file(const std::string& name, const std::string& text) {
  const fs::path p = temp_dir() / name;
  fs::create_directories(p.parent_path());
  std::ofstream(p) << text;
  return p.string();
}

std::string replaced(const std::string& text, const std::string& from, const std::string& to) {
  const auto pos = text.find(from);
  EXPECT_NE(pos, std::string::npos) << "test bug: '" << from << "' not in the recipe";
  std::string s = text;
  if (pos != std::string::npos) s.replace(pos, from.size(), to);
  return s;
}

int line_of(const std::string& text, const std::string& needle) {
  const auto pos = text.find(needle);
  EXPECT_NE(pos, std::string::npos) << "test bug: '" << needle << "' not in the recipe";
  int line = 1;
  for (size_t i = 0; i < pos && i < text.size(); ++i) line += text[i] == '\n';
  return line;
}

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no error)";
}

std::string read_all(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::string strip_comments(const std::string& yaml) {
  std::istringstream in(yaml);
  std::string out;
  for (std::string line; std::getline(in, line);)
    if (line.empty() || line[0] != '#') out += line + "\n";
  return out;
}

}  // namespace

// ---- shipped recipes ----

TEST(Recipe, EveryShippedRecipeLoads) {
  std::vector<fs::path> files;
  for (const char* dir : {"recipes", "recipes/ablations", "recipes/experiments", "recipes/experiments/ablations"})
    for (const auto& e : fs::directory_iterator(fs::path(DSA_SOURCE_DIR) / dir))
      if (e.path().extension() == ".yaml") files.push_back(e.path());
  ASSERT_GE(files.size(), 9u);
  for (const auto& f : files) {
    SCOPED_TRACE(f.string());
    Recipe r;
    ASSERT_NO_THROW(r = load_recipe(f.string()));
    EXPECT_FALSE(r.stages.empty());
    EXPECT_FALSE(r.resolved_yaml.empty());
    // The resolved text reads back to the same recipe.
    const Recipe again = parse_recipe(r.resolved_yaml, "resolved");
    EXPECT_EQ(strip_comments(again.to_yaml()), strip_comments(r.resolved_yaml));
  }
}

TEST(Recipe, QuickstartAndBenchSmall) {
  const Recipe q = load_recipe(std::string(DSA_SOURCE_DIR) + "/recipes/quickstart.yaml");
  ASSERT_EQ(q.stages.size(), 3u);
  EXPECT_EQ(q.stages[0].name, "dense");
  EXPECT_EQ(q.stages[1].name, "warmup");
  EXPECT_EQ(q.stages[2].name, "sparse");
  EXPECT_EQ(q.stages[1].kind, StageKind::indexer_warmup);
  EXPECT_EQ(q.model.vocab_size, 129280);
  EXPECT_EQ(q.model_source, "inline");
  EXPECT_EQ(q.stages[2].attention, Attention::sparse);
  EXPECT_EQ(q.stages[2].topk, q.model.index_topk);  // default: the model's index_topk
  EXPECT_LT(q.stages[2].topk, q.stages[2].seq_len);
  EXPECT_EQ(q.metrics_path(), "runs/quickstart/metrics.jsonl");
  EXPECT_EQ(q.final_checkpoint("dense"), "runs/quickstart/checkpoints/dense/final");

  const Recipe b = load_recipe(std::string(DSA_SOURCE_DIR) + "/recipes/bench_small.yaml");
  EXPECT_EQ(b.model.to_yaml(), preset_config("bench-small").to_yaml());
  for (const auto& s : b.stages) EXPECT_EQ(s.tokens_per_step(), 16384);
  EXPECT_EQ(b.device, RunDevice::cuda);
}

TEST(Recipe, AblationsChangeOnlyWhatTheySay) {
  const std::string dir = std::string(DSA_SOURCE_DIR) + "/recipes/";
  const Recipe base = load_recipe(dir + "quickstart.yaml");
  const StageSpec& bs = base.stage("sparse");
  auto sparse_of = [&](const char* f) { return load_recipe(dir + "ablations/" + f).stage("sparse"); };

  const Recipe nw = load_recipe(dir + "ablations/no_warmup.yaml");
  ASSERT_EQ(nw.stages.size(), 1u);
  EXPECT_EQ(nw.stages[0].init_from, base.final_checkpoint("dense"));
  EXPECT_EQ(nw.output_dir, "runs/ablations/no_warmup");

  const StageSpec nd = sparse_of("no_detach.yaml");
  EXPECT_FALSE(nd.detach_indexer_input);
  EXPECT_TRUE(bs.detach_indexer_input);
  EXPECT_EQ(nd.init_from, base.final_checkpoint("warmup"));
  EXPECT_EQ(nd.steps, bs.steps);
  EXPECT_EQ(nd.lr_main, bs.lr_main);

  EXPECT_EQ(sparse_of("sparse_dense_kl.yaml").indexer_loss, IndexerLoss::dense);
  EXPECT_EQ(bs.indexer_loss, IndexerLoss::sparse);
  EXPECT_EQ(sparse_of("topk_16.yaml").topk, 16);
  EXPECT_EQ(sparse_of("topk_64.yaml").topk, 64);
  EXPECT_EQ(sparse_of("topk_128.yaml").topk, 128);

  const Recipe bf = load_recipe(dir + "ablations/indexer_bf16.yaml");
  ASSERT_EQ(bf.stages.size(), 2u);
  EXPECT_EQ(bf.stages[0].name, "warmup");
  for (const auto& s : bf.stages) EXPECT_EQ(s.indexer_precision, IndexerPrecision::bf16);
  EXPECT_EQ(bs.indexer_precision, IndexerPrecision::fp8);
}

// ---- defaults and lookups ----

TEST(Recipe, TopkOrderIsAStageKey) {
  const std::string sparse_head = "  - name: sparse\n    kind: sparse\n";
  std::string text = kMinimal;
  const size_t at = text.find(sparse_head);
  ASSERT_NE(at, std::string::npos);
  text.insert(at + sparse_head.size(), "    topk_order: score\n");
  const Recipe r = parse_recipe(text, "score_order.yaml");
  EXPECT_EQ(r.stages[2].topk_order, TopkOrder::score);
  EXPECT_EQ(r.stages[0].topk_order, TopkOrder::index);
  EXPECT_EQ(parse_recipe(r.resolved_yaml, "again").stages[2].topk_order, TopkOrder::score);
}

TEST(Recipe, KindDefaultsFollowTheSpec) {
  const Recipe r = parse_recipe(kMinimal, "minimal.yaml");
  const StageSpec &d = r.stages[0], &w = r.stages[1], &s = r.stages[2];
  EXPECT_TRUE(d.train_main);
  EXPECT_FALSE(d.train_indexer);
  EXPECT_EQ(d.attention, Attention::dense);
  EXPECT_EQ(d.indexer_loss, IndexerLoss::none);
  EXPECT_FALSE(w.train_main);
  EXPECT_TRUE(w.train_indexer);
  EXPECT_EQ(w.attention, Attention::dense);
  EXPECT_EQ(w.indexer_loss, IndexerLoss::dense);
  EXPECT_DOUBLE_EQ(w.lr_indexer, 1e-3);
  EXPECT_TRUE(s.train_main);
  EXPECT_TRUE(s.train_indexer);
  EXPECT_EQ(s.attention, Attention::sparse);
  EXPECT_EQ(s.indexer_loss, IndexerLoss::sparse);
  EXPECT_TRUE(s.detach_indexer_input);
  EXPECT_DOUBLE_EQ(s.lr_main, 7.3e-6);
  EXPECT_EQ(s.topk, 4);
  EXPECT_EQ(s.indexer_precision, IndexerPrecision::fp8);
  EXPECT_EQ(s.topk_order, TopkOrder::index);
  EXPECT_EQ(r.device, RunDevice::auto_);
  EXPECT_EQ(r.checkpoint.dir, "runs/test/checkpoints");
  EXPECT_EQ(r.optimizer.on_nonfinite, OnNonfinite::skip);
}

TEST(Recipe, StageLookupAndMicroBatch) {
  const Recipe r = parse_recipe(kMinimal, "minimal.yaml");
  EXPECT_EQ(r.stage_index("sparse"), 2);
  EXPECT_EQ(r.stage("warmup").steps, 5);
  const std::string e = error_of([&] { r.stage("sprase"); });
  EXPECT_NE(e.find("no stage 'sprase'; stages: dense, warmup, sparse"), std::string::npos) << e;
  EXPECT_EQ(r.stages[0].micro_batch(2), 2);
  EXPECT_EQ(r.stages[0].micro_batch(4), 1);
  const std::string e2 = error_of([&] { r.stages[0].micro_batch(3); });
  EXPECT_NE(e2.find("global_batch 4 does not split into dp 3"), std::string::npos) << e2;
}

TEST(Recipe, StageDefaultsApplyAndStagesWin) {
  const std::string text = replaced(kMinimal, "stages:\n", "stage_defaults:\n  seq_len: 128\n  eval_interval: 7\nstages:\n");
  const std::string t2 = replaced(text, "    kind: dense\n    steps: 10\n    seq_len: 64\n", "    kind: dense\n    steps: 10\n");
  const Recipe r = parse_recipe(t2, "defaults.yaml");
  EXPECT_EQ(r.stages[0].seq_len, 128);  // from stage_defaults
  EXPECT_EQ(r.stages[1].seq_len, 64);   // the stage's own value wins
  for (const auto& s : r.stages) EXPECT_EQ(s.eval_interval, 7);
}

TEST(Recipe, ModelFromConfigJson) {
  const std::string json = write_file("model/config.json", preset_config("tiny").to_hf_json());
  const std::string text = "model: " + json + std::string(kMinimal).substr(std::string(kMinimal).find("\ndata:"));
  const Recipe r = parse_recipe(text, "json_model.yaml");
  EXPECT_EQ(r.model_source, json);
  EXPECT_EQ(r.model.to_yaml(), preset_config("tiny").to_yaml());
  EXPECT_EQ(parse_recipe(r.resolved_yaml, "again").model.to_yaml(), r.model.to_yaml());  // resolved inline
  const std::string e = error_of([&] { parse_recipe("model: /nonexistent/config.json" + text.substr(text.find("\ndata:")), "m.yaml"); });
  EXPECT_NE(e.find("[recipe] m.yaml:1: key 'model': [config] /nonexistent/config.json: cannot read the file"),
            std::string::npos) << e;
}

// ---- overrides ----

TEST(Recipe, OverridesParseAndApply) {
  const Recipe r = parse_recipe(kMinimal, "minimal.yaml",
                                {"stages.1.steps=200", "output_dir=/tmp/run", "stages.sparse.topk=3",
                                 "optimizer.on_nonfinite=stop", "checkpointing.every_steps=7",
                                 "data.shards=[a]", "stages.0.lr_main=1e-2", "stages.2.detach_indexer_input=false",
                                 "seed=42", "stages.2.init_from=", "model.hidden_size=48"});
  EXPECT_EQ(r.stages[1].steps, 200);
  EXPECT_EQ(r.output_dir, "/tmp/run");
  EXPECT_EQ(r.checkpoint.dir, "/tmp/run/checkpoints");
  EXPECT_EQ(r.stages[2].topk, 3);
  EXPECT_EQ(r.optimizer.on_nonfinite, OnNonfinite::stop);
  EXPECT_EQ(r.checkpoint.every_steps, 7);
  EXPECT_EQ(r.data.shards, (std::vector<std::string>{"a"}));
  EXPECT_DOUBLE_EQ(r.stages[0].lr_main, 1e-2);
  EXPECT_FALSE(r.stages[2].detach_indexer_input);
  EXPECT_EQ(r.seed, 42u);
  EXPECT_EQ(r.stages[2].init_from, "");
  EXPECT_EQ(r.model.hidden_size, 48);
  // Recorded in the resolved text.
  EXPECT_NE(r.resolved_yaml.find("# override: stages.1.steps=200"), std::string::npos);
  EXPECT_NE(r.resolved_yaml.find("output_dir: \"/tmp/run\""), std::string::npos);
}

TEST(Recipe, OverrideErrorsNameTheOverride) {
  struct Case {
    const char* override_text;
    const char* expected;
  };
  const Case cases[] = {
      {"stages.7.steps=1", "override 'stages.7.steps=1': key 'stages.7' does not exist: 'stages' has 3 entries "
                           "(indices 0..2), named dense, warmup, sparse"},
      {"stages.1.stepz=3", "override 'stages.1.stepz=3': key 'stages.1.stepz': unknown key; allowed keys: name, kind"},
      {"stages.1.steps=abc", "override 'stages.1.steps=abc': key 'stages.1.steps': must be an integer, got 'abc'"},
      {"stages.1.steps=[1, 2]", "key 'stages.1.steps': must be an integer, got a list"},
      {"stages.2.attention=local", "key 'stages.2.attention': must be one of dense, sparse, got 'local'"},
      {"outptu_dir=/tmp/x", "override 'outptu_dir=/tmp/x': key 'outptu_dir': unknown key; allowed keys: model, data"},
      {"output_dir.x=1", "key 'output_dir.x' does not exist: 'output_dir' is a value, not a mapping or list"},
      {"optimizer.beta3=0.9", "key 'optimizer.beta3': unknown key; allowed keys: beta1, beta2, eps"},
      {"model.hidden_sise=3", "override 'model.hidden_sise=3': key 'model.hidden_sise': unknown model key"},
      {"stages.1.steps", "an override must look like key.path=value"},
      {"stages..steps=1", "empty segment in key 'stages..steps'"},
  };
  for (const auto& c : cases) {
    const std::string e = error_of([&] { parse_recipe(kMinimal, "minimal.yaml", {c.override_text}); });
    EXPECT_NE(e.find(c.expected), std::string::npos) << "override " << c.override_text << "\n  got: " << e;
  }
}

// ---- bad recipes: file, line, key and what is allowed ----

TEST(Recipe, BadRecipesStopWithFileLineAndKey) {
  struct Case {
    const char* name;
    std::string text;
    std::string line_needle;  // the line the message must point at
    const char* expected;
  };
  const std::string sparse_head = "  - name: sparse\n    kind: sparse\n";
  const std::string warm_head = "  - name: warmup\n    kind: indexer_warmup\n";
  const std::vector<Case> cases = {
      {"unknown_top", replaced(kMinimal, "output_dir:", "outptu_dir: x\noutput_dir:"), "outptu_dir",
       "key 'outptu_dir': unknown key; allowed keys: model, data, stages, stage_defaults, optimizer, parallelism, "
       "checkpointing, logging, output_dir, seed, device"},
      {"unknown_stage_key", replaced(kMinimal, sparse_head, sparse_head + "    topkk: 3\n"), "topkk",
       "key 'stages.2.topkk': unknown key; allowed keys: name, kind, steps"},
      {"wrong_type", replaced(kMinimal, "steps: 10", "steps: ten"), "steps: ten",
       "key 'stages.0.steps': must be an integer, got 'ten'"},
      {"wrong_type_bool", replaced(kMinimal, sparse_head, sparse_head + "    detach_indexer_input: maybe\n"),
       "detach_indexer_input", "key 'stages.2.detach_indexer_input': must be true or false, got 'maybe'"},
      {"bad_kind", replaced(kMinimal, "kind: indexer_warmup", "kind: warmup"), "kind: warmup",
       "key 'stages.1.kind': must be one of dense, indexer_warmup, sparse, got 'warmup'"},
      {"bad_precision", replaced(kMinimal, sparse_head, sparse_head + "    indexer_precision: fp16\n"),
       "indexer_precision", "key 'stages.2.indexer_precision': must be one of fp8, bf16, got 'fp16'"},
      {"bad_topk_order", replaced(kMinimal, sparse_head, sparse_head + "    topk_order: random\n"), "topk_order",
       "key 'stages.2.topk_order': must be one of score, index, got 'random'"},
      {"bad_loss", replaced(kMinimal, sparse_head, sparse_head + "    indexer_loss: kl\n"), "indexer_loss",
       "key 'stages.2.indexer_loss': must be one of none, dense, sparse, got 'kl'"},
      {"bad_nonfinite", replaced(kMinimal, "output_dir:", "optimizer:\n  on_nonfinite: ignore\noutput_dir:"),
       "on_nonfinite", "key 'optimizer.on_nonfinite': must be one of skip, stop, got 'ignore'"},
      {"missing_steps", replaced(kMinimal, "    kind: dense\n    steps: 10\n", "    kind: dense\n"), "- name: dense",
       "key 'stages.0.steps': missing"},
      {"missing_kind", replaced(kMinimal, "    kind: sparse\n", ""), "- name: sparse", "key 'stages.2.kind': missing"},
      {"missing_output_dir", replaced(kMinimal, "output_dir: runs/test\n", ""), "model:",
       "key 'output_dir': missing"},
      {"missing_shards", replaced(kMinimal, "  shards: runs/data/test\n", "  keep_documents_contiguous: true\n"), "keep_documents",
       "key 'data.shards': missing"},
      {"sparse_topk_zero", replaced(kMinimal, sparse_head, sparse_head + "    topk: 0\n"), "topk: 0",
       "key 'stages.2.topk': must be > 0 with attention: sparse"},
      {"warmup_nothing_trains", replaced(kMinimal, warm_head, warm_head + "    train_indexer: false\n"),
       "train_indexer", "key 'stages.1.train_indexer': nothing would train"},
      {"seq_too_long", replaced(kMinimal, "    steps: 8\n    seq_len: 64\n", "    steps: 8\n    seq_len: 8192\n"),
       "seq_len: 8192", "key 'stages.2.seq_len': 8192 is longer than the model allows (max_position_embeddings = 4096)"},
      {"sparse_kl_dense_attention",
       replaced(kMinimal, sparse_head, sparse_head + "    attention: dense\n"), "- name: sparse",
       "key 'stages.2.indexer_loss': sparse needs attention: sparse"},
      {"indexer_without_loss", replaced(kMinimal, "    kind: dense\n", "    kind: dense\n    train_indexer: true\n"),
       "- name: dense", "key 'stages.0.indexer_loss': none leaves the indexer without gradients"},
      {"warmup_too_long", replaced(kMinimal, "steps: 10", "steps: 10\n    warmup_steps: 11"), "warmup_steps",
       "key 'stages.0.warmup_steps': 11 exceeds the stage's steps (10)"},
      {"duplicate_stage", replaced(kMinimal, "name: warmup", "name: dense"), "- name: dense\n    kind: indexer",
       "key 'stages.1.name': 'dense' is already the name of an earlier stage"},
      {"bad_stage_name", replaced(kMinimal, "name: warmup", "name: warm up"), "name: warm up",
       "key 'stages.1.name': must be letters, digits"},
      {"dp_split", replaced(kMinimal, "output_dir:", "parallelism:\n  dp: 3\noutput_dir:"), "- name: dense",
       "key 'stages.0.global_batch': 4 sequences do not split into parallelism.dp = 3"},
      {"model_unknown_key", replaced(kMinimal, "  hidden_size: 32\n", "  hidden_sise: 32\n"), "hidden_sise",
       "key 'model.hidden_sise': unknown model key 'hidden_sise'; allowed keys:"},
      {"model_bad_value", replaced(kMinimal, "  hidden_size: 32\n", "  hidden_size: 0\n"), "hidden_size",
       "key 'model.hidden_size': key 'hidden_size' must be a positive integer, got 0"},
      {"stages_not_list", std::string(kMinimal).substr(0, std::string(kMinimal).find("stages:")) + "stages: 3\noutput_dir: o\n",
       "stages: 3",
       "key 'stages': must be a non-empty list of stages, got '3'"},
      {"duplicate_yaml_key", replaced(kMinimal, "output_dir: runs/test\n", "output_dir: a\noutput_dir: b\n"),
       "output_dir: b", "key 'output_dir' appears twice"},
      {"parse_error", replaced(kMinimal, "  shards: runs/data/test\n", "  shards: [runs/data/test\n"), "",
       "parse error"},
      {"missing_base", "base: nowhere.yaml\n", "base:", "key 'base': cannot read"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string path = write_file(std::string("bad/") + c.name + ".yaml", c.text);
    const std::string e = error_of([&] { load_recipe(path); });
    EXPECT_EQ(e.rfind("[recipe] " + path, 0), 0u) << e;
    if (!c.line_needle.empty()) {
      const std::string where = path + ":" + std::to_string(line_of(c.text, c.line_needle)) + ": ";
      EXPECT_NE(e.find(where), std::string::npos) << "expected location " << where << "\n  got: " << e;
    }
    EXPECT_NE(e.find(c.expected), std::string::npos) << "expected: " << c.expected << "\n  got: " << e;
  }
}

// ---- base: ----

TEST(Recipe, BaseMergesByKeyAndStagesByName) {
  const std::string base = write_file("base/parent.yaml", kMinimal);
  const std::string child_text =
      "base: parent.yaml\n"
      "output_dir: runs/child\n"
      "data:\n"
      "  keep_documents_contiguous: true\n"
      "stages:\n"
      "  - {name: warmup, remove: true}\n"
      "  - name: sparse\n"
      "    topk: 2\n"
      "  - name: extra\n"
      "    kind: sparse\n"
      "    steps: 3\n"
      "    seq_len: 32\n"
      "    global_batch: 2\n";
  const std::string child = write_file("base/child.yaml", child_text);
  const Recipe r = load_recipe(child);
  ASSERT_EQ(r.stages.size(), 3u);
  EXPECT_EQ(r.stages[0].name, "dense");
  EXPECT_EQ(r.stages[1].name, "sparse");
  EXPECT_EQ(r.stages[1].topk, 2);
  EXPECT_EQ(r.stages[1].steps, 8);  // kept from the base
  EXPECT_EQ(r.stages[2].name, "extra");
  // The removed stage keeps its place in the data plan (trainer/data_plan.h), and in the resolved recipe.
  ASSERT_EQ(r.planned.size(), 4u);
  EXPECT_EQ(r.planned[1].name, "warmup");
  EXPECT_TRUE(r.planned[1].removed);
  EXPECT_NE(r.resolved_yaml.find("  - name: warmup\n    remove: true\n"), std::string::npos) << r.resolved_yaml;
  auto body = [](const std::string& y) { return y.substr(y.find('\n')); };  // after the "# source" line
  EXPECT_EQ(body(parse_recipe(r.resolved_yaml, "resolved").resolved_yaml), body(r.resolved_yaml));
  EXPECT_NE(error_of([&] { r.stage_index("warmup"); }).find("stage 'warmup' is removed in this recipe"), std::string::npos);
  EXPECT_EQ(r.output_dir, "runs/child");
  EXPECT_EQ(r.data.shards, std::vector<std::string>{"runs/data/test"});
  EXPECT_TRUE(r.data.keep_documents_contiguous);

  // Errors point into the file that holds the bad value.
  const std::string bad_child = write_file("base/bad_child.yaml", child_text + "    topk: -1\n");
  std::string e = error_of([&] { load_recipe(bad_child); });
  EXPECT_NE(e.find(bad_child + ":14: key 'stages.3.topk': must be >= 0"), std::string::npos) << e;
  const std::string bad_parent_text = replaced(kMinimal, "steps: 10", "steps: x");
  const std::string bad_parent = write_file("base/bad_parent.yaml", bad_parent_text);
  const std::string child2 = write_file("base/child2.yaml", "base: bad_parent.yaml\noutput_dir: y\n");
  e = error_of([&] { load_recipe(child2); });
  EXPECT_NE(e.find(bad_parent + ":" + std::to_string(line_of(bad_parent_text, "steps: x")) + ": key 'stages.0.steps': must be an integer, got 'x'"), std::string::npos) << e;
  const std::string no_such = write_file("base/child3.yaml", "base: parent.yaml\nstages:\n  - {name: nope, remove: true}\n");
  e = error_of([&] { load_recipe(no_such); });
  EXPECT_NE(e.find("cannot remove stage 'nope'"), std::string::npos) << e;
  const std::string loop = write_file("base/loop.yaml", "base: loop.yaml\n");
  e = error_of([&] { load_recipe(loop); });
  EXPECT_NE(e.find("more than 8 nested bases"), std::string::npos) << e;
}

TEST(Recipe, DataSourcesMixtureAndDataStage) {
  const std::string mix = "data:\n  sources:\n    - {name: code, shards: runs/data/linux, weight: 3}\n"
                          "    - {name: retrieval, shards: runs/data/retrieval}\n";
  const Recipe r = parse_recipe(replaced(kMinimal, "data:\n  shards: runs/data/test\n", mix), "mix.yaml");
  ASSERT_EQ(r.data.sources.size(), 2u);
  EXPECT_EQ(r.data.sources[0].name, "code");
  EXPECT_EQ(r.data.sources[0].weight, 3.0);
  EXPECT_EQ(r.data.sources[1].weight, 1.0);  // default
  EXPECT_EQ(r.data.shards, (std::vector<std::string>{"runs/data/linux", "runs/data/retrieval"}));
  const Recipe again = parse_recipe(r.resolved_yaml, "resolved");
  EXPECT_EQ(again.to_yaml().substr(again.to_yaml().find('\n')), r.resolved_yaml.substr(r.resolved_yaml.find('\n')));
  // One corpus is one source named "data".
  const Recipe one = parse_recipe(kMinimal, "one.yaml");
  ASSERT_EQ(one.data.sources.size(), 1u);
  EXPECT_EQ(one.data.sources[0].name, "data");

  const std::string sparse_head = "  - name: sparse\n    kind: sparse\n";
  const Recipe ds = parse_recipe(replaced(kMinimal, sparse_head, sparse_head + "    data_stage: warmup\n"), "ds.yaml");
  EXPECT_EQ(ds.stage("sparse").data_stage, "warmup");
  struct Bad {
    std::string text, expected;
  };
  const std::vector<Bad> bad = {
      {replaced(kMinimal, "data:\n  shards: runs/data/test\n", mix + "  shards: x\n"), "not both"},
      {replaced(kMinimal, "data:\n  shards: runs/data/test\n", "data:\n  sources: []\n"), "non-empty list"},
      {replaced(mix, "weight: 3", "weight: 0"), "key 'data.sources.0.weight': must be > 0"},
      {replaced(mix, "name: retrieval", "name: code"), "'code' names an earlier source too"},
      {replaced(mix, "name: retrieval, ", ""), "key 'data.sources.1.name': missing"},
      {replaced(mix, "weight: 3}", "weight: 3, wieght: 1}"), "key 'data.sources.0.wieght': unknown key"},
      {replaced(kMinimal, "data:\n  shards: runs/data/test\n", "data:\n  shards: [a, b]\n"), "data.sources"},
      {replaced(kMinimal, sparse_head, sparse_head + "    data_stage: nope\n"),
       "key 'stages.2.data_stage': no stage 'nope' in the data plan; stages: dense, warmup, sparse"},
  };
  for (size_t i = 0; i < bad.size(); ++i) {
    const std::string text = bad[i].text.find("model:") == std::string::npos
                                 ? replaced(kMinimal, "data:\n  shards: runs/data/test\n", bad[i].text)
                                 : bad[i].text;
    const std::string e = error_of([&] { parse_recipe(text, "bad.yaml"); });
    EXPECT_NE(e.find(bad[i].expected), std::string::npos) << i << ": " << e;
  }
}

// ---- schedule ----

TEST(Schedule, HandCheckedValues) {
  const LrSchedule cos{Schedule::cosine, 10, 2, 0.1};
  EXPECT_DOUBLE_EQ(cos.factor(0), 0.5);  // warm-up (step + 1) / W
  EXPECT_DOUBLE_EQ(cos.factor(1), 1.0);
  EXPECT_DOUBLE_EQ(cos.factor(2), 1.0);  // cosine starts at the peak
  // p = 3/7: 0.1 + 0.9 * (1 + cos(3 pi / 7)) / 2, cos(3 pi / 7) = 0.22252093395631440
  EXPECT_NEAR(cos.factor(5), 0.1 + 0.9 * 0.5 * 1.22252093395631440, 1e-15);
  EXPECT_NEAR(cos.factor(9), 0.1, 1e-15);  // the last step runs at min_lr_ratio
  EXPECT_NEAR(cos.factor(50), 0.1, 1e-15);
  const LrSchedule mid{Schedule::cosine, 11, 0, 0.1};
  EXPECT_NEAR(mid.factor(5), 0.55, 1e-15);  // p = 1/2
  EXPECT_DOUBLE_EQ(mid.lr(0, 3e-4), 3e-4);
  const LrSchedule flat{Schedule::constant, 100, 4, 0.1};
  EXPECT_DOUBLE_EQ(flat.factor(0), 0.25);
  EXPECT_DOUBLE_EQ(flat.factor(3), 1.0);
  EXPECT_DOUBLE_EQ(flat.factor(99), 1.0);
  const LrSchedule one_after{Schedule::cosine, 3, 2, 0.0};
  EXPECT_DOUBLE_EQ(one_after.factor(2), 1.0);
  EXPECT_THROW(cos.factor(-1), std::runtime_error);
  // Built from a stage.
  const Recipe r = parse_recipe(kMinimal, "minimal.yaml", {"stages.0.warmup_steps=5", "stages.0.min_lr_ratio=0"});
  const LrSchedule s = LrSchedule::of(r.stages[0]);
  EXPECT_DOUBLE_EQ(s.lr(4, 2e-3), 2e-3);
  EXPECT_DOUBLE_EQ(s.lr(9, 2e-3), 0.0);
}

// ---- metrics ----

TEST(Metrics, JsonLinesHoldExactlyThePresentKeys) {
  MetricRecord r;
  r.stage = "dense";
  r.step = 20;
  r.lm_loss = 5.25;
  r.grad_norm = 1.5;
  r.lr = 3e-4;
  r.tokens_per_s = 12345.0;
  EXPECT_EQ(MetricsLogger::json_line(r),
            "{\"stage\": \"dense\", \"step\": 20, \"lm_loss\": 5.25, \"grad_norm\": 1.5, \"lr\": 0.0003, "
            "\"tokens_per_s\": 12345}");
  MetricRecord v;
  v.stage = "sparse";
  v.step = 8;
  v.indexer_kl = 0.5;
  v.val_lm_loss = 6.0;
  v.val_indexer_kl = std::nan("");
  v.recall = 0.75;
  EXPECT_EQ(MetricsLogger::json_line(v),
            "{\"stage\": \"sparse\", \"step\": 8, \"indexer_kl\": 0.5, \"val_lm_loss\": 6, \"val_indexer_kl\": null, "
            "\"recall\": 0.75}");
  MetricRecord m;  // a mixture's evaluation and a GPU progress line
  m.stage = "dense";
  m.step = 3;
  m.peak_mem_gb = 18.25;
  m.val_lm_loss = 2.5;
  m.val_lm_loss_by_source = {{"code", 3.0}, {"retrieval", 1.0}};
  EXPECT_EQ(MetricsLogger::json_line(m),
            "{\"stage\": \"dense\", \"step\": 3, \"peak_mem_gb\": 18.25, \"val_lm_loss\": 2.5, "
            "\"val_lm_loss_by_source\": {\"code\": 3, \"retrieval\": 1}}");
  EXPECT_EQ(MetricsLogger::eval_line(m, 10), "[dense] step  3/10 | val loss 2.5000 (code 3.0000, retrieval 1.0000)");
  EXPECT_EQ(MetricsLogger::train_line(m, 10, 1, 2), "[dense] step  3/10 | mem 18.2 GB | elapsed 1s | ETA 2s");

  const std::string path = (temp_dir() / "metrics_run" / "metrics.jsonl").string();
  {
    MetricsLogger log(path, nullptr);
    log.log_train(r, 100, 10.0, 40.0);
    log.log_eval(v, 8);
  }
  {
    MetricsLogger log(path, nullptr);  // reopening appends
    log.log_train(r, 100, 10.0, 40.0);
  }
  std::istringstream in(read_all(path));
  std::vector<std::string> lines;
  for (std::string l; std::getline(in, l);) lines.push_back(l);
  ASSERT_EQ(lines.size(), 3u);
  EXPECT_EQ(lines[0], MetricsLogger::json_line(r));
  EXPECT_EQ(lines[1], MetricsLogger::json_line(v));
}

TEST(Metrics, TerminalLines) {
  MetricRecord r;
  r.stage = "warmup";
  r.step = 7;
  r.lm_loss = 5.123456;
  r.indexer_kl = 0.25;
  r.grad_norm = 1.5;
  r.lr = 1e-3;
  r.tokens_per_s = 12345;
  EXPECT_EQ(MetricsLogger::train_line(r, 100, 83, 3725),
            "[warmup] step   7/100 | loss 5.1235 | kl 0.2500 | gnorm 1.500 | lr 1.00e-03 | 12.3K tok/s | "
            "elapsed 1m23s | ETA 1h02m");
  MetricRecord v;
  v.stage = "sparse";
  v.step = 40;
  v.val_lm_loss = 5.5;
  v.recall = 0.8312;
  EXPECT_EQ(MetricsLogger::eval_line(v, 80), "[sparse] step 40/80 | val loss 5.5000 | recall 0.8312");
  EXPECT_EQ(MetricsLogger::format_duration(12.4), "12s");
  EXPECT_EQ(MetricsLogger::format_duration(-1), "--");
  EXPECT_DOUBLE_EQ(MetricsLogger::eta_seconds(10.0, 25, 100), 30.0);
  EXPECT_LT(MetricsLogger::eta_seconds(10.0, 0, 100), 0.0);
}

TEST(Metrics, PlotToolWritesPngs) {
  const char* py = std::getenv("DSA_PYTHON") ? std::getenv("DSA_PYTHON")
                   : fs::exists("/usr/bin/python3") ? "/usr/bin/python3"
                                                     : "python3";
  if (std::system((std::string(py) + " -c 'import matplotlib' 2>/dev/null").c_str()) != 0)
    GTEST_SKIP() << "python3-matplotlib is not installed";
  const fs::path runs = temp_dir() / "plot_runs";
  for (const char* name : {"base", "ablation"}) {
    MetricsLogger log((runs / name / "metrics.jsonl").string(), nullptr);
    for (const char* stage : {"dense", "warmup", "sparse"}) {
      if (std::string(name) == "ablation" && std::string(stage) != "sparse") continue;
      for (int step = 1; step <= 20; ++step) {
        MetricRecord r;
        r.stage = stage;
        r.step = step;
        r.lm_loss = 8.0 / step;
        if (std::string(stage) != "dense") r.indexer_kl = 1.0 / step;
        r.lr = 1e-3;
        log.log_train(r, 20, step, 20 - step);
        if (step % 10 == 0) {
          MetricRecord v;
          v.stage = stage;
          v.step = step;
          v.val_lm_loss = 8.5 / step;
          if (std::string(stage) != "dense") v.recall = 0.5 + step / 100.0;
          log.log_eval(v, 20);
        }
      }
    }
  }
  const fs::path out = temp_dir() / "plots";
  const std::string cmd = std::string(py) + " " + DSA_SOURCE_DIR + "/tools/dsa_plot.py " + (runs / "base").string() +
                          " ablation=" + (runs / "ablation" / "metrics.jsonl").string() + " --out " + out.string() +
                          " --smooth 3 > /dev/null";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  for (const char* png : {"loss.png", "indexer_kl.png", "recall.png", "lr.png"}) {
    const std::string data = read_all((out / png).string());
    ASSERT_GT(data.size(), 1000u) << png;
    EXPECT_EQ(data.substr(1, 3), "PNG") << png;
  }
  // `dsa-train plot` goes through run_plot_command, which execs the same script.
  const fs::path out2 = temp_dir() / "plots2";
  std::vector<std::string> args = {(runs / "base").string(), "--out", out2.string()};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  std::fflush(nullptr);
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    std::freopen("/dev/null", "w", stdout);
    _exit(run_plot_command(static_cast<int>(argv.size()), argv.data()));
  }
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
  EXPECT_TRUE(fs::exists(out2 / "loss.png"));
  // A missing metrics file is an error with its path.
  const std::string bad = std::string(py) + " " + DSA_SOURCE_DIR + "/tools/dsa_plot.py /nonexistent/run --out " +
                          out.string() + " 2> /dev/null";
  EXPECT_NE(std::system(bad.c_str()), 0);
}
