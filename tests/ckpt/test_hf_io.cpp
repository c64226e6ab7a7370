// Hugging Face import/export: native -> HF -> native bit-identical, per-expert and FP8 files, a
// missing indexer, MTP layers, shapes that do not fit the config.
#include <gtest/gtest.h>

#include <fstream>

#include "model/hf_io.h"
#include "tests/ckpt/ckpt_util.h"
#include "tests/test_util.h"

using namespace dsa;
using namespace dsa::testing;

namespace {

ModelConfig tiny() { return preset_config("tiny"); }

ParamStore random_params(const ModelConfig& c, uint64_t seed) {
  ParamStore ps = make_params(c);
  init_params(ps, c, seed);
  // Make the routing bias and norms non-trivial so a mix-up of tensors would show.
  for (Param& p : ps.all())
    if (p.group == ParamGroup::Buffer || p.value.ndim() == 1) {
      Tensor r = randn(p.value.shape(), seed ^ std::hash<std::string>()(p.name), 0.1, DType::F32);
      p.value.copy_from(r);
    }
  return ps;
}

void expect_same_params(const ParamStore& a, const ParamStore& b) {
  ASSERT_EQ(a.size(), b.size());
  for (const Param& p : a.all()) EXPECT_TRUE(same_bits(p.value, b.get(p.name).value)) << p.name;
}

// Writes `tensors` and config.json as a Hugging Face directory.
void write_hf(const std::string& dir, const ModelConfig& c, const std::vector<std::pair<std::string, Tensor>>& tensors,
              int64_t mtp_layers = 0) {
  write_safetensors_sharded(dir, tensors, 1ull << 30);
  std::ofstream(dir + "/config.json") << hf_config_json(c, DType::BF16, mtp_layers);
}

}  // namespace

TEST(HfIo, NativeToHfToNativeIsBitIdenticalF32Fused) {
  ScratchDir dir;
  const ModelConfig c = tiny();
  ParamStore ps = random_params(c, 7);
  HfExportOptions opt;
  opt.dtype = DType::F32;
  opt.max_shard_bytes = 30000;  // several shards
  export_hf(dir / "hf", c, ps, {}, opt);
  HfModel m = import_hf(dir / "hf");
  EXPECT_FALSE(m.indexer_fresh);
  EXPECT_TRUE(m.warnings.empty());
  EXPECT_EQ(m.cfg.to_yaml(), c.to_yaml());
  expect_same_params(ps, m.params);
  SafetensorsSet set(dir / "hf");
  EXPECT_TRUE(set.has("model.layers.1.mlp.experts.gate_up_proj"));
  EXPECT_EQ(set.info("model.layers.1.mlp.experts.gate_up_proj").shape, Shape({8, 24, 32}));
  EXPECT_EQ(set.info("model.layers.1.self_attn.indexer.wq_b.weight").dtype, StDType::F32);
}

TEST(HfIo, PerExpertExportReimportsIdentically) {
  ScratchDir dir;
  const ModelConfig c = tiny();
  ParamStore ps = random_params(c, 8);
  HfExportOptions opt;
  opt.dtype = DType::F32;
  opt.per_expert = true;
  export_hf(dir / "hf", c, ps, {}, opt);
  SafetensorsSet set(dir / "hf");
  EXPECT_FALSE(set.has("model.layers.1.mlp.experts.gate_up_proj"));
  EXPECT_EQ(set.info("model.layers.1.mlp.experts.7.up_proj.weight").shape, Shape({12, 32}));
  // Expert 3's up rows are rows [I, 2I) of its fused gate_up slice.
  Tensor up = set.read_f32("model.layers.1.mlp.experts.3.up_proj.weight");
  const Tensor& fused = ps["model.layers.1.mlp.experts.gate_up_proj"];
  EXPECT_EQ(up.item(5 * 32 + 4), fused.item((3 * 24 + 12 + 5) * 32 + 4));
  HfModel m = import_hf(dir / "hf");
  expect_same_params(ps, m.params);
}

TEST(HfIo, Bf16ExportOfBf16ValuesIsLossless) {
  ScratchDir dir;
  const ModelConfig c = tiny();
  ParamStore ps = random_params(c, 9);
  for (Param& p : ps.all())
    if (p.group != ParamGroup::Buffer) p.value.copy_from(p.value.to(DType::BF16).to(DType::F32));
  export_hf(dir / "hf", c, ps, {});  // bf16 by default
  SafetensorsSet set(dir / "hf");
  EXPECT_EQ(set.info("model.embed_tokens.weight").dtype, StDType::BF16);
  EXPECT_EQ(set.info("model.layers.1.mlp.gate.e_score_correction_bias").dtype, StDType::F32);
  HfModel m = import_hf(dir / "hf");
  expect_same_params(ps, m.params);
  const ModelConfig back = ModelConfig::from_file(dir / "hf/config.json");
  EXPECT_EQ(back.to_yaml(), c.to_yaml());
}

TEST(HfIo, MissingIndexerIsFreshlyInitialized) {
  ScratchDir dir;
  const ModelConfig c = tiny();
  ParamStore ps = random_params(c, 10);
  HfExportOptions opt;
  opt.dtype = DType::F32;
  std::vector<std::pair<std::string, Tensor>> ts;
  for (auto& kv : hf_tensors_for_export(c, ps, {}, opt))
    if (kv.first.find(".indexer.") == std::string::npos) ts.push_back(kv);
  write_hf(dir / "v3", c, ts);
  HfImportOptions io;
  io.indexer_seed = 1234;
  HfModel m = import_hf(dir / "v3", io);
  EXPECT_TRUE(m.indexer_fresh);
  ASSERT_FALSE(m.warnings.empty());
  EXPECT_NE(m.warnings[0].find("freshly initialized"), std::string::npos);
  ParamStore want = make_params(c);
  init_params_group(want, c, 1234, ParamGroup::Indexer);
  for (const Param& p : m.params.all()) {
    const Tensor& expect = p.group == ParamGroup::Indexer ? want.get(p.name).value : ps.get(p.name).value;
    EXPECT_TRUE(same_bits(p.value, expect)) << p.name;
  }
  // Part of an indexer is an error naming the first missing tensor.
  ts.emplace_back("model.layers.0.self_attn.indexer.wk.weight", ps["model.layers.0.self_attn.indexer.wk.weight"]);
  write_hf(dir / "partial", c, ts);
  EXPECT_TRUE(throws_with([&] { import_hf(dir / "partial"); }, {"partial", "missing indexer tensor", "wq_b"}));
}

TEST(HfIo, ShapeThatDoesNotFitTheConfigNamesFileAndTensor) {
  ScratchDir dir;
  const ModelConfig c = tiny();
  ParamStore ps = random_params(c, 11);
  HfExportOptions opt;
  opt.dtype = DType::F32;
  auto ts = hf_tensors_for_export(c, ps, {}, opt);
  for (auto& kv : ts)
    if (kv.first == "model.layers.0.self_attn.q_b_proj.weight") kv.second = Tensor::zeros({23, 16}, DType::F32);
  write_hf(dir / "hf", c, ts);
  EXPECT_TRUE(throws_with([&] { import_hf(dir / "hf"); },
                          {"model.safetensors", "'model.layers.0.self_attn.q_b_proj.weight'", "[23, 16]", "[24, 16]"}));
  // A missing tensor names itself and its expected shape.
  for (auto& kv : ts)
    if (kv.first == "model.layers.0.self_attn.q_b_proj.weight") kv.second = ps[kv.first];
  ts.erase(std::remove_if(ts.begin(), ts.end(), [](auto& kv) { return kv.first == "model.norm.weight"; }), ts.end());
  write_hf(dir / "hf2", c, ts);
  EXPECT_TRUE(throws_with([&] { import_hf(dir / "hf2"); }, {"missing tensor 'model.norm.weight'", "[32]"}));
}

TEST(HfIo, Fp8PerExpertCheckpointIsDequantized) {
  ScratchDir dir;
  const ModelConfig c = tiny();
  ParamStore ps = random_params(c, 12);
  HfExportOptions opt;
  opt.dtype = DType::BF16;
  opt.per_expert = true;
  std::vector<std::pair<std::string, Tensor>> ts;
  std::map<std::string, Tensor> expect;  // f32 values the import must produce for the quantized tensors
  for (auto& [name, t] : hf_tensors_for_export(c, ps, {}, opt)) {
    const bool quantize = t.ndim() == 2 && name.find("embed") == std::string::npos && name.find("lm_head") == std::string::npos &&
                          name.find("mlp.gate.weight") == std::string::npos;
    if (!quantize) {
      ts.emplace_back(name, t);
      continue;
    }
    // Scale the values up so FP8's range is exercised, as a real checkpoint's blocks would be.
    Tensor w = t.to(DType::F32);
    auto [q, s] = quant_fp8_blocks(w, 128);
    expect[name] = dequant_fp8_blocks(q, s, 128, name);
    ts.emplace_back(name, q);
    ts.emplace_back(name + "_scale_inv", s);
  }
  write_hf(dir / "fp8", c, ts);
  HfModel m = import_hf(dir / "fp8");
  EXPECT_TRUE(m.warnings.empty()) << m.warnings[0];
  const int64_t I = c.moe_intermediate_size, D = c.hidden_size;
  for (const Param& p : m.params.all()) {
    if (p.name.find("experts.gate_up_proj") != std::string::npos) {
      const std::string base = p.name.substr(0, p.name.size() - 12);
      for (int64_t e = 0; e < c.n_routed_experts; ++e) {
        const Tensor& g = expect.at(base + std::to_string(e) + ".gate_proj.weight");
        const Tensor& u = expect.at(base + std::to_string(e) + ".up_proj.weight");
        for (int64_t k = 0; k < I * D; ++k) {
          ASSERT_EQ(p.value.item(e * 2 * I * D + k), g.item(k));
          ASSERT_EQ(p.value.item(e * 2 * I * D + I * D + k), u.item(k));
        }
      }
    } else if (expect.count(p.name)) {
      EXPECT_TRUE(same_bits(p.value, expect.at(p.name))) << p.name;
    }
  }
  // The dequantized values are close to the originals (FP8 keeps 3 mantissa bits).
  EXPECT_TRUE(all_close(m.params["model.layers.0.self_attn.q_a_proj.weight"],
                        ps["model.layers.0.self_attn.q_a_proj.weight"], 0.07, 1e-5));
}

TEST(HfIo, MtpLayerIsDroppedOrKeptAndWrittenBack) {
  ScratchDir dir;
  const ModelConfig c = tiny();
  ParamStore ps = random_params(c, 13);
  HfExportOptions opt;
  opt.dtype = DType::F32;
  auto ts = hf_tensors_for_export(c, ps, {}, opt);
  const std::string mtp = "model.layers.2.";  // num_hidden_layers = 2
  Tensor eh = randn({32, 64}, 5, 0.1, DType::F32).to(DType::BF16);
  auto [q, s] = quant_fp8_blocks(randn({32, 32}, 6, 0.1, DType::F32), 128);
  ts.emplace_back(mtp + "eh_proj.weight", eh);
  ts.emplace_back(mtp + "self_attn.o_proj.weight", q);
  ts.emplace_back(mtp + "self_attn.o_proj.weight_scale_inv", s);
  write_hf(dir / "hf", c, ts, 1);

  HfModel dropped = import_hf(dir / "hf");
  EXPECT_TRUE(dropped.extra.empty());
  ASSERT_EQ(dropped.warnings.size(), 1u);
  EXPECT_NE(dropped.warnings[0].find("dropped 3 MTP"), std::string::npos) << dropped.warnings[0];

  HfImportOptions keep;
  keep.keep_mtp = true;
  HfModel kept = import_hf(dir / "hf", keep);
  ASSERT_EQ(kept.extra.size(), 3u);
  EXPECT_TRUE(same_bits(kept.extra.at("mtp/" + mtp + "eh_proj.weight"), eh));
  EXPECT_TRUE(same_bits(kept.extra.at("mtp/" + mtp + "self_attn.o_proj.weight"), q));
  export_hf(dir / "out", kept.cfg, kept.params, kept.extra, opt);
  SafetensorsSet out(dir / "out");
  EXPECT_TRUE(same_bits(out.read(mtp + "eh_proj.weight"), eh));
  EXPECT_TRUE(same_bits(out.read(mtp + "self_attn.o_proj.weight"), q));
  EXPECT_TRUE(same_bits(out.read(mtp + "self_attn.o_proj.weight_scale_inv"), s));
  std::ifstream cj(dir / "out/config.json");
  std::string text((std::istreambuf_iterator<char>(cj)), std::istreambuf_iterator<char>());
  EXPECT_NE(text.find("\"num_nextn_predict_layers\": 1"), std::string::npos);

  // A layer beyond the MTP layers does not fit the config.
  ts.emplace_back("model.layers.3.input_layernorm.weight", Tensor::zeros({32}, DType::F32));
  write_hf(dir / "more", c, ts, 1);
  EXPECT_TRUE(throws_with([&] { import_hf(dir / "more"); }, {"model.layers.3.input_layernorm.weight", "belongs to layer 3"}));
}
