// Lightning-indexer scoring on Hopper's warpgroup MMA (wgmma, sm_90a): FP8 e4m3 operands with one scale
// block per row (D <= 128), ReLU, head weights and the head sum fused into the epilogue. The mma.sync
// kernel in sm90_fp8_indexer.cu stays the fallback (other head counts and dims, bf16, several scale
// blocks, no sm_90a code) and computes the same scores; both are tested against the CPU reference.
#include <cuda.h>
#include <cudaTypedefs.h>
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

// ks0 / ks1: the scales of key rows key_lo and key_lo + 8 (a slot's key row parity is i's: NV / 4 is even).
template <int HI, bool KFMA>
__device__ __forceinline__ void score_epilogue(const float (&acc)[64], const float (&w)[2 * (128 / HI) * (HI / 8)],
                                               const WgScoreParams& p, float ks0, float ks1, int b, int r0, int nq,
                                               int qbase, int key_lo, int s0, int c4) {
  constexpr int NV = 2 * (128 / HI);
  static_assert((NV / 4) % 2 == 0, "score_epilogue: a slot's key row parity must be its index's");
  float x[NV / 4];
  head_sum<HI, KFMA>(acc, w, x, c4);
#pragma unroll
  for (int i = 0; i < NV / 4; ++i) {
    const int e = sum_slot<NV>(c4, i);
    const int qi = qbase + e / 2;  // local query
    const int key = key_lo + 8 * (i & 1), s = s0 + key, t = p.t0 + r0 + qi;
    if (qi < nq && s <= t) p.out[(static_cast<int64_t>(b) * p.R + r0 + qi) * p.T + s] = x[i] * ((i & 1) ? ks1 : ks0);
  }
}

// ------------------------------------------------------------------------------ what both kernels share
// A CTA's rows and keys: query rows r0 .. r0 + nq - 1 (relative to t0; blocks of QB, the longest first), key
// tiles [ib, ie) of the causal prefix of its last row (gridDim.z splits the prefix).
struct ScoreBlock {
  int r0, nq, ib, ie;
  int64_t tok0;  // the block's first query token, b T + t0 + r0
};
__device__ __forceinline__ ScoreBlock score_block(const WgScoreParams& p, int QB) {
  ScoreBlock k;
  k.r0 = (gridDim.x - 1 - blockIdx.x) * QB;
  k.nq = min(QB, p.R - k.r0);
  const int ntiles = (p.t0 + k.r0 + k.nq - 1) / kWgKeys + 1;
  k.ib = static_cast<int>(static_cast<int64_t>(ntiles) * blockIdx.z / gridDim.z);
  k.ie = static_cast<int>(static_cast<int64_t>(ntiles) * (blockIdx.z + 1) / gridDim.z);
  k.tok0 = static_cast<int64_t>(blockIdx.y) * p.T + p.t0 + k.r0;
  return k;
}

// The key tiles' ring: ST stages of 64 keys x D bytes (swizzled rows), filled by TMA LA tiles ahead of the
// consumers by one producer thread. Tile x of [ib, ie) sits in stage (x - ib) % ST; its barriers' phase has
// parity ((x - ib) / ST) & 1. full[s]: the producer's arrival and the tile's bytes; empty[s]: one arrival a
// consumer warp once it is done with the stage (its MMAs waited for). A warp takes and releases every tile of
// [ib, ie), also those past its queries, so that each phase of empty sees all warps; an arrival for tile
// x + ST cannot count towards tile x's phase, as it follows tile x + ST's landing, which follows that phase.
constexpr int kRingStages = 8, kRingAhead = 4;  // the consumers may drift ST - LA = 4 tiles apart
static_assert((kRingStages & (kRingStages - 1)) == 0, "KeyRing: stages a power of two (mask and shift)");
template <int D>
struct KeyRing {
  static constexpr int ST = kRingStages, LA = kRingAhead;
  static constexpr uint32_t kTileBytes = kWgKeys * D;
  static_assert(LA >= 1 && LA < ST, "KeyRing: 1 <= tiles ahead < stages");
  uint8_t* tiles;   // [ST][64 rows, D]
  uint64_t* full;   // [ST]
  uint64_t* empty;  // [ST]
  int ib, b;
  __device__ __forceinline__ int stage(int x) const { return static_cast<int>(unsigned(x - ib) % ST); }
  __device__ __forceinline__ uint32_t parity(int x) const { return (unsigned(x - ib) / ST) & 1u; }
  // Producer: tile x into its stage once every consumer warp has released tile x - ST.
  __device__ __forceinline__ void load(const CUtensorMap* map, int x) const {
    const int s = stage(x);
    if (x - ST >= ib) mbar_wait(&empty[s], parity(x - ST));
    mbar_arrive_expect_tx(&full[s], kTileBytes);
    tma_load_3d(tiles + s * kTileBytes, map, &full[s], 0, x * kWgKeys, b);
  }
  __device__ __forceinline__ void wait(int x) const { mbar_wait(&full[stage(x)], parity(x)); }
  __device__ __forceinline__ void release(int x, int lane) const {
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty[stage(x)]);
  }
};
// Shared memory of both kernels (from the 1024-aligned base): the query block, the ring, weff, the barriers.
template <int D>
struct ScoreSmem {
  uint8_t* q;      // [512 rows, D] swizzled rows
  uint8_t* k;      // [ST][64 rows, D]
  float* weff;     // [512] w * c * q scale / 2
  uint64_t* full;  // [ST]
  uint64_t* empty; // [ST]
  __device__ __forceinline__ explicit ScoreSmem(uint8_t* base)
      : q(base), k(q + kWgCols * D), weff(reinterpret_cast<float*>(k + kRingStages * kWgKeys * D)),
        full(reinterpret_cast<uint64_t*>(weff + kWgCols)), empty(full + kRingStages) {}
};
size_t score_smem_bytes(int D) {
  return static_cast<size_t>(kWgCols + kRingStages * kWgKeys) * D + sizeof(float) * kWgCols +
         2 * kRingStages * sizeof(uint64_t) + 1024;  // + alignment slack
}

// Both kernels' start: the producer initializes the ring and issues its first LA tiles; all NT threads copy
// the query block (rows past the block's end are zero) and weff; then the CTA barrier that publishes them.
template <int HI, int D, int NT>
__device__ __forceinline__ void score_prologue(const WgScoreParams& p, const CUtensorMap* map, const KeyRing<D>& ring,
                                               const ScoreSmem<D>& sm, const ScoreBlock& blk, bool producer) {
  constexpr int CH = D / 16;
  const int tid = threadIdx.x;
  if (producer) {
    for (int s = 0; s < KeyRing<D>::ST; ++s) {
      mbar_init(&ring.full[s], 1);
      mbar_init(&ring.empty[s], NT / 32);
    }
    mbar_fence_init();
    for (int x = blk.ib; x < min(blk.ie, blk.ib + KeyRing<D>::LA); ++x) ring.load(map, x);
  }
  for (int i = tid; i < kWgCols * CH; i += NT) {
    const int row = i / CH, ch = i % CH;
    const bool ok = row / HI < blk.nq;
    cp_async16(sm.q + swizzle_offset<D>(row, ch), p.q + ((ok ? blk.tok0 : 0) * HI + (ok ? row : 0)) * D + ch * 16,
               ok ? 16 : 0);
  }
  cp_async_commit();
  for (int i = tid; i < kWgCols; i += NT) {
    const int64_t j = blk.tok0 * HI + i;
    sm.weff[i] = i / HI < blk.nq ? __bfloat162float(p.w[j]) * p.c * p.q_scale[j] * 0.5f : 0.f;
  }
  cp_async_wait<0>();
  fence_proxy_async();
  __syncthreads();
}

// NOTES: keys are M (64 per tile, the accumulator rows) and query-heads are N, as in the mma.sync kernel:
// a thread's accumulator holds 2 keys x 32 head columns per half, so the head sum is in-thread adds and a
// quad reduce-scatter (each lane ends with a quarter of the (query, key) sums to store). A CTA holds
// 512 / HI queries (all their heads) and streams the causal key prefix once for all of them through the
// KeyRing; row blocks run longest first. The two warpgroups share the key tiles (tried: one warpgroup per
// CTA at three CTAs per SM, each CTA reading the keys for half as many queries, was slower). The producer
// is the first thread of the last warpgroup with queries (it computes every tile of the CTA). Key scales
// come from global memory at the top of a tile (two a thread), their latency under the MMAs.
// 16 and 32 heads: both halves of a warpgroup issue together once the tile has landed, then their
// epilogues run in turn. 64 heads take score_wgmma4_kernel below (docs/perf_log.md v15-v17 for the forms
// tried, v19 for the ring).
template <int HI, int D>
__global__ void __launch_bounds__(kWgThreads, 1) score_wgmma_kernel(const __grid_constant__ CUtensorMap kmap,
                                                                    WgScoreParams p) {
  constexpr int QB = kWgCols / HI;   // queries per CTA
  constexpr int QW = QB / 2;         // per warpgroup
  constexpr int QH = 128 / HI;       // per half
  constexpr int NJ = HI / 8;         // n8 column groups per query
  constexpr int KS = D / 32;         // wgmma k steps
  static_assert(HI == 16 || HI == 32, "score_wgmma_kernel: HI must be 16 or 32 (64: score_wgmma4_kernel)");
  extern __shared__ __align__(128) uint8_t smem_raw[];
  const ScoreSmem<D> sm(aligned_smem(smem_raw));
  const ScoreBlock blk = score_block(p, QB);
  if (blk.ib >= blk.ie) return;  // the whole CTA, before any copy or barrier
  const int b = blockIdx.y, tid = threadIdx.x, lane = tid & 31, wwarp = (tid >> 5) & 3;
  const int wg = tid >> 7;
  const int g = lane >> 2, c4 = lane & 3;
  const KeyRing<D> ring{sm.k, sm.full, sm.empty, blk.ib, b};
  const bool producer = tid == (blk.nq - 1) / QW * 128;
  score_prologue<HI, D, kWgThreads>(p, &kmap, ring, sm, blk, producer);

  // This warpgroup's queries: local rows wg * QW .. wg * QW + QW - 1 (fewer at the last block).
  const int wq_end = min(blk.nq, (wg + 1) * QW);
  const int t_last = p.t0 + blk.r0 + wq_end - 1;  // the warpgroup's last query
  const uint8_t* Qw = sm.q + wg * 256 * D;
  float acc[2][64];
  // This thread's head weights (columns 8 j + 2 c4 and + 1 of each half, 64 floats) stay in registers for the
  // whole key stream.
  // NOTES: read from shared memory they cost one LDS.64 per head group, half and tile; in registers the
  // top-k ran ~3% faster (docs/perf_log.md v14, H100) at 235 registers without spills (-Xptxas -v).
  float wr[2][2 * QH * NJ];
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int j = 0; j < QH * NJ; ++j) {
      const float2 wv = *reinterpret_cast<const float2*>(sm.weff + wg * 256 + h * 128 + 8 * j + 2 * c4);
      wr[h][2 * j] = wv.x;
      wr[h][2 * j + 1] = wv.y;
    }
  const int key_lo = wwarp * 16 + g;
  const float* const ksc = p.k_scale + static_cast<int64_t>(b) * p.T + key_lo;
  auto issue = [&](int h, int stage) {
    const uint8_t* Kt = sm.k + stage * KeyRing<D>::kTileBytes;
    wgmma_fence_operand(acc[h]);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < KS; ++ks)
      wgmma_m64n128k32_e4m3(acc[h], wgmma_desc_swizzle<D>(Kt + ks * kKStepBytes),
                            wgmma_desc_swizzle<D>(Qw + h * 128 * D + ks * kKStepBytes), ks > 0);
    wgmma_commit();
  };
  // This warpgroup's tiles with work are [ib, ia_end); it takes and releases the later ones only.
  const int ia_end = wq_end > wg * QW ? max(blk.ib, min(blk.ie, t_last / kWgKeys + 1)) : blk.ib;
  int it = blk.ib;
  for (; it < ia_end; ++it) {
    if (producer && it + KeyRing<D>::LA < blk.ie) ring.load(&kmap, it + KeyRing<D>::LA);
    const int stage = ring.stage(it), s0 = it * kWgKeys;
    const float ks0 = s0 + key_lo < p.T ? ksc[s0] : 0.f, ks1 = s0 + key_lo + 8 < p.T ? ksc[s0 + 8] : 0.f;
    ring.wait(it);
    issue(0, stage);
    issue(1, stage);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (h == 0) wgmma_wait<1>();
      else wgmma_wait<0>();
      wgmma_fence_operand(acc[h]);
      score_epilogue<HI, false>(acc[h], wr[h], p, ks0, ks1, b, blk.r0, blk.nq, wg * QW + h * QH, key_lo, s0, c4);
    }
    ring.release(it, lane);
  }
  for (; it < blk.ie; ++it) {
    ring.wait(it);
    ring.release(it, lane);
  }
}

// 64 heads (the production shape): four warpgroups of 128 threads, each owning two of the CTA's 8 queries
// (128 of its 512 columns) as two m64n64 accumulators, one per query: 64 registers of accumulator, 128 in
// all, so 16 warps an SM. Per tile a warpgroup waits for the tile to land, issues both queries' MMAs, runs
// query 0's head sum under query 1's MMAs, query 1's after, one quad reduce-scatter and one store a thread
// (descriptors and store rows made once), then releases the tile. No CTA barrier in the loop: the
// warpgroups drift up to ST - LA tiles apart, one's epilogue under another's MMAs.
// NOTES: v19 replaced a CTA barrier every tile and key tiles copied by all 512 threads with cp.async (ncu:
// the barrier the largest stall, issue slots half idle; docs/perf_log.md v18-v19). v17 measured this form
// against v15's two-warpgroup kernel with each warpgroup's halves pipelined across tiles (238 registers): top-k
// at T = 32K on an H100 14.3-14.4 -> 13.7-13.9 ms, half the registers, no wgmma in flight across the loop's
// back edge. Keep it so: ptxas serializes every wgmma of the kernel (C7514/C7515) for a group in flight
// across the back edge or a wait in a data-dependent branch (C7518), and injects a wait (C7517) where an
// accumulator is read that was not waited for in the same iteration (docs/perf_log.md v15).
template <int D>
__global__ void __launch_bounds__(4 * 128, 1) score_wgmma4_kernel(const __grid_constant__ CUtensorMap kmap,
                                                                  WgScoreParams p) {
  constexpr int HI = 64, QB = kWgCols / HI, NT = 4 * 128, KS = D / 32, NJ = HI / 8;
  extern __shared__ __align__(128) uint8_t smem_raw[];
  const ScoreSmem<D> sm(aligned_smem(smem_raw));
  const ScoreBlock blk = score_block(p, QB);
  if (blk.ib >= blk.ie) return;  // the whole CTA, before any copy or barrier
  const int b = blockIdx.y, tid = threadIdx.x, lane = tid & 31, wwarp = (tid >> 5) & 3;
  const int wg = __shfl_sync(0xffffffffu, tid >> 7, 0);  // warp-uniform, so descriptors may stay uniform
  const int g = lane >> 2, c4 = lane & 3;
  const KeyRing<D> ring{sm.k, sm.full, sm.empty, blk.ib, b};
  const bool producer = tid == (blk.nq - 1) / 2 * 128;
  score_prologue<HI, D, NT>(p, &kmap, ring, sm, blk, producer);

  const int qa = 2 * wg;                             // this warpgroup's first local query
  const int wq_end = min(blk.nq, qa + 2);
  const int t_last = p.t0 + blk.r0 + wq_end - 1;     // the warpgroup's last query
  float acc[2][32];                                  // [query][64 keys x 64 heads, m64n64 layout]
  float wr[2][2 * NJ];                               // [query][this thread's 16 heads' weights]
#pragma unroll
  for (int q = 0; q < 2; ++q)
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
      const float2 wv = *reinterpret_cast<const float2*>(sm.weff + (qa + q) * HI + 8 * j + 2 * c4);
      wr[q][2 * j] = wv.x;
      wr[q][2 * j + 1] = wv.y;
    }
  // Shared addresses < 256 KiB: a tile's or k step's offset stays in the descriptor's address field.
  const uint64_t qdesc = wgmma_desc_swizzle<D>(sm.q + qa * HI * D), kdesc = wgmma_desc_swizzle<D>(sm.k);
  auto issue = [&](int q, int stage) {
    wgmma_fence_operand(acc[q]);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < KS; ++ks)
      wgmma_m64n64k32_e4m3(acc[q],
                           kdesc + static_cast<uint64_t>((stage * KeyRing<D>::kTileBytes + ks * kKStepBytes) >> 4),
                           qdesc + static_cast<uint64_t>((q * HI * D + ks * kKStepBytes) >> 4), ks > 0);
    wgmma_commit();
  };
  // This thread's one sum after the reduce-scatter: query qa + (c4 >> 1), key row key of the tile; stored to
  // orow[s0] when s0 <= tq (tq = -1: a query past the block's end), times the key's scale ksc[s0].
  const int e = sum_slot<4>(c4, 0), qi = qa + e / 2, key = wwarp * 16 + g + 8 * (e & 1);
  float* const orow = p.out + (static_cast<int64_t>(b) * p.R + blk.r0 + (qi < blk.nq ? qi : 0)) * p.T + key;
  const float* const ksc = p.k_scale + static_cast<int64_t>(b) * p.T + key;
  const int tq = qi < blk.nq ? p.t0 + blk.r0 + qi - key : -1;
  const int ia_end = wq_end > qa ? max(blk.ib, min(blk.ie, t_last / kWgKeys + 1)) : blk.ib;
  int it = blk.ib;
  for (; it < ia_end; ++it) {
    if (producer && it + KeyRing<D>::LA < blk.ie) ring.load(&kmap, it + KeyRing<D>::LA);
    const int stage = ring.stage(it), s0 = it * kWgKeys;
    const float ks = s0 <= tq ? ksc[s0] : 0.f;
    ring.wait(it);
    issue(0, stage);
    issue(1, stage);
    float v[4], x[1];
    wgmma_wait<1>();
    wgmma_fence_operand(acc[0]);
    query_sum<NJ, true>(acc[0], wr[0], v[0], v[1]);
    wgmma_wait<0>();
    wgmma_fence_operand(acc[1]);
    query_sum<NJ, true>(acc[1], wr[1], v[2], v[3]);
    quad_reduce_scatter<4>(v, x, c4);
    if (s0 <= tq) orow[s0] = x[0] * ks;
    ring.release(it, lane);
  }
  for (; it < blk.ie; ++it) {
    ring.wait(it);
    ring.release(it, lane);
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

// The keys [B, T, D] e4m3 as a rank-3 tensor map (D innermost) with 64-key x D boxes in the layout
// the scoring kernels' descriptors read (128-byte swizzle at D = 128, 64-byte at D = 64); keys past T
// read as zeros. The driver's encoder comes through the runtime (no link against libcuda).
CUtensorMap key_tensor_map(const uint8_t* k, int B, int T, int D) {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                                             cudaEnableDefault, &found);
    DSA_CHECK(err == cudaSuccess && found == cudaDriverEntryPointSuccess && fn,
              "[indexer_scores] the driver has no cuTensorMapEncodeTiled (", cudaGetErrorString(err), ")");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  CUtensorMap map{};
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(D), static_cast<cuuint64_t>(T), static_cast<cuuint64_t>(B)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(D), static_cast<cuuint64_t>(T) * D};  // bytes, dims 1, 2
  const cuuint32_t box[3] = {static_cast<cuuint32_t>(D), static_cast<cuuint32_t>(kWgKeys), 1};
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  const CUresult r = encode(&map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 3, const_cast<uint8_t*>(k), dims, strides, box,
                            elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            D == 128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_64B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  DSA_CHECK(r == CUDA_SUCCESS, "[indexer_scores] cuTensorMapEncodeTiled refused the keys [", B, ", ", T, ", ", D,
            "] (CUresult ", static_cast<int>(r), ")");
  return map;
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
  // NOTES: where the query blocks alone leave SMs idle, the key prefix splits over gridDim.z (each split
  // writes its own keys' scores: no reduction). Long rows stream in small row blocks (the 256 MiB score
  // budget holds 512 rows at T = 128K: 16 CTAs at Hi = 16), which one CTA per query block left on 16 of
  // 132 SMs. Two waves of CTAs, and at least two key tiles per split.
  const int ctas = static_cast<int>(ceil_div(R, QB)) * B, want = 2 * sm_count(), tiles = (t0 + R - 1) / kWgKeys + 1;
  const int splits = ctas >= want ? 1 : std::max(1, std::min(static_cast<int>(ceil_div(want, ctas)), tiles / 2));
  dim3 grid(static_cast<unsigned>(ceil_div(R, QB)), static_cast<unsigned>(B), static_cast<unsigned>(splits));
  const CUtensorMap kmap = key_tensor_map(p.k, B, T, D);
  const size_t smem = score_smem_bytes(D);
  const auto kernel = Hi == 64 ? (D == 64 ? score_wgmma4_kernel<64> : score_wgmma4_kernel<128>)
                      : D == 64 ? (Hi == 16 ? score_wgmma_kernel<16, 64> : score_wgmma_kernel<32, 64>)
                                : (Hi == 16 ? score_wgmma_kernel<16, 128> : score_wgmma_kernel<32, 128>);
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  kernel<<<grid, Hi == 64 ? 4 * 128 : kWgThreads, smem, stream()>>>(kmap, p);
  check_launch("indexer_scores_wgmma");
  return true;
}

}  // namespace dsa_detail
}  // namespace dsa::cuda
