// attention_forward / attention_backward against a naive materialized-softmax reference, f64 finite
// differences for dq, dk, dv, f32 vs f64, T = 1, fresh/fully-written/deterministic outputs, shape errors,
// and bench-small's head dims across a block boundary (f32 within a derived bound).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/ops.h"
#include "tests/test_util.h"

using namespace dsa;
using dsa::testing::all_close;
using dsa::testing::dot;
using dsa::testing::grad_check;
using dsa::testing::randn;

namespace {

// Naive reference in f64: full [T, T] scores per (b, h), -inf above the diagonal, softmax, @ V.
Tensor naive_attention(const Tensor& q, const Tensor& k, const Tensor& v, double scale, Tensor* lse_out) {
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), Dk = q.size(3), Hk = k.size(2), Dv = v.size(3);
  Tensor out = Tensor::zeros({B, T, H, Dv}, DType::F64);
  Tensor lse = Tensor::zeros({B, H, T}, DType::F64);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t g = h / (H / Hk);
      std::vector<double> S(T * T, -INFINITY);
      for (int64_t t = 0; t < T; ++t)
        for (int64_t s = 0; s <= t; ++s) {
          double acc = 0;
          for (int64_t i = 0; i < Dk; ++i)
            acc += q.item(((b * T + t) * H + h) * Dk + i) * k.item(((b * T + s) * Hk + g) * Dk + i);
          S[t * T + s] = scale * acc;
        }
      for (int64_t t = 0; t < T; ++t) {
        double m = -INFINITY, z = 0;
        for (int64_t s = 0; s < T; ++s) m = std::max(m, S[t * T + s]);
        for (int64_t s = 0; s < T; ++s) z += std::exp(S[t * T + s] - m);
        lse.set_item((b * H + h) * T + t, m + std::log(z));
        for (int64_t s = 0; s <= t; ++s) {
          const double p = std::exp(S[t * T + s] - m) / z;
          for (int64_t i = 0; i < Dv; ++i) {
            const int64_t o = ((b * T + t) * H + h) * Dv + i;
            out.set_item(o, out.item(o) + p * v.item(((b * T + s) * Hk + g) * Dv + i));
          }
        }
      }
    }
  if (lse_out) *lse_out = lse;
  return out;
}

struct Case {
  int64_t B, T, H, Hk, Dk, Dv;
};

void check_forward(const Case& c, uint64_t seed) {
  const double scale = 1.0 / std::sqrt(double(c.Dk));
  Tensor q = randn({c.B, c.T, c.H, c.Dk}, seed);
  Tensor k = randn({c.B, c.T, c.Hk, c.Dk}, seed + 1);
  Tensor v = randn({c.B, c.T, c.Hk, c.Dv}, seed + 2);
  Tensor lse, lse_ref;
  Tensor out = ops::attention_forward(q, k, v, scale, &lse);
  Tensor ref = naive_attention(q, k, v, scale, &lse_ref);
  EXPECT_TRUE(all_close(out, ref, 1e-12, 1e-12)) << "H=" << c.H << " Hk=" << c.Hk << " T=" << c.T;
  EXPECT_TRUE(all_close(lse, lse_ref, 1e-12, 1e-12)) << "H=" << c.H << " Hk=" << c.Hk << " T=" << c.T;
}

}  // namespace

TEST(Attention, ForwardMatchesNaiveMhaGqaMqa) {
  for (int64_t Hk : {4, 2, 1}) check_forward({2, 13, 4, Hk, 11, 7}, 10 + Hk);
}

TEST(Attention, ForwardMultipleBlocks) {
  // T spans two 64-row blocks plus a ragged tail; MLA-absorbed-like shape (Dk > Dv, Hk = 1).
  check_forward({1, 150, 3, 1, 20, 16}, 77);
  check_forward({2, 129, 4, 2, 9, 5}, 78);
}

TEST(Attention, SingleToken) {
  // T = 1: output is v itself (per kv head), lse is the single scaled score.
  Tensor q = randn({3, 1, 4, 5}, 1), k = randn({3, 1, 2, 5}, 2), v = randn({3, 1, 2, 6}, 3);
  Tensor lse;
  Tensor out = ops::attention_forward(q, k, v, 0.3, &lse);
  for (int64_t b = 0; b < 3; ++b)
    for (int64_t h = 0; h < 4; ++h) {
      for (int64_t i = 0; i < 6; ++i) EXPECT_NEAR(out.item((b * 4 + h) * 6 + i), v.item((b * 2 + h / 2) * 6 + i), 1e-15);
      double s = 0;
      for (int64_t i = 0; i < 5; ++i) s += q.item((b * 4 + h) * 5 + i) * k.item((b * 2 + h / 2) * 5 + i);
      EXPECT_NEAR(lse.item(b * 4 + h), 0.3 * s, 1e-14);
    }
  Tensor dout = randn({3, 1, 4, 6}, 4);
  ops::AttentionGrads g = ops::attention_backward(dout, q, k, v, out, lse, 0.3);
  // One key: P = 1 regardless of scores, so dq = dk = 0 and dv sums dout over the group's heads.
  EXPECT_TRUE(all_close(g.dq, Tensor::zeros(q.shape(), DType::F64), 0, 1e-14));
  EXPECT_TRUE(all_close(g.dk, Tensor::zeros(k.shape(), DType::F64), 0, 1e-14));
  for (int64_t b = 0; b < 3; ++b)
    for (int64_t gi = 0; gi < 2; ++gi)
      for (int64_t i = 0; i < 6; ++i)
        EXPECT_NEAR(g.dv.item((b * 2 + gi) * 6 + i),
                    dout.item((b * 4 + 2 * gi) * 6 + i) + dout.item((b * 4 + 2 * gi + 1) * 6 + i), 1e-14);
}

TEST(Attention, GradientsFiniteDifferenceF64) {
  for (int64_t Hk : {4, 2, 1}) {
    const Case c{2, 13, 4, Hk, 11, 7};
    const double scale = 0.37;
    Tensor q = randn({c.B, c.T, c.H, c.Dk}, 100 + Hk);
    Tensor k = randn({c.B, c.T, c.Hk, c.Dk}, 200 + Hk);
    Tensor v = randn({c.B, c.T, c.Hk, c.Dv}, 300 + Hk);
    Tensor dout = randn({c.B, c.T, c.H, c.Dv}, 400 + Hk);
    Tensor lse;
    Tensor out = ops::attention_forward(q, k, v, scale, &lse);
    ops::AttentionGrads g = ops::attention_backward(dout, q, k, v, out, lse, scale);
    auto loss = [&] { return dot(ops::attention_forward(q, k, v, scale, nullptr), dout); };
    EXPECT_TRUE(grad_check("dq", q, g.dq, loss, 1e-4, 1e-6, 1e-8)) << "Hk=" << Hk;
    EXPECT_TRUE(grad_check("dk", k, g.dk, loss, 1e-4, 1e-6, 1e-8)) << "Hk=" << Hk;
    EXPECT_TRUE(grad_check("dv", v, g.dv, loss, 1e-4, 1e-6, 1e-8)) << "Hk=" << Hk;
  }
}

TEST(Attention, GradientsAcrossBlocksF64) {
  // Ragged multi-block T: exercises phase-2 key blocks that see several query blocks.
  const double scale = 0.2;
  Tensor q = randn({1, 133, 2, 6}, 5), k = randn({1, 133, 1, 6}, 6), v = randn({1, 133, 1, 4}, 7);
  Tensor dout = randn({1, 133, 2, 4}, 8);
  Tensor lse;
  Tensor out = ops::attention_forward(q, k, v, scale, &lse);
  ops::AttentionGrads g = ops::attention_backward(dout, q, k, v, out, lse, scale);
  auto loss = [&] { return dot(ops::attention_forward(q, k, v, scale, nullptr), dout); };
  EXPECT_TRUE(grad_check("dq", q, g.dq, loss, 1e-4, 1e-6, 1e-8, 150));
  EXPECT_TRUE(grad_check("dk", k, g.dk, loss, 1e-4, 1e-6, 1e-8, 150));
  EXPECT_TRUE(grad_check("dv", v, g.dv, loss, 1e-4, 1e-6, 1e-8, 150));
}

TEST(Attention, F32MatchesF64) {
  const Case c{2, 70, 4, 2, 24, 16};
  const double scale = 1.0 / std::sqrt(24.0);
  Tensor q = randn({c.B, c.T, c.H, c.Dk}, 1), k = randn({c.B, c.T, c.Hk, c.Dk}, 2);
  Tensor v = randn({c.B, c.T, c.Hk, c.Dv}, 3), dout = randn({c.B, c.T, c.H, c.Dv}, 4);
  Tensor lse64, lse32;
  Tensor o64 = ops::attention_forward(q, k, v, scale, &lse64);
  Tensor o32 = ops::attention_forward(q.to(DType::F32), k.to(DType::F32), v.to(DType::F32), scale, &lse32);
  EXPECT_EQ(o32.dtype(), DType::F32);
  EXPECT_EQ(lse32.dtype(), DType::F32);
  EXPECT_TRUE(all_close(o32, o64, 1e-4, 1e-5));
  EXPECT_TRUE(all_close(lse32, lse64, 1e-5, 1e-5));
  auto g64 = ops::attention_backward(dout, q, k, v, o64, lse64, scale);
  auto g32 = ops::attention_backward(dout.to(DType::F32), q.to(DType::F32), k.to(DType::F32), v.to(DType::F32),
                                     o32, lse32, scale);
  EXPECT_TRUE(all_close(g32.dq, g64.dq, 1e-3, 1e-4));
  EXPECT_TRUE(all_close(g32.dk, g64.dk, 1e-3, 1e-4));
  EXPECT_TRUE(all_close(g32.dv, g64.dv, 1e-3, 1e-4));
}

TEST(Attention, OutputsAreFreshAndFullyWritten) {
  // Results are new tensors and every element is written: two calls agree bitwise (atol 1e-300)
  // separated by poisoning the first result, and check no NaN survives.
  Tensor q = randn({2, 67, 2, 5}, 9), k = randn({2, 67, 1, 5}, 10), v = randn({2, 67, 1, 3}, 11);
  Tensor dout = randn({2, 67, 2, 3}, 12);
  Tensor lse1, lse2;
  Tensor o1 = ops::attention_forward(q, k, v, 0.5, &lse1);
  Tensor keep = o1.clone(), keep_lse = lse1.clone();
  dsa::testing::poison(o1);
  dsa::testing::poison(lse1);
  Tensor o2 = ops::attention_forward(q, k, v, 0.5, &lse2);
  EXPECT_FALSE(o2.same_storage(o1));
  EXPECT_TRUE(all_close(o2, keep, 0, 1e-300));
  EXPECT_TRUE(all_close(lse2, keep_lse, 0, 1e-300));
  auto g1 = ops::attention_backward(dout, q, k, v, o2, lse2, 0.5);
  auto d1 = g1.dq.clone(), k1 = g1.dk.clone(), v1 = g1.dv.clone();
  dsa::testing::poison(g1.dq);
  dsa::testing::poison(g1.dk);
  dsa::testing::poison(g1.dv);
  auto g2 = ops::attention_backward(dout, q, k, v, o2, lse2, 0.5);
  EXPECT_TRUE(all_close(g2.dq, d1, 0, 1e-300));  // also deterministic: bitwise equal across calls
  EXPECT_TRUE(all_close(g2.dk, k1, 0, 1e-300));
  EXPECT_TRUE(all_close(g2.dv, v1, 0, 1e-300));
}

TEST(Attention, ShapeErrors) {
  Tensor q = randn({1, 4, 4, 8}, 1), k = randn({1, 4, 3, 8}, 2), v = randn({1, 4, 3, 8}, 3);
  try {
    ops::attention_forward(q, k, v, 1.0, nullptr);
    FAIL() << "expected an error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("[attention_forward] kv heads (3) must divide"), std::string::npos)
        << e.what();
  }
  Tensor k2 = randn({1, 4, 2, 7}, 2);
  EXPECT_THROW(ops::attention_forward(q, k2, randn({1, 4, 2, 8}, 3), 1.0, nullptr), std::runtime_error);
  Tensor k3 = randn({1, 4, 2, 8}, 2), v3 = randn({1, 4, 2, 8}, 3, 1.0, DType::F32);
  EXPECT_THROW(ops::attention_forward(q, k3, v3, 1.0, nullptr), std::runtime_error);
  Tensor lse;
  Tensor o = ops::attention_forward(q, k3, randn({1, 4, 2, 6}, 3), 1.0, &lse);
  EXPECT_THROW(ops::attention_backward(randn({1, 4, 4, 5}, 4), q, k3, randn({1, 4, 2, 6}, 3), o, lse, 1.0),
               std::runtime_error);
}

namespace {

// Over the scores s = scale * q.k of the f32 forward: the largest |s| and the largest |s - fl(s)|. Each is
// an f32 dot product of Dk terms times the f32-rounded scale, so |error| <= gamma_{Dk+2} scale sum_i |q_i k_i|
// (Higham: any summation order, with or without FMA; gamma_n = n u / (1 - n u), u = 2^-24).
struct ScoreBounds {
  double max_abs = 0, max_err = 0;
};
ScoreBounds f32_score_bounds(const Tensor& q, const Tensor& k, double scale) {
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), Dk = q.size(3), Hk = k.size(2);
  const double u = std::ldexp(1.0, -24), gamma = (Dk + 2) * u / (1 - (Dk + 2) * u);
  const float *qp = q.data<float>(), *kp = k.data<float>();
  ScoreBounds r;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t s = 0; s <= t; ++s) {
          const float* x = qp + ((b * T + t) * H + h) * Dk;
          const float* y = kp + ((b * T + s) * Hk + h / (H / Hk)) * Dk;
          double dot = 0, mag = 0;
          for (int64_t i = 0; i < Dk; ++i) {
            dot += double(x[i]) * double(y[i]);
            mag += std::fabs(double(x[i]) * double(y[i]));
          }
          r.max_abs = std::max(r.max_abs, scale * std::fabs(dot));
          r.max_err = std::max(r.max_err, gamma * scale * mag);
        }
  return r;
}

double max_abs(const Tensor& t) {
  double m = 0;
  for (int64_t i = 0; i < t.numel(); ++i) m = std::max(m, std::fabs(t.item(i)));
  return m;
}

}  // namespace

TEST(Attention, HeadDims96x64And288x256AcrossBlocks) {
  // bench-small's two forms (their timing: dsa-bench ops --only attention) at T = 70, one full 64-row block
  // and a ragged one: MHA (16 heads, Dk = nope 64 + rope 32, Dv = 64) and the absorbed MQA form (16 heads
  // on one latent kv head, Dk = kv_lora 256 + rope 32, Dv = 256).
  const double u = std::ldexp(1.0, -24);
  const auto gamma = [u](double n) { return n * u / (1 - n * u); };
  for (const Case& c : {Case{1, 70, 16, 16, 96, 64}, Case{1, 70, 16, 1, 288, 256}}) {
    SCOPED_TRACE(::testing::Message() << "Hk=" << c.Hk << " Dk=" << c.Dk << " Dv=" << c.Dv);
    // f32 against the naive reference on the same values, within the bound derived from the score error e:
    // the weights exp(s - m) carry a relative error <= d = e + u X + 2u (X bounds |s - m|: the f32
    // subtraction and exp), the probabilities <= 2d + 2u, and out = P V adds gamma_T, so
    // |out - ref| <= max|v| (2d + 3u + gamma_T); lse = m + log(sum) errs by <= e + u X + 3u + u |lse|.
    const double scale = 1.0 / std::sqrt(double(c.Dk));
    const Tensor q = randn({c.B, c.T, c.H, c.Dk}, 1, 1.0, DType::F32);
    const Tensor k = randn({c.B, c.T, c.Hk, c.Dk}, 2, 1.0, DType::F32);
    const Tensor v = randn({c.B, c.T, c.Hk, c.Dv}, 3, 1.0, DType::F32);
    const Tensor q64 = q.to(DType::F64), k64 = k.to(DType::F64), v64 = v.to(DType::F64);
    Tensor lse, lse_ref;
    const Tensor out = ops::attention_forward(q, k, v, scale, &lse);
    const Tensor ref = naive_attention(q64, k64, v64, scale, &lse_ref);
    Tensor lse64;
    const Tensor o64 = ops::attention_forward(q64, k64, v64, scale, &lse64);
    EXPECT_TRUE(all_close(o64, ref, 1e-12, 1e-12));  // f64: the algorithm itself
    EXPECT_TRUE(all_close(lse64, lse_ref, 1e-12, 1e-12));
    const ScoreBounds sb = f32_score_bounds(q, k, scale);
    const double e = sb.max_err, X = 2 * (sb.max_abs + e), d = e + u * X + 2 * u;
    EXPECT_TRUE(all_close(out, ref, 0, 1.01 * max_abs(v) * (2 * d + 3 * u + gamma(double(c.T)))));
    EXPECT_TRUE(all_close(lse, lse_ref, 0, 1.01 * (e + u * X + 3 * u + u * max_abs(lse_ref))));
    // The backward in f64 against central differences of the forward (checked above), 20 elements of each
    // input. The quotient errs by the loss's rounding over h (a sum of products of outputs accurate to about
    // (Dk + T) f64 ulps) plus h^2 |f'''| / 6, which stays below 1e-6 at h = 1e-4.
    Tensor qg = q64.clone(), kg = k64.clone(), vg = v64.clone();
    const Tensor dout = randn({c.B, c.T, c.H, c.Dv}, 4);
    const ops::AttentionGrads g = ops::attention_backward(dout, q64, k64, v64, o64, lse64, scale);
    double l1 = 0;
    for (int64_t i = 0; i < o64.numel(); ++i) l1 += std::fabs(o64.item(i) * dout.item(i));
    const double h = 1e-4, atol = (c.Dk + c.T) * std::ldexp(1.0, -53) * l1 / h + 1e-6;
    auto loss = [&] { return dot(ops::attention_forward(qg, kg, vg, scale, nullptr), dout); };
    EXPECT_TRUE(grad_check("dq", qg, g.dq, loss, h, 1e-5, atol, 20));
    EXPECT_TRUE(grad_check("dk", kg, g.dk, loss, h, 1e-5, atol, 20));
    EXPECT_TRUE(grad_check("dv", vg, g.dv, loss, h, 1e-5, atol, 20));
  }
}
