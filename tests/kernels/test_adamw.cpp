// AdamW: two hand-computed steps, elementwise against the textbook form, gradient norm and clipping.
#include <gtest/gtest.h>

#include <cmath>

#include "kernels/ops.h"
#include "tests/test_util.h"

using namespace dsa;
using namespace dsa::testing;

TEST(AdamW, TwoHandComputedSteps) {
  // p = 1, lr 0.1, wd 0.1, betas (0.9, 0.95), eps 1e-8; grads 0.5 then -0.25.
  // step 1: p = 0.99; m = 0.05; v = 0.0125; m^ = 0.5; v^ = 0.25; p -= 0.1 * 0.5 / (0.5 + 1e-8)
  //         -> 0.890000002 (to 1e-16)
  // step 2: p = 0.88110000198; m = 0.02; v = 0.015; m^ = 0.02 / 0.19; v^ = 0.015 / 0.0975
  //         p -= 0.1 m^ / (sqrt(v^) + 1e-8) -> 0.8542630578558273
  ops::AdamWConfig cfg;
  cfg.lr = 0.1;
  cfg.weight_decay = 0.1;
  for (DType dt : {DType::F64, DType::F32}) {
    Tensor p = Tensor::full({1}, dt, 1.0), m = Tensor::zeros({1}, dt), v = Tensor::zeros({1}, dt);
    const double tol = dt == DType::F64 ? 1e-15 : 1e-7;
    ops::adamw_step_(p, Tensor::full({1}, dt, 0.5), m, v, cfg, 1);
    EXPECT_NEAR(p.item(0), 0.890000002, tol);
    EXPECT_NEAR(m.item(0), 0.05, tol);
    EXPECT_NEAR(v.item(0), 0.0125, tol);
    ops::adamw_step_(p, Tensor::full({1}, dt, -0.25), m, v, cfg, 2);
    EXPECT_NEAR(p.item(0), 0.8542630578558273, tol);
    EXPECT_NEAR(m.item(0), 0.02, tol);
    EXPECT_NEAR(v.item(0), 0.015, tol);
  }
}

TEST(AdamW, MatchesTextbookFormElementwise) {
  ops::AdamWConfig cfg;  // defaults: lr 1e-3, betas (0.9, 0.95), eps 1e-8, wd 0.1
  const int64_t n = 1001;
  Tensor p = randn({7, 143}, 1), m = Tensor::zeros({7, 143}, DType::F64), v = m.clone();
  std::vector<double> ep(n), em(n, 0.0), ev(n, 0.0);
  for (int64_t i = 0; i < n; ++i) ep[i] = p.item(i);
  for (int step = 1; step <= 3; ++step) {
    const Tensor g = randn({7, 143}, 10 + step);
    ops::adamw_step_(p, g, m, v, cfg, step);
    for (int64_t i = 0; i < n; ++i) {
      ep[i] -= cfg.lr * cfg.weight_decay * ep[i];
      em[i] = cfg.beta1 * em[i] + (1 - cfg.beta1) * g.item(i);
      ev[i] = cfg.beta2 * ev[i] + (1 - cfg.beta2) * g.item(i) * g.item(i);
      const double mh = em[i] / (1 - std::pow(cfg.beta1, step)), vh = ev[i] / (1 - std::pow(cfg.beta2, step));
      ep[i] -= cfg.lr * mh / (std::sqrt(vh) + cfg.eps);
    }
  }
  for (int64_t i = 0; i < n; ++i) ASSERT_NEAR(p.item(i), ep[i], 1e-14) << i;
}

TEST(AdamW, Errors) {
  Tensor p = Tensor::zeros({3}, DType::F32), m = p.clone(), v = p.clone();
  try {
    ops::adamw_step_(p, Tensor::zeros({4}, DType::F32), m, v, {}, 1);
    FAIL() << "no error";
  } catch (const std::runtime_error& e) {
    EXPECT_EQ(std::string(e.what()), "[adamw] grad must have param's shape [3], got f32[4] cpu");
  }
  EXPECT_THROW(ops::adamw_step_(p, Tensor::zeros({3}, DType::F32), m, v, {}, 0), std::runtime_error);
  EXPECT_THROW(ops::adamw_step_(p, Tensor::zeros({3}, DType::F64), m, v, {}, 1), std::runtime_error);
}

TEST(GradNorm, GlobalNormAndClipping) {
  Tensor a = Tensor::from_vector(std::vector<float>{3, 0}, {2});
  Tensor b = Tensor::from_vector(std::vector<float>{0, 0, 4}, {3, 1}).to(DType::F64);
  Tensor none;
  const double norm = ops::global_grad_norm({&a, &b, &none, nullptr});
  EXPECT_DOUBLE_EQ(norm, 5.0);
  ops::clip_grads_({&a, &b, &none}, 10.0, norm);  // below the limit: untouched
  EXPECT_EQ(a.item(0), 3.0);
  EXPECT_EQ(b.item(2), 4.0);
  ops::clip_grads_({&a, &b}, 1.0, norm);
  const double c = 1.0 / (5.0 + 1e-6);
  EXPECT_NEAR(a.item(0), 3 * c, 1e-7);
  EXPECT_NEAR(b.item(2), 4 * c, 1e-15);
  EXPECT_NEAR(ops::global_grad_norm({&a, &b}), 1.0, 1e-6);
  const Tensor big = randn({300, 70}, 3);
  EXPECT_NEAR(ops::global_grad_norm({&big}), std::sqrt(ops::sum_squares(big)), 1e-12);
}
