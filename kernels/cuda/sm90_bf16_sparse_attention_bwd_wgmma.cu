// Sparse MQA attention backward on wgmma (sm_90a) for 64 heads per CTA: the production MLA shape (H a
// multiple of 64, Dk 576, Dv 512). A CTA owns one token and 64 heads, two warpgroups; the token's selected
// latent rows are gathered by index in blocks of 64 (one stage: the Q and dO tiles take the rest of shared
// memory). Per block, warpgroup w:
//   S_w, dP_w [64 heads, 32 keys (32 w ..)] = Q K_w^T, dO V_w^T       m64n32k16, K-major tiles
//   P = exp2(S scale log2e - lse2), dS = P (dP - delta) scale  -> shared memory as [heads][keys] bf16 tiles
//   (and the head sums of P, the sparse KL's target, when asked)
//   dQ_w [64 heads, Dk / 2 columns (288 w ..)] += dS K                 m64n96k16 x 3, A = dS (K-major), B the
//                                                                     block's MN-major view; in registers
//   dKV [64 keys, the same 288 columns] = dS^T Q (+ P^T dO below Dv)   m64n96k16 pieces, A = dS^T and P^T
//                                                                     (the [heads][keys] tiles read MN-major),
//                                                                     B = the Q / dO tiles' MN-major views;
//                                                                     float4 atomics into the f32 dKV
// The composed reference is the mma.sync backward of sm90_bf16_sparse_attention_mma.cu (itself tested
// against the CPU); the tests run both on the same inputs.
//
// NOTES:
// - The default (DSA_SPARSE_ATTN_WGMMA=0 keeps the mma.sync kernel): 247 vs 153 TFLOP/s (ops bench count)
//   at the production shape (docs/perf_log.md v12).
// - Shared memory: Q 72 KiB + dO 64 KiB + one 72 KiB stage + P and dS 16 KiB = 224 KiB of the 227 the SM
//   allows (one CTA per SM), so there is one stage: the stage's last readers are S, dP and the dQ chain,
//   and the gather of block b + 1 is issued once both groups' dQ chains for block b are done, under block
//   b's dKV pieces and their scatter (they read Q, dO, P and dS only). The slots' indices are double
//   buffered (the scatter of block b reads them while block b + 1's land).
// - Registers: dQ 3 x 48 per thread over all blocks, one 48-register dKV piece at a time (S and dP are dead
//   by then).
// - DSA_SPARSE_ATTN_BWD_SPLIT=1 (0 / unset: off; anything else refused) takes a variant, NOT yet run on a GPU
//   (docs/perf_log.md v26): S on WG 0 and dP on WG 1, each m64n64 over all 64 keys (A = Q or dO read once a
//   block instead of twice), the halves crossed as f32 through sP / sdS; the dKV pieces 48 columns wide, two in
//   flight, so that a piece's MMAs run under the previous piece's scatter. 238 registers, no spills.
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "kernels/cuda/dsa_common.cuh"
#include "kernels/cuda/mma.cuh"
#include "kernels/cuda/sparse_attention_wgmma.cuh"

namespace dsa::cuda::dsa_detail {

namespace {

constexpr int kDK = 576, kDV = 512;   // the production MLA head dims (the only instantiation)
constexpr int kBN = kSparseBlock;     // keys per block: 32 per warpgroup in S and dP
constexpr int kThreads = 256;         // two warpgroups
static_assert(kThreads == 256, "gather_block_256 / gather_index_256: one gathered row a thread");
constexpr int kPW = 96;               // dQ / dKV columns per piece; Dk / 2 = 3 pieces per warpgroup
constexpr int kPD = 48;               // the split variant's dKV pieces: 6 per warpgroup, two in flight
constexpr float kLog2e = 1.4426950408889634f;

struct Plan {
  static constexpr int kQ = 64 * kDK, kO = 64 * kDV, kTile = kBN * kDK, kP = 64 * kBN;  // elements
  static constexpr size_t smem() { return size_t(kQ + kO + kTile + 2 * kP) * 2 + 2 * kBN * 4; }
};
static_assert(Plan::smem() <= 227 * 1024, "shared memory");
static_assert(kDK % (2 * kPW) == 0 && kDV % 32 == 0, "pieces");

// P and dS of the warpgroup's 32 keys (accumulator element 4 j + e: head row r0 + 8 (e / 2), key
// 32 wg + 8 j + 2 c + e % 2) into the [64 heads][64 keys] tiles; with probs, the 16 heads of this warp
// summed per key and added to probs (four warps, and H / 64 CTAs, per slot).
__device__ __forceinline__ void softmax_grad(const SparseAttnParams& p, int64_t bt, int blk, const int* ids, int wg,
                                             int r0, int g, int c, const float (&s)[16], const float (&dp)[16],
                                             const float (&lse2)[2], const float (&dlt)[2], __nv_bfloat16* sP,
                                             __nv_bfloat16* sdS) {
  const float sl2 = p.scale * kLog2e;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int key = 32 * wg + 8 * j + 2 * c;
    const bool ok[2] = {ids[key] >= 0, ids[key + 1] >= 0};
    float pv[4], dsv[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      pv[e] = ok[e % 2] ? exp2f(s[4 * j + e] * sl2 - lse2[e / 2]) : 0.f;
      dsv[e] = pv[e] * (dp[4 * j + e] - dlt[e / 2]) * p.scale;
    }
    if (p.probs) {
      float cs[2] = {pv[0] + pv[2], pv[1] + pv[3]};
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int o = 4; o < 32; o <<= 1) cs[i] += __shfl_xor_sync(0xffffffffu, cs[i], o);
        if (g == 0 && ok[i]) atomicAdd(p.probs + bt * p.K + blk * kBN + key + i, cs[i]);
      }
    }
    *reinterpret_cast<uint32_t*>(sP + tile_off<kBN>(r0, key)) = pack_bf16(pv[0], pv[1]);
    *reinterpret_cast<uint32_t*>(sP + tile_off<kBN>(r0 + 8, key)) = pack_bf16(pv[2], pv[3]);
    *reinterpret_cast<uint32_t*>(sdS + tile_off<kBN>(r0, key)) = pack_bf16(dsv[0], dsv[1]);
    *reinterpret_cast<uint32_t*>(sdS + tile_off<kBN>(r0 + 8, key)) = pack_bf16(dsv[2], dsv[3]);
  }
}

// S and dP of this warpgroup's 32 keys (32 wg ..) as m64n32 accumulators. kSplit: WG 0 computes S and WG 1 dP
// of all 64 keys at m64n64 (A = Q or dO read once, not by both), then the halves cross as f32 through sP / sdS
// (free until softmax_grad) thread to thread (the same accumulator positions): float4 [4][128], a warp's store
// 512 contiguous bytes.
template <bool kSplit>
__device__ __forceinline__ void scores_and_grads(const __nv_bfloat16* sQ, const __nv_bfloat16* sdO,
                                                 const __nv_bfloat16* sKV, __nv_bfloat16* sP, __nv_bfloat16* sdS,
                                                 int wg, float (&s)[16], float (&dp)[16]) {
  if constexpr (!kSplit) {
    const __nv_bfloat16* kv_w = sKV + 4 * wg * (kDK / 8) * 64;  // this group's 32 key rows
#pragma unroll
    for (int i = 0; i < 16; ++i) s[i] = dp[i] = 0.f;
    wgmma_fence_operand(s);
    wgmma_fence_operand(dp);
    wgmma_fence();
#pragma unroll 4
    for (int ks = 0; ks < kDK / 16; ++ks)
      WgmmaBf16<32>::ss<0, 0>(s, wgmma_desc(sQ + ks * 128, 128, kDK * 16), wgmma_desc(kv_w + ks * 128, 128, kDK * 16),
                              ks > 0);
#pragma unroll 4
    for (int ks = 0; ks < kDV / 16; ++ks)
      WgmmaBf16<32>::ss<0, 0>(dp, wgmma_desc(sdO + ks * 128, 128, kDV * 16), wgmma_desc(kv_w + ks * 128, 128, kDK * 16),
                              ks > 0);
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_operand(s);
    wgmma_fence_operand(dp);
  } else {
    float x[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) x[i] = 0.f;
    // Warp-uniform; the shuffle shows ptxas so (C7520 otherwise).
    const int nk = __shfl_sync(0xffffffffu, wg == 0 ? kDK / 16 : kDV / 16, 0);
    const __nv_bfloat16* a_t = wg == 0 ? sQ : sdO;
    const int a_sbo = (wg == 0 ? kDK : kDV) * 16;
    wgmma_fence_operand(x);
    wgmma_fence();
#pragma unroll 4
    for (int ks = 0; ks < nk; ++ks)  // B: the block's rows (V = their first 512 columns)
      WgmmaBf16<64>::ss<0, 0>(x, wgmma_desc(a_t + ks * 128, 128, a_sbo), wgmma_desc(sKV + ks * 128, 128, kDK * 16),
                              ks > 0);
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_operand(x);
    float4* give = reinterpret_cast<float4*>(wg == 0 ? sP : sdS) + (threadIdx.x & 127);
    const float4* take = reinterpret_cast<const float4*>(wg == 0 ? sdS : sP) + (threadIdx.x & 127);
    const bool w0 = wg == 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int i = 4 * k;
      give[128 * k] = w0 ? make_float4(x[16 + i], x[17 + i], x[18 + i], x[19 + i])
                         : make_float4(x[i], x[i + 1], x[i + 2], x[i + 3]);
    }
    named_bar_sync(1, kThreads);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float4 v = take[128 * k];
      const float o[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[4 * k + e] = w0 ? x[4 * k + e] : o[e];
        dp[4 * k + e] = w0 ? o[e] : x[16 + 4 * k + e];
      }
    }
    named_bar_sync(1, kThreads);  // both read before softmax_grad overwrites sP / sdS
  }
}

// dKV of the block into dkv (f32 rows of Dk, this sequence's): M = the block's 64 keys, K = the 64 heads (four
// k16 steps: head row blocks 2 ks, 2 ks + 1), A = dS^T / P^T (the [heads][keys] tiles read MN-major: lbo = the
// head row-block stride, sbo = 128), B = the Q / dO tiles read MN-major; this warpgroup's Dk / 2 columns in
// pieces of PW, each scattered (float4 atomics) once its MMAs are done. kSplit: pieces of kPD, two in flight
// (piece pc + 1's MMAs under piece pc's scatter).
template <int PW>
__device__ __forceinline__ void dkv_piece_issue(float (&a)[PW / 2], const __nv_bfloat16* sQ, const __nv_bfloat16* sdO,
                                                const __nv_bfloat16* sP, const __nv_bfloat16* sdS, int n0) {
#pragma unroll
  for (int i = 0; i < PW / 2; ++i) a[i] = 0.f;
  wgmma_fence_operand(a);
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < 4; ++ks)
    WgmmaBf16<PW>::template ss<1, 1>(a, wgmma_desc(sdS + 2 * ks * 8 * 64, kBN * 16, 128),
                                     wgmma_desc(sQ + (2 * ks * (kDK / 8) + n0 / 8) * 64, kDK * 16, 128), 1);
  if (kDV - n0 >= PW) {
#pragma unroll
    for (int ks = 0; ks < 4; ++ks)
      WgmmaBf16<PW>::template ss<1, 1>(a, wgmma_desc(sP + 2 * ks * 8 * 64, kBN * 16, 128),
                                       wgmma_desc(sdO + (2 * ks * (kDV / 8) + n0 / 8) * 64, kDV * 16, 128), 1);
  } else if (kDV - n0 == 32) {  // 480 .. 511: the piece's first 32 columns, its first 16 registers
#pragma unroll
    for (int ks = 0; ks < 4; ++ks)
      WgmmaBf16<32>::ss<1, 1>(*reinterpret_cast<float(*)[16]>(a), wgmma_desc(sP + 2 * ks * 8 * 64, kBN * 16, 128),
                              wgmma_desc(sdO + (2 * ks * (kDV / 8) + n0 / 8) * 64, kDV * 16, 128), 1);
  }
  wgmma_commit();
}
template <bool kSplit>
__device__ __forceinline__ void dkv_pieces(float* dkv, const __nv_bfloat16* sQ, const __nv_bfloat16* sdO,
                                           const __nv_bfloat16* sP, const __nv_bfloat16* sdS, const int* ids, int wg,
                                           int r0, int c) {
  // n0 warp-uniform through a shuffle: a branch on wg alone makes ptxas serialize every wgmma (C7520).
  auto col0 = [&](int pc, int pw) { return __shfl_sync(0xffffffffu, wg * (kDK / 2) + pc * pw, 0); };
  if constexpr (!kSplit) {
#pragma unroll 1
    for (int pc = 0; pc < kDK / 2 / kPW; ++pc) {
      const int n0 = col0(pc, kPW);
      float acc[kPW / 2];
      dkv_piece_issue<kPW>(acc, sQ, sdO, sP, sdS, n0);
      wgmma_wait<0>();
      wgmma_fence_operand(acc);
      scatter_rows<kPW>(dkv, kDK, ids, r0, c, acc, n0);
    }
  } else {
    constexpr int kN = kDK / 2 / kPD;
    float acc[2][kPD / 2];
    dkv_piece_issue<kPD>(acc[0], sQ, sdO, sP, sdS, col0(0, kPD));
#pragma unroll
    for (int pc = 0; pc < kN; ++pc) {
      if (pc + 1 < kN) {
        dkv_piece_issue<kPD>(acc[(pc + 1) & 1], sQ, sdO, sP, sdS, col0(pc + 1, kPD));
        wgmma_wait<1>();
      } else {
        wgmma_wait<0>();
      }
      wgmma_fence_operand(acc[pc & 1]);
      scatter_rows<kPD>(dkv, kDK, ids, r0, c, acc[pc & 1], wg * (kDK / 2) + pc * kPD);
    }
  }
}

template <bool kSplit>
__global__ void __launch_bounds__(kThreads, 1) sparse_attn_bwd_wgmma_kernel(const SparseAttnParams p) {
  using C = Plan;
  extern __shared__ __align__(128) unsigned char smem[];
  __nv_bfloat16* sQ = reinterpret_cast<__nv_bfloat16*>(smem);  // [64 heads][576] core-matrix tile
  __nv_bfloat16* sdO = sQ + C::kQ;                               // [64 heads][512]
  __nv_bfloat16* sKV = sdO + C::kO;                              // [64 keys][576]
  __nv_bfloat16* sP = sKV + C::kTile;                            // [64 heads][64 keys]
  __nv_bfloat16* sdS = sP + C::kP;                               // [64 heads][64 keys]
  int* sIdx = reinterpret_cast<int*>(sdS + C::kP);               // [2][64] (block parity)
  const int groups = p.H / 64;
  const int64_t bt = blockIdx.x / groups, b = bt / p.T, t = bt % p.T;
  const int h0 = (blockIdx.x % groups) * 64;
  const int wg = threadIdx.x / 128, wi = (threadIdx.x / 32) % 4, g = (threadIdx.x % 32) / 4, c = threadIdx.x % 4;
  const int r0 = 16 * wi + g;  // rows r0, r0 + 8: heads in S, dP, dQ; keys in the dKV pieces
  const int nblk = (p.K + kBN - 1) / kBN;

  load_dense_rows<kDK, 64, kThreads>(sQ, p.q + (bt * p.H + h0) * kDK, kDK);
  load_dense_rows<kDV, 64, kThreads>(sdO, p.dout + (bt * p.H + h0) * kDV, kDV);
  // mine: one of this thread's gathered rows of the block in the stage is a valid slot.
  bool mine = gather_block<kDK, kThreads>(p.kv, p.idx, p.K, p.T, bt, 0, sKV, sIdx);
  cp_async_commit();
  int s_next = gather_index_256(p.idx, p.K, bt, 1);  // this thread's slot index of block 1, then blk + 2
  auto gather_next = [&](int blk) {  // block blk + 1 into the stage (every reader of the stage is done)
    mine = blk + 1 < nblk && gather_block_256<kDK>(p.kv, s_next, p.T, bt, sKV, sIdx + ((blk + 1) & 1) * kBN);
    cp_async_commit();
    s_next = gather_index_256(p.idx, p.K, bt, blk + 2);
  };
  float lse2[2], dlt[2];  // rows r0, r0 + 8: lse in log2 units (+inf: empty row, P = 0), delta
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int h = h0 + r0 + 8 * i;
    const float l = p.lse[(b * p.H + h) * p.T + t];
    lse2[i] = l == -INFINITY ? INFINITY : l * kLog2e;
    dlt[i] = p.delta[bt * p.H + h];
  }
  float dq[kDK / 2 / kPW][kPW / 2];
#pragma unroll
  for (int pc = 0; pc < kDK / 2 / kPW; ++pc)
#pragma unroll
    for (int i = 0; i < kPW / 2; ++i) dq[pc][i] = 0.f;

  for (int blk = 0; blk < nblk; ++blk) {
    cp_async_wait<0>();
    fence_proxy_async();
    // The barrier in block_any: the block's rows landed for all, the previous block's readers of sP and sdS
    // done.
    if (!block_any(mine)) {
      gather_next(blk);
      continue;
    }
    const int* ids = sIdx + (blk & 1) * kBN;

    float s[16], dp[16];
    scores_and_grads<kSplit>(sQ, sdO, sKV, sP, sdS, wg, s, dp);
    softmax_grad(p, bt, blk, ids, wg, r0, g, c, s, dp, lse2, dlt, sP, sdS);
    fence_proxy_async();
    __syncthreads();  // both groups' P and dS in shared memory

    // dQ_w += dS K: K = the block's 64 keys; N = this group's 288 columns in three pieces.
#pragma unroll
    for (int pc = 0; pc < kDK / 2 / kPW; ++pc) wgmma_fence_operand(dq[pc]);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kBN / 16; ++ks) {
      const uint64_t da = wgmma_desc(sdS + ks * 128, 128, kBN * 16);
#pragma unroll
      for (int pc = 0; pc < kDK / 2 / kPW; ++pc) {
        const int n0 = wg * (kDK / 2) + pc * kPW;
        WgmmaBf16<kPW>::ss<0, 1>(dq[pc], da, wgmma_desc(sKV + (2 * ks * (kDK / 8) + n0 / 8) * 64, kDK * 16, 128), 1);
      }
    }
    wgmma_commit();
    wgmma_wait<0>();
#pragma unroll
    for (int pc = 0; pc < kDK / 2 / kPW; ++pc) wgmma_fence_operand(dq[pc]);
    __syncthreads();  // both groups' S, dP and dQ reads of the stage done
    gather_next(blk);

    dkv_pieces<kSplit>(p.dkv + b * p.T * kDK, sQ, sdO, sP, sdS, ids, wg, r0, c);
  }
  cp_async_wait<0>();

  // dQ: element 4 j + e of piece pc is (head r0 + 8 (e / 2), column 288 wg + 96 pc + 8 j + 2 c + e % 2).
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    __nv_bfloat16* row = p.dq + (bt * p.H + h0 + r0 + 8 * i) * kDK + wg * (kDK / 2);
#pragma unroll
    for (int pc = 0; pc < kDK / 2 / kPW; ++pc)
#pragma unroll
      for (int j = 0; j < kPW / 8; ++j)
        *reinterpret_cast<uint32_t*>(row + pc * kPW + 8 * j + 2 * c) =
            pack_bf16(dq[pc][4 * j + 2 * i], dq[pc][4 * j + 2 * i + 1]);
  }
}

}  // namespace

bool sparse_attention_wgmma_backward(const SparseAttnParams& p, int dk, int dv) {
  const char* e = std::getenv("DSA_SPARSE_ATTN_BWD_SPLIT");  // read (and a bad value refused) on every device
  DSA_CHECK(!e || !*e || std::strcmp(e, "0") == 0 || std::strcmp(e, "1") == 0,
            "[sparse_attention] DSA_SPARSE_ATTN_BWD_SPLIT must be 0, 1 or unset, got '", e, "'");
  const bool split = e && *e == '1';
  if (sparse_attention_wgmma_mode() == SparseWgmmaMode::kOff) return false;
  if (p.H % 64 != 0) return sparse_attention_wgmma16_backward(p, dk, dv);
  if (dk != kDK || dv != kDV) return false;  // 288 / 256 with 64-head groups: the mma.sync kernel
  auto kernel = split ? sparse_attn_bwd_wgmma_kernel<true> : sparse_attn_bwd_wgmma_kernel<false>;
  DSA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(Plan::smem())));
  const int64_t blocks = int64_t(p.B) * p.T * (p.H / 64);
  kernel<<<static_cast<unsigned>(blocks), kThreads, Plan::smem(), stream()>>>(p);
  check_launch("sparse_attention_backward");
  return true;
}

}  // namespace dsa::cuda::dsa_detail
