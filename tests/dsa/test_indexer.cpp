// Lightning indexer scoring (forward against a naive loop, backward by finite differences in f64,
// streaming by row blocks) and the causal top-k (ties, -1 padding, FP8 path).
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <cmath>
#include <limits>
#include <map>
#include <numeric>
#include <set>

#include "kernels/dsa_ops.h"
#include "tests/dsa/fp8_reference.h"
#include "tests/test_util.h"

using namespace dsa;
using dsa::testing::all_close;
using dsa::testing::randn;

namespace {
// I[b, t, s] by the definition, -inf for s > t.  q [B,T,Hi,D], k [B,T,D], w [B,T,Hi] -> [B,T,T] f64.
Tensor naive_scores(const Tensor& q, const Tensor& k, const Tensor& w) {
  const int64_t B = q.size(0), T = q.size(1), Hi = q.size(2), D = q.size(3);
  Tensor I = Tensor::empty({B, T, T}, DType::F64);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t s = 0; s < T; ++s) {
        double acc = 0;
        for (int64_t j = 0; j < Hi; ++j) {
          double z = 0;
          for (int64_t i = 0; i < D; ++i) z += q.item(((b * T + t) * Hi + j) * D + i) * k.item((b * T + s) * D + i);
          acc += w.item((b * T + t) * Hi + j) / std::sqrt(double(D)) * std::max(z, 0.0);
        }
        I.set_item((b * T + t) * T + s, s <= t ? acc : -std::numeric_limits<double>::infinity());
      }
  return I;
}

// Rows [t0, t1) of [B, T, T] as [B, t1 - t0, T].
Tensor rows_of(const Tensor& full, int64_t t0, int64_t t1) {
  const int64_t B = full.size(0), T = full.size(2);
  Tensor out = Tensor::empty({B, t1 - t0, T}, full.dtype());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t r = 0; r < t1 - t0; ++r)
      for (int64_t s = 0; s < T; ++s) out.set_item((b * (t1 - t0) + r) * T + s, full.item((b * T + t0 + r) * T + s));
  return out;
}

// Masked entries (-inf) compare equal to each other; finite entries within tolerance.
::testing::AssertionResult scores_close(const Tensor& a, const Tensor& b, double tol) {
  if (a.shape() != b.shape()) return ::testing::AssertionFailure() << a.desc() << " vs " << b.desc();
  for (int64_t i = 0; i < a.numel(); ++i) {
    const double x = a.item(i), y = b.item(i);
    if (std::isinf(y) ? x != y : !(std::fabs(x - y) <= tol * (1 + std::fabs(y))))
      return ::testing::AssertionFailure() << "at " << i << ": " << x << " vs " << y;
  }
  return ::testing::AssertionSuccess();
}

// Reference top-k: full sort of (score desc, index asc) over s <= t, -1 padding.
Tensor naive_topk(const Tensor& I, int64_t K) {
  const int64_t B = I.size(0), T = I.size(1);
  Tensor out = Tensor::empty({B, T, K}, DType::I32);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      std::vector<int32_t> c(static_cast<size_t>(t + 1));
      std::iota(c.begin(), c.end(), 0);
      auto sc = [&](int32_t s) { return I.item((b * T + t) * T + s); };
      std::stable_sort(c.begin(), c.end(), [&](int32_t x, int32_t y) { return sc(x) > sc(y); });
      for (int64_t i = 0; i < K; ++i) out.data<int32_t>()[(b * T + t) * K + i] = i <= t ? c[i] : -1;
    }
  return out;
}

// One batch, rows t = 2..4 of T = 5 (t0 = 2) with ties; entries beyond t are ignored whatever they hold.
Tensor tie_rows() {
  const double X = 1e9;
  return Tensor::from_vector(std::vector<float>{1, 3, 3, X, X,   // t = 2
                                                3, 3, 0, 3, X,    // t = 3
                                                1, 3, 3, 2, 3},   // t = 4
                             {1, 3, 5});
}

struct Operands {
  Tensor q, k, w;
};
Operands random_operands(int64_t B, int64_t T, int64_t Hi, int64_t D, uint64_t seed, DType dt = DType::F64) {
  return {randn({B, T, Hi, D}, seed, 1.0, dt), randn({B, T, D}, seed + 1, 1.0, dt),
          randn({B, T, Hi}, seed + 2, 1.0 / std::sqrt(double(Hi)), dt)};
}
}  // namespace

TEST(IndexerScores, ForwardMatchesDefinitionForEveryRowBlock) {
  const Operands o = random_operands(2, 11, 3, 8, 1);
  const Tensor full = naive_scores(o.q, o.k, o.w);
  EXPECT_TRUE(scores_close(ops::indexer_scores_forward(o.q, o.k, o.w, 0, 11), full, 1e-12));
  for (auto [t0, t1] : std::vector<std::pair<int64_t, int64_t>>{{0, 1}, {3, 7}, {10, 11}, {4, 4}})
    EXPECT_TRUE(scores_close(ops::indexer_scores_forward(o.q, o.k, o.w, t0, t1), rows_of(full, t0, t1), 1e-12))
        << t0 << ".." << t1;
  // f32 agrees with f64.
  const Operands f = random_operands(2, 11, 3, 8, 1, DType::F32);
  EXPECT_TRUE(scores_close(ops::indexer_scores_forward(f.q, f.k, f.w, 0, 11), full, 1e-5));
}

TEST(IndexerScores, BackwardMatchesFiniteDifferencesAndAccumulates) {
  for (uint64_t seed : {10u, 20u}) {
    Operands o = random_operands(2, 9, 3, 4, seed);
    const int64_t t0 = 2, t1 = 7;
    Tensor g = randn({2, t1 - t0, 9}, seed + 5);
    for (int64_t b = 0; b < 2; ++b)  // masked entries carry garbage: they must be ignored
      for (int64_t r = 0; r < t1 - t0; ++r)
        for (int64_t s = t0 + r + 1; s < 9; ++s) g.set_item((b * (t1 - t0) + r) * 9 + s, std::nan(""));
    auto loss = [&] {
      const Tensor I = ops::indexer_scores_forward(o.q, o.k, o.w, t0, t1);
      double l = 0;
      for (int64_t i = 0; i < I.numel(); ++i)
        if (!std::isinf(I.item(i))) l += I.item(i) * g.item(i);
      return l;
    };
    Tensor dq = Tensor::zeros(o.q.shape(), DType::F64), dk = Tensor::zeros(o.k.shape(), DType::F64),
           dw = Tensor::zeros(o.w.shape(), DType::F64);
    ops::indexer_scores_backward(g, o.q, o.k, o.w, t0, &dq, &dk, &dw);
    EXPECT_TRUE(dsa::testing::grad_check("q_I", o.q, dq, loss));
    EXPECT_TRUE(dsa::testing::grad_check("k_I", o.k, dk, loss));
    EXPECT_TRUE(dsa::testing::grad_check("w_I", o.w, dw, loss));
    // A second call adds the same amount again.
    Tensor dq2 = dq.clone();
    ops::indexer_scores_backward(g, o.q, o.k, o.w, t0, &dq2, nullptr, nullptr);
    for (int64_t i = 0; i < dq.numel(); ++i) EXPECT_DOUBLE_EQ(dq2.item(i), 2 * dq.item(i));
  }
}

TEST(IndexerScores, RowBlocksAddUpToTheFullBackward) {
  const Operands o = random_operands(1, 13, 2, 8, 30);
  const Tensor g = randn({1, 13, 13}, 31);
  Tensor dq = Tensor::zeros(o.q.shape(), DType::F64), dk = Tensor::zeros(o.k.shape(), DType::F64),
         dw = Tensor::zeros(o.w.shape(), DType::F64);
  ops::indexer_scores_backward(g, o.q, o.k, o.w, 0, &dq, &dk, &dw);
  Tensor bq = Tensor::zeros(o.q.shape(), DType::F64), bk = Tensor::zeros(o.k.shape(), DType::F64),
         bw = Tensor::zeros(o.w.shape(), DType::F64);
  for (int64_t t0 = 0; t0 < 13; t0 += 4) {
    const int64_t t1 = std::min<int64_t>(13, t0 + 4);
    ops::indexer_scores_backward(rows_of(g, t0, t1), o.q, o.k, o.w, t0, &bq, &bk, &bw);
  }
  EXPECT_TRUE(all_close(bq, dq, 1e-12, 1e-12));
  EXPECT_TRUE(all_close(bk, dk, 1e-12, 1e-12));
  EXPECT_TRUE(all_close(bw, dw, 1e-12, 1e-12));
}

TEST(IndexerScores, ShapeErrorsNameTheOp) {
  const Operands o = random_operands(1, 4, 2, 8, 40);
  try {
    ops::indexer_scores_forward(o.q, randn({1, 4, 7}, 1), o.w, 0, 4);
    FAIL() << "expected an error";
  } catch (const std::runtime_error& e) {
    EXPECT_EQ(std::string(e.what()).rfind("[indexer_scores_forward] k_I must have shape", 0), 0u) << e.what();
  }
  EXPECT_THROW(ops::indexer_scores_forward(o.q, o.k, o.w, 2, 5), std::runtime_error);
  EXPECT_THROW(ops::indexer_topk(o.q, o.k, o.w.to(DType::F32), 2, false), std::runtime_error);
}

TEST(IndexerTopk, TiesPreferTheLowerIndexAndUnusedSlotsAreMinusOne) {
  const Tensor scores = tie_rows();
  const Tensor top3 = ops::topk_causal(scores, 2, 3);
  EXPECT_EQ(std::vector<int32_t>(top3.data<int32_t>(), top3.data<int32_t>() + 9),
            (std::vector<int32_t>{1, 2, 0, 0, 1, 3, 1, 2, 4}));
  const Tensor top6 = ops::topk_causal(scores, 2, 6);  // K > t + 1: all of s <= t, then -1
  EXPECT_EQ(std::vector<int32_t>(top6.data<int32_t>(), top6.data<int32_t>() + 18),
            (std::vector<int32_t>{1, 2, 0, -1, -1, -1, 0, 1, 3, 2, -1, -1, 1, 2, 4, 3, 0, -1}));
  // All scores equal: the first K indices in order.
  const Tensor flat = ops::topk_causal(Tensor::zeros({2, 6, 6}, DType::F64), 0, 3);
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t t = 0; t < 6; ++t)
      for (int64_t i = 0; i < 3; ++i)
        EXPECT_EQ(flat.data<int32_t>()[(b * 6 + t) * 3 + i], i <= t ? i : -1) << b << " " << t << " " << i;
}

TEST(IndexerTopk, IndexOrderIsTheSameSetInAscendingIndex) {
  // The rows of the ties test: the same winners as the score order, sorted by index, -1 padding last.
  const Tensor scores = tie_rows();
  const Tensor top3 = ops::topk_causal(scores, 2, 3, ops::TopkOrder::kIndex);
  EXPECT_EQ(std::vector<int32_t>(top3.data<int32_t>(), top3.data<int32_t>() + 9),
            (std::vector<int32_t>{0, 1, 2, 0, 1, 3, 1, 2, 4}));
  const Tensor top6 = ops::topk_causal(scores, 2, 6, ops::TopkOrder::kIndex);
  EXPECT_EQ(std::vector<int32_t>(top6.data<int32_t>(), top6.data<int32_t>() + 18),
            (std::vector<int32_t>{0, 1, 2, -1, -1, -1, 0, 1, 2, 3, -1, -1, 0, 1, 2, 3, 4, -1}));
  // Random rows with ties and a NaN: per row, the index order is the score order's slots sorted.
  Tensor r = randn({2, 40, 60}, 81, 1.0, DType::F32);
  for (int64_t i = 0; i < r.numel(); i += 3) r.data<float>()[i] = std::round(r.data<float>()[i]);
  r.data<float>()[7] = std::numeric_limits<float>::quiet_NaN();
  for (const int64_t K : {1, 8, 33, 64}) {
    const Tensor by_score = ops::topk_causal(r, 20, K), by_index = ops::topk_causal(r, 20, K, ops::TopkOrder::kIndex);
    ASSERT_EQ(by_index.shape(), by_score.shape());
    for (int64_t row = 0; row < 2 * 40; ++row) {
      const int32_t* a = by_score.data<int32_t>() + row * K;
      const int32_t* b = by_index.data<int32_t>() + row * K;
      std::vector<int32_t> want(a, a + K);
      const auto valid_end = std::partition(want.begin(), want.end(), [](int32_t v) { return v >= 0; });
      std::sort(want.begin(), valid_end);
      EXPECT_EQ(std::vector<int32_t>(b, b + K), want) << "K " << K << " row " << row;
    }
  }
}

TEST(IndexerTopk, IndexOrderCarriesTheScoresOfItsSlots) {
  const Operands o = random_operands(1, 30, 4, 16, 90, DType::F32);
  Tensor v_score, v_index;
  const Tensor a = ops::indexer_topk(o.q, o.k, o.w, 8, /*fp8=*/true, 7, &v_score);
  const Tensor b = ops::indexer_topk(o.q, o.k, o.w, 8, /*fp8=*/true, 7, &v_index, ops::TopkOrder::kIndex);
  for (int64_t row = 0; row < 30; ++row) {
    std::map<int32_t, double> by_slot;
    for (int64_t i = 0; i < 8; ++i)
      if (a.data<int32_t>()[row * 8 + i] >= 0) by_slot[a.data<int32_t>()[row * 8 + i]] = v_score.item(row * 8 + i);
    int32_t prev = -1;
    for (int64_t i = 0; i < 8; ++i) {
      const int32_t s = b.data<int32_t>()[row * 8 + i];
      if (s < 0) {
        EXPECT_TRUE(std::isinf(v_index.item(row * 8 + i))) << "row " << row << " slot " << i;
        continue;
      }
      EXPECT_GT(s, prev) << "row " << row;
      prev = s;
      ASSERT_EQ(by_slot.count(s), 1u) << "row " << row << ": index " << s << " not in the score order's set";
      EXPECT_EQ(v_index.item(row * 8 + i), by_slot[s]) << "row " << row << " index " << s;
    }
  }
}

TEST(IndexerTopk, MatchesFullSortAndDoesNotDependOnTheBlock) {
  const Operands o = random_operands(2, 23, 4, 16, 50);
  const Tensor I = naive_scores(o.q, o.k, o.w);
  for (int64_t K : {1, 5, 23, 30}) {
    const Tensor want = naive_topk(I, K);
    for (int64_t rb : {0, 1, 7}) {
      const Tensor got = ops::indexer_topk(o.q, o.k, o.w, K, /*fp8=*/false, rb);
      ASSERT_EQ(got.shape(), Shape({2, 23, K}));
      for (int64_t i = 0; i < got.numel(); ++i)
        ASSERT_EQ(got.data<int32_t>()[i], want.data<int32_t>()[i]) << "K " << K << " block " << rb << " at " << i;
    }
  }
}

TEST(IndexerTopk, Fp8PathSelectsNearlyTheSameSet) {
  const int64_t B = 1, T = 64, Hi = 4, D = 128, K = 16;
  const Operands o = random_operands(B, T, Hi, D, 60, DType::F32);
  const Tensor exact = ops::indexer_topk(o.q, o.k, o.w, K, false);
  const Tensor fp8 = ops::indexer_topk(o.q, o.k, o.w, K, true);
  // The selection of the reference FP8 view (tests/dsa/fp8_reference.h: f64 Hadamard product, e4m3 table),
  // scored by the definition in f64. NOTES: the op scores in f32, so two keys whose reference scores are
  // within 2 gamma_n sum|terms| of each other (n = D + Hi = 132 products and sums, gamma_n ~ n 2^-24;
  // sum|terms| < 60 here, asserted below: 9.4e-4) may swap; the top-k set is compared wherever the K-th and
  // (K+1)-th reference scores are further apart than that.
  const double margin = 2 * 132 * std::ldexp(1.0, -24) * 60;
  Tensor qr = Tensor::empty(o.q.shape(), DType::F64), kr = Tensor::empty(o.k.shape(), DType::F64);
  for (int64_t r = 0; r < B * T * Hi; ++r) {
    std::vector<double> x(D);
    for (int64_t i = 0; i < D; ++i) x[i] = o.q.item(r * D + i);
    const std::vector<double> y = dsa::testing::fp8_view_ref(x);
    for (int64_t i = 0; i < D; ++i) qr.set_item(r * D + i, y[i]);
  }
  for (int64_t r = 0; r < B * T; ++r) {
    std::vector<double> x(D);
    for (int64_t i = 0; i < D; ++i) x[i] = o.k.item(r * D + i);
    const std::vector<double> y = dsa::testing::fp8_view_ref(x);
    for (int64_t i = 0; i < D; ++i) kr.set_item(r * D + i, y[i]);
  }
  const Tensor Iref = naive_scores(qr, kr, o.w.to(DType::F64));
  int64_t rows_compared = 0;
  for (int64_t t = K; t < T; ++t) {  // rows with more than K candidates
    std::vector<double> sc;
    for (int64_t s = 0; s <= t; ++s) sc.push_back(Iref.item(t * T + s));
    std::vector<double> sorted = sc;
    std::sort(sorted.begin(), sorted.end(), std::greater<double>());
    for (int64_t s2 = 0; s2 <= t; ++s2) {
      double terms = 0;
      for (int64_t j = 0; j < Hi; ++j) {
        double z = 0;
        for (int64_t i = 0; i < D; ++i) z += std::fabs(qr.item((t * Hi + j) * D + i) * kr.item(s2 * D + i));
        terms += std::fabs(o.w.item(t * Hi + j)) / std::sqrt(double(D)) * z;
      }
      ASSERT_LT(terms, 60.0);
    }
    if (sorted[K - 1] - sorted[K] <= margin) continue;  // a near-tie at the boundary: either set is right
    std::set<int32_t> want, got(fp8.data<int32_t>() + t * K, fp8.data<int32_t>() + (t + 1) * K);
    for (int64_t s = 0; s <= t; ++s)
      if (sc[s] >= sorted[K - 1]) want.insert(static_cast<int32_t>(s));
    EXPECT_EQ(got, want) << "row " << t;
    ++rows_compared;
  }
  EXPECT_GE(rows_compared, (T - K) * 9 / 10);
  int64_t common = 0, total = 0;
  for (int64_t t = 0; t < T; ++t) {
    std::set<int32_t> a(exact.data<int32_t>() + t * K, exact.data<int32_t>() + (t + 1) * K);
    for (int64_t i = 0; i < K; ++i) {
      const int32_t s = fp8.data<int32_t>()[t * K + i];
      EXPECT_TRUE(s == -1 ? i > t : (s >= 0 && s <= t)) << t << " " << i;
      if (s >= 0) common += a.count(s), ++total;
    }
  }
  EXPECT_GE(double(common) / double(total), 0.85) << common << "/" << total;
}
