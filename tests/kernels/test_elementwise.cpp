// Elementwise ops and last-dim slices against naive loops; slice/concat gradients by finite differences.
#include <gtest/gtest.h>

#include "kernels/ops.h"
#include "tests/test_util.h"

using namespace dsa;
using namespace dsa::testing;

namespace {

// Error text of a throwing call ("" when it does not throw).
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(Elementwise, AddScaleMatchNaive) {
  for (DType dt : {DType::F64, DType::F32}) {
    const Tensor a = randn({7, 13}, 1, 1.0, dt), b = randn({7, 13}, 2, 1.0, dt);
    Tensor r1 = a.clone(), r2 = a.clone(), r3 = a.clone();
    ops::add_(r1, b);
    ops::add_scaled_(r2, b, -0.375);
    ops::scale_(r3, 2.5);
    const Tensor r4 = ops::add(a, b);
    Tensor e1 = a.clone(), e2 = a.clone(), e3 = a.clone();
    for (int64_t i = 0; i < a.numel(); ++i) {
      e1.set_item(i, a.item(i) + b.item(i));
      e2.set_item(i, a.item(i) - 0.375 * b.item(i));
      e3.set_item(i, a.item(i) * 2.5);
    }
    const double tol = dt == DType::F64 ? 1e-15 : 1e-6;
    EXPECT_TRUE(all_close(r1, e1, tol, tol));
    EXPECT_TRUE(all_close(r2, e2, tol, tol));
    EXPECT_TRUE(all_close(r3, e3, tol, tol));
    EXPECT_TRUE(all_close(r4, e1, tol, tol));
    EXPECT_TRUE(all_close(a, randn({7, 13}, 1, 1.0, dt), 0, 1e-300)) << "add must not modify its input";
  }
}

TEST(Elementwise, LargeParallelAddScaled) {
  const Tensor a = randn({1000, 131}, 3, 1.0, DType::F32), b = randn({1000, 131}, 4, 1.0, DType::F32);
  Tensor r = a.clone();
  ops::add_scaled_(r, b, 0.5);
  for (int64_t i = 0; i < a.numel(); i += 97) EXPECT_FLOAT_EQ(r.item(i), float(a.item(i)) + 0.5f * float(b.item(i)));
}

TEST(Elementwise, SumAndSumSquares) {
  for (DType dt : {DType::F64, DType::F32}) {
    const Tensor x = randn({7, 3, 13}, 5, 1.0, dt);
    double s = 0, ss = 0;
    for (int64_t i = 0; i < x.numel(); ++i) {
      s += x.item(i);
      ss += x.item(i) * x.item(i);
    }
    EXPECT_NEAR(ops::sum(x), s, 1e-12);
    EXPECT_NEAR(ops::sum_squares(x), ss, 1e-12);
  }
  EXPECT_EQ(ops::sum(Tensor::zeros({0, 5}, DType::F32)), 0.0);
}

TEST(Elementwise, SliceLastMatchesNaive) {
  const Tensor x = randn({7, 3, 13}, 6);
  const Tensor y = ops::slice_last(x, 4, 11);
  ASSERT_EQ(y.shape(), Shape({7, 3, 7}));
  for (int64_t r = 0; r < 21; ++r)
    for (int64_t j = 0; j < 7; ++j) ASSERT_EQ(y.item(r * 7 + j), x.item(r * 13 + 4 + j));
  EXPECT_EQ(ops::slice_last(x, 5, 5).shape(), Shape({7, 3, 0}));
  // byte copy works for storage types too
  const Tensor xb = x.to(DType::F32).to(DType::BF16);
  const Tensor yb = ops::slice_last(xb, 4, 11);
  for (int64_t i = 0; i < yb.numel(); ++i) ASSERT_EQ(yb.item(i), round_bf16(float(y.item(i))));
  EXPECT_NE(error_of([&] { ops::slice_last(x, 3, 14); }).rfind("[slice_last]", 0), std::string::npos);
}

TEST(Elementwise, SliceLastAccumulateMatchesNaiveAndIsSliceBackward) {
  Tensor x = randn({7, 13}, 7);
  const Tensor g = randn({7, 5}, 8);  // upstream gradient of slice_last(x, 6, 11)
  Tensor dst = randn({7, 13}, 9);
  const Tensor before = dst.clone();
  ops::slice_last_accumulate_(dst, g, 6);
  for (int64_t r = 0; r < 7; ++r)
    for (int64_t j = 0; j < 13; ++j) {
      const double want = before.item(r * 13 + j) + (j >= 6 && j < 11 ? g.item(r * 5 + j - 6) : 0.0);
      ASSERT_EQ(dst.item(r * 13 + j), want);
    }
  Tensor dx = Tensor::zeros({7, 13}, DType::F64);
  ops::slice_last_accumulate_(dx, g, 6);
  EXPECT_TRUE(grad_check("slice dx", x, dx, [&] { return dot(ops::slice_last(x, 6, 11), g); }));
  const std::string err = error_of([&] { ops::slice_last_accumulate_(dst, g, 9); });
  EXPECT_EQ(err.rfind("[slice_last_accumulate_]", 0), 0u) << err;
}

TEST(Elementwise, ConcatLastMatchesNaiveAndSlicesAreItsBackward) {
  Tensor a = randn({7, 2, 5}, 10), b = randn({7, 2, 8}, 11);
  const Tensor y = ops::concat_last(a, b);
  ASSERT_EQ(y.shape(), Shape({7, 2, 13}));
  for (int64_t r = 0; r < 14; ++r)
    for (int64_t j = 0; j < 13; ++j)
      ASSERT_EQ(y.item(r * 13 + j), j < 5 ? a.item(r * 5 + j) : b.item(r * 8 + j - 5));
  const Tensor g = randn({7, 2, 13}, 12);
  const Tensor da = ops::slice_last(g, 0, 5), db = ops::slice_last(g, 5, 13);
  EXPECT_TRUE(grad_check("concat da", a, da, [&] { return dot(ops::concat_last(a, b), g); }));
  EXPECT_TRUE(grad_check("concat db", b, db, [&] { return dot(ops::concat_last(a, b), g); }));
  EXPECT_THROW(ops::concat_last(a, randn({7, 3, 8}, 1)), std::runtime_error);
}

TEST(Elementwise, ShapeAndDtypeErrorsNameTheOp) {
  Tensor a = randn({7, 13}, 1);
  const std::string e1 = error_of([&] { ops::add_(a, randn({7, 12}, 2)); });
  EXPECT_EQ(e1.rfind("[add_scaled_]", 0), 0u) << e1;
  const std::string e2 = error_of([&] { ops::add(a, randn({7, 13}, 2, 1.0, DType::F32)); });
  EXPECT_EQ(e2.rfind("[add]", 0), 0u) << e2;
  Tensor ids = Tensor::zeros({3}, DType::I32);
  const std::string e3 = error_of([&] { ops::scale_(ids, 2.0); });
  EXPECT_EQ(e3.rfind("[scale_]", 0), 0u) << e3;
}
