// dsa-wgmma-rate: the FP8 wgmma issue pattern of the indexer's scoring kernel alone (no copies, barriers or
// epilogue), on zeroed shared memory, to say which shapes and layouts the tensor cores sustain: m64n64 (the
// 64-head kernel: A = a 64-key tile shared by the CTA, B = one query's 64 heads) and m64n128 (the 16 / 32-head
// kernel), each with the no-swizzle core-matrix layout the kernels use and with the 128-byte swizzle
// (cuBLASLt's and DeepGEMM's), A from shared memory or from registers. Per warpgroup and iteration: two
// accumulators, D / 32 = 4 k steps each, two commit groups, wait 1, wait 0: as score_wgmma4_kernel per tile.
//
//   dsa-wgmma-rate [iters]     (sm_90a only; prints FLOP per cycle and SM against the dense FP8 peak 8192)
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "kernels/cuda/mma.cuh"

namespace {

using namespace dsa::cuda;

constexpr int kD = 128;  // bytes per row: the indexer's head dim in e4m3

// N: the wgmma N (64 or 128); SWZ: 128-byte swizzle; RS: A from registers (N = 64 only).
template <int N, bool SWZ, bool RS>
__global__ void __launch_bounds__(N == 64 ? 512 : 384, 1) rate_kernel(int iters, float* out, long long* cycles) {
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);  // swizzle atoms 1024-aligned
  uint8_t* As = smem;            // [64 rows, D]: the key tile, shared by the warpgroups
  uint8_t* Bs = smem + 64 * kD;  // [warpgroup][2][N rows, D]: each warpgroup's two queries
  const int nwg = blockDim.x / 128;
  const int smem_bytes = 64 * kD + nwg * 2 * N * kD;
  for (int i = threadIdx.x * 16; i < smem_bytes; i += blockDim.x * 16) *reinterpret_cast<uint4*>(smem + i) = uint4{};
  fence_proxy_async();
  __syncthreads();
  const int wg = __shfl_sync(0xffffffffu, threadIdx.x >> 7, 0);
  // k step stride: no swizzle, two 16-byte core matrices 128 bytes apart (lbo) = 256; swizzled, 32 bytes in the row.
  constexpr int kstep = SWZ ? 32 : 256;
  const uint64_t adesc = SWZ ? wgmma_desc_swizzle<128>(As) : wgmma_desc(As, 128, 8 * kD);
  uint8_t* const Bw = Bs + wg * 2 * N * kD;
  const uint64_t bdesc = SWZ ? wgmma_desc_swizzle<128>(Bw) : wgmma_desc(Bw, 128, 8 * kD);
  float acc[2][N / 2];
#pragma unroll
  for (int q = 0; q < 2; ++q)
#pragma unroll
    for (int i = 0; i < N / 2; ++i) acc[q][i] = 0.f;
  uint32_t areg[kD / 32][4] = {};
  const long long c0 = clock64();
  for (int it = 0; it < iters; ++it) {
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      wgmma_fence_operand(acc[q]);
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kD / 32; ++ks) {
        const uint64_t bk = bdesc + static_cast<uint64_t>((q * N * kD + ks * kstep) >> 4);
        if constexpr (RS) {
          wgmma_m64n64k32_e4m3_rs(acc[q], areg[ks], bk, 1);
        } else if constexpr (N == 64) {
          wgmma_m64n64k32_e4m3(acc[q], adesc + static_cast<uint64_t>((ks * kstep) >> 4), bk, 1);
        } else {
          wgmma_m64n128k32_e4m3(acc[q], adesc + static_cast<uint64_t>((ks * kstep) >> 4), bk, 1);
        }
      }
      wgmma_commit();
    }
    wgmma_wait<1>();
    wgmma_fence_operand(acc[0]);
    wgmma_wait<0>();
    wgmma_fence_operand(acc[1]);
  }
  const long long c1 = clock64();
  float s = 0.f;
#pragma unroll
  for (int q = 0; q < 2; ++q)
#pragma unroll
    for (int i = 0; i < N / 2; ++i) s += acc[q][i];
  out[blockIdx.x * blockDim.x + threadIdx.x] = s;
  if (threadIdx.x == 0) cycles[blockIdx.x] = c1 - c0;
}

#define RATE_CHECK(x)                                                                          \
  do {                                                                                         \
    const cudaError_t e_ = (x);                                                                \
    if (e_ != cudaSuccess) {                                                                   \
      std::fprintf(stderr, "[dsa-wgmma-rate] %s: %s\n", #x, cudaGetErrorString(e_));          \
      std::exit(1);                                                                            \
    }                                                                                          \
  } while (0)

template <int N, bool SWZ, bool RS>
void run(const char* name, int nwg, int iters, int sms) {
  const auto kernel = rate_kernel<N, SWZ, RS>;
  const int smem = 1024 + 64 * kD + nwg * 2 * N * kD, threads = 128 * nwg;
  RATE_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  float* out = nullptr;
  long long* cyc = nullptr;
  RATE_CHECK(cudaMalloc(&out, sizeof(float) * sms * threads));
  RATE_CHECK(cudaMalloc(&cyc, sizeof(long long) * sms));
  cudaEvent_t e0, e1;
  RATE_CHECK(cudaEventCreate(&e0));
  RATE_CHECK(cudaEventCreate(&e1));
  kernel<<<sms, threads, smem>>>(iters / 8, out, cyc);  // warm-up
  RATE_CHECK(cudaGetLastError());
  std::vector<float> ms;
  std::vector<long long> c(sms);
  for (int r = 0; r < 5; ++r) {
    RATE_CHECK(cudaEventRecord(e0));
    kernel<<<sms, threads, smem>>>(iters, out, cyc);
    RATE_CHECK(cudaEventRecord(e1));
    RATE_CHECK(cudaEventSynchronize(e1));
    float t = 0.f;
    RATE_CHECK(cudaEventElapsedTime(&t, e0, e1));
    ms.push_back(t);
  }
  RATE_CHECK(cudaMemcpy(c.data(), cyc, sizeof(long long) * sms, cudaMemcpyDeviceToHost));
  std::sort(ms.begin(), ms.end());
  std::sort(c.begin(), c.end());
  const double flop_cta_iter = double(nwg) * 2 * (kD / 32) * 64.0 * N * 32 * 2;  // per CTA and iteration
  const double tflops = flop_cta_iter * iters * sms / (ms[2] * 1e-3) / 1e12;
  const double per_cycle = flop_cta_iter * iters / double(c[sms / 2]);
  std::printf("%-34s wg %d  %7.1f TFLOP/s  %6.0f FLOP/cycle/SM (%4.0f%% of 8192)  %6.0f cycles/iter\n", name, nwg,
              tflops, per_cycle, 100.0 * per_cycle / 8192, double(c[sms / 2]) / iters);
  cudaFree(out);
  cudaFree(cyc);
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
}

}  // namespace

int main(int argc, char** argv) {
  const int iters = argc > 1 ? std::atoi(argv[1]) : 20000;
  int dev = 0, major = 0, sms = 0;
  RATE_CHECK(cudaGetDevice(&dev));
  RATE_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  RATE_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  if (major != 9 || iters < 8) {
    std::fprintf(stderr, "[dsa-wgmma-rate] needs an sm_90 GPU (got major %d) and iters >= 8 (got %d)\n", major, iters);
    return 1;
  }
  std::printf("e4m3 wgmma, D = 128, 2 accumulators a warpgroup, %d iterations, one CTA per SM (%d)\n", iters, sms);
  for (int wg : {1, 2, 4}) run<64, false, false>("m64n64k32 SS no-swizzle", wg, iters, sms);
  run<64, true, false>("m64n64k32 SS swizzle-128B", 4, iters, sms);
  run<64, true, false>("m64n64k32 SS swizzle-128B", 2, iters, sms);
  run<64, false, true>("m64n64k32 RS (B no-swizzle)", 4, iters, sms);
  run<64, true, true>("m64n64k32 RS (B swizzle-128B)", 4, iters, sms);
  for (int wg : {1, 2}) run<128, false, false>("m64n128k32 SS no-swizzle", wg, iters, sms);
  run<128, true, false>("m64n128k32 SS swizzle-128B", 2, iters, sms);
  run<128, true, false>("m64n128k32 SS swizzle-128B", 3, iters, sms);
  return 0;
}
