// GEMM against a naive triple loop (all transposes, alpha/beta, batched, shared operands), linear
// layer gradients by finite differences, f32 against f64.
#include <gtest/gtest.h>

#include "kernels/ops.h"
#include "tests/test_util.h"

using namespace dsa;
using namespace dsa::testing;

namespace {

// Element (i, j) of op(t) for a 2-D matrix, or of batch b's matrix when t is 3-D.
double at(const Tensor& t, int64_t b, bool trans, int64_t i, int64_t j) {
  const int64_t r = t.size(-2), c = t.size(-1);
  const int64_t base = t.ndim() == 3 ? b * r * c : 0;
  return trans ? t.item(base + j * c + i) : t.item(base + i * c + j);
}

// c = alpha op(a) op(b) + beta c0, naive in double.
Tensor naive_gemm(const Tensor& a, bool ta, const Tensor& b, bool tb, const Tensor& c0, double alpha, double beta) {
  Tensor c = Tensor::empty(c0.shape(), DType::F64);
  const int64_t batch = c0.ndim() == 3 ? c0.size(0) : 1, m = c0.size(-2), n = c0.size(-1);
  const int64_t k = ta ? a.size(-2) : a.size(-1);
  for (int64_t q = 0; q < batch; ++q)
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) {
        double s = 0;
        for (int64_t l = 0; l < k; ++l) s += at(a, q, ta, i, l) * at(b, q, tb, l, j);
        const int64_t f = (q * m + i) * n + j;
        c.set_item(f, alpha * s + (beta == 0 ? 0.0 : beta * c0.item(f)));
      }
  return c;
}

}  // namespace

TEST(Gemm, AllTransposesAlphaBeta2D) {
  const int64_t m = 7, k = 13, n = 5;
  int seed = 0;
  for (DType dt : {DType::F64, DType::F32})
    for (bool ta : {false, true})
      for (bool tb : {false, true})
        for (double beta : {0.0, 0.5}) {
          const Tensor a = randn(ta ? Shape{k, m} : Shape{m, k}, ++seed, 1.0, dt);
          const Tensor b = randn(tb ? Shape{n, k} : Shape{k, n}, ++seed, 1.0, dt);
          Tensor c = randn({m, n}, ++seed, 1.0, dt);
          if (beta == 0) poison(c);  // beta = 0 must overwrite garbage, NaN included
          const Tensor want = naive_gemm(a, ta, b, tb, c, 1.5, beta);
          ops::gemm(a, ta, b, tb, c, 1.5, beta);
          const double tol = dt == DType::F64 ? 1e-13 : 2e-5;
          EXPECT_TRUE(all_close(c, want, tol, tol)) << "ta " << ta << " tb " << tb << " beta " << beta;
        }
}

TEST(Gemm, Batched3DWithSharedOperands) {
  const int64_t bt = 3, m = 7, k = 13, n = 6;
  for (int shared = 0; shared < 3; ++shared) {  // 0: none, 1: a is 2-D, 2: b is 2-D
    const Tensor a = randn(shared == 1 ? Shape{k, m} : Shape{bt, k, m}, 20 + shared);  // used transposed
    const Tensor b = randn(shared == 2 ? Shape{k, n} : Shape{bt, k, n}, 30 + shared);
    Tensor c = randn({bt, m, n}, 40 + shared);
    const Tensor want = naive_gemm(a, true, b, false, c, -0.5, 1.0);
    ops::gemm(a, true, b, false, c, -0.5, 1.0);
    EXPECT_TRUE(all_close(c, want, 1e-13, 1e-13)) << "shared " << shared;
  }
}

TEST(Gemm, EmptyInnerDimensionScalesC) {
  const Tensor a = Tensor::zeros({4, 0}, DType::F64), b = Tensor::zeros({0, 3}, DType::F64);
  Tensor c = Tensor::full({4, 3}, DType::F64, 2.0);
  ops::gemm(a, false, b, false, c, 1.0, 0.25);
  for (int64_t i = 0; i < c.numel(); ++i) EXPECT_EQ(c.item(i), 0.5);
  poison(c);
  ops::gemm(a, false, b, false, c, 1.0, 0.0);
  for (int64_t i = 0; i < c.numel(); ++i) EXPECT_EQ(c.item(i), 0.0);
}

TEST(Gemm, ShapeErrors) {
  Tensor c = Tensor::zeros({7, 5}, DType::F64);
  try {
    ops::gemm(randn({7, 13}, 1), false, randn({12, 5}, 2), false, c);
    FAIL() << "no error";
  } catch (const std::runtime_error& e) {
    EXPECT_EQ(std::string(e.what()).rfind("[gemm] shapes do not chain", 0), 0u) << e.what();
  }
  EXPECT_THROW(ops::gemm(randn({7, 13}, 1, 1.0, DType::F32), false, randn({13, 5}, 2), false, c),
               std::runtime_error);
}

TEST(Linear, ForwardMatchesNaiveAndGradientsMatchFiniteDifferences) {
  const int64_t n = 7, in = 13, out = 5;
  Tensor x = randn({n, in}, 50), w = randn({out, in}, 51);
  const Tensor y = ops::linear_forward(x, w);
  EXPECT_TRUE(all_close(y, naive_gemm(x, false, w, true, Tensor::zeros({n, out}, DType::F64), 1, 0), 1e-13, 1e-13));
  const Tensor g = randn({n, out}, 52);
  const Tensor dw0 = randn({out, in}, 53);
  Tensor dw = dw0.clone();  // accumulates onto existing contents
  const Tensor dx = ops::linear_backward(g, x, w, &dw, true);
  Tensor dw_only = dw.clone();
  ops::add_scaled_(dw_only, dw0, -1.0);
  auto loss = [&] { return dot(ops::linear_forward(x, w), g); };
  EXPECT_TRUE(grad_check("linear dx", x, dx, loss));
  EXPECT_TRUE(grad_check("linear dw", w, dw_only, loss));
  // need_dx = false returns an undefined tensor and still accumulates; undefined dw starts at zero
  Tensor dw2;
  EXPECT_FALSE(ops::linear_backward(g, x, w, &dw2, false).defined());
  EXPECT_TRUE(all_close(dw2, dw_only, 1e-14, 1e-14));
}

TEST(Linear, LeadingDimsFlattenAndF32MatchesF64) {
  const Tensor x = randn({2, 7, 13}, 60), w = randn({5, 13}, 61), g = randn({2, 7, 5}, 62);
  const Tensor y = ops::linear_forward(x, w);
  ASSERT_EQ(y.shape(), Shape({2, 7, 5}));
  const Tensor yf = ops::linear_forward(x.to(DType::F32), w.to(DType::F32));
  EXPECT_TRUE(all_close(yf, y, 1e-5, 1e-5));
  Tensor dw, dwf;
  const Tensor dx = ops::linear_backward(g, x, w, &dw);
  const Tensor dxf = ops::linear_backward(g.to(DType::F32), x.to(DType::F32), w.to(DType::F32), &dwf);
  EXPECT_TRUE(all_close(dxf, dx, 1e-5, 1e-5));
  EXPECT_TRUE(all_close(dwf, dw, 1e-5, 1e-5));
  EXPECT_THROW(ops::linear_forward(randn({7, 12}, 1), w), std::runtime_error);
}
