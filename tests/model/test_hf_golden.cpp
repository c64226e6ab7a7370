// This project's model against transformers 5.17's own classes on the same weights, for every golden set
// of tools/hf_reference.py (tests/golden/<set>/, see its docstring): DeepseekV32 (hf_tiny; v32_yarn with
// YaRN, odd head dims, 3 layers, 2 shared experts, an MTP layer), DeepseekV3 with and without a query
// LoRA (v3_mtp with an MTP layer and an FP8 release of the same weights, v3_noqlora), DeepseekV2 with
// softmax routing (v2_lite greedy without a query LoRA, v2_group group-limited). Each set is imported by
// the `dsa-convert import` binary and run in f64; logits, loss, every layer's output, the final hidden
// state and the MTP head's outputs are compared in f32 terms, dense and sparse on transformers'
// selection (V3.2: its indexer's top-k; V2/V3: the fixed selection the golden run applied as the mask).
// A set whose files are absent is skipped with a message (tools/hf_reference.py --set NAME makes it).
#include <gtest/gtest.h>

#include <cmath>
#include <set>

#include "kernels/dsa_ops.h"
#include "model/hf_io.h"
#include "model/rope_tables.h"
#include "tests/model/golden_util.h"
#include "tests/test_util.h"

using namespace dsa;
using namespace dsa::testing;

namespace {

constexpr double kF32Unit = 5.9604644775390625e-08;  // u = 2^-24, f32's unit roundoff

// Sum S of the reduction lengths on the path from the tokens to an output: a length-n f32 reduction
// (dot product or sum, any order) errs by at most n*u*sum|terms| (Higham's gamma_n), and errors already
// present pass through later layers with gain ~1 (residual stream, RMSNorm), so transformers' f32
// output differs from the exact (our f64) one by at most ~S*u*scale.
double reduction_path(const ModelConfig& c, int64_t T, bool mtp) {
  const double D = c.hidden_size, H = c.num_attention_heads;
  auto layer = [&](int64_t l) {
    double s = 2 * D;                                          // two RMSNorms (mean of squares)
    s += c.has_q_lora() ? D + c.q_lora_rank + c.q_lora_rank : D;  // q path (+ the latent's RMSNorm)
    s += D + c.kv_lora_rank + c.kv_lora_rank;                  // kv_a, its RMSNorm, kv_b
    s += c.qk_head_dim() + T + T + H * c.v_head_dim;           // scores, softmax sum, values, o_proj
    if (c.is_moe_layer(l))
      s += D + c.n_routed_experts + D + c.moe_intermediate_size * std::max<int64_t>(1, c.n_shared_experts) +
           c.num_experts_per_tok;                              // router (+ softmax sum), experts, combine
    else
      s += D + c.intermediate_size;
    return s;
  };
  double s = 0;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) s += layer(l);
  s += 2 * D;  // final norm, lm_head
  if (mtp) s += 2 * D + 2 * D + layer(c.mtp_layer()) + 2 * D;  // enorm/hnorm, eh_proj, block, head norm + head
  return s;
}

// |ours - transformers| <= 2 * S * u * max(1, max|reference|): S*u from reduction_path, times 2 for the
// elementwise functions along the path (exp, rsqrt, silu, sigmoid: each within 1-2 ulp of f32).
double f32_tolerance(const ModelConfig& c, int64_t T, bool mtp, const Tensor& ref) {
  return 2.0 * reduction_path(c, T, mtp) * kF32Unit * std::max(1.0, max_abs(ref));
}

struct RunResult {
  double max_dlogits = 0, tol = 0;
};

// One run of a golden set: our f64 model with `opts` against the run folder's outputs.
RunResult compare_run(const GoldenSet& g, const std::string& run, StepOptions opts, const char* what) {
  auto m = g.model();
  const ModelConfig& c = g.ckpt.cfg;
  Tensor logits, mtp_logits;
  std::vector<Tensor> layers;
  opts.capture_logits = &logits;
  opts.capture_layer_outputs = &layers;
  const bool mtp = g.run_has_mtp(run);
  if (mtp) {
    opts.mtp_loss_weight = 1.0;
    opts.capture_mtp_logits = &mtp_logits;
  }
  const StepStats s = m->step(g.ids, g.targets, g.B, g.T, opts, false);
  const Tensor ref_logits = read_npy(g.run_file(run, "logits"));
  const double tol = f32_tolerance(c, g.T, false, ref_logits);
  const double loss = s.lm_loss_sum / s.lm_tokens, ref_loss = read_npy(g.run_file(run, "loss")).item(0);
  // The loss: a mean of B*(T-1) log-sum-exps of logits within tol, each off by at most 2 tol.
  EXPECT_NEAR(loss, ref_loss, 2 * tol) << g.name << " " << run << " " << what;
  const double dlogits = max_abs_diff_rows(logits, ref_logits, g.B, g.T, g.T);
  EXPECT_LT(dlogits, tol) << g.name << " " << run << " " << what << " logits";
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const Tensor ref = read_npy(g.run_file(run, "layer_" + std::to_string(l) + "_out"));
    EXPECT_LT(max_abs_diff_rows(layers[l], ref, g.B, g.T, g.T), f32_tolerance(c, g.T, false, ref))
        << g.name << " " << run << " " << what << " layer " << l;
  }
  double dmtp = 0;
  if (mtp) {
    EXPECT_EQ(layers.size(), static_cast<size_t>(c.num_hidden_layers + 1));
    const Tensor ref_mtp = read_npy(g.run_file(run, "mtp_logits"));  // [B, T-1, V]
    const double mtol = f32_tolerance(c, g.T, true, ref_mtp);
    dmtp = max_abs_diff_rows(mtp_logits, ref_mtp, g.B, g.T, g.T - 1);
    EXPECT_LT(dmtp, mtol) << g.name << " " << run << " " << what << " MTP logits";
    const Tensor ref_out = read_npy(g.run_file(run, "mtp_layer_out"));
    EXPECT_LT(max_abs_diff_rows(layers.back(), ref_out, g.B, g.T, g.T - 1), f32_tolerance(c, g.T, true, ref_out))
        << g.name << " " << run << " MTP layer output";
    const double ref_mtp_loss = read_npy(g.run_file(run, "mtp_loss")).item(0);
    EXPECT_EQ(s.mtp_tokens, g.B * (g.T - 2));
    EXPECT_NEAR(s.mtp_loss_sum / s.mtp_tokens, ref_mtp_loss, 2 * mtol) << g.name << " " << run << " MTP loss";
  }
  char mtp_note[64] = "";
  if (mtp) std::snprintf(mtp_note, sizeof(mtp_note), ", MTP max |dlogits| %.3g", dmtp);
  std::printf("[golden] %s %s (%s): loss %.9f vs transformers %.9f, max |dlogits| %.3g (tolerance %.3g)%s\n",
              g.name.c_str(), run.c_str(), what, loss, ref_loss, dlogits, tol, mtp_note);
  return RunResult{dlogits, tol};
}

class HfGolden : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (!GoldenSet::present(GetParam()))
      GTEST_SKIP() << "golden set tests/golden/" << GetParam() << " is absent: make it with "
                   << "`python3 tools/hf_reference.py --set " << GetParam() << " --out tests/golden` (torch 2.11, "
                   << "transformers 5.17)";
  }
  ScratchDir scratch;
};

}  // namespace

TEST_P(HfGolden, ImportedConfigMatchesTransformers) {
  GoldenSet g(GetParam(), scratch);
  const ModelConfig& c = g.ckpt.cfg;
  const nlohmann::json& hc = g.manifest.at("config");
  EXPECT_EQ(c.hidden_size, hc.at("hidden_size").get<int64_t>());
  EXPECT_EQ(c.num_hidden_layers, hc.at("num_hidden_layers").get<int64_t>());
  EXPECT_EQ(c.has_q_lora(), !hc.at("q_lora_rank").is_null());
  EXPECT_EQ(c.num_nextn_predict_layers, g.mtp ? 1 : 0);
  // The attention scale and the rotary table: transformers computes them in Python doubles (the scale)
  // and f32 (inv_freq); ours in double, inv_freq rounded to f32 as transformers forms it (1 f32 ulp).
  for (const auto& s : g.manifest.at("attention_scaling"))
    EXPECT_NEAR(c.attention_scale(), s.get<double>(), 1e-12 * s.get<double>());
  const RopeTables rope = make_rope_tables(c, 2, DType::F64, Device::CPU);
  const auto& inv = g.manifest.at("rotary").at("inv_freq");
  ASSERT_EQ(inv.size(), rope.inv_freq.size());
  for (size_t i = 0; i < inv.size(); ++i)
    EXPECT_NEAR(rope.inv_freq[i], inv[i].get<double>(), 2 * kF32Unit * inv[i].get<double>()) << i;
  EXPECT_NEAR(rope.attention_factor, g.manifest.at("rotary").at("attention_scaling").get<double>(), 1e-12);
}

TEST_P(HfGolden, DenseMatchesTransformers) {
  GoldenSet g(GetParam(), scratch);
  compare_run(g, "f32_dense", StepOptions{}, "MHA form");
  StepOptions mqa;
  mqa.form = MlaForm::MQA;
  compare_run(g, "f32_dense", mqa, "MQA form");
}

TEST_P(HfGolden, SparseMatchesTransformersOnItsSelection) {
  GoldenSet g(GetParam(), scratch);
  const std::vector<Tensor> forced = g.selection("f32_sparse");
  StepOptions o;
  o.attention = AttentionMode::Sparse;
  o.forced_indices = &forced;
  compare_run(g, "f32_sparse", o, "sparse");
}

// The V3.2 sets (transformers' class has the indexer): its bf16 selection, and its selection as a top-k of ours.
class HfGoldenV32 : public HfGolden {};

TEST_P(HfGoldenV32, Bf16SelectionInF32) {
  // transformers' bf16 run picks its own top-k (bf16 scores); the f32 model on that selection is the
  // reference: our model on the same selection agrees to the f32 bound (no bf16-tuned tolerance).
  GoldenSet g(GetParam(), scratch);
  ASSERT_TRUE(g.has_run("f32_on_bf16_selection"));
  const std::vector<Tensor> forced = g.selection("f32_on_bf16_selection");
  StepOptions o;
  o.attention = AttentionMode::Sparse;
  o.forced_indices = &forced;
  compare_run(g, "f32_on_bf16_selection", o, "on the bf16 selection");
}

TEST_P(HfGoldenV32, TransformersSelectionIsATopkOfOurIndexerScores) {
  // transformers scores the indexer without Hadamard or FP8; ours (fp8 off) must rank keys the same.
  // Many scores tie (ReLU zeros), so the check is that transformers' set is *a* top-k of our scores.
  GoldenSet g(GetParam(), scratch);
  ASSERT_TRUE(g.v32);
  auto m = g.model();
  std::vector<IndexerCache> idx;
  const std::vector<Tensor> forced = g.selection("f32_sparse");  // every layer sees transformers' inputs
  StepOptions o;
  o.attention = AttentionMode::Sparse;
  o.forced_indices = &forced;
  o.fp8_indexer = false;
  o.capture_indexer = &idx;
  if (g.run_has_mtp("f32_sparse")) o.mtp_loss_weight = 1.0;
  m->step(g.ids, g.targets, g.B, g.T, o, false);
  const ModelConfig& c = g.ckpt.cfg;
  ASSERT_EQ(idx.size(), forced.size());
  int rows = 0;
  for (size_t l = 0; l < forced.size(); ++l) {
    const Tensor& ref = forced[l];
    const int64_t K = ref.size(2);
    Tensor scores = ops::indexer_scores_forward(idx[l].q.view({g.B, g.T, c.index_n_heads, c.index_head_dim}),
                                                idx[l].k.view({g.B, g.T, c.index_head_dim}),
                                                idx[l].w.view({g.B, g.T, c.index_n_heads}), 0, g.T);
    // The MTP layer's last position reads a filler token in both implementations: compared too.
    for (int64_t b = 0; b < g.B; ++b)
      for (int64_t t = 0; t < g.T; ++t) {
        std::set<int> chosen;
        for (int64_t k = 0; k < K; ++k) {
          const int s = ref.data<int32_t>()[(b * g.T + t) * K + k];
          if (s >= 0) chosen.insert(s);
        }
        ASSERT_EQ(static_cast<int64_t>(chosen.size()), std::min<int64_t>(K, t + 1)) << "layer " << l << " row " << t;
        double min_in = INFINITY, max_out = -INFINITY;
        for (int64_t s = 0; s <= t; ++s) {
          const double v = scores.item((b * g.T + t) * g.T + s);
          if (chosen.count(static_cast<int>(s)))
            min_in = std::min(min_in, v);
          else
            max_out = std::max(max_out, v);
        }
        // transformers' f32 scores are a reduction over index_head_dim then index_n_heads: a near-tie
        // within (di + Hi) u |score| may rank either way.
        const double tie = (c.index_head_dim + c.index_n_heads) * kF32Unit * (1 + std::fabs(max_out));
        EXPECT_GE(min_in, max_out - tie) << "layer " << l << " b " << b << " row " << t;
        ++rows;
      }
  }
  EXPECT_EQ(rows, static_cast<int>(forced.size()) * g.B * g.T);
}

class HfGoldenRelease : public HfGolden {};

TEST_P(HfGoldenRelease, Fp8ReleaseImportsToItsDequantizedWeights) {
  // The same weights written as DeepSeek's release (F8_E4M3 + 128x128 weight_scale_inv, per-expert,
  // three shards, an MTP layer): imported through dsa-convert, our model matches transformers on the
  // dequantized weights.
  GoldenSet g(GetParam(), scratch, "release_fp8");
  compare_run(g, "release_fp8_dense", StepOptions{}, "FP8 release");
}

// dsa-convert export -> transformers: tests/golden/<set>/export/{f32,bf16} (scripts/golden_exports.sh)
// loaded by transformers' class (tools/hf_reference.py --check-exports, results under transformers/).
class HfGoldenExport : public HfGolden {};

TEST_P(HfGoldenExport, CommittedExportIsWhatThisBuildWrites) {
  GoldenSet g(GetParam(), scratch);
  for (const char* dt : {"f32", "bf16"}) {
    const std::string committed = g.dir + "/export/" + dt;
    ASSERT_TRUE(file_exists(committed + "/config.json")) << "run scripts/golden_exports.sh";
    HfExportOptions opt;
    opt.dtype = std::string(dt) == "f32" ? DType::F32 : DType::BF16;
    export_hf(scratch / (g.name + "_" + dt), g.ckpt.cfg, g.ckpt.params, {}, opt);
    SafetensorsSet fresh(scratch / (g.name + "_" + dt)), old(committed);
    ASSERT_EQ(fresh.names(), old.names()) << dt;
    for (const std::string& n : fresh.names()) EXPECT_TRUE(same_bits(fresh.read(n), old.read(n))) << dt << " " << n;
    EXPECT_EQ(read_bytes_file(scratch / (g.name + "_" + dt + "/config.json")), read_bytes_file(committed + "/config.json"))
        << dt << ": the committed export is stale (scripts/golden_exports.sh)";
  }
}

TEST_P(HfGoldenExport, TransformersOnTheExportReproducesOurLogits) {
  GoldenSet g(GetParam(), scratch);
  const std::string f32_run = g.dir + "/export/f32/transformers";
  if (!file_exists(f32_run + "/logits.npy"))
    GTEST_SKIP() << "no transformers run of " << g.name << "'s export yet: `python3 tools/hf_reference.py "
                 << "--check-exports tests/golden --out DIR` on a machine with transformers 5.17, then copy "
                 << "DIR/<set>/export/*/transformers into tests/golden";
  for (const char* dt : {"f32", "bf16"}) {
    const std::string run = g.dir + "/export/" + dt + "/transformers";
    const nlohmann::json report = nlohmann::json::parse(read_bytes_file(run + "/report.json"));
    EXPECT_TRUE(report.at("missing_keys").empty()) << dt << ": transformers misses " << report.at("missing_keys");
    auto m = g.model();
    if (std::string(dt) == "bf16")  // the export's only change: the weights' rounding (buffers stay f32)
      for (Param& p : m->params().all())
        if (p.group != ParamGroup::Buffer) p.value.copy_from(p.value.to(DType::BF16).to(DType::F64));
    Tensor logits;
    StepOptions o;
    o.capture_logits = &logits;
    const StepStats s = m->step(g.ids, g.targets, g.B, g.T, o, false);
    const Tensor ref = read_npy(run + "/logits.npy");
    const double tol = f32_tolerance(g.ckpt.cfg, g.T, false, ref);
    const double d = max_abs_diff_rows(logits, ref, g.B, g.T, g.T);
    EXPECT_LT(d, tol) << g.name << " " << dt << " export";
    EXPECT_NEAR(s.lm_loss_sum / s.lm_tokens, read_npy(run + "/loss.npy").item(0), 2 * tol);
    std::printf("[golden] %s export %s -> transformers %s: max |dlogits| %.3g (tolerance %.3g)\n", g.name.c_str(), dt,
                report.at("class").get<std::string>().c_str(), d, tol);
  }
}

INSTANTIATE_TEST_SUITE_P(Sets, HfGolden,
                         ::testing::Values("hf_tiny", "v2_lite", "v2_group", "v3_mtp", "v3_noqlora", "v32_yarn"));
INSTANTIATE_TEST_SUITE_P(Sets, HfGoldenV32, ::testing::Values("hf_tiny", "v32_yarn"));
INSTANTIATE_TEST_SUITE_P(Sets, HfGoldenRelease, ::testing::Values("v3_mtp"));
INSTANTIATE_TEST_SUITE_P(Sets, HfGoldenExport,
                         ::testing::Values("hf_tiny", "v2_lite", "v2_group", "v3_mtp", "v3_noqlora", "v32_yarn"));
