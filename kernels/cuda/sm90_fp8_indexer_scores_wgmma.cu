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

// The tiles (key tiles and the query block) are K-major rows of D bytes in the swizzled layout (mma.cuh
// swizzle_offset / wgmma_desc_swizzle: the 128-byte swizzle at D = 128, the 64-byte one at D = 64),
// 1024-byte aligned; a wgmma k step (32 bytes of K) starts 32 bytes further into the rows.
// NOTES: measured against the no-swizzle core-matrix layout (docs/perf_log.md v18, one H100, same call): the
// top-k at T = 32K 13.59 / 13.76 -> 13.40 / 13.49 ms, at 8K 1.183 -> 1.160; the wgmma pattern alone runs at
// the FP8 peak in either layout (dsa-wgmma-rate), so the gain is not the MMA rate's.
constexpr int kKStepBytes = 32;
__device__ __forceinline__ uint8_t* aligned_smem(uint8_t* raw) {  // the launch adds 1024 bytes of slack
  return raw + ((1024 - (smem_u32(raw) & 1023)) & 1023);
}

// The epilogue: relu(z * sq * sk) * w = relu(z) * (w * c * sq) * sk summed over the heads, per query and key
// row g and g + 8, then the quad reduce-scatter and the stores of this thread's quarter.
// NOTES: relu(z) = (z + |z|) / 2 with the 1/2 in weff: one FADD (|z| is an operand modifier) on the FMA pipe
// instead of an FMNMX on the half-rate ALU pipe, the busiest one (ncu, 41%). Exact: z + |z| is 2z or +0, and
// (2z) (w/2) is the same product. KFMA writes the head sum as an explicit fmaf chain (two instructions a
// product); the expression form compiled to five a pair of products (docs/perf_log.md v14).
// query_sum: one query's head sum over NJ n8 column groups of an accumulator (z: 4 NJ floats, w: 2 NJ
// weights), a0 for key row g, a1 for g + 8 (times sk still to come).
template <int NJ, bool KFMA>
__device__ __forceinline__ void query_sum(const float* z, const float* w, float& a0, float& a1) {
  a0 = 0.f;
  a1 = 0.f;
#pragma unroll
  for (int j = 0; j < NJ; ++j, z += 4) {
    const float wx = w[2 * j], wy = w[2 * j + 1];
    if constexpr (KFMA) {
      a0 = fmaf(z[0] + fabsf(z[0]), wx, a0);
      a0 = fmaf(z[1] + fabsf(z[1]), wy, a0);
      a1 = fmaf(z[2] + fabsf(z[2]), wx, a1);
      a1 = fmaf(z[3] + fabsf(z[3]), wy, a1);
    } else {
      a0 += (z[0] + fabsf(z[0])) * wx + (z[1] + fabsf(z[1])) * wy;
      a1 += (z[2] + fabsf(z[2])) * wx + (z[3] + fabsf(z[3])) * wy;
    }
  }
}
// head_sum: the 128 / HI queries of a 128-column half, reduce-scattered over the quad.
template <int HI, bool KFMA>
__device__ __forceinline__ void head_sum(const float (&acc)[64], const float (&w)[2 * (128 / HI) * (HI / 8)],
                                         float (&x)[2 * (128 / HI) / 4], int c4) {
  constexpr int QH = 128 / HI, NJ = HI / 8, NV = 2 * QH;
  float v[NV];
#pragma unroll
  for (int qh = 0; qh < QH; ++qh) query_sum<NJ, KFMA>(acc + 4 * NJ * qh, w + 2 * NJ * qh, v[2 * qh], v[2 * qh + 1]);
  quad_reduce_scatter<NV>(v, x, c4);
}
// The i-th of this thread's NV / 4 sums after the reduce-scatter: (query qbase + e / 2, key row of the tile).
template <int NV>
__device__ __forceinline__ int sum_slot(int c4, int i) { return (c4 >> 1) * (NV / 2) + (c4 & 1) * (NV / 4) + i; }

template <int HI, bool KFMA>
__device__ __forceinline__ void score_epilogue(const float (&acc)[64], const float (&w)[2 * (128 / HI) * (HI / 8)],
                                               const WgScoreParams& p, const float* kscale, int b, int r0, int nq,
                                               int qbase, int key_lo, int s0, int c4) {
  constexpr int NV = 2 * (128 / HI);
  float x[NV / 4];
  head_sum<HI, KFMA>(acc, w, x, c4);
#pragma unroll
  for (int i = 0; i < NV / 4; ++i) {
    const int e = sum_slot<NV>(c4, i);
    const int qi = qbase + e / 2;  // local query
    const int key = key_lo + 8 * (e & 1), s = s0 + key, t = p.t0 + r0 + qi;
    if (qi < nq && s <= t) p.out[(static_cast<int64_t>(b) * p.R + r0 + qi) * p.T + s] = x[i] * kscale[key];
  }
}

// NOTES: keys are M (64 per tile, the accumulator rows) and query-heads are N, as in the mma.sync kernel:
// a thread's accumulator holds 2 keys x 32 head columns per half, so the head sum is in-thread adds and a
// quad reduce-scatter (each lane ends with a quarter of the (query, key) sums to store). A CTA holds
// 512 / HI queries (all their heads) and streams the causal key prefix once for all of them. Key tiles
// come through a cp.async ring; row blocks run longest first. The two warpgroups share the key tiles
// (tried: one warpgroup per CTA at three CTAs per SM, each CTA reading the keys for half as many queries,
// was slower).
// 16 and 32 heads: both halves of a warpgroup issue together after the tile's barrier, then their epilogues
// run in turn. 64 heads take score_wgmma4_kernel below (docs/perf_log.md v15-v17 for the forms tried).
template <int HI, int D>
__global__ void __launch_bounds__(kWgThreads, 1) score_wgmma_kernel(WgScoreParams p) {
  constexpr int QB = kWgCols / HI;   // queries per CTA
  constexpr int QW = QB / 2;         // per warpgroup
  constexpr int QH = 128 / HI;       // per half
  constexpr int NJ = HI / 8;         // n8 column groups per query
  constexpr int KS = D / 32;         // wgmma k steps
  constexpr int CH = D / 16;         // 16-byte chunks per row
  constexpr int ST = 3;              // key-tile stages
  static_assert(HI == 16 || HI == 32, "score_wgmma_kernel: HI must be 16 or 32 (64: score_wgmma4_kernel)");
  extern __shared__ __align__(128) uint8_t smem_raw[];
  uint8_t* const smem = aligned_smem(smem_raw);
  uint8_t* Qs = smem;                                            // [512 rows, D] swizzled rows
  uint8_t* Ks = Qs + kWgCols * D;                                // [ST][64 rows, D]
  float* weff = reinterpret_cast<float*>(Ks + ST * kWgKeys * D);  // [512] w * c * q scale / 2
  float* ksc = weff + kWgCols;                                   // [ST][64] key scales
  const int b = blockIdx.y, tid = threadIdx.x, lane = tid & 31, wwarp = (tid >> 5) & 3;
  const int wg = tid >> 7;
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
      cp_async16(Kd + swizzle_offset<D>(row, ch),
                 p.k + (static_cast<int64_t>(b) * p.T + (ok ? s : 0)) * D + ch * 16, ok ? 16 : 0);
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
    cp_async16(Qs + swizzle_offset<D>(row, ch), p.q + ((ok ? tok0 : 0) * HI + (ok ? row : 0)) * D + ch * 16,
               ok ? 16 : 0);
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
  const int key_lo = wwarp * 16 + g;
  auto issue = [&](int h, int stage) {
    const uint8_t* Kt = Ks + stage * kWgKeys * D;
    wgmma_fence_operand(acc[h]);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < KS; ++ks)
      wgmma_m64n128k32_e4m3(acc[h], wgmma_desc_swizzle<D>(Kt + ks * kKStepBytes),
                            wgmma_desc_swizzle<D>(Qw + h * 128 * D + ks * kKStepBytes), ks > 0);
    wgmma_commit();
  };
  // Top of tile it: wait for its copy, barrier, start tile it + 2's copy. Every warpgroup runs it for tiles
  // ib .. ie (tile ie: a barrier alone), so the barrier counts match whatever each one computes.
  auto tile_top = [&](int it) {
    cp_async_wait<1>();  // tile it has landed (tile it + 1 may still be in flight)
    fence_proxy_async();
    __syncthreads();     // every thread's copies visible; no MMA in flight still reads the stage refilled next
    if (it + 2 < ie) load_keys((it - ib + 2) % ST, (it + 2) * kWgKeys);
    cp_async_commit();
  };
  // This warpgroup's tiles with work are [ib, ia_end): a warpgroup without queries, or a tile in their
  // future (then so are the later ones), only keeps the barriers.
  const int ia_end = wq_end > wg * QW ? max(ib, min(ie, t_last / kWgKeys + 1)) : ib;
  int it = ib;
  tile_top(ib);
  for (; it < ia_end; ++it) {
    const int stage = (it - ib) % ST, s0 = it * kWgKeys;
    issue(0, stage);
    issue(1, stage);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (h == 0) wgmma_wait<1>();
      else wgmma_wait<0>();
      wgmma_fence_operand(acc[h]);
      score_epilogue<HI, false>(acc[h], wr[h], p, ksc + stage * kWgKeys, b, r0, nq, wg * QW + h * QH, key_lo, s0, c4);
    }
    tile_top(it + 1);
  }
  for (++it; it <= ie; ++it) tile_top(it);
}

// 64 heads (the production shape): four warpgroups of 128 threads, each owning two of the CTA's 8 queries
// (128 of its 512 columns) as two m64n64 accumulators, one per query: 64 registers of accumulator, 128 in
// all, so 16 warps an SM. Per tile a warpgroup issues both queries' MMAs, joins the next tile's barrier under
// them, then runs query 0's head sum under query 1's MMAs, query 1's after, one quad reduce-scatter and one
// store a thread; descriptors and store rows are made once. The barrier of tile x only needs every warpgroup
// to have issued tile x - 1, so a warpgroup may start tile x + 1 while another still sums tile x. Tile x's
// barrier refills the stage of tile x - 2 (4 stages), which every warpgroup has waited for.
// NOTES: measured against v15's two-warpgroup kernel with each warpgroup's halves pipelined across tiles
// (238 registers) and its LEAN form (descriptors and store rows made once): this one and LEAN both took the
// top-k at T = 32K on an H100 from 14.3-14.4 to 13.7-13.9 ms (docs/perf_log.md v17, same call); this one
// passed the whole GPU suite, has half the registers and no wgmma in flight across the loop's back edge,
// so it replaced both. Keep it so: ptxas serializes every wgmma of the kernel (C7514/C7515) for a group in
// flight across the back edge or a wait in a data-dependent branch (C7518), and injects a wait (C7517) where
// an accumulator is read that was not waited for in the same iteration (docs/perf_log.md v15).
template <int D>
__global__ void __launch_bounds__(4 * 128, 1) score_wgmma4_kernel(WgScoreParams p) {
  constexpr int HI = 64, QB = kWgCols / HI, NT = 4 * 128;
  constexpr int KS = D / 32, CH = D / 16, ST = 4, NJ = HI / 8;
  extern __shared__ __align__(128) uint8_t smem_raw[];
  uint8_t* const smem = aligned_smem(smem_raw);
  uint8_t* Qs = smem;                                            // [512 rows, D] swizzled rows
  uint8_t* Ks = Qs + kWgCols * D;                                // [ST][64 rows, D]
  float* weff = reinterpret_cast<float*>(Ks + ST * kWgKeys * D);  // [512] w * c * q scale / 2
  float* ksc = weff + kWgCols;                                   // [ST][64] key scales
  const int b = blockIdx.y, tid = threadIdx.x, lane = tid & 31, wwarp = (tid >> 5) & 3;
  const int wg = __shfl_sync(0xffffffffu, tid >> 7, 0);  // warp-uniform, so descriptors may stay uniform
  const int g = lane >> 2, c4 = lane & 3;
  const int r0 = (gridDim.x - 1 - blockIdx.x) * QB;  // first row (relative to t0); longest blocks first
  const int nq = min(QB, p.R - r0);
  const int tmax = p.t0 + r0 + nq - 1;
  const int ntiles = tmax / kWgKeys + 1;
  const int ib = static_cast<int>(static_cast<int64_t>(ntiles) * blockIdx.z / gridDim.z);
  const int ie = static_cast<int>(static_cast<int64_t>(ntiles) * (blockIdx.z + 1) / gridDim.z);
  if (ib >= ie) return;  // the whole CTA, before any copy or barrier
  const int64_t tok0 = static_cast<int64_t>(b) * p.T + p.t0 + r0;

  // NOTES: the copies below are score_wgmma_kernel's over NT threads. Helpers shared by both kernels changed
  // the code of both (PTX compared); merge them in a session that can rerun the GPU tests.
  auto load_keys = [&](int stage, int s0) {
    uint8_t* Kd = Ks + stage * kWgKeys * D;
    for (int i = tid; i < kWgKeys * CH; i += NT) {
      const int row = i / CH, ch = i % CH, s = s0 + row;
      const bool ok = s < p.T;
      cp_async16(Kd + swizzle_offset<D>(row, ch),
                 p.k + (static_cast<int64_t>(b) * p.T + (ok ? s : 0)) * D + ch * 16, ok ? 16 : 0);
    }
    if (tid < kWgKeys) {
      const int s = s0 + tid;
      if (s < p.T) cp_async4(ksc + stage * kWgKeys + tid, p.k_scale + static_cast<int64_t>(b) * p.T + s);
      else ksc[stage * kWgKeys + tid] = 0.f;
    }
  };
  for (int i = tid; i < kWgCols * CH; i += NT) {
    const int row = i / CH, ch = i % CH, qi = row / HI;
    const bool ok = qi < nq;
    cp_async16(Qs + swizzle_offset<D>(row, ch),
               p.q + ((ok ? tok0 : 0) * HI + (ok ? row : 0)) * D + ch * 16, ok ? 16 : 0);
  }
  {
    const int qi = tid / HI;
    weff[tid] = qi < nq ? __bfloat162float(p.w[tok0 * HI + tid]) * p.c * p.q_scale[tok0 * HI + tid] * 0.5f : 0.f;
  }
  load_keys(0, ib * kWgKeys);
  cp_async_commit();
  if (ib + 1 < ie) load_keys(1, (ib + 1) * kWgKeys);
  cp_async_commit();

  const int qa = 2 * wg;                      // this warpgroup's first local query
  const int wq_end = min(nq, qa + 2);
  const int t_last = p.t0 + r0 + wq_end - 1;  // the warpgroup's last query
  float acc[2][32];                           // [query][64 keys x 64 heads, m64n64 layout]
  float wr[2][2 * NJ];                        // [query][this thread's 16 heads' weights]
  __syncthreads();  // weff written
#pragma unroll
  for (int q = 0; q < 2; ++q)
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
      const float2 wv = *reinterpret_cast<const float2*>(weff + (qa + q) * HI + 8 * j + 2 * c4);
      wr[q][2 * j] = wv.x;
      wr[q][2 * j + 1] = wv.y;
    }
  // Shared addresses < 256 KiB: a tile's or k step's offset stays in the descriptor's address field.
  const uint64_t qdesc = wgmma_desc_swizzle<D>(Qs + qa * HI * D), kdesc = wgmma_desc_swizzle<D>(Ks);
  auto issue = [&](int q, int stage) {
    wgmma_fence_operand(acc[q]);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < KS; ++ks)
      wgmma_m64n64k32_e4m3(acc[q], kdesc + static_cast<uint64_t>((stage * kWgKeys * D + ks * kKStepBytes) >> 4),
                           qdesc + static_cast<uint64_t>((q * HI * D + ks * kKStepBytes) >> 4), ks > 0);
    wgmma_commit();
  };
  // This thread's one sum after the reduce-scatter: query qa + (c4 >> 1), key row key of the tile; stored to
  // orow[s0] when s0 <= tq (tq = -1: a query past the block's end).
  const int e = sum_slot<4>(c4, 0), qi = qa + e / 2, key = wwarp * 16 + g + 8 * (e & 1);
  float* const orow = p.out + (static_cast<int64_t>(b) * p.R + r0 + (qi < nq ? qi : 0)) * p.T + key;
  const int tq = qi < nq ? p.t0 + r0 + qi - key : -1;
  auto tile_top = [&](int it) {
    cp_async_wait<1>();  // tile it has landed (tile it + 1 may still be in flight)
    fence_proxy_async();
    __syncthreads();     // every thread's copies visible; every warpgroup done with tile it - 2's stage
    if (it + 2 < ie) load_keys((it - ib + 2) % ST, (it + 2) * kWgKeys);
    cp_async_commit();
  };
  const int ia_end = wq_end > qa ? max(ib, min(ie, t_last / kWgKeys + 1)) : ib;
  int it = ib;
  tile_top(ib);
  for (; it < ia_end; ++it) {
    const int stage = (it - ib) % ST, s0 = it * kWgKeys;
    issue(0, stage);
    issue(1, stage);
    tile_top(it + 1);
    float v[4], x[1];
    wgmma_wait<1>();
    wgmma_fence_operand(acc[0]);
    query_sum<NJ, true>(acc[0], wr[0], v[0], v[1]);
    wgmma_wait<0>();
    wgmma_fence_operand(acc[1]);
    query_sum<NJ, true>(acc[1], wr[1], v[2], v[3]);
    quad_reduce_scatter<4>(v, x, c4);
    if (s0 <= tq) orow[s0] = x[0] * ksc[stage * kWgKeys + key];
  }
  for (++it; it <= ie; ++it) tile_top(it);
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
  const bool w4 = Hi == 64;  // score_wgmma4_kernel
  const int stages = w4 ? 4 : 3;
  const size_t smem = static_cast<size_t>(kWgCols + stages * kWgKeys) * D +
                      sizeof(float) * (kWgCols + stages * kWgKeys) + 1024;  // + alignment slack
  // NOTES: where the query blocks alone leave SMs idle, the key prefix splits over gridDim.z (each split
  // writes its own keys' scores: no reduction). Long rows stream in small row blocks (the 256 MiB score
  // budget holds 512 rows at T = 128K: 16 CTAs at Hi = 16), which one CTA per query block left on 16 of
  // 132 SMs. Two waves of CTAs, and at least two key tiles per split.
  const int ctas = static_cast<int>(ceil_div(R, QB)) * B, want = 2 * sm_count(), tiles = (t0 + R - 1) / kWgKeys + 1;
  const int splits = ctas >= want ? 1 : std::max(1, std::min(static_cast<int>(ceil_div(want, ctas)), tiles / 2));
  dim3 grid(static_cast<unsigned>(ceil_div(R, QB)), static_cast<unsigned>(B), static_cast<unsigned>(splits));
  auto launch = [&](auto kernel) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    kernel<<<grid, w4 ? 4 * 128 : kWgThreads, smem, stream()>>>(p);
  };
  if (D == 64) {
    if (Hi == 16) launch(score_wgmma_kernel<16, 64>);
    else if (Hi == 32) launch(score_wgmma_kernel<32, 64>);
    else launch(score_wgmma4_kernel<64>);
  } else {
    if (Hi == 16) launch(score_wgmma_kernel<16, 128>);
    else if (Hi == 32) launch(score_wgmma_kernel<32, 128>);
    else launch(score_wgmma4_kernel<128>);
  }
  check_launch("indexer_scores_wgmma");
  return true;
}

}  // namespace dsa_detail
}  // namespace dsa::cuda
