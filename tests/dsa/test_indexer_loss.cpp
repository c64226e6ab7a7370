// Indexer KL losses (dense and sparse) and recall: blockwise results against a small materialized
// reference, finite differences in f64 w.r.t. q_I, k_I, w_I, KL = 0 exactly when softmax(I) equals the
// target, straight-through FP8, recall on constructed cases.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>

#include "kernels/dsa_ops.h"
#include "tests/test_util.h"

using namespace dsa;
using dsa::testing::all_close;
using dsa::testing::grad_check;
using dsa::testing::randn;

namespace {
constexpr double kInf = std::numeric_limits<double>::infinity();

// Dense causal lse [B, H, T] of scale * q_main . k_main (k_main [B, T, Hk, Dk]).
Tensor naive_lse(const Tensor& q, const Tensor& k, double scale) {
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), Dk = q.size(3), Hk = k.size(2);
  Tensor lse = Tensor::empty({B, H, T}, DType::F64);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < T; ++t) {
        double sum = 0;
        for (int64_t s = 0; s <= t; ++s) {
          double z = 0;
          for (int64_t i = 0; i < Dk; ++i)
            z += q.item(((b * T + t) * H + h) * Dk + i) * k.item(((b * T + s) * Hk + h / (H / Hk)) * Dk + i);
          sum += std::exp(scale * z);
        }
        lse.set_item((b * H + h) * T + t, std::log(sum));
      }
  return lse;
}

// Materialized target p [B, T, T]: head-summed attention, L1-normalized over s <= t.
Tensor naive_target(const Tensor& q, const Tensor& k, const Tensor& lse, double scale) {
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), Dk = q.size(3), Hk = k.size(2);
  Tensor p = Tensor::zeros({B, T, T}, DType::F64);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      double tot = 0;
      for (int64_t s = 0; s <= t; ++s) {
        double a = 0;
        for (int64_t h = 0; h < H; ++h) {
          double z = 0;
          for (int64_t i = 0; i < Dk; ++i)
            z += q.item(((b * T + t) * H + h) * Dk + i) * k.item(((b * T + s) * Hk + h / (H / Hk)) * Dk + i);
          a += std::exp(scale * z - lse.item((b * H + h) * T + t));
        }
        p.set_item((b * T + t) * T + s, a);
        tot += a;
      }
      for (int64_t s = 0; s <= t; ++s) p.set_item((b * T + t) * T + s, p.item((b * T + t) * T + s) / tot);
    }
  return p;
}

double naive_score(const Tensor& q, const Tensor& k, const Tensor& w, int64_t b, int64_t t, int64_t s) {
  const int64_t T = q.size(1), Hi = q.size(2), D = q.size(3);
  double acc = 0;
  for (int64_t j = 0; j < Hi; ++j) {
    double z = 0;
    for (int64_t i = 0; i < D; ++i) z += q.item(((b * T + t) * Hi + j) * D + i) * k.item((b * T + s) * D + i);
    acc += w.item((b * T + t) * Hi + j) / std::sqrt(double(D)) * std::max(z, 0.0);
  }
  return acc;
}

// KL(p || softmax(I)) over a list of (p, I) pairs.
double kl(const std::vector<double>& p, const std::vector<double>& I) {
  double m = -kInf, z = 0, out = 0;
  for (double x : I) m = std::max(m, x);
  for (double x : I) z += std::exp(x - m);
  for (size_t i = 0; i < p.size(); ++i)
    if (p[i] > 0) out += p[i] * (std::log(p[i]) - (I[i] - m - std::log(z)));
  return out;
}

double naive_dense_loss(const Tensor& p, const Tensor& q, const Tensor& k, const Tensor& w) {
  const int64_t B = q.size(0), T = q.size(1);
  double loss = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      std::vector<double> pr, ir;
      for (int64_t s = 0; s <= t; ++s) pr.push_back(p.item((b * T + t) * T + s)), ir.push_back(naive_score(q, k, w, b, t, s));
      loss += kl(pr, ir);
    }
  return loss;
}

// Sparse target over the valid slots from the sparse attention's (q, kv, lse), renormalized.
double naive_sparse_loss(const Tensor& qm, const Tensor& kv, const Tensor& lse, double scale, const Tensor& idx,
                         const Tensor& q, const Tensor& k, const Tensor& w) {
  const int64_t B = qm.size(0), T = qm.size(1), H = qm.size(2), Dk = qm.size(3), K = idx.size(2);
  double loss = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      std::vector<double> pr, ir;
      double tot = 0;
      for (int64_t kk = 0; kk < K; ++kk) {
        const int32_t s = idx.data<int32_t>()[(b * T + t) * K + kk];
        if (s < 0) continue;
        double a = 0;
        for (int64_t h = 0; h < H; ++h) {
          double z = 0;
          for (int64_t i = 0; i < Dk; ++i) z += qm.item(((b * T + t) * H + h) * Dk + i) * kv.item((b * T + s) * Dk + i);
          a += std::exp(scale * z - lse.item((b * H + h) * T + t));
        }
        pr.push_back(a), tot += a, ir.push_back(naive_score(q, k, w, b, t, s));
      }
      for (double& x : pr) x /= tot;
      if (!pr.empty()) loss += kl(pr, ir);
    }
  return loss;
}

struct Problem {
  int64_t B, T, H, Hk, Dk, Hi, D;
  double scale;
  Tensor qm, km, lse;  // main attention
  Tensor q, k, w;      // indexer
};
Problem make_problem(int64_t B, int64_t T, int64_t H, int64_t Hk, int64_t Dk, int64_t Hi, int64_t D, uint64_t seed,
                     double q_std = 1.0) {
  Problem p{B, T, H, Hk, Dk, Hi, D, 1.0 / std::sqrt(double(Dk)), randn({B, T, H, Dk}, seed), randn({B, T, Hk, Dk}, seed + 1),
            Tensor(), randn({B, T, Hi, D}, seed + 2, q_std), randn({B, T, D}, seed + 3, q_std),
            randn({B, T, Hi}, seed + 4, 1.0 / std::sqrt(double(Hi)))};
  p.lse = naive_lse(p.qm, p.km, p.scale);
  return p;
}
}  // namespace

TEST(IndexerLossDense, BlockwiseEqualsMaterializedReference) {
  for (int64_t Hk : {4, 1}) {
    const Problem pr = make_problem(2, 13, 4, Hk, 6, 3, 8, 100 + Hk);
    const double want = naive_dense_loss(naive_target(pr.qm, pr.km, pr.lse, pr.scale), pr.q, pr.k, pr.w);
    ops::IndexerGrads ref;
    const auto r0 = ops::indexer_kl_dense(pr.qm, pr.km, pr.lse, pr.scale, pr.q, pr.k, pr.w, false, 1.0, &ref, 13);
    EXPECT_EQ(r0.rows, 2 * 13);
    EXPECT_NEAR(r0.loss_sum, want, 1e-10 * std::fabs(want));
    EXPECT_GT(r0.loss_sum, 0.0);
    for (int64_t rb : {0, 1, 4}) {
      ops::IndexerGrads g;
      const auto r = ops::indexer_kl_dense(pr.qm, pr.km, pr.lse, pr.scale, pr.q, pr.k, pr.w, false, 1.0, &g, rb);
      EXPECT_NEAR(r.loss_sum, want, 1e-10 * std::fabs(want)) << rb;
      EXPECT_TRUE(all_close(g.dq, ref.dq, 1e-11, 1e-13)) << rb;
      EXPECT_TRUE(all_close(g.dk, ref.dk, 1e-11, 1e-13)) << rb;
      EXPECT_TRUE(all_close(g.dw, ref.dw, 1e-11, 1e-13)) << rb;
    }
    // Loss only (no gradients) gives the same value; f32 agrees with f64.
    EXPECT_NEAR(ops::indexer_kl_dense(pr.qm, pr.km, pr.lse, pr.scale, pr.q, pr.k, pr.w, false, 1.0, nullptr).loss_sum,
                want, 1e-10 * want);
    const auto r32 = ops::indexer_kl_dense(pr.qm.to(DType::F32), pr.km.to(DType::F32), pr.lse.to(DType::F32),
                                           pr.scale, pr.q.to(DType::F32), pr.k.to(DType::F32), pr.w.to(DType::F32),
                                           false, 1.0, nullptr);
    EXPECT_NEAR(r32.loss_sum, want, 1e-4 * want);
  }
}

TEST(IndexerLossDense, GradientsMatchFiniteDifferences) {
  Problem pr = make_problem(2, 7, 3, 1, 5, 2, 4, 200);
  const double gs = 0.7;
  ops::IndexerGrads g;
  ops::indexer_kl_dense(pr.qm, pr.km, pr.lse, pr.scale, pr.q, pr.k, pr.w, false, gs, &g, 3);
  auto loss = [&] {
    return gs * ops::indexer_kl_dense(pr.qm, pr.km, pr.lse, pr.scale, pr.q, pr.k, pr.w, false, 1.0, nullptr, 3).loss_sum;
  };
  EXPECT_TRUE(grad_check("q_I", pr.q, g.dq, loss));
  EXPECT_TRUE(grad_check("k_I", pr.k, g.dk, loss));
  EXPECT_TRUE(grad_check("w_I", pr.w, g.dw, loss));
}

TEST(IndexerLossSparse, EqualsMaterializedReferenceAndFiniteDifferences) {
  Problem pr = make_problem(2, 11, 3, 1, 6, 2, 4, 300);
  const int64_t K = 5, Dv = 4;
  const Tensor kv = pr.km.view({2, 11, 6});
  Tensor idx = ops::indexer_topk(pr.q, pr.k, pr.w, K, false);  // -1 padding in rows t < 4
  idx.data<int32_t>()[(1 * 11 + 9) * K + 2] = -1;               // a hole in a full row
  Tensor lse;
  ops::sparse_attention_forward(pr.qm, kv, Dv, idx, pr.scale, &lse);
  const double want = naive_sparse_loss(pr.qm, kv, lse, pr.scale, idx, pr.q, pr.k, pr.w);
  const double gs = 1.3;
  ops::IndexerGrads g;
  const auto r = ops::indexer_kl_sparse(pr.qm, kv, lse, pr.scale, idx, pr.q, pr.k, pr.w, false, gs, &g);
  EXPECT_EQ(r.rows, 2 * 11);
  EXPECT_NEAR(r.loss_sum, want, 1e-10 * want);
  EXPECT_GT(r.loss_sum, 0.0);
  // Selection fixed (no gradient through it), target fixed (stop-gradient): differentiate q_I, k_I, w_I only.
  auto loss = [&] {
    return gs * ops::indexer_kl_sparse(pr.qm, kv, lse, pr.scale, idx, pr.q, pr.k, pr.w, false, 1.0, nullptr).loss_sum;
  };
  EXPECT_TRUE(grad_check("q_I", pr.q, g.dq, loss));
  EXPECT_TRUE(grad_check("k_I", pr.k, g.dk, loss));
  EXPECT_TRUE(grad_check("w_I", pr.w, g.dw, loss));
}

// The target from the forward's head-summed probabilities is indexer_kl_sparse's target: same loss and
// gradients (f64, 1e-12), with holes, duplicated indices, and the FP8 scoring.
TEST(IndexerLossSparse, FromProbsEqualsRecomputedTarget) {
  const int64_t B = 2, T = 11, H = 3, Dk = 6, K = 5, Dv = 4;
  Problem pr = make_problem(B, T, H, 1, Dk, 2, 4, 310);
  const Tensor kv = pr.km.view({B, T, Dk});
  Tensor idx = ops::indexer_topk(pr.q, pr.k, pr.w, K, false);  // -1 padding in rows t < 4
  int32_t* ip = idx.data<int32_t>();
  ip[(1 * T + 9) * K + 2] = -1;                 // a hole in a full row
  ip[(0 * T + 8) * K + 3] = ip[(0 * T + 8) * K + 1];  // a duplicated index: two softmax terms
  ip[(1 * T + 2) * K + 4] = 0;                  // a valid slot after a -1 slot
  Tensor lse, psum;
  ops::sparse_attention_forward(pr.qm, kv, Dv, idx, pr.scale, &lse, &psum);
  ASSERT_EQ(psum.shape(), (Shape{B, T, K}));
  EXPECT_EQ(psum.dtype(), DType::F64);
  for (int64_t bt = 0; bt < B * T; ++bt) {  // each head's probabilities sum to 1 over the valid slots
    double tot = 0;
    bool any = false;
    for (int64_t k = 0; k < K; ++k) {
      if (ip[bt * K + k] < 0) EXPECT_EQ(psum.item(bt * K + k), 0.0);
      else any = true, tot += psum.item(bt * K + k);
    }
    EXPECT_NEAR(tot, any ? double(H) : 0.0, 1e-12);
  }
  for (bool fp8 : {false, true}) {
    ops::IndexerGrads ga, gb;
    const auto ra = ops::indexer_kl_sparse(pr.qm, kv, lse, pr.scale, idx, pr.q, pr.k, pr.w, fp8, 1.7, &ga);
    const auto rb = ops::indexer_kl_sparse_from_probs(psum, idx, pr.q, pr.k, pr.w, fp8, 1.7, &gb);
    EXPECT_EQ(ra.rows, rb.rows);
    EXPECT_NEAR(ra.loss_sum, rb.loss_sum, 1e-12);
    EXPECT_GT(rb.loss_sum, 0.0);
    EXPECT_TRUE(all_close(ga.dq, gb.dq, 0, 1e-12));
    EXPECT_TRUE(all_close(ga.dk, gb.dk, 0, 1e-12));
    EXPECT_TRUE(all_close(ga.dw, gb.dw, 0, 1e-12));
    const auto rn = ops::indexer_kl_sparse_from_probs(psum, idx, pr.q, pr.k, pr.w, fp8, 1.7, nullptr);
    EXPECT_NEAR(rn.loss_sum, ra.loss_sum, 1e-12);
  }
  // The old signature still works and gives the same output.
  Tensor lse2;
  const Tensor o1 = ops::sparse_attention_forward(pr.qm, kv, Dv, idx, pr.scale, &lse2);
  const Tensor o2 = ops::sparse_attention_forward(pr.qm, kv, Dv, idx, pr.scale, nullptr, &psum);
  EXPECT_TRUE(all_close(o1, o2, 0, 0));
  EXPECT_THROW(ops::indexer_kl_sparse_from_probs(psum.view({B * T, K}), idx, pr.q, pr.k, pr.w, false, 1.0, nullptr),
               std::runtime_error);
}

// Σ_j |w_j| D^-1/2 Σ_i |q_ji k_i|: the magnitude of the terms of one indexer score I[t, s].
double score_terms_abs(const Tensor& q, const Tensor& k, const Tensor& w, int64_t b, int64_t t, int64_t s) {
  const int64_t T = q.size(1), Hi = q.size(2), D = q.size(3);
  double acc = 0;
  for (int64_t j = 0; j < Hi; ++j) {
    double z = 0;
    for (int64_t i = 0; i < D; ++i) z += std::fabs(q.item(((b * T + t) * Hi + j) * D + i) * k.item((b * T + s) * D + i));
    acc += std::fabs(w.item((b * T + t) * Hi + j)) / std::sqrt(double(D)) * z;
  }
  return acc;
}

// The top-k's winner scores are the indexer scores of the selected slots (-inf on -1 slots), for any row
// block, and the sparse loss taking them as I equals the one scoring the slots itself.
TEST(IndexerLossSparse, SlotScoresFromTheTopkReplaceTheRescoring) {
  const int64_t B = 2, T = 13, H = 2, Dk = 6, K = 5, Dv = 4, Hi = 3, D = 8;
  Problem pr = make_problem(B, T, H, 1, Dk, Hi, D, 320);
  const Tensor kv = pr.km.view({B, T, Dk});
  // NOTES: row blocks change the GEMM shapes, and OpenBLAS picks its kernels (and summation orders) by
  // shape and by OPENBLAS_CORETYPE, so the same score may differ between block settings. Bound: two
  // evaluation orders of a sum of n terms differ by at most 2 γ_n Σ|terms| (γ_n = n u / (1 - n u), u =
  // 2^-53 in f64); a score sums D products per head and Hi heads, n = D + Hi.
  const double u = std::ldexp(1.0, -53), gamma = (D + Hi) * u / (1 - (D + Hi) * u);
  for (bool fp8 : {false, true}) {
    Tensor sc, sc3;
    const Tensor idx = ops::indexer_topk(pr.q, pr.k, pr.w, K, fp8, 0, &sc);
    const Tensor idx3 = ops::indexer_topk(pr.q, pr.k, pr.w, K, fp8, 3, &sc3);
    ASSERT_EQ(sc.shape(), (Shape{B, T, K}));
    Tensor qs = pr.q, ks = pr.k;
    if (fp8) ops::indexer_fp8_operands(pr.q, pr.k, &qs, &ks);
    const Tensor full = ops::indexer_scores_forward(qs, ks, pr.w, 0, T);  // [B, T, T]
    for (int64_t bt = 0; bt < B * T; ++bt) {
      const int64_t b = bt / T, t = bt % T;
      // The selection is the same when no two different scores of the row are within the rounding bound
      // of each other (checked: then equality holds by construction). Exact ties (rows whose heads all
      // have ReLU = 0 for several keys) are exact in every order and broken by the op's own rule.
      std::vector<double> row;
      for (int64_t s = 0; s <= t; ++s) row.push_back(full.item(bt * T + s));
      std::sort(row.begin(), row.end());
      for (size_t i = 1; i < row.size(); ++i)
        ASSERT_TRUE(row[i] == row[i - 1] || row[i] - row[i - 1] > 1e-9) << "near-tie in row " << bt;
      for (int64_t k = 0; k < K; ++k) {
        const int32_t s = idx.data<int32_t>()[bt * K + k];
        EXPECT_EQ(s, idx3.data<int32_t>()[bt * K + k]) << "row " << bt << " slot " << k;
        if (s < 0) {
          EXPECT_EQ(sc.item(bt * K + k), -std::numeric_limits<double>::infinity());
          EXPECT_EQ(sc3.item(bt * K + k), -std::numeric_limits<double>::infinity());
          continue;
        }
        const double tol = 2 * gamma * score_terms_abs(qs, ks, pr.w, b, t, s);
        EXPECT_NEAR(sc.item(bt * K + k), full.item(bt * T + s), tol) << "row " << bt << " slot " << k;
        EXPECT_NEAR(sc3.item(bt * K + k), full.item(bt * T + s), tol) << "row " << bt << " slot " << k;
      }
    }
    Tensor psum;
    ops::sparse_attention_forward(pr.qm, kv, Dv, idx, pr.scale, nullptr, &psum);
    ops::IndexerGrads ga, gb;
    const auto ra = ops::indexer_kl_sparse_from_probs(psum, idx, pr.q, pr.k, pr.w, fp8, 0.8, &ga);
    const auto rb = ops::indexer_kl_sparse_from_probs(psum, idx, pr.q, pr.k, pr.w, fp8, 0.8, &gb, &sc);
    EXPECT_EQ(ra.rows, rb.rows);
    EXPECT_GT(ra.loss_sum, 0.0);
    EXPECT_NEAR(ra.loss_sum, rb.loss_sum, 1e-12);
    EXPECT_TRUE(all_close(ga.dq, gb.dq, 0, 1e-12));
    EXPECT_TRUE(all_close(ga.dk, gb.dk, 0, 1e-12));
    EXPECT_TRUE(all_close(ga.dw, gb.dw, 0, 1e-12));
    const Tensor flat = sc.view({B * T, K});
    EXPECT_THROW(ops::indexer_kl_sparse_from_probs(psum, idx, pr.q, pr.k, pr.w, fp8, 0.8, nullptr, &flat),
                 std::runtime_error);
  }
}

// I[t, s] = w * D^-0.5 * relu(q[t] . e_s) = q[t, s] when k_s is the one-hot e_s and w = sqrt(D): setting
// q[t, s] = log p[t, s] + 40 makes softmax(I_t) = p_t exactly (up to rounding).
TEST(IndexerLoss, KlIsZeroWhenSoftmaxMatchesTheTargetAndPositiveOtherwise) {
  const int64_t B = 2, T = 9, H = 3, Dk = 5, D = T, K = 4;
  Problem pr = make_problem(B, T, H, H, Dk, 1, D, 400);
  Tensor k = Tensor::zeros({B, T, D}, DType::F64);
  for (int64_t r = 0; r < B * T; ++r) k.set_item(r * D + r % T, 1.0);
  const Tensor w = Tensor::full({B, T, 1}, DType::F64, std::sqrt(double(D)));
  // Dense: target from the main attention.
  const Tensor p = naive_target(pr.qm, pr.km, pr.lse, pr.scale);
  Tensor q = Tensor::zeros({B, T, 1, D}, DType::F64);
  for (int64_t r = 0; r < B * T; ++r)
    for (int64_t s = 0; s <= r % T; ++s) q.set_item(r * D + s, std::log(p.item(r * T + s)) + 40);
  ops::IndexerGrads g;
  const auto r = ops::indexer_kl_dense(pr.qm, pr.km, pr.lse, pr.scale, q, k, w, false, 1.0, &g, 4);
  EXPECT_NEAR(r.loss_sum, 0.0, 1e-12);
  EXPECT_LT(dsa::testing::dot(g.dq, g.dq) + dsa::testing::dot(g.dk, g.dk), 1e-24);
  Tensor q2 = q.clone();
  q2.set_item(5 * D + 2, q2.item(5 * D + 2) + 0.1);
  EXPECT_GT(ops::indexer_kl_dense(pr.qm, pr.km, pr.lse, pr.scale, q2, k, w, false, 1.0, nullptr).loss_sum, 1e-6);

  // Sparse: target over S_t from the sparse attention, renormalized over S_t.
  const Tensor kv = pr.km.view({B, T, H * Dk}).row(0).view({1, T, H * Dk});  // any latent rows
  Problem ps = make_problem(1, T, H, 1, H * Dk, 1, D, 401);
  const Tensor idx = ops::indexer_topk(ps.q, ps.k, ps.w, K, false);
  Tensor lse;
  ops::sparse_attention_forward(ps.qm, kv, 2, idx, ps.scale, &lse);
  Tensor qs = Tensor::zeros({1, T, 1, D}, DType::F64);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> a;
    double tot = 0;
    for (int64_t kk = 0; kk < K; ++kk) {
      const int32_t s = idx.data<int32_t>()[t * K + kk];
      double m = 0;
      if (s >= 0)
        for (int64_t h = 0; h < H; ++h) {
          double z = 0;
          for (int64_t i = 0; i < H * Dk; ++i) z += ps.qm.item((t * H + h) * H * Dk + i) * kv.item(s * H * Dk + i);
          m += std::exp(ps.scale * z - lse.item(h * T + t));
        }
      a.push_back(m), tot += m;
    }
    for (int64_t kk = 0; kk < K; ++kk) {
      const int32_t s = idx.data<int32_t>()[t * K + kk];
      if (s >= 0) qs.set_item(t * D + s, std::log(a[kk] / tot) + 40);
    }
  }
  const Tensor k1 = k.row(0).view({1, T, D}), w1 = w.row(0).view({1, T, 1});
  ops::IndexerGrads gs;
  EXPECT_NEAR(ops::indexer_kl_sparse(ps.qm, kv, lse, ps.scale, idx, qs, k1, w1, false, 1.0, &gs).loss_sum, 0.0, 1e-12);
  EXPECT_LT(dsa::testing::dot(gs.dq, gs.dq) + dsa::testing::dot(gs.dk, gs.dk), 1e-24);
  qs.set_item(7 * D + idx.data<int32_t>()[7 * K], qs.item(7 * D + idx.data<int32_t>()[7 * K]) - 0.1);
  EXPECT_GT(ops::indexer_kl_sparse(ps.qm, kv, lse, ps.scale, idx, qs, k1, w1, false, 1.0, nullptr).loss_sum, 1e-6);
}

TEST(IndexerLoss, Fp8ForwardIsStraightThroughInTheBackward) {
  const int64_t B = 1, T = 12, H = 2, Hi = 4, D = 128;
  const Problem pr = make_problem(B, T, H, H, 8, Hi, D, 500, 0.3);
  Tensor qh, kh;
  ops::indexer_fp8_operands(pr.q, pr.k, &qh, &kh);
  const Tensor p = naive_target(pr.qm, pr.km, pr.lse, pr.scale);
  ops::IndexerGrads g;
  const double gs = 0.5;
  const auto r = ops::indexer_kl_dense(pr.qm, pr.km, pr.lse, pr.scale, pr.q, pr.k, pr.w, true, gs, &g, 5);
  // The value is the KL of the FP8 scores...
  EXPECT_NEAR(r.loss_sum, naive_dense_loss(p, qh, kh, pr.w), 1e-9);
  // ... and the gradient is dI = gs * (softmax(I_fp8) - p) pushed through the unquantized q_I, k_I.
  Tensor dI = Tensor::zeros({B, T, T}, DType::F64);
  for (int64_t t = 0; t < T; ++t) {
    double m = -kInf, z = 0;
    std::vector<double> I;
    for (int64_t s = 0; s <= t; ++s) I.push_back(naive_score(qh, kh, pr.w, 0, t, s)), m = std::max(m, I.back());
    for (double x : I) z += std::exp(x - m);
    for (int64_t s = 0; s <= t; ++s) dI.set_item(t * T + s, gs * (std::exp(I[s] - m) / z - p.item(t * T + s)));
  }
  Tensor dq = Tensor::zeros(pr.q.shape(), DType::F64), dk = Tensor::zeros(pr.k.shape(), DType::F64),
         dw = Tensor::zeros(pr.w.shape(), DType::F64);
  ops::indexer_scores_backward(dI, pr.q, pr.k, pr.w, 0, &dq, &dk, &dw);
  EXPECT_TRUE(all_close(g.dq, dq, 1e-9, 1e-12));
  EXPECT_TRUE(all_close(g.dk, dk, 1e-9, 1e-12));
  EXPECT_TRUE(all_close(g.dw, dw, 1e-9, 1e-12));
  // FP8 changes the value a little, not a lot.
  const auto r0 = ops::indexer_kl_dense(pr.qm, pr.km, pr.lse, pr.scale, pr.q, pr.k, pr.w, false, gs, nullptr);
  EXPECT_NEAR(r.loss_sum, r0.loss_sum, 0.05 * r0.loss_sum);
  // Sparse loss: same straight-through rule.
  const Tensor kv = pr.km.view({B, T, H * 8});
  const Tensor idx = ops::indexer_topk(pr.q, pr.k, pr.w, 6, true);
  Tensor lse;
  const Tensor qm2 = randn({B, T, H, H * 8}, 501);
  ops::sparse_attention_forward(qm2, kv, 3, idx, pr.scale, &lse);
  ops::IndexerGrads gq, g0;
  const double l8 = ops::indexer_kl_sparse(qm2, kv, lse, pr.scale, idx, pr.q, pr.k, pr.w, true, 1.0, &gq).loss_sum;
  EXPECT_NEAR(l8, naive_sparse_loss(qm2, kv, lse, pr.scale, idx, qh, kh, pr.w), 1e-9);
  const double l0 = ops::indexer_kl_sparse(qm2, kv, lse, pr.scale, idx, pr.q, pr.k, pr.w, false, 1.0, &g0).loss_sum;
  EXPECT_NEAR(l8, l0, 0.05 * l0 + 1e-3);
  EXPECT_FALSE(all_close(gq.dq, g0.dq, 0, 1e-15));  // different dI ...
  EXPECT_TRUE(all_close(gq.dq, g0.dq, 0.2, 1e-3));   // ... of about the same size
}

TEST(IndexerRecall, ConstructedCases) {
  const int64_t B = 2, T = 8, H = 2, Dk = 3;
  // q_main = 0: every head attends uniformly, p[t, s] = 1 / (t + 1).
  const Tensor qm = Tensor::zeros({B, T, H, Dk}, DType::F64), km = randn({B, T, 1, Dk}, 600);
  const Tensor lse = naive_lse(qm, km, 0.5);
  auto indices = [&](int64_t K, const std::function<int32_t(int64_t t, int64_t k)>& f) {
    Tensor idx = Tensor::empty({B, T, K}, DType::I32);
    for (int64_t r = 0; r < B * T; ++r)
      for (int64_t k = 0; k < K; ++k) idx.data<int32_t>()[r * K + k] = f(r % T, k);
    return idx;
  };
  // k covers everything: recall 1.
  const auto all = ops::indexer_recall(qm, km, lse, 0.5, indices(T + 2, [](int64_t t, int64_t k) {
    return k <= t ? static_cast<int32_t>(t - k) : -1;
  }));
  EXPECT_EQ(all.rows, B * T);
  EXPECT_NEAR(all.mean(), 1.0, 1e-12);
  // Only token 0: 1 / (t + 1). Duplicates and -1 do not change it.
  double want = 0;
  for (int64_t t = 0; t < T; ++t) want += 1.0 / double(t + 1);
  want /= double(T);
  for (int64_t rb : {0, 1, 3}) {
    EXPECT_NEAR(ops::indexer_recall(qm, km, lse, 0.5, indices(1, [](int64_t, int64_t) { return 0; }), rb).mean(),
                want, 1e-12);
    EXPECT_NEAR(ops::indexer_recall(qm, km, lse, 0.5, indices(3, [](int64_t, int64_t k) { return k == 1 ? -1 : 0; }), rb)
                    .mean(),
                want, 1e-12);
  }
  // Tokens {0, t}: 2 / (t + 1) for t >= 1, 1 for t = 0.
  want = 1;
  for (int64_t t = 1; t < T; ++t) want += 2.0 / double(t + 1);
  want /= double(T);
  EXPECT_NEAR(ops::indexer_recall(qm, km, lse, 0.5, indices(2, [](int64_t t, int64_t k) {
                                    return static_cast<int32_t>(k == 0 ? 0 : t);
                                  })).mean(),
              want, 1e-12);
  // Non-uniform attention: the recall of a set is the target mass on it.
  const Problem pr = make_problem(1, 10, 3, 3, 4, 2, 4, 601);
  const Tensor p = naive_target(pr.qm, pr.km, pr.lse, pr.scale);
  const Tensor idx = ops::indexer_topk(pr.q, pr.k, pr.w, 3, false);
  double mass = 0;
  for (int64_t t = 0; t < 10; ++t)
    for (int64_t k = 0; k < 3; ++k) {
      const int32_t s = idx.data<int32_t>()[t * 3 + k];
      if (s >= 0) mass += p.item(t * 10 + s);
    }
  const auto rc = ops::indexer_recall(pr.qm, pr.km, pr.lse, pr.scale, idx, 4);
  EXPECT_NEAR(rc.recall_sum, mass, 1e-12);
  EXPECT_LT(rc.mean(), 1.0);
}
