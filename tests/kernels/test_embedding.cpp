// Embedding lookup and scatter-add backward: naive reference, repeated ids, finite differences.
#include <gtest/gtest.h>

#include "kernels/ops.h"
#include "tests/test_util.h"

using namespace dsa;
using namespace dsa::testing;

TEST(Embedding, ForwardGathersRows) {
  const Tensor table = randn({11, 13}, 1);
  const Tensor ids = Tensor::from_vector(std::vector<int32_t>{3, 0, 10, 3, 7, 7, 1}, {7});
  const Tensor y = ops::embedding_forward(ids, table);
  ASSERT_EQ(y.shape(), Shape({7, 13}));
  for (int64_t i = 0; i < 7; ++i)
    for (int64_t j = 0; j < 13; ++j) ASSERT_EQ(y.item(i * 13 + j), table.item(ids.item(i) * 13 + j));
  const Tensor ids2 = ids.view({7, 1});
  EXPECT_EQ(ops::embedding_forward(ids2, table).shape(), Shape({7, 1, 13}));
  const Tensor tb = table.to(DType::F32).to(DType::BF16);  // storage dtypes are plain row copies
  const Tensor yb = ops::embedding_forward(ids, tb);
  for (int64_t j = 0; j < 13; ++j) ASSERT_EQ(yb.item(2 * 13 + j), tb.item(10 * 13 + j));
}

TEST(Embedding, BackwardAccumulatesRepeatedIds) {
  Tensor table = randn({11, 130}, 2);  // > 64 columns: several column blocks
  const Tensor ids = randint({57}, 3, 0, 11);
  const Tensor dy = randn({57, 130}, 4);
  const Tensor d0 = randn({11, 130}, 5);
  Tensor dtable = d0.clone();
  ops::embedding_backward(dy, ids, &dtable);
  Tensor want = d0.clone();
  for (int64_t i = 0; i < 57; ++i)
    for (int64_t j = 0; j < 130; ++j) {
      const int64_t f = static_cast<int64_t>(ids.item(i)) * 130 + j;
      want.set_item(f, want.item(f) + dy.item(i * 130 + j));
    }
  EXPECT_TRUE(all_close(dtable, want, 1e-14, 1e-14));
  ops::add_scaled_(dtable, d0, -1.0);
  EXPECT_TRUE(grad_check("embedding dtable", table, dtable, [&] { return dot(ops::embedding_forward(ids, table), dy); }));
}

TEST(Embedding, F32Backward) {
  const Tensor ids = randint({7}, 6, 0, 5);
  const Tensor dy = randn({7, 13}, 7);
  Tensor d64 = Tensor::zeros({5, 13}, DType::F64), d32 = Tensor::zeros({5, 13}, DType::F32);
  ops::embedding_backward(dy, ids, &d64);
  ops::embedding_backward(dy.to(DType::F32), ids, &d32);
  EXPECT_TRUE(all_close(d32, d64, 1e-6, 1e-6));
}

TEST(Embedding, OutOfRangeIdNamesIdAndVocab) {
  const Tensor table = randn({10, 4}, 8);
  for (int bad : {10, -1}) {
    const Tensor ids = Tensor::from_vector(std::vector<int32_t>{1, bad, 2}, {3});
    try {
      ops::embedding_forward(ids, table);
      FAIL() << "no error for id " << bad;
    } catch (const std::runtime_error& e) {
      EXPECT_EQ(std::string(e.what()), "[embedding_forward] token id " + std::to_string(bad) +
                                           " at position 1 is out of range for vocab size 10");
    }
    Tensor dt = Tensor::zeros({10, 4}, DType::F64);
    EXPECT_THROW(ops::embedding_backward(randn({3, 4}, 9), ids, &dt), std::runtime_error);
  }
  EXPECT_THROW(ops::embedding_forward(Tensor::zeros({3}, DType::F32), table), std::runtime_error);
}
