// RoPE, both pairings: direct transcriptions of the formulas (Interleaved: transformers'
// apply_rotary_pos_emb_interleave), norm preservation, relative-position property, the backward by
// finite differences, f32 against f64.
#include <gtest/gtest.h>

#include <cmath>

#include "kernels/ops.h"
#include "tests/test_util.h"

using namespace dsa;
using namespace dsa::testing;
using ops::RopeStyle;

namespace {

// cos/sin [P, R/2] of p * theta^(-2i/R).
void tables(int64_t p, int64_t r, DType dt, Tensor* cos, Tensor* sin) {
  *cos = Tensor::empty({p, r / 2}, dt);
  *sin = Tensor::empty({p, r / 2}, dt);
  for (int64_t q = 0; q < p; ++q)
    for (int64_t i = 0; i < r / 2; ++i) {
      const double a = q * std::pow(10000.0, -2.0 * i / r);
      cos->set_item(q * r / 2 + i, std::cos(a));
      sin->set_item(q * r / 2 + i, std::sin(a));
    }
}

// transformers (DeepseekV3/V32):
//   q = q.view(..., d//2, 2).transpose(-1, -2).reshape(..., d)
//   q_embed = q * cos_full + rotate_half(q) * sin_full,  cos_full = cat(cos, cos), rotate_half(u) = cat(-u2, u1)
// NeoX rotate-half is the same without the first line. One vector v [R] at position p.
std::vector<double> reference(const std::vector<double>& v, const Tensor& cos, const Tensor& sin, int64_t p,
                              RopeStyle style) {
  const int64_t r = static_cast<int64_t>(v.size()), h = r / 2;
  std::vector<double> q(r);
  for (int64_t k = 0; k < r; ++k) {
    if (style == RopeStyle::Interleaved) {
      // view(h, 2) then transpose: element (k % h) of row (k / h) of the transposed [2, h] matrix
      q[k] = v[(k % h) * 2 + k / h];
    } else {
      q[k] = v[k];
    }
  }
  std::vector<double> out(r);
  for (int64_t k = 0; k < r; ++k) {
    const double c = cos.item(p * h + k % h), s = sin.item(p * h + k % h);
    const double rot = k < h ? -q[k + h] : q[k - h];
    out[k] = q[k] * c + rot * s;
  }
  return out;
}

const RopeStyle kStyles[] = {RopeStyle::Interleaved, RopeStyle::RotateHalf};

}  // namespace

TEST(Rope, MatchesTransformersFormulaWithOffsetAndHeads) {
  const int64_t n = 7, heads = 3, d = 13, r = 8, off = 3, p = 20;
  Tensor cos, sin;
  tables(p, r, DType::F64, &cos, &sin);
  const Tensor pos = randint({n}, 1, 0, p);
  for (RopeStyle st : kStyles) {
    const Tensor x = randn({n, heads, d}, 2);
    Tensor y = x.clone();
    ops::rope_forward_(y, pos, cos, sin, off, st);
    for (int64_t t = 0; t < n; ++t)
      for (int64_t hd = 0; hd < heads; ++hd) {
        const int64_t base = (t * heads + hd) * d;
        std::vector<double> v(r);
        for (int64_t k = 0; k < r; ++k) v[k] = x.item(base + off + k);
        const std::vector<double> want = reference(v, cos, sin, static_cast<int64_t>(pos.item(t)), st);
        for (int64_t j = 0; j < d; ++j) {
          const double e = (j >= off && j < off + r) ? want[j - off] : x.item(base + j);  // others untouched
          ASSERT_NEAR(y.item(base + j), e, 1e-15) << "style " << int(st) << " t " << t << " j " << j;
        }
      }
  }
}

TEST(Rope, InterleavedHandExample) {
  // R = 4, position 1, angles a0, a1: pairs (x0, x1) with a0, (x2, x3) with a1; output de-interleaved.
  Tensor cos = Tensor::empty({2, 2}, DType::F64), sin = Tensor::empty({2, 2}, DType::F64);
  const double a0 = 0.3, a1 = 1.1;
  for (int64_t i = 0; i < 2; ++i) {
    cos.set_item(i, 1.0);
    sin.set_item(i, 0.0);
  }
  cos.set_item(2, std::cos(a0)), cos.set_item(3, std::cos(a1)), sin.set_item(2, std::sin(a0)), sin.set_item(3, std::sin(a1));
  Tensor x = Tensor::from_vector(std::vector<float>{1, 2, 3, 4}, {1, 4}).to(DType::F64);
  const Tensor pos = Tensor::from_vector(std::vector<int32_t>{1}, {1});
  ops::rope_forward_(x, pos, cos, sin, 0, RopeStyle::Interleaved);
  EXPECT_NEAR(x.item(0), 1 * std::cos(a0) - 2 * std::sin(a0), 1e-15);  // rotated evens ...
  EXPECT_NEAR(x.item(1), 3 * std::cos(a1) - 4 * std::sin(a1), 1e-15);
  EXPECT_NEAR(x.item(2), 2 * std::cos(a0) + 1 * std::sin(a0), 1e-15);  // ... then rotated odds
  EXPECT_NEAR(x.item(3), 4 * std::cos(a1) + 3 * std::sin(a1), 1e-15);
}

TEST(Rope, PreservesNormAndDotDependsOnlyOnDistance) {
  const int64_t r = 16, p = 64;
  Tensor cos, sin;
  tables(p, r, DType::F64, &cos, &sin);
  const Tensor q = randn({1, r}, 3), k = randn({1, r}, 4);
  auto rot = [&](const Tensor& v, int pos, RopeStyle st) {
    Tensor y = v.clone();
    ops::rope_forward_(y, Tensor::from_vector(std::vector<int32_t>{pos}, {1}), cos, sin, 0, st);
    return y;
  };
  for (RopeStyle st : kStyles) {
    for (int m : {0, 5, 37}) EXPECT_NEAR(ops::sum_squares(rot(q, m, st)), ops::sum_squares(q), 1e-12);
    const double d1 = dot(rot(q, 10, st), rot(k, 3, st));
    const double d2 = dot(rot(q, 57, st), rot(k, 50, st));
    const double d3 = dot(rot(q, 7, st), rot(k, 0, st));
    const double other = dot(rot(q, 10, st), rot(k, 4, st));
    EXPECT_NEAR(d1, d2, 1e-12);
    EXPECT_NEAR(d1, d3, 1e-12);
    EXPECT_GT(std::fabs(d1 - other), 1e-6) << "the dot product must depend on the distance";
  }
}

TEST(Rope, BackwardMatchesFiniteDifferencesAndInvertsForward) {
  const int64_t n = 7, heads = 2, d = 13, r = 10, off = 2, p = 9;
  Tensor cos, sin;
  tables(p, r, DType::F64, &cos, &sin);
  const Tensor pos = randint({n}, 5, 0, p);
  for (RopeStyle st : kStyles) {
    Tensor x = randn({n, heads, d}, 6);
    const Tensor g = randn({n, heads, d}, 7);
    Tensor dx = g.clone();
    ops::rope_backward_(dx, pos, cos, sin, off, st);
    auto loss = [&] {
      Tensor y = x.clone();
      ops::rope_forward_(y, pos, cos, sin, off, st);
      return dot(y, g);
    };
    EXPECT_TRUE(grad_check("rope dx", x, dx, loss, 1e-6, 1e-7, 1e-9)) << "style " << int(st);
    Tensor y = x.clone();
    ops::rope_forward_(y, pos, cos, sin, off, st);
    ops::rope_backward_(y, pos, cos, sin, off, st);  // orthogonal map: backward undoes forward
    EXPECT_TRUE(all_close(y, x, 1e-14, 1e-14)) << "style " << int(st);
  }
}

TEST(Rope, TwoDimInputAndF32MatchesF64) {
  const int64_t n = 7, d = 12, r = 12, p = 30;
  Tensor c64, s64;
  tables(p, r, DType::F64, &c64, &s64);
  const Tensor pos = randint({n}, 8, 0, p);
  for (RopeStyle st : kStyles) {
    Tensor x = randn({n, d}, 9), xf = x.to(DType::F32);
    ops::rope_forward_(x, pos, c64, s64, 0, st);
    ops::rope_forward_(xf, pos, c64.to(DType::F32), s64.to(DType::F32), 0, st);
    EXPECT_TRUE(all_close(xf, x, 1e-5, 1e-6));
    ops::rope_backward_(x, pos, c64, s64, 0, st);
    ops::rope_backward_(xf, pos, c64.to(DType::F32), s64.to(DType::F32), 0, st);
    EXPECT_TRUE(all_close(xf, x, 1e-5, 1e-6));
  }
}

TEST(Rope, Errors) {
  Tensor cos, sin;
  tables(4, 8, DType::F64, &cos, &sin);
  Tensor x = randn({2, 13}, 10);
  const Tensor bad = Tensor::from_vector(std::vector<int32_t>{0, 4}, {2});
  try {
    ops::rope_forward_(x, bad, cos, sin, 0, RopeStyle::RotateHalf);
    FAIL() << "no error";
  } catch (const std::runtime_error& e) {
    EXPECT_EQ(std::string(e.what()), "[rope] position 4 at row 1 is out of range for a table of 4 positions");
  }
  const Tensor ok = Tensor::from_vector(std::vector<int32_t>{0, 3}, {2});
  EXPECT_THROW(ops::rope_forward_(x, ok, cos, sin, 6, RopeStyle::Interleaved), std::runtime_error);  // 6+8 > 13
  EXPECT_THROW(ops::rope_backward_(x, ok, cos.to(DType::F32), sin, 0, RopeStyle::Interleaved), std::runtime_error);
}
