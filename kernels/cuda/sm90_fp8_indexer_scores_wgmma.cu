// Lightning-indexer scoring on Hopper's warpgroup MMA (wgmma, sm_90a): FP8 e4m3 operands with one scale
// block per row (D <= 128), ReLU, head weights and the head sum fused into the epilogue. The mma.sync
// kernel in sm90_fp8_indexer.cu stays the fallback (other head counts and dims, bf16, several scale
// blocks, no sm_90a code) and computes the same scores; both are tested against the CPU reference.
#include <cuda_fp8.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "kernels/cuda/dsa_common.cuh"
#include "kernels/cuda/mma.cuh"

namespace dsa::cuda {
namespace dsa_detail {
namespace {

struct WgScoreParams {
  const uint8_t* q;        // [B, T, Hi, D] e4m3 codes
  const uint8_t* k;        // [B, T, D] e4m3 codes
  const float* q_scale;    // [B, T, Hi] (one scale block per row)
  const float* k_scale;    // [B, T]
  const __nv_bfloat16* w;  // [B, T, Hi]
  float* out;              // [B, R, T] f32: rows t0 .. t0 + R - 1, entries s <= t written
  float c;                 // D^-0.5
  int B, T, t0, R;
};

constexpr int kWgThreads = 256;  // two consumer warpgroups
constexpr int kWgCols = 512;     // query-head columns per CTA: 256 per warpgroup, two wgmma halves of 128
constexpr int kWgKeys = 64;      // keys per tile: the wgmma M
constexpr int kWgStages = 3;     // key tiles in flight (cp.async ring)

// Shared-memory byte offset of 16-byte chunk `ch` of row `row` in a no-swizzle K-major tile of D-byte rows:
// 8-row x 16-byte core matrices, K-adjacent ones 128 bytes apart (lbo), M-adjacent ones 8 D apart (sbo).
template <int D>
__device__ __forceinline__ int core_offset(int row, int ch) {
  return ((row >> 3) * (D / 16) + ch) * 128 + (row & 7) * 16;
}

// NOTES: keys are M (64 per tile, the accumulator rows) and query-heads are N, as in the mma.sync kernel:
// a thread's accumulator holds 2 keys x 32 head columns per half, so the head sum is in-thread adds and a
// quad reduce-scatter (each lane ends with a quarter of the (query, key) sums to store). A CTA holds
// 512 / HI queries (all their heads) and streams the causal key prefix once for all of them; each
// warpgroup issues its two halves as two wgmma groups and runs the first half's epilogue while the
// second half's MMAs run. Key tiles come through a 3-stage cp.async ring; row blocks run longest first.
// The two warpgroups share the key tiles (tried: one warpgroup per CTA at three CTAs per SM, each CTA
// reading the keys for half as many queries, was slower).
template <int HI, int D>
__global__ void __launch_bounds__(kWgThreads, 1) score_wgmma_kernel(WgScoreParams p) {
  constexpr int QB = kWgCols / HI;   // queries per CTA
  constexpr int QW = QB / 2;         // per warpgroup
  constexpr int QH = 128 / HI;       // per half
  constexpr int NJ = HI / 8;         // n8 column groups per query
  constexpr int KS = D / 32;         // wgmma k steps
  constexpr int CH = D / 16;         // 16-byte chunks per row
  constexpr int NV = 2 * QH;         // (query, key row) sums per thread before the quad reduce-scatter
  static_assert(NV >= 4 && NV % 4 == 0, "HI must be 16, 32 or 64");
  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* Qs = smem;                                            // [512 rows, D] core-matrix layout
  uint8_t* Ks = Qs + kWgCols * D;                                // [kWgStages][64 rows, D]
  float* weff = reinterpret_cast<float*>(Ks + kWgStages * kWgKeys * D);  // [512] w * c * q scale / 2
  float* ksc = weff + kWgCols;                                   // [kWgStages][64] key scales
  const int b = blockIdx.y, tid = threadIdx.x, lane = tid & 31, wg = tid >> 7, wwarp = (tid >> 5) & 3;
  const int g = lane >> 2, c4 = lane & 3;
  const int r0 = (gridDim.x - 1 - blockIdx.x) * QB;  // first row (relative to t0); longest blocks first
  const int nq = min(QB, p.R - r0);
  const int tmax = p.t0 + r0 + nq - 1;
  // This CTA's share of the causal key prefix: tiles [ib, ie) of the block's tmax / 64 + 1 (gridDim.z splits).
  const int ntiles = tmax / kWgKeys + 1;
  const int ib = static_cast<int>(static_cast<int64_t>(ntiles) * blockIdx.z / gridDim.z);
  const int ie = static_cast<int>(static_cast<int64_t>(ntiles) * (blockIdx.z + 1) / gridDim.z);
  if (ib >= ie) return;  // the whole CTA, before any copy or barrier
  const int64_t tok0 = static_cast<int64_t>(b) * p.T + p.t0 + r0;

  auto load_keys = [&](int stage, int s0) {
    uint8_t* Kd = Ks + stage * kWgKeys * D;
    for (int i = tid; i < kWgKeys * CH; i += kWgThreads) {
      const int row = i / CH, ch = i % CH, s = s0 + row;
      const bool ok = s < p.T;
      cp_async16(Kd + core_offset<D>(row, ch), p.k + (static_cast<int64_t>(b) * p.T + (ok ? s : 0)) * D + ch * 16,
                 ok ? 16 : 0);
    }
    for (int i = tid; i < kWgKeys; i += kWgThreads) {
      const int s = s0 + i;
      if (s < p.T) cp_async4(ksc + stage * kWgKeys + i, p.k_scale + static_cast<int64_t>(b) * p.T + s);
      else ksc[stage * kWgKeys + i] = 0.f;
    }
  };
  // Prologue: the query block (rows past the end are zero) with key tile ib, then key tile ib + 1.
  for (int i = tid; i < kWgCols * CH; i += kWgThreads) {
    const int row = i / CH, ch = i % CH, qi = row / HI;
    const bool ok = qi < nq;
    cp_async16(Qs + core_offset<D>(row, ch), p.q + ((ok ? tok0 : 0) * HI + (ok ? row : 0)) * D + ch * 16, ok ? 16 : 0);
  }
  for (int i = tid; i < kWgCols; i += kWgThreads) {
    const int qi = i / HI;
    weff[i] = qi < nq ? __bfloat162float(p.w[tok0 * HI + i]) * p.c * p.q_scale[tok0 * HI + i] * 0.5f : 0.f;
  }
  load_keys(0, ib * kWgKeys);
  cp_async_commit();
  if (ib + 1 < ie) load_keys(1, (ib + 1) * kWgKeys);
  cp_async_commit();

  // This warpgroup's queries: local rows wg * QW .. wg * QW + QW - 1 (fewer at the last block).
  const int wq_end = min(nq, (wg + 1) * QW);
  const int t_last = p.t0 + r0 + wq_end - 1;  // the warpgroup's last query
  const uint8_t* Qw = Qs + wg * 256 * D;
  float acc[2][64];
  // This thread's head weights (columns 8 j + 2 c4 and + 1 of each half, 64 floats) stay in registers for the
  // whole key stream.
  // NOTES: read from shared memory they cost one LDS.64 per head group, half and tile; in registers the
  // top-k ran ~3% faster (docs/perf_log.md v14, H100) at 235 registers without spills (-Xptxas -v).
  float wr[2][2 * QH * NJ];
  __syncthreads();  // weff written
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int j = 0; j < QH * NJ; ++j) {
      const float2 wv = *reinterpret_cast<const float2*>(weff + wg * 256 + h * 128 + 8 * j + 2 * c4);
      wr[h][2 * j] = wv.x;
      wr[h][2 * j + 1] = wv.y;
    }
  for (int it = ib; it < ie; ++it) {
    const int stage = (it - ib) % kWgStages, s0 = it * kWgKeys;
    cp_async_wait<1>();  // tile it has landed (tile it + 1 may still be in flight)
    fence_proxy_async();
    __syncthreads();     // every thread's copies visible; every warpgroup done with tile it - 1's stage
    if (it + 2 < ie) load_keys((it - ib + 2) % kWgStages, s0 + 2 * kWgKeys);
    cp_async_commit();
    if (wq_end <= wg * QW || s0 > t_last) continue;  // no queries here, or the tile is in their future
    const uint8_t* Kt = Ks + stage * kWgKeys * D;
    wgmma_fence_operand(acc[0]);
    wgmma_fence_operand(acc[1]);
    wgmma_fence();
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int ks = 0; ks < KS; ++ks)
        wgmma_m64n128k32_e4m3(acc[h], wgmma_desc(Kt + ks * 256, 128, 8 * D),
                              wgmma_desc(Qw + h * 128 * D + ks * 256, 128, 8 * D), ks > 0);
      wgmma_commit();
    }
    const float* kscale = ksc + stage * kWgKeys;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (h == 0) wgmma_wait<1>();
      else wgmma_wait<0>();
      wgmma_fence_operand(acc[h]);
      // relu(z * sq * sk) * w = relu(z) * (w * c * sq) * sk: per query, per key row g and g + 8.
      // NOTES: relu(z) = (z + |z|) / 2 with the 1/2 in weff: one FADD (|z| is an operand modifier) on the
      // FMA pipe instead of an FMNMX on the half-rate ALU pipe, the busiest one (ncu, 41%). Exact: z + |z| is
      // 2z or +0, and (2z) (w/2) is the same product.
      float v[NV];
#pragma unroll
      for (int qh = 0; qh < QH; ++qh) {
        float a0 = 0.f, a1 = 0.f;
#pragma unroll
        for (int jj = 0; jj < NJ; ++jj) {
          const int j = qh * NJ + jj;
          const float* z = acc[h] + 4 * j;
          const float wx = wr[h][2 * j], wy = wr[h][2 * j + 1];
          a0 += (z[0] + fabsf(z[0])) * wx + (z[1] + fabsf(z[1])) * wy;
          a1 += (z[2] + fabsf(z[2])) * wx + (z[3] + fabsf(z[3])) * wy;
        }
        v[2 * qh] = a0;
        v[2 * qh + 1] = a1;
      }
      float x[NV / 4];
      quad_reduce_scatter<NV>(v, x, c4);
#pragma unroll
      for (int i = 0; i < NV / 4; ++i) {
        const int e = (c4 >> 1) * (NV / 2) + (c4 & 1) * (NV / 4) + i;
        const int qi = wg * QW + h * QH + e / 2;  // local query
        const int key = wwarp * 16 + g + 8 * (e & 1), s = s0 + key, t = p.t0 + r0 + qi;
        if (qi < nq && s <= t) p.out[(static_cast<int64_t>(b) * p.R + r0 + qi) * p.T + s] = x[i] * kscale[key];
      }
    }
  }
}

__global__ void wgmma_probe_kernel(int* out) { *out = DSA_WGMMA_ENABLED; }

}  // namespace

bool wgmma_available() {
  static const bool ok = [] {
    int dev = 0, major = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess)
      return false;
    if (major != 9) return false;
    int* d = nullptr;
    int h = 0;
    if (cudaMalloc(&d, sizeof(int)) != cudaSuccess) return false;
    wgmma_probe_kernel<<<1, 1>>>(d);
    const bool copied = cudaMemcpy(&h, d, sizeof(int), cudaMemcpyDeviceToHost) == cudaSuccess;
    cudaFree(d);
    return copied && h == 1;
  }();
  return ok;
}

bool launch_scores_wgmma(const ScoreOperands& o, const Tensor& w_I, int B, int T, int Hi, int D, int t0, int R,
                         float* out) {
  // NOTES: DSA_INDEXER_WGMMA=0 keeps the mma.sync kernel (the benchmark's before/after, and a way round a
  // driver that refuses the sm_90a code); unset, empty or 1 takes this one; another value is refused.
  const char* e = std::getenv("DSA_INDEXER_WGMMA");
  const bool enabled = !e || !*e || std::strcmp(e, "1") == 0;
  DSA_CHECK(enabled || std::strcmp(e, "0") == 0, "[indexer_scores] DSA_INDEXER_WGMMA must be 0, 1 or unset, got '", e,
            "'");
  if (!enabled || !o.fp8 || !(Hi == 16 || Hi == 32 || Hi == 64) || !(D == 64 || D == 128)) return false;
  const auto aligned = [](const void* ptr, uintptr_t a) { return reinterpret_cast<uintptr_t>(ptr) % a == 0; };
  if (!aligned(o.q.raw(), 16) || !aligned(o.k.raw(), 16) || !wgmma_available()) return false;
  WgScoreParams p{};
  p.q = static_cast<const uint8_t*>(o.q.raw());
  p.k = static_cast<const uint8_t*>(o.k.raw());
  p.q_scale = o.q_scale.data<float>();
  p.k_scale = o.k_scale.data<float>();
  p.w = reinterpret_cast<const __nv_bfloat16*>(w_I.data<bf16>());
  p.out = out;
  p.c = 1.0f / std::sqrt(static_cast<float>(D));
  p.B = B; p.T = T; p.t0 = t0; p.R = R;
  const int QB = kWgCols / Hi;
  const size_t smem = static_cast<size_t>(kWgCols + kWgStages * kWgKeys) * D + sizeof(float) * (kWgCols + kWgStages * kWgKeys);
  // NOTES: where the query blocks alone leave SMs idle, the key prefix splits over gridDim.z (each split
  // writes its own keys' scores: no reduction). Long rows stream in small row blocks (the 256 MiB score
  // budget holds 512 rows at T = 128K: 16 CTAs at Hi = 16), which one CTA per query block left on 16 of
  // 132 SMs. Two waves of CTAs, and at least two key tiles per split.
  const int ctas = static_cast<int>(ceil_div(R, QB)) * B, want = 2 * sm_count(), tiles = (t0 + R - 1) / kWgKeys + 1;
  const int splits = ctas >= want ? 1 : std::max(1, std::min(static_cast<int>(ceil_div(want, ctas)), tiles / 2));
  dim3 grid(static_cast<unsigned>(ceil_div(R, QB)), static_cast<unsigned>(B), static_cast<unsigned>(splits));
  auto launch = [&](auto kernel) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    kernel<<<grid, kWgThreads, smem, stream()>>>(p);
  };
  if (D == 64) {
    if (Hi == 16) launch(score_wgmma_kernel<16, 64>);
    else if (Hi == 32) launch(score_wgmma_kernel<32, 64>);
    else launch(score_wgmma_kernel<64, 64>);
  } else {
    if (Hi == 16) launch(score_wgmma_kernel<16, 128>);
    else if (Hi == 32) launch(score_wgmma_kernel<32, 128>);
    else launch(score_wgmma_kernel<64, 128>);
  }
  check_launch("indexer_scores_wgmma");
  return true;
}

}  // namespace dsa_detail
}  // namespace dsa::cuda
