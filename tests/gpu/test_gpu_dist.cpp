// Data parallelism over NCCL on two GPUs (skipped with fewer): `mpirun -np 2 dsa-train` with device
// cuda against one GPU on the same global batch, and a killed rank ending the job within the bound.
#include <gtest/gtest.h>

#include "kernels/device_memory.h"
#include "tests/dist/dist_util.h"

using namespace dsa;
using namespace dsa::dist_testing;

namespace {

int gpu_count() { return cuda::device_count(); }

#define DSA_REQUIRE_TWO_GPUS()                                          \
  do {                                                                  \
    if (gpu_count() < 2) GTEST_SKIP() << "needs 2 GPUs, found " << gpu_count(); \
  } while (0)

}  // namespace

TEST(GpuDist, TwoGpuDataParallelEqualsOneGpu) {
  DSA_REQUIRE_TWO_GPUS();
  std::string worst, log2;
  const double d = one_vs_two_ranks("gpu", 6, "cuda", "", {"dense"}, "", &worst, &log2);
  EXPECT_NE(log2.find("2 ranks"), std::string::npos) << log2;
  // bf16 activations: the two runs sum the same gradients in another order.
  EXPECT_LT(d, 2e-3) << worst;
  std::printf("[gpu dist] 2 GPUs (NCCL) vs 1: max relative parameter difference %.3g (%s)\n", d, worst.c_str());
}

// The three DSA stages over NCCL: the sparse stage's indexer gradients (from the KL in the layer
// backward) must be ready before each layer's all-reduce starts.
TEST(GpuDist, TwoGpuDataParallelEqualsOneGpuThroughTheDsaStages) {
  DSA_REQUIRE_TWO_GPUS();
  std::string worst, log2;
  const double d = one_vs_two_ranks("gpu_dsa", 0, "cuda", dsa_stages(3), {"dense", "warmup", "sparse"}, "", &worst, &log2);
  EXPECT_NE(log2.find("stage sparse done"), std::string::npos) << log2;
  EXPECT_LT(d, 2e-3) << worst;
  std::printf("[gpu dist] 2 GPUs vs 1 through dense, warm-up, sparse: max relative parameter difference %.3g (%s)\n",
              d, worst.c_str());
}

TEST(GpuDist, KilledRankEndsTheJob) {
  DSA_REQUIRE_TWO_GPUS();
  const std::string r = write_recipe("gpu_kill", 20, "cuda");
  RunResult res = run(kMpi + " -x DSA_FAIL_AT_STEP=3 -x DSA_FAIL_RANK=1 " + train(r), temp("gpu_kill") + "/log.txt", 120);
  EXPECT_NE(res.code, 0) << res.log;
  EXPECT_LT(res.seconds, 90) << res.log;
  EXPECT_NE(res.log.find("rank 1"), std::string::npos) << res.log;
}

TEST(GpuDist, ExpertParallelOverNcclEqualsOneGpu) {
  DSA_REQUIRE_TWO_GPUS();
  std::string worst, log2;
  const double d = one_vs_two_ranks("gpu_ep", 6, "cuda", "", {"dense"}, "parallelism.ep=2", &worst, &log2);
  EXPECT_NE(log2.find("expert groups of 2"), std::string::npos) << log2;
  EXPECT_LT(d, 2e-3) << worst;
  std::printf("[gpu dist] ep=2 over NCCL vs 1 GPU: max relative parameter difference %.3g (%s)\n", d, worst.c_str());
}
