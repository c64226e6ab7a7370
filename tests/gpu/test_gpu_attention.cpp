// GPU dense causal attention vs the CPU reference: forward (out, lse) and backward (dq, dk, dv) for
// MHA / GQA / MQA, odd T, the model's head dims (tiny 12/6, bench-small 96/64, production MHA 192/128)
// and the padded fallbacks, on both GPU backends (the own kernels, cuDNN's fused attention).
// Timings: `dsa-bench ops --only attention`, `dsa-bench kernels`.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include "kernels/ops.h"
#include "tests/gpu/gpu_util.h"
#include "tests/test_util.h"

namespace dsa {
namespace {

using testing::poisoned_gpu;
using testing::to_gpu;

// f32 values exactly representable in bf16 (so both backends see the same operands).
Tensor randn_bf16(const Shape& s, uint64_t seed) { return testing::randn(s, seed, 1.0, DType::F32).to(DType::BF16).to(DType::F32); }

// Best-effort poisoning of the op-allocated outputs: NaN blocks of the same sizes are freed into the
// caching allocator right before the call, which hands them back to the op.
void poison_pool(const std::vector<Shape>& shapes, DType dt) {
  std::vector<Tensor> held;
  for (const Shape& s : shapes) held.push_back(poisoned_gpu(s, dt));
}

// RMS error relative to max(RMS of the reference, floor), NaN never passing. The floor matters where
// the exact gradient vanishes: with T = 1 (and for the first query in general) P = 1 and
// dS = P (dO.V - dO.O) = 0, so the references of dq / dk are pure rounding noise.
double rel_err(const Tensor& a, const Tensor& b, double floor) {
  Tensor x = testing::to_cpu64(a), y = b.to(DType::F64);
  EXPECT_EQ(x.shape(), y.shape());
  double num = 0, den = 0;
  for (int64_t i = 0; i < x.numel(); ++i) {
    const double u = x.item(i), w = y.item(i);
    if (!std::isfinite(u)) return INFINITY;
    num += (u - w) * (u - w);
    den += w * w;
  }
  const double n = double(std::max<int64_t>(1, x.numel()));
  return std::sqrt(num / n) / std::max(std::sqrt(den / n), floor);
}

struct Case {
  int64_t B, T, H, Hk, Dk, Dv;
};

// The GPU backend a case runs on: the own kernels, or cuDNN's fused attention (where the build has cuDNN
// and the shape is one it is asked to take: MHA, head dims multiples of 8 up to 256).
struct BackendScope {
  explicit BackendScope(bool cudnn) : prev(ops::attention_cudnn_enabled()) { ops::set_attention_cudnn(cudnn); }
  ~BackendScope() { ops::set_attention_cudnn(prev); }
  bool prev;
};
bool cudnn_takes(const Case& c) {
  return !ops::attention_cudnn_info().version.empty() && c.H == c.Hk && c.Dk % 8 == 0 && c.Dv % 8 == 0 &&
         c.Dk <= 256 && c.Dv <= 256;
}

// Both GPU backends against the CPU reference, with the same bounds: bf16 outputs and gradients
// (relative RMS 1e-2 / 2e-2: a few bf16 roundings of each operand and of P and dS), f32 lse (1e-4).
void check_case(const Case& c, uint64_t seed) {
  SCOPED_TRACE(::testing::Message() << "B=" << c.B << " T=" << c.T << " H=" << c.H << " Hk=" << c.Hk
                                    << " Dk=" << c.Dk << " Dv=" << c.Dv);
  const double scale = 1.0 / std::sqrt(double(c.Dk));
  Tensor q = randn_bf16({c.B, c.T, c.H, c.Dk}, seed), k = randn_bf16({c.B, c.T, c.Hk, c.Dk}, seed + 1);
  Tensor v = randn_bf16({c.B, c.T, c.Hk, c.Dv}, seed + 2), dout = randn_bf16({c.B, c.T, c.H, c.Dv}, seed + 3);
  Tensor lse_ref;
  Tensor out_ref = ops::attention_forward(q, k, v, scale, &lse_ref);
  ops::AttentionGrads g_ref = ops::attention_backward(dout, q, k, v, out_ref, lse_ref, scale);

  Tensor qg = to_gpu(q, DType::BF16), kg = to_gpu(k, DType::BF16), vg = to_gpu(v, DType::BF16);
  Tensor dog = to_gpu(dout, DType::BF16);
  for (const bool cudnn : {false, true}) {
    if (cudnn && !cudnn_takes(c)) continue;
    SCOPED_TRACE(cudnn ? "cuDNN" : "own kernels");
    BackendScope scope(cudnn);
    const ops::AttentionCudnnInfo before = ops::attention_cudnn_info();
    poison_pool({{c.B, c.T, c.H, c.Dv}}, DType::BF16);
    poison_pool({{c.B, c.H, c.T}}, DType::F32);
    Tensor lse;
    Tensor out = ops::attention_forward(qg, kg, vg, scale, &lse);
    ASSERT_EQ(out.dtype(), DType::BF16);
    ASSERT_EQ(lse.dtype(), DType::F32);
    ASSERT_EQ(lse.shape(), Shape({c.B, c.H, c.T}));
    const double e_out = rel_err(out, out_ref, 0), e_lse = rel_err(lse, lse_ref, 0);
    EXPECT_LE(e_out, 1e-2) << "out";
    EXPECT_LE(e_lse, 1e-4) << "lse";

    poison_pool({{c.B, c.T, c.H, c.Dk}, {c.B, c.T, c.Hk, c.Dk}, {c.B, c.T, c.Hk, c.Dv}}, DType::BF16);
    ops::AttentionGrads g = ops::attention_backward(dog, qg, kg, vg, out, lse, scale);
    const double e_dq = rel_err(g.dq, g_ref.dq, 0.05), e_dk = rel_err(g.dk, g_ref.dk, 0.05);
    const double e_dv = rel_err(g.dv, g_ref.dv, 0.05);
    EXPECT_LE(e_dq, 2e-2) << "dq";
    EXPECT_LE(e_dk, 2e-2) << "dk";
    EXPECT_LE(e_dv, 2e-2) << "dv";
    // The cuDNN pass must have run on cuDNN (a refusal prints cuDNN's reason and fails here).
    const ops::AttentionCudnnInfo after = ops::attention_cudnn_info();
    EXPECT_EQ(after.forward_calls - before.forward_calls, cudnn ? 1 : 0) << "forward calls served by cuDNN";
    EXPECT_EQ(after.backward_calls - before.backward_calls, cudnn ? 1 : 0) << "backward calls served by cuDNN";
    std::printf("[attn %s] T=%lld Hk=%lld Dk=%lld Dv=%lld rel err: out %.2e lse %.2e dq %.2e dk %.2e dv %.2e\n",
                cudnn ? "cudnn" : "own", (long long)c.T, (long long)c.Hk, (long long)c.Dk, (long long)c.Dv, e_out,
                e_lse, e_dq, e_dk, e_dv);
  }
}

void run_dims(int64_t Dk, int64_t Dv) {
  uint64_t seed = 100 * Dk + Dv;
  for (int64_t T : {1, 13, 257})
    for (int64_t Hk : {4, 2, 1}) check_case({2, T, 4, Hk, Dk, Dv}, seed += 10);
}

TEST(GpuAttention, TinyHeadDims12x6) {
  DSA_REQUIRE_GPU();
  run_dims(12, 6);
}
TEST(GpuAttention, HeadDims96x64) {  // bench-small's MHA form
  DSA_REQUIRE_GPU();
  run_dims(96, 64);
}
TEST(GpuAttention, HeadDims128x128) {
  DSA_REQUIRE_GPU();
  run_dims(128, 128);
}
TEST(GpuAttention, ProductionMhaHeadDims192x128) {
  DSA_REQUIRE_GPU();
  run_dims(192, 128);
}
TEST(GpuAttention, HeadDims256x256) {
  DSA_REQUIRE_GPU();
  run_dims(256, 256);
}
TEST(GpuAttention, PaddedGeneralDims) {  // unequal, unaligned and odd dims on the padded paths
  DSA_REQUIRE_GPU();
  check_case({2, 13, 4, 2, 40, 200}, 7);
  check_case({1, 70, 2, 1, 33, 17}, 8);
  check_case({2, 257, 4, 4, 72, 56}, 9);
}
TEST(GpuAttention, LongSequenceManyBlocks) {
  DSA_REQUIRE_GPU();
  check_case({1, 1000, 2, 1, 96, 64}, 11);
  check_case({1, 600, 2, 2, 192, 128}, 12);
  check_case({2, 1000, 4, 4, 96, 64}, 13);   // bench-small's shape on cuDNN, many key blocks
  check_case({1, 2048, 4, 4, 192, 128}, 14);  // production head dims on cuDNN
}

TEST(GpuAttention, RejectsBadInputs) {
  DSA_REQUIRE_GPU();
  Tensor q = to_gpu(randn_bf16({1, 4, 2, 8}, 1), DType::BF16);
  Tensor k3 = to_gpu(randn_bf16({1, 4, 3, 8}, 2), DType::BF16);  // 3 kv heads do not divide 2
  EXPECT_THROW(ops::attention_forward(q, k3, k3, 0.3, nullptr), std::runtime_error);
  Tensor big = to_gpu(randn_bf16({1, 4, 2, 264}, 3), DType::BF16);  // head dim > 256
  EXPECT_THROW(ops::attention_forward(big, big, big, 0.3, nullptr), std::runtime_error);
  Tensor q32 = randn_bf16({1, 4, 2, 8}, 4).to(Device::CUDA);  // f32 on the GPU
  EXPECT_THROW(ops::attention_forward(q32, q32, q32, 0.3, nullptr), std::runtime_error);
}

}  // namespace
}  // namespace dsa
