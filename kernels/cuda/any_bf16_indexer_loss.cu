// Sparse indexer KL loss on the GPU (the dense loss and the recall are flash-style kernels in
// sm90_bf16_indexer_kl_dense.cu): the selected latent rows are gathered like the sparse attention
// and the loss works slot by slot.
// NOTES: straight-through over FP8 as on the CPU: the forward I uses the FP8 operands, the backward the
// unquantized bf16 q_I, k_I.
#include <cmath>
#include <initializer_list>
#include <vector>

#include "kernels/cuda/dsa_common.cuh"
#include "kernels/cuda/mma.cuh"
#include "kernels/cuda/ops_dsa.h"

namespace dsa::cuda {

using namespace dsa_detail;

namespace {

const __nv_bfloat16* bf(const Tensor& t) { return reinterpret_cast<const __nv_bfloat16*>(t.data<bf16>()); }
__nv_bfloat16* bf(Tensor& t) { return reinterpret_cast<__nv_bfloat16*>(t.data<bf16>()); }


// ------------------------------------------------------------------------------------------ sparse

struct SparseKlParams {
  const float* S;             // [R, H, K] scaled main scores of the gathered rows (null when probs is set)
  const float* lse;           // [B, H, T] (sparse attention's)
  const float* probs;         // [B, T, K] head-summed attention probabilities, or null (target from S, lse)
  const float* scores;        // [B, T, K] the slots' indexer scores (top-k's), or null: scored here
  const int32_t* idx;         // [B, T, K]
  const __nv_bfloat16* qs;    // [B, T, Hi, D] scoring operands (fp8-dequantized or q_I)
  const __nv_bfloat16* ks;    // [B, T, D]
  const __nv_bfloat16* qi;    // [B, T, Hi, D] unquantized (backward)
  const __nv_bfloat16* ki;    // [B, T, D]
  const __nv_bfloat16* w;     // [B, T, Hi]
  float* row_loss;            // [B, T]
  float* counted;             // [B, T]
  __nv_bfloat16* dq;          // [B, T, Hi, D] or null
  __nv_bfloat16* dw;          // [B, T, Hi]
  float* dk;                  // [B, T, D] f32 (atomics)
  int T, H, Hi, D, K;
  int64_t bt0;
  float c, gs;
  int vec;                    // D % 16 == 0 and 16-byte aligned rows: 16-byte loads; dk: float4 atomics
};

constexpr int kSparseWarps = 8;
constexpr int kSparseChunk = 64;   // slots per chunk
constexpr int kSparseMaxTiles = 8; // persistent dq tiles per warp: ceil16(Hi) * ceil16(D) <= 8192

// Shared-memory layout of sparse_kl_kernel (bf16 tiles addressed as 32-bit words; every row stride is
// 4 mod 8 words and a multiple of 16 bytes, so the fragment loads and ldmatrix rows are conflict-free).
// Hp = ceil16(Hi), Dp = ceil16(D). The transposed operands of the backward GEMMs come from ldmatrix.trans.
struct SparseSmem {
  int QSW, CSW;  // words per row: Dp / 2 + 4, kSparseChunk / 2 + 4
  int Hp, Dp, nslab;
  __host__ __device__ SparseSmem(int Hi, int D) {
    Hp = (Hi + 15) / 16 * 16;
    Dp = (D + 15) / 16 * 16;
    nslab = Hp / 16;
    QSW = Dp / 2 + 4;
    CSW = kSparseChunk / 2 + 4;
  }
  // Offsets in words: Q [Hp, QSW], Kc [2][C, QSW] (double-buffered gather), G [Hp, CSW], then f32: pk [K],
  // Ik [K], wv [Hp], dwa [Hp], part [nslab, C].
  __host__ __device__ int q() const { return 0; }
  __host__ __device__ int kc() const { return Hp * QSW; }
  __host__ __device__ int g() const { return kc() + 2 * kSparseChunk * QSW; }
  __host__ __device__ int f32() const { return g() + Hp * CSW; }
  __host__ __device__ size_t bytes(int K) const {
    return sizeof(uint32_t) * ((size_t)f32() + 2 * (size_t)K + 2 * (size_t)Hp + (size_t)nslab * kSparseChunk);
  }
};

// NOTES: one CTA per (b, t). The main target p over the slots comes from the batched GEMM's S (a warp
// per slot sums the heads); the indexer scores and the whole backward run on tensor cores, 64 slots
// at a time with the heads as M: Z [Hp, 64] = q [Hp, Dp] k_chunk^T (forward on the scoring operands,
// backward on the unquantized ones), G = dI * w * c * [Z > 0] (bf16, as the dense path's GEMMs), then
// dq [Hp, Dp] += G k_chunk (accumulated in registers over the chunks) and dk_chunk [64, Dp] = G^T q,
// scatter-added to the f32 dk with float2 atomics.
__global__ void __launch_bounds__(kSparseWarps * 32) sparse_kl_kernel(SparseKlParams p) {
  extern __shared__ uint32_t smw[];
  const SparseSmem L(p.Hi, p.D);
  __nv_bfloat16* Qb = reinterpret_cast<__nv_bfloat16*>(smw + L.q());
  __nv_bfloat16* Kb = reinterpret_cast<__nv_bfloat16*>(smw + L.kc());
  __nv_bfloat16* Gb = reinterpret_cast<__nv_bfloat16*>(smw + L.g());
  float* pk = reinterpret_cast<float*>(smw + L.f32());  // [K]
  float* Ik = pk + p.K;                                 // [K] scores, then dI
  float* wv = Ik + p.K;                                 // [Hp] w * c
  float* dwa = wv + L.Hp;                               // [Hp]
  float* part = dwa + L.Hp;                             // [nslab, C]
  __shared__ float red[32];
  const int r = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, c4 = lane & 3;
  const int nthr = kSparseWarps * 32;
  const int64_t bt = p.bt0 + r, b = bt / p.T, t = bt % p.T;
  const int32_t* ir = p.idx + bt * p.K;
  const __nv_bfloat16 zero = __float2bfloat16(0.f);
  // q tile [Hp, Dp] (zero padded) of `src`.
  auto load_q = [&](const __nv_bfloat16* src) {
    if (p.vec) {  // Dp == D: 8 columns per 16-byte load
      const int cpr = p.D / 8;
      for (int e = tid; e < L.Hp * cpr; e += nthr) {
        const int j = e / cpr, i = (e % cpr) * 8;
        const uint4 v = j < p.Hi ? __ldg(reinterpret_cast<const uint4*>(src + (bt * p.Hi + j) * p.D + i))
                                 : make_uint4(0u, 0u, 0u, 0u);
        *reinterpret_cast<uint4*>(Qb + j * 2 * L.QSW + i) = v;
      }
      return;
    }
    for (int e = tid; e < L.Hp * L.Dp; e += nthr) {
      const int j = e / L.Dp, i = e % L.Dp;
      const __nv_bfloat16 v = (j < p.Hi && i < p.D) ? src[(bt * p.Hi + j) * p.D + i] : zero;
      Qb[j * 2 * L.QSW + i] = v;
    }
  };
  // chunk rows [C, Dp] of `src` at the chunk's slots (zero for -1 slots and past K) into buffer `buf`:
  // cp.async on the 16-byte path (completes at the caller's wait), plain stores otherwise.
  auto load_chunk = [&](const __nv_bfloat16* src, int k0, int buf) {
    __nv_bfloat16* dst = Kb + buf * kSparseChunk * 2 * L.QSW;
    if (k0 >= p.K) return;
    if (p.vec) {
      const int cpr = p.D / 8;
      for (int e = tid; e < kSparseChunk * cpr; e += nthr) {
        const int kk = e / cpr, i = (e % cpr) * 8, k = k0 + kk;
        const int32_t s = k < p.K ? ir[k] : -1;
        cp_async16(dst + kk * 2 * L.QSW + i, src + (s >= 0 ? (b * p.T + s) * p.D + i : 0), s >= 0 ? 16 : 0);
      }
      return;
    }
    for (int e = tid; e < kSparseChunk * L.Dp; e += nthr) {
      const int kk = e / L.Dp, i = e % L.Dp, k = k0 + kk;
      const int32_t s = k < p.K ? ir[k] : -1;
      const __nv_bfloat16 v = (s >= 0 && i < p.D) ? src[(b * p.T + s) * p.D + i] : zero;
      dst[kk * 2 * L.QSW + i] = v;
    }
  };
  // Chunk loop prologue / step: chunk k0 + C streams into the other buffer while chunk k0 is used.
  auto next_chunk = [&](const __nv_bfloat16* src, int k0, int buf) {
    __syncthreads();  // every warp is done with the other buffer (the previous chunk)
    load_chunk(src, k0 + kSparseChunk, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();  // chunk k0 has landed
    __syncthreads();
  };
  // Z tile [16 heads of slab, 8 slots of n-tile nt] = Q Kc^T over the chunk in buffer `buf`.
  auto z_tile = [&](int slab, int nt, int buf, float (&acc)[4]) {
    acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
    const uint32_t* Q = smw + L.q();
    const uint32_t* Kc = smw + L.kc() + buf * kSparseChunk * L.QSW;
    for (int ks = 0; ks < L.Dp / 16; ++ks) {
      const int kw = ks * 8;
      uint32_t a[4];
      a[0] = Q[(slab * 16 + g) * L.QSW + kw + c4];
      a[1] = Q[(slab * 16 + g + 8) * L.QSW + kw + c4];
      a[2] = Q[(slab * 16 + g) * L.QSW + kw + 4 + c4];
      a[3] = Q[(slab * 16 + g + 8) * L.QSW + kw + 4 + c4];
      mma_m16n8k16_bf16(acc, a, Kc[(nt * 8 + g) * L.QSW + kw + c4], Kc[(nt * 8 + g) * L.QSW + kw + 4 + c4]);
    }
  };
  for (int j = tid; j < L.Hp; j += nthr) {
    wv[j] = j < p.Hi ? __bfloat162float(p.w[bt * p.Hi + j]) * p.c : 0.f;
    dwa[j] = 0.f;
  }
  // Target mass per slot: the forward's head sums, or a warp per slot sums the heads of S.
  if (p.probs) {
    for (int k = tid; k < p.K; k += nthr) pk[k] = ir[k] >= 0 ? p.probs[bt * p.K + k] : -1.f;
  } else {
    for (int k = warp; k < p.K; k += kSparseWarps) {
      const int32_t s = ir[k];
      float a = 0.f;
      if (s >= 0)
        for (int h = lane; h < p.H; h += 32)
          a += expf(p.S[(static_cast<int64_t>(r) * p.H + h) * p.K + k] - p.lse[(b * p.H + h) * p.T + t]);
      a = warp_sum(a);
      if (lane == 0) pk[k] = s >= 0 ? a : -1.f;
    }
  }
  const int items_z = L.nslab * (kSparseChunk / 8);
  if (p.scores) {  // the slots' scores come from the top-k: no gather, no Z
    for (int k = tid; k < p.K; k += nthr) Ik[k] = p.scores[bt * p.K + k];
  } else {
    load_q(p.qs);
  }
  if (!p.scores) {
    load_chunk(p.ks, 0, 0);
    cp_async_commit();
  }
  for (int k0 = 0, buf = 0; k0 < p.K && !p.scores; k0 += kSparseChunk, buf ^= 1) {
    next_chunk(p.ks, k0, buf);  // (its first barrier also orders Q, wv and the previous part reads)
    for (int it = warp; it < items_z; it += kSparseWarps) {
      const int slab = it / (kSparseChunk / 8), nt = it % (kSparseChunk / 8);
      float acc[4];
      z_tile(slab, nt, buf, acc);
      const float w0 = wv[slab * 16 + g], w1 = wv[slab * 16 + g + 8];
      float v0 = fmaxf(acc[0], 0.f) * w0 + fmaxf(acc[2], 0.f) * w1;
      float v1 = fmaxf(acc[1], 0.f) * w0 + fmaxf(acc[3], 0.f) * w1;
#pragma unroll
      for (int o = 4; o < 32; o <<= 1) {
        v0 += __shfl_xor_sync(0xffffffffu, v0, o);
        v1 += __shfl_xor_sync(0xffffffffu, v1, o);
      }
      if (g == 0) {
        part[slab * kSparseChunk + nt * 8 + 2 * c4] = v0;
        part[slab * kSparseChunk + nt * 8 + 2 * c4 + 1] = v1;
      }
    }
    __syncthreads();
    for (int kk = tid; kk < kSparseChunk && k0 + kk < p.K; kk += nthr) {
      float v = 0.f;
      for (int sl = 0; sl < L.nslab; ++sl) v += part[sl * kSparseChunk + kk];
      Ik[k0 + kk] = v;
    }
  }
  __syncthreads();
  float psum = 0.f, imax = -INFINITY, nvalid = 0.f;
  for (int k = tid; k < p.K; k += nthr)
    if (pk[k] >= 0.f) { psum += pk[k]; imax = fmaxf(imax, Ik[k]); nvalid += 1.f; }
  psum = block_sum(psum, red);
  imax = block_max(imax, red);
  nvalid = block_sum(nvalid, red);
  float z = 0.f;
  for (int k = tid; k < p.K; k += nthr)
    if (pk[k] >= 0.f) z += expf(Ik[k] - imax);
  z = block_sum(z, red);
  const float log_z = imax + logf(z);
  float kl = 0.f;
  __syncthreads();
  for (int k = tid; k < p.K; k += nthr) {
    if (pk[k] < 0.f) { Ik[k] = 0.f; continue; }
    const float pt = pk[k] / psum, log_q = Ik[k] - log_z;
    if (pt > 0.f) kl += pt * (logf(pt) - log_q);
    Ik[k] = p.gs * (expf(log_q) - pt);
  }
  kl = block_sum(kl, red);
  if (tid == 0) {
    p.row_loss[bt] = nvalid > 0.f ? kl : 0.f;
    p.counted[bt] = nvalid > 0.f ? 1.f : 0.f;
  }
  if (!p.dq) return;
  // Backward through the unquantized scores.
  if (nvalid == 0.f) {  // uniform: no slot, zero dq and dw
    for (int i = tid; i < p.Hi * p.D; i += nthr) p.dq[bt * p.Hi * p.D + i] = zero;
    for (int j = tid; j < p.Hi; j += nthr) p.dw[bt * p.Hi + j] = zero;
    return;
  }
  load_q(p.qi);
  const int ntd = L.Dp / 8;                 // n-tiles over D
  const int items_dq = L.nslab * ntd;       // dq tiles [16 heads, 8 dims]
  const int items_dk = (kSparseChunk / 16) * ntd;  // dk tiles [16 slots, 8 dims]
  float accdq[kSparseMaxTiles][4];
#pragma unroll
  for (int e = 0; e < kSparseMaxTiles; ++e) accdq[e][0] = accdq[e][1] = accdq[e][2] = accdq[e][3] = 0.f;
  __syncthreads();  // the forward's last reads of buffer 0 are done
  load_chunk(p.ki, 0, 0);
  cp_async_commit();
  for (int k0 = 0, buf = 0; k0 < p.K; k0 += kSparseChunk, buf ^= 1) {
    next_chunk(p.ki, k0, buf);
    const __nv_bfloat16* Kcur = Kb + buf * kSparseChunk * 2 * L.QSW;
    const uint32_t* Gw = smw + L.g();
    for (int it = warp; it < items_z; it += kSparseWarps) {
      const int slab = it / (kSparseChunk / 8), nt = it % (kSparseChunk / 8);
      float acc[4];
      z_tile(slab, nt, buf, acc);
      const int j0 = slab * 16 + g, j1 = j0 + 8, kk0 = nt * 8 + 2 * c4;
      const float d0 = k0 + kk0 < p.K ? Ik[k0 + kk0] : 0.f, d1 = k0 + kk0 + 1 < p.K ? Ik[k0 + kk0 + 1] : 0.f;
      const float g00 = acc[0] > 0.f ? d0 * wv[j0] : 0.f, g01 = acc[1] > 0.f ? d1 * wv[j0] : 0.f;
      const float g10 = acc[2] > 0.f ? d0 * wv[j1] : 0.f, g11 = acc[3] > 0.f ? d1 * wv[j1] : 0.f;
      Gb[j0 * 2 * L.CSW + kk0] = __float2bfloat16_rn(g00);
      Gb[j0 * 2 * L.CSW + kk0 + 1] = __float2bfloat16_rn(g01);
      Gb[j1 * 2 * L.CSW + kk0] = __float2bfloat16_rn(g10);
      Gb[j1 * 2 * L.CSW + kk0 + 1] = __float2bfloat16_rn(g11);
      float e0 = d0 * fmaxf(acc[0], 0.f) + d1 * fmaxf(acc[1], 0.f);  // dw / c of head j0
      float e1 = d0 * fmaxf(acc[2], 0.f) + d1 * fmaxf(acc[3], 0.f);
      e0 += __shfl_xor_sync(0xffffffffu, e0, 1);
      e1 += __shfl_xor_sync(0xffffffffu, e1, 1);
      e0 += __shfl_xor_sync(0xffffffffu, e0, 2);
      e1 += __shfl_xor_sync(0xffffffffu, e1, 2);
      if (c4 == 0) {
        atomicAdd(&dwa[j0], e0 * p.c);
        atomicAdd(&dwa[j1], e1 * p.c);
      }
    }
    __syncthreads();
    // dq [Hp, Dp] += G [Hp, C] Kc [C, Dp]  (B fragments: ldmatrix.trans of Kc's rows)
#pragma unroll
    for (int e = 0; e < kSparseMaxTiles; ++e) {
      const int it = warp + e * kSparseWarps;
      if (it >= items_dq) break;
      const int mt = it / ntd, nt = it % ntd;
#pragma unroll
      for (int ks = 0; ks < kSparseChunk / 16; ++ks) {
        const int kw = ks * 8;
        uint32_t a[4];
        a[0] = Gw[(mt * 16 + g) * L.CSW + kw + c4];
        a[1] = Gw[(mt * 16 + g + 8) * L.CSW + kw + c4];
        a[2] = Gw[(mt * 16 + g) * L.CSW + kw + 4 + c4];
        a[3] = Gw[(mt * 16 + g + 8) * L.CSW + kw + 4 + c4];
        uint32_t b0, b1;
        ldmatrix_x2_trans(b0, b1, Kcur + (ks * 16 + (lane & 15)) * 2 * L.QSW + nt * 8);
        mma_m16n8k16_bf16(accdq[e], a, b0, b1);
      }
    }
    // dk rows of the chunk [C, Dp] = G^T [C, Hp] Q [Hp, Dp] (A: ldmatrix.trans of G, B: of Q), scatter-added.
    for (int it = warp; it < items_dk; it += kSparseWarps) {
      const int mt = it / ntd, nt = it % ntd;
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
      for (int ks = 0; ks < L.Hp / 16; ++ks) {
        uint32_t a[4], b0, b1;
        ldmatrix_x4_trans(a,
                          Gb + (ks * 16 + (lane & 7) + 8 * (lane >> 4)) * 2 * L.CSW + mt * 16 + 8 * ((lane >> 3) & 1));
        ldmatrix_x2_trans(b0, b1, Qb + (ks * 16 + (lane & 15)) * 2 * L.QSW + nt * 8);
        mma_m16n8k16_bf16(acc, a, b0, b1);
      }
      const int col = nt * 8 + 2 * c4;
      if (p.vec) {
        // Lanes c4, c4 ^ 1 swap halves: the even lane gets 4 columns of row g, the odd one 4 of row g + 8.
        const bool odd = c4 & 1;
        const float sx = odd ? acc[0] : acc[2], sy = odd ? acc[1] : acc[3];
        const float rx = __shfl_xor_sync(0xffffffffu, sx, 1), ry = __shfl_xor_sync(0xffffffffu, sy, 1);
        const int k = k0 + mt * 16 + g + (odd ? 8 : 0);
        const int32_t s = k < p.K ? ir[k] : -1;
        if (s >= 0) {
          const float4 v = odd ? make_float4(rx, ry, acc[2], acc[3]) : make_float4(acc[0], acc[1], rx, ry);
          atomicAdd(reinterpret_cast<float4*>(p.dk + (b * p.T + s) * p.D + nt * 8 + (odd ? 2 * (c4 - 1) : 2 * c4)), v);
        }
        continue;
      }
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int k = k0 + mt * 16 + g + 8 * half;
        const int32_t s = k < p.K ? ir[k] : -1;
        if (s < 0) continue;
        float* dst = p.dk + (b * p.T + s) * p.D + col;
        const float x0 = acc[2 * half], x1 = acc[2 * half + 1];
        if ((p.D & 1) == 0 && col + 1 < p.D) {
          atomicAdd(reinterpret_cast<float2*>(dst), make_float2(x0, x1));
        } else {
          if (col < p.D) atomicAdd(dst, x0);
          if (col + 1 < p.D) atomicAdd(dst + 1, x1);
        }
      }
    }
  }
  __syncthreads();
  // dq out: accumulator (row g / g + 8 of m-tile, cols 2 c4, 2 c4 + 1 of n-tile).
#pragma unroll
  for (int e = 0; e < kSparseMaxTiles; ++e) {
    const int it = warp + e * kSparseWarps;
    if (it >= items_dq) break;
    const int mt = it / ntd, nt = it % ntd;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int j = mt * 16 + g + (q >= 2 ? 8 : 0), i = nt * 8 + 2 * c4 + (q & 1);
      if (j < p.Hi && i < p.D) p.dq[(bt * p.Hi + j) * p.D + i] = __float2bfloat16_rn(accdq[e][q]);
    }
  }
  for (int j = tid; j < p.Hi; j += nthr) p.dw[bt * p.Hi + j] = __float2bfloat16_rn(dwa[j]);
}

}  // namespace

namespace {
// Shared host side of both sparse entries: operands, gradient buffers and the kernel's parameters (S, lse,
// probs and bt0 set per launch).
struct SparseKlRun {
  Tensor qs, ks;           // scoring operands [B, T, Hi, D], [B, T, D]
  Tensor dk32;             // [B, T, D] f32 (grads only)
  Tensor row_loss, counted;  // [B, T] f32
  SparseKlParams p{};
  size_t smem = 0;
};

SparseKlRun sparse_kl_begin(const char* op, const Tensor& indices, const Tensor& q_I, const Tensor& k_I,
                            const Tensor& w_I, bool fp8, double grad_scale, ops::IndexerGrads* grads, int64_t H) {
  const int64_t B = q_I.size(0), T = q_I.size(1), Hi = q_I.size(2), D = q_I.size(3), K = indices.size(2);
  SparseKlRun run;
  run.qs = q_I;
  run.ks = k_I;
  if (fp8) indexer_fp8_operands(q_I, k_I, &run.qs, &run.ks);
  if (grads) {
    grads->dq = Tensor::empty(q_I.shape(), DType::BF16, Device::CUDA);
    grads->dk = Tensor::empty(k_I.shape(), DType::BF16, Device::CUDA);
    grads->dw = Tensor::empty(w_I.shape(), DType::BF16, Device::CUDA);
    run.dk32 = Tensor::zeros(k_I.shape(), DType::F32, Device::CUDA);
  }
  run.row_loss = Tensor::zeros({B, T}, DType::F32, Device::CUDA);
  run.counted = Tensor::zeros({B, T}, DType::F32, Device::CUDA);
  const SparseSmem L(static_cast<int>(Hi), static_cast<int>(D));
  DSA_CHECK(L.nslab * (L.Dp / 8) <= kSparseWarps * kSparseMaxTiles, "[", op, "] ceil16(Hi) * ceil16(D) = ",
            L.Hp * L.Dp, " exceeds 8192 (Hi=", Hi, ", D=", D, ")");
  run.smem = L.bytes(static_cast<int>(K));
  DSA_CHECK(run.smem <= 200 * 1024, "[", op, "] K=", K, " Hi=", Hi, " D=", D, " needs too much shared memory");
  run.p = SparseKlParams{nullptr, nullptr, nullptr, nullptr, indices.data<int32_t>(), bf(run.qs), bf(run.ks), bf(q_I),
                         bf(k_I), bf(w_I), run.row_loss.data<float>(), run.counted.data<float>(),
                         grads ? bf(grads->dq) : nullptr, grads ? bf(grads->dw) : nullptr,
                         grads ? run.dk32.data<float>() : nullptr, (int)T, (int)H, (int)Hi, (int)D, (int)K, 0,
                         1.0f / std::sqrt(static_cast<float>(D)), static_cast<float>(grad_scale), 0};
  bool vec = D % 16 == 0;  // Dp == D: the 16-byte path fills every padded column
  for (const void* ptr : std::initializer_list<const void*>{run.qs.raw(), run.ks.raw(), q_I.raw(), k_I.raw()})
    vec = vec && reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
  run.p.vec = vec ? 1 : 0;
  return run;
}

// Rows [bt0, bt0 + R) of the flattened [B * T].
void sparse_kl_launch(const char* op, SparseKlRun& run, int64_t bt0, int64_t R) {
  cudaFuncSetAttribute(sparse_kl_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)run.smem);
  run.p.bt0 = bt0;
  sparse_kl_kernel<<<static_cast<unsigned>(R), kSparseWarps * 32, run.smem, stream()>>>(run.p);
  check_launch(op);
}

ops::IndexerLossResult sparse_kl_end(const char* op, SparseKlRun& run, int64_t K, ops::IndexerGrads* grads) {
  if (grads && K == 0) {
    grads->dq.zero_();
    grads->dw.zero_();
  }
  if (grads) cast_f32_to_bf16(run.dk32.data<float>(), bf(grads->dk), run.dk32.numel(), op);
  ops::IndexerLossResult res;
  res.loss_sum = host_sum(run.row_loss);
  res.rows = static_cast<int64_t>(std::llround(host_sum(run.counted)));
  return res;
}
}  // namespace

ops::IndexerLossResult indexer_kl_sparse(const Tensor& q_main, const Tensor& kv, const Tensor& lse_sparse,
                                         double scale, const Tensor& indices, const Tensor& q_I, const Tensor& k_I,
                                         const Tensor& w_I, bool fp8, double grad_scale, ops::IndexerGrads* grads) {
  const char* op = "indexer_kl_sparse";
  expect_cuda(op, "q_main", q_main, DType::BF16);
  expect_cuda(op, "kv", kv, DType::BF16);
  expect_cuda(op, "lse_sparse", lse_sparse, DType::F32);
  expect_shape(op, "q_main", q_main, {-1, -1, -1, -1});
  const int64_t B = q_main.size(0), T = q_main.size(1), H = q_main.size(2), Dk = q_main.size(3);
  expect_shape(op, "kv", kv, {B, T, Dk});
  expect_shape(op, "lse_sparse", lse_sparse, {B, H, T});
  check_indices_gpu(op, indices, B, T);
  check_indexer_gpu(op, q_main, q_I, k_I, w_I);
  const int64_t K = indices.size(2), N = B * T;
  if (N == 0) {
    if (grads) *grads = ops::IndexerGrads{Tensor::empty(q_I.shape(), DType::BF16, Device::CUDA),
                                          Tensor::empty(k_I.shape(), DType::BF16, Device::CUDA),
                                          Tensor::empty(w_I.shape(), DType::BF16, Device::CUDA)};
    return {};
  }
  SparseKlRun run = sparse_kl_begin(op, indices, q_I, k_I, w_I, fp8, grad_scale, grads, H);
  if (K > 0) {
    const int64_t rb = rows_for_budget(N, K * Dk * 2 + H * K * 4, int64_t(512) << 20);
    Tensor kvg = Tensor::empty({rb, K, Dk}, DType::BF16, Device::CUDA);
    Tensor S = Tensor::empty({rb, H, K}, DType::F32, Device::CUDA);
    run.p.S = S.data<float>();
    run.p.lse = lse_sparse.data<float>();
    for (int64_t bt0 = 0; bt0 < N; bt0 += rb) {
      const int64_t R = std::min(N, bt0 + rb) - bt0;
      gather_rows(bf(kv), indices.data<int32_t>(), T, Dk, K, bt0, R, bf(kvg), op);
      RowGemm m;  // S_r [H, K] = scale * q_r [H, Dk] kvg_r [K, Dk]^T
      m.tb = true;
      m.M = H; m.N = K; m.K = Dk;
      m.A = bf(q_main) + bt0 * H * Dk; m.lda = Dk; m.strideA = H * Dk;
      m.B = bf(kvg); m.ldb = Dk; m.strideB = K * Dk;
      m.C = S.data<float>(); m.ldc = K; m.strideC = H * K;
      m.alpha = static_cast<float>(scale);
      m.batch = R;
      row_gemm(op, m);
      sparse_kl_launch(op, run, bt0, R);
    }
  }
  return sparse_kl_end(op, run, K, grads);
}

// NOTES: no gather and no score GEMM: the target comes straight from the forward's head sums, so the
// kernel runs over all rows in one launch.
ops::IndexerLossResult indexer_kl_sparse_from_probs(const Tensor& probs_sum, const Tensor& indices, const Tensor& q_I,
                                                    const Tensor& k_I, const Tensor& w_I, bool fp8, double grad_scale,
                                                    ops::IndexerGrads* grads, const Tensor* slot_scores) {
  const char* op = "indexer_kl_sparse_from_probs";
  expect_cuda(op, "q_I", q_I, DType::BF16);
  expect_shape(op, "q_I", q_I, {-1, -1, -1, -1});
  const int64_t B = q_I.size(0), T = q_I.size(1);
  check_indices_gpu(op, indices, B, T);
  const int64_t K = indices.size(2), N = B * T;
  expect_cuda(op, "probs_sum", probs_sum, DType::F32);
  expect_shape(op, "probs_sum", probs_sum, {B, T, K});
  check_indexer_gpu(op, q_I, q_I, k_I, w_I);
  if (slot_scores) {
    expect_cuda(op, "slot_scores", *slot_scores, DType::F32);
    expect_shape(op, "slot_scores", *slot_scores, {B, T, K});
  }
  if (N == 0) {
    if (grads) *grads = ops::IndexerGrads{Tensor::empty(q_I.shape(), DType::BF16, Device::CUDA),
                                          Tensor::empty(k_I.shape(), DType::BF16, Device::CUDA),
                                          Tensor::empty(w_I.shape(), DType::BF16, Device::CUDA)};
    return {};
  }
  // NOTES: with the top-k's slot scores the scoring operands are not needed (no FP8 re-quantization).
  SparseKlRun run = sparse_kl_begin(op, indices, q_I, k_I, w_I, fp8 && !slot_scores, grad_scale, grads, 0);
  if (K > 0) {
    run.p.probs = probs_sum.data<float>();
    run.p.scores = slot_scores ? slot_scores->data<float>() : nullptr;
    sparse_kl_launch(op, run, 0, N);
  }
  return sparse_kl_end(op, run, K, grads);
}

}  // namespace dsa::cuda
