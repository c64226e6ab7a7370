// Dense (warm-up) indexer KL loss and the indexer's recall on the GPU, flash-style: the head-summed
// target A[t, s] = sum_h exp(scale q_h,t . k_s - lse_h,t) and the indexer scores I[t, s] are rebuilt
// tile by tile with bf16 tensor-core products and never stored: on Hopper the fused passes take wgmma
// (one 64 x 64 quarter of a 64-row x 128-key tile per warpgroup, operands in the no-swizzle core-matrix
// layout; DSA_KL_WGMMA=0 keeps mma.sync), the backward kernels mma.sync.
//   stats pass (one launch, every row): per row Z = sum_s A, sum_s A log A, sum_s A I and an online
//     logsumexp of I; KL_t = (sum A log A - sum A I) / Z - log Z + lse(I) (p = A / Z sums to 1, exactly
//     the CPU's normalization by the actual row sum);
//   gradient (per chunk of query rows): the same tiles again give dI = gs (exp(I - lse I) - A / Z) into
//     an f32 chunk [B, R, T]; then a query-head-row kernel (rows (t, j), as the scoring kernel) forms
//     dq_I and dw_I in registers, and a key-major kernel forms dk_I in registers (no atomics; the rows
//     split into pieces where the key tiles alone leave the GPU idle, added in order), both
//     recomputing z = q_I . k_I on the unquantized operands (straight-through over FP8, as the CPU).
// Recall: the stats pass over chunks of rows with a per-chunk bitmap of the distinct selected keys.
// NOTES: the fp8 scores use the dequantized Hadamard/FP8 operands (indexer_fp8_operands) in bf16: an
// e4m3 code times a power-of-two scale is exact in bf16, and the products and f32 sums equal the
// CPU reference's up to summation order.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "kernels/cuda/dsa_common.cuh"
#include "kernels/cuda/mma.cuh"
#include "kernels/cuda/ops_dsa.h"

namespace dsa::cuda {

using namespace dsa_detail;

namespace {

using bf16_t = __nv_bfloat16;
const bf16_t* bfp(const Tensor& t) { return reinterpret_cast<const bf16_t*>(t.data<bf16>()); }
bf16_t* bfp(Tensor& t) { return reinterpret_cast<bf16_t*>(t.data<bf16>()); }

constexpr int kBM = 64;    // query rows per fused CTA
constexpr int kBN = 128;   // keys per fused tile (two halves of 64, one per warp group)
constexpr int kFusedThreads = 256;
constexpr int kBwdThreads = 128;  // 4 warps x 16 rows of the backward kernels; 64 keys per tile

__device__ __forceinline__ uint32_t ld32(const bf16_t* p) { return *reinterpret_cast<const uint32_t*>(p); }
__device__ __forceinline__ uint32_t pack_raw(const bf16_t& lo, const bf16_t& hi) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(lo)) | (static_cast<uint32_t>(__bfloat16_as_ushort(hi)) << 16);
}
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Element offset of (row r, column c) in a shared-memory tile of ld-element rows. kCore: the no-swizzle
// K-major layout wgmma reads (8-row x 8-element "core matrices" of 128 contiguous bytes, K-adjacent ones
// 128 bytes apart, M-adjacent ones 16 ld bytes apart; ld is the padded width, a multiple of 16);
// otherwise row-major (ld = padded width + 8: the mma.sync fragment loads are then free of bank conflicts).
template <bool kCore>
__device__ __forceinline__ int toff(int r, int c, int ld) {
  if constexpr (kCore) return ((r >> 3) * (ld >> 3) + (c >> 3)) * 64 + (r & 7) * 8 + (c & 7);
  else return r * ld + c;
}

// dst [rows, dpad] (smem, toff layout) = src rows r (at src + r * stride, `d` values each) for r < nvalid,
// zero elsewhere and in columns d .. dpad-1 (dpad a multiple of 16, rows a multiple of 8). vec: d % 8 == 0,
// stride % 8 == 0, src 16-byte aligned: asynchronous 16-byte copies (the caller commits and waits), eight
// consecutive threads on the eight rows of one core matrix; otherwise plain stores.
template <bool kCore>
__device__ __forceinline__ void load_tile_async(bf16_t* dst, int ld, int dpad, const bf16_t* src, int64_t stride,
                                                int nvalid, int d, int rows, bool vec) {
  if (vec) {
    const int cpr = dpad / 8;
    for (int i = threadIdx.x; i < rows * cpr; i += blockDim.x) {
      const int r = ((i >> 3) / cpr) * 8 + (i & 7), c = ((i >> 3) % cpr) * 8;
      const bool ok = r < nvalid && c < d;
      cp_async16(dst + toff<kCore>(r, c, ld), ok ? src + r * stride + c : src, ok ? 16 : 0);
    }
  } else {
    for (int i = threadIdx.x; i < rows * dpad; i += blockDim.x) {
      const int r = i / dpad, c = i % dpad;
      dst[toff<kCore>(r, c, ld)] = (r < nvalid && c < d) ? src[r * stride + c] : __float2bfloat16_rn(0.f);
    }
  }
}
// As load_tile_async (row-major), then waits for every copy of this thread (the caller still syncs the block).
__device__ __forceinline__ void load_tile(bf16_t* dst, int ld, int dpad, const bf16_t* src, int64_t stride, int nvalid,
                                          int d, int rows, bool vec) {
  load_tile_async<false>(dst, ld, dpad, src, stride, nvalid, d, rows, vec);
  cp_async_commit();
  cp_async_wait<0>();
}

// For heads i = 0 .. n-1: a per-head A tile (load_a(slot, i)) and a B tile shared by groups of grp heads
// (load_b(slot, i / grp) when i % grp == 0), then fn(a_slot, b_slot, i) on the block's loaded tiles.
// na, nb (1 or 2): buffers of each; with two, the next head's tiles are copied while fn runs (a B tile
// only when it has a second buffer; otherwise that head's tiles load after the barrier that ends the
// previous fn). Starts with a block barrier (earlier readers of the buffers are done).
template <class LoadA, class LoadB, class Fn>
__device__ __forceinline__ void head_loop(int n, int grp, int na, int nb, LoadA load_a, LoadB load_b, Fn fn) {
  const auto aslot = [&](int i) { return na == 2 ? (i & 1) : 0; };
  const auto bslot = [&](int i) { return nb == 2 ? ((i / grp) & 1) : 0; };
  const auto early = [&](int i) { return na == 2 && (i % grp != 0 || nb == 2); };
  const auto issue = [&](int i) {
    if (i % grp == 0) load_b(bslot(i), i / grp);
    load_a(aslot(i), i);
    cp_async_commit();
  };
  __syncthreads();
  issue(0);
  for (int i = 0; i < n; ++i) {
    if (i > 0) {
      __syncthreads();
      if (!early(i)) issue(i);
    }
    if (i + 1 < n && early(i + 1)) {
      issue(i + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    fence_proxy_async();  // copies and stores visible to wgmma's async proxy (no-op without sm_90a)
    __syncthreads();
    fn(aslot(i), bslot(i), i);
  }
}

// acc[16 x 64] += A[16 x 16*ksteps] (smem rows, ld sa) . Bt[64 x 16*ksteps]^T (smem rows, ld sb);
// acc[4 nt + e] is element e of the m16n8 tile nt.
__device__ __forceinline__ void warp_gemm_nt(float (&acc)[32], const bf16_t* A, int sa, const bf16_t* Bt, int sb,
                                             int ksteps, int g, int c4) {
  for (int kk = 0; kk < ksteps; ++kk) {
    const bf16_t* ap = A + g * sa + kk * 16 + 2 * c4;
    const uint32_t a[4] = {ld32(ap), ld32(ap + 8 * sa), ld32(ap + 8), ld32(ap + 8 * sa + 8)};
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      const bf16_t* bp = Bt + (nt * 8 + g) * sb + kk * 16 + 2 * c4;
      mma_m16n8k16_bf16(reinterpret_cast<float(&)[4]>(acc[4 * nt]), a, ld32(bp), ld32(bp + 8));
    }
  }
}

// S (64 x 64 per warpgroup: warp w of the group rows 16 w .. 16 w + 15, the warp_gemm_nt layout) =
// A[64 rows] . B[64 rows]^T over dpad columns, both tiles in toff<kWg> layout of ld-element rows.
// kWg: one warpgroup wgmma chain (sm_90a); otherwise each warp's mma.sync over its 16 rows.
template <bool kWg>
__device__ __forceinline__ void gemm_64x64(float (&S)[32], const bf16_t* A, const bf16_t* B, int ld, int dpad, int rs,
                                           int g, int c4) {
  if constexpr (kWg) {
    const uint32_t sbo = static_cast<uint32_t>(ld) * 16;  // 8 rows of ld bf16
    wgmma_fence_operand(S);
    wgmma_fence();
    for (int ks = 0; ks < dpad / 16; ++ks)  // k16 = two K-adjacent core matrices (128 elements)
      WgmmaBf16<64>::ss<0, 0>(S, wgmma_desc(A + ks * 128, 128, sbo), wgmma_desc(B + ks * 128, 128, sbo), ks > 0);
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_operand(S);
  } else {
#pragma unroll
    for (int i = 0; i < 32; ++i) S[i] = 0.f;
    warp_gemm_nt(S, A + rs * 16 * ld, ld, B, ld, dpad / 16, g, c4);
  }
}

// out[16 x kDP] += G[16 x 64] (accumulator layout, rounded to bf16) . V[64 x kDP] (smem rows, ld sv).
template <int kDP>
__device__ __forceinline__ void warp_gemm_pv(float (&out)[kDP / 8][4], const float (&G)[32], const bf16_t* V, int sv,
                                             int g, int c4) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const float* g0 = G + 8 * kk;  // tiles 2 kk and 2 kk + 1
    const uint32_t a[4] = {pack_bf16(g0[0], g0[1]), pack_bf16(g0[2], g0[3]), pack_bf16(g0[4], g0[5]),
                           pack_bf16(g0[6], g0[7])};
    const bf16_t* v0 = V + (kk * 16 + 2 * c4) * sv + g;
#pragma unroll
    for (int dn = 0; dn < kDP / 8; ++dn) {
      const bf16_t* v = v0 + dn * 8;
      mma_m16n8k16_bf16(out[dn], a, pack_raw(v[0], v[sv]), pack_raw(v[8 * sv], v[9 * sv]));
    }
  }
}

// ------------------------------------------------------------------------------------------ fused

// kStats: the loss alone (Z, lse(I), KL per row); kIdxLse: lse(I) per row alone (the indexer's scores, no
// main attention); kGrad: dI of a chunk of rows and the loss terms' partial sums over its keys;
// kRecall: the attention mass inside a selected set.
enum { kStats = 0, kGrad = 1, kRecall = 2, kIdxLse = 3 };

struct FusedParams {
  const bf16_t* qm;       // [B, T, H, Dk]
  const bf16_t* km;       // [B, T, Hk, Dk]
  const float* lse;       // [B, H, T]
  const bf16_t* qs;       // [B, T, Hi, D] scoring operands (fp8-dequantized or q_I)
  const bf16_t* ks;       // [B, T, D]
  const bf16_t* w;        // [B, T, Hi]
  const uint32_t* bitmap; // [B, R, Tw] (recall): bit s of row t0 + r = s is selected
  float* zrow;            // [B, T] Z (written by stats)
  float* lrow;            // [B, T] lse(I) (written by stats and idx-lse, read by grad)
  float* out;             // [B, T] KL (stats) or recall mass / Z (recall)
  float* dI;              // [B, R, T] (grad): rows t0 .. t0 + R - 1, entries s <= t
  float* part;            // [nsplit, B, R, 5]: Z, sum a log a, sum a I, max I, sum exp(I - max) of each
                          //   split's keys (rows_from_parts_kernel combines them)
  int T, H, Hk, Dk, DkP, Hi, D, DP, t0, R, Tw;
  int nrb;                // row blocks of kBM rows: ceil(R / kBM)
  int split_tiles;        // key tiles per CTA: blockIdx.x = split * nrb + row block
  float scale_log2, c, gs;
  bool vec_main, vec_idx;
  int qbuf, kbuf, ibuf;   // buffers (1 or 2) of the per-head main Q, main K and indexer Q tiles
};

// 8 warps: warp w owns rows 16 (w % 4) .. +15 of the CTA's 64 and keys 64 (w / 4) .. +63 of each tile
// (with wgmma: warpgroup w / 4 computes its 64 x 64 quarter in one chain; the same accumulator layout).
// NOTES: row blocks run from the last (longest) to the first, so the causal imbalance leaves no tail
// wave (one CTA per SM: the first wave of short rows used to finish early and the long rows ran last).
// Every pass splits the keys: CTA (split, row block) takes split_tiles key tiles and writes its rows'
// partial sums (rows_from_parts_kernel combines them); a chunk of a few hundred rows at long context
// still fills the GPU, and the long rows of a pass over every row no longer set its length.
// With gradients there is no stats pass over the main attention: the target's normalizer is Z = H (each
// head's probabilities sum to one over s <= t by the definition of the forward's lse; the computed Z is
// H up to the rounding of the scores), lse(I) comes from the idx-lse pass (the indexer's scores alone,
// about a fifth of the work at bench-small shapes), and the grad pass sums the loss terms as it goes.
// Per-head tiles stream through head_loop: with separate key heads (MHA, GQA) the next head's Q and K
// tiles are copied while this head computes; one key head (MQA) keeps its K tile for every head.
template <int kMode, bool kWg>
__global__ void __launch_bounds__(kFusedThreads, kWg && kMode != kStats ? 2 : 1) fused_kernel(FusedParams p) {
  extern __shared__ __align__(128) unsigned char smraw[];
  __shared__ float fin[kBM][5];
  const int LK = kWg ? p.DkP : p.DkP + 8, LI = kWg ? p.DP : p.DP + 8;  // tile row widths (toff)
  // Main phase: Qs [qbuf][kBM, LK] one head's queries, Ks [kbuf][kBN, LK] one key head's keys; the index
  // phase reuses the region: QIs [ibuf][kBM, LI], KIs [kBN, LI].
  bf16_t* Qs = reinterpret_cast<bf16_t*>(smraw);
  bf16_t* Ks = Qs + p.qbuf * kBM * LK;
  bf16_t* QIs = Qs;
  bf16_t* KIs = Qs + p.ibuf * kBM * LI;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, c4 = lane & 3;
  const int rs = warp & 3, kh = warp >> 2;
  const int rblk = blockIdx.x % p.nrb, split = blockIdx.x / p.nrb;
  const int b = blockIdx.y, r0 = (p.nrb - 1 - rblk) * kBM;
  const int nrows = min(kBM, p.R - r0);
  const int64_t T = p.T;
  const int tmax = p.t0 + r0 + nrows - 1;
  const int s_begin = split * p.split_tiles * kBN, s_end = s_begin + p.split_tiles * kBN;
  const int ra = r0 + rs * 16 + g, rb = ra + 8;  // rows relative to t0
  const bool va = ra < p.R, vb = rb < p.R;
  const int ta = p.t0 + ra, tb = p.t0 + rb;
  const int grp = p.H / p.Hk;
  float zs[2] = {0.f, 0.f}, ala[2] = {0.f, 0.f}, ai[2] = {0.f, 0.f}, mx[2] = {-INFINITY, -INFINITY},
        lx[2] = {0.f, 0.f};
  float lrow[2] = {0.f, 0.f};
  if constexpr (kMode == kGrad) {
    if (va) lrow[0] = p.lrow[b * T + ta];
    if (vb) lrow[1] = p.lrow[b * T + tb];
  }
  for (int s0 = s_begin; s0 <= tmax && s0 < s_end; s0 += kBN) {
    const int kvalid = min(kBN, p.T - s0);
    // Every key of the tile is at or before every row of the block (rows past R are never read).
    const bool full = s0 + kBN - 1 <= p.t0 + r0;
    // A[4 nt + e]: row (e < 2 ? ta : tb), key s0 + 64 kh + 8 nt + 2 c4 + (e & 1).
    float A[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) A[i] = 0.f;
    // (1) head-summed main attention probabilities.
    if constexpr (kMode != kIdxLse) {
      head_loop(
          p.H, grp, p.qbuf, p.kbuf,
          [&](int slot, int h) {
            load_tile_async<kWg>(Qs + slot * kBM * LK, LK, p.DkP, p.qm + ((b * T + p.t0 + r0) * p.H + h) * p.Dk,
                                 (int64_t)p.H * p.Dk, nrows, p.Dk, kBM, p.vec_main);
          },
          [&](int slot, int hk) {
            load_tile_async<kWg>(Ks + slot * kBN * LK, LK, p.DkP, p.km + ((b * T + s0) * p.Hk + hk) * p.Dk,
                                 (int64_t)p.Hk * p.Dk, kvalid, p.Dk, kBN, p.vec_main);
          },
          [&](int qslot, int kslot, int h) {
            float S[32];
            gemm_64x64<kWg>(S, Qs + qslot * kBM * LK, Ks + (kslot * kBN + kh * 64) * LK, LK, p.DkP, rs, g, c4);
            const float la = va ? p.lse[(b * p.H + h) * T + ta] * 1.4426950408889634f : 0.f;
            const float lb = vb ? p.lse[(b * p.H + h) * T + tb] * 1.4426950408889634f : 0.f;
            if (full) {
#pragma unroll
              for (int i = 0; i < 32; ++i) A[i] += ex2(S[i] * p.scale_log2 - ((i & 2) ? lb : la));
            } else {
#pragma unroll
              for (int i = 0; i < 32; ++i) {
                const int s = s0 + kh * 64 + (i >> 2) * 8 + 2 * c4 + (i & 1);
                const bool ok = (i & 2) ? (vb && s <= tb) : (va && s <= ta);
                if (ok) A[i] += ex2(S[i] * p.scale_log2 - ((i & 2) ? lb : la));
              }
            }
          });
    }
    if constexpr (kMode == kRecall) {
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        const int s = s0 + kh * 64 + (i >> 2) * 8 + 2 * c4 + (i & 1);
        const int ri = (i & 2) ? 1 : 0, r = ri ? rb : ra, t = ri ? tb : ta;
        if (!(ri ? vb : va) || s > t) continue;
        zs[ri] += A[i];
        const uint32_t word = p.bitmap[((int64_t)b * p.R + r) * p.Tw + (s >> 5)];
        if ((word >> (s & 31)) & 1u) ala[ri] += A[i];
      }
      continue;
    } else {
      // (2) indexer scores.
      float I[32];
#pragma unroll
      for (int i = 0; i < 32; ++i) I[i] = 0.f;
      head_loop(
          p.Hi, p.Hi, p.ibuf, 1,
          [&](int slot, int j) {
            load_tile_async<kWg>(QIs + slot * kBM * LI, LI, p.DP, p.qs + ((b * T + p.t0 + r0) * p.Hi + j) * p.D,
                                 (int64_t)p.Hi * p.D, nrows, p.D, kBM, p.vec_idx);
          },
          [&](int, int) {
            load_tile_async<kWg>(KIs, LI, p.DP, p.ks + (b * T + s0) * p.D, p.D, kvalid, p.D, kBN, p.vec_idx);
          },
          [&](int qslot, int, int j) {
            float Z[32];
            gemm_64x64<kWg>(Z, QIs + qslot * kBM * LI, KIs + kh * 64 * LI, LI, p.DP, rs, g, c4);
            const float wa = va ? __bfloat162float(p.w[(b * T + ta) * p.Hi + j]) * p.c : 0.f;
            const float wb = vb ? __bfloat162float(p.w[(b * T + tb) * p.Hi + j]) * p.c : 0.f;
#pragma unroll
            for (int i = 0; i < 32; ++i) I[i] += ((i & 2) ? wb : wa) * fmaxf(Z[i], 0.f);
          });
      // (3) row statistics (stats) or dI (grad).
      if constexpr (kMode == kStats || kMode == kIdxLse) {
#pragma unroll
        for (int ri = 0; ri < 2; ++ri) {
          const int t = ri == 0 ? ta : tb;
          if (!(ri == 0 ? va : vb)) continue;
          float m = -INFINITY;
#pragma unroll
          for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e)
              if (s0 + kh * 64 + nt * 8 + 2 * c4 + e <= t) m = fmaxf(m, I[4 * nt + 2 * ri + e]);
          if (m == -INFINITY) continue;
          if (m > mx[ri]) {
            lx[ri] *= expf(mx[ri] - m);
            mx[ri] = m;
          }
#pragma unroll
          for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              if (s0 + kh * 64 + nt * 8 + 2 * c4 + e > t) continue;
              const float a = A[4 * nt + 2 * ri + e], v = I[4 * nt + 2 * ri + e];
              lx[ri] += expf(v - mx[ri]);
              if constexpr (kMode == kStats) {
                zs[ri] += a;
                ai[ri] += a * v;
                if (a > 0.f) ala[ri] += a * logf(a);
              }
            }
        }
      } else {
#pragma unroll
        for (int ri = 0; ri < 2; ++ri) {
          const int t = ri == 0 ? ta : tb, r = ri == 0 ? ra : rb;
          if (!(ri == 0 ? va : vb)) continue;
          float* drow = p.dI + ((int64_t)b * p.R + r) * T;
          const float invz = 1.f / static_cast<float>(p.H);
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) {
            const int s = s0 + kh * 64 + nt * 8 + 2 * c4;
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              if (s + e > t) continue;
              const float a = A[4 * nt + 2 * ri + e];
              zs[ri] += a;
              ai[ri] += a * I[4 * nt + 2 * ri + e];
              if (a > 0.f) ala[ri] += a * logf(a);
            }
            const float d0 = p.gs * (expf(I[4 * nt + 2 * ri] - lrow[ri]) - A[4 * nt + 2 * ri] * invz);
            const float d1 = p.gs * (expf(I[4 * nt + 2 * ri + 1] - lrow[ri]) - A[4 * nt + 2 * ri + 1] * invz);
            if (s + 1 <= t && (T & 1) == 0) {
              *reinterpret_cast<float2*>(drow + s) = make_float2(d0, d1);
            } else {
              if (s <= t) drow[s] = d0;
              if (s + 1 <= t) drow[s + 1] = d1;
            }
          }
        }
      }
    }
  }
  // Combine the 4 lanes of a row, then the two key halves (fixed order: deterministic).
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
#pragma unroll
    for (int o = 1; o <= 2; o <<= 1) {
      zs[ri] += __shfl_xor_sync(0xffffffffu, zs[ri], o);
      ala[ri] += __shfl_xor_sync(0xffffffffu, ala[ri], o);
      ai[ri] += __shfl_xor_sync(0xffffffffu, ai[ri], o);
      const float mo = __shfl_xor_sync(0xffffffffu, mx[ri], o), lo = __shfl_xor_sync(0xffffffffu, lx[ri], o);
      const float mn = fmaxf(mx[ri], mo);
      lx[ri] = mn == -INFINITY ? 0.f : lx[ri] * expf(mx[ri] - mn) + lo * expf(mo - mn);
      mx[ri] = mn;
    }
  }
  if (kh == 1 && c4 == 0) {
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
      float* f = fin[rs * 16 + g + 8 * ri];
      f[0] = zs[ri]; f[1] = ala[ri]; f[2] = ai[ri]; f[3] = mx[ri]; f[4] = lx[ri];
    }
  }
  __syncthreads();
  if (kh == 1 || c4 != 0) return;
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    if (!(ri == 0 ? va : vb)) continue;
    const float* f = fin[rs * 16 + g + 8 * ri];
    const float mn = fmaxf(mx[ri], f[3]);
    float* o = p.part + ((static_cast<int64_t>(split) * gridDim.y + b) * p.R + (ri == 0 ? ra : rb)) * 5;
    o[0] = zs[ri] + f[0];
    o[1] = ala[ri] + f[1];
    o[2] = ai[ri] + f[2];
    o[3] = mn;
    o[4] = mn == -INFINITY ? 0.f : lx[ri] * expf(mx[ri] - mn) + f[4] * expf(f[3] - mn);
  }
}

// The rows' results from the key splits' partial sums (splits combined in order: deterministic), with
// lse(I) = max + log sum exp and KL_t = (sum a log a - sum a I) / Z - log Z + lse(I):
//   stats: Z, lse(I) and KL; idx-lse: lse(I); grad: KL with the idx-lse pass's lse(I) (Z from the sums:
//   the loss keeps the computed Z); recall: the selected mass / Z.
template <int kMode>
__global__ void rows_from_parts_kernel(const float* __restrict__ part, float* __restrict__ zrow,
                                       float* __restrict__ lrow, float* __restrict__ out, int B, int T, int t0, int R,
                                       int nsplit) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= static_cast<int64_t>(B) * R) return;
  const int b = static_cast<int>(i / R), r = static_cast<int>(i % R);
  float z = 0.f, a_la = 0.f, a_i = 0.f, m = -INFINITY, l = 0.f;
  for (int sp = 0; sp < nsplit; ++sp) {
    const float* o = part + ((static_cast<int64_t>(sp) * B + b) * R + r) * 5;
    z += o[0]; a_la += o[1]; a_i += o[2];
    const float mn = fmaxf(m, o[3]);
    if (mn != -INFINITY) l = l * expf(m - mn) + o[4] * expf(o[3] - mn);
    m = mn;
  }
  const int64_t bt = static_cast<int64_t>(b) * T + t0 + r;
  if constexpr (kMode == kRecall) {
    out[bt] = a_la / z;
    return;
  }
  const float lse_i = kMode == kGrad ? lrow[bt] : m + logf(l);
  if constexpr (kMode == kIdxLse) {
    lrow[bt] = lse_i;
    return;
  }
  if constexpr (kMode == kStats) {
    zrow[bt] = z;
    lrow[bt] = lse_i;
  }
  out[bt] = (a_la - a_i) / z - logf(z) + lse_i;
}

// ---------------------------------------------------------------------------------- indexer backward

struct IdxBwdParams {
  const bf16_t* q;   // [B, T, Hi, D] unquantized q_I
  const bf16_t* k;   // [B, T, D] unquantized k_I
  const bf16_t* w;   // [B, T, Hi]
  const float* dI;   // [B, R, T] rows t0 .. t0 + R - 1, entries s <= t
  bf16_t* dq;        // [B, T, Hi, D] (rows of the chunk written)
  bf16_t* dw;        // [B, T, Hi]
  float* dk;         // [B, T, D] f32, accumulated over chunks
  float* dk_part;    // [npieces, B, Tk, D] (dk kernel with row pieces, Tk = 64 ceil((t0 + R) / 64)) or null
  int T, Hi, D, t0, R;
  int piece_rows;    // (dk kernel) the chunk's rows per piece (blockIdx.z), a multiple of 64
  float c;
  bool vec;
};

// dq_I, dw_I of the chunk's query-head rows (t, j) (flattened, 64 per CTA, 16 per warp): over key tiles
// of 64, z = q_j,t . k_s, G = dI w_j c [z > 0], dq += G k (all in registers), dw += dI c relu(z).
template <int kDP>
__global__ void __launch_bounds__(kBwdThreads) idx_dq_kernel(IdxBwdParams p) {
  constexpr int S = kDP + 8;
  extern __shared__ __align__(128) unsigned char smraw[];
  bf16_t* Qs = reinterpret_cast<bf16_t*>(smraw);  // [64, S] query-head rows
  bf16_t* Ks = Qs + 64 * S;                        // [64, S] keys
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, c4 = lane & 3;
  const int b = blockIdx.y;
  const int64_t T = p.T, nflat = (int64_t)p.R * p.Hi, f0 = (int64_t)blockIdx.x * 64;
  const int nvalid = static_cast<int>(min(static_cast<int64_t>(64), nflat - f0));
  const int tmax = p.t0 + static_cast<int>((f0 + nvalid - 1) / p.Hi);
  load_tile(Qs, S, kDP, p.q + ((b * T + p.t0) * p.Hi + f0) * p.D, p.D, nvalid, p.D, 64, p.vec);
  const int64_t fa = f0 + warp * 16 + g, fb = fa + 8;
  const bool va = fa < nflat, vb = fb < nflat;
  const int ta = p.t0 + static_cast<int>(fa / p.Hi), tb = p.t0 + static_cast<int>(fb / p.Hi);
  const int ja = static_cast<int>(fa % p.Hi), jb = static_cast<int>(fb % p.Hi);
  const float wa = va ? __bfloat162float(p.w[(b * T + ta) * p.Hi + ja]) * p.c : 0.f;
  const float wb = vb ? __bfloat162float(p.w[(b * T + tb) * p.Hi + jb]) * p.c : 0.f;
  const float* da = p.dI + ((int64_t)b * p.R + (ta - p.t0)) * T;
  const float* db = p.dI + ((int64_t)b * p.R + (tb - p.t0)) * T;
  float O[kDP / 8][4];
#pragma unroll
  for (int i = 0; i < kDP / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) O[i][e] = 0.f;
  float dwa = 0.f, dwb = 0.f;
  for (int s0 = 0; s0 <= tmax; s0 += 64) {
    __syncthreads();
    load_tile(Ks, S, kDP, p.k + (b * T + s0) * p.D, p.D, min(64, p.T - s0), p.D, 64, p.vec);
    __syncthreads();
    float Z[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) Z[i] = 0.f;
    warp_gemm_nt(Z, Qs + warp * 16 * S, S, Ks, S, kDP / 16, g, c4);
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      const int s = s0 + (i >> 2) * 8 + 2 * c4 + (i & 1);
      const bool lo = (i & 2) == 0;
      const bool ok = lo ? (va && s <= ta) : (vb && s <= tb);
      const float d = ok ? (lo ? da[s] : db[s]) : 0.f, z = Z[i];
      if (lo) dwa += d * fmaxf(z, 0.f);
      else dwb += d * fmaxf(z, 0.f);
      Z[i] = z > 0.f ? d * (lo ? wa : wb) : 0.f;
    }
    warp_gemm_pv<kDP>(O, Z, Ks, S, g, c4);
  }
#pragma unroll
  for (int o = 1; o <= 2; o <<= 1) {
    dwa += __shfl_xor_sync(0xffffffffu, dwa, o);
    dwb += __shfl_xor_sync(0xffffffffu, dwb, o);
  }
  if (c4 == 0) {
    if (va) p.dw[(b * T + ta) * p.Hi + ja] = __float2bfloat16_rn(dwa * p.c);
    if (vb) p.dw[(b * T + tb) * p.Hi + jb] = __float2bfloat16_rn(dwb * p.c);
  }
#pragma unroll
  for (int dn = 0; dn < kDP / 8; ++dn)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int col = dn * 8 + 2 * c4 + (e & 1);
      const bool lo = e < 2;
      if (col >= p.D || !(lo ? va : vb)) continue;
      const int t = lo ? ta : tb, j = lo ? ja : jb;
      p.dq[((b * T + t) * p.Hi + j) * p.D + col] = __float2bfloat16_rn(O[dn][e]);
    }
}

// dk_I of 64 keys (16 per warp) from the rows t >= s of one piece of the chunk (blockIdx.z: rows
// t0 + z piece_rows .. +piece_rows - 1): per token tile of 64 and head j, z^T = k_s . q_j,t,
// G^T = dI w_j c [z > 0], dk += G^T q_j (registers). One piece: the CTA owns its keys and adds into the
// f32 dk (accumulated over chunks, no atomics); several: it writes its piece's slice of dk_part, which
// dk_from_pieces_kernel adds in piece order (deterministic). A CTA whose piece ends at or before its
// first key has nothing to add and writes nothing.
// NOTES: the pieces are for the early chunks at long context and every chunk at short: one CTA per key
// tile gave 64 CTAs of 128 threads for the first 4096-row chunk at T = 16K, the last key tiles doing
// 64 times the work of the first (ncu: 2.65 ms for the chunk's 34 GFLOP).
template <int kDP>
__global__ void __launch_bounds__(kBwdThreads) idx_dk_kernel(IdxBwdParams p) {
  constexpr int S = kDP + 8;
  extern __shared__ __align__(128) unsigned char smraw[];
  bf16_t* Ks = reinterpret_cast<bf16_t*>(smraw);  // [64, S] keys
  bf16_t* Qs = Ks + 64 * S;                        // [2][64, S] one head's queries (double-buffered)
  float(*dIs)[65] = reinterpret_cast<float(*)[65]>(Qs + 2 * 64 * S);  // [64 tokens, 65]
  __shared__ float ws[2][64];  // per buffer: w_j c of the tile's tokens
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, c4 = lane & 3;
  const int b = blockIdx.y, k0 = blockIdx.x * 64;
  const int64_t T = p.T;
  const int pstart = p.t0 + static_cast<int>(blockIdx.z) * p.piece_rows, pend = min(p.t0 + p.R, pstart + p.piece_rows);
  if (k0 >= pend) return;  // the whole CTA, before any copy or barrier
  load_tile(Ks, S, kDP, p.k + (b * T + k0) * p.D, p.D, min(64, p.T - k0), p.D, 64, p.vec);
  float O[kDP / 8][4];
#pragma unroll
  for (int i = 0; i < kDP / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) O[i][e] = 0.f;
  const int ka = warp * 16 + g;  // local keys ka, ka + 8
  for (int tb0 = max(pstart, k0); tb0 < pend; tb0 += 64) {
    const int ntok = min(64, pend - tb0);
    head_loop(
        p.Hi, p.Hi, 2, 1,
        [&](int slot, int j) {
          load_tile_async<false>(Qs + slot * 64 * S, S, kDP, p.q + ((b * T + tb0) * p.Hi + j) * p.D,
                                 (int64_t)p.Hi * p.D, ntok, p.D, 64, p.vec);
          if (tid < 64) ws[slot][tid] = tid < ntok ? __bfloat162float(p.w[(b * T + tb0 + tid) * p.Hi + j]) * p.c : 0.f;
        },
        [&](int, int) {
          for (int i = tid; i < 64 * 64; i += blockDim.x) {
            const int tt = i >> 6, ss = i & 63, t = tb0 + tt, s = k0 + ss;
            dIs[tt][ss] = (tt < ntok && s <= t) ? p.dI[((int64_t)b * p.R + (t - p.t0)) * T + s] : 0.f;
          }
        },
        [&](int slot, int, int) {
          const bf16_t* Qc = Qs + slot * 64 * S;
          const float* wb = ws[slot];
          float Z[32];
#pragma unroll
          for (int i = 0; i < 32; ++i) Z[i] = 0.f;
          warp_gemm_nt(Z, Ks + warp * 16 * S, S, Qc, S, kDP / 16, g, c4);
#pragma unroll
          for (int i = 0; i < 32; ++i) {
            const int tt = (i >> 2) * 8 + 2 * c4 + (i & 1), kl = (i & 2) ? ka + 8 : ka;
            Z[i] = Z[i] > 0.f ? dIs[tt][kl] * wb[tt] : 0.f;
          }
          warp_gemm_pv<kDP>(O, Z, Qc, S, g, c4);
        });
  }
  const int64_t Tk = (p.t0 + p.R + 63) / 64 * 64;
#pragma unroll
  for (int dn = 0; dn < kDP / 8; ++dn)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int col = dn * 8 + 2 * c4 + (e & 1), key = k0 + (e < 2 ? ka : ka + 8);
      if (col >= p.D || key >= p.T) continue;
      if (p.dk_part) p.dk_part[((blockIdx.z * gridDim.y + b) * Tk + key) * p.D + col] = O[dn][e];
      else p.dk[(b * T + key) * p.D + col] += O[dn][e];
    }
}

// dk[b, s, :] += the pieces' slices, in piece order, for s < t0 + R; piece z has a slice for key s when
// it ends after the first key of s's tile (idx_dk_kernel's condition).
__global__ void dk_from_pieces_kernel(const float* __restrict__ part, float* __restrict__ dk, int B, int T, int D, int t0,
                                      int R, int piece_rows, int npieces) {
  const int t1 = t0 + R;
  const int64_t Tk = (t1 + 63) / 64 * 64, n = static_cast<int64_t>(B) * t1 * D;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int col = static_cast<int>(i % D);
    const int64_t bs = i / D;
    const int b = static_cast<int>(bs / t1), s = static_cast<int>(bs % t1), k0 = s & ~63;
    float acc = 0.f;
    for (int z = 0; z < npieces; ++z) {
      if (k0 >= min(t1, t0 + (z + 1) * piece_rows)) continue;  // the piece ends before s's tile
      acc += part[((static_cast<int64_t>(z) * B + b) * Tk + s) * D + col];
    }
    dk[(static_cast<int64_t>(b) * T + s) * D + col] += acc;
  }
}

// bitmap [B, R, Tw]: bit s of row r set when s = idx[b, t0 + r, k] for some k with 0 <= s <= t0 + r.
__global__ void recall_bitmap_kernel(const int32_t* __restrict__ idx /*[B, T, K]*/, int B, int T, int K, int t0, int R,
                                     int Tw, uint32_t* __restrict__ bitmap) {
  const int64_t n = (int64_t)B * R * K;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t br = i / K;
    const int b = static_cast<int>(br / R), r = static_cast<int>(br % R), t = t0 + r;
    const int32_t s = idx[((int64_t)b * T + t) * K + i % K];
    if (s < 0 || s > t) continue;
    atomicOr(bitmap + br * Tw + (s >> 5), 1u << (s & 31));
  }
}

// ----------------------------------------------------------------------------------------- host side

void check_main_gpu(const char* op, const Tensor& q, const Tensor& k, const Tensor& lse) {
  expect_cuda(op, "q_main", q, DType::BF16);
  expect_cuda(op, "k_main", k, DType::BF16);
  expect_cuda(op, "lse_main", lse, DType::F32);
  expect_shape(op, "q_main", q, {-1, -1, -1, -1});
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), Dk = q.size(3);
  expect_shape(op, "k_main", k, {B, T, -1, Dk});
  const int64_t Hk = k.size(2);
  DSA_CHECK(Hk >= 1 && H % Hk == 0, "[", op, "] key heads ", Hk, " must divide query heads ", H);
  expect_shape(op, "lse_main", lse, {B, H, T});
}


int pad16(int64_t d) { return static_cast<int>((d + 15) / 16 * 16); }
bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

FusedParams main_params(const Tensor& q_main, const Tensor& k_main, const Tensor& lse, double scale) {
  FusedParams p{};
  p.qm = bfp(q_main);
  p.km = bfp(k_main);
  p.lse = lse.data<float>();
  p.T = static_cast<int>(q_main.size(1));
  p.H = static_cast<int>(q_main.size(2));
  p.Hk = static_cast<int>(k_main.size(2));
  p.Dk = static_cast<int>(q_main.size(3));
  p.DkP = pad16(p.Dk);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.vec_main = p.Dk % 8 == 0 && aligned16(p.qm) && aligned16(p.km);
  p.DP = 16;
  return p;
}

// Key splits of a pass over R rows from t0: about four CTAs per SM over the rows, at most one per key
// tile. NOTES: one or two CTAs are resident per SM; with four the splits' uneven ends (causal rows, the
// last split short) even out. Without splits a pass over every row (stats, idx-lse: 256 row blocks at
// 16K) ran as long as its longest row block, the SMs of the short ones idle (ncu).
int key_splits(int64_t t0, int64_t R, int64_t B, int* split_tiles) {
  const int nrb = static_cast<int>(ceil_div(R, kBM)), ntiles = static_cast<int>(ceil_div(t0 + R, kBN));
  const int want = static_cast<int>(ceil_div(4 * static_cast<int64_t>(sm_count()), nrb * B));
  const int tiles = static_cast<int>(ceil_div(ntiles, std::clamp(want, 1, ntiles)));
  if (split_tiles) *split_tiles = tiles;
  return static_cast<int>(ceil_div(ntiles, tiles));
}

// The fused kernels on wgmma (sm_90a) unless DSA_KL_WGMMA=0 (read at each call: the tests run both).
bool kl_wgmma() {
  const char* e = std::getenv("DSA_KL_WGMMA");
  return !(e && std::strcmp(e, "0") == 0) && wgmma_available();
}

// One fused pass over the rows t0 .. t0 + R - 1 and the rows' results from its splits (kMode's outputs
// in p; part: the splits' partial sums, allocated here).
template <int kMode>
void launch_fused(const char* op, FusedParams p, int64_t B) {
  constexpr size_t kLimit = 227 * 1024 - sizeof(float) * kBM * 5;
  const bool wg = kl_wgmma();
  const int LK = wg ? p.DkP : p.DkP + 8, LI = wg ? p.DP : p.DP + 8;  // the kernel's tile row widths
  auto bytes = [](int nq, int nk, int ld) { return sizeof(bf16_t) * static_cast<size_t>((nq * kBM + nk * kBN) * ld); };
  // Double buffers where they fit (a second K buffer only with several key heads), else single ones.
  p.qbuf = 2;
  p.kbuf = p.Hk > 1 ? 2 : 1;
  if (bytes(p.qbuf, p.kbuf, LK) > kLimit) p.kbuf = 1;
  if (bytes(p.qbuf, p.kbuf, LK) > kLimit) p.qbuf = 1;
  p.ibuf = bytes(2, 1, LI) <= kLimit ? 2 : 1;
  size_t smem = kMode == kIdxLse ? 0 : bytes(p.qbuf, p.kbuf, LK);  // (idx-lse: no main phase)
  if (kMode != kRecall) smem = std::max(smem, bytes(p.ibuf, 1, LI));
  DSA_CHECK(smem <= kLimit, "[", op, "] head dim ", p.Dk, " (or indexer dim ", p.D,
            ") too large for the fused kernel's shared memory");
  const auto kernel = wg ? fused_kernel<kMode, true> : fused_kernel<kMode, false>;
  DSA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  p.nrb = static_cast<int>(ceil_div(p.R, kBM));
  const int nsplit = key_splits(p.t0, p.R, B, &p.split_tiles);
  Tensor part = Tensor::empty({nsplit, B, p.R, 5}, DType::F32, Device::CUDA);
  p.part = part.data<float>();
  const dim3 grid(static_cast<unsigned>(p.nrb * nsplit), static_cast<unsigned>(B));
  kernel<<<grid, kFusedThreads, smem, stream()>>>(p);
  check_launch(op);
  rows_from_parts_kernel<kMode><<<grid_1d(B * p.R, 256), 256, 0, stream()>>>(p.part, p.zrow, p.lrow, p.out, (int)B,
                                                                              p.T, p.t0, p.R, nsplit);
  check_launch(op);
}

// Row pieces of the dk kernel over a chunk of R rows from t0: about eight CTAs per SM over the key tiles,
// at least 256 rows a piece. Returns the count; *piece_rows, a multiple of 64.
int dk_pieces(int64_t t0, int64_t R, int64_t B, int* piece_rows) {
  const int64_t ktiles = ceil_div(t0 + R, 64) * B;
  const int64_t n = std::clamp<int64_t>(ceil_div(8 * static_cast<int64_t>(sm_count()), ktiles), 1, ceil_div(R, 256));
  const int64_t rows = ceil_div(ceil_div(R, n), 64) * 64;
  *piece_rows = static_cast<int>(rows);
  return static_cast<int>(ceil_div(R, rows));
}

template <int kDP>
void launch_idx_bwd(const char* op, IdxBwdParams p, int64_t B, float* dk_part) {
  const size_t smem_q = sizeof(bf16_t) * 2 * 64 * (kDP + 8);
  const size_t smem_k = sizeof(bf16_t) * 3 * 64 * (kDP + 8) + sizeof(float) * 64 * 65;
  DSA_CUDA_CHECK(cudaFuncSetAttribute(idx_dq_kernel<kDP>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem_q));
  DSA_CUDA_CHECK(cudaFuncSetAttribute(idx_dk_kernel<kDP>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem_k));
  const dim3 gq(static_cast<unsigned>(ceil_div((int64_t)p.R * p.Hi, 64)), static_cast<unsigned>(B));
  idx_dq_kernel<kDP><<<gq, kBwdThreads, smem_q, stream()>>>(p);
  check_launch(op);
  const int npieces = dk_pieces(p.t0, p.R, B, &p.piece_rows);
  p.dk_part = npieces > 1 ? dk_part : nullptr;
  const dim3 gk(static_cast<unsigned>(ceil_div(p.t0 + p.R, 64)), static_cast<unsigned>(B), static_cast<unsigned>(npieces));
  idx_dk_kernel<kDP><<<gk, kBwdThreads, smem_k, stream()>>>(p);
  check_launch(op);
  if (npieces == 1) return;
  dk_from_pieces_kernel<<<grid_1d(B * (p.t0 + p.R) * p.D, 256), 256, 0, stream()>>>(dk_part, p.dk, (int)B, p.T, p.D,
                                                                                    p.t0, p.R, p.piece_rows, npieces);
  check_launch(op);
}

}  // namespace

ops::IndexerLossResult indexer_kl_dense(const Tensor& q_main, const Tensor& k_main, const Tensor& lse_main,
                                        double scale, const Tensor& q_I, const Tensor& k_I, const Tensor& w_I, bool fp8,
                                        double grad_scale, ops::IndexerGrads* grads, int64_t block_rows) {
  const char* op = "indexer_kl_dense";
  check_main_gpu(op, q_main, k_main, lse_main);
  check_indexer_gpu(op, q_main, q_I, k_I, w_I);
  DSA_CHECK(block_rows >= 0, "[", op, "] block_rows must be >= 0, got ", block_rows);
  const int64_t B = q_main.size(0), T = q_main.size(1), Hi = q_I.size(2), D = q_I.size(3);
  if (fp8) DSA_CHECK((D & (D - 1)) == 0, "[", op, "] fp8 needs a power-of-two head dim, got ", D);
  DSA_CHECK(D <= 256, "[", op, "] indexer head dim must be <= 256, got ", D);
  ops::IndexerLossResult res;
  if (grads) {
    grads->dq = Tensor::empty(q_I.shape(), DType::BF16, Device::CUDA);
    grads->dk = Tensor::empty(k_I.shape(), DType::BF16, Device::CUDA);
    grads->dw = Tensor::empty(w_I.shape(), DType::BF16, Device::CUDA);
  }
  if (B * T == 0) return res;
  Tensor qs = q_I, ks = k_I;
  if (fp8) indexer_fp8_operands(q_I, k_I, &qs, &ks);
  Tensor zrow = Tensor::empty({B, T}, DType::F32, Device::CUDA);  // (stats only)
  Tensor lrow = Tensor::empty({B, T}, DType::F32, Device::CUDA);
  Tensor kl = Tensor::empty({B, T}, DType::F32, Device::CUDA);
  FusedParams p = main_params(q_main, k_main, lse_main, scale);
  p.qs = bfp(qs);
  p.ks = bfp(ks);
  p.w = bfp(w_I);
  p.zrow = zrow.data<float>();
  p.lrow = lrow.data<float>();
  p.out = kl.data<float>();
  p.Hi = static_cast<int>(Hi);
  p.D = static_cast<int>(D);
  p.DP = pad16(D);
  p.c = 1.0f / std::sqrt(static_cast<float>(D));
  p.gs = static_cast<float>(grad_scale);
  p.vec_idx = D % 8 == 0 && aligned16(p.qs) && aligned16(p.ks);
  p.t0 = 0;
  p.R = static_cast<int>(T);
  res.rows = B * T;
  if (!grads) {
    launch_fused<kStats>(op, p, B);
    res.loss_sum = host_sum(kl);
    return res;
  }
  // With gradients: lse(I) first (idx-lse), then per chunk of query rows dI and the chunk's KL (grad),
  // and the chunk's indexer gradients. The chunks bound the f32 dI buffer [B, rc, T]
  // (ops::dense_kl_chunk_rows).
  launch_fused<kIdxLse>(op, p, B);
  const int64_t rc = block_rows > 0 ? std::min(block_rows, T) : ops::dense_kl_chunk_rows(B, T, Hi);
  int64_t max_piece = 0;  // elements of the dk kernel's piece slices
  for (int64_t t0 = 0; t0 < T; t0 += rc) {
    const int64_t R = std::min(T, t0 + rc) - t0;
    int rows = 0;
    const int64_t n = dk_pieces(t0, R, B, &rows);
    if (n > 1) max_piece = std::max(max_piece, n * B * ceil_div(t0 + R, 64) * 64 * D);
  }
  Tensor dk_part = Tensor::empty({std::max<int64_t>(max_piece, 1)}, DType::F32, Device::CUDA);
  Tensor dI = Tensor::empty({B, rc, T}, DType::F32, Device::CUDA);
  Tensor dk32 = Tensor::zeros(k_I.shape(), DType::F32, Device::CUDA);
  IdxBwdParams bp{bfp(q_I), bfp(k_I), bfp(w_I), dI.data<float>(), bfp(grads->dq), bfp(grads->dw), dk32.data<float>(),
                  nullptr, (int)T, (int)Hi, (int)D, 0, 0, 0, p.c,
                  D % 8 == 0 && aligned16(bfp(q_I)) && aligned16(bfp(k_I))};
  p.dI = dI.data<float>();
  const int dpad = pad16(D);
  for (int64_t t0 = 0; t0 < T; t0 += rc) {
    p.t0 = static_cast<int>(t0);
    p.R = static_cast<int>(std::min(T, t0 + rc) - t0);
    launch_fused<kGrad>(op, p, B);
    bp.t0 = p.t0;
    bp.R = p.R;
    if (dpad <= 16) launch_idx_bwd<16>(op, bp, B, dk_part.data<float>());
    else if (dpad <= 32) launch_idx_bwd<32>(op, bp, B, dk_part.data<float>());
    else if (dpad <= 64) launch_idx_bwd<64>(op, bp, B, dk_part.data<float>());
    else if (dpad <= 128) launch_idx_bwd<128>(op, bp, B, dk_part.data<float>());
    else launch_idx_bwd<256>(op, bp, B, dk_part.data<float>());
  }
  cast_f32_to_bf16(dk32.data<float>(), bfp(grads->dk), dk32.numel(), op);
  res.loss_sum = host_sum(kl);
  return res;
}

ops::IndexerRecall indexer_recall(const Tensor& q_main, const Tensor& k_main, const Tensor& lse_main, double scale,
                                  const Tensor& indices, int64_t block_rows) {
  const char* op = "indexer_recall";
  check_main_gpu(op, q_main, k_main, lse_main);
  DSA_CHECK(block_rows >= 0, "[", op, "] block_rows must be >= 0, got ", block_rows);
  const int64_t B = q_main.size(0), T = q_main.size(1), K = indices.size(2);
  check_indices_gpu(op, indices, B, T);
  ops::IndexerRecall res;
  if (B * T == 0) return res;
  const int64_t Tw = (T + 31) / 32;
  const int64_t rc = block_rows > 0 ? std::min(block_rows, T) : rows_for_budget(T, B * Tw * 4, int64_t(128) << 20);
  Tensor bitmap = Tensor::empty({B, rc, Tw}, DType::I32, Device::CUDA);
  Tensor row = Tensor::empty({B, T}, DType::F32, Device::CUDA);
  FusedParams p = main_params(q_main, k_main, lse_main, scale);
  p.out = row.data<float>();
  p.bitmap = reinterpret_cast<const uint32_t*>(bitmap.data<int32_t>());
  p.Tw = static_cast<int>(Tw);
  for (int64_t t0 = 0; t0 < T; t0 += rc) {
    const int64_t R = std::min(T, t0 + rc) - t0;
    DSA_CUDA_CHECK(cudaMemsetAsync(bitmap.data<int32_t>(), 0, sizeof(uint32_t) * B * R * Tw, stream()));
    if (K > 0) {
      recall_bitmap_kernel<<<grid_1d(B * R * K, 256), 256, 0, stream()>>>(
          indices.data<int32_t>(), (int)B, (int)T, (int)K, (int)t0, (int)R, (int)Tw,
          reinterpret_cast<uint32_t*>(bitmap.data<int32_t>()));
      check_launch(op);
    }
    p.t0 = static_cast<int>(t0);
    p.R = static_cast<int>(R);
    launch_fused<kRecall>(op, p, B);
  }
  res.recall_sum = host_sum(row);
  res.rows = B * T;
  return res;
}

}  // namespace dsa::cuda
