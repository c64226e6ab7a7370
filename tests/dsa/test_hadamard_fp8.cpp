// Hadamard rotation and FP8 e4m3 block quantization of the lightning indexer, against hand-computed
// values: scales, round-to-nearest-even, saturation at 448, tiny amax.
#include <gtest/gtest.h>

#include <cmath>

#include "kernels/dsa_ops.h"
#include "tests/dsa/fp8_reference.h"
#include "tests/test_util.h"

using namespace dsa;
using dsa::testing::all_close;
using dsa::testing::randn;

namespace {
Tensor row(const std::vector<float>& v) { return Tensor::from_vector(v, {1, static_cast<int64_t>(v.size())}); }
}  // namespace

TEST(Hadamard, HandComputedD4) {
  // H_4 (Sylvester) [1 2 3 4]^T = [10, -2, -4, 0]; normalized by 4^-1/2 = 1/2.
  const Tensor y = ops::hadamard_transform(row({1, 2, 3, 4}));
  EXPECT_TRUE(all_close(y, row({5, -1, -2, 0}), 0, 1e-6));
}

TEST(Hadamard, SelfInverseOrthogonalAndItsOwnBackward) {
  const Tensor x = randn({3, 5, 128}, 1);
  const Tensor y = ops::hadamard_transform(x);
  EXPECT_TRUE(all_close(ops::hadamard_transform(y), x, 1e-12, 1e-12));
  // Norms and dot products are preserved.
  const Tensor z = randn({3, 5, 128}, 2);
  const Tensor hz = ops::hadamard_transform(z);
  for (int64_t r = 0; r < 15; ++r) {
    double a = 0, b = 0;
    for (int64_t i = 0; i < 128; ++i) {
      a += x.item(r * 128 + i) * z.item(r * 128 + i);
      b += y.item(r * 128 + i) * hz.item(r * 128 + i);
    }
    EXPECT_NEAR(a, b, 1e-10);
  }
  // Backward: d/dx sum(hadamard(x) * g) = hadamard(g), checked by finite differences.
  Tensor xv = randn({2, 16}, 3);
  const Tensor g = randn({2, 16}, 4);
  EXPECT_TRUE(dsa::testing::grad_check("x", xv, ops::hadamard_transform(g),
                                       [&] { return dsa::testing::dot(ops::hadamard_transform(xv), g); }));
}

TEST(Hadamard, RejectsNonPowerOfTwo) {
  try {
    ops::hadamard_transform(Tensor::zeros({2, 6}, DType::F32));
    FAIL() << "expected an error";
  } catch (const std::runtime_error& e) {
    EXPECT_EQ(std::string(e.what()).rfind("[hadamard_transform]", 0), 0u) << e.what();
  }
}

TEST(Fp8, BlockScalesArePowersOfTwo) {
  EXPECT_EQ(ops::fp8_block_scale(448.0f), 1.0f);
  EXPECT_EQ(ops::fp8_block_scale(449.0f), 2.0f);
  EXPECT_EQ(ops::fp8_block_scale(224.0f), 0.5f);
  EXPECT_EQ(ops::fp8_block_scale(896.0f), 2.0f);
  EXPECT_EQ(ops::fp8_block_scale(3.5f), std::ldexp(1.0f, -7));   // 3.5 / 448 = 2^-7 exactly
  EXPECT_EQ(ops::fp8_block_scale(1.0f), std::ldexp(1.0f, -8));   // log2(1/448) = -8.81
  EXPECT_EQ(ops::fp8_block_scale(100.0f), 0.25f);                // log2(0.2232) = -2.16
  // amax clamped to 1e-4: log2(1e-4 / 448) = -22.09 -> 2^-22, for 0 and for anything smaller.
  EXPECT_EQ(ops::fp8_block_scale(0.0f), std::ldexp(1.0f, -22));
  EXPECT_EQ(ops::fp8_block_scale(1e-9f), std::ldexp(1.0f, -22));
  for (int e = -10; e <= 10; ++e) EXPECT_EQ(ops::fp8_block_scale(std::ldexp(448.0f, e)), std::ldexp(1.0f, e)) << e;
}

TEST(Fp8, RoundToNearestEvenAndSaturation) {
  // The conversion the quantizer uses: ties to even, saturate (never NaN) above 448.
  EXPECT_EQ(round_fp8e4m3(1.0625f), 1.0f);   // halfway 1 | 1.125 -> even mantissa 000
  EXPECT_EQ(round_fp8e4m3(1.1875f), 1.25f);  // halfway 1.125 | 1.25 -> 010
  EXPECT_EQ(round_fp8e4m3(432.0f), 448.0f);  // halfway 416 | 448 -> 448 (110)
  EXPECT_EQ(round_fp8e4m3(460.0f), 448.0f);
  EXPECT_EQ(round_fp8e4m3(1e6f), 448.0f);
  EXPECT_EQ(round_fp8e4m3(-500.0f), -448.0f);

  // amax 448 -> scale 1: values are rounded to e4m3 directly.
  Tensor scales;
  const Tensor y = ops::fp8_block_quantize(row({448, 1.0625f, 1.1875f, -432, 440, -0.3f, 0, 17}), 128, &scales);
  EXPECT_TRUE(all_close(y, row({448, 1.0f, 1.25f, -448, 448, -0.3125f, 0, 16}), 0, 1e-300));
  EXPECT_EQ(scales.shape(), Shape({1, 1}));
  EXPECT_EQ(scales.item(0), 1.0);

  // amax 896 -> scale 2: 896 -> code 448 (0x7e), 1 -> 0.5 exactly, 3.1 -> 1.55 -> 1.5 -> 3.
  const ops::Fp8Blocks q = ops::fp8_block_quantize_codes(row({896, 1, 3.1f, -896}), 128);
  EXPECT_EQ(q.scales.item(0), 2.0);
  EXPECT_EQ(q.codes.data<fp8e4m3>()[0].bits, 0x7e);
  EXPECT_EQ(q.codes.data<fp8e4m3>()[3].bits, 0xfe);
  EXPECT_TRUE(all_close(ops::fp8_block_dequantize(q, 128, DType::F32), row({896, 1, 3, -896}), 0, 1e-300));
}

TEST(Fp8, TinyAmaxAndZeros) {
  Tensor scales;
  // amax 1e-6 is clamped to 1e-4: scale 2^-22; 1e-6 * 2^22 = 4.19 -> 4 -> 4 * 2^-22 = 2^-20.
  const Tensor y = ops::fp8_block_quantize(row({1e-6f, -1e-6f, 0}), 128, &scales);
  EXPECT_EQ(scales.item(0), std::ldexp(1.0, -22));
  EXPECT_TRUE(all_close(y, row({std::ldexp(1.0f, -20), -std::ldexp(1.0f, -20), 0}), 0, 1e-300));
  const Tensor z = ops::fp8_block_quantize(Tensor::zeros({2, 8}, DType::F32), 4, &scales);
  EXPECT_TRUE(all_close(z, Tensor::zeros({2, 8}, DType::F32), 0, 1e-300));
  EXPECT_EQ(scales.shape(), Shape({2, 2}));
  for (int i = 0; i < 4; ++i) EXPECT_EQ(scales.item(i), std::ldexp(1.0, -22));
}

TEST(Fp8, OneScalePerBlockAndPartialLastBlock) {
  // Row of 256: block 0 amax 1 (scale 2^-8), block 1 amax 112 (112 / 448 = 2^-2: scale 1/4).
  Tensor x = Tensor::zeros({1, 256}, DType::F32);
  x.set_item(5, 1.0);
  x.set_item(200, -112.0);
  x.set_item(201, 0.3);  // 1.2 -> 1.25 -> 0.3125
  Tensor scales;
  const Tensor y = ops::fp8_block_quantize(x, 128, &scales);
  EXPECT_EQ(scales.item(0), std::ldexp(1.0, -8));
  EXPECT_EQ(scales.item(1), 0.25);
  EXPECT_EQ(y.item(5), 1.0);
  EXPECT_EQ(y.item(200), -112.0);  // code -448
  EXPECT_EQ(y.item(201), 0.3125);
  // d = 5, block 2: scales for [0,2), [2,4), [4,5).
  const Tensor y2 = ops::fp8_block_quantize(row({448, 1, 0.5f, 0.25f, 3.5f}), 2, &scales);
  EXPECT_EQ(scales.shape(), Shape({1, 3}));
  EXPECT_EQ(scales.item(0), 1.0);
  EXPECT_EQ(scales.item(1), std::ldexp(1.0, -9));  // 0.5/448 -> 2^-9.8 -> 2^-9
  EXPECT_EQ(scales.item(2), std::ldexp(1.0, -7));
  EXPECT_TRUE(all_close(y2, row({448, 1, 0.5f, 0.25f, 3.5f}), 0, 1e-300));
}

TEST(Fp8, CodesRoundTripIdempotentAndBounded) {
  for (DType dt : {DType::F32, DType::F64}) {
    const Tensor x = randn({6, 256}, 7, 3.0, dt);
    Tensor scales;
    const Tensor y = ops::fp8_block_quantize(x, 128, &scales);
    const ops::Fp8Blocks q = ops::fp8_block_quantize_codes(x, 128);
    EXPECT_TRUE(all_close(ops::fp8_block_dequantize(q, 128, dt), y, 0, 1e-300));
    EXPECT_TRUE(all_close(q.scales, scales, 0, 1e-300));
    // Quantizing a quantized tensor changes nothing (same amax, values already on the grid).
    EXPECT_TRUE(all_close(ops::fp8_block_quantize(y, 128, nullptr), y, 0, 1e-300));
    // Relative error of e4m3 (3 mantissa bits) is at most 2^-4 for values in its normal range.
    for (int64_t i = 0; i < x.numel(); ++i) {
      const double s = scales.item(i / 128);
      if (std::fabs(x.item(i)) >= std::ldexp(s, -6))
        EXPECT_LE(std::fabs(y.item(i) - x.item(i)), std::ldexp(std::fabs(x.item(i)), -4) * (1 + 1e-6)) << i;
      else
        EXPECT_LE(std::fabs(y.item(i) - x.item(i)), std::ldexp(s, -10) * (1 + 1e-6)) << i;
    }
  }
}

// Against the independent reference of tests/dsa/fp8_reference.h (Sylvester matrix product in f64, the
// e4m3 value table, power-of-two scales from the definition).
TEST(Fp8, IndexerOperandsMatchTheReferenceRotationAndRounding) {
  const int64_t B = 2, T = 3, Hi = 4, D = 128;
  const Tensor q = randn({B, T, Hi, D}, 11, 1.0, DType::F32);
  const Tensor k = randn({B, T, D}, 12, 1.0, DType::F32);
  Tensor qh, kh;
  ops::indexer_fp8_operands(q, k, &qh, &kh);
  ASSERT_EQ(qh.shape(), q.shape());
  ASSERT_EQ(kh.shape(), k.shape());
  // NOTES: the op rotates in f32 (log2(128) = 7 butterfly stages, each value rounded once per stage), the
  // reference in f64: the rotated values differ by at most 7 u32 = 7 * 2^-24 relative (times the row's
  // norm ratio, below 2 for Gaussian rows), so a value within 2^-19 relative of a midpoint between two e4m3
  // neighbours may round either way; elsewhere the rounding is exact and must agree to the bit.
  const double slack = std::ldexp(1.0, -19);
  int64_t ambiguous = 0, checked = 0;
  auto check_rows = [&](const Tensor& x, const Tensor& xh, int64_t rows) {
    for (int64_t r = 0; r < rows; ++r) {
      std::vector<double> in(D);
      for (int64_t i = 0; i < D; ++i) in[i] = x.item(r * D + i);
      std::vector<bool> amb;
      const std::vector<double> want = dsa::testing::fp8_view_ref(in, &amb, slack);
      double amax = 0;
      for (int64_t i = 0; i < D; ++i) amax = std::max(amax, std::fabs(want[i]));
      for (int64_t i = 0; i < D; ++i) {
        const double got = xh.item(r * D + i);
        ++checked;
        if (amb[i]) {
          ++ambiguous;
          // Either neighbour: within one e4m3 step (2^-3 relative) of the reference.
          EXPECT_LE(std::fabs(got - want[i]), std::ldexp(std::fabs(want[i]), -3) + 1e-30) << "row " << r << " " << i;
        } else {
          EXPECT_EQ(got, want[i]) << "row " << r << " value " << i;
        }
      }
    }
  };
  check_rows(q, qh, B * T * Hi);  // one scale per token-head
  check_rows(k, kh, B * T);       // one scale per token
  EXPECT_LT(ambiguous, checked / 100) << "the slack is a rare exception, not the rule";
  // Dot products survive the rotation and the rounding: each e4m3 value is within 2^-4 relative of its
  // input, so |q_hat . k_hat - q . k| <= (2 * 2^-4 + 2^-8) |q| |k| by Cauchy-Schwarz (the rotation keeps norms).
  for (int64_t j = 0; j < Hi; ++j) {
    double exact = 0, approx = 0, nq = 0, nk = 0;
    for (int64_t i = 0; i < D; ++i) {
      exact += q.item(j * D + i) * k.item(i);
      approx += qh.item(j * D + i) * kh.item(i);
      nq += q.item(j * D + i) * q.item(j * D + i);
      nk += k.item(i) * k.item(i);
    }
    EXPECT_LE(std::fabs(exact - approx), (2 * 0.0625 + 0.00390625) * std::sqrt(nq * nk)) << j;
  }
}
