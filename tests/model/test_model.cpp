// Whole-model tests on the tiny preset: gradients of every parameter tensor against central finite
// differences (f64), MHA form == MQA form, overfitting one batch, bad configs.
#include <gtest/gtest.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cmath>
#include <fstream>

#include "kernels/ops.h"
#include "model/model.h"
#include "tests/test_util.h"

using namespace dsa;
using namespace dsa::testing;

namespace {

struct Batch {
  Tensor ids, targets;
  int64_t B, T;
};

Batch make_batch(const ModelConfig& cfg, int64_t B, int64_t T, uint64_t seed) {
  Batch b{randint({B * T}, seed, 0, static_cast<int>(cfg.vocab_size)), Tensor(), B, T};
  b.targets = randint({B * T}, seed + 1, 0, static_cast<int>(cfg.vocab_size));
  b.targets.data<int32_t>()[3] = -1;  // an ignored position
  return b;
}

// Larger init than DeepSeek's 0.006 so every path carries signal at this scale.
ModelConfig grad_config() {
  ModelConfig c = preset_config("tiny");
  c.vocab_size = 41;
  c.initializer_range = 0.2;
  return c;
}

double lm_loss(Model& m, const Batch& b, const StepOptions& o) {
  return m.step(b.ids, b.targets, b.B, b.T, o, false).lm_loss_sum * o.lm_grad_scale;
}

void check_all_grads(const StepOptions& opts, uint64_t seed) {
  ModelConfig cfg = grad_config();
  Model m(cfg, DType::F64);
  init_params(m.params(), cfg, seed);
  // Spread the routing bias so selection is stable under the finite-difference steps.
  Batch b = make_batch(cfg, 2, 5, seed + 7);
  m.params().zero_grads();
  m.step(b.ids, b.targets, b.B, b.T, opts, true);
  for (Param& p : m.params().all()) {
    if (p.group != ParamGroup::Main) continue;
    Tensor analytic = p.grad.clone();
    EXPECT_TRUE(grad_check(p.name, p.value, analytic, [&] { return lm_loss(m, b, opts); }, 1e-6, 2e-5, 1e-8, 24))
        << p.name;
  }
}

}  // namespace

TEST(Model, GradientsMatchFiniteDifferencesMHA) {
  StepOptions o;
  o.lm_grad_scale = 1.0 / 9;
  check_all_grads(o, 11);
}

TEST(Model, GradientsMatchFiniteDifferencesMQA) {
  StepOptions o;
  o.form = MlaForm::MQA;
  o.lm_grad_scale = 1.0 / 9;
  check_all_grads(o, 12);
}

TEST(Model, GradientsWithSequenceBalanceLoss) {
  ModelConfig cfg = grad_config();
  Model m(cfg, DType::F64);
  init_params(m.params(), cfg, 5);
  Batch b = make_batch(cfg, 2, 5, 9);
  StepOptions o;
  o.balance_alpha = 0.3;
  m.params().zero_grads();
  StepStats s = m.step(b.ids, b.targets, b.B, b.T, o, true);
  EXPECT_GT(s.balance_loss, 0);
  const std::string gate = layer_prefix(1) + "mlp.gate.weight";
  Tensor analytic = m.params().grad(gate).clone();
  auto total = [&] {
    StepStats t = m.step(b.ids, b.targets, b.B, b.T, o, false);
    return t.lm_loss_sum + t.balance_loss;
  };
  EXPECT_TRUE(grad_check(gate, m.params()[gate], analytic, total, 1e-6, 2e-5, 1e-8));
}

TEST(Model, MhaAndMqaFormsAreTheSameFunction) {
  ModelConfig cfg = grad_config();
  Model a(cfg, DType::F64), b(cfg, DType::F64);
  init_params(a.params(), cfg, 3);
  init_params(b.params(), cfg, 3);
  Batch batch = make_batch(cfg, 2, 6, 4);
  StepOptions oa, ob;
  ob.form = MlaForm::MQA;
  a.params().zero_grads();
  b.params().zero_grads();
  StepStats sa = a.step(batch.ids, batch.targets, batch.B, batch.T, oa, true);
  StepStats sb = b.step(batch.ids, batch.targets, batch.B, batch.T, ob, true);
  EXPECT_NEAR(sa.lm_loss_sum, sb.lm_loss_sum, 1e-10 * std::fabs(sa.lm_loss_sum));
  for (const Param& p : a.params().all()) {
    if (!p.grad.defined()) continue;
    EXPECT_TRUE(all_close(p.grad, b.params().grad(p.name), 1e-8, 1e-12)) << p.name;
  }
}

TEST(Model, TinyModelOverfitsOneBatch) {
  ModelConfig cfg = preset_config("tiny");
  cfg.vocab_size = 64;
  cfg.initializer_range = 0.02;
  Model m(cfg, DType::F32);
  init_params(m.params(), cfg, 1);
  Batch b = make_batch(cfg, 2, 16, 2);
  b.targets.data<int32_t>()[3] = 5;
  StepOptions o;
  o.lm_grad_scale = 1.0 / 32;
  std::vector<Tensor> mom, var;
  for (const Param& p : m.params().all()) {
    mom.push_back(Tensor::zeros(p.value.shape(), DType::F32));
    var.push_back(Tensor::zeros(p.value.shape(), DType::F32));
  }
  ops::AdamWConfig ac;
  ac.lr = 1e-2;
  ac.weight_decay = 0;
  double first = 0, last = 0;
  for (int step = 1; step <= 150; ++step) {
    m.params().zero_grads();
    StepStats s = m.step(b.ids, b.targets, b.B, b.T, o, true);
    if (step == 1) first = s.lm_loss_sum / s.lm_tokens;
    last = s.lm_loss_sum / s.lm_tokens;
    size_t i = 0;
    for (Param& p : m.params().all()) {
      if (p.group == ParamGroup::Main) ops::adamw_step_(p.value, p.grad, mom[i], var[i], ac, step);
      ++i;
    }
  }
  EXPECT_NEAR(first, std::log(64.0), 0.1);
  EXPECT_LT(last, 0.05) << "first " << first;
}

TEST(Model, MoeBiasSteersSelectionOnly) {
  ModelConfig cfg = grad_config();
  Model m(cfg, DType::F64);
  init_params(m.params(), cfg, 8);
  Batch b = make_batch(cfg, 1, 8, 3);
  StepOptions o;
  m.step(b.ids, b.targets, 1, 8, o, false);
  ASSERT_EQ(m.expert_loads().size(), 1u);
  double total = 0;
  for (int64_t e = 0; e < cfg.n_routed_experts; ++e) total += m.expert_loads()[0].item(e);
  EXPECT_EQ(total, 8 * cfg.num_experts_per_tok);
  std::vector<Tensor> loads = m.expert_loads();
  m.update_moe_bias(loads, 0.01);
  const Tensor& bias = m.params()[layer_prefix(1) + "mlp.gate.e_score_correction_bias"];
  const double mean = total / cfg.n_routed_experts;
  for (int64_t e = 0; e < cfg.n_routed_experts; ++e) {
    const double l = loads[0].item(e);
    EXPECT_FLOAT_EQ(bias.item(e), l < mean ? 0.01f : (l > mean ? -0.01f : 0.0f));
  }
}

TEST(Config, BadConfigsNameTheKey) {
  auto error_of = [](const std::string& yaml) -> std::string {
    try {
      ModelConfig::from_yaml(YAML::Load(yaml), "test.yaml", true);
    } catch (const std::runtime_error& e) {
      return e.what();
    }
    return "";
  };
  const std::string base =
      "vocab_size: 64\nhidden_size: 32\nnum_hidden_layers: 2\nfirst_k_dense_replace: 1\nnum_attention_heads: 2\n"
      "q_lora_rank: 16\nkv_lora_rank: 12\nqk_nope_head_dim: 8\nqk_rope_head_dim: 4\nv_head_dim: 6\n"
      "intermediate_size: 40\nmoe_intermediate_size: 12\nn_routed_experts: 8\nnum_experts_per_tok: 2\n"
      "n_group: 4\ntopk_group: 2\nn_shared_experts: 1\nindex_n_heads: 2\nindex_head_dim: 8\nindex_topk: 4\n";
  EXPECT_EQ(error_of(base), "");
  // Missing key.
  std::string missing = base;
  missing.replace(missing.find("hidden_size: 32\n"), 16, "");
  EXPECT_NE(error_of(missing).find("missing required model key 'hidden_size'"), std::string::npos)
      << error_of(missing);
  // Experts that do not divide into groups.
  std::string groups = base;
  groups.replace(groups.find("n_group: 4"), 10, "n_group: 3");
  EXPECT_NE(error_of(groups).find("key 'n_group' must divide n_routed_experts=8"), std::string::npos)
      << error_of(groups);
  // Rope dims larger than the indexer head.
  std::string rope = base;
  rope.replace(rope.find("qk_rope_head_dim: 4"), 19, "qk_rope_head_dim: 16");
  EXPECT_NE(error_of(rope).find("key 'qk_rope_head_dim' (16) must not exceed index_head_dim (8)"), std::string::npos)
      << error_of(rope);
  // Wrong type, with the line number.
  std::string type = base;
  type.replace(type.find("num_attention_heads: 2"), 22, "num_attention_heads: two");
  EXPECT_NE(error_of(type).find("test.yaml:5: key 'num_attention_heads' must be an integer, got 'two'"),
            std::string::npos)
      << error_of(type);
  // Unknown key in a strict (recipe) mapping.
  EXPECT_NE(error_of(base + "hiden_size: 3\n").find("unknown model key 'hiden_size'"), std::string::npos);
  // Odd rope dims.
  std::string odd = base;
  odd.replace(odd.find("qk_rope_head_dim: 4"), 19, "qk_rope_head_dim: 3");
  EXPECT_NE(error_of(odd).find("qk_rope_head_dim' must be even"), std::string::npos) << error_of(odd);
}

TEST(Config, HfJsonRoundTrip) {
  ModelConfig c = preset_config("bench-small");
  c.rope_scaling.type = "yarn";
  c.rope_scaling.factor = 40;
  c.rope_scaling.mscale = 1;
  c.rope_scaling.mscale_all_dim = 1;
  const std::string path = ::testing::TempDir() + "/config.json";
  std::ofstream(path) << c.to_hf_json();
  ModelConfig r = ModelConfig::from_file(path);
  EXPECT_EQ(r.to_yaml(), c.to_yaml());
  EXPECT_NEAR(r.attention_scale(), std::pow(0.1 * std::log(40.0) + 1, 2) / std::sqrt(96.0), 1e-12);
  EXPECT_NEAR(static_cast<double>(preset_config("bench-small").parameter_count()), 483e6, 5e6);
}

TEST(Model, ActivationRecomputationGivesIdenticalGradients) {
  for (bool sparse : {false, true}) {
    ModelConfig cfg = grad_config();
    Model a(cfg, DType::F64), b(cfg, DType::F64);
    init_params(a.params(), cfg, 13);
    init_params(b.params(), cfg, 13);
    Batch batch = make_batch(cfg, 2, 6, 14);
    StepOptions o;
    if (sparse) {
      o.attention = AttentionMode::Sparse;
      o.indexer_loss = IndexerLossMode::Sparse;
      o.train_indexer = true;
      o.detach_indexer_input = false;
    }
    StepOptions r = o;
    r.recompute = true;
    a.params().zero_grads();
    b.params().zero_grads();
    StepStats sa = a.step(batch.ids, batch.targets, batch.B, batch.T, o, true);
    StepStats sb = b.step(batch.ids, batch.targets, batch.B, batch.T, r, true);
    EXPECT_EQ(sa.lm_loss_sum, sb.lm_loss_sum);
    EXPECT_EQ(sa.indexer_kl_sum, sb.indexer_kl_sum);
    for (const Param& p : a.params().all()) {
      if (!p.grad.defined()) continue;
      EXPECT_TRUE(all_close(p.grad, b.params().grad(p.name), 0, 0)) << p.name << (sparse ? " sparse" : " dense");
    }
  }
}

// The forced-routing hook (StepOptions::forced_experts): routing to the router's own choice is the same
// step (loss and every gradient to f64 rounding: the weights are recomputed from the same scores in
// another order), and routing to another choice is a different function that still trains the experts it
// names.
TEST(Model, ForcedExpertsReproduceTheRoutersOwnChoiceAndChangeWithIt) {
  ModelConfig cfg = grad_config();
  Model a(cfg, DType::F64), b(cfg, DType::F64);
  init_params(a.params(), cfg, 21);
  init_params(b.params(), cfg, 21);
  Batch batch = make_batch(cfg, 2, 6, 22);
  std::vector<Tensor> experts;
  StepOptions probe;
  probe.capture_experts = &experts;
  a.params().zero_grads();
  const StepStats sa = a.step(batch.ids, batch.targets, batch.B, batch.T, probe, true);
  int moe_layers = 0;
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) moe_layers += l < static_cast<int64_t>(experts.size()) && experts[l].defined();
  ASSERT_GT(moe_layers, 0);
  StepOptions forced;
  forced.forced_experts = &experts;
  b.params().zero_grads();
  const StepStats sb = b.step(batch.ids, batch.targets, batch.B, batch.T, forced, true);
  EXPECT_NEAR(sa.lm_loss_sum, sb.lm_loss_sum, 1e-12 * std::fabs(sa.lm_loss_sum));
  for (const Param& p : a.params().all()) {
    if (!p.grad.defined()) continue;
    EXPECT_TRUE(all_close(p.grad, b.params().grad(p.name), 1e-10, 1e-14)) << p.name;
  }
  // Another choice: every token's last slot moved to the next expert not already chosen.
  std::vector<Tensor> other = experts;
  for (Tensor& t : other) {
    if (!t.defined()) continue;
    t = t.clone();
    const int64_t N = t.size(0), K = t.size(1);
    for (int64_t n = 0; n < N; ++n) {
      int32_t* row = t.data<int32_t>() + n * K;
      int32_t e = row[K - 1];
      auto taken = [&](int32_t x) { return std::find(row, row + K - 1, x) != row + K - 1; };
      do e = static_cast<int32_t>((e + 1) % cfg.n_routed_experts); while (taken(e));
      row[K - 1] = e;
    }
  }
  forced.forced_experts = &other;
  const StepStats sc = b.step(batch.ids, batch.targets, batch.B, batch.T, forced, false);
  EXPECT_GT(std::fabs(sc.lm_loss_sum - sa.lm_loss_sum), 1e-6 * std::fabs(sa.lm_loss_sum));
}
