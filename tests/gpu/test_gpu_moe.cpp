// GPU MoE ops vs the CPU reference (kernels/moe.cpp): routing (exact experts on the same f32 logits,
// ties, bias, -inf group masking), routing/score backward, loads and the balance loss, the device
// counting sort (exact rows), permute/combine and their backward, and the cuBLASLt grouped GEMM with
// accumulated dw. Shapes: bench-small (N=4096, D=1024, E=16, K=4, 4 groups keep 2, moe_inter 512),
// odd small ones (N=13, E=8, K=2) and DeepSeek-V3's router (E=256, 8 groups keep 4, K=8).
// Timings: `dsa-bench ops --only moe`.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/device_memory.h"
#include "kernels/ops.h"
#include "tests/gpu/gpu_util.h"
#include "tests/test_util.h"

namespace dsa {
namespace {

using testing::poisoned_gpu;
using testing::randn;
using testing::rel_close;
using testing::to_cpu64;
using testing::to_gpu;

// Ops return fresh tensors: fill blocks of the outputs' sizes with NaN and hand them back to the caching
// allocator, which gives them to the next allocations of those sizes (a forgotten write stays NaN).
void poison_allocator(const std::vector<std::pair<Shape, DType>>& outs) {
  std::vector<Tensor> held;
  for (const auto& [shape, dt] : outs) {
    if (dt == DType::I32) {
      Tensor h = Tensor::empty(shape, DType::I32);
      for (int64_t i = 0; i < h.numel(); ++i) h.data<int32_t>()[i] = -12345;
      held.push_back(h.to(Device::CUDA));
    } else {
      held.push_back(poisoned_gpu(shape, dt));
    }
  }
}

struct RouteCase {
  int64_t N, E;
  ops::MoeRouteConfig cfg;
};
ops::MoeRouteConfig make_cfg(int G, int tg, int K, bool norm = true, double scaling = 2.5) {
  ops::MoeRouteConfig c;
  c.n_group = G;
  c.topk_group = tg;
  c.top_k = K;
  c.norm_topk_prob = norm;
  c.routed_scaling_factor = scaling;
  return c;
}
const RouteCase kBenchSmall{4096, 16, make_cfg(4, 2, 4)};
const RouteCase kOdd{13, 8, make_cfg(4, 2, 2)};
const RouteCase kDeepSeek{1000, 256, make_cfg(8, 4, 8)};

bool equal_i32(const Tensor& gpu, const Tensor& cpu) {
  const Tensor g = gpu.to(Device::CPU);
  return g.numel() == cpu.numel() &&
         std::equal(g.data<int32_t>(), g.data<int32_t>() + g.numel(), cpu.data<int32_t>());
}

// Routes the same f32 logits on both backends. NOTES: the two sigmoids go through different exp
// implementations (glibc's expf and the GPU's), neither correctly rounded, so a score may differ by an ulp
// (2^-24 relative; the scores are in (0, 1)). The selection is compared exactly on every token whose
// choice such a difference cannot change: where no chosen and unchosen expert with different inputs have
// biased scores within 4 ulps (2^-22) of each other (group scores sum two of them, so a near-tie there
// shows as such a pair too). On the rare near-tie tokens either choice is right; they are counted, and
// must stay rare. Equal inputs give equal scores on each side, so exact ties break by index on both.
// max_near_ties: the share of tokens allowed to be near-ties (1% on random logits; constructed tie cases
// such as logits from {-1, 0, 1} have mathematically equal group scores, sigmoid(1) + sigmoid(-1) = 2
// sigmoid(0), that f32 rounds an ulp apart, on purpose).
void check_route(const Tensor& logits32, const Tensor& bias32, const ops::MoeRouteConfig& cfg, const char* what,
                 double max_near_ties = 0.01) {
  SCOPED_TRACE(what);
  const int64_t N = logits32.size(0), E = logits32.size(1), K = cfg.top_k;
  const ops::MoeRouting ref = ops::moe_route(logits32, bias32, cfg);
  const Tensor lg = logits32.to(Device::CUDA), bg = bias32.to(Device::CUDA);  // inputs first, then poison
  poison_allocator({{{N, E}, DType::F32}, {{N, K}, DType::I32}, {{N, K}, DType::F32}});
  const ops::MoeRouting got = ops::moe_route(lg, bg, cfg);
  ASSERT_TRUE(got.experts.device() == Device::CUDA);
  const Tensor ex = got.experts.to(Device::CPU), sc = ref.scores;
  const double tie = std::ldexp(1.0, -22);
  int64_t near_ties = 0;
  for (int64_t n = 0; n < N; ++n) {
    std::vector<bool> chosen(E, false);
    for (int64_t k = 0; k < K; ++k) chosen[ref.experts.data<int32_t>()[n * K + k]] = true;
    bool ambiguous = false;
    for (int64_t a = 0; a < E && !ambiguous; ++a)
      for (int64_t b = 0; b < E && !ambiguous; ++b)
        if (chosen[a] && !chosen[b])  // exact ties of equal inputs are equal on both sides: not ambiguous
          ambiguous = (logits32.item(n * E + a) != logits32.item(n * E + b) || bias32.item(a) != bias32.item(b)) &&
                      std::fabs((sc.item(n * E + a) + bias32.item(a)) - (sc.item(n * E + b) + bias32.item(b))) <= tie;
    // Group-limited routing also compares group scores (sum of a group's two best biased scores): a kept
    // and a dropped group within 2 x 4 ulps are a near-tie as well.
    const int64_t G = cfg.n_group, per = E / std::max<int64_t>(1, G);
    if (!ambiguous && G > 1 && cfg.topk_group < G) {
      std::vector<double> gs(G);
      std::vector<bool> kept(G, false);
      for (int64_t g = 0; g < G; ++g) {
        std::vector<double> v;
        for (int64_t e = g * per; e < (g + 1) * per; ++e) v.push_back(sc.item(n * E + e) + bias32.item(e));
        std::sort(v.begin(), v.end(), std::greater<double>());
        gs[g] = v[0] + (v.size() > 1 ? v[1] : 0.0);
      }
      for (int64_t k = 0; k < K; ++k) kept[ref.experts.data<int32_t>()[n * K + k] / per] = true;
      for (int64_t a = 0; a < G && !ambiguous; ++a)
        for (int64_t b = 0; b < G && !ambiguous; ++b)
          if (kept[a] && !kept[b]) ambiguous = gs[a] != gs[b] && std::fabs(gs[a] - gs[b]) <= 2 * tie;
    }
    if (ambiguous) {
      ++near_ties;
      continue;
    }
    for (int64_t k = 0; k < K; ++k)
      ASSERT_EQ(ex.data<int32_t>()[n * K + k], ref.experts.data<int32_t>()[n * K + k]) << "token " << n << " slot " << k;
  }
  EXPECT_LE(near_ties, std::max<int64_t>(1, static_cast<int64_t>(max_near_ties * N)))
      << near_ties << " of " << N << " tokens within 4 ulps of a tie";
  // Scores: one f32 sigmoid each, at most 2 ulps apart (2^-23 relative); weights are normalized over the
  // K chosen (K + 2 roundings): 2^-23 (K + 2) relative. Tokens with near-ties may hold other experts.
  EXPECT_TRUE(rel_close(got.scores, ref.scores, std::ldexp(1.0, -23)));
  if (near_ties == 0) {
    EXPECT_TRUE(rel_close(got.weights, ref.weights, std::ldexp(1.0, -23) * (K + 2)));
  }
}

TEST(GpuMoeRoute, MatchesCpuExactlyOnRandomLogits) {
  DSA_REQUIRE_GPU();
  int seed = 1;
  for (const RouteCase& rc : {kBenchSmall, kOdd, kDeepSeek}) {
    const Tensor logits = randn({rc.N, rc.E}, 100 + seed, 2.0, DType::F32);
    const Tensor bias = randn({rc.E}, 200 + seed, 0.1, DType::F32);
    check_route(logits, bias, rc.cfg, "random");
    ops::MoeRouteConfig plain = rc.cfg;  // no normalization, no scaling
    plain.norm_topk_prob = false;
    plain.routed_scaling_factor = 1.0;
    check_route(logits, bias, plain, "norm off");
    ++seed;
  }
  // one group (no group limit) and one expert per group
  check_route(randn({77, 16}, 5, 1.0, DType::F32), randn({16}, 6, 0.1, DType::F32), make_cfg(1, 1, 3), "1 group");
  check_route(randn({77, 8}, 7, 1.0, DType::F32), randn({8}, 8, 0.1, DType::F32), make_cfg(8, 3, 3), "gs 1");
}

TEST(GpuMoeRoute, TiesBiasAndNegativeMasking) {
  DSA_REQUIRE_GPU();
  for (const RouteCase& rc : {kBenchSmall, kOdd, kDeepSeek}) {
    const int64_t N = rc.N, E = rc.E;
    // all logits equal: every comparison is a tie -> lowest groups, lowest experts
    check_route(Tensor::zeros({N, E}, DType::F32), Tensor::zeros({E}, DType::F32), rc.cfg, "all equal");
    // logits from {-1, 0, 1}: many ties among experts and among group scores
    Tensor q = testing::randint({N, E}, 9, -1, 2);
    Tensor qf = Tensor::empty({N, E}, DType::F32);
    for (int64_t i = 0; i < q.numel(); ++i) qf.data<float>()[i] = float(q.data<int32_t>()[i]);
    check_route(qf, Tensor::zeros({E}, DType::F32), rc.cfg, "quantized ties", 1.0);
    // a bias that overturns the unbiased choice: the last expert is always picked, expert 0 never
    Tensor bias = Tensor::zeros({E}, DType::F32);
    bias.data<float>()[E - 1] = 5.f;
    bias.data<float>()[0] = -5.f;
    const Tensor logits = randn({N, E}, 10, 1.0, DType::F32);
    check_route(logits, bias, rc.cfg, "bias overturns");
    const ops::MoeRouting got = ops::moe_route(logits.to(Device::CUDA), bias.to(Device::CUDA), rc.cfg);
    const Tensor ex = got.experts.to(Device::CPU);
    for (int64_t n = 0; n < N; ++n) {
      EXPECT_EQ(ex.data<int32_t>()[n * rc.cfg.top_k], E - 1);
      for (int k = 0; k < rc.cfg.top_k; ++k) EXPECT_NE(ex.data<int32_t>()[n * rc.cfg.top_k + k], 0);
    }
    // biased scores all negative: masked (-inf) experts must never beat kept ones
    Tensor neg = Tensor::empty({E}, DType::F32);
    for (int64_t e = 0; e < E; ++e) neg.data<float>()[e] = -2.f - 0.01f * float(e % 5);
    check_route(logits, neg, rc.cfg, "negative biased scores");
  }
}

TEST(GpuMoeRoute, NanTokenIsReportedByPermutation) {
  DSA_REQUIRE_GPU();
  Tensor logits = randn({13, 8}, 11, 1.0, DType::F32);
  logits.data<float>()[5 * 8 + 3] = std::nanf("");
  const ops::MoeRouting r = ops::moe_route(logits.to(Device::CUDA), Tensor::zeros({8}, DType::F32), kOdd.cfg);
  EXPECT_THROW(ops::moe_permutation(r.experts, 8), std::runtime_error);
}

TEST(GpuMoeRoute, BackwardAndScoresBackward) {
  DSA_REQUIRE_GPU();
  int seed = 20;
  for (const RouteCase& rc : {kBenchSmall, kOdd, kDeepSeek}) {
    for (bool norm : {true, false}) {
      ops::MoeRouteConfig cfg = rc.cfg;
      cfg.norm_topk_prob = norm;
      const int64_t N = rc.N, E = rc.E, K = cfg.top_k;
      const Tensor logits = randn({N, E}, seed++, 1.5, DType::F32);
      const Tensor bias = randn({E}, seed++, 0.1, DType::F32);
      const ops::MoeRouting ref = ops::moe_route(logits, bias, cfg);
      const ops::MoeRouting got = ops::moe_route(logits.to(Device::CUDA), bias.to(Device::CUDA), cfg);
      const Tensor dw = randn({N, K}, seed++, 1.0, DType::F32), dw_gpu = dw.to(Device::CUDA);
      poison_allocator({{{N, E}, DType::F32}});
      EXPECT_TRUE(rel_close(ops::moe_route_backward(dw_gpu, got, cfg), ops::moe_route_backward(dw, ref, cfg), 1e-5));
      const Tensor ds = randn({N, E}, seed++, 1.0, DType::F32), ds_gpu = ds.to(Device::CUDA);
      poison_allocator({{{N, E}, DType::F32}});
      EXPECT_TRUE(rel_close(ops::moe_scores_backward(ds_gpu, got), ops::moe_scores_backward(ds, ref), 1e-6));
    }
  }
}

TEST(GpuMoeBalance, ExpertLoadAndSeqBalanceLoss) {
  DSA_REQUIRE_GPU();
  struct Case {
    RouteCase rc;
    int64_t batch;
  };
  int seed = 40;
  for (const Case& c : {Case{kBenchSmall, 4}, Case{kOdd, 1}, Case{kDeepSeek, 5}}) {
    const int64_t N = c.rc.N, E = c.rc.E, seq = N / c.batch;
    const Tensor logits = randn({N, E}, seed++, 1.0, DType::F32);
    const Tensor bias = randn({E}, seed++, 0.1, DType::F32);
    const ops::MoeRouting ref = ops::moe_route(logits, bias, c.rc.cfg);
    const ops::MoeRouting got = ops::moe_route(logits.to(Device::CUDA), bias.to(Device::CUDA), c.rc.cfg);
    poison_allocator({{{E}, DType::F32}});
    const Tensor load = ops::moe_expert_load(got, E);
    EXPECT_TRUE(load.device() == Device::CUDA);
    EXPECT_TRUE(testing::all_close(load.to(Device::CPU), ops::moe_expert_load(ref, E), 0, 0));
    // the loss with and without the gradient; dscores accumulates onto existing values
    const double alpha = 1e-3;
    const double loss_ref = ops::moe_seq_balance_loss(ref, E, c.batch, seq, alpha, nullptr);
    EXPECT_NEAR(ops::moe_seq_balance_loss(got, E, c.batch, seq, alpha, nullptr), loss_ref, 1e-9 * loss_ref);
    Tensor ds_ref = randn({N, E}, seed++, 1e-6, DType::F32);
    Tensor ds_gpu = ds_ref.to(Device::CUDA);
    const Tensor ds0 = ds_ref.clone();
    ops::moe_seq_balance_loss(ref, E, c.batch, seq, alpha, &ds_ref);
    EXPECT_NEAR(ops::moe_seq_balance_loss(got, E, c.batch, seq, alpha, &ds_gpu), loss_ref, 1e-9 * loss_ref);
    Tensor dg = to_cpu64(ds_gpu), dr = ds_ref.to(DType::F64);  // compare the increments
    for (int64_t i = 0; i < dg.numel(); ++i) {
      dg.set_item(i, dg.item(i) - ds0.item(i));
      dr.set_item(i, dr.item(i) - ds0.item(i));
    }
    EXPECT_TRUE(rel_close(dg, dr, 1e-4));
  }
}

// ------------------------------------------------------------------------------- permutation

TEST(GpuMoePermutation, ExactRowsCountsOffsets) {
  DSA_REQUIRE_GPU();
  std::vector<std::pair<Tensor, int64_t>> cases;
  cases.push_back({testing::randint({4096, 4}, 50, 0, 16), 16});
  cases.push_back({testing::randint({13, 2}, 51, 0, 8), 8});
  cases.push_back({testing::randint({3000, 8}, 52, 0, 256), 256});  // several chunks, E = 256
  Tensor one = Tensor::zeros({2049, 3}, DType::I32);  // everything on expert 5 (others empty)
  for (int64_t i = 0; i < one.numel(); ++i) one.data<int32_t>()[i] = 5;
  cases.push_back({one, 8});
  Tensor skewed = testing::randint({4096, 4}, 53, 0, 3);  // experts 3..15 empty
  cases.push_back({skewed, 16});
  for (const auto& [ex, E] : cases) {
    const ops::MoePermutation ref = ops::moe_permutation(ex, E);
    const Tensor ex_gpu = ex.to(Device::CUDA);
    poison_allocator({{{ex.numel()}, DType::I32}});
    const ops::MoePermutation got = ops::moe_permutation(ex_gpu, E);
    EXPECT_TRUE(got.rows.device() == Device::CUDA);
    EXPECT_TRUE(equal_i32(got.rows, ref.rows)) << "E " << E << " M " << ex.numel();
    EXPECT_EQ(got.counts, ref.counts);
    EXPECT_EQ(got.offsets, ref.offsets);
  }
  Tensor bad = testing::randint({13, 2}, 54, 0, 8);
  bad.data<int32_t>()[7] = 8;
  EXPECT_THROW(ops::moe_permutation(bad.to(Device::CUDA), 8), std::runtime_error);
}

struct PermCase {
  int64_t N, E, K, D;
};
const PermCase kPermCases[] = {{4096, 16, 4, 1024}, {13, 8, 2, 13}, {13, 8, 2, 40}, {300, 256, 8, 72}};

TEST(GpuMoePermutation, PermuteCombineAndBackward) {
  DSA_REQUIRE_GPU();
  int seed = 60;
  for (const PermCase& c : kPermCases) {
    SCOPED_TRACE("N " + std::to_string(c.N) + " D " + std::to_string(c.D));
    const int64_t N = c.N, K = c.K, D = c.D, M = N * K;
    const Tensor ex = testing::randint({N, K}, seed++, 0, int(c.E));
    const ops::MoePermutation pc = ops::moe_permutation(ex, c.E);
    const ops::MoePermutation pg = ops::moe_permutation(ex.to(Device::CUDA), c.E);
    // bf16 operands, the CPU reference on the same (rounded) values in f32
    const Tensor x = to_gpu(randn({N, D}, seed++, 1.0, DType::F32), DType::BF16);
    const Tensor x32 = x.to(Device::CPU).to(DType::F32);
    poison_allocator({{{M, D}, DType::BF16}});
    const Tensor xp = ops::moe_permute(x, pg, K);
    EXPECT_TRUE(testing::all_close(xp.to(Device::CPU).to(DType::F32), ops::moe_permute(x32, pc, K), 0, 0));

    const Tensor dxp = to_gpu(randn({M, D}, seed++, 1.0, DType::F32), DType::BF16);
    poison_allocator({{{N, D}, DType::BF16}});
    EXPECT_TRUE(rel_close(ops::moe_permute_backward(dxp, pg, N, K),
                          ops::moe_permute_backward(dxp.to(Device::CPU).to(DType::F32), pc, N, K), 1e-2));

    const Tensor yp = to_gpu(randn({M, D}, seed++, 1.0, DType::F32), DType::BF16);
    const Tensor yp32 = yp.to(Device::CPU).to(DType::F32);
    const Tensor w = randn({N, K}, seed++, 0.5, DType::F32), w_gpu = w.to(Device::CUDA);
    poison_allocator({{{N, D}, DType::BF16}});
    EXPECT_TRUE(rel_close(ops::moe_combine(yp, w_gpu, pg), ops::moe_combine(yp32, w, pc), 1e-2));

    const Tensor dy = to_gpu(randn({N, D}, seed++, 1.0, DType::F32), DType::BF16);
    const Tensor dy32 = dy.to(Device::CPU).to(DType::F32);
    Tensor dyp_ref, dw_ref, dyp_gpu, dw_gpu;
    ops::moe_combine_backward(dy32, yp32, w, pc, &dyp_ref, &dw_ref);
    poison_allocator({{{M, D}, DType::BF16}, {{N, K}, DType::F32}});
    ops::moe_combine_backward(dy, yp, w_gpu, pg, &dyp_gpu, &dw_gpu);
    EXPECT_TRUE(rel_close(dyp_gpu, dyp_ref, 1e-2));
    EXPECT_TRUE(rel_close(dw_gpu, dw_ref, 1e-4));  // same bf16 inputs: only the summation order differs
    Tensor only_dw;  // one output requested
    ops::moe_combine_backward(dy, yp, w_gpu, pg, nullptr, &only_dw);
    EXPECT_TRUE(rel_close(only_dw, dw_ref, 1e-4));
  }
}

// --------------------------------------------------------------------------------- grouped GEMM

struct GemmCase {
  int64_t N, E, K, in, out;
  bool skip_experts;  // leave some experts without rows
};

void check_grouped(const GemmCase& c, uint64_t seed) {
  SCOPED_TRACE("M " + std::to_string(c.N * c.K) + " in " + std::to_string(c.in) + " out " + std::to_string(c.out));
  const int64_t M = c.N * c.K, E = c.E;
  Tensor ex = testing::randint({c.N, c.K}, seed, 0, int(E));
  if (c.skip_experts)
    for (int64_t i = 0; i < ex.numel(); ++i)
      if (ex.data<int32_t>()[i] % 3 == 1) ex.data<int32_t>()[i] = 0;  // experts 1, 4, 7, ... empty
  const ops::MoePermutation pc = ops::moe_permutation(ex, E);
  const ops::MoePermutation pg = ops::moe_permutation(ex.to(Device::CUDA), E);
  const Tensor xp = to_gpu(randn({M, c.in}, seed + 1, 1.0, DType::F32), DType::BF16);
  const Tensor w = to_gpu(randn({E, c.out, c.in}, seed + 2, 1.0 / std::sqrt(double(c.in)), DType::F32), DType::BF16);
  const Tensor dy = to_gpu(randn({M, c.out}, seed + 3, 1.0, DType::F32), DType::BF16);
  const Tensor xp32 = xp.to(Device::CPU).to(DType::F32), w32 = w.to(Device::CPU).to(DType::F32),
               dy32 = dy.to(Device::CPU).to(DType::F32);

  poison_allocator({{{M, c.out}, DType::BF16}});
  EXPECT_TRUE(rel_close(ops::grouped_linear_forward(xp, w, pg), ops::grouped_linear_forward(xp32, w32, pc), 1e-2));

  Tensor dw_ref = Tensor::zeros({E, c.out, c.in}, DType::F32);
  const Tensor dx_ref = ops::grouped_linear_backward(dy32, xp32, w32, pc, &dw_ref);
  const Tensor dw0 = randn({E, c.out, c.in}, seed + 4, 0.3, DType::F32);  // existing gradient: += semantics
  Tensor dw_gpu = dw0.to(Device::CUDA);
  poison_allocator({{{M, c.in}, DType::BF16}});
  EXPECT_TRUE(rel_close(ops::grouped_linear_backward(dy, xp, w, pg, &dw_gpu), dx_ref, 1e-2));
  ops::grouped_linear_backward(dy, xp, w, pg, &dw_gpu);  // twice: dw = dw0 + 2 g
  Tensor inc = to_cpu64(dw_gpu), want = dw_ref.to(DType::F64);
  for (int64_t i = 0; i < inc.numel(); ++i) {
    inc.set_item(i, inc.item(i) - dw0.item(i));
    want.set_item(i, 2 * want.item(i));
  }
  EXPECT_TRUE(rel_close(inc, want, 1e-2));
  if (c.skip_experts) {  // experts without rows keep dw0 exactly
    const Tensor got = dw_gpu.to(Device::CPU);
    const int64_t per = c.out * c.in;
    for (int64_t i = per; i < 2 * per; ++i) ASSERT_EQ(got.data<float>()[i], dw0.data<float>()[i]);
  }
  // without dw
  EXPECT_TRUE(rel_close(ops::grouped_linear_backward(dy, xp, w, pg, nullptr), dx_ref, 1e-2));
}

TEST(GpuMoeGroupedLinear, Tokens4096Experts16Top4Widths1024And512) {  // bench-small's experts
  DSA_REQUIRE_GPU();
  check_grouped({4096, 16, 4, 1024, 512, false}, 70);  // gate / up
  check_grouped({4096, 16, 4, 512, 1024, false}, 80);  // down
}

TEST(GpuMoeGroupedLinear, OddShapesAndEmptyExperts) {
  DSA_REQUIRE_GPU();
  check_grouped({13, 8, 2, 13, 7, false}, 90);
  check_grouped({13, 8, 2, 40, 24, true}, 100);
  check_grouped({333, 16, 4, 1024, 512, true}, 110);
}

TEST(GpuMoeGroupedLinear, DtypeAndDeviceErrors) {
  DSA_REQUIRE_GPU();
  const Tensor ex = testing::randint({13, 2}, 120, 0, 8);
  const ops::MoePermutation pg = ops::moe_permutation(ex.to(Device::CUDA), 8);
  const Tensor xp = to_gpu(randn({26, 16}, 121, 1.0, DType::F32), DType::BF16);
  const Tensor w32 = randn({8, 8, 16}, 122, 1.0, DType::F32).to(Device::CUDA);
  EXPECT_THROW(ops::grouped_linear_forward(xp, w32, pg), std::runtime_error);  // w must be bf16
  const Tensor w = to_gpu(randn({8, 8, 16}, 122, 1.0, DType::F32), DType::BF16);
  const Tensor dy = to_gpu(randn({26, 8}, 123, 1.0, DType::F32), DType::BF16);
  Tensor dw_bf16 = Tensor::zeros({8, 8, 16}, DType::BF16, Device::CUDA);
  EXPECT_THROW(ops::grouped_linear_backward(dy, xp, w, pg, &dw_bf16), std::runtime_error);  // dw must be f32
  EXPECT_THROW(ops::grouped_linear_forward(xp.to(Device::CPU), w, pg), std::runtime_error);
}

}  // namespace
}  // namespace dsa
