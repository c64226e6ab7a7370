// The DeepSeek-family variants at the model level (SPEC.md §1b): no query LoRA (q_proj, and the
// indexer's own wq), softmax routing (greedy, group-limited by the group's max), rotate-half MLA RoPE,
// the batch-level balance loss and the MTP layer. Every new gradient against central finite
// differences (f64), the MHA and MQA forms against each other, the indexer's no-LoRA input path, the
// MTP loss against a direct composition of the ops, and the configuration keys.
#include <gtest/gtest.h>
#include <yaml-cpp/yaml.h>

#include <cmath>

#include "kernels/ops.h"
#include "model/hf_config.h"
#include "model/model.h"
#include "tests/test_util.h"

using namespace dsa;
using namespace dsa::testing;

namespace {

// Every new path at once: no query LoRA, softmax routing with group-limited greedy (group max),
// rotate-half RoPE, an MTP layer; odd head dims, 3 layers, 2 shared experts.
ModelConfig combined_config() {
  ModelConfig c = preset_config("tiny");
  c.vocab_size = 29;
  c.num_hidden_layers = 3;
  c.q_lora_rank = 0;
  c.qk_nope_head_dim = 5;
  c.v_head_dim = 3;
  c.n_shared_experts = 2;
  c.scoring_func = "softmax";
  c.topk_method = "group_limited_greedy";
  c.norm_topk_prob = false;
  c.routed_scaling_factor = 1.5;
  c.rope_interleave = false;
  c.num_nextn_predict_layers = 1;
  c.initializer_range = 0.2;
  c.index_topk = 3;
  c.validate("test");
  return c;
}

// DeepSeek-V3 with its MTP layer (query LoRA, sigmoid routing with the correction bias).
ModelConfig v3_mtp_config() {
  ModelConfig c = preset_config("tiny");
  c.vocab_size = 31;
  c.num_nextn_predict_layers = 1;
  c.initializer_range = 0.2;
  c.index_topk = 3;
  c.validate("test");
  return c;
}

struct Fixture {
  ModelConfig cfg;
  Model m;
  Tensor ids, targets;
  int64_t B = 2, T = 6;
  Fixture(const ModelConfig& c, uint64_t seed) : cfg(c), m(c, DType::F64) {
    init_params(m.params(), cfg, seed);
    // A non-trivial routing bias where there is one.
    for (Param& p : m.params().all())
      if (p.group == ParamGroup::Buffer) p.value.copy_from(randn(p.value.shape(), seed + 3, 0.05, DType::F32));
    ids = randint({B * T}, seed + 1, 0, static_cast<int>(cfg.vocab_size));
    targets = randint({B * T}, seed + 2, 0, static_cast<int>(cfg.vocab_size));
    targets.data<int32_t>()[4] = -1;  // an ignored position (and an unknown MTP input)
  }
  StepStats run(const StepOptions& o, bool backward) { return m.step(ids, targets, B, T, o, backward); }
  // The objective whose gradient step() returns: lm_grad_scale * (LM + w * MTP) + balance loss.
  double objective(const StepOptions& o) {
    const StepStats s = run(o, false);
    return o.lm_grad_scale * (s.lm_loss_sum + o.mtp_loss_weight * s.mtp_loss_sum) + s.balance_loss;
  }
};

// Finite differences of the objective for every main parameter (only_mtp: the MTP layer's and the
// tensors it shares, when the rest is covered elsewhere), max_elems elements of each.
void check_main_grads(Fixture& f, const StepOptions& o, int64_t max_elems, const char* what, bool only_mtp = false) {
  f.m.params().zero_grads();
  f.run(o, true);
  int checked = 0;
  for (Param& p : f.m.params().all()) {
    if (p.group != ParamGroup::Main) continue;
    const bool shared = p.name == "model.embed_tokens.weight" || p.name == "lm_head.weight";
    if (only_mtp && !shared && !is_mtp_param(f.cfg, p.name)) continue;
    Tensor analytic = p.grad.clone();
    EXPECT_TRUE(grad_check(
        p.name, p.value, analytic, [&] { return f.objective(o); }, 1e-6, 2e-5, 1e-8, max_elems))
        << what << ": " << p.name;
    ++checked;
  }
  EXPECT_GT(checked, 0);
}

}  // namespace

TEST(ModelFamilies, ParameterNamesFollowTheConfig) {
  const ModelConfig c = combined_config();
  ParamStore ps = make_params(c);
  const std::string a = layer_prefix(1) + "self_attn.";
  EXPECT_TRUE(ps.has(a + "q_proj.weight"));
  EXPECT_EQ(ps[a + "q_proj.weight"].shape(), Shape({c.num_attention_heads * c.qk_head_dim(), c.hidden_size}));
  EXPECT_FALSE(ps.has(a + "q_a_proj.weight"));
  EXPECT_TRUE(ps.has(a + "indexer.wq.weight"));
  EXPECT_EQ(ps[a + "indexer.wq.weight"].shape(), Shape({c.index_n_heads * c.index_head_dim, c.hidden_size}));
  EXPECT_FALSE(ps.has(a + "indexer.wq_b.weight"));
  EXPECT_FALSE(ps.has(layer_prefix(1) + "mlp.gate.e_score_correction_bias"));  // softmax: no bias
  const std::string mtp = layer_prefix(3);
  for (const char* n : {"enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                        "self_attn.indexer.wq.weight", "mlp.experts.gate_up_proj"})
    EXPECT_TRUE(ps.has(mtp + n)) << n;
  EXPECT_EQ(ps[mtp + "eh_proj.weight"].shape(), Shape({c.hidden_size, 2 * c.hidden_size}));
  EXPECT_FALSE(ps.has(mtp + "embed_tokens.weight"));  // shared with the main model
  EXPECT_TRUE(is_mtp_param(c, mtp + "enorm.weight"));
  EXPECT_FALSE(is_mtp_param(c, layer_prefix(2) + "input_layernorm.weight"));
  EXPECT_EQ(ps.numel(), c.parameter_count());
  ParamStore v3 = make_params(v3_mtp_config());
  EXPECT_TRUE(v3.has(layer_prefix(2) + "mlp.gate.e_score_correction_bias"));  // the MTP layer's router
  EXPECT_TRUE(v3.has(layer_prefix(2) + "self_attn.indexer.wq_b.weight"));
}

TEST(ModelFamilies, GradientsNoQLoraSoftmaxRotateHalfMtp) {
  Fixture f(combined_config(), 41);
  StepOptions o;
  o.lm_grad_scale = 1.0 / 10;
  o.mtp_loss_weight = 0.3;
  o.balance_alpha = 0.2;
  o.balance_per_sequence = false;  // DeepSeek-V2's batch-level loss
  check_main_grads(f, o, 5, "combined");
}

TEST(ModelFamilies, GradientsV3MtpSparse) {
  Fixture f(v3_mtp_config(), 43);
  StepOptions o;
  o.attention = AttentionMode::Sparse;
  o.fp8_indexer = false;
  o.lm_grad_scale = 1.0 / 10;
  o.mtp_loss_weight = 0.5;
  // The main layers' sparse gradients are checked in test_model_dsa; here the MTP layer and what it shares.
  check_main_grads(f, o, 5, "v3 mtp sparse", /*only_mtp=*/true);
}

TEST(ModelFamilies, MhaAndMqaFormsAreTheSameFunctionWithoutQLora) {
  for (bool interleave : {true, false}) {
    ModelConfig cfg = combined_config();
    cfg.rope_interleave = interleave;
    Fixture a(cfg, 45), b(cfg, 45);
    StepOptions oa, ob;
    oa.mtp_loss_weight = ob.mtp_loss_weight = 0.3;
    ob.form = MlaForm::MQA;
    a.m.params().zero_grads();
    b.m.params().zero_grads();
    StepStats sa = a.run(oa, true), sb = b.run(ob, true);
    // f64 throughout: the two forms differ by reassociation only (~1e-16 per op).
    EXPECT_NEAR(sa.lm_loss_sum, sb.lm_loss_sum, 1e-10 * std::fabs(sa.lm_loss_sum));
    EXPECT_NEAR(sa.mtp_loss_sum, sb.mtp_loss_sum, 1e-10 * std::fabs(sa.mtp_loss_sum));
    for (const Param& p : a.m.params().all()) {
      if (p.grad.defined()) {
        EXPECT_TRUE(all_close(p.grad, b.m.params().grad(p.name), 1e-8, 1e-12)) << p.name;
      }
    }
  }
}

TEST(ModelFamilies, RotateHalfRopeIsADifferentFunction) {
  ModelConfig a = combined_config(), b = combined_config();
  b.rope_interleave = true;
  Fixture fa(a, 46), fb(b, 46);
  StepOptions o;
  EXPECT_NE(fa.run(o, false).lm_loss_sum, fb.run(o, false).lm_loss_sum);
}

TEST(ModelFamilies, MtpLossIsTheComposedOps) {
  // The MTP loss rebuilt from the ops: embed(t_{i+1}) and the final normed hidden state, the norms,
  // eh_proj, the decoder layer (taken from the model's capture), shared_head.norm, lm_head, CE on t_{i+2}.
  Fixture f(v3_mtp_config(), 47);
  StepOptions o;
  o.mtp_loss_weight = 1.0;
  std::vector<Tensor> layers;
  Tensor mtp_logits;
  o.capture_layer_outputs = &layers;
  o.capture_mtp_logits = &mtp_logits;
  StepStats s = f.run(o, false);
  ASSERT_EQ(layers.size(), static_cast<size_t>(f.cfg.num_hidden_layers + 1));
  const ModelConfig& c = f.cfg;
  const ParamStore& ps = f.m.params();
  const std::string p = layer_prefix(c.mtp_layer());
  Tensor rstd;
  Tensor yn = ops::rmsnorm_forward(layers.back(), ps[p + "shared_head.norm.weight"], c.rms_norm_eps, &rstd);
  Tensor logits = ops::linear_forward(yn, ps["lm_head.weight"]);
  EXPECT_TRUE(all_close(logits, mtp_logits, 1e-12, 1e-12));
  const int64_t N = f.B * f.T, V = c.vocab_size;
  double sum = 0;
  int64_t count = 0;
  for (int64_t i = 0; i < N; ++i) {
    const int32_t t1 = f.targets.data<int32_t>()[i];
    if (t1 < 0 || (i % f.T) + 1 >= f.T) continue;
    const int32_t t2 = f.targets.data<int32_t>()[i + 1];
    if (t2 < 0) continue;
    double m = -INFINITY, z = 0;
    for (int64_t v = 0; v < V; ++v) m = std::max(m, logits.item(i * V + v));
    for (int64_t v = 0; v < V; ++v) z += std::exp(logits.item(i * V + v) - m);
    sum += m + std::log(z) - logits.item(i * V + t2);
    ++count;
  }
  EXPECT_EQ(s.mtp_tokens, count);
  EXPECT_NEAR(s.mtp_loss_sum, sum, 1e-10 * sum);
  // The main model is untouched by running the MTP layer.
  StepOptions off;
  StepStats s0 = f.run(off, false);
  EXPECT_EQ(s0.lm_loss_sum, s.lm_loss_sum);
  EXPECT_EQ(s0.mtp_tokens, 0);
}

TEST(ModelFamilies, MtpIndexerIsTrainedByItsOwnKl) {
  Fixture f(v3_mtp_config(), 48);
  StepOptions o;
  o.mtp_loss_weight = 0.3;
  o.indexer_loss = IndexerLossMode::Dense;
  o.fp8_indexer = false;
  o.train_main = false;
  o.train_indexer = true;
  f.m.params().zero_grads();
  StepStats s = f.run(o, true);
  EXPECT_EQ(s.indexer_rows, (f.cfg.num_hidden_layers + 1) * f.B * f.T);
  const std::string w = layer_prefix(f.cfg.mtp_layer()) + "self_attn.indexer.wq_b.weight";
  Tensor analytic = f.m.params().grad(w).clone();
  EXPECT_TRUE(grad_check(
      w, f.m.params()[w], analytic, [&] { return f.run(o, false).indexer_kl_sum; }, 1e-6, 2e-5, 1e-9, 8));
}

TEST(ModelFamilies, IndexerWithoutQLoraReadsTheHiddenState) {
  // The indexer's query input path without a query LoRA: dq reaches x through wq (dcq stays undefined).
  ModelConfig cfg = combined_config();
  ParamStore ps = make_params(cfg, DType::F64);
  init_params(ps, cfg, 49);
  const int64_t N = 5, Hi = cfg.index_n_heads, di = cfg.index_head_dim;
  RopeTables rope = make_rope_tables(cfg, N, DType::F64, Device::CPU);
  Tensor positions = Tensor::empty({N}, DType::I32);
  for (int64_t i = 0; i < N; ++i) positions.data<int32_t>()[i] = static_cast<int32_t>(i);
  Tensor x = randn({N, cfg.hidden_size}, 50);
  Tensor gq = randn({N, Hi, di}, 51), gk = randn({N, di}, 52), gw = randn({N, Hi}, 53);
  const std::string prefix = layer_prefix(0);
  auto loss = [&] {
    IndexerCache c;
    indexer_forward(ps, prefix, cfg, rope, positions, x, Tensor(), c);
    return dot(c.q, gq) + dot(c.k, gk) + dot(c.w, gw);
  };
  IndexerCache c;
  indexer_forward(ps, prefix, cfg, rope, positions, x, Tensor(), c);
  ps.zero_grads();
  Tensor dx, dcq;
  indexer_backward(ps, prefix, cfg, rope, positions, c, gq, gk, gw, &dx, &dcq);
  EXPECT_FALSE(dcq.defined());
  EXPECT_TRUE(grad_check("x", x, dx, loss));
  const std::string wq = prefix + "self_attn.indexer.wq.weight";
  Tensor analytic = ps.grad(wq).clone();
  EXPECT_TRUE(grad_check(wq, ps[wq], analytic, loss));
}

TEST(ModelFamilies, SoftmaxModelHasNoBiasToUpdate) {
  Fixture f(combined_config(), 54);
  StepOptions o;
  f.run(o, false);
  std::vector<Tensor> loads = f.m.expert_loads();
  EXPECT_EQ(loads.size(), 2u);       // layers 1 and 2 (the MTP layer did not run)
  f.m.update_moe_bias(loads, 0.01);  // a no-op, not an error
  // With the MTP layer: one more load tensor, and the sigmoid model's MTP router bias moves too.
  Fixture g(v3_mtp_config(), 55);
  o.mtp_loss_weight = 0.3;
  g.run(o, false);
  ASSERT_EQ(g.m.expert_loads().size(), 2u);
  const std::string bias = layer_prefix(2) + "mlp.gate.e_score_correction_bias";
  Tensor before = g.m.params()[bias].clone();
  g.m.update_moe_bias(g.m.expert_loads(), 0.01);
  EXPECT_FALSE(all_close(before, g.m.params()[bias], 0, 0));
}

TEST(ModelFamilies, ConfigKeysRoundTripAndRefusals) {
  auto error_of = [](const std::string& yaml) -> std::string {
    try {
      ModelConfig::from_yaml(YAML::Load(yaml), "test.yaml", true);
    } catch (const std::runtime_error& e) {
      return e.what();
    }
    return "";
  };
  const ModelConfig c = combined_config();
  const std::string yaml = c.to_yaml();
  EXPECT_NE(yaml.find("q_lora_rank: null"), std::string::npos);
  EXPECT_NE(yaml.find("scoring_func: softmax"), std::string::npos);
  EXPECT_NE(yaml.find("rope_interleave: false"), std::string::npos);
  EXPECT_EQ(ModelConfig::from_yaml(YAML::Load(yaml), "rt", true).to_yaml(), yaml);
  // A V3.2-style model writes none of the new keys (older builds read its YAML).
  const std::string tiny = preset_config("tiny").to_yaml();
  for (const char* k : {"scoring_func", "topk_method", "rope_interleave", "num_nextn_predict_layers"})
    EXPECT_EQ(tiny.find(k), std::string::npos) << k;
  auto with = [&](const std::string& key, const std::string& value) {
    std::string y = preset_config("tiny").to_yaml();
    return y + key + ": " + value + "\n";
  };
  EXPECT_NE(error_of(with("scoring_func", "relu")).find("key 'scoring_func' must be sigmoid"), std::string::npos);
  EXPECT_NE(
      error_of(with("topk_method", "greedy")).find("key 'topk_method' must be noaux_tc with scoring_func sigmoid"),
      std::string::npos);
  EXPECT_NE(error_of(with("num_nextn_predict_layers", "2")).find("key 'num_nextn_predict_layers' must be 0 or 1"),
            std::string::npos);
  std::string softmax_norm = with("scoring_func", "softmax") + "topk_method: greedy\n";  // tiny has norm_topk_prob true
  EXPECT_NE(error_of(softmax_norm).find("key 'norm_topk_prob' true with scoring_func softmax"), std::string::npos)
      << error_of(softmax_norm);
  std::string zero = preset_config("tiny").to_yaml();
  zero.replace(zero.find("q_lora_rank: 16"), 15, "q_lora_rank: 0");
  EXPECT_NE(error_of(zero).find("key 'q_lora_rank' must be a positive integer or null"), std::string::npos)
      << error_of(zero);
  // Greedy routing ignores the groups: top-k may exceed topk_group * experts per group.
  ModelConfig g = preset_config("tiny");
  g.scoring_func = "softmax";
  g.topk_method = "greedy";
  g.norm_topk_prob = false;
  g.n_group = 4;
  g.topk_group = 1;
  g.num_experts_per_tok = 3;
  EXPECT_NO_THROW(g.validate("test"));
  // The config.json key table names every key's use.
  const std::string table = hf_config_key_table();
  for (const char* k : {"scoring_func", "hidden_act", "ep_size", "quantization_config", "rope_interleave"})
    EXPECT_NE(table.find(k), std::string::npos) << k;
}
