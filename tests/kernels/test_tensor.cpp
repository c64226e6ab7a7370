#include <gtest/gtest.h>

#include <cmath>

#include "kernels/tensor.h"
#include "tests/test_util.h"

using namespace dsa;

TEST(Tensor, ViewsShareStorage) {
  Tensor t = Tensor::zeros({4, 3}, DType::F32);
  Tensor r = t.slice_rows(1, 3);
  r.fill_(2.0);
  EXPECT_EQ(t.item(0), 0.0);
  EXPECT_EQ(t.item(3), 2.0);
  EXPECT_EQ(t.item(8), 2.0);
  EXPECT_EQ(t.item(9), 0.0);
  EXPECT_EQ(t.view({-1}).shape(), Shape({12}));
  EXPECT_THROW(t.view({5, -1}), std::runtime_error);
}

TEST(Tensor, TypedAccessChecksDtype) {
  Tensor t = Tensor::zeros({2}, DType::F32);
  EXPECT_THROW(t.data<double>(), std::runtime_error);
  try {
    t.data<int32_t>();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("f32[2] cpu"), std::string::npos) << e.what();
  }
}

TEST(Dtype, Bf16RoundsToNearestEven) {
  EXPECT_EQ(f32_to_bf16(1.0f).bits, 0x3f80);
  // 1 + 2^-8 is exactly between bf16 neighbours 1 and 1 + 2^-7: ties to even (1.0).
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.0f + std::ldexp(1.0f, -8))), 1.0f);
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8))), 1.0f + std::ldexp(1.0f, -6));
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(NAN))));
}

TEST(Dtype, Fp8E4M3HandComputed) {
  EXPECT_EQ(f32_to_fp8e4m3(0.0f).bits, 0x00);
  EXPECT_EQ(f32_to_fp8e4m3(1.0f).bits, 0x38);  // exponent 7, mantissa 0
  EXPECT_EQ(f32_to_fp8e4m3(-2.0f).bits, 0xc0);
  EXPECT_EQ(f32_to_fp8e4m3(448.0f).bits, 0x7e);
  EXPECT_EQ(f32_to_fp8e4m3(1e6f).bits, 0x7e);  // saturates
  EXPECT_EQ(f32_to_fp8e4m3(-INFINITY).bits, 0xfe);
  EXPECT_EQ(f32_to_fp8e4m3(NAN).bits & 0x7f, 0x7f);
  EXPECT_EQ(fp8e4m3_to_f32(fp8e4m3{0x01}), std::ldexp(1.0f, -9));  // smallest subnormal
  EXPECT_EQ(round_fp8e4m3(std::ldexp(1.0f, -10)), 0.0f);           // half of it: ties to even (0)
  EXPECT_EQ(round_fp8e4m3(3 * std::ldexp(1.0f, -10)), std::ldexp(2.0f, -9));  // 1.5 ulp -> 2 (even)
  // 1.0625 is between 1.0 (0x38) and 1.125 (0x39): ties to even -> 1.0; 1.1875 -> 1.25 (0x3a)
  EXPECT_EQ(round_fp8e4m3(1.0625f), 1.0f);
  EXPECT_EQ(round_fp8e4m3(1.1875f), 1.25f);
  EXPECT_EQ(round_fp8e4m3(15.5f), 16.0f);  // 15 and 16 neighbours at exponent 3 step 2: 15.5 -> 16 (even)
  // Every code round-trips.
  for (int c = 0; c < 256; ++c) {
    if ((c & 0x7f) == 0x7f) continue;
    float f = fp8e4m3_to_f32(fp8e4m3{static_cast<uint8_t>(c)});
    if (c == 0x80) continue;  // -0 -> 0x80, fine, but compare bits of sign-magnitude below
    EXPECT_EQ(f32_to_fp8e4m3(f).bits, c) << c;
  }
}
