// The whole model on the GPU (bf16 mixed precision) against the CPU path (f32) on the same weights and
// tokens: losses and every parameter gradient, for each stage's step. Both sides use the CPU's MoE routing
// and, in sparse steps, its top-k selection (a bf16 ranking may break near-ties differently), so they
// compare the same function.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <string>

#include "kernels/device_memory.h"
#include "model/model.h"
#include "tests/gpu/gpu_util.h"
#include "tests/test_util.h"

using namespace dsa;
using namespace dsa::testing;

namespace {

ModelConfig gpu_test_config() {
  ModelConfig c = preset_config("tiny");
  c.vocab_size = 97;
  c.initializer_range = 0.1;
  c.index_topk = 5;
  return c;
}

struct Pair {
  ModelConfig cfg;
  Model cpu{cfg, DType::F32, Device::CPU};
  Model gpu{cfg, DType::F32, Device::CUDA};
  Tensor ids, targets;
  int64_t B = 2, T = 24;
  explicit Pair(const ModelConfig& c = gpu_test_config()) : cfg(c) {
    init_params(cpu.params(), cfg, 3);
    for (Param& p : gpu.params().all()) p.value.copy_from(cpu.params().get(p.name).value.to(Device::CUDA));
    gpu.params().refresh_compute();
    // The CPU sees the same bf16-rounded weights the GPU computes with.
    for (Param& p : cpu.params().all())
      if (gpu.params().get(p.name).compute.defined()) p.value.copy_from(p.value.to(DType::BF16).to(DType::F32));
    ids = randint({B * T}, 5, 0, static_cast<int>(cfg.vocab_size));
    targets = randint({B * T}, 6, 0, static_cast<int>(cfg.vocab_size));
  }
};

// Tolerances: bf16_tol (tests/gpu/gpu_util.h). The GPU keeps activations in bf16 and accumulates in f32;
// the CPU runs the same bf16-rounded weights in f32. r counts the bf16 roundings on the longest path
// through this 2-layer model: per layer forward 17 (norms, q_a, q_a_layernorm, q_b, rope, kv_a, kv norm,
// kv_b, P, O, o_proj, residual, norm, gate/up, silu*up, down, residual), final norm and logits 2, and the
// backward as many again: r = 2 (2 * 17 + 2) = 72 -> 5.7e-2 for the LM gradients.
// main_tol bounds the LM-trained tensors' gradients, indexer_tol the indexer's.
void compare(StepOptions o, const char* what, double main_tol, double indexer_tol,
             const ModelConfig& cfg = gpu_test_config()) {
  DSA_REQUIRE_GPU();
  Pair p(cfg);
  // Both sides route and select like the CPU: a bf16 ulp may flip a near-tie of the MoE router or of the
  // top-k, and a flipped expert or slot is a different function (its own tests compare those ops).
  std::vector<Tensor> sel, experts;
  StepOptions probe = o;
  probe.capture_experts = &experts;
  if (o.attention == AttentionMode::Sparse) probe.capture_indices = &sel;
  p.cpu.step(p.ids, p.targets, p.B, p.T, probe, false);
  o.forced_experts = &experts;
  if (o.attention == AttentionMode::Sparse) o.forced_indices = &sel;
  p.cpu.params().zero_grads();
  p.gpu.params().zero_grads();
  StepStats c = p.cpu.step(p.ids, p.targets, p.B, p.T, o, true);
  StepStats g = p.gpu.step(p.ids, p.targets, p.B, p.T, o, true);
  cuda::synchronize();
  EXPECT_NEAR(g.lm_loss_sum / g.lm_tokens, c.lm_loss_sum / c.lm_tokens, 2e-2) << what;
  EXPECT_EQ(g.lm_tokens, c.lm_tokens);
  EXPECT_EQ(g.mtp_tokens, c.mtp_tokens);
  if (c.mtp_tokens) {
    EXPECT_NEAR(g.mtp_loss_sum / g.mtp_tokens, c.mtp_loss_sum / c.mtp_tokens, 2e-2) << what;
  }
  if (c.indexer_rows) {
    EXPECT_EQ(g.indexer_rows, c.indexer_rows);
    EXPECT_NEAR(g.indexer_kl_sum / g.indexer_rows, c.indexer_kl_sum / c.indexer_rows,
                0.05 * std::fabs(c.indexer_kl_sum / c.indexer_rows) + 1e-4)
        << what;
  }
  double worst = 0;
  std::string worst_name;
  for (const Param& cp : p.cpu.params().all()) {
    if (!cp.grad.defined()) continue;
    const Tensor& gg = p.gpu.params().get(cp.name).grad;
    double norm = 0;
    for (int64_t i = 0; i < cp.grad.numel(); ++i) norm += cp.grad.item(i) * cp.grad.item(i);
    if (norm == 0) {
      EXPECT_TRUE(rel_close(gg, cp.grad, 1e-6)) << what << " " << cp.name << " (zero on the CPU)";
      continue;
    }
    const double grad_tol = cp.group == ParamGroup::Indexer ? indexer_tol : main_tol;
    const Tensor g64 = gg.to(Device::CPU).to(DType::F64);
    double num = 0;
    for (int64_t i = 0; i < cp.grad.numel(); ++i) num += (g64.item(i) - cp.grad.item(i)) * (g64.item(i) - cp.grad.item(i));
    if (std::sqrt(num / norm) / grad_tol > worst) worst = std::sqrt(num / norm) / grad_tol, worst_name = cp.name;
    EXPECT_TRUE(rel_close(gg, cp.grad, grad_tol)) << what << " " << cp.name;
  }
  std::printf("[gpu model] %s: largest relative gradient difference / its bound = %.3g (%s; bounds %.3g main, "
              "%.3g indexer)\n", what, worst, worst_name.c_str(), main_tol, indexer_tol);
}

}  // namespace

TEST(GpuModel, DenseStepMatchesCpu) { compare(StepOptions{}, "dense", bf16_tol(72), 0); }

TEST(GpuModel, DenseStepWithRecomputeMatchesCpu) {
  StepOptions o;
  o.recompute = true;
  compare(o, "dense recompute", bf16_tol(72), 0);
}

TEST(GpuModel, WarmupStepMatchesCpu) {
  StepOptions o;
  o.indexer_loss = IndexerLossMode::Dense;
  o.train_main = false;
  o.train_indexer = true;
  o.fp8_indexer = false;
  // The KL path: the forward to the last layer's attention (2 * 17 - 6) and the indexer's own projections,
  // scores and softmax (6), its backward (6): r = 40; kappa 2: the gradient is (softmax(I) - p) weighted,
  // each term of which carries the relative error of both.
  compare(o, "warmup", 0, bf16_tol(40, 2.0));
}

TEST(GpuModel, SparseStepMatchesCpu) {
  StepOptions o;
  o.attention = AttentionMode::Sparse;
  o.indexer_loss = IndexerLossMode::Sparse;
  o.train_indexer = true;
  o.fp8_indexer = false;
  // LM gradients as in the dense step; indexer gradients as in the warm-up (the KL over the selected set).
  compare(o, "sparse", bf16_tol(72), bf16_tol(40, 2.0));
}

TEST(GpuModel, RecallAndFp8SelectionRun) {
  DSA_REQUIRE_GPU();
  Pair p;
  StepOptions o;
  o.attention = AttentionMode::Sparse;
  o.compute_recall = true;
  o.fp8_indexer = true;
  StepStats c = p.cpu.step(p.ids, p.targets, p.B, p.T, o, false);
  StepStats g = p.gpu.step(p.ids, p.targets, p.B, p.T, o, false);
  ASSERT_GT(g.recall_rows, 0);
  EXPECT_NEAR(g.recall_sum / g.recall_rows, c.recall_sum / c.recall_rows, 0.05);
  EXPECT_NEAR(g.lm_loss_sum / g.lm_tokens, c.lm_loss_sum / c.lm_tokens, 5e-2);
}

// The DeepSeek families (SPEC.md §1b) through each stage's step: V2-Lite-like (no query LoRA, softmax
// greedy routing, batch-level balance loss), V2-like (softmax, group-limited by the max), Moonlight-like
// (no query LoRA, rotate-half RoPE, no expert groups) and V3 with its MTP layer.
ModelConfig family_config(const std::string& name) {
  ModelConfig c = gpu_test_config();
  if (name == "v2_lite" || name == "moonlight") {
    c.q_lora_rank = 0;
    c.n_group = c.topk_group = 1;
    c.n_shared_experts = 2;
  }
  if (name == "v2_lite" || name == "v2_group") {
    c.scoring_func = "softmax";
    c.topk_method = name == "v2_lite" ? "greedy" : "group_limited_greedy";
    c.norm_topk_prob = false;
    c.routed_scaling_factor = name == "v2_lite" ? 1.0 : 16.0;
  }
  if (name == "moonlight") c.rope_interleave = false;
  if (name == "v3_mtp") c.num_nextn_predict_layers = 1;
  c.validate(name);
  return c;
}

// The LM gradients' bound for a config: r = 2 (17 per decoder layer, the MTP layer included, + 2).
double lm_tol(const ModelConfig& c) {
  return bf16_tol(2.0 * (17.0 * static_cast<double>(c.num_hidden_layers + c.num_nextn_predict_layers) + 2.0));
}

class GpuModelFamilies : public ::testing::TestWithParam<std::string> {
 protected:
  StepOptions base() const {
    StepOptions o;
    if (GetParam() == "v3_mtp") o.mtp_loss_weight = 0.3;
    if (GetParam() == "v2_lite") {
      o.balance_alpha = 1e-2;
      o.balance_per_sequence = false;
    }
    return o;
  }
};

TEST_P(GpuModelFamilies, DenseStepMatchesCpu) {
  const ModelConfig c = family_config(GetParam());
  compare(base(), "dense", lm_tol(c), 0, c);
}

TEST_P(GpuModelFamilies, WarmupStepMatchesCpu) {
  StepOptions o = base();
  o.indexer_loss = IndexerLossMode::Dense;
  o.train_main = false;
  o.train_indexer = true;
  o.fp8_indexer = false;
  compare(o, "warmup", 0, bf16_tol(40, 2.0), family_config(GetParam()));
}

TEST_P(GpuModelFamilies, SparseStepMatchesCpu) {
  StepOptions o = base();
  o.attention = AttentionMode::Sparse;
  o.indexer_loss = IndexerLossMode::Sparse;
  o.train_indexer = true;
  o.fp8_indexer = false;
  const ModelConfig c = family_config(GetParam());
  compare(o, "sparse", lm_tol(c), bf16_tol(40, 2.0), c);
}

INSTANTIATE_TEST_SUITE_P(Families, GpuModelFamilies, ::testing::Values("v2_lite", "v2_group", "moonlight", "v3_mtp"));
