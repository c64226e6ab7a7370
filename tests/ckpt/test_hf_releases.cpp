// Releases as published (SPEC.md §1b): DeepSeek-V3/V3.1 (FP8, per-expert, sharded, MTP, no indexer),
// Moonlight-16B-A3B (no query LoRA), DeepSeek-V2-Lite / V2 (softmax routing) import with the config
// files of tests/ckpt/hf_release_util.h; every function-changing key is read or refused by name;
// export names the transformers class, round-trips, and --fp8 writes the release format.
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>

#include "model/hf_io.h"
#include "tests/ckpt/ckpt_util.h"
#include "tests/ckpt/hf_release_util.h"
#include "tests/test_util.h"

using namespace dsa;
using namespace dsa::testing;

namespace {

// The tiny V3.2 preset as each family has it (dimensions only: config.json decides the rest).
ModelConfig v3_model(int64_t mtp) {
  ModelConfig c = preset_config("tiny");
  c.num_nextn_predict_layers = mtp;
  c.max_position_embeddings = 4000;  // the release's YaRN: original_max_position_embeddings = 4000 / 40
  return c;
}
ModelConfig moonlight_model() {
  ModelConfig c = preset_config("tiny");
  c.q_lora_rank = 0;
  c.n_group = 1;
  c.topk_group = 1;
  c.n_shared_experts = 2;
  c.routed_scaling_factor = 2.446;
  return c;
}
ModelConfig v2_model(const std::string& topk_method) {
  ModelConfig c = preset_config("tiny");
  c.scoring_func = "softmax";
  c.topk_method = topk_method;
  c.norm_topk_prob = false;
  c.n_shared_experts = 2;
  if (topk_method == "greedy") {
    c.q_lora_rank = 0;
    c.n_group = c.topk_group = 1;
    c.routed_scaling_factor = 1.0;
  } else {
    c.routed_scaling_factor = 16.0;
  }
  return c;
}

ParamStore random_params(const ModelConfig& c, uint64_t seed) {
  ParamStore ps = make_params(c);
  init_params(ps, c, seed);
  for (Param& p : ps.all())
    if (p.value.ndim() == 1)
      p.value.copy_from(randn(p.value.shape(), seed ^ std::hash<std::string>()(p.name), 0.1, DType::F32));
  return ps;
}

bool is_indexer_name(const std::string& n) { return n.find(".indexer.") != std::string::npos; }

// The release's tensors: per-expert names, bf16, the decoder layers' 2-D linear weights in FP8 with a
// 128x128 weight_scale_inv (quantized here, not by the exporter), no indexer, and the MTP layer's copies
// of the embedding and head. `expect` gets the f32 values import must produce.
std::vector<std::pair<std::string, Tensor>> release_tensors(const ModelConfig& c, const ParamStore& ps, bool fp8,
                                                            std::map<std::string, Tensor>* expect) {
  HfExportOptions opt;
  opt.dtype = DType::BF16;
  opt.per_expert = true;
  std::vector<std::pair<std::string, Tensor>> out;
  for (auto& [name, t] : hf_tensors_for_export(c, ps, {}, opt)) {
    if (is_indexer_name(name)) continue;
    const bool layer_linear =
        t.ndim() == 2 && name.rfind("model.layers.", 0) == 0 && name.find("norm") == std::string::npos &&
        name.find("mlp.gate.weight") == std::string::npos && name.find("eh_proj") == std::string::npos &&
        name.find("shared_head") == std::string::npos && name.find("embed_tokens") == std::string::npos;
    if (fp8 && layer_linear) {
      auto [q, s] = quant_fp8_blocks(t.to(DType::F32), 128);
      if (expect) (*expect)[name] = dequant_fp8_blocks(q, s, 128, name);
      out.emplace_back(name, q);
      out.emplace_back(name + "_scale_inv", s);
    } else {
      if (expect) (*expect)[name] = t.to(DType::F32);
      out.emplace_back(name, t);
    }
  }
  return out;
}

void write_release(const std::string& dir, const std::string& config_json,
                   const std::vector<std::pair<std::string, Tensor>>& tensors, uint64_t shard_bytes = 40000) {
  write_safetensors_sharded(dir, tensors, shard_bytes, {{"format", "pt"}});
  std::ofstream(dir + "/config.json") << config_json;
}

bool has_warning(const HfModel& m, const std::string& part) {
  for (const std::string& w : m.warnings)
    if (w.find(part) != std::string::npos) return true;
  return false;
}

// Dims of the tiny preset's indexer, for releases without one.
IndexerDims tiny_indexer() { return IndexerDims{2, 8, 4}; }

}  // namespace

TEST(HfReleases, V3Fp8ReleaseImportsWithAFreshIndexerAndItsMtpLayer) {
  ScratchDir dir;
  const ModelConfig c = v3_model(1);
  ParamStore ps = random_params(c, 3);
  std::map<std::string, Tensor> expect;
  write_release(dir / "v3", v3_release_config(c, true, 1), release_tensors(c, ps, true, &expect));
  ASSERT_TRUE(std::ifstream(dir / "v3/model.safetensors.index.json").good()) << "the release must be sharded";
  HfImportOptions io;
  io.indexer = tiny_indexer();
  io.indexer_seed = 77;
  HfModel m = import_hf(dir / "v3", io);
  EXPECT_TRUE(m.indexer_fresh);
  EXPECT_TRUE(m.indexer_dims_from_options);
  EXPECT_TRUE(has_warning(m, "freshly initialized (seed 77)")) << m.warnings.size();
  EXPECT_EQ(m.cfg.num_nextn_predict_layers, 1);
  EXPECT_EQ(m.cfg.scoring_func, "sigmoid");
  EXPECT_EQ(m.cfg.rope_scaling.type, "yarn");
  EXPECT_EQ(m.cfg.index_n_heads, 2);
  // Every non-indexer tensor is the release's value (FP8 dequantized, experts fused); the MTP layer too.
  const int64_t I = c.moe_intermediate_size, D = c.hidden_size;
  int checked = 0;
  for (const Param& p : m.params.all()) {
    if (p.group == ParamGroup::Indexer) continue;
    if (p.value.ndim() == 3 && p.name.find("gate_up_proj") != std::string::npos) {
      const std::string base = p.name.substr(0, p.name.size() - strlen("gate_up_proj"));
      for (int64_t e = 0; e < c.n_routed_experts; ++e)
        for (int64_t k = 0; k < I * D; ++k) {
          ASSERT_EQ(p.value.item(e * 2 * I * D + k), expect.at(base + std::to_string(e) + ".gate_proj.weight").item(k));
          ASSERT_EQ(p.value.item(e * 2 * I * D + I * D + k),
                    expect.at(base + std::to_string(e) + ".up_proj.weight").item(k));
        }
    } else if (p.value.ndim() == 3) {  // routed experts' down_proj
      const std::string base = p.name.substr(0, p.name.size() - strlen("down_proj"));
      for (int64_t e = 0; e < c.n_routed_experts; ++e)
        for (int64_t k = 0; k < I * D; ++k)
          ASSERT_EQ(p.value.item(e * I * D + k), expect.at(base + std::to_string(e) + ".down_proj.weight").item(k));
    } else {
      ASSERT_TRUE(expect.count(p.name)) << p.name;
      EXPECT_TRUE(same_bits(p.value, expect.at(p.name))) << p.name;
    }
    checked += is_mtp_param(m.cfg, p.name);
  }
  EXPECT_GT(checked, 10) << "the MTP layer's tensors";
  // Without options: V3.2's indexer (64 heads x 128, top-2048).
  HfModel d = import_hf(dir / "v3");
  EXPECT_EQ(d.cfg.index_n_heads, 64);
  EXPECT_EQ(d.cfg.index_head_dim, 128);
  EXPECT_EQ(d.cfg.index_topk, 2048);
  EXPECT_EQ(d.params["model.layers.0.self_attn.indexer.wq_b.weight"].shape(), Shape({64 * 128, c.q_lora_rank}));
}

TEST(HfReleases, MoonlightImportsWithoutQueryLora) {
  ScratchDir dir;
  const ModelConfig c = moonlight_model();
  ParamStore ps = random_params(c, 4);
  std::map<std::string, Tensor> expect;
  write_release(dir / "ml", moonlight_release_config(c), release_tensors(c, ps, false, &expect));
  HfImportOptions io;
  io.indexer = tiny_indexer();
  HfModel m = import_hf(dir / "ml", io);
  EXPECT_FALSE(m.cfg.has_q_lora());
  EXPECT_TRUE(m.indexer_fresh);
  const std::string q = "model.layers.1.self_attn.q_proj.weight";
  EXPECT_TRUE(same_bits(m.params[q], expect.at(q)));
  EXPECT_EQ(m.params["model.layers.1.self_attn.indexer.wq.weight"].shape(), Shape({2 * 8, c.hidden_size}));
  EXPECT_NEAR(m.cfg.routed_scaling_factor, 2.446, 1e-12);
}

TEST(HfReleases, V2LiteAndV2ImportWithSoftmaxRouting) {
  for (const std::string method : {"greedy", "group_limited_greedy"}) {
    ScratchDir dir;
    const ModelConfig c = v2_model(method);
    ParamStore ps = random_params(c, 5);
    std::map<std::string, Tensor> expect;
    auto tensors = release_tensors(c, ps, false, &expect);
    for (const auto& kv : tensors) ASSERT_EQ(kv.first.find("e_score_correction_bias"), std::string::npos);
    write_release(dir / "v2", v2_release_config(c, method), tensors);
    HfImportOptions io;
    io.indexer = tiny_indexer();
    HfModel m = import_hf(dir / "v2", io);
    EXPECT_EQ(m.cfg.scoring_func, "softmax") << method;
    EXPECT_EQ(m.cfg.topk_method, method);
    EXPECT_FALSE(m.cfg.norm_topk_prob);
    EXPECT_FALSE(m.params.has("model.layers.1.mlp.gate.e_score_correction_bias"));
    EXPECT_EQ(m.cfg.has_q_lora(), method != "greedy");
    EXPECT_TRUE(same_bits(m.params["model.layers.1.mlp.gate.weight"], expect.at("model.layers.1.mlp.gate.weight")));
  }
}

TEST(HfReleases, EveryFunctionalKeyIsReadOrRefusedByName) {
  const ModelConfig c = v3_model(0);
  struct Case {
    std::string key, value, want;  // value as JSON; want: the error names key and value
  };
  const std::vector<Case> cases = {
      {"hidden_act", "\"gelu\"", "key 'hidden_act' = gelu is not implemented (this project implements: silu)"},
      {"attention_bias", "true", "key 'attention_bias' = true is not implemented"},
      {"mlp_bias", "true", "key 'mlp_bias' = true"},
      {"attention_dropout", "0.1", "key 'attention_dropout' = 0.1"},
      {"num_key_value_heads", "1", "key 'num_key_value_heads' = 1"},
      {"moe_layer_freq", "2", "key 'moe_layer_freq' = 2"},
      {"mlp_layer_types", "[\"dense\", \"dense\"]", "key 'mlp_layer_types' = [dense, dense]"},
      {"layer_types", "[\"sliding_attention\", \"full_attention\"]", "key 'layer_types'"},
      {"num_local_experts", "7", "key 'num_local_experts' = 7"},
      {"quantization_config", "{\"quant_method\": \"fp8\", \"fmt\": \"e4m3\", \"weight_block_size\": [64, 64]}",
       "key 'quantization_config'"},
      {"model_type", "\"llama\"", "key 'model_type' = llama is not implemented"},
      {"scoring_func", "\"softmax\"", "key 'scoring_func' = softmax with model_type deepseek_v3"},
      {"topk_method", "\"greedy\"", "key 'topk_method' must be noaux_tc with scoring_func sigmoid"},
      {"num_nextn_predict_layers", "2", "key 'num_nextn_predict_layers' must be 0 or 1"},
      {"rope_scaling", "{\"type\": \"linear\", \"factor\": 2.0}", "rope_scaling.type' must be 'yarn' or 'default'"},
      {"rope_scaling", "{\"type\": \"yarn\", \"factor\": 4.0, \"low_freq_factor\": 1}",
       "key 'rope_scaling.low_freq_factor' is not understood"},
      {"q_lora_rank", "0", "key 'q_lora_rank' must be a positive integer or null"},
  };
  for (const Case& k : cases) {
    ScratchDir dir;
    nlohmann::ordered_json j = nlohmann::ordered_json::parse(v3_release_config(c, false, 0));
    j[k.key] = nlohmann::ordered_json::parse(k.value);
    std::ofstream(dir / "config.json") << j.dump(2);
    EXPECT_TRUE(throws_with([&] { read_hf_config(dir / "config.json", tiny_indexer()); }, {"config.json", k.want}))
        << k.key << " = " << k.value;
  }
  // V2 routes with softmax: a V2 config saying sigmoid is refused.
  ScratchDir dir;
  nlohmann::ordered_json j = nlohmann::ordered_json::parse(v2_release_config(v2_model("greedy"), "greedy"));
  j["scoring_func"] = "sigmoid";
  std::ofstream(dir / "config.json") << j.dump(2);
  EXPECT_TRUE(throws_with([&] { read_hf_config(dir / "config.json", tiny_indexer()); },
                          {"key 'scoring_func' = sigmoid with model_type deepseek_v2"}));
}

TEST(HfReleases, MetadataIsSilentUnknownKeysAreNamed) {
  ScratchDir dir;
  nlohmann::ordered_json j = nlohmann::ordered_json::parse(v3_release_config(v3_model(0), true, 0));
  j["some_new_key"] = 3;
  std::ofstream(dir / "config.json") << j.dump(2);
  HfConfigRead r = read_hf_config(dir / "config.json", tiny_indexer());
  ASSERT_EQ(r.notes.size(), 1u);  // auto_map, ep_size, aux_loss_alpha, seq_aux, pretraining_tp, ...: silent
  EXPECT_NE(r.notes[0].find("ignored unknown config key 'some_new_key' = 3"), std::string::npos) << r.notes[0];
  EXPECT_EQ(r.fp8_block, 128);
  EXPECT_EQ(r.model_type, "deepseek_v3");
  EXPECT_FALSE(r.indexer_from_config);
  // Some index_* keys without the others: named.
  j.erase("some_new_key");
  j["index_topk"] = 4;
  std::ofstream(dir / "config.json") << j.dump(2);
  EXPECT_TRUE(throws_with([&] { read_hf_config(dir / "config.json", tiny_indexer()); },
                          {"missing indexer key 'index_n_heads'"}));
}

TEST(HfReleases, MtpLayerMissingDroppedOrWithDifferentCopies) {
  ScratchDir dir;
  const ModelConfig c = v3_model(1);
  ParamStore ps = random_params(c, 6);
  auto tensors = release_tensors(c, ps, false, nullptr);
  HfImportOptions io;
  io.indexer = tiny_indexer();
  // The config says one MTP layer, the files have none: an error that names the way out.
  std::vector<std::pair<std::string, Tensor>> no_mtp;
  for (const auto& kv : tensors)
    if (kv.first.rfind("model.layers.2.", 0) != 0) no_mtp.push_back(kv);
  write_release(dir / "a", v3_release_config(c, false, 1), no_mtp);
  EXPECT_TRUE(throws_with([&] { import_hf(dir / "a", io); }, {"missing tensor 'model.layers.2.", "--drop-mtp"}));
  // --drop-mtp: imported without it, said so.
  write_release(dir / "b", v3_release_config(c, false, 1), tensors);
  HfImportOptions drop = io;
  drop.drop_mtp = true;
  HfModel d = import_hf(dir / "b", drop);
  EXPECT_EQ(d.cfg.num_nextn_predict_layers, 0);
  EXPECT_TRUE(has_warning(d, "MTP tensors (model.layers.2.*, --drop-mtp)"));
  // A copy of the shared head that differs from lm_head: a warning naming both.
  for (auto& kv : tensors)
    if (kv.first == "model.layers.2.shared_head.head.weight") kv.second = randn(kv.second.shape(), 9, 0.1, DType::F32);
  write_release(dir / "c", v3_release_config(c, false, 1), tensors);
  HfModel w = import_hf(dir / "c", io);
  EXPECT_TRUE(has_warning(w, "'model.layers.2.shared_head.head.weight' differs from 'lm_head.weight'"));
  // A layer beyond the MTP layer does not fit the config.
  tensors.emplace_back("model.layers.3.input_layernorm.weight", Tensor::zeros({32}, DType::F32));
  write_release(dir / "d", v3_release_config(c, false, 1), tensors);
  EXPECT_TRUE(
      throws_with([&] { import_hf(dir / "d", io); }, {"model.layers.3.input_layernorm.weight", "belongs to layer 3"}));
}

TEST(HfReleases, ExportNamesTheTransformersClassAndRoundTrips) {
  struct Case {
    ModelConfig cfg;
    std::string arch;
    bool indexer;
  };
  ModelConfig rot = v3_model(0);
  rot.rope_interleave = false;
  const std::vector<Case> cases = {{v3_model(1), "DeepseekV32ForCausalLM", true},
                                   {moonlight_model(), "DeepseekV3ForCausalLM", false},
                                   {rot, "DeepseekV3ForCausalLM", false},
                                   {v2_model("greedy"), "DeepseekV2ForCausalLM", false},
                                   {v2_model("group_limited_greedy"), "DeepseekV2ForCausalLM", false}};
  for (const Case& k : cases) {
    ScratchDir dir;
    ParamStore ps = random_params(k.cfg, 8);
    HfExportOptions opt;
    opt.dtype = DType::F32;
    const HfExportReport r = export_hf(dir / "hf", k.cfg, ps, {}, opt);
    EXPECT_EQ(r.cls.architecture, k.arch);
    EXPECT_EQ(r.cls.loads_indexer, k.indexer) << k.arch;
    if (!k.indexer) {
      EXPECT_FALSE(r.cls.caveats.empty());
    }
    nlohmann::json j = nlohmann::json::parse(read_bytes_file(dir / "hf/config.json"));
    EXPECT_EQ(j["architectures"][0], k.arch);
    EXPECT_EQ(j["index_n_heads"], k.cfg.index_n_heads) << "the indexer's dims travel for re-import";
    EXPECT_EQ(j["num_nextn_predict_layers"], k.cfg.num_nextn_predict_layers);
    HfModel m = import_hf(dir / "hf");
    EXPECT_FALSE(m.indexer_fresh);
    EXPECT_EQ(m.cfg.to_yaml(), k.cfg.to_yaml()) << k.arch;
    ASSERT_EQ(m.params.size(), ps.size());
    for (const Param& p : ps.all()) EXPECT_TRUE(same_bits(p.value, m.params.get(p.name).value)) << p.name;
    SafetensorsSet set(dir / "hf");
    if (k.cfg.num_nextn_predict_layers) {  // the MTP layer's copies, as the release files have them
      EXPECT_TRUE(same_bits(set.read("model.layers.2.shared_head.head.weight"), ps["lm_head.weight"]));
      EXPECT_TRUE(same_bits(set.read("model.layers.2.embed_tokens.weight"), ps["model.embed_tokens.weight"]));
    }
  }
}

TEST(HfReleases, Fp8ExportReimportsToTheFp8Rounding) {
  ScratchDir dir;
  const ModelConfig c = v3_model(1);
  ParamStore ps = random_params(c, 10);
  HfExportOptions opt;
  opt.fp8 = true;
  const HfExportReport r = export_hf(dir / "fp8", c, ps, {}, opt);
  EXPECT_GT(r.fp8_tensors, 0);
  nlohmann::json j = nlohmann::json::parse(read_bytes_file(dir / "fp8/config.json"));
  EXPECT_EQ(j["quantization_config"]["weight_block_size"], nlohmann::json({128, 128}));
  SafetensorsSet set(dir / "fp8");
  EXPECT_EQ(set.info("model.layers.1.mlp.experts.3.up_proj.weight").dtype, StDType::F8_E4M3);
  EXPECT_EQ(set.info("model.layers.0.self_attn.q_a_proj.weight").dtype, StDType::F8_E4M3);
  EXPECT_EQ(set.info("model.layers.0.self_attn.q_a_proj.weight_scale_inv").dtype, StDType::F32);
  EXPECT_EQ(set.info("model.layers.1.mlp.gate.weight").dtype, StDType::BF16);  // the router stays bf16
  EXPECT_EQ(set.info("model.embed_tokens.weight").dtype, StDType::BF16);
  HfModel m = import_hf(dir / "fp8");
  for (const Param& p : ps.all()) {
    const Tensor& got = m.params.get(p.name).value;
    if (p.group == ParamGroup::Buffer) {
      EXPECT_TRUE(same_bits(got, p.value)) << p.name;
    } else if (p.value.ndim() == 2 && stored_fp8_in_release(p.name, p.value)) {
      // Exactly the FP8 rounding of the weight: dequant(quant(w)) with 128x128 blocks of amax / 448.
      auto [q, s] = quant_fp8_blocks(p.value.clone(), 128);
      EXPECT_TRUE(same_bits(got, dequant_fp8_blocks(q, s, 128, p.name))) << p.name;
    } else if (p.value.ndim() == 3) {  // experts: each expert's gate, up and down, the same rounding
      const bool gate_up = p.name.find("gate_up_proj") != std::string::npos;
      const int64_t rows = p.value.size(1), piece = gate_up ? rows / 2 : rows;
      for (int64_t e = 0; e < p.value.size(0); ++e)
        for (int64_t r0 = 0; r0 < rows; r0 += piece) {
          auto [q, s] = quant_fp8_blocks(p.value.row(e).slice_rows(r0, r0 + piece).clone(), 128);
          EXPECT_TRUE(same_bits(got.row(e).slice_rows(r0, r0 + piece).clone(), dequant_fp8_blocks(q, s, 128, p.name)))
              << p.name << " expert " << e;
        }
    } else {
      EXPECT_TRUE(same_bits(got, p.value.to(DType::BF16).to(DType::F32))) << p.name;  // the bf16 rounding
    }
  }
}

TEST(HfReleases, DsaConvertSaysWhatItDid) {
  // The tool as a user runs it: what it prints, and what it refuses before reading any tensor.
  ScratchDir dir;
  auto run = [&](const std::string& args) {
    const std::string out = dir / "out.txt";
    const std::string cmd = std::string(DSA_BINARY_DIR) + "/bin/dsa-convert " + args + " > " + out + " 2>&1";
    const int rc = std::system(cmd.c_str());
    return std::make_pair(rc, read_bytes_file(out));
  };
  const ModelConfig c = v3_model(1);
  ParamStore ps = random_params(c, 11);
  write_release(dir / "v3", v3_release_config(c, true, 1), release_tensors(c, ps, true, nullptr));
  auto [rc, text] =
      run("import " + (dir / "v3") + " " + (dir / "a.h5") + " --index-n-heads 2 --index-head-dim 8 --index-topk 4");
  ASSERT_EQ(rc, 0) << text;
  EXPECT_NE(text.find("indexer: 2 heads x 8, top-4 (from the flags), freshly initialized"), std::string::npos) << text;
  EXPECT_NE(text.find("2 layers + 1 MTP layer"), std::string::npos) << text;
  auto [rc2, exported] = run("export " + (dir / "a.h5") + " " + (dir / "out"));
  ASSERT_EQ(rc2, 0) << exported;
  EXPECT_NE(exported.find("weights: bf16 (the f32 master weights rounded to bfloat16"), std::string::npos) << exported;
  EXPECT_NE(exported.find("config.json: DeepseekV32ForCausalLM"), std::string::npos) << exported;
  EXPECT_NE(exported.find("transformers has no MTP module"), std::string::npos) << exported;
  // Indexer flags for a config that defines its indexer: refused by name.
  auto [rc3, refused] = run("import " + (dir / "out") + " " + (dir / "b.h5") + " --index-topk 16");
  EXPECT_NE(rc3, 0);
  EXPECT_NE(refused.find("config.json defines the indexer (index_n_heads 2"), std::string::npos) << refused;
  EXPECT_FALSE(std::ifstream(dir / "b.h5").good());
  // The overlay file: only the three indexer keys.
  std::ofstream(dir / "ix.yaml") << "index_n_heads: 2\nindex_head_dim: 8\nindex_topk: 4\nindex_foo: 1\n";
  auto [rc4, bad] = run("import " + (dir / "v3") + " " + (dir / "c.h5") + " --indexer-config " + (dir / "ix.yaml"));
  EXPECT_NE(rc4, 0);
  EXPECT_NE(bad.find("ix.yaml:4: key 'index_foo' is not an indexer dimension"), std::string::npos) << bad;
  auto [rc5, keys] = run("config-keys");
  EXPECT_EQ(rc5, 0);
  EXPECT_NE(keys.find("scoring_func"), std::string::npos);
}
