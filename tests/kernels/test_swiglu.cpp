// SwiGLU: forward against the naive formula, gradients by finite differences, f32 against f64.
#include <gtest/gtest.h>

#include <cmath>

#include "kernels/ops.h"
#include "tests/test_util.h"

using namespace dsa;
using namespace dsa::testing;

TEST(SwiGlu, ForwardMatchesNaive) {
  const Tensor gate = randn({7, 13}, 1, 3.0), up = randn({7, 13}, 2);
  const Tensor y = ops::swiglu_forward(gate, up);
  Tensor want = Tensor::empty({7, 13}, DType::F64);
  for (int64_t i = 0; i < y.numel(); ++i) {
    const double g = gate.item(i);
    want.set_item(i, g / (1 + std::exp(-g)) * up.item(i));
  }
  EXPECT_TRUE(all_close(y, want, 1e-14, 1e-15));
}

TEST(SwiGlu, GradientsMatchFiniteDifferencesIntoPoisonedOutputs) {
  Tensor gate = randn({7, 13}, 3, 2.0), up = randn({7, 13}, 4);
  const Tensor dy = randn({7, 13}, 5);
  Tensor dgate = Tensor::empty({7, 13}, DType::F64), dup = Tensor::empty({7, 13}, DType::F64);
  poison(dgate);
  poison(dup);
  const Tensor dgate_storage = dgate;
  ops::swiglu_backward(dy, gate, up, &dgate, &dup);
  EXPECT_TRUE(dgate.same_storage(dgate_storage)) << "a defined output is written in place";
  auto loss = [&] { return dot(ops::swiglu_forward(gate, up), dy); };
  EXPECT_TRUE(grad_check("swiglu dgate", gate, dgate, loss, 1e-6, 1e-7, 1e-9));
  EXPECT_TRUE(grad_check("swiglu dup", up, dup, loss, 1e-6, 1e-7, 1e-9));
  Tensor only_up;
  ops::swiglu_backward(dy, gate, up, nullptr, &only_up);
  EXPECT_TRUE(all_close(only_up, dup, 0, 1e-300));
}

TEST(SwiGlu, F32MatchesF64) {
  const Tensor gate = randn({300, 67}, 6, 2.0), up = randn({300, 67}, 7), dy = randn({300, 67}, 8);
  const Tensor y = ops::swiglu_forward(gate, up);
  const Tensor yf = ops::swiglu_forward(gate.to(DType::F32), up.to(DType::F32));
  EXPECT_TRUE(all_close(yf, y, 1e-6, 1e-6));
  Tensor dg, du, dgf, duf;
  ops::swiglu_backward(dy, gate, up, &dg, &du);
  ops::swiglu_backward(dy.to(DType::F32), gate.to(DType::F32), up.to(DType::F32), &dgf, &duf);
  EXPECT_TRUE(all_close(dgf, dg, 1e-5, 1e-6));
  EXPECT_TRUE(all_close(duf, du, 1e-5, 1e-6));
}

TEST(SwiGlu, ShapeErrors) {
  try {
    ops::swiglu_forward(randn({7, 13}, 1), randn({7, 12}, 2));
    FAIL() << "no error";
  } catch (const std::runtime_error& e) {
    EXPECT_EQ(std::string(e.what()).rfind("[swiglu] up must have gate's shape", 0), 0u) << e.what();
  }
  Tensor wrong = Tensor::empty({7, 12}, DType::F64);
  EXPECT_THROW(ops::swiglu_backward(randn({7, 13}, 3), randn({7, 13}, 1), randn({7, 13}, 2), &wrong, nullptr),
               std::runtime_error);
}
