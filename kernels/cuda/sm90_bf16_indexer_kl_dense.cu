// Dense (warm-up) indexer KL loss and the indexer's recall on the GPU, flash-style: the head-summed
// target A[t, s] = sum_h exp(scale q_h,t . k_s - lse_h,t) and the indexer scores I[t, s] are rebuilt
// tile by tile with bf16 mma.sync and never stored.
//   stats pass (one launch, every row): per row Z = sum_s A, sum_s A log A, sum_s A I and an online
//     logsumexp of I; KL_t = (sum A log A - sum A I) / Z - log Z + lse(I) (p = A / Z sums to 1, exactly
//     the CPU's normalization by the actual row sum);
//   gradient (per chunk of query rows): the same tiles again give dI = gs (exp(I - lse I) - A / Z) into
//     an f32 chunk [B, R, T]; then a query-head-row kernel (rows (t, j), as the scoring kernel) forms
//     dq_I and dw_I in registers, and a key-major kernel forms dk_I in registers (no atomics), both
//     recomputing z = q_I . k_I on the unquantized operands (straight-through over FP8, as the CPU).
// Recall: the stats pass over chunks of rows with a per-chunk bitmap of the distinct selected keys.
// NOTES: the fp8 scores use the dequantized Hadamard/FP8 operands (indexer_fp8_operands) in bf16: an
// e4m3 code times a power-of-two scale is exact in bf16, and the products and f32 sums equal the
// CPU reference's up to summation order.
#include <algorithm>
#include <cmath>

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

// dst [rows, ld] (smem) = src rows r (at src + r * stride, `d` values each) for r < nvalid, zero elsewhere
// and in columns d .. dpad-1 (dpad a multiple of 16). vec: d % 8 == 0, stride % 8 == 0, src 16-byte aligned:
// asynchronous 16-byte copies (the caller commits and waits); otherwise plain stores.
__device__ __forceinline__ void load_tile_async(bf16_t* dst, int ld, int dpad, const bf16_t* src, int64_t stride,
                                                int nvalid, int d, int rows, bool vec) {
  if (vec) {
    const int cpr = dpad / 8;
    for (int i = threadIdx.x; i < rows * cpr; i += blockDim.x) {
      const int r = i / cpr, c = (i % cpr) * 8;
      const bool ok = r < nvalid && c < d;
      cp_async16(dst + r * ld + c, ok ? src + r * stride + c : src, ok ? 16 : 0);
    }
  } else {
    for (int i = threadIdx.x; i < rows * dpad; i += blockDim.x) {
      const int r = i / dpad, c = i % dpad;
      dst[r * ld + c] = (r < nvalid && c < d) ? src[r * stride + c] : __float2bfloat16_rn(0.f);
    }
  }
}
// As load_tile_async, then waits for every copy of this thread (the caller still syncs the block).
__device__ __forceinline__ void load_tile(bf16_t* dst, int ld, int dpad, const bf16_t* src, int64_t stride, int nvalid,
                                          int d, int rows, bool vec) {
  load_tile_async(dst, ld, dpad, src, stride, nvalid, d, rows, vec);
  cp_async_commit();
  cp_async_wait<0>();
}

// For heads i = 0 .. n-1: a per-head A tile (load_a(buf, i)) against a fixed B tile (load_b()), then
// fn(buf, i) on the block's loaded tiles. dbl: the next head's tile is prefetched into the second
// buffer while fn runs. Starts with a block barrier (earlier readers of the buffers are done).
template <class LoadB, class LoadA, class Fn>
__device__ __forceinline__ void head_loop(int n, bool dbl, bf16_t* buf0, bf16_t* buf1, LoadB load_b, LoadA load_a,
                                          Fn fn) {
  __syncthreads();
  load_b();
  load_a(buf0, 0);
  cp_async_commit();
  for (int i = 0; i < n; ++i) {
    if (i > 0) __syncthreads();
    if (dbl && i + 1 < n) {
      load_a((i & 1) ? buf0 : buf1, i + 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else if (!dbl && i > 0) {
      load_a(buf0, i);
      cp_async_commit();
      cp_async_wait<0>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    fn((dbl && (i & 1)) ? buf1 : buf0, i);
  }
}

// acc[16 x 64] += A[16 x 16*ksteps] (smem rows, ld sa) . Bt[64 x 16*ksteps]^T (smem rows, ld sb).
__device__ __forceinline__ void warp_gemm_nt(float (&acc)[8][4], const bf16_t* A, int sa, const bf16_t* Bt, int sb,
                                             int ksteps, int g, int c4) {
  for (int kk = 0; kk < ksteps; ++kk) {
    const bf16_t* ap = A + g * sa + kk * 16 + 2 * c4;
    const uint32_t a[4] = {ld32(ap), ld32(ap + 8 * sa), ld32(ap + 8), ld32(ap + 8 * sa + 8)};
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      const bf16_t* bp = Bt + (nt * 8 + g) * sb + kk * 16 + 2 * c4;
      mma_m16n8k16_bf16(acc[nt], a, ld32(bp), ld32(bp + 8));
    }
  }
}

// out[16 x kDP] += G[16 x 64] (accumulator layout, rounded to bf16) . V[64 x kDP] (smem rows, ld sv).
template <int kDP>
__device__ __forceinline__ void warp_gemm_pv(float (&out)[kDP / 8][4], const float (&G)[8][4], const bf16_t* V, int sv,
                                             int g, int c4) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const uint32_t a[4] = {pack_bf16(G[2 * kk][0], G[2 * kk][1]), pack_bf16(G[2 * kk][2], G[2 * kk][3]),
                           pack_bf16(G[2 * kk + 1][0], G[2 * kk + 1][1]),
                           pack_bf16(G[2 * kk + 1][2], G[2 * kk + 1][3])};
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
  float* part;            // [nsplit, B, R, 3] (grad): Z, sum a log a, sum a I of each split's keys
  int T, H, Hk, Dk, DkP, Hi, D, DP, t0, R, Tw;
  int nrb;                // row blocks of kBM rows: ceil(R / kBM)
  int split_tiles;        // (grad) key tiles per CTA: blockIdx.x = split * nrb + row block
  float scale_log2, c, gs;
  bool vec_main, vec_idx;
  bool dbl_main, dbl_idx;  // double-buffered per-head tiles (when shared memory allows)
};

// 8 warps: warp w owns rows 16 (w % 4) .. +15 of the CTA's 64 and keys 64 (w / 4) .. +63 of each tile.
// NOTES: row blocks run from the last (longest) to the first, so the causal imbalance leaves no tail
// wave (one CTA per SM: the first wave of short rows used to finish early and the long rows ran last).
// The grad mode writes dI element by element, so it also splits the keys: CTA (split, row block) takes
// split_tiles key tiles; a chunk of a few hundred rows at long context still fills the GPU.
// With gradients there is no stats pass over the main attention: the target's normalizer is Z = H (each
// head's probabilities sum to one over s <= t by the definition of the forward's lse; the computed Z is
// H up to the rounding of the scores), lse(I) comes from the idx-lse pass (the indexer's scores alone,
// about a fifth of the work at bench-small shapes), and the grad pass sums the loss terms as it goes.
template <int kMode>
__global__ void __launch_bounds__(kFusedThreads) fused_kernel(FusedParams p) {
  extern __shared__ __align__(16) unsigned char smraw[];
  __shared__ float fin[kBM][5];
  const int SK = p.DkP + 8, SI = p.DP + 8;
  // Main phase: Qs [kBM, SK] (and Qs2 when dbl_main) one head's queries, Ks [kBN, SK] one key head's keys;
  // the index phase reuses the region: QIs [kBM, SI] (QIs2 when dbl_idx), KIs [kBN, SI].
  bf16_t* Qs = reinterpret_cast<bf16_t*>(smraw);
  bf16_t* Qs2 = Qs + kBM * SK;
  bf16_t* Ks = Qs + (p.dbl_main ? 2 : 1) * kBM * SK;
  bf16_t* QIs = Qs;
  bf16_t* QIs2 = Qs + kBM * SI;
  bf16_t* KIs = Qs + (p.dbl_idx ? 2 : 1) * kBM * SI;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, c4 = lane & 3;
  const int rs = warp & 3, kh = warp >> 2;
  const int rblk = kMode == kGrad ? blockIdx.x % p.nrb : blockIdx.x;
  const int b = blockIdx.y, r0 = (p.nrb - 1 - rblk) * kBM;
  const int nrows = min(kBM, p.R - r0);
  const int64_t T = p.T;
  const int tmax = p.t0 + r0 + nrows - 1;
  const int s_begin = kMode == kGrad ? static_cast<int>(blockIdx.x / p.nrb) * p.split_tiles * kBN : 0;
  const int s_end = kMode == kGrad ? s_begin + p.split_tiles * kBN : tmax + 1;
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
    float A[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) A[nt][e] = 0.f;
    // (1) head-summed main attention probabilities.
    for (int hk = 0; hk < (kMode == kIdxLse ? 0 : p.Hk); ++hk) {
      head_loop(
          grp, p.dbl_main, Qs, Qs2,
          [&] {
            load_tile_async(Ks, SK, p.DkP, p.km + ((b * T + s0) * p.Hk + hk) * p.Dk, (int64_t)p.Hk * p.Dk, kvalid,
                            p.Dk, kBN, p.vec_main);
          },
          [&](bf16_t* dst, int i) {
            load_tile_async(dst, SK, p.DkP, p.qm + ((b * T + p.t0 + r0) * p.H + hk * grp + i) * p.Dk,
                            (int64_t)p.H * p.Dk, nrows, p.Dk, kBM, p.vec_main);
          },
          [&](const bf16_t* Qc, int i) {
            const int h = hk * grp + i;
            float S[8][4];
#pragma unroll
            for (int nt = 0; nt < 8; ++nt)
#pragma unroll
              for (int e = 0; e < 4; ++e) S[nt][e] = 0.f;
            warp_gemm_nt(S, Qc + rs * 16 * SK, SK, Ks + kh * 64 * SK, SK, p.DkP / 16, g, c4);
            const float la = va ? p.lse[(b * p.H + h) * T + ta] * 1.4426950408889634f : 0.f;
            const float lb = vb ? p.lse[(b * p.H + h) * T + tb] * 1.4426950408889634f : 0.f;
#pragma unroll
            for (int nt = 0; nt < 8; ++nt)
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                const int s = s0 + kh * 64 + nt * 8 + 2 * c4 + (e & 1);
                const bool ok = e < 2 ? (va && s <= ta) : (vb && s <= tb);
                if (ok) A[nt][e] += ex2(S[nt][e] * p.scale_log2 - (e < 2 ? la : lb));
              }
          });
    }
    if constexpr (kMode == kRecall) {
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int s = s0 + kh * 64 + nt * 8 + 2 * c4 + (e & 1);
          const int ri = e < 2 ? 0 : 1, r = e < 2 ? ra : rb, t = e < 2 ? ta : tb;
          if (!(ri == 0 ? va : vb) || s > t) continue;
          zs[ri] += A[nt][e];
          const uint32_t word = p.bitmap[((int64_t)b * p.R + r) * p.Tw + (s >> 5)];
          if ((word >> (s & 31)) & 1u) ala[ri] += A[nt][e];
        }
      continue;
    } else {
      // (2) indexer scores.
      float I[8][4];
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) I[nt][e] = 0.f;
      head_loop(
          p.Hi, p.dbl_idx, QIs, QIs2,
          [&] { load_tile_async(KIs, SI, p.DP, p.ks + (b * T + s0) * p.D, p.D, kvalid, p.D, kBN, p.vec_idx); },
          [&](bf16_t* dst, int j) {
            load_tile_async(dst, SI, p.DP, p.qs + ((b * T + p.t0 + r0) * p.Hi + j) * p.D, (int64_t)p.Hi * p.D, nrows,
                            p.D, kBM, p.vec_idx);
          },
          [&](const bf16_t* QIc, int j) {
            float Z[8][4];
#pragma unroll
            for (int nt = 0; nt < 8; ++nt)
#pragma unroll
              for (int e = 0; e < 4; ++e) Z[nt][e] = 0.f;
            warp_gemm_nt(Z, QIc + rs * 16 * SI, SI, KIs + kh * 64 * SI, SI, p.DP / 16, g, c4);
            const float wa = va ? __bfloat162float(p.w[(b * T + ta) * p.Hi + j]) * p.c : 0.f;
            const float wb = vb ? __bfloat162float(p.w[(b * T + tb) * p.Hi + j]) * p.c : 0.f;
#pragma unroll
            for (int nt = 0; nt < 8; ++nt)
#pragma unroll
              for (int e = 0; e < 4; ++e) I[nt][e] += (e < 2 ? wa : wb) * fmaxf(Z[nt][e], 0.f);
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
              if (s0 + kh * 64 + nt * 8 + 2 * c4 + e <= t) m = fmaxf(m, I[nt][2 * ri + e]);
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
              const float a = A[nt][2 * ri + e], v = I[nt][2 * ri + e];
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
              const float a = A[nt][2 * ri + e];
              zs[ri] += a;
              ai[ri] += a * I[nt][2 * ri + e];
              if (a > 0.f) ala[ri] += a * logf(a);
            }
            const float d0 = p.gs * (expf(I[nt][2 * ri] - lrow[ri]) - A[nt][2 * ri] * invz);
            const float d1 = p.gs * (expf(I[nt][2 * ri + 1] - lrow[ri]) - A[nt][2 * ri + 1] * invz);
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
    const int t = ri == 0 ? ta : tb;
    const float* f = fin[rs * 16 + g + 8 * ri];
    const float z = zs[ri] + f[0], a_la = ala[ri] + f[1];
    if constexpr (kMode == kGrad) {
      const int r = ri == 0 ? ra : rb;
      float* o = p.part + ((static_cast<int64_t>(blockIdx.x / p.nrb) * gridDim.y + b) * p.R + r) * 3;
      o[0] = z; o[1] = a_la; o[2] = ai[ri] + f[2];
    } else if constexpr (kMode == kIdxLse) {
      const float mn = fmaxf(mx[ri], f[3]);
      p.lrow[b * T + t] = mn + logf(lx[ri] * expf(mx[ri] - mn) + f[4] * expf(f[3] - mn));
    } else if constexpr (kMode == kRecall) {
      p.out[b * T + t] = a_la / z;
    } else {
      const float a_i = ai[ri] + f[2];
      const float mn = fmaxf(mx[ri], f[3]);
      const float l = lx[ri] * expf(mx[ri] - mn) + f[4] * expf(f[3] - mn);
      const float lse_i = mn + logf(l);
      p.zrow[b * T + t] = z;
      p.lrow[b * T + t] = lse_i;
      p.out[b * T + t] = (a_la - a_i) / z - logf(z) + lse_i;
    }
  }
}

// KL of the rows of a gradient chunk from the grad pass's partial sums (splits added in order):
// KL_t = (sum a log a - sum a I) / Z - log Z + lse(I), as the stats pass writes it.
__global__ void kl_from_parts_kernel(const float* __restrict__ part, const float* __restrict__ lrow,
                                     float* __restrict__ out, int B, int T, int t0, int R, int nsplit) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= static_cast<int64_t>(B) * R) return;
  const int b = static_cast<int>(i / R), r = static_cast<int>(i % R);
  float z = 0.f, a_la = 0.f, a_i = 0.f;
  for (int sp = 0; sp < nsplit; ++sp) {
    const float* o = part + ((static_cast<int64_t>(sp) * B + b) * R + r) * 3;
    z += o[0]; a_la += o[1]; a_i += o[2];
  }
  const int64_t bt = static_cast<int64_t>(b) * T + t0 + r;
  out[bt] = (a_la - a_i) / z - logf(z) + lrow[bt];
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
  int T, Hi, D, t0, R;
  float c;
  bool vec;
};

// dq_I, dw_I of the chunk's query-head rows (t, j) (flattened, 64 per CTA, 16 per warp): over key tiles
// of 64, z = q_j,t . k_s, G = dI w_j c [z > 0], dq += G k (all in registers), dw += dI c relu(z).
template <int kDP>
__global__ void __launch_bounds__(kBwdThreads) idx_dq_kernel(IdxBwdParams p) {
  constexpr int S = kDP + 8;
  extern __shared__ __align__(16) unsigned char smraw[];
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
    float Z[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) Z[nt][e] = 0.f;
    warp_gemm_nt(Z, Qs + warp * 16 * S, S, Ks, S, kDP / 16, g, c4);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int s = s0 + nt * 8 + 2 * c4 + (e & 1);
        const bool lo = e < 2;
        const bool ok = lo ? (va && s <= ta) : (vb && s <= tb);
        const float d = ok ? (lo ? da[s] : db[s]) : 0.f, z = Z[nt][e];
        if (lo) dwa += d * fmaxf(z, 0.f);
        else dwb += d * fmaxf(z, 0.f);
        Z[nt][e] = z > 0.f ? d * (lo ? wa : wb) : 0.f;
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

// dk_I of 64 keys (16 per warp) from the chunk's rows t >= s: per token tile of 64 and head j,
// z^T = k_s . q_j,t, G^T = dI w_j c [z > 0], dk += G^T q_j (registers); one CTA per key tile, so the
// f32 accumulation over chunks needs no atomics.
template <int kDP>
__global__ void __launch_bounds__(kBwdThreads) idx_dk_kernel(IdxBwdParams p) {
  constexpr int S = kDP + 8;
  extern __shared__ __align__(16) unsigned char smraw[];
  bf16_t* Ks = reinterpret_cast<bf16_t*>(smraw);  // [64, S] keys
  bf16_t* Qs = Ks + 64 * S;                        // [2][64, S] one head's queries (double-buffered)
  float(*dIs)[65] = reinterpret_cast<float(*)[65]>(Qs + 2 * 64 * S);  // [64 tokens, 65]
  __shared__ float ws[2][64];  // per buffer: w_j c of the tile's tokens
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, c4 = lane & 3;
  const int b = blockIdx.y, k0 = blockIdx.x * 64;
  const int64_t T = p.T;
  const int t1 = p.t0 + p.R;
  load_tile(Ks, S, kDP, p.k + (b * T + k0) * p.D, p.D, min(64, p.T - k0), p.D, 64, p.vec);
  float O[kDP / 8][4];
#pragma unroll
  for (int i = 0; i < kDP / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) O[i][e] = 0.f;
  const int ka = warp * 16 + g;  // local keys ka, ka + 8
  for (int tb0 = max(p.t0, k0); tb0 < t1; tb0 += 64) {
    const int ntok = min(64, t1 - tb0);
    head_loop(
        p.Hi, true, Qs, Qs + 64 * S,
        [&] {
          for (int i = tid; i < 64 * 64; i += blockDim.x) {
            const int tt = i >> 6, ss = i & 63, t = tb0 + tt, s = k0 + ss;
            dIs[tt][ss] = (tt < ntok && s <= t) ? p.dI[((int64_t)b * p.R + (t - p.t0)) * T + s] : 0.f;
          }
        },
        [&](bf16_t* dst, int j) {
          load_tile_async(dst, S, kDP, p.q + ((b * T + tb0) * p.Hi + j) * p.D, (int64_t)p.Hi * p.D, ntok, p.D, 64,
                          p.vec);
          if (tid < 64)
            ws[dst == Qs ? 0 : 1][tid] =
                tid < ntok ? __bfloat162float(p.w[(b * T + tb0 + tid) * p.Hi + j]) * p.c : 0.f;
        },
        [&](const bf16_t* Qc, int) {
          const float* wb = ws[Qc == Qs ? 0 : 1];
          float Z[8][4];
#pragma unroll
          for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) Z[nt][e] = 0.f;
          warp_gemm_nt(Z, Ks + warp * 16 * S, S, Qc, S, kDP / 16, g, c4);
#pragma unroll
          for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int tt = nt * 8 + 2 * c4 + (e & 1), kl = e < 2 ? ka : ka + 8;
              Z[nt][e] = Z[nt][e] > 0.f ? dIs[tt][kl] * wb[tt] : 0.f;
            }
          warp_gemm_pv<kDP>(O, Z, Qc, S, g, c4);
        });
  }
#pragma unroll
  for (int dn = 0; dn < kDP / 8; ++dn)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int col = dn * 8 + 2 * c4 + (e & 1), key = k0 + (e < 2 ? ka : ka + 8);
      if (col >= p.D || key >= p.T) continue;
      p.dk[(b * T + key) * p.D + col] += O[dn][e];
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

// Key splits of a grad chunk of R rows from t0: about four CTAs per SM over the chunk, at most one per
// key tile. NOTES: one CTA is resident per SM; with four the splits' uneven ends (causal rows, the last
// split short) even out.
int grad_splits(int64_t t0, int64_t R, int64_t B, int* split_tiles) {
  const int nrb = static_cast<int>(ceil_div(R, kBM)), ntiles = static_cast<int>(ceil_div(t0 + R, kBN));
  const int want = static_cast<int>(ceil_div(4 * static_cast<int64_t>(sm_count()), nrb * B));
  const int tiles = static_cast<int>(ceil_div(ntiles, std::clamp(want, 1, ntiles)));
  if (split_tiles) *split_tiles = tiles;
  return static_cast<int>(ceil_div(ntiles, tiles));
}

// Returns the grid's key splits (1 but for kGrad).
template <int kMode>
int launch_fused(const char* op, FusedParams p, int64_t B) {
  constexpr size_t kLimit = 227 * 1024 - sizeof(float) * kBM * 5;
  auto bytes = [](int nbuf, int cols) { return sizeof(bf16_t) * static_cast<size_t>((nbuf * kBM + kBN) * (cols + 8)); };
  p.dbl_main = bytes(2, p.DkP) <= kLimit;
  p.dbl_idx = bytes(2, p.DP) <= kLimit;
  size_t smem = kMode == kIdxLse ? 0 : bytes(p.dbl_main ? 2 : 1, p.DkP);  // (idx-lse: no main phase)
  if (kMode != kRecall) smem = std::max(smem, bytes(p.dbl_idx ? 2 : 1, p.DP));
  DSA_CHECK(smem <= kLimit, "[", op, "] head dim ", p.Dk, " (or indexer dim ", p.D,
            ") too large for the fused kernel's shared memory");
  DSA_CUDA_CHECK(cudaFuncSetAttribute(fused_kernel<kMode>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  p.nrb = static_cast<int>(ceil_div(p.R, kBM));
  p.split_tiles = static_cast<int>(ceil_div(p.t0 + p.R, kBN));
  const int nsplit = kMode == kGrad ? grad_splits(p.t0, p.R, B, &p.split_tiles) : 1;
  const dim3 grid(static_cast<unsigned>(p.nrb * nsplit), static_cast<unsigned>(B));
  fused_kernel<kMode><<<grid, kFusedThreads, smem, stream()>>>(p);
  check_launch(op);
  return nsplit;
}

template <int kDP>
void launch_idx_bwd(const char* op, const IdxBwdParams& p, int64_t B) {
  const size_t smem_q = sizeof(bf16_t) * 2 * 64 * (kDP + 8);
  const size_t smem_k = sizeof(bf16_t) * 3 * 64 * (kDP + 8) + sizeof(float) * 64 * 65;
  DSA_CUDA_CHECK(cudaFuncSetAttribute(idx_dq_kernel<kDP>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem_q));
  DSA_CUDA_CHECK(cudaFuncSetAttribute(idx_dk_kernel<kDP>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem_k));
  const dim3 gq(static_cast<unsigned>(ceil_div((int64_t)p.R * p.Hi, 64)), static_cast<unsigned>(B));
  idx_dq_kernel<kDP><<<gq, kBwdThreads, smem_q, stream()>>>(p);
  check_launch(op);
  const dim3 gk(static_cast<unsigned>(ceil_div(p.t0 + p.R, 64)), static_cast<unsigned>(B));
  idx_dk_kernel<kDP><<<gk, kBwdThreads, smem_k, stream()>>>(p);
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
  // With gradients: lse(I) first (idx-lse), then per chunk of query rows dI and the loss terms' partial
  // sums (grad) and the chunk's KL from them. The chunks bound the f32 dI buffer [B, rc, T]
  // (ops::dense_kl_chunk_rows); the partial sums [nsplit, B, rc, 3] are a few MiB at most.
  launch_fused<kIdxLse>(op, p, B);
  const int64_t rc = block_rows > 0 ? std::min(block_rows, T) : ops::dense_kl_chunk_rows(B, T, Hi);
  int64_t max_split = 1;
  for (int64_t t0 = 0; t0 < T; t0 += rc)
    max_split = std::max<int64_t>(max_split, grad_splits(t0, std::min(T, t0 + rc) - t0, B, nullptr));
  Tensor part = Tensor::empty({max_split, B, rc, 3}, DType::F32, Device::CUDA);
  p.part = part.data<float>();
  Tensor dI = Tensor::empty({B, rc, T}, DType::F32, Device::CUDA);
  Tensor dk32 = Tensor::zeros(k_I.shape(), DType::F32, Device::CUDA);
  IdxBwdParams bp{bfp(q_I), bfp(k_I), bfp(w_I), dI.data<float>(), bfp(grads->dq), bfp(grads->dw), dk32.data<float>(),
                  (int)T, (int)Hi, (int)D, 0, 0, p.c, D % 8 == 0 && aligned16(bfp(q_I)) && aligned16(bfp(k_I))};
  p.dI = dI.data<float>();
  const int dpad = pad16(D);
  for (int64_t t0 = 0; t0 < T; t0 += rc) {
    p.t0 = static_cast<int>(t0);
    p.R = static_cast<int>(std::min(T, t0 + rc) - t0);
    const int nsplit = launch_fused<kGrad>(op, p, B);
    kl_from_parts_kernel<<<grid_1d(B * p.R, 256), 256, 0, stream()>>>(p.part, p.lrow, p.out, (int)B, (int)T, p.t0,
                                                                       p.R, nsplit);
    check_launch(op);
    bp.t0 = p.t0;
    bp.R = p.R;
    if (dpad <= 16) launch_idx_bwd<16>(op, bp, B);
    else if (dpad <= 32) launch_idx_bwd<32>(op, bp, B);
    else if (dpad <= 64) launch_idx_bwd<64>(op, bp, B);
    else if (dpad <= 128) launch_idx_bwd<128>(op, bp, B);
    else launch_idx_bwd<256>(op, bp, B);
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
