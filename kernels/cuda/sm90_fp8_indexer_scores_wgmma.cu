// Lightning-indexer scoring on Hopper's warpgroup MMA (wgmma, sm_90a): FP8 e4m3 operands with one scale
// block per row (D <= 128), ReLU, head weights and the head sum fused into the epilogue. The mma.sync
// kernel in sm90_fp8_indexer.cu stays the fallback (other head counts and dims, bf16, several scale
// blocks, no sm_90a code) and computes the same scores; both are tested against the CPU reference.
// Two wgmma kernels: score_wgmma_kernel (the default: all threads copy, one CTA barrier per key tile) and
// score_wgmma_ws_kernel (DSA_INDEXER_WGMMA=ws: a producer warp, mbarriers, the math warpgroups in turns).
#include <cuda_fp8.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>

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
constexpr int kWsThreads = 288;  // warp-specialized: two math warpgroups and one producer warp
constexpr int kWsStages = 6;     // its key-tile ring
constexpr int kWsLag = 3;        // cp.async groups its producer keeps in flight before publishing the oldest

// Shared-memory byte offset of 16-byte chunk `ch` of row `row` in a no-swizzle K-major tile of D-byte rows:
// 8-row x 16-byte core matrices, K-adjacent ones 128 bytes apart (lbo), M-adjacent ones 8 D apart (sbo).
template <int D>
__device__ __forceinline__ int core_offset(int row, int ch) {
  return ((row >> 3) * (D / 16) + ch) * 128 + (row & 7) * 16;
}

// The scoring epilogue of one 64-key x 128-column half (QH queries x HI heads), shared by both kernels:
// relu(z * sq * sk) * w = relu(z) * (w * c * sq) * sk per query and key row g, g + 8 of this warp, the head
// sum in-thread then a quad reduce-scatter, and the store of the causal entries.
// NOTES: relu(z) = (z + |z|) / 2 with the 1/2 in weff: one FADD (|z| is an operand modifier) on the FMA
// pipe instead of an FMNMX on the half-rate ALU pipe, the busiest one (ncu, 41%). Exact: z + |z| is 2z or
// +0, and (2z) (w/2) is the same product.
template <int HI>
__device__ __forceinline__ void score_epilogue(const float (&acc)[64],
                                               const float* weff_h,  // [128] this half's w * c * q scale / 2
                                               float ks_lo, float ks_hi,  // scales of key rows g and g + 8
                                               const WgScoreParams& p, int b, int r0, int nq,
                                               int q_base,  // local query of the half's first column
                                               int key0,    // wwarp * 16 + g: the tile row of ks_lo
                                               int s0, int c4) {
  constexpr int QH = 128 / HI;  // queries per half
  constexpr int NJ = HI / 8;    // n8 column groups per query
  constexpr int NV = 2 * QH;    // (query, key row) sums per thread before the quad reduce-scatter
  float v[NV];
#pragma unroll
  for (int qh = 0; qh < QH; ++qh) {
    float a0 = 0.f, a1 = 0.f;
#pragma unroll
    for (int jj = 0; jj < NJ; ++jj) {
      const int j = qh * NJ + jj;
      const float2 wv = *reinterpret_cast<const float2*>(weff_h + 8 * j + 2 * c4);
      const float* z = acc + 4 * j;
      a0 += (z[0] + fabsf(z[0])) * wv.x + (z[1] + fabsf(z[1])) * wv.y;
      a1 += (z[2] + fabsf(z[2])) * wv.x + (z[3] + fabsf(z[3])) * wv.y;
    }
    v[2 * qh] = a0;
    v[2 * qh + 1] = a1;
  }
  float x[NV / 4];
  quad_reduce_scatter<NV>(v, x, c4);
#pragma unroll
  for (int i = 0; i < NV / 4; ++i) {
    const int e = (c4 >> 1) * (NV / 2) + (c4 & 1) * (NV / 4) + i;
    const int qi = q_base + e / 2;  // local query
    const int s = s0 + key0 + 8 * (e & 1), t = p.t0 + r0 + qi;
    if (qi < nq && s <= t) p.out[(static_cast<int64_t>(b) * p.R + r0 + qi) * p.T + s] = x[i] * ((e & 1) ? ks_hi : ks_lo);
  }
}

// Key tile [s0, s0 + 64) of batch b into stage buffer Kd (core-matrix layout) and its scales into kd_scale
// (keys past T: zero codes, zero scale), copied by threads tid0, tid0 + nthreads, ... of the CTA.
template <int D>
__device__ __forceinline__ void load_key_tile(uint8_t* Kd, float* kd_scale, const WgScoreParams& p, int b, int s0,
                                              int tid0, int nthreads) {
  constexpr int CH = D / 16;
  for (int i = tid0; i < kWgKeys * CH; i += nthreads) {
    const int row = i / CH, ch = i % CH, s = s0 + row;
    const bool ok = s < p.T;
    cp_async16(Kd + core_offset<D>(row, ch), p.k + (static_cast<int64_t>(b) * p.T + (ok ? s : 0)) * D + ch * 16,
               ok ? 16 : 0);
  }
  for (int i = tid0; i < kWgKeys; i += nthreads) {
    const int s = s0 + i;
    if (s < p.T) cp_async4(kd_scale + i, p.k_scale + static_cast<int64_t>(b) * p.T + s);
    else kd_scale[i] = 0.f;
  }
}

// The CTA's query block (512 rows of D codes, rows past nq zero) and its effective head weights, copied
// by every thread; committed as one cp.async group.
template <int HI, int D>
__device__ __forceinline__ void load_query_block(uint8_t* Qs, float* weff, const WgScoreParams& p, int64_t tok0, int nq,
                                                 int tid, int nthreads) {
  constexpr int CH = D / 16;
  for (int i = tid; i < kWgCols * CH; i += nthreads) {
    const int row = i / CH, ch = i % CH, qi = row / HI;
    const bool ok = qi < nq;
    cp_async16(Qs + core_offset<D>(row, ch), p.q + ((ok ? tok0 : 0) * HI + (ok ? row : 0)) * D + ch * 16, ok ? 16 : 0);
  }
  for (int i = tid; i < kWgCols; i += nthreads) {
    const int qi = i / HI;
    weff[i] = qi < nq ? __bfloat162float(p.w[tok0 * HI + i]) * p.c * p.q_scale[tok0 * HI + i] * 0.5f : 0.f;
  }
  cp_async_commit();
}

// A CTA's work: query rows r0 .. r0 + nq - 1 (relative to t0) of batch blockIdx.y, longest row blocks
// first, and its share [ib, ie) of their causal key prefix's 64-key tiles (gridDim.z splits the prefix).
struct ScoreBlock {
  int r0, nq, ib, ie;
  int64_t tok0;  // b * T + t0 + r0: the block's first query token
};
template <int QB>
__device__ __forceinline__ ScoreBlock score_block(const WgScoreParams& p) {
  ScoreBlock k;
  k.r0 = (gridDim.x - 1 - blockIdx.x) * QB;
  k.nq = min(QB, p.R - k.r0);
  const int ntiles = (p.t0 + k.r0 + k.nq - 1) / kWgKeys + 1;
  k.ib = static_cast<int>(static_cast<int64_t>(ntiles) * blockIdx.z / gridDim.z);
  k.ie = static_cast<int>(static_cast<int64_t>(ntiles) * (blockIdx.z + 1) / gridDim.z);
  k.tok0 = static_cast<int64_t>(blockIdx.y) * p.T + p.t0 + k.r0;
  return k;
}

// One warpgroup's products for a key tile: acc[h] (64 keys x 128 columns) = Kt Qw[h half]^T, each half
// committed as its own wgmma group (the caller waits for half 0 first).
template <int D>
__device__ __forceinline__ void issue_tile_mma(float (&acc)[2][64], const uint8_t* Kt, const uint8_t* Qw) {
  wgmma_fence_operand(acc[0]);
  wgmma_fence_operand(acc[1]);
  wgmma_fence();
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int ks = 0; ks < D / 32; ++ks)
      wgmma_m64n128k32_e4m3(acc[h], wgmma_desc(Kt + ks * 256, 128, 8 * D),
                            wgmma_desc(Qw + h * 128 * D + ks * 256, 128, 8 * D), ks > 0);
    wgmma_commit();
  }
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
  static_assert(2 * QH >= 4 && (2 * QH) % 4 == 0, "HI must be 16, 32 or 64");
  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* Qs = smem;                                            // [512 rows, D] core-matrix layout
  uint8_t* Ks = Qs + kWgCols * D;                                // [kWgStages][64 rows, D]
  float* weff = reinterpret_cast<float*>(Ks + kWgStages * kWgKeys * D);  // [512] w * c * q scale / 2
  float* ksc = weff + kWgCols;                                   // [kWgStages][64] key scales
  const int b = blockIdx.y, tid = threadIdx.x, lane = tid & 31, wg = tid >> 7, wwarp = (tid >> 5) & 3;
  const int g = lane >> 2, c4 = lane & 3;
  const ScoreBlock blk = score_block<QB>(p);
  const int r0 = blk.r0, nq = blk.nq, ib = blk.ib, ie = blk.ie;
  const int64_t tok0 = blk.tok0;
  if (ib >= ie) return;  // the whole CTA, before any copy or barrier

  // Prologue: the query block with key tile ib, then key tile ib + 1.
  load_query_block<HI, D>(Qs, weff, p, tok0, nq, tid, kWgThreads);
  load_key_tile<D>(Ks, ksc, p, b, ib * kWgKeys, tid, kWgThreads);
  cp_async_commit();
  if (ib + 1 < ie) load_key_tile<D>(Ks + kWgKeys * D, ksc + kWgKeys, p, b, (ib + 1) * kWgKeys, tid, kWgThreads);
  cp_async_commit();

  // This warpgroup's queries: local rows wg * QW .. wg * QW + QW - 1 (fewer at the last block).
  const int wq_end = min(nq, (wg + 1) * QW);
  const int t_last = p.t0 + r0 + wq_end - 1;  // the warpgroup's last query
  const uint8_t* Qw = Qs + wg * 256 * D;
  float acc[2][64];
  for (int it = ib; it < ie; ++it) {
    const int stage = (it - ib) % kWgStages, s0 = it * kWgKeys;
    cp_async_wait<1>();  // tile it has landed (tile it + 1 may still be in flight)
    fence_proxy_async();
    __syncthreads();     // every thread's copies visible; every warpgroup done with tile it - 1's stage
    if (it + 2 < ie) {
      const int st2 = (it - ib + 2) % kWgStages;
      load_key_tile<D>(Ks + st2 * kWgKeys * D, ksc + st2 * kWgKeys, p, b, s0 + 2 * kWgKeys, tid, kWgThreads);
    }
    cp_async_commit();
    if (wq_end <= wg * QW || s0 > t_last) continue;  // no queries here, or the tile is in their future
    issue_tile_mma<D>(acc, Ks + stage * kWgKeys * D, Qw);
    const int key0 = wwarp * 16 + g;
    const float ks_lo = ksc[stage * kWgKeys + key0], ks_hi = ksc[stage * kWgKeys + key0 + 8];
    wgmma_wait<1>();
    wgmma_fence_operand(acc[0]);
    score_epilogue<HI>(acc[0], weff + wg * 256, ks_lo, ks_hi, p, b, r0, nq, wg * QW, key0, s0, c4);
    wgmma_wait<0>();
    wgmma_fence_operand(acc[1]);
    score_epilogue<HI>(acc[1], weff + wg * 256 + 128, ks_lo, ks_hi, p, b, r0, nq, wg * QW + QH, key0, s0, c4);
  }
}

// The warp-specialized variant (DSA_INDEXER_WGMMA=ws, opt-in until measured; docs/perf_log.md v13): the
// same tiles, products and epilogue, with the per-tile CTA barrier replaced by a producer warp and
// mbarriers, and the two math warpgroups taking turns on the tensor cores.
// NOTES:
//  - Why: in score_wgmma_kernel both warpgroups wait at one __syncthreads per key tile, so they issue
//    their MMAs together and then run their second halves' epilogues together, leaving the tensor cores
//    idle for that epilogue (a rolling pipeline with a barrier mid-tile measured slower, v9). Here warp 8
//    copies tiles into a kWsStages ring (full / empty mbarriers per stage), and named barriers make
//    warpgroup 0 and 1 issue their tiles' MMAs in turn (FA3's ping-pong): one warpgroup's epilogue runs
//    while the other's products are on the tensor cores.
//  - The producer keeps kWsLag tiles' cp.async groups in flight and publishes the oldest: cp.async.wait_group,
//    fence.proxy.async, then an arrive on the stage's full barrier by each of its 32 lanes (the ordering
//    score_wgmma_kernel gets from wait, fence and __syncthreads). kWsLag < kWsStages keeps it deadlock-free:
//    the empty barrier the producer waits on at tile j belongs to tile j - kWsStages, published at
//    iteration j - kWsStages + kWsLag < j.
//  - Turns: warpgroup w waits on barrier 1 + w, issues its two halves, then arrives on 2 - w; warpgroup 1
//    arrives once before its loop so warpgroup 0 goes first and skips its arrive on the last tile, so each
//    barrier sees as many arrives as waits. Every warpgroup takes every tile's turn, also a tile with no
//    work for it (its queries end before the tile, or the last block leaves it none).
//  - Registers: ptxas allots 168 a thread at 288 threads (what 384 would get): the two 64-float
//    accumulators and the epilogue fit at Hi 32 / 64, Hi 16 spills 16 bytes. More would take a producer
//    warpgroup handing registers to the math ones (setmaxnreg), as in DeepGEMM and FA3.
template <int HI, int D>
__global__ void __launch_bounds__(kWsThreads, 1) score_wgmma_ws_kernel(WgScoreParams p) {
  constexpr int QB = kWgCols / HI, QW = QB / 2, QH = 128 / HI;
  static_assert(kWsLag < kWsStages, "the producer must publish a tile before it waits for that stage");
  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* Qs = smem;                                             // [512 rows, D] core-matrix layout
  uint8_t* Ks = Qs + kWgCols * D;                                 // [kWsStages][64 rows, D]
  float* weff = reinterpret_cast<float*>(Ks + kWsStages * kWgKeys * D);  // [512] w * c * q scale / 2
  float* ksc = weff + kWgCols;                                    // [kWsStages][64] key scales
  uint64_t* full = reinterpret_cast<uint64_t*>(ksc + kWsStages * kWgKeys);  // [kWsStages]
  uint64_t* empty = full + kWsStages;                             // [kWsStages]
  const int b = blockIdx.y, tid = threadIdx.x, lane = tid & 31, wg = tid >> 7, wwarp = (tid >> 5) & 3;
  const int g = lane >> 2, c4 = lane & 3;
  const ScoreBlock blk = score_block<QB>(p);
  const int r0 = blk.r0, nq = blk.nq, ib = blk.ib, n = blk.ie - blk.ib;
  if (n <= 0) return;  // the whole CTA, before any copy or barrier
  const int64_t tok0 = blk.tok0;

  load_query_block<HI, D>(Qs, weff, p, tok0, nq, tid, kWsThreads);
  if (tid == 0) {
    for (int s = 0; s < kWsStages; ++s) {
      mbarrier_init(&full[s], 32);  // the producer warp's lanes
      mbarrier_init(&empty[s], 8);  // one lane of each math warp
    }
    fence_mbarrier_init();
  }
  cp_async_wait<0>();
  fence_proxy_async();
  __syncthreads();  // the query block, weff and the barriers, for every role; the only CTA-wide barrier

  if (tid >= 256) {  // producer warp
    for (int j = 0; j < n; ++j) {
      const int st = j % kWsStages;
      if (j >= kWsStages) mbarrier_wait(&empty[st], (j / kWsStages - 1) & 1);  // tile j - kWsStages released
      load_key_tile<D>(Ks + st * kWgKeys * D, ksc + st * kWgKeys, p, b, (ib + j) * kWgKeys, lane, 32);
      cp_async_commit();
      if (j >= kWsLag) {
        cp_async_wait<kWsLag>();  // tile j - kWsLag landed (this lane's part)
        fence_proxy_async();
        mbarrier_arrive(&full[(j - kWsLag) % kWsStages]);
      }
    }
    cp_async_wait<0>();
    fence_proxy_async();
    for (int j = max(0, n - kWsLag); j < n; ++j) mbarrier_arrive(&full[j % kWsStages]);
    return;
  }

  const int wq_end = min(nq, (wg + 1) * QW);
  const bool wg_has = wq_end > wg * QW;        // the last block may leave warpgroup 1 no queries
  const int t_last = p.t0 + r0 + wq_end - 1;  // the warpgroup's last query
  const uint8_t* Qw = Qs + wg * 256 * D;
  const int key0 = wwarp * 16 + g;
  const int my_turn = 1 + wg, their_turn = 2 - wg;
  if (wg == 1) named_barrier_arrive(1, 256);  // warpgroup 0 takes the first turn
  float acc[2][64];
  for (int j = 0; j < n; ++j) {
    const int st = j % kWsStages, s0 = (ib + j) * kWgKeys;
    mbarrier_wait(&full[st], (j / kWsStages) & 1);
    const bool active = wg_has && s0 <= t_last;  // uniform over the warpgroup
    named_barrier_sync(my_turn, 256);
    if (active) issue_tile_mma<D>(acc, Ks + st * kWgKeys * D, Qw);
    if (!(wg == 1 && j == n - 1)) named_barrier_arrive(their_turn, 256);
    float ks_lo = 0.f, ks_hi = 0.f;
    if (active) {
      ks_lo = ksc[st * kWgKeys + key0];
      ks_hi = ksc[st * kWgKeys + key0 + 8];
      wgmma_wait<1>();
      wgmma_fence_operand(acc[0]);
      score_epilogue<HI>(acc[0], weff + wg * 256, ks_lo, ks_hi, p, b, r0, nq, wg * QW, key0, s0, c4);
      wgmma_wait<0>();  // both halves have read the stage
      wgmma_fence_operand(acc[1]);
    }
    __syncwarp();  // the warp's reads of the stage (key scales) before its release
    if (lane == 0) mbarrier_arrive(&empty[st]);
    if (active) score_epilogue<HI>(acc[1], weff + wg * 256 + 128, ks_lo, ks_hi, p, b, r0, nq, wg * QW + QH, key0, s0, c4);
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

IndexerScoreKernel indexer_score_kernel() {
  const char* e = std::getenv("DSA_INDEXER_WGMMA");
  if (!e || !*e || std::strcmp(e, "1") == 0) return IndexerScoreKernel::kWgmma;
  if (std::strcmp(e, "ws") == 0) return IndexerScoreKernel::kWgmmaWarpSpecialized;
  DSA_CHECK(std::strcmp(e, "0") == 0, "[indexer_scores] DSA_INDEXER_WGMMA must be 0, 1, ws or unset, got '", e, "'");
  return IndexerScoreKernel::kMma;
}

bool launch_scores_wgmma(const ScoreOperands& o, const Tensor& w_I, int B, int T, int Hi, int D, int t0, int R,
                         float* out) {
  // NOTES: DSA_INDEXER_WGMMA (read at each call) = 0 keeps the mma.sync kernel (the benchmark's before/after,
  // and a way round a driver that refuses the sm_90a code); ws takes the warp-specialized kernel.
  const IndexerScoreKernel kind = indexer_score_kernel();
  if (kind == IndexerScoreKernel::kMma || !o.fp8 || !(Hi == 16 || Hi == 32 || Hi == 64) || !(D == 64 || D == 128))
    return false;
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
  const bool ws = kind == IndexerScoreKernel::kWgmmaWarpSpecialized;
  const int QB = kWgCols / Hi, stages = ws ? kWsStages : kWgStages;
  const size_t smem = static_cast<size_t>(kWgCols + stages * kWgKeys) * D + sizeof(float) * (kWgCols + stages * kWgKeys) +
                      (ws ? 2 * kWsStages * sizeof(uint64_t) : 0);
  // NOTES: where the query blocks alone leave SMs idle, the key prefix splits over gridDim.z (each split
  // writes its own keys' scores: no reduction). Long rows stream in small row blocks (the 256 MiB score
  // budget holds 512 rows at T = 128K: 16 CTAs at Hi = 16), which one CTA per query block left on 16 of
  // 132 SMs. Two waves of CTAs, and at least two key tiles per split.
  const int ctas = static_cast<int>(ceil_div(R, QB)) * B, want = 2 * sm_count(), tiles = (t0 + R - 1) / kWgKeys + 1;
  const int splits = ctas >= want ? 1 : std::max(1, std::min(static_cast<int>(ceil_div(want, ctas)), tiles / 2));
  dim3 grid(static_cast<unsigned>(ceil_div(R, QB)), static_cast<unsigned>(B), static_cast<unsigned>(splits));
  auto launch = [&](auto kernel) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    kernel<<<grid, ws ? kWsThreads : kWgThreads, smem, stream()>>>(p);
  };
  // One instantiation per (Hi, D) and kernel.
  auto pick = [&](auto hi, auto d) {
    constexpr int kHi = decltype(hi)::value, kD = decltype(d)::value;
    if (ws) launch(score_wgmma_ws_kernel<kHi, kD>);
    else launch(score_wgmma_kernel<kHi, kD>);
  };
  using I16 = std::integral_constant<int, 16>;
  using I32 = std::integral_constant<int, 32>;
  using I64 = std::integral_constant<int, 64>;
  using I128 = std::integral_constant<int, 128>;
  if (D == 64) {
    if (Hi == 16) pick(I16{}, I64{});
    else if (Hi == 32) pick(I32{}, I64{});
    else pick(I64{}, I64{});
  } else {
    if (Hi == 16) pick(I16{}, I128{});
    else if (Hi == 32) pick(I32{}, I128{});
    else pick(I64{}, I128{});
  }
  check_launch("indexer_scores_wgmma");
  return true;
}

}  // namespace dsa_detail
}  // namespace dsa::cuda
