// ops::cast and ops::copy_cast_ on the CPU: f32 / f64 / bf16 conversions, identity, errors.
#include <gtest/gtest.h>

#include "kernels/ops.h"
#include "tests/test_util.h"

namespace dsa {
namespace {

TEST(Cast, ConvertsAndRoundsToNearestEven) {
  Tensor x = testing::randn({7, 13}, 1, 3.0, DType::F32);
  const Tensor h = ops::cast(x, DType::BF16);
  ASSERT_EQ(h.dtype(), DType::BF16);
  ASSERT_EQ(h.shape(), x.shape());
  for (int64_t i = 0; i < x.numel(); ++i) EXPECT_EQ(h.item(i), round_bf16(x.data<float>()[i])) << i;
  const Tensor d = ops::cast(h, DType::F64);
  for (int64_t i = 0; i < x.numel(); ++i) EXPECT_EQ(d.data<double>()[i], h.item(i));
  EXPECT_TRUE(ops::cast(x, DType::F32).same_storage(x));  // already f32: x itself
}

TEST(Cast, CopyCastIntoExistingBuffer) {
  Tensor src = testing::randn({5, 3}, 2, 1.0, DType::F32);
  Tensor dst = Tensor::empty({5, 3}, DType::BF16);
  testing::poison(dst);
  ops::copy_cast_(dst, src);
  for (int64_t i = 0; i < src.numel(); ++i) EXPECT_EQ(dst.item(i), round_bf16(src.data<float>()[i]));
  Tensor same = Tensor::empty({5, 3}, DType::F32);
  ops::copy_cast_(same, src);
  EXPECT_TRUE(testing::all_close(same, src, 0, 0));
}

TEST(Cast, Errors) {
  Tensor src = testing::randn({5, 3}, 3, 1.0, DType::F32);
  Tensor wrong = Tensor::empty({3, 5}, DType::BF16);
  try {
    ops::copy_cast_(wrong, src);
    FAIL() << "expected an error";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("[copy_cast_] dst bf16[3, 5] cpu and src f32[5, 3] cpu"), std::string::npos)
        << e.what();
  }
  try {
    ops::cast(src, DType::I32);
    FAIL() << "expected an error";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("[cast] unsupported conversion"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace dsa
