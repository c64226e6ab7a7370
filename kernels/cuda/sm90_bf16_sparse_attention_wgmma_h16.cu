// Sparse MQA attention on wgmma (sm_90a) for 16 heads per CTA (bench-small, V2-Lite and Moonlight have
// H = 16), forward and backward. The products are transposed so that wgmma's 64-row M runs over a block of
// 64 selected keys instead of over heads. A CTA (one warpgroup) owns one token and 16 heads; the token's
// selected latent rows are gathered by index in blocks of 64 (sparse_attention_wgmma.cuh). Per block:
//   S^T  [64 keys, 16 heads] = K Q^T              wgmma m64n16k16, both K-major tiles
// Forward:
//   online softmax down the columns (a head's keys are the rows: maxima over lanes and the four warps)
//   O^T  [Dv, 16 heads] += V^T P^T                A the MN-major view of the block (V = its first Dv
//                                                 columns), B P^T from shared memory; 64-row pieces
// Backward:
//   dP^T [64 keys, 16 heads] = V dO^T
//   P^T = exp2(S^T scale log2e - lse2), dS^T = P^T (dP^T - delta) scale, in registers (and the head sums
//   of P^T, the sparse KL's target, when asked: a row sum here)
//   dKV [64 keys, Dk] = dS^T Q (+ P^T dO on the first Dv columns): A from registers (the accumulators
//   repacked as bf16: all 16 heads are one k16 step), B the MN-major views of the Q and dO tiles, in
//   96-column pieces scattered into the f32 dKV with float4 atomics (one row per selected key)
//   dQ^T [Dk, 16 heads] += K^T dS^T               A the MN-major view of the block, B dS^T from shared
//                                                 memory; held in registers over all blocks (64-row pieces)
// The composed references are the mma.sync kernels of sm90_bf16_sparse_attention_mma.cu (themselves tested
// against the CPU); the tests run both on the same inputs.
//
// NOTES:
// - Measured (bench-small T = 16K, K = 512, one H200, docs/perf_log.md v12): the backward 4.25 ms vs the
//   mma.sync kernel's 6.53, the default; the forward 2.18 vs 1.85 ms, so it runs only under
//   DSA_SPARSE_ATTN_WGMMA=1 (N = 16 per wgmma: each instruction reads a 64-row A tile from shared memory
//   for 16 columns of work, where the mma.sync kernel holds Q in registers).
// - Why transposed: with 16 heads the mma.sync kernels' M = 16 rows of heads per warp re-read every
//   gathered row per 16 heads, and the backward ran at ~45 TFLOP/s with 6 warps per SM (v5 ncu). Here one
//   warpgroup per CTA and at most 108 KiB of shared memory (576 / 512 takes one stage): two CTAs per SM.
// - The last 64-row piece of dQ^T runs past Dk when Dk % 64 != 0 (288): its extra rows read the next key
//   row block (or the tile's padding) and are never stored; rows of a product do not mix.
// - dKV atomics: the volume is T K Dk f32 per head group whatever the tiling (the mma.sync kernel's too).
#include <cmath>

#include "kernels/cuda/dsa_common.cuh"
#include "kernels/cuda/mma.cuh"
#include "kernels/cuda/sparse_attention_wgmma.cuh"

namespace dsa::cuda::dsa_detail {

namespace {

constexpr int kBN = kSparseBlock;  // keys per block = wgmma's M
constexpr int kThreads = 128;  // one warpgroup
constexpr int kNC = 96;        // dKV columns per piece
constexpr float kLog2e = 1.4426950408889634f;

template <int DK, int DV, int ST>
struct Cfg16 {
  static constexpr int kQ = 16 * DK, kO = 16 * DV, kTile = kBN * DK;  // elements of sQ, sdO, one stage
  static constexpr int kM = (DK + 63) / 64;                            // dQ^T 64-row pieces
  static constexpr int kPad = (kM * 64 - DK) / 8 * 64;                // elements the last piece reads past
  static constexpr int kS = kBN * 16;                                   // elements of sdS / sP
  // Backward: sQ, sdO, the stages (+ kPad), sdS, sIdx. Forward: sQ, the stages, sP, sIdx, red [4][16].
  static constexpr size_t bwd_smem() { return size_t(kQ + kO + ST * kTile + kPad + kS) * 2 + ST * kBN * 4; }
  static constexpr size_t fwd_smem() { return size_t(kQ + ST * kTile + kPad + kS) * 2 + ST * kBN * 4 + 64 * 4; }
  static_assert(DK % kNC == 0 && DV % 64 == 0 && DV <= DK && (ST == 1 || ST == 2), "tile shapes");
  static_assert(bwd_smem() <= 113 * 1024 && fwd_smem() <= bwd_smem(), "two CTAs per SM");
};

// The CTA's place: token bt = (b, t), heads h0 .. h0 + 15; thread (warp wi, lane 4 g + c) holds the
// accumulator rows r0 = 16 wi + g and r0 + 8 (keys, or dims of a transposed output) and the head columns
// 8 j + 2 c + {0, 1}, j = 0, 1.
struct Geom16 {
  int64_t bt, b, t;
  int h0, wi, g, c, r0;
  __device__ explicit Geom16(const SparseAttnParams& p) {
    const int groups = p.H / 16;
    bt = blockIdx.x / groups, b = bt / p.T, t = bt % p.T;
    h0 = (blockIdx.x % groups) * 16;
    wi = threadIdx.x / 32, g = (threadIdx.x % 32) / 4, c = threadIdx.x % 4;
    r0 = 16 * wi + g;
  }
};

// The ST-stage ring (1 or 2) of a token's gathered blocks. next(blk) leaves block blk in stage blk % ST
// for every thread (copies landed and fenced for wgmma's async proxy, behind a barrier) and returns whether
// it holds a valid slot (CTA-uniform); with two stages it then issues block blk + 1 into the other stage,
// whose readers (block blk - 1) have passed that barrier; with one it first waits for them (a barrier).
template <int DK, int ST>
struct Ring16 {
  const __nv_bfloat16* kv;  // the kernel's pointers and sizes, by value (a reference to the kernel's
  const int32_t* idx;       // parameter would copy it to local memory)
  int K, T, nblk;
  int64_t bt;
  __nv_bfloat16* sKV;
  int* sIdx;
  unsigned live_bits = 0;
  __device__ Ring16(const SparseAttnParams& p, int64_t bt_, __nv_bfloat16* skv, int* sidx)
      : kv(p.kv), idx(p.idx), K(p.K), T(p.T), nblk((p.K + kBN - 1) / kBN), bt(bt_), sKV(skv), sIdx(sidx) {
    if constexpr (ST == 2) {
      if (gather(0, 0)) live_bits = 1u;
      cp_async_commit();
    }
  }
  __device__ bool gather(int blk, int st) {
    return gather_block<DK, kThreads>(kv, idx, K, T, bt, blk, sKV + st * kBN * DK, sIdx + st * kBN);
  }
  __device__ bool next(int blk) {
    const int st = blk % ST;
    if constexpr (ST == 1) {
      __syncthreads();
      live_bits = gather(blk, 0) ? 1u : 0u;
      cp_async_commit();
    }
    cp_async_wait<0>();
    fence_proxy_async();
    const bool live = block_any((live_bits >> st) & 1u);
    if constexpr (ST == 2) {
      const int ns = (blk + 1) % 2;
      live_bits &= ~(1u << ns);
      if (blk + 1 < nblk && gather(blk + 1, ns)) live_bits |= 1u << ns;
      cp_async_commit();
    }
    return live;
  }
};

// acc [64 rows, 16 heads] = a [64 rows][first D columns of LDA] . b [16 heads][D of LDB]^T: the chain of
// K-major m64n16k16 products (issued; the caller fences, commits and waits).
template <int D, int LDA, int LDB>
__device__ __forceinline__ void chain_n16(float (&acc)[8], const __nv_bfloat16* a, const __nv_bfloat16* b) {
#pragma unroll 4
  for (int ks = 0; ks < D / 16; ++ks)
    WgmmaBf16<16>::ss<0, 0>(acc, wgmma_desc(a + ks * 128, 128, LDA * 16), wgmma_desc(b + ks * 128, 128, LDB * 16),
                                  ks > 0);
}

// ------------------------------------------------------------------------------------------- forward
template <int DK, int DV, int ST>
__global__ void __launch_bounds__(kThreads, 2) sparse_attn_fwd_wgmma16_kernel(const SparseAttnParams p) {
  using C = Cfg16<DK, DV, ST>;
  extern __shared__ __align__(128) unsigned char smem[];
  __nv_bfloat16* sQ = reinterpret_cast<__nv_bfloat16*>(smem);  // [16 heads][DK] core-matrix tile
  __nv_bfloat16* sKV = sQ + C::kQ;                               // [ST][64 keys][DK] (+ kPad)
  __nv_bfloat16* sP = sKV + ST * C::kTile + C::kPad;             // P^T: [64 keys][16 heads], MN-major B
  int* sIdx = reinterpret_cast<int*>(sP + C::kS);                // [ST][64]
  float* red = reinterpret_cast<float*>(sIdx + ST * kBN);        // [4 warps][16 heads]
  const Geom16 G(p);
  const int64_t bt = G.bt, b = G.b, t = G.t;
  const int h0 = G.h0, wi = G.wi, g = G.g, c = G.c, r0 = G.r0;

  load_dense_rows<DK, 16, kThreads>(sQ, p.q + (bt * p.H + h0) * DK, DK);
  cp_async_commit();
  Ring16<DK, ST> ring(p, bt, sKV, sIdx);
  constexpr int kMO = DV / 64;  // O^T 64-row pieces
  float o[kMO][8];
#pragma unroll
  for (int mc = 0; mc < kMO; ++mc)
#pragma unroll
    for (int i = 0; i < 8; ++i) o[mc][i] = 0.f;
  // Per head column [j][e % 2] (head 8 j + 2 c + e % 2): the running max (log2 units, the same in every
  // thread) and this thread's part of the running sum (its two rows).
  float m_run[2][2] = {{-INFINITY, -INFINITY}, {-INFINITY, -INFINITY}}, l_part[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
  const float sl2 = p.scale * kLog2e;

  for (int blk = 0; blk < ring.nblk; ++blk) {
    const int st = blk % ST;
    if (!ring.next(blk)) continue;
    const __nv_bfloat16* kvs = sKV + st * C::kTile;
    const int* ids = sIdx + st * kBN;

    float s[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) s[i] = 0.f;
    wgmma_fence_operand(s);
    wgmma_fence();
    chain_n16<DK, DK, DK>(s, kvs, sQ);
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_operand(s);

    // Mask and scale; each head's max over the block's 64 keys: the thread's two rows, the warp's eight
    // row groups (lanes 4 apart), then the four warps.
    const bool ok[2] = {ids[r0] >= 0, ids[r0 + 8] >= 0};
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        s[4 * j + e] = ok[0] ? s[4 * j + e] * sl2 : -INFINITY;
        s[4 * j + 2 + e] = ok[1] ? s[4 * j + 2 + e] * sl2 : -INFINITY;
        float m = fmaxf(s[4 * j + e], s[4 * j + 2 + e]);
#pragma unroll
        for (int o2 = 4; o2 < 32; o2 <<= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o2));
        if (g == 0) red[wi * 16 + 8 * j + 2 * c + e] = m;
      }
    __syncthreads();
    float alpha[2][2], mu[2][2];
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = 8 * j + 2 * c + e;
        const float bm = fmaxf(fmaxf(red[col], red[16 + col]), fmaxf(red[32 + col], red[48 + col]));
        const float m_new = fmaxf(m_run[j][e], bm);
        alpha[j][e] = m_new == -INFINITY ? 1.f : exp2f(m_run[j][e] - m_new);
        mu[j][e] = m_new == -INFINITY ? 0.f : m_new;
        m_run[j][e] = m_new;
        l_part[j][e] *= alpha[j][e];
      }
    // P^T (bf16) to shared memory as the product's B, the layout of the backward's dS^T.
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      float pr[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        pr[e] = exp2f(s[4 * j + e] - mu[j][e % 2]);
        l_part[j][e % 2] += pr[e];
      }
      const int h = 8 * j + 2 * c;
      *reinterpret_cast<uint32_t*>(sP + ((r0 >> 3) * 2 + j) * 64 + (r0 & 7) * 8 + (h & 7)) = pack_bf16(pr[0], pr[1]);
      *reinterpret_cast<uint32_t*>(sP + (((r0 + 8) >> 3) * 2 + j) * 64 + (r0 & 7) * 8 + (h & 7)) =
          pack_bf16(pr[2], pr[3]);
    }
#pragma unroll
    for (int mc = 0; mc < kMO; ++mc)
#pragma unroll
      for (int i = 0; i < 8; ++i) o[mc][i] *= alpha[i / 4][i % 2];
    fence_proxy_async();
    __syncthreads();

    // O^T += V^T P^T: 64-row pieces of Dv, K = the block's 64 keys.
#pragma unroll
    for (int mc = 0; mc < kMO; ++mc) wgmma_fence_operand(o[mc]);
    wgmma_fence();
#pragma unroll
    for (int mc = 0; mc < kMO; ++mc)
#pragma unroll
      for (int ks = 0; ks < kBN / 16; ++ks)
        WgmmaBf16<16>::ss<1, 1>(o[mc], wgmma_desc(kvs + (2 * ks * (DK / 8) + 8 * mc) * 64, DK * 16, 128),
                                      wgmma_desc(sP + 2 * ks * 2 * 64, 256, 128), 1);
    wgmma_commit();
    wgmma_wait<0>();
#pragma unroll
    for (int mc = 0; mc < kMO; ++mc) wgmma_fence_operand(o[mc]);
  }
  cp_async_wait<0>();

  // Each head's sum: the warp's row groups, then the four warps (every read of red above is behind the
  // barrier that preceded the last P V).
  float l[2][2];
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float v = l_part[j][e];
#pragma unroll
      for (int o2 = 4; o2 < 32; o2 <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o2);
      if (g == 0) red[wi * 16 + 8 * j + 2 * c + e] = v;
    }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int col = 8 * j + 2 * c + e;
      l[j][e] = (red[col] + red[16 + col]) + (red[32 + col] + red[48 + col]);
      if (wi == 0 && g == 0)
        p.lse[(b * p.H + h0 + col) * p.T + t] =
            l[j][e] > 0.f ? m_run[j][e] * 0.6931471805599453f + logf(l[j][e]) : -INFINITY;
    }
  // O^T element 4 j + e of piece mc is (dim 64 mc + 16 wi + g + 8 (e / 2), head 8 j + 2 c + e % 2).
#pragma unroll
  for (int mc = 0; mc < kMO; ++mc)
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int j = i / 4, e = i % 4, dim = 64 * mc + 16 * wi + g + 8 * (e / 2), h = h0 + 8 * j + 2 * c + e % 2;
      const float lv = l[j][e % 2];
      p.out[(bt * p.H + h) * DV + dim] = __float2bfloat16_rn(lv > 0.f ? o[mc][i] / lv : 0.f);
    }
}

// ------------------------------------------------------------------------------------------ backward
template <int DK, int DV, int ST>
__global__ void __launch_bounds__(kThreads, 2) sparse_attn_bwd_wgmma16_kernel(const SparseAttnParams p) {
  using C = Cfg16<DK, DV, ST>;
  extern __shared__ __align__(128) unsigned char smem[];
  __nv_bfloat16* sQ = reinterpret_cast<__nv_bfloat16*>(smem);  // [16 heads][DK] core-matrix tile
  __nv_bfloat16* sdO = sQ + C::kQ;                               // [16 heads][DV]
  __nv_bfloat16* sKV = sdO + C::kO;                              // [ST][64 keys][DK] (+ kPad)
  __nv_bfloat16* sdS = sKV + ST * C::kTile + C::kPad;            // dS^T: [64 keys][16 heads], MN-major B
  int* sIdx = reinterpret_cast<int*>(sdS + C::kS);               // [ST][64]
  const Geom16 G(p);
  const int64_t bt = G.bt, b = G.b, t = G.t;
  const int h0 = G.h0, wi = G.wi, g = G.g, c = G.c, r0 = G.r0;

  load_dense_rows<DK, 16, kThreads>(sQ, p.q + (bt * p.H + h0) * DK, DK);
  load_dense_rows<DV, 16, kThreads>(sdO, p.dout + (bt * p.H + h0) * DV, DV);
  cp_async_commit();
  Ring16<DK, ST> ring(p, bt, sKV, sIdx);
  float lse2[2][2], dlt[2][2];  // [column group j][e & 1]: lse in log2 units (+inf: empty row, P = 0), delta
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int h = h0 + 8 * j + 2 * c + e;
      const float l = p.lse[(b * p.H + h) * p.T + t];
      lse2[j][e] = l == -INFINITY ? INFINITY : l * kLog2e;
      dlt[j][e] = p.delta[bt * p.H + h];
    }
  float dq[C::kM][8];
#pragma unroll
  for (int mc = 0; mc < C::kM; ++mc)
#pragma unroll
    for (int i = 0; i < 8; ++i) dq[mc][i] = 0.f;
  const float sl2 = p.scale * kLog2e;

  for (int blk = 0; blk < ring.nblk; ++blk) {
    const int st = blk % ST;
    if (!ring.next(blk)) continue;
    const __nv_bfloat16* kvs = sKV + st * C::kTile;
    const int* ids = sIdx + st * kBN;

    // S^T and dP^T: 64 keys x 16 heads each.
    float s[8], dp[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) s[i] = dp[i] = 0.f;
    wgmma_fence_operand(s);
    wgmma_fence_operand(dp);
    wgmma_fence();
    chain_n16<DK, DK, DK>(s, kvs, sQ);
    chain_n16<DV, DK, DV>(dp, kvs, sdO);  // V = the block's first Dv columns
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_operand(s);
    wgmma_fence_operand(dp);

    // P^T, dS^T (accumulator element 4 j + e: key row r0 + 8 (e / 2), head 8 j + 2 c + e % 2).
    const bool ok[2] = {ids[r0] >= 0, ids[r0 + 8] >= 0};
    float pv[8], dsv[8];
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = 4 * j + e;
        pv[i] = ok[e / 2] ? exp2f(s[i] * sl2 - lse2[j][e % 2]) : 0.f;
        dsv[i] = pv[i] * (dp[i] - dlt[j][e % 2]) * p.scale;
      }
    if (p.probs) {  // head sums of P: this CTA's 16 heads of each key row
      float ps[2] = {pv[0] + pv[1] + pv[4] + pv[5], pv[2] + pv[3] + pv[6] + pv[7]};
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        ps[i] += __shfl_xor_sync(0xffffffffu, ps[i], 1);
        ps[i] += __shfl_xor_sync(0xffffffffu, ps[i], 2);
        if (c == 0 && ok[i]) atomicAdd(p.probs + bt * p.K + blk * kBN + r0 + 8 * i, ps[i]);
      }
    }
    // The m64nNk16 A operand of the 16-head contraction: {(g, 2c), (g + 8, 2c), (g, 2c + 8), (g + 8, 2c + 8)}.
    const uint32_t a_ds[4] = {pack_bf16(dsv[0], dsv[1]), pack_bf16(dsv[2], dsv[3]), pack_bf16(dsv[4], dsv[5]),
                              pack_bf16(dsv[6], dsv[7])};
    const uint32_t a_p[4] = {pack_bf16(pv[0], pv[1]), pack_bf16(pv[2], pv[3]), pack_bf16(pv[4], pv[5]),
                             pack_bf16(pv[6], pv[7])};
    // dS^T to shared memory as dQ^T's B: [64 keys][16 heads] core matrices (8 keys x 8 contiguous heads),
    // key-block stride 256 bytes, head-block stride 128.
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int h = 8 * j + 2 * c;
      *reinterpret_cast<uint32_t*>(sdS + ((r0 >> 3) * 2 + j) * 64 + (r0 & 7) * 8 + (h & 7)) = a_ds[2 * j];
      *reinterpret_cast<uint32_t*>(sdS + (((r0 + 8) >> 3) * 2 + j) * 64 + (r0 & 7) * 8 + (h & 7)) = a_ds[2 * j + 1];
    }
    fence_proxy_async();
    __syncthreads();

    // dQ^T += K^T dS^T: 64-row pieces of Dk, K = the block's 64 keys; issued now, waited with the first
    // dKV piece.
#pragma unroll
    for (int mc = 0; mc < C::kM; ++mc) wgmma_fence_operand(dq[mc]);
    wgmma_fence();
#pragma unroll
    for (int mc = 0; mc < C::kM; ++mc)
#pragma unroll
      for (int ks = 0; ks < kBN / 16; ++ks)
        WgmmaBf16<16>::ss<1, 1>(dq[mc], wgmma_desc(kvs + (2 * ks * (DK / 8) + 8 * mc) * 64, DK * 16, 128),
                                      wgmma_desc(sdS + 2 * ks * 2 * 64, 256, 128), 1);
    wgmma_commit();

    // dKV pieces: dS^T Q (+ P^T dO below Dv), scattered into dkv.
#pragma unroll
    for (int n0 = 0; n0 < DK; n0 += kNC) {
      float acc[kNC / 2];
#pragma unroll
      for (int i = 0; i < kNC / 2; ++i) acc[i] = 0.f;
      wgmma_fence_operand(acc);
      wgmma_fence();
      WgmmaBf16<kNC>::rs<1>(acc, a_ds, wgmma_desc(sQ + (n0 / 8) * 64, DK * 16, 128), 0);
      const uint64_t d_o = wgmma_desc(sdO + (n0 / 8) * 64, DV * 16, 128);
      if (DV - n0 >= 96) {  // (DV % 32 == 0: what is left below Dv is 0, 32 or 64 columns)
        WgmmaBf16<96>::rs<1>(acc, a_p, d_o, 1);
      } else if (DV - n0 >= 64) {  // the accumulator's first 64 columns are its first 32 registers
        WgmmaBf16<64>::rs<1>(*reinterpret_cast<float(*)[32]>(acc), a_p, d_o, 1);
      } else if (DV - n0 >= 32) {
        WgmmaBf16<32>::rs<1>(*reinterpret_cast<float(*)[16]>(acc), a_p, d_o, 1);
      }
      wgmma_commit();
      wgmma_wait<0>();
      wgmma_fence_operand(acc);
      scatter_rows<kNC>(p.dkv + b * p.T * DK, DK, ids, r0, c, acc, n0);
    }
#pragma unroll
    for (int mc = 0; mc < C::kM; ++mc) wgmma_fence_operand(dq[mc]);
  }
  cp_async_wait<0>();

  // dQ: dQ^T element 4 j + e of piece mc is (dim 64 mc + 16 wi + g + 8 (e / 2), head 8 j + 2 c + e % 2).
#pragma unroll
  for (int mc = 0; mc < C::kM; ++mc)
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int dim = 64 * mc + 16 * wi + g + 8 * (e / 2), h = h0 + 8 * j + 2 * c + e % 2;
        if (dim < DK) p.dq[(bt * p.H + h) * DK + dim] = __float2bfloat16_rn(dq[mc][4 * j + e]);
      }
}

// One CTA per (token, 16-head group), two per SM.
template <class Kernel>
void launch16(Kernel kern, size_t smem, const SparseAttnParams& p, const char* op) {
  DSA_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const int64_t blocks = int64_t(p.B) * p.T * (p.H / 16);
  kern<<<static_cast<unsigned>(blocks), kThreads, smem, stream()>>>(p);
  check_launch(op);
}

// The instantiations as types: (576, 512) takes one stage (two CTAs per SM), (288, 256) two. Calls
// launch(Dims<...>{}) for (dk, dv); false where there is none.
template <int DK, int DV, int ST>
struct Dims {
  static constexpr int kDK = DK, kDV = DV, kST = ST;
};
template <class Launch>
bool by_dims(int dk, int dv, Launch launch) {
  if (dk == 576 && dv == 512) launch(Dims<576, 512, 1>{});
  else if (dk == 288 && dv == 256) launch(Dims<288, 256, 2>{});
  else return false;
  return true;
}

}  // namespace

bool sparse_attention_wgmma16_forward(const SparseAttnParams& p, int dk, int dv) {
  return p.H % 16 == 0 && by_dims(dk, dv, [&](auto d) {
    using D = decltype(d);
    launch16(sparse_attn_fwd_wgmma16_kernel<D::kDK, D::kDV, D::kST>, Cfg16<D::kDK, D::kDV, D::kST>::fwd_smem(), p,
             "sparse_attention_forward");
  });
}

bool sparse_attention_wgmma16_backward(const SparseAttnParams& p, int dk, int dv) {
  return p.H % 16 == 0 && by_dims(dk, dv, [&](auto d) {
    using D = decltype(d);
    launch16(sparse_attn_bwd_wgmma16_kernel<D::kDK, D::kDV, D::kST>, Cfg16<D::kDK, D::kDV, D::kST>::bwd_smem(), p,
             "sparse_attention_backward");
  });
}

}  // namespace dsa::cuda::dsa_detail
