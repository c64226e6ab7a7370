// ParamLayout (model/params.h): a rank's expert slice holds exactly the rows of the whole tensor, with
// the same initial values; external storage leaves the tensors to their owner; the grad provider is
// asked for a gradient only when one is needed; the EP forward reads the rank's slice.
#include <gtest/gtest.h>

#include <cstring>

#include "model/model.h"
#include "model/params.h"
#include "tests/test_util.h"

using namespace dsa;
using dsa::testing::same_bits;


TEST(ParamLayout, ExpertSlicesHoldTheirRowsWithTheWholeTensorsInitialValues) {
  const ModelConfig c = preset_config("tiny");
  ASSERT_GT(c.n_routed_experts, 1);
  ParamStore whole = make_params(c);
  init_params(whole, c, 21);
  const int64_t E = c.n_routed_experts, half = E / 2;
  for (int64_t part = 0; part < 2; ++part) {
    ParamLayout l;
    l.expert_begin = part * half;
    l.expert_end = (part + 1) * half;
    ParamStore ps = make_params(c, DType::F32, Device::CPU, l);
    init_params(ps, c, 21);
    EXPECT_EQ(ps.numel(), whole.numel()) << "numel counts the full tensors";
    for (const Param& p : ps.all()) {
      const Tensor& w = whole[p.name];
      if (is_routed_expert(p.name)) {
        EXPECT_EQ(p.row0, l.expert_begin);
        EXPECT_EQ(p.shape[0], half);
        EXPECT_EQ(p.full_shape, w.shape());
        EXPECT_TRUE(same_bits(p.value, w.slice_rows(l.expert_begin, l.expert_end))) << p.name;
      } else {
        EXPECT_TRUE(same_bits(p.value, w)) << p.name;
      }
    }
  }
}

TEST(ParamLayout, ExternalStorageAndTheGradProvider) {
  const ModelConfig c = preset_config("tiny");
  ParamLayout l;
  l.external_storage = true;
  ParamStore ps = make_params(c, DType::F32, Device::CPU, l);
  int asked = 0;
  for (const Param& p : ps.all()) {
    EXPECT_EQ(p.value.defined(), p.group == ParamGroup::Buffer) << p.name;
    EXPECT_FALSE(p.grad.defined()) << p.name;
  }
  ps.set_grad_provider([&](Param& p) {
    ++asked;
    p.grad = Tensor::zeros(p.shape, DType::F32);
  });
  Tensor& g = ps.grad("model.norm.weight");
  EXPECT_TRUE(g.defined());
  ps.grad("model.norm.weight");
  EXPECT_EQ(asked, 1) << "a defined gradient is not asked for again";
}

TEST(ParamLayout, ExpertSliceWithoutExpertParallelismIsRefused) {
  ModelConfig c = preset_config("tiny");
  ParamLayout l;
  l.expert_begin = 0;
  l.expert_end = c.n_routed_experts + 1;
  try {
    make_params(c, DType::F32, Device::CPU, l);
    FAIL() << "an expert range beyond the experts must be refused";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("outside the"), std::string::npos) << e.what();
  }
}
