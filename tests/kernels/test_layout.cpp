#include <gtest/gtest.h>

#include "kernels/layout_ops.h"
#include "tests/test_util.h"

using namespace dsa;
using namespace dsa::testing;

TEST(Layout, NarrowAndAccumulateAreAdjoint) {
  // <narrow(x), g> == <x, narrow_accumulate(0, g)> for every dim: the backward is the adjoint.
  Tensor x = randn({3, 5, 7}, 1);
  for (int dim = 0; dim < 3; ++dim) {
    const int64_t len = x.shape()[dim];
    Tensor y = ops::narrow(x, dim, 1, len - 1);
    EXPECT_EQ(y.shape()[dim], len - 2);
    Tensor g = randn(y.shape(), 2 + dim);
    Tensor back = Tensor::zeros(x.shape(), DType::F64);
    ops::narrow_accumulate_(back, g, dim, 1);
    EXPECT_NEAR(dot(y, g), dot(x, back), 1e-12);
  }
  // Element check.
  Tensor y = ops::narrow(x, 2, 2, 4);
  EXPECT_EQ(y.item(0), x.item(2));
  EXPECT_EQ(y.item(3), x.item(7 + 3));
  EXPECT_THROW(ops::narrow(x, 1, 2, 6), std::runtime_error);
}

TEST(Layout, TransposeRepeatSum) {
  Tensor x = randn({4, 3, 2}, 3);
  Tensor t = ops::transpose01(x);
  EXPECT_EQ(t.shape(), Shape({3, 4, 2}));
  for (int a = 0; a < 4; ++a)
    for (int b = 0; b < 3; ++b)
      for (int c = 0; c < 2; ++c) EXPECT_EQ(t.item((b * 4 + a) * 2 + c), x.item((a * 3 + b) * 2 + c));
  EXPECT_TRUE(all_close(ops::transpose01(t), x, 0, 0));
  Tensor k = randn({5, 1, 3}, 4);
  Tensor r = ops::repeat_dim1(k, 4);
  Tensor g = randn({5, 4, 3}, 5);
  // sum_dim1 is the adjoint of repeat_dim1.
  EXPECT_NEAR(dot(r, g), dot(k, ops::sum_dim1(g)), 1e-12);
}
