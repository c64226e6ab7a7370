// RMSNorm and LayerNorm: forward against naive formulas, every gradient by finite differences in f64,
// f32 against f64.
#include <gtest/gtest.h>

#include <cmath>

#include "kernels/ops.h"
#include "tests/test_util.h"

using namespace dsa;
using namespace dsa::testing;

namespace {
constexpr int64_t N = 7, D = 13;
}

TEST(RmsNorm, ForwardMatchesNaive) {
  const Tensor x = randn({N, D}, 1, 2.0), w = randn({D}, 2);
  Tensor rstd = Tensor::empty({N}, DType::F64);
  poison(rstd);  // written in place when given defined
  const Tensor y = ops::rmsnorm_forward(x, w, 1e-6, &rstd);
  Tensor want = Tensor::empty({N, D}, DType::F64);
  for (int64_t i = 0; i < N; ++i) {
    double ss = 0;
    for (int64_t j = 0; j < D; ++j) ss += x.item(i * D + j) * x.item(i * D + j);
    const double r = 1.0 / std::sqrt(ss / D + 1e-6);
    EXPECT_NEAR(rstd.item(i), r, 1e-14 * r);
    for (int64_t j = 0; j < D; ++j) want.set_item(i * D + j, w.item(j) * x.item(i * D + j) * r);
  }
  EXPECT_TRUE(all_close(y, want, 1e-14, 1e-14));
  EXPECT_NO_THROW(ops::rmsnorm_forward(x, w, 1e-6, nullptr));
}

TEST(RmsNorm, GradientsMatchFiniteDifferences) {
  Tensor x = randn({N, D}, 3), w = randn({D}, 4);
  const Tensor g = randn({N, D}, 5);
  const double eps = 1e-5;
  Tensor rstd;
  ops::rmsnorm_forward(x, w, eps, &rstd);
  const Tensor dw0 = randn({D}, 6);
  Tensor dw = dw0.clone();
  const Tensor dx = ops::rmsnorm_backward(g, x, w, rstd, &dw);
  ops::add_scaled_(dw, dw0, -1.0);
  auto loss = [&] { return dot(ops::rmsnorm_forward(x, w, eps, nullptr), g); };
  EXPECT_TRUE(grad_check("rmsnorm dx", x, dx, loss, 1e-6, 1e-6, 1e-8));
  EXPECT_TRUE(grad_check("rmsnorm dw", w, dw, loss, 1e-6, 1e-6, 1e-8));
}

TEST(RmsNorm, F32MatchesF64) {
  const Tensor x = randn({N, D}, 7), w = randn({D}, 8), g = randn({N, D}, 9);
  Tensor r64, r32, dw64, dw32;
  const Tensor y64 = ops::rmsnorm_forward(x, w, 1e-6, &r64);
  const Tensor y32 = ops::rmsnorm_forward(x.to(DType::F32), w.to(DType::F32), 1e-6, &r32);
  EXPECT_TRUE(all_close(y32, y64, 1e-5, 1e-6));
  const Tensor dx64 = ops::rmsnorm_backward(g, x, w, r64, &dw64);
  const Tensor dx32 = ops::rmsnorm_backward(g.to(DType::F32), x.to(DType::F32), w.to(DType::F32), r32, &dw32);
  EXPECT_TRUE(all_close(dx32, dx64, 1e-4, 1e-5));
  EXPECT_TRUE(all_close(dw32, dw64, 1e-4, 1e-5));
}

TEST(RmsNorm, ShapeErrors) {
  try {
    ops::rmsnorm_forward(randn({3, 32}, 1, 1.0, DType::F32), randn({64}, 2, 1.0, DType::F32), 1e-6, nullptr);
    FAIL() << "no error";
  } catch (const std::runtime_error& e) {
    EXPECT_EQ(std::string(e.what()), "[rmsnorm] w must have shape [32], got f32[64] cpu");
  }
  EXPECT_THROW(ops::rmsnorm_forward(randn({3, 4, 5}, 1), randn({5}, 2), 1e-6, nullptr), std::runtime_error);
}

TEST(LayerNorm, ForwardMatchesNaive) {
  const Tensor x = randn({N, D}, 10, 3.0), w = randn({D}, 11), b = randn({D}, 12);
  Tensor mean = Tensor::empty({N}, DType::F64), rstd = Tensor::empty({N}, DType::F64);
  poison(mean);
  poison(rstd);
  const Tensor y = ops::layernorm_forward(x, w, b, 1e-6, &mean, &rstd);
  Tensor want = Tensor::empty({N, D}, DType::F64);
  for (int64_t i = 0; i < N; ++i) {
    double mu = 0, var = 0;
    for (int64_t j = 0; j < D; ++j) mu += x.item(i * D + j) / D;
    for (int64_t j = 0; j < D; ++j) var += (x.item(i * D + j) - mu) * (x.item(i * D + j) - mu) / D;
    const double r = 1.0 / std::sqrt(var + 1e-6);
    EXPECT_NEAR(mean.item(i), mu, 1e-14);
    EXPECT_NEAR(rstd.item(i), r, 1e-13 * r);
    for (int64_t j = 0; j < D; ++j) want.set_item(i * D + j, (x.item(i * D + j) - mu) * r * w.item(j) + b.item(j));
  }
  EXPECT_TRUE(all_close(y, want, 1e-13, 1e-13));
}

TEST(LayerNorm, GradientsMatchFiniteDifferences) {
  Tensor x = randn({N, D}, 13), w = randn({D}, 14), b = randn({D}, 15);
  const Tensor g = randn({N, D}, 16);
  Tensor mean, rstd;
  ops::layernorm_forward(x, w, b, 1e-5, &mean, &rstd);
  Tensor dw, db = randn({D}, 17);
  const Tensor db0 = db.clone();
  const Tensor dx = ops::layernorm_backward(g, x, w, mean, rstd, &dw, &db);
  ops::add_scaled_(db, db0, -1.0);
  auto loss = [&] { return dot(ops::layernorm_forward(x, w, b, 1e-5, nullptr, nullptr), g); };
  EXPECT_TRUE(grad_check("layernorm dx", x, dx, loss, 1e-6, 1e-6, 1e-8));
  EXPECT_TRUE(grad_check("layernorm dw", w, dw, loss, 1e-6, 1e-6, 1e-8));
  EXPECT_TRUE(grad_check("layernorm db", b, db, loss, 1e-6, 1e-6, 1e-8));
}

TEST(LayerNorm, F32MatchesF64AndManyRows) {
  const int64_t n = 300, d = 67;  // more rows than the reduction's row blocks
  const Tensor x = randn({n, d}, 18), w = randn({d}, 19), b = randn({d}, 20), g = randn({n, d}, 21);
  Tensor m64, r64, m32, r32, dw64, db64, dw32, db32;
  const Tensor y64 = ops::layernorm_forward(x, w, b, 1e-6, &m64, &r64);
  const Tensor y32 = ops::layernorm_forward(x.to(DType::F32), w.to(DType::F32), b.to(DType::F32), 1e-6, &m32, &r32);
  EXPECT_TRUE(all_close(y32, y64, 1e-5, 1e-5));
  const Tensor dx64 = ops::layernorm_backward(g, x, w, m64, r64, &dw64, &db64);
  const Tensor dx32 =
      ops::layernorm_backward(g.to(DType::F32), x.to(DType::F32), w.to(DType::F32), m32, r32, &dw32, &db32);
  EXPECT_TRUE(all_close(dx32, dx64, 1e-4, 1e-5));
  EXPECT_TRUE(all_close(dw32, dw64, 1e-4, 1e-4));
  EXPECT_TRUE(all_close(db32, db64, 1e-4, 1e-4));
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += g.item(i * d + 5);
  EXPECT_NEAR(db64.item(5), s, 1e-12);
}
