// MoE ops: routing against an independent sort-based reference and adversarial cases, permutation,
// combine, grouped linear, route / scores backward and the sequence balance loss against finite
// differences (f64), expert loads, and the grouped linear at bench-small widths in f32 within a derived bound.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/ops.h"
#include "tests/test_util.h"

using namespace dsa;
using dsa::testing::all_close;
using dsa::testing::dot;
using dsa::testing::grad_check;
using dsa::testing::randn;

namespace {

struct RefRoute {
  std::vector<int> experts;      // [N*K]
  std::vector<double> weights;   // [N*K]
};

// Plain reference: sort-based, written independently of the kernel's linear scans. Arithmetic in T.
template <class T>
RefRoute ref_route(const Tensor& logits, const std::vector<double>& bias, const ops::MoeRouteConfig& cfg) {
  const int64_t N = logits.size(0), E = logits.size(1), gs = E / cfg.n_group;
  RefRoute out;
  for (int64_t n = 0; n < N; ++n) {
    std::vector<T> s(E), c(E);
    for (int64_t e = 0; e < E; ++e) {
      s[e] = T(1) / (T(1) + std::exp(-T(logits.item(n * E + e))));
      c[e] = s[e] + T(bias[e]);
    }
    auto better = [](const std::vector<T>& v) {
      return [&v](int a, int b) { return v[a] != v[b] ? v[a] > v[b] : a < b; };
    };
    std::vector<T> gscore(cfg.n_group);
    for (int g = 0; g < cfg.n_group; ++g) {
      std::vector<T> m(c.begin() + g * gs, c.begin() + (g + 1) * gs);
      std::sort(m.begin(), m.end(), std::greater<T>());
      gscore[g] = gs == 1 ? m[0] : m[0] + m[1];
    }
    std::vector<int> gid(cfg.n_group);
    std::iota(gid.begin(), gid.end(), 0);
    std::sort(gid.begin(), gid.end(), better(gscore));
    std::vector<int> cand;
    for (int i = 0; i < cfg.topk_group; ++i)
      for (int64_t j = 0; j < gs; ++j) cand.push_back(static_cast<int>(gid[i] * gs + j));
    std::sort(cand.begin(), cand.end(), better(c));
    T sum = 0;
    for (int k = 0; k < cfg.top_k; ++k) sum += s[cand[k]];
    for (int k = 0; k < cfg.top_k; ++k) {
      out.experts.push_back(cand[k]);
      const T w = cfg.norm_topk_prob ? s[cand[k]] / (sum + T(1e-20)) : s[cand[k]];
      out.weights.push_back(double(w * T(cfg.routed_scaling_factor)));
    }
  }
  return out;
}

Tensor bias_tensor(const std::vector<double>& b) {
  Tensor t = Tensor::empty({(int64_t)b.size()}, DType::F32);
  for (size_t i = 0; i < b.size(); ++i) t.set_item(i, b[i]);
  return t;
}

std::vector<int> experts_of(const ops::MoeRouting& r) {
  return std::vector<int>(r.experts.data<int32_t>(), r.experts.data<int32_t>() + r.experts.numel());
}

ops::MoeRouteConfig cfg_of(int n_group, int topk_group, int top_k, bool norm = true, double scaling = 1.0) {
  ops::MoeRouteConfig c;
  c.n_group = n_group;
  c.topk_group = topk_group;
  c.top_k = top_k;
  c.norm_topk_prob = norm;
  c.routed_scaling_factor = scaling;
  return c;
}

}  // namespace

TEST(MoeRoute, MatchesReferenceOnRandomCases) {
  std::mt19937 rng(123);
  struct C { int64_t N, E; int G, TG, K; bool norm; double scaling; };
  const std::vector<C> cases = {{37, 16, 4, 2, 4, true, 2.5},  {20, 16, 4, 2, 4, false, 1.0}, {50, 64, 8, 4, 8, true, 2.5},
                                {9, 8, 1, 1, 2, true, 1.0},     {11, 6, 3, 1, 2, true, 1.5},   {13, 4, 4, 3, 3, true, 1.0},
                                {7, 12, 3, 3, 12, false, 0.5}};
  int idx = 0;
  for (const C& c : cases)
    for (DType dt : {DType::F32, DType::F64}) {
      const ops::MoeRouteConfig cfg = cfg_of(c.G, c.TG, c.K, c.norm, c.scaling);
      Tensor logits = randn({c.N, c.E}, 1000 + idx, 1.5, dt);
      std::vector<double> bias(c.E);
      std::normal_distribution<double> nd(0.0, 0.3);
      for (double& b : bias) b = double(float(nd(rng)));  // exactly representable in the f32 bias tensor
      ops::MoeRouting r = ops::moe_route(logits, bias_tensor(bias), cfg);
      const RefRoute ref = dt == DType::F32 ? ref_route<float>(logits, bias, cfg) : ref_route<double>(logits, bias, cfg);
      ASSERT_EQ(experts_of(r), ref.experts) << "case " << idx;
      EXPECT_EQ(r.weights.dtype(), dt);
      EXPECT_EQ(r.scores.dtype(), dt);
      for (int64_t i = 0; i < r.weights.numel(); ++i)
        EXPECT_NEAR(r.weights.item(i), ref.weights[i], dt == DType::F32 ? 1e-6 : 1e-14) << "case " << idx;
      for (int64_t i = 0; i < r.scores.numel(); ++i)
        EXPECT_NEAR(r.scores.item(i), 1.0 / (1.0 + std::exp(-logits.item(i))), dt == DType::F32 ? 1e-7 : 1e-15);
      ++idx;
    }
}

TEST(MoeRoute, ExactTiesPickLowerIndexFirst) {
  // All scores equal: groups tie (lowest groups kept), experts tie (lowest indices, ascending).
  Tensor logits = Tensor::zeros({2, 16}, DType::F32);
  ops::MoeRouting r = ops::moe_route(logits, Tensor::zeros({16}, DType::F32), cfg_of(4, 2, 6));
  EXPECT_EQ(experts_of(r), (std::vector<int>{0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5}));
  for (int64_t i = 0; i < 12; ++i) EXPECT_NEAR(r.weights.item(i), 1.0 / 6.0, 1e-7);
  // Partial ties in the middle of the order: experts 5 and 2 equal, 2 comes first.
  std::vector<float> l = {0.f, 0.f, 3.f, 0.f, 0.f, 3.f, 4.f, 0.f};
  ops::MoeRouting r2 = ops::moe_route(Tensor::from_vector(l, {1, 8}), Tensor::zeros({8}, DType::F32), cfg_of(1, 1, 3));
  EXPECT_EQ(experts_of(r2), (std::vector<int>{6, 2, 5}));
  // Tied group scores with different members: groups {0,1} and {2,3} both sum to 2 s(1); group 0 wins.
  std::vector<float> l3 = {1.f, 1.f, 1.f, 1.f, -2.f, -2.f};
  ops::MoeRouting r3 = ops::moe_route(Tensor::from_vector(l3, {1, 6}), Tensor::zeros({6}, DType::F32), cfg_of(3, 1, 2));
  EXPECT_EQ(experts_of(r3), (std::vector<int>{0, 1}));
}

TEST(MoeRoute, TopkGroupLimitsTheChoice) {
  // Group 1 (experts 4..7) holds the four best scores; expert 8 (group 2) is 5th best overall but its
  // group scores below group 3 (experts 12, 13), so with topk_group = 2 the last two picks come from group 3.
  std::vector<float> l = {-1, -1, -1, -1, 5, 5.1f, 5.2f, 5.3f, 4, -3, -3, -3, 3, 3, -5, -5};
  ops::MoeRouting r = ops::moe_route(Tensor::from_vector(l, {1, 16}), Tensor::zeros({16}, DType::F32), cfg_of(4, 2, 6));
  EXPECT_EQ(experts_of(r), (std::vector<int>{7, 6, 5, 4, 12, 13}));
  // Without the group limit the 5th pick is expert 8.
  ops::MoeRouting all = ops::moe_route(Tensor::from_vector(l, {1, 16}), Tensor::zeros({16}, DType::F32), cfg_of(4, 4, 6));
  EXPECT_EQ(experts_of(all), (std::vector<int>{7, 6, 5, 4, 8, 12}));
  // A kept group's experts with negative biased scores still beat every masked expert (-inf mask;
  // transformers 4.5x masks with 0.0, which would pick masked experts over 9, 10, 11 here).
  std::vector<double> bias(16, 0.0);
  bias[8] = 3.0;  // group 2 = 3.98 + (s(-3) - 0.5): kept first
  bias[9] = -0.5;
  bias[10] = bias[11] = -3.0;
  ops::MoeRouting neg = ops::moe_route(Tensor::from_vector(l, {1, 16}), bias_tensor(bias), cfg_of(4, 2, 8));
  EXPECT_EQ(experts_of(neg), (std::vector<int>{8, 7, 6, 5, 4, 9, 10, 11}));
}

TEST(MoeRoute, BiasChangesChoiceNotWeights) {
  std::vector<float> l = {2.f, 1.f, 0.f, -1.f, -2.f, -3.f, -4.f, -5.f};
  std::vector<double> bias(8, 0.0);
  bias[2] = 1.0;  // expert 2: biased 1.5 beats expert 0 (0.88) and 1 (0.73)
  const double scaling = 2.5;
  ops::MoeRouting r = ops::moe_route(Tensor::from_vector(l, {1, 8}), bias_tensor(bias), cfg_of(1, 1, 2, true, scaling));
  EXPECT_EQ(experts_of(r), (std::vector<int>{2, 0}));
  const double s2 = 1 / (1 + std::exp(-0.0)), s0 = 1 / (1 + std::exp(-2.0));
  EXPECT_NEAR(r.weights.item(0), scaling * s2 / (s2 + s0), 1e-6);
  EXPECT_NEAR(r.weights.item(1), scaling * s0 / (s2 + s0), 1e-6);
  // The unbiased route picks 0, 1.
  ops::MoeRouting u = ops::moe_route(Tensor::from_vector(l, {1, 8}), Tensor::zeros({8}, DType::F32), cfg_of(1, 1, 2));
  EXPECT_EQ(experts_of(u), (std::vector<int>{0, 1}));
}

TEST(MoeRoute, NormTopkProbOff) {
  Tensor logits = randn({5, 8}, 7, 1.0, DType::F64);
  ops::MoeRouting r = ops::moe_route(logits, Tensor::zeros({8}, DType::F32), cfg_of(2, 1, 3, false, 2.5));
  for (int64_t n = 0; n < 5; ++n)
    for (int64_t k = 0; k < 3; ++k) {
      const int e = r.experts.data<int32_t>()[n * 3 + k];
      EXPECT_EQ(r.weights.item(n * 3 + k), 2.5 * r.scores.item(n * 8 + e));
    }
}

TEST(MoeRoute, ErrorsAndNan) {
  Tensor logits = randn({3, 8}, 1, 1.0, DType::F32);
  EXPECT_THROW(ops::moe_route(logits, Tensor::zeros({8}, DType::F32), cfg_of(3, 1, 2)), std::runtime_error);
  EXPECT_THROW(ops::moe_route(logits, Tensor::zeros({8}, DType::F32), cfg_of(4, 1, 3)), std::runtime_error);
  EXPECT_THROW(ops::moe_route(logits, Tensor::zeros({7}, DType::F32), cfg_of(1, 1, 2)), std::runtime_error);
  logits.set_item(9, std::nan(""));
  try {
    ops::moe_route(logits, Tensor::zeros({8}, DType::F32), cfg_of(1, 1, 2));
    FAIL() << "expected an error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("[moe_route] router logits or bias are NaN for token 1"), std::string::npos)
        << e.what();
  }
}

TEST(MoeRoute, BackwardFiniteDifferenceF64) {
  for (bool norm : {true, false}) {
    const ops::MoeRouteConfig cfg = cfg_of(4, 2, 4, norm, 2.5);
    Tensor logits = randn({9, 16}, 21, 1.0, DType::F64);
    Tensor bias = randn({16}, 22, 0.2, DType::F32);
    Tensor g = randn({9, 4}, 23);
    ops::MoeRouting r = ops::moe_route(logits, bias, cfg);
    Tensor dlogits = ops::moe_route_backward(g, r, cfg);
    const std::vector<int> chosen = experts_of(r);
    auto loss = [&] {
      ops::MoeRouting rr = ops::moe_route(logits, bias, cfg);
      EXPECT_EQ(experts_of(rr), chosen);  // the perturbation must not change the selection
      return dot(rr.weights, g);
    };
    EXPECT_TRUE(grad_check("dlogits", logits, dlogits, loss, 1e-6, 1e-6, 1e-9)) << "norm " << norm;
  }
}

TEST(MoeRoute, ScoresBackwardFiniteDifferenceF64) {
  const ops::MoeRouteConfig cfg = cfg_of(2, 1, 2);
  Tensor logits = randn({6, 8}, 31, 1.0, DType::F64);
  Tensor bias = Tensor::zeros({8}, DType::F32);
  Tensor g = randn({6, 8}, 32);
  ops::MoeRouting r = ops::moe_route(logits, bias, cfg);
  Tensor dlogits = ops::moe_scores_backward(g, r);
  auto loss = [&] { return dot(ops::moe_route(logits, bias, cfg).scores, g); };
  EXPECT_TRUE(grad_check("dlogits", logits, dlogits, loss, 1e-6, 1e-6, 1e-9));
}

TEST(MoeBalance, ExpertLoadCounts) {
  std::vector<int32_t> ex = {0, 3, 3, 1, 0, 2, 3, 0};
  ops::MoeRouting r;
  r.experts = Tensor::from_vector(ex, {4, 2});
  Tensor load = ops::moe_expert_load(r, 5);
  EXPECT_EQ(load.dtype(), DType::F32);
  std::vector<double> want = {3, 1, 1, 3, 0};
  for (int e = 0; e < 5; ++e) EXPECT_EQ(load.item(e), want[e]);
  EXPECT_THROW(ops::moe_expert_load(r, 3), std::runtime_error);
  // On a real routing: loads sum to N*K.
  ops::MoeRouting rr = ops::moe_route(randn({40, 16}, 5, 1.0, DType::F32), Tensor::zeros({16}, DType::F32), cfg_of(4, 2, 4));
  double total = 0;
  Tensor l2 = ops::moe_expert_load(rr, 16);
  for (int e = 0; e < 16; ++e) total += l2.item(e);
  EXPECT_EQ(total, 160.0);
}

TEST(MoeBalance, SeqLossValueAndGradient) {
  const int64_t B = 3, T = 5, E = 8, K = 2;
  const double alpha = 0.01;
  const ops::MoeRouteConfig cfg = cfg_of(2, 2, K);
  Tensor logits = randn({B * T, E}, 41, 1.0, DType::F64);
  ops::MoeRouting r = ops::moe_route(logits, Tensor::zeros({E}, DType::F32), cfg);
  // Reference value, straight from the paper's formulas.
  double want = 0;
  for (int64_t b = 0; b < B; ++b) {
    std::vector<double> f(E, 0), P(E, 0);
    for (int64_t t = b * T; t < (b + 1) * T; ++t) {
      for (int64_t k = 0; k < K; ++k) f[r.experts.data<int32_t>()[t * K + k]] += double(E) / (K * T);
      double z = 0;
      for (int64_t e = 0; e < E; ++e) z += r.scores.item(t * E + e);
      for (int64_t e = 0; e < E; ++e) P[e] += r.scores.item(t * E + e) / z / T;
    }
    for (int64_t e = 0; e < E; ++e) want += alpha * f[e] * P[e] / B;
  }
  Tensor ds = Tensor::full({B * T, E}, DType::F64, 0.25);  // accumulates on top of 0.25
  const double loss = ops::moe_seq_balance_loss(r, E, B, T, alpha, &ds);
  EXPECT_NEAR(loss, want, 1e-15);
  Tensor analytic = ds.clone();
  for (int64_t i = 0; i < analytic.numel(); ++i) analytic.set_item(i, analytic.item(i) - 0.25);
  auto fn = [&] { return ops::moe_seq_balance_loss(r, E, B, T, alpha, nullptr); };
  EXPECT_TRUE(grad_check("dscores", r.scores, analytic, fn, 1e-6, 1e-6, 1e-12));
  // Perfect balance with uniform scores gives exactly alpha.
  ops::MoeRouting u;
  u.scores = Tensor::full({4, 4}, DType::F64, 0.5);
  u.experts = Tensor::from_vector(std::vector<int32_t>{0, 1, 2, 3, 0, 1, 2, 3}, {4, 2});
  EXPECT_NEAR(ops::moe_seq_balance_loss(u, 4, 1, 4, 0.3, nullptr), 0.3, 1e-15);
}

TEST(MoePermutation, StableByExpertAndRoundTrip) {
  const int64_t N = 23, K = 3, E = 6, D = 5;
  std::vector<int32_t> ex(N * K);
  std::mt19937 rng(5);
  for (int64_t n = 0; n < N; ++n) {  // distinct experts per token, expert 4 never used
    std::vector<int32_t> pool = {0, 1, 2, 3, 5};
    std::shuffle(pool.begin(), pool.end(), rng);
    for (int64_t k = 0; k < K; ++k) ex[n * K + k] = pool[k];
  }
  ops::MoePermutation p = ops::moe_permutation(Tensor::from_vector(ex, {N, K}), E);
  ASSERT_EQ(p.counts.size(), size_t(E));
  ASSERT_EQ(p.offsets.size(), size_t(E + 1));
  EXPECT_EQ(p.counts[4], 0);
  EXPECT_EQ(p.offsets[E], N * K);
  const int32_t* rows = p.rows.data<int32_t>();
  std::vector<int> seen(N * K, 0);
  for (int64_t e = 0; e < E; ++e) {
    int64_t cnt = 0;
    for (int64_t i = 0; i < N * K; ++i) cnt += ex[i] == e;
    EXPECT_EQ(p.counts[e], cnt);
    for (int64_t r = p.offsets[e]; r < p.offsets[e + 1]; ++r) {
      EXPECT_EQ(ex[rows[r]], e);
      if (r > p.offsets[e]) {
        EXPECT_LT(rows[r - 1], rows[r]);  // stable: (token, slot) ascending
      }
      ++seen[rows[r]];
    }
  }
  for (int s : seen) EXPECT_EQ(s, 1);
  Tensor x = randn({N, D}, 6);
  Tensor xp = ops::moe_permute(x, p, K);
  for (int64_t r = 0; r < N * K; ++r)
    for (int64_t i = 0; i < D; ++i) EXPECT_EQ(xp.item(r * D + i), x.item((rows[r] / K) * D + i));
  // Round trip: the backward of the copy sums each token's K copies, i.e. K * x.
  Tensor back = ops::moe_permute_backward(xp, p, N, K);
  Tensor kx = x.clone();
  for (int64_t i = 0; i < kx.numel(); ++i) kx.set_item(i, double(K) * x.item(i));
  EXPECT_TRUE(all_close(back, kx, 1e-15, 0));
  // Permute works on any dtype (a row copy), e.g. i32.
  Tensor xi = Tensor::from_vector(std::vector<int32_t>(N * 2, 7), {N, 2});
  EXPECT_EQ(ops::moe_permute(xi, p, K).shape(), Shape({N * K, 2}));
  EXPECT_THROW(ops::moe_permutation(Tensor::from_vector(std::vector<int32_t>{0, 6}, {1, 2}), E), std::runtime_error);
}

TEST(MoePermutation, PermuteBackwardAndCombineFiniteDifferenceF64) {
  const int64_t N = 7, K = 2, E = 4, D = 3;
  std::vector<int32_t> ex = {1, 3, 0, 1, 3, 2, 2, 0, 1, 0, 3, 1, 2, 3};
  ops::MoePermutation p = ops::moe_permutation(Tensor::from_vector(ex, {N, K}), E);
  Tensor x = randn({N, D}, 1), gxp = randn({N * K, D}, 2);
  Tensor dx = ops::moe_permute_backward(gxp, p, N, K);
  EXPECT_TRUE(grad_check("permute dx", x, dx, [&] { return dot(ops::moe_permute(x, p, K), gxp); }));
  Tensor yp = randn({N * K, D}, 3), w = randn({N, K}, 4), gy = randn({N, D}, 5);
  Tensor dyp, dw;
  ops::moe_combine_backward(gy, yp, w, p, &dyp, &dw);
  auto loss = [&] { return dot(ops::moe_combine(yp, w, p), gy); };
  EXPECT_TRUE(grad_check("combine dyp", yp, dyp, loss));
  EXPECT_TRUE(grad_check("combine dweights", w, dw, loss));
  // combine(permute(x), w) == x * sum_k w when every expert is the identity.
  Tensor y = ops::moe_combine(ops::moe_permute(x, p, K), w, p);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = 0; i < D; ++i)
      EXPECT_NEAR(y.item(n * D + i), x.item(n * D + i) * (w.item(n * K) + w.item(n * K + 1)), 1e-14);
}

TEST(MoeGroupedLinear, ForwardAndBackward) {
  for (DType dt : {DType::F64, DType::F32}) {
    const int64_t N = 19, K = 2, E = 5, in = 6, out = 4;
    std::vector<int32_t> ex(N * K);
    for (int64_t n = 0; n < N; ++n) {  // expert 3 unused
      ex[n * K] = static_cast<int32_t>(n % 3);
      ex[n * K + 1] = 4;
    }
    ops::MoePermutation p = ops::moe_permutation(Tensor::from_vector(ex, {N, K}), E);
    Tensor xp = randn({N * K, in}, 1, 1.0, dt), w = randn({E, out, in}, 2, 1.0, dt);
    Tensor y = ops::grouped_linear_forward(xp, w, p);
    const int32_t* rows = p.rows.data<int32_t>();
    for (int64_t r = 0; r < N * K; ++r) {
      const int64_t e = ex[rows[r]];
      for (int64_t o = 0; o < out; ++o) {
        double acc = 0;
        for (int64_t i = 0; i < in; ++i) acc += xp.item(r * in + i) * w.item((e * out + o) * in + i);
        EXPECT_NEAR(y.item(r * out + o), acc, dt == DType::F64 ? 1e-13 : 1e-5);
      }
    }
    if (dt != DType::F64) continue;
    Tensor gy = randn({N * K, out}, 3);
    Tensor dw = Tensor::full({E, out, in}, DType::F64, 1.0);  // accumulates on top of 1
    Tensor dx = ops::grouped_linear_backward(gy, xp, w, p, &dw);
    auto loss = [&] { return dot(ops::grouped_linear_forward(xp, w, p), gy); };
    EXPECT_TRUE(grad_check("grouped dx", xp, dx, loss));
    Tensor dw_only = dw.clone();
    for (int64_t i = 0; i < dw_only.numel(); ++i) dw_only.set_item(i, dw_only.item(i) - 1.0);
    EXPECT_TRUE(grad_check("grouped dw", w, dw_only, loss));
    for (int64_t i = 0; i < out * in; ++i) EXPECT_EQ(dw.item(3 * out * in + i), 1.0);  // unused expert untouched
    Tensor dx2 = ops::grouped_linear_backward(gy, xp, w, p, nullptr);
    EXPECT_TRUE(all_close(dx2, dx, 0, 1e-300));
  }
}

TEST(MoeGroupedLinear, ShapeErrors) {
  ops::MoePermutation p = ops::moe_permutation(Tensor::from_vector(std::vector<int32_t>{0, 1, 1, 0}, {2, 2}), 2);
  Tensor xp = randn({4, 3}, 1);
  EXPECT_THROW(ops::grouped_linear_forward(xp, randn({3, 2, 3}, 2), p), std::runtime_error);
  EXPECT_THROW(ops::grouped_linear_forward(randn({5, 3}, 1), randn({2, 2, 3}, 2), p), std::runtime_error);
  try {
    ops::grouped_linear_forward(xp, randn({2, 2, 4}, 2), p);
    FAIL() << "expected an error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("[grouped_linear_forward] w must have shape [2, -1, 3]"), std::string::npos)
        << e.what();
  }
}

namespace {

// Per-expert products in f64 with the magnitudes beside them: for each expert e and its rows [o, o + c) of
// the permutation, C[i, j] = sum_l a(i, l) b(l, j) over l < L, and M[i, j] = sum_l |a(i, l) b(l, j)|.
template <class A, class B>
void naive_product(int64_t rows, int64_t cols, int64_t L, A a, B b, std::vector<double>& C, std::vector<double>& M) {
  C.assign(rows * cols, 0.0);
  M.assign(rows * cols, 0.0);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t l = 0; l < L; ++l) {
      const double x = a(i, l);
      for (int64_t j = 0; j < cols; ++j) {
        const double y = x * b(l, j);
        C[i * cols + j] += y;
        M[i * cols + j] += std::fabs(y);
      }
    }
}

// got[i] within gamma_n * (M[i] + |base[i]|) of C[i] + base[i] (base: an accumulated-onto start, or null).
::testing::AssertionResult within_dot_bound(const char* what, const float* got, const std::vector<double>& C,
                                            const std::vector<double>& M, int64_t n, const float* base = nullptr) {
  const double u = std::ldexp(1.0, -24), gamma = n * u / (1 - n * u);
  for (size_t i = 0; i < C.size(); ++i) {
    const double b0 = base ? base[i] : 0.0, want = C[i] + b0, tol = gamma * (M[i] + std::fabs(b0));
    if (!(std::fabs(got[i] - want) <= tol))
      return ::testing::AssertionFailure()
             << what << "[" << i << "] = " << got[i] << ", want " << want << " +- " << tol;
  }
  return ::testing::AssertionSuccess();
}

}  // namespace

TEST(MoeGroupedLinear, Widths1024To512Experts16Top4F32) {
  // bench-small's expert up-projection (its timing: dsa-bench ops --only moe): 64 tokens routed to 4 of 16
  // experts (4 groups, 2 kept), hidden 1024 -> moe_intermediate 512, in f32 against per-expert f64 products
  // of the same values. The bound is Higham's for an f32 dot product of n terms in any order, with or
  // without FMA: |fl(sum) - sum| <= gamma_n sum |a_i b_i|, gamma_n = n u / (1 - n u), u = 2^-24; dw adds
  // onto a given start (one more term: gamma_{n+1}, with |dw0| in the magnitude).
  const int64_t N = 64, K = 4, E = 16, in = 1024, out = 512, M = N * K;
  const ops::MoeRouting r =
      ops::moe_route(randn({N, E}, 1, 1.0, DType::F32), Tensor::zeros({E}, DType::F32), cfg_of(4, 2, K));
  const ops::MoePermutation p = ops::moe_permutation(r.experts, E);
  const Tensor xp = randn({M, in}, 2, 1.0, DType::F32), w = randn({E, out, in}, 3, 0.03, DType::F32);
  const Tensor dy = randn({M, out}, 4, 1.0, DType::F32), dw0 = randn({E, out, in}, 5, 0.1, DType::F32);
  Tensor dw = dw0.clone();
  const Tensor y = ops::grouped_linear_forward(xp, w, p);
  const Tensor dx = ops::grouped_linear_backward(dy, xp, w, p, &dw);
  ASSERT_EQ(y.shape(), Shape({M, out}));
  ASSERT_EQ(dx.shape(), Shape({M, in}));
  const float *X = xp.data<float>(), *W = w.data<float>(), *DY = dy.data<float>();
  std::vector<double> C, Mag;
  int64_t used = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t o = p.offsets[e], c = p.counts[e];
    const float* We = W + e * out * in;
    SCOPED_TRACE(::testing::Message() << "expert " << e << ", " << c << " rows");
    used += c > 0;
    // y[rows of e] = xp[rows of e] W_e^T
    naive_product(c, out, in, [&](int64_t i, int64_t l) { return X[(o + i) * in + l]; },
                  [&](int64_t l, int64_t j) { return We[j * in + l]; }, C, Mag);
    EXPECT_TRUE(within_dot_bound("y", y.data<float>() + o * out, C, Mag, in));
    // dx[rows of e] = dy[rows of e] W_e
    naive_product(c, in, out, [&](int64_t i, int64_t l) { return DY[(o + i) * out + l]; },
                  [&](int64_t l, int64_t j) { return We[l * in + j]; }, C, Mag);
    EXPECT_TRUE(within_dot_bound("dx", dx.data<float>() + o * in, C, Mag, out));
    // dw_e = dw0_e + dy[rows of e]^T xp[rows of e]
    naive_product(out, in, c, [&](int64_t i, int64_t l) { return DY[(o + l) * out + i]; },
                  [&](int64_t l, int64_t j) { return X[(o + l) * in + j]; }, C, Mag);
    EXPECT_TRUE(
        within_dot_bound("dw", dw.data<float>() + e * out * in, C, Mag, c + 1, dw0.data<float>() + e * out * in));
  }
  EXPECT_GE(used, 8) << "the routing should spread 256 rows over most of the 16 experts";
}
