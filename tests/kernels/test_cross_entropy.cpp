// LM head + cross-entropy: against a naive materialized [N, V] reference on small V (ignored targets),
// gradients by finite differences, the multi-chunk path, and the real vocabulary size in f32 against f64.
#include <gtest/gtest.h>

#include <cmath>

#include "kernels/ops.h"
#include "tests/test_util.h"

using namespace dsa;
using namespace dsa::testing;

namespace {

struct Naive {
  double loss = 0;
  int64_t count = 0;
  Tensor dx, dw;  // gradients of grad_scale * loss (f64)
};

// Materializes logits row by row in double: loss and exact gradients.
Naive naive(const Tensor& x, const Tensor& w, const Tensor& tgt, double grad_scale) {
  const int64_t n = x.size(0), d = x.size(1), v = w.size(0);
  Naive r;
  r.dx = Tensor::zeros({n, d}, DType::F64);
  r.dw = Tensor::zeros({v, d}, DType::F64);
  const Tensor x64 = x.to(DType::F64), w64 = w.to(DType::F64);
  const double* xp = x64.data<double>();
  const double* wp = w64.data<double>();
  double* dxp = r.dx.data<double>();
  double* dwp = r.dw.data<double>();
  std::vector<double> l(v);
  for (int64_t i = 0; i < n; ++i) {
    const int t = static_cast<int>(tgt.item(i));
    if (t < 0) continue;
    double mx = -1e300;
    for (int64_t j = 0; j < v; ++j) {
      double s = 0;
      for (int64_t k = 0; k < d; ++k) s += xp[i * d + k] * wp[j * d + k];
      l[j] = s;
      mx = std::max(mx, s);
    }
    double z = 0;
    for (int64_t j = 0; j < v; ++j) z += std::exp(l[j] - mx);
    const double lse = mx + std::log(z);
    r.loss += lse - l[t];
    ++r.count;
    for (int64_t j = 0; j < v; ++j) {
      const double g = grad_scale * (std::exp(l[j] - lse) - (j == t ? 1.0 : 0.0));
      for (int64_t k = 0; k < d; ++k) {
        dxp[i * d + k] += g * wp[j * d + k];
        dwp[j * d + k] += g * xp[i * d + k];
      }
    }
  }
  return r;
}

}  // namespace

TEST(CrossEntropy, SmallVocabMatchesNaiveWithIgnoredTargets) {
  const int64_t n = 7, d = 13, v = 37;
  const Tensor x = randn({n, d}, 1), w = randn({v, d}, 2, 0.5);
  const Tensor tgt = Tensor::from_vector(std::vector<int32_t>{3, -1, 36, 0, -1, 17, 3}, {n});
  const Naive ref = naive(x, w, tgt, 0.2);
  Tensor dx = Tensor::empty({n, d}, DType::F64);
  poison(dx);  // written, ignored rows included
  Tensor dw = randn({v, d}, 3);
  const Tensor dw0 = dw.clone();
  const ops::CrossEntropyResult res = ops::lm_head_cross_entropy(x, w, tgt, 0.2, &dx, &dw);
  EXPECT_EQ(res.count, 5);
  EXPECT_NEAR(res.loss_sum, ref.loss, 1e-12);
  EXPECT_TRUE(all_close(dx, ref.dx, 1e-12, 1e-14));
  ops::add_scaled_(dw, dw0, -1.0);
  EXPECT_TRUE(all_close(dw, ref.dw, 1e-12, 1e-14));
  for (int64_t k = 0; k < d; ++k) EXPECT_EQ(dx.item(1 * d + k), 0.0);  // ignored token
  // loss only: no gradient work, same loss
  const ops::CrossEntropyResult r2 = ops::lm_head_cross_entropy(x, w, tgt, 0.2, nullptr, nullptr);
  EXPECT_EQ(r2.loss_sum, res.loss_sum);
  EXPECT_EQ(r2.count, 5);
}

TEST(CrossEntropy, GradientsMatchFiniteDifferences) {
  const int64_t n = 7, d = 13, v = 29;
  Tensor x = randn({n, d}, 4), w = randn({v, d}, 5, 0.7);
  const Tensor tgt = Tensor::from_vector(std::vector<int32_t>{1, 28, -1, 5, 5, 0, 11}, {n});
  const double gs = 1.0 / 6;
  Tensor dx, dw;
  ops::lm_head_cross_entropy(x, w, tgt, gs, &dx, &dw);
  auto loss = [&] { return gs * ops::lm_head_cross_entropy(x, w, tgt, gs, nullptr, nullptr).loss_sum; };
  EXPECT_TRUE(grad_check("ce dx", x, dx, loss, 1e-6, 1e-6, 1e-9));
  EXPECT_TRUE(grad_check("ce dw", w, dw, loss, 1e-6, 1e-6, 1e-9));
}

TEST(CrossEntropy, LargeLogitsStayFinite) {
  const Tensor x = Tensor::full({2, 1}, DType::F32, 1.0);
  const Tensor w = Tensor::from_vector(std::vector<float>{1000.f, 999.f, -1000.f}, {3, 1});
  const Tensor tgt = Tensor::from_vector(std::vector<int32_t>{1, 2}, {2});
  const auto r = ops::lm_head_cross_entropy(x, w, tgt, 1.0, nullptr, nullptr);
  const double l1 = std::log1p(std::exp(-1.0)) + 1.0;  // lse - 999
  EXPECT_NEAR(r.loss_sum, l1 + (l1 + 1999.0), 1e-3);
}

TEST(CrossEntropy, SeveralChunksMatchNaive) {
  // f64 with V = 129280: 64 MiB holds 64 rows, so N = 150 runs 3 chunks (64, 64, 22).
  const int64_t n = 150, d = 8, v = 129280;
  const Tensor x = randn({n, d}, 6), w = randn({v, d}, 7, 0.3);
  Tensor tgt = randint({n}, 8, 0, v);
  tgt.data<int32_t>()[70] = -1;
  tgt.data<int32_t>()[149] = -1;
  const Naive ref = naive(x, w, tgt, 0.01);
  Tensor dx, dw;
  const auto res = ops::lm_head_cross_entropy(x, w, tgt, 0.01, &dx, &dw);
  EXPECT_EQ(res.count, n - 2);
  EXPECT_NEAR(res.loss_sum, ref.loss, 1e-9);
  EXPECT_TRUE(all_close(dx, ref.dx, 1e-10, 1e-13));
  EXPECT_TRUE(all_close(dw, ref.dw, 1e-9, 1e-13));
}

TEST(CrossEntropy, RealVocabF32MatchesF64) {  // its time: dsa-bench ops --only gemm (CPU shapes)
  const int64_t n = 64, d = 64, v = 129280;
  const Tensor x = randn({n, d}, 9, 1.0, DType::F32), w = randn({v, d}, 10, 0.1, DType::F32);
  Tensor tgt = randint({n}, 11, 0, v);
  tgt.data<int32_t>()[5] = -1;
  Tensor dx, dw = Tensor::zeros({v, d}, DType::F32);
  const auto res = ops::lm_head_cross_entropy(x, w, tgt, 1.0 / 63, &dx, &dw);
  EXPECT_EQ(res.count, 63);
  Tensor dx64, dw64;
  const auto r64 = ops::lm_head_cross_entropy(x.to(DType::F64), w.to(DType::F64), tgt, 1.0 / 63, &dx64, &dw64);
  EXPECT_NEAR(res.loss_sum, r64.loss_sum, 1e-5 * r64.loss_sum);
  EXPECT_NEAR(res.loss_sum / 63, std::log(double(v)), 0.5);  // near-uniform logits at this scale
  EXPECT_TRUE(all_close(dx, dx64, 1e-3, 1e-6));
  EXPECT_TRUE(all_close(dw, dw64, 1e-3, 1e-7));
}

TEST(CrossEntropy, Errors) {
  const Tensor x = randn({3, 4}, 12), w = randn({10, 4}, 13);
  try {
    ops::lm_head_cross_entropy(x, w, Tensor::from_vector(std::vector<int32_t>{1, 10, 2}, {3}), 1.0, nullptr,
                               nullptr);
    FAIL() << "no error";
  } catch (const std::runtime_error& e) {
    EXPECT_EQ(std::string(e.what()),
              "[lm_head_cross_entropy] target 10 at token 1 is out of range for vocab size 10 (-1 = ignored)");
  }
  EXPECT_THROW(ops::lm_head_cross_entropy(x, randn({10, 5}, 1), Tensor::zeros({3}, DType::I32), 1.0, nullptr,
                                          nullptr),
               std::runtime_error);
  Tensor bad_dx = Tensor::zeros({3, 5}, DType::F64);
  EXPECT_THROW(ops::lm_head_cross_entropy(x, w, Tensor::zeros({3}, DType::I32), 1.0, &bad_dx, nullptr),
               std::runtime_error);
}
