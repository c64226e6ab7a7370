// dsa-racecheck-probe: which shared-memory hand-overs compute-sanitizer's racecheck models, each in a kernel of
// a few lines that is correct by the PTX memory model. The warp-specialized sparse MLA forward
// (sm90_bf16_sparse_attention_fwd_wgmma_ws.cu) hands data over in these ways; racecheck reports hazards on
// them, and a report on a probe here says the report there is the tool's, not the kernel's.
//
//   dsa-racecheck-probe <probe>    (sm_90a; exits 1 when a probe's values are wrong, 0 otherwise)
//   compute-sanitizer --tool racecheck dsa-racecheck-probe <probe>   (what scripts/gpu_check.sh wgmma runs)
//
// Probes (8 CTAs each; "exchange": warpgroups write their half of a buffer, then read the other's half):
//   syncthreads       256 threads, exchange across __syncthreads                    (the control)
//   bar_sync          256 threads, exchange across bar.sync 1, 256 (all the CTA's threads)
//   bar_sync_exit     384 threads, WG 2 returns at once, WG 0 / 1 exchange across bar.sync 1, 256
//   bar_sync_stay     384 threads, WG 2 waits at a 384-thread bar.sync at the end, the same exchange
//   arrive_sync       256 threads, WG 1 writes, bar.arrive 2, 256; WG 0 bar.sync 2, 256, reads
//   arrive_war        256 threads, WG 0 reads, bar.arrive 2, 256; WG 1 bar.sync 2, 256, then overwrites (the
//                     ws forward's sm.mn and P0 hand-backs: the reader arrives, the next writer syncs)
//   mbar_elected      384 threads, WG 2 writes (all lanes), __syncwarp, lane 0 of each warp arrives on an
//                     mbarrier of count 4; WG 0 waits on it and reads
//   mbar_all          the same, every WG 2 thread arrives (count 128)
//   cp_async_mbar     WG 2 cp.async global -> shared, cp.async.mbarrier.arrive + arrive (count 128); WG 0 waits
//                     on the mbarrier and reads
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>
#include <string>

#include "kernels/cuda/mma.cuh"

namespace {

using namespace dsa::cuda;

constexpr int kBlocks = 8;

// The exchange: thread i of WG 0 / 1 writes buf[i], then reads buf[i ^ 128] (the other warpgroup's).
__device__ __forceinline__ void put(int* buf) { buf[threadIdx.x] = 1000 * blockIdx.x + threadIdx.x; }
__device__ __forceinline__ void check(const int* buf, int* bad) {
  const int j = threadIdx.x ^ 128;
  if (buf[j] != 1000 * static_cast<int>(blockIdx.x) + j) atomicAdd(bad, 1);
}

__global__ void syncthreads_kernel(int* bad) {
  __shared__ int buf[256];
  put(buf);
  __syncthreads();
  check(buf, bad);
}
__global__ void bar_sync_kernel(int* bad) {
  __shared__ int buf[256];
  put(buf);
  named_bar_sync(1, 256);
  check(buf, bad);
}
__global__ void bar_sync_exit_kernel(int* bad) {
  __shared__ int buf[256];
  if (threadIdx.x >= 256) return;
  put(buf);
  named_bar_sync(1, 256);
  check(buf, bad);
}
__global__ void bar_sync_stay_kernel(int* bad) {
  __shared__ int buf[256];
  if (threadIdx.x < 256) {
    put(buf);
    named_bar_sync(1, 256);
    check(buf, bad);
  }
  named_bar_sync(2, 384);
}
__global__ void arrive_sync_kernel(int* bad) {
  __shared__ int buf[128];
  if (threadIdx.x >= 128) {
    buf[threadIdx.x - 128] = 1000 * blockIdx.x + threadIdx.x;
    named_bar_arrive(2, 256);
  } else {
    named_bar_sync(2, 256);
    if (buf[threadIdx.x] != 1000 * static_cast<int>(blockIdx.x) + threadIdx.x + 128) atomicAdd(bad, 1);
  }
}
__global__ void arrive_war_kernel(int* bad) {
  __shared__ int buf[128];
  if (threadIdx.x < 128) buf[threadIdx.x] = 7;
  __syncthreads();
  if (threadIdx.x < 128) {
    const int v = buf[threadIdx.x];
    named_bar_arrive(2, 256);
    if (v != 7) atomicAdd(bad, 1);
  } else {
    named_bar_sync(2, 256);
    buf[threadIdx.x - 128] = 1000 * blockIdx.x + threadIdx.x;
  }
}
// WG 2 (threads 256 ..) writes buf[t - 256]; WG 0 (threads 0 .. 127) reads buf[t] after the mbarrier; WG 1 idles.
template <bool kElected>
__global__ void mbar_kernel(int* bad) {
  __shared__ int buf[128];
  __shared__ uint64_t bar;
  if (threadIdx.x == 0) {
    mbar_init(&bar, kElected ? 4 : 128);
    mbar_fence_init();
  }
  __syncthreads();
  if (threadIdx.x >= 256) {
    buf[threadIdx.x - 256] = 1000 * blockIdx.x + threadIdx.x;
    if (kElected) {
      __syncwarp();
      if ((threadIdx.x & 31) == 0) mbar_arrive(&bar);
    } else {
      mbar_arrive(&bar);
    }
  } else if (threadIdx.x < 128) {
    mbar_wait(&bar, 0);
    if (buf[threadIdx.x] != 1000 * static_cast<int>(blockIdx.x) + threadIdx.x + 256) atomicAdd(bad, 1);
  }
}
__global__ void cp_async_mbar_kernel(const int4* src, int* bad) {
  __shared__ int4 buf[128];
  __shared__ uint64_t bar;
  if (threadIdx.x == 0) {
    mbar_init(&bar, 128);
    mbar_fence_init();
  }
  __syncthreads();
  if (threadIdx.x >= 256) {
    const int i = threadIdx.x - 256;
    cp_async16(&buf[i], src + blockIdx.x * 128 + i, 16);
    cp_async_mbar_arrive(&bar);
    mbar_arrive(&bar);
    cp_async_wait<0>();
  } else if (threadIdx.x < 128) {
    mbar_wait(&bar, 0);
    if (buf[threadIdx.x].x != static_cast<int>(blockIdx.x * 128 + threadIdx.x)) atomicAdd(bad, 1);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const char* probes =
      "syncthreads bar_sync bar_sync_exit bar_sync_stay arrive_sync arrive_war mbar_elected mbar_all cp_async_mbar";
  if (argc != 2) {
    std::fprintf(stderr, "usage: dsa-racecheck-probe <probe>   probes: %s\n", probes);
    return 2;
  }
  const std::string what = argv[1];
  int* bad = nullptr;
  int4* src = nullptr;
  cudaMalloc(&bad, sizeof(int));
  cudaMemset(bad, 0, sizeof(int));
  cudaMalloc(&src, kBlocks * 128 * sizeof(int4));
  int4 h[kBlocks * 128];
  for (int i = 0; i < kBlocks * 128; ++i) h[i] = int4{i, 0, 0, 0};
  cudaMemcpy(src, h, sizeof(h), cudaMemcpyHostToDevice);
  if (what == "syncthreads") syncthreads_kernel<<<kBlocks, 256>>>(bad);
  else if (what == "bar_sync") bar_sync_kernel<<<kBlocks, 256>>>(bad);
  else if (what == "bar_sync_exit") bar_sync_exit_kernel<<<kBlocks, 384>>>(bad);
  else if (what == "bar_sync_stay") bar_sync_stay_kernel<<<kBlocks, 384>>>(bad);
  else if (what == "arrive_sync") arrive_sync_kernel<<<kBlocks, 256>>>(bad);
  else if (what == "arrive_war") arrive_war_kernel<<<kBlocks, 256>>>(bad);
  else if (what == "mbar_elected") mbar_kernel<true><<<kBlocks, 384>>>(bad);
  else if (what == "mbar_all") mbar_kernel<false><<<kBlocks, 384>>>(bad);
  else if (what == "cp_async_mbar") cp_async_mbar_kernel<<<kBlocks, 384>>>(src, bad);
  else {
    std::fprintf(stderr, "[dsa-racecheck-probe] unknown probe '%s' (%s)\n", what.c_str(), probes);
    return 2;
  }
  int nbad = -1;
  const cudaError_t e = cudaMemcpy(&nbad, bad, sizeof(int), cudaMemcpyDeviceToHost);
  if (e != cudaSuccess) {
    std::fprintf(stderr, "[dsa-racecheck-probe] %s: %s\n", what.c_str(), cudaGetErrorString(e));
    return 1;
  }
  std::printf("[dsa-racecheck-probe] %s: %d wrong values\n", what.c_str(), nbad);
  return nbad == 0 ? 0 : 1;
}
